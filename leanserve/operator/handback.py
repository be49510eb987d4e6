"""How a compression Job hands its result back without the operator mounting the store.

The Job's container writes a compact JSON summary to its termination message
(``/dev/termination-log``, at most 4096 bytes, kept by the kubelet in the pod's status);
the operator reads it from the pod and copies it into ``status.compression``. On failure the
container writes its last log lines there instead (and the pod's terminationMessagePolicy
FallbackToLogsOnError covers a container that dies before it can write anything).

Format (version 1), keys kept short to fit many candidates::

    {"v": 1, "selected": "int8" | null, "metric": "cosine",
     "artifact": {"uri": "pvc://models/leanserve/x/<hash>/model_repository", "sha256": "...",
                  "gpu": true},  # gpu: the KIND_GPU sibling <uri>-gpu was written too
     "baseline": {"quality": 1.0, "p95": 12.3},
     "candidates": [{"name", "passed", "quality", "drop", "speedup", "size", "error"}],
     "pools": {"<pool>": {"capacity_rps", "cost_per_million_requests", "measured"}},
     "curve": {"a", "b", "m"}}

``pools`` is present only when the Job profiled the selected model (DESIGN.md section 6 format);
``curve`` too, when the profile's trials gave a fitted latency-versus-load curve
(leanserve.autoscaling.capacity): the profile's grid stays in the Job, and without ``curve``
the operator's autoscaler would plan every replica with the default shape, not the measured one.
"""

from __future__ import annotations

import json
from typing import Any

from leanserve.autoscaling.capacity import curve_from_profile
from leanserve.operator.constants import TERMINATION_LIMIT

VERSION = 1
_CANDIDATE_KEYS = {"name": "name", "passed": "passed", "quality": "quality",
                   "quality_drop": "drop", "speedup": "speedup", "size_bytes": "size",
                   "error": "error"}


def _round(v: Any) -> Any:
    return round(v, 5) if isinstance(v, float) else v


def summarize(report: dict[str, Any], artifact_uri: str, sha256: str,
              profile: dict[str, Any] | None = None, gpu: bool = False) -> dict[str, Any]:
    """The summary of a DESIGN.md section 4 report (selected candidate first)."""
    selected = report.get("selected")
    cands = sorted(report.get("candidates", []), key=lambda c: c.get("name") != selected)
    baseline = report.get("baseline") or {}
    summary: dict[str, Any] = {
        "v": VERSION,
        "selected": selected,
        "metric": report.get("metric"),
        "artifact": {"uri": artifact_uri if selected else "", "sha256": sha256 if selected else "",
                     **({"gpu": True} if gpu and selected else {})},
        "baseline": {"quality": _round(baseline.get("quality")),
                     "p95": _round((baseline.get("latency_ms") or {}).get("p95"))},
        "candidates": [
            {short: _round(c.get(key)) for key, short in _CANDIDATE_KEYS.items()
             if c.get(key) is not None}
            for c in cands
        ],
    }
    if profile and isinstance(profile.get("pools"), dict):
        summary["pools"] = {
            name: {k: _round(v) for k, v in p.items()
                   if k in ("capacity_rps", "cost_per_million_requests", "measured")}
            for name, p in profile["pools"].items()
        }
        curve = curve_from_profile(profile)
        if curve.fitted:
            summary["curve"] = {k: float(f"{getattr(curve, k):.6g}") for k in ("a", "b", "m")}
    return summary


def encode(summary: dict[str, Any], limit: int = TERMINATION_LIMIT) -> str:
    """Compact JSON within the limit: errors, then failed candidates, are dropped first."""
    s = dict(summary)
    text = json.dumps(s, separators=(",", ":"))
    if len(text.encode()) <= limit:
        return text
    s["candidates"] = [{k: v for k, v in c.items() if k != "error"} for c in s["candidates"]]
    while len((text := json.dumps(s, separators=(",", ":"))).encode()) > limit and \
            len(s["candidates"]) > 1:
        s["candidates"] = s["candidates"][:-1]
        s["truncated"] = True
    if len(text.encode()) > limit:
        s.pop("pools", None)
        s.pop("curve", None)
        text = json.dumps(s, separators=(",", ":"))
    return text


def decode(message: str | None) -> dict[str, Any] | None:
    """The summary in a termination message, or None when it is not one (e.g. log lines)."""
    if not message:
        return None
    try:
        value = json.loads(message)
    except ValueError:
        return None
    if isinstance(value, dict) and value.get("v") == VERSION and "candidates" in value:
        return value
    return None


def tail(text: str, limit: int = TERMINATION_LIMIT, lines: int = 20) -> str:
    """The last lines of a log, within the limit in bytes."""
    kept = "\n".join(text.rstrip().splitlines()[-lines:])
    data = kept.encode()
    return data[-limit:].decode(errors="ignore") if len(data) > limit else kept
