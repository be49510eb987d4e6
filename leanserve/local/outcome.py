"""What a `leanserve run` achieved, in words: the verdict, the summary paragraph, the cost of a
million requests before and after, and the decision log grouped for reading.

Why a verdict at all: a demo that failed must not look like a success. A run whose autoscaler
never saw a metric, or whose candidates all failed the gate, exits non-zero and says so first;
a run that worked but missed what it set out to show (the SLO, a scale-up, trustworthy timings)
says that first too. Everything here is pure: it reads report.json's content and returns data.
"""

from __future__ import annotations

import enum
from typing import Any

SLO_TARGET = 0.9
"""Share of 2 s intervals whose p95 should meet the SLO for the run to count as a success."""


class Status(str, enum.Enum):
    OK = "ok"
    WARNINGS = "warnings"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


def mib(n_bytes: float | None) -> str:
    if n_bytes is None:
        return "-"
    return f"{n_bytes / 2**20:.1f} MiB"


def rate(x: float | None, unit: str = "req/s") -> str:
    if x is None:
        return "-"
    return f"{x:.0f} {unit}" if x >= 100 else f"{x:.1f} {unit}"


def usd(x: float | None) -> str:
    if x is None:
        return "-"
    return f"${x:.4f}" if x < 0.1 else f"${x:.2f}"


def slo_attainment(timeline: list[dict[str, Any]], slo_ms: float) -> float | None:
    """Share of the 2 s intervals with requests whose p95 met the SLO; failed requests count
    as never answered, so an interval where 5% or more failed (no p95) misses it."""
    judged = [p for p in timeline if p.get("p95_ms") is not None or p.get("errors")]
    if not judged:
        return None
    return sum(1 for p in judged if p.get("p95_ms") is not None and p["p95_ms"] <= slo_ms) \
        / len(judged)


def selected_candidate(report: dict[str, Any]) -> dict[str, Any] | None:
    comp = report.get("compression") or {}
    return next((c for c in comp.get("candidates", []) if c.get("name") == comp.get("selected")),
                None)


def served_pools(decisions: list[dict[str, Any]]) -> list[str]:
    """Pools that had replicas at some point of the run, in the order they first appear."""
    out: list[str] = []
    for d in decisions:
        for pool, n in d.get("replicas", {}).items():
            if n > 0 and pool not in out:
                out.append(pool)
    return out


def verdict(report: dict[str, Any], slo_ms: float) -> dict[str, Any]:
    """{status, usable, headline, problems, warnings, ...}: problems make the run unusable."""
    problems: list[str] = []
    warnings: list[str] = []
    comp = report.get("compression")
    interrupted = report.get("interrupted")
    if report.get("error"):
        problems.append(f"stopped by an error: {report['error']}")
    if interrupted:
        problems.append(f"interrupted (Ctrl-C or SIGTERM) during {interrupted}: "
                        "this report holds what was done until then")
    if comp is not None and comp.get("selected") is None:
        problems.append(f"no candidate passed the quality gate ({comp.get('metric')} drop <= "
                        f"{comp.get('max_drop')}): nothing to serve")
    decisions = report.get("autoscaling") or []
    live = [i for i, d in enumerate(decisions) if d.get("observed_rps") is not None]
    if decisions and not live:
        why = next((p for d in decisions for p in d.get("problems", [])), "no data")
        problems.append(f"the autoscaler never saw a metric: all {len(decisions)} decisions "
                        f"were MetricsUnavailable ({why})")
    elif live and live[0] > 0:
        warnings.append(f"the autoscaler read live metrics only from decision {live[0] + 1} "
                        f"of {len(decisions)} on")
    attain = slo_attainment(report.get("timeline") or [], slo_ms)
    if decisions and not interrupted:
        if attain is None:
            problems.append("no request of the load was served")
        elif attain < SLO_TARGET:
            warnings.append(f"p95 met the {slo_ms:g} ms SLO in only {attain:.0%} of 2 s "
                            f"intervals (aim: {SLO_TARGET:.0%})")
        totals = [sum(d.get("replicas", {}).values()) for d in decisions]
        if live and max(totals) <= totals[0]:
            warnings.append(f"replicas never rose above {totals[0]}: the burst did not make "
                            "the autoscaler scale up")
        elif live and totals[-1] >= max(totals) > totals[0]:
            warnings.append(f"replicas did not come back down after the burst (still "
                            f"{totals[-1]})")
    measurement = report.get("measurement") or {}
    if measurement.get("noisy"):
        warnings.append("timings were disturbed by other work on this machine ("
                        + "; ".join(measurement.get("notes", [])) + "): speed-ups are uncertain")
    errors = report.get("replica_errors") or []
    if errors:
        warnings.append(f"{len(errors)} replica(s) failed to start: {errors[0]}")
    replaced = report.get("replicas_replaced") or []
    if replaced:
        warnings.append(f"{len(replaced)} replica(s) died and were replaced: {replaced[0]}")

    if interrupted:
        status = Status.INTERRUPTED
    elif problems:
        status = Status.FAILED
    elif warnings:
        status = Status.WARNINGS
    else:
        status = Status.OK
    headline = {
        Status.OK: "OK: compressed, gated, served, autoscaled from live metrics, SLO met",
        Status.WARNINGS: "DONE WITH WARNINGS: " + warnings[0] if warnings else "",
        Status.FAILED: "FAILED: " + problems[0] if problems else "",
        Status.INTERRUPTED: "INTERRUPTED: " + problems[0] if problems else "",
    }[status]
    return {"status": status.value, "usable": not problems, "headline": headline,
            "problems": problems, "warnings": warnings, "slo_attainment": attain,
            "first_live_decision": live[0] + 1 if live else None}


