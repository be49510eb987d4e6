"""`leanserve simulate`: read the inputs, run the simulator, write JSON and the plot, print a table.

Kept apart from simulate.py so the simulator stays free of files, consoles and specs on disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from leanserve import fsio
from leanserve.autoscaling.errors import PolicyError
from leanserve.autoscaling.policy import PoolCapacity, Target, pools_from_profile
from leanserve.autoscaling.simulate import (
    POLICIES,
    SimConfig,
    Simulation,
    load_trace,
    plot,
    reactive_bound,
    rise_bound,
    simulate,
)

# Documented estimate used only when no profile is given: requests/s one replica of a small
# transformer encoder (MiniLM-class, int8, sequence 128) serves within a ~100 ms p95, per CPU core
# requested, and per GPU. Rough on purpose; `leanserve profile` measures the real figure.
ESTIMATED_RPS_PER_CPU = 20.0
ESTIMATED_RPS_PER_GPU = 400.0


def _cpu_cores(q: Any) -> float:
    s = str(q)
    if s.endswith("m"):
        return float(s[:-1]) / 1000
    return float(s)


def estimated_pools(spec: Any) -> list[PoolCapacity]:
    """Capacities from the pools' requested CPUs and GPUs (see the constants above)."""
    out = []
    for p in spec.node_pools:
        res = {**p.resources.requests, **p.resources.limits}
        gpus = res.get("nvidia.com/gpu")
        if gpus is not None and float(str(gpus)) > 0:
            cap = ESTIMATED_RPS_PER_GPU * float(str(gpus))
        else:
            cpu = res.get("cpu")
            try:
                cores = _cpu_cores(cpu) if cpu is not None else 1.0
            except ValueError:
                raise PolicyError(f"spec.nodePools.{p.name}.resources cpu {cpu!r} is not a CPU "
                                  "quantity; give --profile instead") from None
            cap = ESTIMATED_RPS_PER_CPU * cores
        out.append(PoolCapacity(p.name, cap, float(p.hourly_price)))
    return out


def read_profile(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PolicyError(f"profile {path}: no such file (make one with `leanserve profile REPO "
                          "--spec SPEC`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PolicyError(f"profile {path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PolicyError(f"profile {path}: expected a JSON object with \"pools\"")
    return data


# What the bounds are asked: the attainment and the cost over the oracle's that bench/autoscaling.py
# holds leanserve to (issue 6's targets).
BOUND_ATTAINMENT = 0.99
BOUND_COST_RATIO = 1.15


def bounds(sim: Simulation, cfg: SimConfig) -> dict[str, Any]:
    """simulation.json's ``bounds``: what the trace allows any policy at this start-up.

    ``rise``: the least cost over the oracle's at which BOUND_ATTAINMENT is reachable for a policy
    that cannot foresee when a rise of the load starts (simulate.rise_bound). ``reactive``: the
    best attainment an ideal reactive policy reaches at <= BOUND_COST_RATIO x the oracle's cost
    (simulate.reactive_bound).
    """
    rise = rise_bound(sim.trace, sim.pools, sim.target, cfg, attainment=BOUND_ATTAINMENT,
                      rise_ratio=BOUND_COST_RATIO)
    rb = reactive_bound(sim.trace, sim.pools, sim.target, cfg, max_cost_ratio=BOUND_COST_RATIO)
    return {
        "startup_seconds": cfg.startup_seconds,
        "rise": {"attainment": rise.attainment, "min_cost_ratio": round(rise.min_cost_ratio, 4),
                 "rises": rise.rises, "lag_intervals": rise.lag_ticks,
                 "unabsorbed_attainment": round(rise.unabsorbed_attainment, 4)},
        "reactive": {"max_cost_ratio": BOUND_COST_RATIO, "attainment": round(rb.attainment, 4),
                     "cost_ratio": round(rb.cost_ratio, 4),
                     "cheapest_ratio_at_99": (None if rb.cheapest_at_99 is None
                                              else round(rb.cheapest_at_99, 4))},
    }


def write_outputs(sim: Simulation, out: Path, title: str,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """simulation.json (the summary, leanserve's decisions and ``extra``) and simulation.png.

    simulation.json marks a finished simulation: an old one goes first, the plot is written
    next and the JSON last, each to a temporary file moved into place (leanserve.fsio), so a
    full disk leaves no half-written or stale simulation.json (WriteError says so)."""
    summary = {**sim.summary(), **(extra or {})}
    summary["decisions"] = [d.to_dict() for d in sim.runs["leanserve"].decisions[:2000]]
    text = json.dumps(summary, indent=2) + "\n"
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "simulation.json").unlink(missing_ok=True)
    except OSError as exc:
        raise fsio.WriteError(fsio.describe(out / "simulation.json", exc)) from None
    with fsio.atomic_path(out / "simulation.png") as tmp:
        plot(sim, tmp, title)
    fsio.write_text(out / "simulation.json", text)
    return summary


def simulate_command(*, trace: Path, spec: Path, profile: Path | None, out: Path,
                     console: Any, startup_seconds: float = 30.0) -> None:
    """Replay TRACE against the spec's pools; write simulation.json and simulation.png."""
    from rich.table import Table

    from leanserve.api.load import load_one

    loaded = load_one(spec)
    tr = load_trace(trace)
    if profile is not None:
        pools = pools_from_profile(read_profile(profile), loaded.spec)
        source = f"measured profile {profile}"
    else:
        pools = estimated_pools(loaded.spec)
        source = "ESTIMATED capacities"
        console.print(
            f"[bold yellow]warning: no --profile: capacities are ESTIMATED at "
            f"{ESTIMATED_RPS_PER_CPU:g} req/s per requested CPU core "
            f"({ESTIMATED_RPS_PER_GPU:g} per GPU), not measured; run `leanserve profile` "
            "for real figures[/bold yellow]", highlight=False)
    target = Target.from_spec(loaded.spec)
    cfg = SimConfig(startup_seconds=startup_seconds)
    sim = simulate(tr, pools, target, cfg)
    summary = write_outputs(sim, out, f"{trace.name} ({source})", {"bounds": bounds(sim, cfg)})
    table = Table(title=f"{trace.name}: {len(sim.runs['leanserve'].met)} intervals of "
                        f"{target.interval_seconds:g}s, SLO p95<={target.latency_p95_ms:g}ms, "
                        f"{source}")
    for col in ("policy", "cost USD", "SLO attainment", "replica-min", "vs oracle", "note"):
        table.add_column(col)
    oracle = summary["policies"]["oracle"]["cost"] or 1e-12
    for name in POLICIES:
        s = summary["policies"][name]
        table.add_row(name, f"{s['cost']:.4f}", f"{s['slo_attainment']:.2%}",
                      f"{s['replica_minutes']:.1f}", f"{s['cost'] / oracle:.2f}x", s["note"])
    console.print(table)
    b = summary["bounds"]
    console.print(
        f"with a {startup_seconds:g}s replica start-up: {b['rise']['rises']} rises of the load "
        f"above {BOUND_COST_RATIO:g}x within a start-up; a policy that cannot foresee them needs "
        f">= {b['rise']['min_cost_ratio']:.2f}x the oracle's cost for "
        f"{BOUND_ATTAINMENT:.0%} SLO attainment; an ideal reactive policy reaches "
        f"{b['reactive']['attainment']:.2%} at <= {BOUND_COST_RATIO:g}x", highlight=False)
    console.print(f"wrote {out / 'simulation.json'} and {out / 'simulation.png'}")
