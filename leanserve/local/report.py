"""report.html: one self-contained page for a `leanserve run` (plots embedded as PNG data URIs).

The page opens with the verdict (a failed or interrupted run says so before anything else) and
one paragraph on what was chosen and why; then the candidates, quality against latency, the
timing recheck, the cost of a million requests before and after, the load, replicas and latency
over time, and the autoscaler's decisions grouped so that a repeated reason is one row. It
renders whatever part of the report exists (an interrupted run has no load section).
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
from matplotlib.lines import Line2D

from leanserve.local.outcome import (
    costs_before_after,
    group_decisions,
    mib,
    rate,
    span,
    usd,
)


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def timeline_png(timeline: list[dict[str, Any]], decisions: list[dict[str, Any]],
                 slo_ms: float, path: Path | None = None, *,
                 ready: list[dict[str, Any]] | None = None) -> str:
    """Load, replicas per pool and p95 latency over time; returns base64 PNG (and writes it)."""
    data = _png(timeline_figure(timeline, decisions, slo_ms, ready=ready))
    if path is not None:
        path.write_bytes(base64.b64decode(data))
    return data


def timeline_figure(timeline: list[dict[str, Any]], decisions: list[dict[str, Any]],
                    slo_ms: float, *, ready: list[dict[str, Any]] | None = None) -> Any:
    """The timeline as a matplotlib figure (one title on top, x-axis ending with the data).

    The replicas panel shows, per pool, the replicas each decision asked for (thin) and those
    ready to serve (wide, light; report.json's ``replicas_ready``): a replica asked for serves
    only once started, and one reaped stops serving before a decision replaces it. The latency panel
    shows both the 2 s buckets' p95 and, as dots, the p95 each autoscaler decision read: the
    same figure the decision log quotes."""
    fig, axes = plt.subplots(3, 1, figsize=(9, 7), sharex=True, layout="constrained")
    t = [p["time_s"] for p in timeline]
    axes[0].plot(t, [p.get("offered_rps") or 0 for p in timeline], label="offered load (sent)",
                 lw=4, alpha=0.35, color="tab:blue")
    axes[0].plot(t, [p.get("achieved_rps") or 0 for p in timeline],
                 label="served (completed)", lw=1.2, color="tab:orange")
    axes[0].set_ylabel("requests/s")
    busiest = max([p.get("offered_rps") or 0 for p in timeline] + [1.0])
    axes[0].set_ylim(0, busiest * 1.3)  # room for the legend above the peak
    axes[0].legend(loc="upper right")
    axes[0].set_title("load, replicas and latency (seconds since the load started)")
    ready = ready or []
    pools = sorted({pool for d in decisions for pool in d.get("replicas", {})}
                   | {pool for r in ready for pool in r.get("ready", {})})
    for i, pool in enumerate(pools):
        color = f"C{i}"
        if decisions:
            xs = [0.0] + [d["time_s"] for d in decisions]
            ys = [decisions[0]["replicas"].get(pool, 0)] + [d["replicas"].get(pool, 0)
                                                            for d in decisions]
            axes[1].step(xs, ys, where="post", label=f"{pool} asked for", color=color,
                         lw=1.2, zorder=3)
        if ready:
            ends = [p["time_s"] for p in timeline] + [d["time_s"] for d in decisions]
            xs = [r["time_s"] for r in ready] + [max([*ends, ready[-1]["time_s"]])]
            ys = [r["ready"].get(pool, 0) for r in ready]
            axes[1].step(xs, ys + ys[-1:], where="post", label=f"{pool} ready", color=color,
                         lw=4, alpha=0.35, zorder=2)
    axes[1].set_ylabel("replicas")
    top = max([sum(d.get("replicas", {}).values()) for d in decisions]
              + [sum(r.get("ready", {}).values()) for r in ready] + [1])
    axes[1].set_ylim(-0.1, top * 1.5 + 0.6)  # room for the legend above the lines
    axes[1].yaxis.get_major_locator().set_params(integer=True)
    if pools:
        axes[1].legend(loc="upper left", fontsize=8, ncol=len(pools))
    p95 = [p.get("p95_ms") for p in timeline]
    axes[2].plot(t, [v if v is not None else float("nan") for v in p95],
                 label="p95 per 2 s (clients)")
    seen = [(d["time_s"], d["observed_p95_ms"]) for d in decisions
            if d.get("observed_p95_ms") is not None]
    if seen:
        axes[2].plot([x for x, _ in seen], [y for _, y in seen], "o", ms=4, color="tab:purple",
                     label="p95 the autoscaler read")
    axes[2].axhline(slo_ms, color="red", linestyle="--", label=f"SLO {slo_ms:g} ms")
    axes[2].set_ylabel("ms (log scale)")
    axes[2].set_yscale("log")  # a saturated second is 20x the SLO; the SLO must stay visible
    highest = max([v for v in p95 if v is not None] + [y for _, y in seen] + [slo_ms])
    axes[2].set_ylim(top=highest * 2)  # the SLO line never sits on the frame
    axes[2].set_xlabel("seconds since load start")
    axes[2].legend(loc="lower right", fontsize=8)
    ends = t + [d["time_s"] for d in decisions]
    if ends and max(ends) > 0:  # a run stopped in its first bucket has no span to draw
        axes[2].set_xlim(0, max(ends))
    return fig


def pareto_png(comp: dict[str, Any]) -> str | None:
    """Quality against batch-1 latency per candidate, as a base64 PNG (None without data)."""
    fig = pareto_figure(comp)
    return _png(fig) if fig is not None else None


def pareto_figure(comp: dict[str, Any]) -> Any:
    """The baseline is a reference star inside the axes; legend markers are fixed-size keys."""
    base = comp.get("baseline") or {}
    points = [c for c in comp.get("candidates", [])
              if c.get("quality") is not None and c.get("latency_ms")]
    if not base.get("latency_ms") or base.get("quality") is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    sizes = [base.get("size_bytes") or 1] + [c.get("size_bytes") or 1 for c in points]
    biggest = max(sizes)

    def area(size: float) -> float:
        return 30 + 400 * size / biggest

    bx, by = base["latency_ms"]["p50"], base["quality"]
    ax.scatter([bx], [by], s=area(base.get("size_bytes") or 1), marker="*", c="black",
               zorder=3, clip_on=False)
    ax.annotate("baseline (fp32)", (bx, by), fontsize=8, xytext=(6, -12),
                textcoords="offset points")
    for i, c in enumerate(sorted(points, key=lambda c: c["latency_ms"]["p50"])):
        x, y = c["latency_ms"]["p50"], c["quality"]
        color = "tab:green" if c.get("passed") else "tab:red"
        ax.scatter([x], [y], s=area(c.get("size_bytes") or 1), c=color, alpha=0.6,
                   edgecolors="k", zorder=2, clip_on=False)
        label = c["name"] + (" (selected)" if c["name"] == comp.get("selected") else "")
        # neighbours by latency alternate above and below, so close points' labels don't collide
        ax.annotate(label, (x, y), fontsize=8, xytext=(6, 6 if i % 2 == 0 else -12),
                    textcoords="offset points")
    gate = by - (comp.get("max_drop") or 0)
    ax.axhline(gate, ls="--", c="gray", lw=0.8)
    xs = [bx] + [c["latency_ms"]["p50"] for c in points]
    ys = [by, gate] + [c["quality"] for c in points]
    xpad = (max(xs) - min(xs)) * 0.15 or 1.0
    ypad = (max(ys) - min(ys)) * 0.15 or 0.005
    ax.set_xlim(max(0.0, min(xs) - xpad), max(xs) + 2 * xpad)
    ax.set_ylim(min(ys) - ypad, max(ys) + ypad)
    handles = [Line2D([], [], marker="*", ls="", color="black", ms=10,
                      label="baseline (reference)")]
    if any(c.get("passed") for c in points):
        handles.append(Line2D([], [], marker="o", ls="", color="tab:green", alpha=0.6, ms=8,
                              label="passed the gate"))
    if any(not c.get("passed") for c in points):
        handles.append(Line2D([], [], marker="o", ls="", color="tab:red", alpha=0.6, ms=8,
                              label="failed the gate"))
    handles.append(Line2D([], [], ls="--", color="gray",
                          label=f"gate: {comp.get('metric')} drop <= {comp.get('max_drop')}"))
    ax.legend(handles=handles, loc="best", fontsize=8, title="marker area = model size",
              title_fontsize=8)
    ax.set_xlabel("latency p50 at batch 1 (ms, ONNX Runtime, 2 threads)")
    ax.set_ylabel(f"quality ({comp.get('metric')})")
    return fig


def _table(rows: list[list[Any]], header: list[str], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>"
        for row in rows)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _num(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _mix(replicas: dict[str, int]) -> str:
    shown = {k: v for k, v in replicas.items() if v} or replicas
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def _img(b64: str | None, alt: str) -> str:
    return f'<img alt="{alt}" src="data:image/png;base64,{b64}">' if b64 else ""


def _candidates(comp: dict[str, Any]) -> str:
    from leanserve.compression.costs import cost_cells

    base = comp.get("baseline", {})
    rows = [["baseline (fp32)", mib(base.get("size_bytes")), mib(base.get("peak_rss_bytes")),
             _num(base.get("quality"), 4), "-",
             _num((base.get("latency_ms") or {}).get("p50"), 2),
             rate(base.get("throughput_rps"), "rows/s"), "1.00x", "", "", "", ""]]
    for c in comp.get("candidates", []):
        mark = "selected" if c.get("name") == comp.get("selected") else (
            "passed" if c.get("passed") else "failed")
        sp = c.get("speedup")
        rows.append([c.get("name"), mib(c.get("size_bytes")), mib(c.get("peak_rss_bytes")),
                     _num(c.get("quality"), 4), _num(c.get("quality_drop"), 4),
                     _num((c.get("latency_ms") or {}).get("p50"), 2),
                     rate(c.get("throughput_rps"), "rows/s"),
                     f"{sp:.2f}x" if sp else "-", *cost_cells(c.get("cost")), mark,
                     c.get("error") or ""])
    return _table(rows, ["candidate", "size (served file)", "peak memory (one instance)",
                         "quality", "drop", "p50 ms (batch 1)", "throughput (batch 32)",
                         "vs baseline", "compression cost", "pays for itself after", "gate",
                         "error"])


def _measurement(m: dict[str, Any]) -> str:
    if not m:
        return ""
    rows = [[i + 1, rate(r["baseline_rps"], "rows/s"), rate(r["selected_rps"], "rows/s"),
             f"{r['selected_rps'] / r['baseline_rps']:.2f}x" if r["baseline_rps"] else "-"]
            for i, r in enumerate(m.get("rounds", []))]
    verdict = ("<p class='warn'>Noisy: " + html.escape("; ".join(m.get("notes", [])))
               + ". Other work on this machine disturbed the timings; treat the speed-ups "
               "as uncertain and rerun on a quiet machine.</p>") if m.get("noisy") else (
        f"<p>Consistent: repeated timings within {m.get('spread', 0):.0%} of each other.</p>")
    sp = m.get("speedup")
    return ("<h2>Timing recheck</h2><p>The baseline and the selected candidate timed again, "
            "back to back, to catch interference from other work on this machine. Rechecked "
            f"speed-up: <b>{sp:.2f}x</b> (median of the rounds).</p>" if sp else "") + \
        verdict + _table(rows, ["round", "baseline", "selected", "ratio"])


def _costs(report: dict[str, Any]) -> str:
    rows = costs_before_after(report)
    if not rows:
        return ""
    cost = report.get("cost", {})
    chosen = cost.get("chosen_pool")
    table = _table(
        [[r["pool"] + (" (cheapest)" if r["pool"] == chosen else ""),
          usd(r["hourly_price"]) + "/h", rate(r["capacity_rps"]),
          "measured" if r["measured"] else "derived", usd(r["before"]), usd(r["after"]),
          f"{r['saving']:.0%}" if r["saving"] is not None else "-"] for r in rows],
        ["pool", "price", "one replica at the SLO", "capacity figure",
         "1M requests: baseline", "1M requests: selected", "saving"])
    return ("<h2>Cost of one million requests</h2>" + table +
            "<p>The selected model's capacity is measured on a real tritonserver on this "
            "machine's pool; a pool marked <i>derived</i> is priced from that measurement scaled "
            "to its cores, not measured on its hardware. The baseline was not served: its cost "
            "is the selected model's divided by the speed-up"
            + (" of the timing recheck" if (report.get("measurement") or {}).get("speedup")
               else "") + ".</p>")


def _decisions(report: dict[str, Any]) -> str:
    decisions = report.get("autoscaling") or []
    if not decisions:
        return ""
    rows = []
    for g in group_decisions(decisions):
        when = (f"{g['start_s']:.0f}" if g["count"] == 1
                else f"{g['start_s']:.0f}-{g['end_s']:.0f} ({g['count']}x)")
        rows.append([when, _mix(g["replicas"]),
                     g["code"], span(g["rps"], "req/s"), span(g["p95"], "ms"), g["reason"]])
    source = html.escape(report.get("metrics_source", ""))
    return (f"<h2>Autoscaler decisions</h2><p>Metrics: {source}. Consecutive decisions with the "
            "same outcome are one row (the first one's reason shown; load and p95 as ranges)."
            "</p>" + _table(rows, ["t (s)", "replicas", "decision", "load", "p95", "reason"],
                            cls="decisions"))


def render_html(report: dict[str, Any], *, timeline_b64: str | None,
                pareto_b64: str | None = None) -> str:
    comp = report.get("compression") or {}
    v = report.get("verdict") or {}
    status = v.get("status", "ok")
    listed = v.get("problems", []) + v.get("warnings", [])
    items = "".join(f"<li>{html.escape(x)}</li>" for x in listed[1:])  # the first heads it
    banner = (f'<div class="verdict {html.escape(status)}"><b>{html.escape(v.get("headline", ""))}'
              f"</b>" + (f"<p>Also:</p><ul>{items}</ul>" if items else "") + "</div>")
    summary = html.escape(report.get("summary", ""))
    name = html.escape(report.get("name", ""))
    parts = [banner, f"<p>{summary}</p>"]
    if comp:
        parts += ["<h2>Candidates</h2>", _candidates(comp)]
        if pareto_b64:
            parts += ["<h2>Quality against latency</h2>", _img(pareto_b64, "pareto")]
    parts.append(_measurement(report.get("measurement") or {}))
    parts.append(_costs(report))
    if timeline_b64 and report.get("timeline"):
        parts += ["<h2>Load, replicas and latency</h2>", _img(timeline_b64, "timeline")]
    parts.append(_decisions(report))
    body = "\n".join(p for p in parts if p)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>leanserve run: {name}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 14px; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; vertical-align: top; }}
th {{ background: #f3f3f3; }} td:first-child {{ text-align: left; }}
td:last-child {{ text-align: left; }}
table.decisions td {{ white-space: nowrap; }}
table.decisions td:last-child {{ white-space: normal; font-size: 12px; }}
img {{ max-width: 100%; }}
.verdict {{ padding: 0.8em 1em; border-radius: 6px; margin: 1em 0; }}
.verdict.ok {{ background: #e6f4ea; border: 1px solid #34a853; }}
.verdict.warnings {{ background: #fef7e0; border: 1px solid #f9ab00; }}
.verdict.failed, .verdict.interrupted {{ background: #fce8e6; border: 1px solid #d93025; }}
.warn {{ color: #b06000; }}
</style></head><body>
<h1>leanserve run: {name}</h1>
{body}
</body></html>
"""
