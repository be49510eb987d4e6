"""`leanserve run`: validate first, then the local pipeline, then a closing summary table.

The table's first row is the verdict; a run whose result is not usable (no candidate passed the
gate, the autoscaler never saw a metric) exits 1 after writing its report, and Ctrl-C writes the
report of what was done, says "interrupted" once and exits 130.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from leanserve.api.load import load_one
from leanserve.compression.costs import cost_cells
from leanserve.errors import LeanserveError
from leanserve.local.outcome import mib, rate, selected_candidate, served_pools, usd
from leanserve.local.pipeline import RunError, RunSettings, run_pipeline
from leanserve.quiet import quiet_libraries

INTERRUPTED_EXIT = 130

STATUS_STYLE = {"ok": "green", "warnings": "yellow", "failed": "red", "interrupted": "red"}


def candidate_line(name: str, r: dict[str, Any]) -> str:
    """The progress line of one compressed candidate. Its speed is timed only once every
    candidate is built (interleaved with the baseline), so a line without it says nothing of
    speed rather than 0x."""
    if r.get("error"):
        return f"candidate {name}: error: {r['error']}"
    speed = "" if r.get("speedup") is None else f", speedup {r['speedup']:.2f}x"
    return (f"candidate {name}: quality drop {r.get('quality_drop', 0):.4f}{speed}, "
            f"{'passed' if r.get('passed') else 'failed'} the gate")


def plan_line(spec: Any) -> str:
    """The plan in words a user reads at a glance (the gate is an allowed drop, not a bound)."""
    return (f"candidates: {', '.join(c.name for c in spec.compression.candidates)}; "
            f"pools: {', '.join(f'{p.name} (${p.hourly_price:g}/h)' for p in spec.node_pools)}; "
            f"SLO: p95 <= {spec.slo.latency_p95_ms:g} ms; "
            f"gate: quality drop <= {spec.quality.max_drop:g} ({spec.quality.metric.value})")


def run_command(spec: Path, *, workdir: Path, load_seconds: float, console: Console) -> None:
    quiet_libraries()
    loaded = load_one(spec)  # a wrong spec stops here, before any work
    console.print(f"[bold]leanserve run[/bold] {spec} -> {workdir}", highlight=False)
    console.print(f"plan: {plan_line(loaded.spec)}", highlight=False, soft_wrap=True)

    def say(line: str) -> None:
        console.print(f"[dim]>[/dim] {line}", highlight=False, soft_wrap=True)

    def on_event(ev: Any) -> None:
        kind = getattr(ev.kind, "value", ev.kind)
        if kind == "candidate-start":
            say(f"candidate {ev.index + 1}/{ev.total}: {ev.name} ...")
        elif kind == "candidate-done":
            say(candidate_line(ev.name, ev.result or {}))
        elif kind == "baseline":
            say("baseline exported, evaluated and benchmarked")

    try:
        report = run_pipeline(loaded, workdir, RunSettings(load_seconds=load_seconds), say=say,
                              progress=on_event)
    except KeyboardInterrupt:
        console.print(f"interrupted: every process stopped; the report of what was done is in "
                      f"{workdir / 'report.html'}; logs under {workdir / 'logs'}",
                      highlight=False, soft_wrap=True)
        raise SystemExit(INTERRUPTED_EXIT) from None
    except LeanserveError:
        console.print(f"the report of what was done is in {workdir / 'report.html'}; logs "
                      f"under {workdir / 'logs'}", highlight=False, soft_wrap=True)
        raise
    except Exception as exc:  # a bug: say where the partial report is, keep the traceback
        console.print(f"[red]unexpected error[/red] {type(exc).__name__}: {exc} (a bug in "
                      f"leanserve; the traceback follows). Every process is stopped; the report "
                      f"of what was done is in {workdir / 'report.html'}; logs under "
                      f"{workdir / 'logs'}", highlight=False, soft_wrap=True)
        raise
    console.print(summary_table(report))
    console.print(report["summary"], highlight=False, soft_wrap=True)
    console.print(f"wrote {workdir / 'report.json'} and {workdir / 'report.html'}; "
                  f"logs under {workdir / 'logs'}", highlight=False)
    verdict = report["verdict"]
    if not verdict["usable"]:
        raise RunError(f"{verdict['headline']} (report: {workdir / 'report.html'})")


def summary_table(report: dict[str, Any]) -> Table:
    comp = report.get("compression") or {}
    cost = report.get("cost") or {}
    v = report.get("verdict") or {}
    t = Table(title=f"leanserve run: {report['name']}")
    t.add_column("what")
    t.add_column("value", justify="right")
    style = STATUS_STYLE.get(v.get("status", ""), "")
    t.add_row(f"[{style}]result[/{style}]", f"[{style}]{v.get('status', '?').upper()}[/{style}]")
    for line in v.get("problems", []) + v.get("warnings", []):
        t.add_row(f"[{style}]  ![/{style}]", line)
    cands = comp.get("candidates", [])
    passed = sum(1 for c in cands if c.get("passed"))
    t.add_row("candidates passed the gate", f"{passed}/{len(cands)}")
    sel = selected_candidate(report)
    if sel is None:
        return t
    base = comp["baseline"]
    t.add_row("selected", sel["name"])
    t.add_row("size: baseline -> selected",
              f"{mib(base['size_bytes'])} -> {mib(sel['size_bytes'])}")
    if base.get("peak_rss_bytes") and sel.get("peak_rss_bytes"):
        t.add_row("peak memory of one serving instance: baseline -> selected",
                  f"{mib(base['peak_rss_bytes'])} -> {mib(sel['peak_rss_bytes'])}")
    t.add_row(f"quality ({comp.get('metric', '')}) drop", f"{sel['quality_drop']:.4f}")
    m = report.get("measurement") or {}
    speed = f"{sel.get('speedup') or 0:.2f}x"
    if m.get("speedup"):
        speed += f" (rechecked {m['speedup']:.2f}x" + (", NOISY" if m.get("noisy") else "") + ")"
    t.add_row("throughput vs baseline", speed)
    if sel.get("cost"):
        spent, payback = cost_cells(sel["cost"])
        t.add_row("compression cost of the selected recipe", spent)
        t.add_row("pays for itself after", payback)
    for pool, c in cost.items():
        if isinstance(c, dict):
            t.add_row(f"pool {pool}: one replica at SLO / per 1M requests",
                      f"{rate(c['capacity_rps'])} / {usd(c['per_million_requests'])}"
                      + ("" if c.get("measured") else " (derived)"))
    if cost.get("chosen_pool"):
        t.add_row("cheapest pool per request (cluster)", cost["chosen_pool"])
    decisions = report.get("autoscaling") or []
    here = served_pools(decisions)
    if here:
        t.add_row("served in this run on", ", ".join(here))
    local = report.get("local", {})
    if local:
        t.add_row("local replica (1 core): measured / planned at / max replicas",
                  f"{rate(local['replica']['capacity_rps'])} / "
                  f"{rate(local.get('planned_rps'))} / {local['max_replicas']}")
    if decisions:
        totals = [sum(d["replicas"].values()) for d in decisions]
        live = v.get("first_live_decision")
        t.add_row("autoscaler decisions / live metrics from",
                  f"{len(decisions)} / " + (f"decision {live}" if live else "never"))
        t.add_row("replicas: start -> peak -> end",
                  f"{totals[0]} -> {max(totals)} -> {totals[-1]}")
    if v.get("slo_attainment") is not None:
        t.add_row("2 s intervals meeting the SLO", f"{v['slo_attainment']:.0%}")
    return t
