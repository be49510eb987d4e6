"""report.html: one self-contained page for a `leanserve run` (plots embedded as PNG data URIs).

The page shows the candidates table, the Pareto plot, the load, replicas and latency over time,
the cost per pool and the autoscaler's decision log: what a user needs to trust the choice.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def timeline_png(timeline: list[dict[str, Any]], decisions: list[dict[str, Any]],
                 slo_ms: float, path: Path | None = None) -> str:
    """Load, replicas per pool and p95 latency over time; returns base64 PNG (and writes it)."""
    fig, axes = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True)
    t = [p["time_s"] for p in timeline]
    axes[0].plot(t, [p.get("offered_rps", 0) for p in timeline], label="offered load")
    axes[0].plot(t, [p.get("achieved_rps", 0) for p in timeline], label="served", alpha=0.8)
    axes[0].set_ylabel("requests/s")
    axes[0].legend(loc="upper right")
    pools = sorted({pool for d in decisions for pool in d.get("replicas", {})})
    for pool in pools:
        xs, ys = [], []
        for d in decisions:
            xs.append(d["time_s"])
            ys.append(d["replicas"].get(pool, 0))
        axes[1].step(xs, ys, where="post", label=pool)
    axes[1].set_ylabel("replicas")
    if pools:
        axes[1].legend(loc="upper right")
    p95 = [p.get("p95_ms") for p in timeline]
    axes[2].plot(t, [v if v is not None else float("nan") for v in p95], label="p95 latency")
    axes[2].axhline(slo_ms, color="red", linestyle="--", label=f"SLO {slo_ms:g} ms")
    axes[2].set_ylabel("ms")
    axes[2].set_xlabel("seconds since load start")
    axes[2].legend(loc="upper right")
    fig.suptitle("load, replicas and latency")
    data = _png(fig)
    if path is not None:
        path.write_bytes(base64.b64decode(data))
    return data


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>"
        for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_html(report: dict[str, Any], *, pareto_png: Path | None, timeline_b64: str) -> str:
    comp = report.get("compression", {})
    base = comp.get("baseline", {})
    rows = [["baseline (fp32)", base.get("size_bytes"), base.get("quality"), 0.0,
             base.get("latency_ms", {}).get("p50"), base.get("throughput_rps"), 1.0, "-", ""]]
    for c in comp.get("candidates", []):
        mark = "selected" if c.get("name") == comp.get("selected") else (
            "passed" if c.get("passed") else "failed gate")
        rows.append([c.get("name"), c.get("size_bytes"), c.get("quality"), c.get("quality_drop"),
                     (c.get("latency_ms") or {}).get("p50"), c.get("throughput_rps"),
                     c.get("speedup"), mark, c.get("error") or ""])
    candidates = _table(rows, ["candidate", "size (bytes)", "quality", "drop", "p50 ms (b=1)",
                               "rows/s", "speedup", "gate", "error"])
    cost = report.get("cost", {})
    cost_rows = [[pool, v.get("hourly_price"), v.get("capacity_rps"),
                  v.get("per_million_requests"), v.get("measured")]
                 for pool, v in cost.items() if isinstance(v, dict)]
    costs = _table(cost_rows, ["pool", "USD/h", "capacity rps at SLO", "USD / 1M requests",
                               "measured"])
    decisions = _table(
        [[f"{d.get('time_s', 0):.1f}", ", ".join(f"{k}={v}" for k, v in d["replicas"].items()),
          d.get("reason", "")] for d in report.get("autoscaling", [])],
        ["t (s)", "replicas", "reason"])
    pareto = ""
    if pareto_png is not None and pareto_png.exists():
        pareto = (f'<img alt="pareto" src="data:image/png;base64,'
                  f'{base64.b64encode(pareto_png.read_bytes()).decode()}">')
    summary = html.escape(report.get("summary", ""))
    name = html.escape(report.get("name", ""))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>leanserve run: {name}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child {{ text-align: left; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>leanserve run: {html.escape(report.get('name', ''))}</h1>
<p>{summary}</p>
<h2>Candidates</h2>{candidates}
<h2>Quality against latency</h2>{pareto}
<h2>Cost per pool</h2>{costs}
<p>Chosen pool: <b>{html.escape(str(cost.get('chosen_pool', '-')))}</b></p>
<h2>Load, replicas and latency</h2>
<img alt="timeline" src="data:image/png;base64,{timeline_b64}">
<h2>Autoscaler decisions</h2>{decisions}
</body></html>
"""
