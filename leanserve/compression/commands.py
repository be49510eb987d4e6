"""`leanserve compress SPEC --out DIR`: the pipeline with a progress bar and a result table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from leanserve.api.load import load_one
from leanserve.compression.costs import cost_cells
from leanserve.compression.pipeline import Event, EventKind, compress


def compress_command(spec: Path, *, out: Path, console: Console) -> None:
    loaded = load_one(spec)
    total = len(loaded.spec.compression.candidates)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total}"), TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task("baseline: export + evaluate + benchmark", total=total)

        def on_event(ev: Event) -> None:
            if ev.kind is EventKind.BASELINE:
                bar.update(task, description="baseline done")
            elif ev.kind is EventKind.CANDIDATE_START:
                bar.update(task, description=f"candidate {ev.name} ({ev.index + 1}/{ev.total})")
            elif ev.kind is EventKind.CANDIDATE_DONE:
                bar.advance(task)
                status = "error" if (ev.result or {}).get("error") else "done"
                bar.console.print(f"  {ev.name}: {status}", highlight=False)
            elif ev.kind is EventKind.DONE:
                bar.update(task, description="done")

        report = compress(loaded, out, progress=on_event)
    console.print(report_table(report))
    sel = report["selected"]
    console.print(f"selected: [bold]{sel}[/bold]" if sel else
                  "[yellow]no candidate passed the quality gate[/yellow]", highlight=False)
    console.print(f"wrote {out / 'report.json'}", highlight=False)


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.0f}"


def _test(fig: dict[str, Any] | None) -> str:
    """The test split's figure: never used to gate or select, shown so a user can check it."""
    if not fig:
        return "-"
    if "accuracy" in fig:
        lo, hi = fig["ci95"]
        return f"{fig['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"{fig['mean']:.4f}/{fig['p5']:.4f}/{fig['worst']:.4f}"


def report_table(report: dict[str, Any]) -> Table:
    t = Table(title=f"{report['model']}: {report['metric']} gate, max drop {report['max_drop']:g}")
    for col in ("candidate", "size MB", "quality", "drop", "test mean/p5/worst", "p50 ms (b1)",
                "p95 ms (b1)", "rows/s (b32)", "speedup", "peak RSS MB", "cost",
                "pays back after", "gate"):
        t.add_column(col, justify="left" if col in ("candidate", "gate") else "right")
    b = report["baseline"]
    t.add_row("baseline (fp32)", _fmt(b["size_bytes"] / 1e6, ".1f"), _fmt(b["quality"], ".4f"),
              "-", _test(b.get("test")), _fmt(b["latency_ms"]["p50"], ".2f"),
              _fmt(b["latency_ms"]["p95"], ".2f"),
              _fmt(b["throughput_rps"], ".0f"), "1.00", _mb(b.get("peak_rss_bytes")), "", "",
              "")
    for c in report["candidates"]:
        lat = c["latency_ms"] or {}
        gate = ("[red]error[/red]: " + c["error"]) if c["error"] else (
            "[green]pass[/green]" if c["passed"] else "[red]fail[/red]")
        name = c["name"] + (" *" if c["name"] == report["selected"] else "")
        size = _fmt(c["size_bytes"] and c["size_bytes"] / 1e6, ".1f")
        if c.get("packed_size_bytes"):
            size += f" (packed {c['packed_size_bytes'] / 1e6:.1f})"
        t.add_row(name, size,
                  _fmt(c["quality"], ".4f"), _fmt(c["quality_drop"], ".4f"), _test(c.get("test")),
                  _fmt(lat.get("p50"), ".2f"), _fmt(lat.get("p95"), ".2f"),
                  _fmt(c["throughput_rps"], ".0f"), _fmt(c["speedup"], ".2f"),
                  _mb(c.get("peak_rss_bytes")), *cost_cells(c.get("cost")), gate)
    timing = b.get("timing")
    if timing:
        t.caption = (f"speed: {timing['calls_batch']}+ calls per model at batch "
                     f"{timing['batch']} and {timing['calls_1']}+ at batch 1, "
                     f"{timing['threads']} threads, every model timed together in "
                     f"{timing['rounds']} interleaved rounds (medians)")
    return t