def costs_before_after(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Cost of one million requests per pool, with the baseline and the selected model.

    The selected model's capacity is measured on Triton (or derived for a pool whose hardware
    is not here); the baseline is never served, so its capacity is the selected model's divided
    by the measured speed-up (the interleaved recheck's where there is one)."""
    cost = report.get("cost") or {}
    speedup = _speedup(report)
    rows = []
    for pool, v in cost.items():
        if not isinstance(v, dict):
            continue
        after = v.get("per_million_requests")
        before = after * speedup if (after is not None and speedup) else None
        rows.append({"pool": pool, "hourly_price": v.get("hourly_price"),
                     "capacity_rps": v.get("capacity_rps"), "measured": v.get("measured"),
                     "before": before, "after": after,
                     "saving": (1 - after / before) if before else None})
    return rows


def _speedup(report: dict[str, Any]) -> float | None:
    recheck = (report.get("measurement") or {}).get("speedup")
    if recheck:
        return float(recheck)
    sel = selected_candidate(report)
    return sel.get("speedup") if sel else None


def summary(report: dict[str, Any], slo_ms: float) -> str:
    """One paragraph: what was chosen and why, where it ran, what it costs, how it went."""
    comp = report.get("compression") or {}
    cands = comp.get("candidates", [])
    passed = [c for c in cands if c.get("passed")]
    sel = selected_candidate(report)
    parts = []
    if not comp:
        return "Interrupted before compression finished: nothing to report yet."
    gate = f"{comp.get('metric')} drop <= {comp.get('max_drop')}"
    if sel is None:
        return (f"{len(cands)} candidate(s) tried, none passed the quality gate ({gate}); "
                "nothing was served.")
    base = comp.get("baseline", {})
    ratio = (base.get("size_bytes") or 0) / max(1, sel.get("size_bytes") or 1)
    m = report.get("measurement") or {}
    speed = m.get("speedup") or sel.get("speedup") or 0
    parts.append(
        f"{len(passed)} of {len(cands)} candidates passed the quality gate ({gate}); "
        f"{sel['name']} was chosen as the fastest of them (ties within 10% go to the smaller "
        f"quality drop): {speed:.2f}x the baseline's throughput"
        + (" (rechecked interleaved with the baseline)" if m.get("speedup") else "")
        + f", {ratio:.1f}x smaller ({mib(base.get('size_bytes'))} -> "
        f"{mib(sel.get('size_bytes'))}), quality drop {sel.get('quality_drop') or 0:.4f}.")
    if m.get("noisy"):
        parts.append("Warning: other work on this machine disturbed the timings ("
                     + "; ".join(m.get("notes", [])) + "), so the speed-up is uncertain.")
    cost = report.get("cost") or {}
    decisions = report.get("autoscaling") or []
    here = served_pools(decisions)
    chosen = cost.get("chosen_pool")
    if here:
        local = report.get("local") or {}
        cap = local.get("planned_rps") or (local.get("replica") or {}).get("capacity_rps")
        parts.append(
            f"This run served it on {', '.join(here)}: here every pool shares this machine's "
            f"cores, one replica per core (planned at {rate(cap)} each at p95 <= "
            f"{slo_ms:g} ms).")
    if chosen and isinstance(cost.get(chosen), dict):
        c = cost[chosen]
        how = "measured here" if c.get("measured") else (
            "derived from this machine's measurement, not measured on that hardware")
        parts.append(f"Priced per pool, {chosen} is the cheapest per request in a cluster: "
                     f"{usd(c.get('per_million_requests'))} per million requests ({how}).")
    if decisions:
        totals = [sum(d.get("replicas", {}).values()) for d in decisions]
        attain = slo_attainment(report.get("timeline") or [], slo_ms)
        parts.append(
            f"The autoscaler took {len(decisions)} decisions, from {totals[0]} replica(s) up to "
            f"{max(totals)} and back to {totals[-1]}; p95 met the {slo_ms:g} ms SLO in "
            + (f"{attain:.0%}" if attain is not None else "none")
            + " of 2 s intervals.")
    return " ".join(parts)


def group_decisions(decisions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive decisions with the same outcome (code and replicas) as one row."""
    groups: list[dict[str, Any]] = []
    for d in decisions:
        key = (d.get("code"), tuple(sorted(d.get("replicas", {}).items())))
        if groups and groups[-1]["key"] == key:
            g = groups[-1]
        else:
            g = {"key": key, "code": d.get("code"), "replicas": d.get("replicas", {}),
                 "start_s": d.get("time_s"), "reason": d.get("reason", ""), "rps": [],
                 "p95": [], "count": 0}
            groups.append(g)
        g["end_s"] = d.get("time_s")
        g["count"] += 1
        if d.get("observed_rps") is not None:
            g["rps"].append(d["observed_rps"])
        if d.get("observed_p95_ms") is not None:
            g["p95"].append(d["observed_p95_ms"])
    for g in groups:
        del g["key"]
    return groups


def span(values: list[float], unit: str) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{lo:.0f} {unit}" if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f} {unit}"
