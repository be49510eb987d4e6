"""`leanserve simulate`: read the inputs, run the simulator, write JSON and the plot, print a table.

Kept apart from simulate.py so the simulator stays free of files, consoles and specs on disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from leanserve import fsio
from leanserve.autoscaling.bound import cost_lower_bound
from leanserve.autoscaling.errors import PolicyError
from leanserve.autoscaling.policy import PoolCapacity, Target, pools_from_profile
from leanserve.autoscaling.simulate import (
    DEFAULT_STARTUP_SECONDS,
    FRONTIER_TARGETS,
    POLICIES,
    SimConfig,
    Simulation,
    hpa_for_share,
    load_trace,
    plot,
    settings_dict,
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


def describe_settings(sim: Simulation) -> str:
    """One line naming the policy settings a run used (the shipped PolicySettings())."""
    fields = ", ".join(f"{k}={v:g}" if isinstance(v, float) and not isinstance(v, bool)
                       else f"{k}={v}" for k, v in settings_dict(sim.settings).items())
    return f"leanserve settings: PolicySettings() as shipped ({fields})"


def _queue_note(timeout_ms: float) -> str:
    return (f"requests rejected after {timeout_ms:g} ms queued" if timeout_ms > 0
            else "every request queued (no queue timeout)")


def simulate_command(*, trace: Path, spec: Path, profile: Path | None, out: Path,
                     console: Any, startup_seconds: float = DEFAULT_STARTUP_SECONDS,
                     peak_rps: float | None = None) -> None:
    """Replay TRACE (rescaled to peak at ``peak_rps`` when given) against the spec's pools;
    write simulation.json and simulation.png."""
    from rich.table import Table

    from leanserve.api.load import load_one

    loaded = load_one(spec)
    tr = load_trace(trace)
    if peak_rps is not None:
        tr = tr.scaled_to_peak(peak_rps)
        console.print(f"trace rescaled: peak {peak_rps:g} req/s", highlight=False)
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
    cfg = SimConfig(startup_seconds=startup_seconds,
                    queue_timeout_ms=loaded.spec.serving.queue_timeout_microseconds / 1000)
    sim = simulate(tr, pools, target, cfg)
    console.print(describe_settings(sim), highlight=False)
    ls = sim.runs["leanserve"].summary()
    bound = cost_lower_bound(tr, pools, target, ls["slo_attainment"], cfg)
    # the fair comparison: an HPA that serves as many requests within the SLO as leanserve
    same = hpa_for_share(tr, pools, target, cfg, ls["slo_attainment"])
    summary = write_outputs(sim, out, f"{trace.name} ({source})", extra={
        "lower_bound": {"share": bound.share, "cost": bound.cost, "leanserve_over_bound":
                        ls["cost"] / bound.cost if bound.cost > 0 else None},
        "hpa_at_leanserve_share": None if same is None else {
            "utilisation_target": same[0], "cost": round(same[1].cost, 6),
            "slo_attainment": same[1].within / same[1].requests if same[1].requests else 1.0,
            "leanserve_over_hpa": ls["cost"] / same[1].cost if same[1].cost > 0 else None}})
    table = Table(title=f"{trace.name}: {len(sim.runs['leanserve'].interval_share)} intervals "
                        f"of {target.interval_seconds:g}s, SLO p95<={target.latency_p95_ms:g}ms, "
                        f"replica start-up {startup_seconds:g}s, "
                        f"{_queue_note(cfg.queue_timeout_ms)}, {source}")
    for col in ("policy", "cost USD", "requests within SLO", "intervals p95<=SLO",
                "replica-min", "vs oracle", "note"):
        table.add_column(col)
    oracle = summary["policies"]["oracle"]["cost"] or 1e-12
    for name in POLICIES:
        s = summary["policies"][name]
        table.add_row(name, f"{s['cost']:.4f}", f"{s['slo_attainment']:.2%}",
                      f"{s['interval_attainment']:.2%}", f"{s['replica_minutes']:.1f}",
                      f"{s['cost'] / oracle:.2f}x", s["note"])
    console.print(table)
    if bound.cost > 0:
        console.print(f"lower bound: no policy, even one that knows the load ahead and starts "
                      f"replicas at once, keeps {bound.share:.2%} of requests within the SLO for "
                      f"less than {bound.cost:.4f} USD; leanserve paid "
                      f"{ls['cost'] / bound.cost:.2f}x that", highlight=False)
    if same is None:
        console.print(f"no HPA target down to {min(FRONTIER_TARGETS):.0%} utilisation keeps "
                      f"{ls['slo_attainment']:.2%} of requests within the SLO", highlight=False)
    elif same[1].requests > 0 and same[1].cost > 0:  # else nothing served or paid to compare
        console.print(f"at equal service: an HPA keeps as many requests within the SLO "
                      f"({same[1].within / same[1].requests:.2%}) at a {same[0]:.0%} target "
                      f"(the most utilised of {', '.join(f'{u:.0%}' for u in FRONTIER_TARGETS)}"
                      f" that does) for {same[1].cost:.4f} USD; leanserve paid "
                      f"{ls['cost'] / same[1].cost:.2f}x that", highlight=False)
    console.print(f"wrote {out / 'simulation.json'} and {out / 'simulation.png'}")
