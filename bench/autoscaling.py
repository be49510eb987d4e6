"""Autoscaling benchmark: leanserve vs static, HPA, KEDA and the oracle on all four traces, one run.

Pools and prices are examples/minilm-cpu.yaml's; capacities come from `--profile FILE` (the
serving profiler's JSON) or, without it, the documented estimate in
leanserve.autoscaling.commands (printed loudly as ESTIMATED). Each trace is rescaled so its peak
is ``--peak-share`` of the most the spec's maxReplicas and maxHourlyCost can serve, so every
contender can meet it. Prints the table and the acceptance ratios, measured side by side, plus
the reactive bound (leanserve.autoscaling.simulate.reactive_bound: the best SLO attainment that
perfect knowledge of the load, with the same replica start-up delay, reaches at <= 1.15x the
oracle's cost; below 99% the two targets cannot both be met by a causal policy of that kind on
that trace); writes
per-trace simulation.json and simulation.png under --out.

    python bench/autoscaling.py [--profile profile.json] [--out bench-out/autoscaling]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    from leanserve.api.load import load_one
    from leanserve.autoscaling.commands import (
        ESTIMATED_RPS_PER_CPU,
        estimated_pools,
        read_profile,
        write_outputs,
    )
    from leanserve.autoscaling.policy import Target, capacity, cheapest_mix, pools_from_profile
    from leanserve.autoscaling.simulate import (
        POLICIES,
        Trace,
        load_trace,
        reactive_bound,
        simulate,
    )

    ap = argparse.ArgumentParser(description="leanserve autoscaling benchmark")
    ap.add_argument("--spec", type=Path, default=ROOT / "examples/minilm-cpu.yaml")
    ap.add_argument("--profile", type=Path, default=None)
    ap.add_argument("--traces", type=Path, default=ROOT / "bench/traces")
    ap.add_argument("--peak-share", type=float, default=0.6)
    ap.add_argument("--max-replicas", type=int, default=20,
                    help="override spec.autoscaling.maxReplicas (the example's 4 suits one "
                         "machine, not a cluster); 0 keeps the spec's")
    ap.add_argument("--max-hourly-cost", type=float, default=5.0,
                    help="override spec.autoscaling.maxHourlyCost; 0 keeps the spec's")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out/autoscaling")
    args = ap.parse_args()

    spec = load_one(args.spec).spec
    if args.profile:
        pools = pools_from_profile(read_profile(args.profile), spec)
        source = f"capacities measured: {args.profile}"
    else:
        pools = estimated_pools(spec)
        source = (f"capacities ESTIMATED ({ESTIMATED_RPS_PER_CPU:g} req/s per requested core), "
                  "not measured: pass --profile from `leanserve profile` for real figures")
    target = Target.from_spec(spec)
    if args.max_replicas:
        target = dataclasses.replace(target, max_replicas=args.max_replicas)
    if args.max_hourly_cost:
        target = dataclasses.replace(target, max_hourly_cost=args.max_hourly_cost)
    top = capacity(cheapest_mix(1e12, pools, target)[0], pools)
    print(source)
    print("pools: " + ", ".join(f"{p.name} {p.capacity_rps:g} req/s ${p.hourly_price:g}/h"
                                for p in pools))
    print(f"SLO p95<={target.latency_p95_ms:g} ms, replicas {target.min_replicas}.."
          f"{target.max_replicas}, budget ${target.budget:g}/h, interval "
          f"{target.interval_seconds:g}s, scale-down window "
          f"{target.scale_down_stabilization_seconds:g}s; traces peak at "
          f"{args.peak_share:.0%} of {top:g} req/s")
    hdr = f"{'trace':8} {'policy':10} {'cost USD':>9} {'SLO att.':>9} {'repl-min':>9} " \
          f"{'/oracle':>8} {'/hpa':>6} {'reactive bound':>15}"
    print(hdr)
    print("-" * len(hdr))
    ok_all = True
    for csv in sorted(args.traces.glob("*.csv")):
        raw = load_trace(csv)
        k = args.peak_share * top / max(raw.rates)
        tr = Trace(raw.times, tuple(r * k for r in raw.rates))
        sim = simulate(tr, pools, target)
        s = write_outputs(sim, args.out / csv.stem, f"{csv.stem} ({source[:40]})")["policies"]
        rb = reactive_bound(tr, pools, target)
        for name in POLICIES:
            r = s[name]
            extra = f" {rb.attainment:14.2%}" if name == "leanserve" else ""
            print(f"{csv.stem:8} {name:10} {r['cost']:9.4f} {r['slo_attainment']:9.2%} "
                  f"{r['replica_minutes']:9.1f} {r['cost'] / s['oracle']['cost']:8.3f} "
                  f"{r['cost'] / s['hpa']['cost']:6.3f}{extra}")
        c99 = "none" if rb.cheapest_at_99 is None else f"{rb.cheapest_at_99:.2f}x oracle"
        print(f"{csv.stem:8} reactive bound: perfect knowledge of the load up to t-start-up, free "
              f"swaps, no start-up cost: best {rb.attainment:.2%} at <=1.15x oracle "
              f"({rb.cost_ratio:.3f}x, headroom {rb.headroom:g}, hold {rb.hold_seconds:g}s); "
              f"cheapest at >=99%: {c99}")
        ls, hpa, orc = s["leanserve"], s["hpa"], s["oracle"]
        checks = {
            "SLO>=99%": ls["slo_attainment"] >= 0.99,
            "<=1.15x oracle": ls["cost"] <= 1.15 * orc["cost"],
            "<=0.75x hpa": ls["cost"] <= 0.75 * hpa["cost"],
            "SLO>=hpa": ls["slo_attainment"] >= hpa["slo_attainment"],
        }
        checks["bound allows both"] = rb.attainment >= 0.99
        ok_all &= all(v for k, v in checks.items() if k != "bound allows both")
        print(f"{csv.stem:8} checks: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}"
                                                    for k, v in checks.items()))
        print()
    print(f"plots and JSON: {args.out}/<trace>/simulation.png|json")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
