"""The autoscaling acceptance checks over many draws of the four traces: does a pass generalise?

Why: TUNED_SETTINGS was tuned on the four traces in bench/traces/ (seed offset 0). One draw of
noise and bursts is easy to overfit: a policy can meet a pair of targets there by a hair and
miss it on the next draw of the same shapes. This runs bench/autoscaling.py's simulation and
checks (its ``checks``, ``bench_target`` and ``scaled_traces``; same spec, profile, limits and
peak share) on the traces bench/make_traces.py's ``write()`` makes for each seed offset, and
prints per offset and in total: targets passed, feasible pairs met / feasible pairs, and the
pairs MISSED although no bound rules them out. Offset 0 is bench/traces/ and 100 is
bench/traces-heldout/ as committed; the others are written to a temporary folder.

A pair is judged by bench/autoscaling.py's own ``pair_verdicts`` (infeasible when the rise
bound or the reactive bound rules it out at this start-up, MISSED when neither does). Only
leanserve depends on the policy settings, so the baselines (HPA, oracle) and the bounds, the
slow part, are computed once per trace and cached in ``--cache`` (keyed by the trace's rates,
the whole setup and the source of leanserve/autoscaling/simulate.py, where they are computed).
"MISSED, reachable" below means MISSED in that sense.

Development protocol (issue 6): tune on the DEV offsets only (0, 200, 300, 400) and look at the
TEST offsets (100, 500-900) once, at the end.

    python bench/autoscaling_seeds.py [--offsets 0,100,200,...] [--settings tuned|default]
                                      [--set FIELD=VALUE ...] [--jobs 2] [--per-trace]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import autoscaling as bench  # bench/autoscaling.py, the single-draw benchmark
import make_traces

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OFFSETS = (0, 100, 200, 300, 400, 500, 600, 700)
DEV_OFFSETS = (0, 200, 300, 400)
TEST_OFFSETS = (100, 500, 600, 700, 800, 900)
COMMITTED = {0: ROOT / "bench/traces", 100: ROOT / "bench/traces-heldout"}
CACHE_VERSION = 3
"""Bump when what _baselines computes changes (2: the rise bound; 3: at HPA's attainment too)."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything the simulation of one trace depends on besides the trace and the settings."""

    spec: Path
    profile: Path
    peak_share: float
    startup_seconds: float
    max_replicas: int
    max_hourly_cost: float


def _load(setup: Setup) -> tuple[list[Any], Any, float]:
    from leanserve.api.load import load_one
    from leanserve.autoscaling.commands import read_profile
    from leanserve.autoscaling.policy import capacity, cheapest_mix, pools_from_profile

    spec = load_one(setup.spec).spec
    pools = pools_from_profile(read_profile(setup.profile), spec)
    target = bench.bench_target(spec, setup.max_replicas, setup.max_hourly_cost)
    top = capacity(cheapest_mix(1e12, pools, target)[0], pools)
    return pools, target, top


def _key(setup: Setup, name: str, rates: tuple[float, ...]) -> str:
    h = hashlib.sha256(repr((CACHE_VERSION, dataclasses.astuple(setup)[2:], name,
                             rates)).encode())
    h.update(setup.spec.read_bytes())
    h.update(setup.profile.read_bytes())
    # the bounds' and baselines' code: a change there must not reuse stale entries
    from leanserve.autoscaling import simulate

    h.update(Path(simulate.__file__).read_bytes())
    h.update(Path(__file__).read_bytes())  # what _baselines keeps
    h.update(Path(bench.__file__).read_bytes())  # the targets the joint bounds are asked for
    return h.hexdigest()[:24]


def _baselines(trace: Any, pools: list[Any], target: Any, cfg: Any) -> dict[str, Any]:
    """HPA's and the oracle's summaries and what bench/autoscaling.py's verdicts read of its
    bounds (settings-independent)."""
    from leanserve.autoscaling.simulate import simulate

    s = simulate(trace, pools, target, cfg, only=("hpa", "oracle")).summary()["policies"]
    b = bench.trace_bounds(trace, pools, target, cfg, s)
    return {"hpa": s["hpa"], "oracle": s["oracle"], "bound": b.reactive.attainment,
            "bound_hpa": b.reactive_hpa.attainment, "rise": b.rise.min_cost_ratio,
            "rise_hpa": b.rise_hpa.min_cost_ratio, "rise_joint": b.rise_joint.min_cost_ratio,
            "bound_joint": b.reactive_joint.attainment}


def run_trace(setup: Setup, folder: Path, name: str, settings: Any,
              cached: dict[str, Any] | None) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(cache key, baselines, leanserve's summary) for one trace file."""
    from leanserve.autoscaling.simulate import SimConfig, simulate

    pools, target, top = _load(setup)
    trace = bench.scaled_traces(folder, setup.peak_share, top)[name]
    cfg = SimConfig(startup_seconds=setup.startup_seconds, settings=settings)
    key = _key(setup, name, trace.rates)
    base = cached if cached is not None else _baselines(trace, pools, target, cfg)
    ls = simulate(trace, pools, target, cfg, only=("leanserve",)).summary()["policies"]
    return key, base, ls["leanserve"]


def verdicts(name: str, s: dict[str, Any], base: dict[str, Any]) -> list[tuple[str, str]]:
    """[(pair, "met" | "infeasible" | "MISSED")] for one trace: bench/autoscaling.py's
    pair_verdicts (the oracle pair first, then the HPA pair) on the cached bounds."""
    got = bench.pair_verdicts(s, base["bound"], base["bound_hpa"], base["rise"],
                              base["rise_hpa"])
    return [(f"{name} {pair}", v) for pair, (_, v, _) in zip(("oracle pair", "HPA pair"), got,
                                                            strict=True)]


def _settings(which: str, overrides: list[str]) -> Any:
    from leanserve.autoscaling.policy import DEFAULT_SETTINGS, TUNED_SETTINGS

    base = TUNED_SETTINGS if which == "tuned" else DEFAULT_SETTINGS
    fields = {f.name: f for f in dataclasses.fields(base)}
    changes: dict[str, Any] = {}
    for item in overrides:
        name, _, value = item.partition("=")
        if name not in fields or not value:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of "
                             f"{sorted(fields)}")
        kind = type(getattr(base, name))
        changes[name] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    return dataclasses.replace(base, **changes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--offsets", default=",".join(map(str, DEFAULT_OFFSETS)),
                    help="comma-separated seed offsets, or 'dev' (0,200,300,400) or 'test' "
                         "(100,500-900)")
    ap.add_argument("--settings", choices=("tuned", "default"), default="tuned")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override one PolicySettings field of the chosen settings (repeatable)")
    ap.add_argument("--spec", type=Path, default=ROOT / "examples/minilm-cpu.yaml")
    ap.add_argument("--profile", type=Path, default=bench.DEFAULT_PROFILE)
    ap.add_argument("--peak-share", type=float, default=0.6)
    ap.add_argument("--startup-seconds", type=float, default=30.0)
    ap.add_argument("--max-replicas", type=int, default=20)
    ap.add_argument("--max-hourly-cost", type=float, default=5.0)
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--cache", type=Path, default=ROOT / "bench-out/autoscaling-seeds/cache.json",
                    help="baselines and bounds per trace (settings-independent)")
    ap.add_argument("--per-trace", action="store_true",
                    help="also print leanserve's attainment and cost ratios per trace")
    args = ap.parse_args()
    named = {"dev": DEV_OFFSETS, "test": TEST_OFFSETS}
    try:
        offsets = list(named.get(args.offsets) or (int(x) for x in args.offsets.split(",")))
    except ValueError:
        ap.error(f"--offsets {args.offsets!r}: expected comma-separated integers, dev or test")
    if any(o < 0 for o in offsets):
        ap.error("--offsets: seed offsets must be >= 0")
    settings = _settings(args.settings, args.set)
    setup = Setup(args.spec, args.profile, args.peak_share, args.startup_seconds,
                  args.max_replicas, args.max_hourly_cost)
    cache: dict[str, Any] = {}
    if args.cache.is_file():
        cache = json.loads(args.cache.read_text(encoding="utf-8"))
    label = args.settings.upper() + "_SETTINGS" + (
        f" with {', '.join(args.set)}" if args.set else "")
    print(f"leanserve settings: {label}; start-up {args.startup_seconds:g}s; offsets "
          f"{','.join(map(str, offsets))}")

    results: dict[tuple[int, str], tuple[dict[str, Any], dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp, \
            concurrent.futures.ProcessPoolExecutor(max(1, args.jobs)) as pool:
        _, _, top = _load(setup)
        futures = {}
        for off in offsets:
            folder = COMMITTED.get(off)
            if folder is None:
                folder = Path(tmp) / str(off)
                make_traces.write(folder, off)
            for name, tr in bench.scaled_traces(folder, setup.peak_share, top).items():
                cached = cache.get(_key(setup, name, tr.rates))
                futures[pool.submit(run_trace, setup, folder, name, settings, cached)] = (
                    off, name)
        for fut in concurrent.futures.as_completed(futures):
            off, name = futures[fut]
            key, base, ls = fut.result()
            cache[key] = base
            results[off, name] = (base, ls)
    args.cache.parent.mkdir(parents=True, exist_ok=True)
    args.cache.write_text(json.dumps(cache, sort_keys=True), encoding="utf-8")

    print("all four: one mark per trace (bursty, diurnal, spike, step) for its four targets "
          "together: M met, - ruled out by a bound, x MISSED although no bound rules it out")
    print(f"| {'offset':>6} | {'targets':>7} | {'feasible met':>12} | {'all four':>8} | "
          "MISSED, reachable")
    tot_pass = tot_all = tot_met = tot_feas = 0
    groups: dict[str, list[int]] = {"dev": [0, 0, 0, 0], "test": [0, 0, 0, 0]}
    rows = []
    for off in offsets:
        n_pass = n_all = met = feas = 0
        missed = []
        joint = []
        for (o, name), (base, ls) in sorted(results.items()):
            if o != off:
                continue
            s = {"leanserve": ls, "hpa": base["hpa"], "oracle": base["oracle"]}
            c = bench.checks(s)
            n_pass += sum(c.values())
            n_all += len(c)
            jv = bench.joint_verdict(s, base["bound_joint"], base["rise_joint"])[0]
            joint.append({"met": "M", "infeasible": "-", "MISSED": "x"}[jv])
            for pair, v in verdicts(name, s, base):
                feas += v != "infeasible"
                met += v == "met"
                if v == "MISSED":
                    missed.append(pair)
            rows.append((off, name, ls, base))
        print(f"| {off:6d} | {n_pass:3d}/{n_all:<3d} | {met:5d}/{feas:<6d} | "
              f"{''.join(joint):>8} | {', '.join(missed) or '-'}")
        tot_pass, tot_all, tot_met, tot_feas = (tot_pass + n_pass, tot_all + n_all,
                                                tot_met + met, tot_feas + feas)
        for g, members in (("dev", DEV_OFFSETS), ("test", TEST_OFFSETS)):
            if off in members:
                groups[g] = [a + b for a, b in zip(groups[g], (n_pass, n_all, met, feas),
                                                   strict=True)]
    for g, (p, a, m, f) in groups.items():
        if a:
            print(f"| {g:>6} | {p:3d}/{a:<3d} | {m:5d}/{f:<6d} |")
    print(f"| {'total':>6} | {tot_pass:3d}/{tot_all:<3d} | {tot_met:5d}/{tot_feas:<6d} |")
    if args.per_trace:
        print()
        print(f"| {'offset':>6} | {'trace':8} | {'SLO att.':>8} | {'/oracle':>7} | {'/hpa':>6} | "
              f"{'HPA att.':>8} | {'bound':>7} | {'bound@hpa':>9} | {'rise':>6} | "
              f"{'rise@hpa':>8}")
        for off, name, ls, base in rows:
            print(f"| {off:6d} | {name:8} | {ls['slo_attainment']:8.2%} | "
                  f"{ls['cost'] / base['oracle']['cost']:7.3f} | "
                  f"{ls['cost'] / base['hpa']['cost']:6.3f} | "
                  f"{base['hpa']['slo_attainment']:8.2%} | {base['bound']:7.2%} | "
                  f"{base['bound_hpa']:9.2%} | {base['rise']:6.3f} | "
                  f"{base['rise_hpa']:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
