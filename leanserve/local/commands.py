"""`leanserve run`: validate first, then the local pipeline, then a closing summary table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from leanserve.api.load import load_one
from leanserve.local.pipeline import RunSettings, run_pipeline


def run_command(spec: Path, *, workdir: Path, load_seconds: float, console: Console) -> None:
    loaded = load_one(spec)  # a wrong spec stops here, before any work
    console.print(f"[bold]leanserve run[/bold] {spec} -> {workdir}", highlight=False)

    def say(line: str) -> None:
        console.print(f"[dim]>[/dim] {line}", highlight=False, soft_wrap=True)

    def on_event(ev: Any) -> None:
        kind = getattr(ev.kind, "value", ev.kind)
        if kind == "candidate-start":
            say(f"candidate {ev.index + 1}/{ev.total}: {ev.name} ...")
        elif kind == "candidate-done":
            r = ev.result or {}
            what = f"error: {r['error']}" if r.get("error") else (
                f"quality drop {r.get('quality_drop', 0):.4f}, speedup {r.get('speedup') or 0:.2f}x"
                f", {'passed' if r.get('passed') else 'failed'} the gate")
            say(f"candidate {ev.name}: {what}")
        elif kind == "baseline":
            say("baseline exported, evaluated and benchmarked")

    try:
        report = run_pipeline(loaded, workdir, RunSettings(load_seconds=load_seconds), say=say,
                              progress=on_event)
    except KeyboardInterrupt:
        console.print(f"interrupted: every process stopped; logs under {workdir / 'logs'}",
                      highlight=False)
        raise
    console.print(summary_table(report))
    console.print(report["summary"], highlight=False, soft_wrap=True)
    console.print(f"wrote {workdir / 'report.json'} and {workdir / 'report.html'}; "
                  f"logs under {workdir / 'logs'}", highlight=False)


def summary_table(report: dict[str, Any]) -> Table:
    comp = report["compression"]
    cost = report["cost"]
    t = Table(title=f"leanserve run: {report['name']}")
    t.add_column("what")
    t.add_column("value", justify="right")
    base = comp["baseline"]
    sel = next(c for c in comp["candidates"] if c["name"] == comp["selected"])
    passed = sum(1 for c in comp["candidates"] if c["passed"])
    t.add_row("candidates passed the gate", f"{passed}/{len(comp['candidates'])}")
    t.add_row("selected", sel["name"])
    t.add_row("size (MB): baseline -> selected",
              f"{base['size_bytes'] / 1e6:.1f} -> {sel['size_bytes'] / 1e6:.1f}")
    t.add_row(f"quality ({comp.get('metric', '')}) drop", f"{sel['quality_drop']:.4f}")
    t.add_row("throughput vs baseline", f"{sel.get('speedup') or 0:.2f}x")
    for pool, v in cost.items():
        if isinstance(v, dict):
            t.add_row(f"pool {pool}: capacity at SLO / $ per 1M req",
                      f"{v['capacity_rps']:.1f} rps / ${v['per_million_requests']:.3f}"
                      + ("" if v.get("measured") else " (derived)"))
    t.add_row("chosen pool", cost["chosen_pool"])
    local = report.get("local", {})
    if local:
        t.add_row("local replica (1 core): capacity at SLO / max replicas",
                  f"{local['replica']['capacity_rps']:.1f} rps / {local['max_replicas']}")
    decisions = report["autoscaling"]
    peak = max((sum(d["replicas"].values()) for d in decisions), default=0)
    t.add_row("autoscaler decisions / peak replicas", f"{len(decisions)} / {peak}")
    return t
