"""`leanserve compress SPEC --out DIR`: the pipeline with a progress bar and a result table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console, Group
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


def _size(n: int | None) -> str:
    """A file size a reader can compare at a glance: kB below one megabyte, MB above."""
    if n is None:
        return "-"
    return f"{n / 1e3:.1f} kB" if n < 1e6 else f"{n / 1e6:.1f} MB"


def _test(fig: dict[str, Any] | None) -> str:
    """The test split's figure: never used to gate or select, shown so a user can check it."""
    if not fig:
        return "-"
    if "accuracy" in fig:
        lo, hi = fig["ci95"]
        return f"{fig['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"{fig['mean']:.4f} / {fig['p5']:.4f} / {fig['worst']:.4f}"


def report_table(report: dict[str, Any]) -> Group:
    """The report as two tables that fit an ordinary terminal: quality and speed (the speed-up
    over the baseline's rows/s at batch 32, which the caption gives), then what each recipe cost
    and saves; report.json holds every figure (p50 latencies, each candidate's rows/s). Names
    and figures are never cut; a narrow terminal wraps the text columns instead."""
    def label(c: dict[str, Any]) -> str:
        return c["name"] + (" *" if c["name"] == report["selected"] else "")

    names = ["baseline (fp32)", *map(label, report["candidates"])]

    metric = report["metric"]
    test_col = "test accuracy [95% CI]" if metric == "accuracy" else "test mean/p5/worst"
    # text columns wrap at spaces (at least this wide); the others are single figures
    wraps = {"size": 9, test_col: 13, "cost": 9, "pays back after": 9, "gate": 4}

    def table(title: str, cols: tuple[str, ...]) -> Table:
        t = Table(title=title)
        t.add_column("candidate", no_wrap=True, min_width=max(map(len, names)))
        for col in cols:
            t.add_column(col, justify="left" if col == "gate" else "right",
                         no_wrap=col not in wraps, min_width=wraps.get(col))
        return t

    quality = table(f"{report['model']}: {metric} gate, max drop {report['max_drop']:g}",
                    ("size", "quality", "drop", test_col, "p95 ms\n(b1)", "speedup\n(b32)",
                     "gate"))
    costs = table("what each recipe cost, and when it pays for itself",
                  ("peak RSS MB", "cost", "pays back after"))
    b = report["baseline"]
    quality.add_row("baseline (fp32)", _size(b["size_bytes"]), _fmt(b["quality"], ".4f"), "-",
                    _test(b.get("test")), _fmt(b["latency_ms"]["p95"], ".2f"),
                    "1.00x", "")
    costs.add_row("baseline (fp32)", _mb(b.get("peak_rss_bytes")), "", "")
    for c in report["candidates"]:
        lat = c["latency_ms"] or {}
        gate = ("[red]error[/red]: " + c["error"]) if c["error"] else (
            "[green]pass[/green]" if c["passed"] else "[red]fail[/red]")
        name = label(c)
        size = _size(c["size_bytes"])
        if c.get("packed_size_bytes"):
            size += f" (packed {_size(c['packed_size_bytes'])})"
        quality.add_row(name, size, _fmt(c["quality"], ".4f"), _fmt(c["quality_drop"], ".4f"),
                        _test(c.get("test")), _fmt(lat.get("p95"), ".2f"),
                        _fmt(c["speedup"], ".2f") + ("x" if c["speedup"] else ""), gate)
        costs.add_row(name, _mb(c.get("peak_rss_bytes")), *cost_cells(c.get("cost")))
    timing = b.get("timing")
    if timing:
        quality.caption = (f"speed: {timing['calls_batch']}+ calls per model at batch "
                           f"{timing['batch']} and {timing['calls_1']}+ at batch 1, "
                           f"{timing['threads']} threads, every model timed together in "
                           f"{timing['rounds']} interleaved rounds (medians); speedup: rows/s "
                           f"at batch 32 over the baseline's "
                           f"{_fmt(b['throughput_rps'], ',.0f')}; test: the test split, never "
                           "used to gate or select")
    return Group(quality, costs)
