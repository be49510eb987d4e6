"""A replica's latency as a function of its load, fitted to the serving profile's measurements.

Why: a capacity "at the SLO" is one point of a curve. An autoscaler that plans for 99% of requests
within the SLO needs the rest of it: how fast p95 climbs towards saturation, and how many requests
miss at a given load. The profile (`leanserve profile`, bench/profiles/minilm-cpu.json) keeps every
open-loop trial of its best config as (offered rate, p95); this module fits a queueing curve to them
and the policy, the simulator and the benchmarks all read that one curve.

The model (an M/M/1-style queue behind a fixed service part), per replica, with the load as a
share ``u`` of the profile's capacity_rps (the pool's capacity at the SLO):

    p95(u) = SLO x (a + b / (m - u))          for u < m;  saturated (unbounded) for u >= m

``m`` is the saturation throughput over capacity_rps, ``b / (m - u)`` the queueing part. A
request's latency is the fixed part plus an exponential queueing part (the M/M/1 sojourn time
is exponential) whose 95th percentile is ``b / (m - u)``, so the share of requests within the SLO
at load u is ``1 - 0.05 ** ((1 - a) (m - u) / b)``, and a request that also waits ``w`` (as a
share of the SLO) behind a backlog is within it with ``1 - 0.05 ** ((1 - a - w) (m - u) / b)``.

The curve is fitted on the capacity-normalised load, so the same shape serves every pool (a derived
pool is the measured one scaled linearly; the profile says which pools are derived). Without
trials (an estimated capacity, an old profile) the default shape is the one whose p95 at no load
is 30% of the SLO and exactly the SLO at capacity_rps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

LN20 = math.log(20.0)


@dataclass(frozen=True)
class LatencyCurve:
    """p95(u) / SLO = a + b / (m - u), u = load per replica / capacity_rps (see module doc)."""

    a: float = 0.0
    """The fixed part of the latency, as a share of the SLO (may be slightly negative in a fit:
    it is an intercept, not a measurement)."""
    b: float = 0.3 / 0.7
    """Scale of the queueing part."""
    m: float = 1.0 / 0.7
    """Saturation throughput over capacity_rps."""
    fitted: bool = False
    """True when fitted to measured trials; False for the default shape."""

    def p95_share(self, u: float) -> float:
        """p95 over the SLO at load share u (inf when saturated)."""
        if u >= self.m:
            return math.inf
        return self.a + self.b / (self.m - max(0.0, u))

    def within(self, u: float, wait: float = 0.0) -> float:
        """Share of requests within the SLO at load share u after an extra ``wait`` (SLO units)."""
        if u >= self.m:
            return 0.0
        slack = 1.0 - self.a - wait
        if slack <= 0:
            return 0.0
        return 1.0 - math.exp(-LN20 * slack * (self.m - max(0.0, u)) / self.b)

    def load_for(self, quantile: float) -> float:
        """The highest load share at which ``quantile`` of requests are within the SLO."""
        q = min(max(quantile, 1e-6), 1 - 1e-12)
        slack = 1.0 - self.a
        if slack <= 0:
            return 0.0
        return max(0.0, self.m - self.b * math.log(1.0 / (1.0 - q)) / (LN20 * slack))

    def mean_share(self, u: float) -> float:
        """Mean latency over the SLO at load share u (fixed part + the exponential mean)."""
        if u >= self.m:
            return math.inf
        return self.a + self.b / (self.m - max(0.0, u)) / LN20

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "m": self.m, "fitted": self.fitted}


DEFAULT_CURVE = LatencyCurve()
"""p95 at no load 30% of the SLO, exactly the SLO at capacity_rps (a=0, m=1/0.7)."""


def fit_curve(trials: Sequence[tuple[float, float]], capacity_rps: float, slo_ms: float
              ) -> LatencyCurve:
    """Least squares of p95/SLO over u = rate/capacity_rps, over a grid of m.

    Trials above 5x the SLO are saturated (their p95 measures the trial's length, not the
    queue) and are left out; fewer than three usable trials give DEFAULT_CURVE. The fit must
    keep the curve rising (b > 0) and saturating beyond the highest load that met the SLO.
    """
    pts = [(r / capacity_rps, p / slo_ms) for r, p in trials
           if r > 0 and p > 0 and math.isfinite(p) and p <= 5 * slo_ms]
    if len(pts) < 3 or capacity_rps <= 0 or slo_ms <= 0:
        return DEFAULT_CURVE
    u_ok = max((u for u, y in pts if y <= 1.0), default=0.0)
    lo = max(u_ok, 1e-3) * 1.001
    best: tuple[float, LatencyCurve] | None = None
    m = lo
    while m <= 4.0:
        xs = [1.0 / (m - u) if u < m else None for u, _ in pts]
        rows = [(x, y) for x, (_, y) in zip(xs, pts, strict=True) if x is not None]
        if len(rows) >= 3:
            n = len(rows)
            mx = sum(x for x, _ in rows) / n
            my = sum(y for _, y in rows) / n
            sxx = sum((x - mx) ** 2 for x, _ in rows)
            if sxx > 0:
                b = sum((x - mx) * (y - my) for x, y in rows) / sxx
                a = my - b * mx
                # a saturated trial (u >= m) the curve calls impossible costs its miss
                err = sum((a + b * x - y) ** 2 for x, y in rows) + (len(pts) - n) * 1.0
                if b > 0 and (best is None or err < best[0]):
                    best = (err, LatencyCurve(a, b, m, True))
        m += 0.005
    return best[1] if best is not None else DEFAULT_CURVE


def curve_from_dict(d: Any) -> LatencyCurve | None:
    """A fitted curve stored as ``{"a", "b", "m"}`` (``LatencyCurve.to_dict``, or the compression
    Job's termination message: the operator keeps it in status.compression.curve); None when it
    is not one (missing, not numbers, a shape the fit never gives: b <= 0, m <= 0)."""
    if not isinstance(d, Mapping):
        return None
    try:
        a, b, m = (float(d[k]) for k in ("a", "b", "m"))
    except (KeyError, TypeError, ValueError):
        return None
    if not all(math.isfinite(x) for x in (a, b, m)) or b <= 0 or m <= 0:
        return None
    return LatencyCurve(a, b, m, True)


def curve_from_profile(profile: Mapping[str, Any]) -> LatencyCurve:
    """The curve of the profile's chosen config: its grid entry's trials, fitted; else the
    profile's ``curve`` (a fit made where the trials were, e.g. in the compression Job); else
    the default shape.

    The grid entry is the one whose config equals profile["config"] (the profiler's choice);
    its capacity_rps and the profile's slo_latency_p95_ms normalise the trials.
    """
    stored = curve_from_dict(profile.get("curve")) if isinstance(profile, Mapping) else None
    if stored is not None and not profile.get("grid"):
        return stored
    try:
        cfg = profile.get("config")
        slo = float(profile.get("slo_latency_p95_ms") or 0)
        for entry in profile.get("grid") or []:
            if not isinstance(entry, Mapping) or entry.get("config") != cfg:
                continue
            cap = float(entry.get("capacity_rps") or 0)
            trials = [(float(t["rate"]), float(t["p95_ms"])) for t in entry.get("trials") or []
                      if isinstance(t, Mapping) and int(t.get("errors") or 0) == 0]
            return fit_curve(trials, cap, slo)
    except (TypeError, ValueError, KeyError, AttributeError):
        pass
    return DEFAULT_CURVE
