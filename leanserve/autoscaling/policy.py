"""The autoscaling policy: observed load -> replicas of ONE node pool, priced.

Why a pure function: the operator (a kopf timer), the local platform, `leanserve simulate` and the
benchmarks all call the same ``decide`` with what they observed, the pools' capacities, the spec,
the previous ``Decision`` and the same ``PolicySettings()``; every bit of memory the policy needs
(the scale-down window, the load history for trend and noise, the learnt daily and weekly shape of
the load) travels inside the Decision (``Decision.to_status``/``from_status`` for the operator's
status), never in globals or a clock read here.

What it does, in order:

1. The load: the ARRIVAL rate (requests/s reaching Triton: completions plus the growth of its
   pending requests over the metric window; it keeps rising under overload, where the served
   rate stops at saturation). Without it, the served rate (a lower bound under overload). Triton's
   pending requests beyond what the load keeps in flight at its latency (Little's law) are a
   backlog, drained within one interval. No usable rate at all (Prometheus down, empty, NaN) ->
   hold the current replicas, SLOMet Unknown, reason MetricsUnavailable: missing data is never
   zero load.
2. Demand = the load where it will be when a replica asked for now serves (start-up + interval
   ahead): the larger of the reactive forecast (the load plus its significant upward trend, over
   that horizon and half the rate window more: a windowed rate trails a ramp by that much) and,
   once a day of history has taught it the load's daily shape (weekdays and weekends apart), the
   seasonal one (the load times the rise the shape predicts over that horizon and one 5-minute
   bucket more).
3. Per replica, the load at which ``target_quantile`` of requests are within the SLO, from the
   pool's latency curve (leanserve.autoscaling.capacity, fitted to the serving profile), less
   headroom for the load's observed noise. When the measured p95 is above the SLO although the
   curve says the ready replicas should meet it, the curve is optimistic: demand grows by the
   overshoot (at most 2x).
4. ONE pool: the cheapest replica count of each pool that carries it within minReplicas,
   maxReplicas and maxHourlyCost; the current pool stays unless another is ``switch_margin``
   cheaper. Scale up at once; scale down only to the most demand seen within
   scaleDownStabilizationSeconds, never while p95 is above the SLO.
5. A pool switch never drops capacity: the new pool is asked for, the old one keeps its replicas
   until the new pool's READY replicas carry the demand, then goes to 0. A switch that the limits
   cannot fit beside the old replicas is not started.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from leanserve.autoscaling.capacity import DEFAULT_CURVE, LatencyCurve, curve_from_profile
from leanserve.autoscaling.errors import PolicyError


class Reason(str, enum.Enum):
    """Why a decision was taken; also the SLOMet condition's reason where it applies."""

    SCALE_UP = "ScaleUp"
    SLO_AT_RISK = "SLOAtRisk"
    SCALE_DOWN = "ScaleDown"
    STABILIZING = "ScaleDownStabilizing"
    STEADY = "Steady"
    METRICS_UNAVAILABLE = "MetricsUnavailable"
    LIMITED = "LimitedByMaxReplicasOrBudget"
    SWITCHING = "SwitchingPool"


@dataclass(frozen=True)
class PoolCapacity:
    """One node pool as the policy sees it."""

    name: str
    capacity_rps: float
    """Requests/s one replica serves with p95 within the SLO (from `leanserve profile`)."""
    hourly_price: float
    """USD for one replica for one hour."""
    curve: LatencyCurve = DEFAULT_CURVE
    """p95 against load, load as a share of capacity_rps (fitted to the profile's trials)."""

    @property
    def price_per_rps(self) -> float:
        return self.hourly_price / self.capacity_rps if self.capacity_rps > 0 else math.inf

    def per_replica(self, quantile: float) -> float:
        """Requests/s one replica carries with ``quantile`` of requests within the SLO."""
        return self.capacity_rps * self.curve.load_for(quantile)


@dataclass(frozen=True)
class Target:
    """The parts of the CompressedModel spec the policy reads (slo + autoscaling)."""

    latency_p95_ms: float
    min_replicas: int = 1
    max_replicas: int = 10
    max_hourly_cost: float | None = None
    interval_seconds: float = 30.0
    scale_down_stabilization_seconds: float = 300.0

    @classmethod
    def from_spec(cls, spec: Any) -> Target:
        """From a CompressedModelSpec (or anything with .slo and .autoscaling like it)."""
        if isinstance(spec, Target):
            return spec
        a = spec.autoscaling
        return cls(
            latency_p95_ms=float(spec.slo.latency_p95_ms),
            min_replicas=int(a.min_replicas),
            max_replicas=int(a.max_replicas),
            max_hourly_cost=None if a.max_hourly_cost is None else float(a.max_hourly_cost),
            interval_seconds=float(a.interval_seconds),
            scale_down_stabilization_seconds=float(a.scale_down_stabilization_seconds),
        )

    @property
    def budget(self) -> float:
        return math.inf if self.max_hourly_cost is None else self.max_hourly_cost

    def affordable(self, pool: PoolCapacity) -> int:
        """Most replicas of one pool within maxReplicas and the budget (no budget: no limit)."""
        if self.max_hourly_cost is None or pool.hourly_price <= 0:
            return self.max_replicas
        return min(self.max_replicas, math.floor(self.budget / pool.hourly_price + 1e-9))


@dataclass(frozen=True)
class PolicySettings:
    """The policy's knobs that are not in the spec. ``PolicySettings()`` is what ships: the
    operator, `leanserve run`, `leanserve simulate` and bench/autoscaling.py all run it."""

    startup_seconds: float = 120.0
    """Physics, not a tuned knob: how long a new replica takes to serve (a pod that pulls the
    Triton image and loads the model). Forecasts look this far ahead (+1 interval). Callers that
    know their platform's figure set it (the simulator to its start-up, `leanserve run` to a
    local process's)."""
    target_quantile: float = 0.99
    """Share of requests to keep within the SLO at the planned load (the curve gives the load
    per replica at which that holds)."""
    noise_z: float = 2.0
    """Headroom per unit of the load's relative noise (std of successive differences / sqrt 2
    over the mean, over NOISE_WINDOW_SECONDS): the load moves that much between decisions."""
    trend_window_seconds: float = 120.0
    """History the reactive trend is fitted on (least squares; only the part of the slope one
    standard error above zero is projected)."""
    seasonal: bool = True
    """Learn the daily shape of the load (weekdays and weekends apart) and scale ahead of the
    rise it predicts; off: the reactive forecast alone."""
    switch_margin: float = 0.3
    """Switch pools only when the other pool carries the demand at least this much cheaper
    (a switch pays both pools for a start-up)."""
    room: float = 2.0
    """Prefer pools that could carry this multiple of the need within maxReplicas and the
    budget: a switch keeps the old pool's replicas while the new ones start, so a pool filled
    to the limits can no longer be left when the load outgrows it."""


SETTINGS = PolicySettings()
"""The one set of settings that ships (see PolicySettings)."""

NOISE_WINDOW_SECONDS = 600.0
"""History the load's noise is measured over."""
MAX_HEADROOM = 0.5
MAX_BREACH_FACTOR = 2.0
HISTORY_KEEP = 128
"""Most history entries a Decision carries (and the operator's status stores)."""


@dataclass(frozen=True)
class Observation:
    """What a metric source saw at one moment; None (or NaN) means "no data", never zero."""

    time: float
    request_rate: float | None
    """Served requests/s over all pools (completions; capped at saturation): the cross-check."""
    p95_ms: float | None = None
    queue_ms: float | None = None
    """Mean time a request waited in Triton's queue over the metric window."""
    ready: Mapping[str, int] | None = None
    """Ready replicas per pool (serving traffic)."""
    current: Mapping[str, int] | None = None
    """Replicas per pool as set on the platform (ready or starting)."""
    arrival_rate: float | None = None
    """Requests/s ARRIVING over the metric window (completions + growth of pending requests):
    the load signal, unbounded under overload."""
    pending: float | None = None
    """Requests queued or executing in Triton now (nv_inference_pending_request_count)."""
    window_seconds: float | None = None
    """The range the rates are averaged over (the rate() window). On a ramp an average over the
    last W seconds is the load of W/2 ago: the trend projects that much further. None: 0."""
    rate_note: str = ""
    """How the source corrected its rates, said after the load in the decision's reason."""


SEASON_BUCKET_SECONDS = 300.0
SEASON_BUCKETS = 288
"""The daily shape in 5-minute buckets (2 x 288 levels and day counts: a few kB of status)."""
SEASON_BLEND = 0.5
"""Weight of the newest day in a bucket's level (an average over days that follows change)."""
EPOCH_WEEKDAY = 3
"""Day 0 of the clock (Unix time: 1970-01-01) was a Thursday (Monday = 0)."""


def _day_class(t: float) -> int:
    """0 on weekdays, 1 on Saturdays and Sundays (UTC)."""
    return 1 if (math.floor(t / 86400.0) + EPOCH_WEEKDAY) % 7 >= 5 else 0


@dataclass(frozen=True)
class Season:
    """The learnt daily shape of the load, weekdays (class 0) and weekends (class 1) apart.

    ``levels[c][b]``: the load's mean in 5-minute bucket b of a day of class c, averaged over
    the days seen (the newest weighted SEASON_BLEND); ``days[c][b]``: how many days fed it (0:
    unknown). The bucket being observed accumulates in ``open_*`` and folds in when the clock
    leaves it. 2 x 288 levels: small enough for the operator's status.
    """

    levels: tuple[tuple[float, ...], tuple[float, ...]] = (
        (0.0,) * SEASON_BUCKETS, (0.0,) * SEASON_BUCKETS)
    days: tuple[tuple[int, ...], tuple[int, ...]] = (
        (0,) * SEASON_BUCKETS, (0,) * SEASON_BUCKETS)
    open_key: int = -1
    """Index of the open bucket since the clock's epoch (bucket count), -1: none."""
    open_sum: float = 0.0
    open_n: int = 0

    def observe(self, t: float, load: float) -> Season:
        key = math.floor(t / SEASON_BUCKET_SECONDS)
        if key == self.open_key:
            return replace(self, open_sum=self.open_sum + load, open_n=self.open_n + 1)
        folded = self._fold()
        return replace(folded, open_key=key, open_sum=load, open_n=1)

    def _fold(self) -> Season:
        if self.open_key < 0 or self.open_n == 0:
            return self
        t = self.open_key * SEASON_BUCKET_SECONDS
        c, b = _day_class(t), self.open_key % SEASON_BUCKETS
        mean = self.open_sum / self.open_n
        old, n = self.levels[c][b], self.days[c][b]
        # 6 significant digits: the status stays small, and what is stored is what is used
        new = float(f"{mean if n == 0 else old + SEASON_BLEND * (mean - old):.6g}")
        levels = list(self.levels)
        days = list(self.days)
        levels[c] = (*self.levels[c][:b], new, *self.levels[c][b + 1:])
        days[c] = (*self.days[c][:b], min(99, n + 1), *self.days[c][b + 1:])
        return replace(self, levels=(levels[0], levels[1]), days=(days[0], days[1]))

    def level(self, t: float) -> float | None:
        """The shape at time t, linear between bucket centres; None where a bucket is unknown
        (the other class's bucket stands in for a class never seen)."""
        x = t / SEASON_BUCKET_SECONDS - 0.5
        k0 = math.floor(x)
        w = x - k0
        out = 0.0
        for k, weight in ((k0, 1 - w), (k0 + 1, w)):
            tk = (k + 0.5) * SEASON_BUCKET_SECONDS
            c, b = _day_class(tk), k % SEASON_BUCKETS
            if self.days[c][b] == 0:
                c = 1 - c
                if self.days[c][b] == 0:
                    return None
            out += weight * self.levels[c][b]
        return out

    def rise(self, t: float, horizon: float) -> float | None:
        """The most the shape rises over [t, t + horizon + one bucket] relative to t (>= 1);
        None when the shape is unknown there. The extra bucket: the shape is an average over
        5 minutes, so a rise that comes within one shows there only partly."""
        now = self.level(t)
        if now is None or now <= 0:
            return None
        horizon += SEASON_BUCKET_SECONDS
        steps = max(1, math.ceil(horizon / (SEASON_BUCKET_SECONDS / 3)))
        top = now
        for i in range(1, steps + 1):
            v = self.level(t + horizon * i / steps)
            if v is None:
                return None
            top = max(top, v)
        return min(3.0, top / now)

    def to_status(self) -> dict[str, Any]:
        return {"levels": [list(x) for x in self.levels], "days": [list(x) for x in self.days],
                "open": [self.open_key, self.open_sum, self.open_n]}

    @classmethod
    def from_status(cls, d: Mapping[str, Any]) -> Season:
        levels = tuple(tuple(float(v) for v in row) for row in d["levels"])
        days = tuple(tuple(int(v) for v in row) for row in d["days"])
        if len(levels) != 2 or len(days) != 2 or any(
                len(r) != SEASON_BUCKETS for r in (*levels, *days)):
            raise ValueError("season: wrong shape")
        key, s, n = d["open"]
        return cls((levels[0], levels[1]), (days[0], days[1]), int(key), float(s), int(n))


@dataclass(frozen=True)
class HistoryEntry:
    """One past decision, as much as the scale-down window, the trend and the noise need."""

    time: float
    replicas: tuple[tuple[str, int], ...]
    rate: float | None
    """The load estimate (req/s) at that decision; None: no metrics."""
    demand: float | None = None
    """What the decision planned to carry (req/s, forecast and noise headroom included, a
    backlog's drain not); None: unknown."""

    def as_dict(self) -> dict[str, int]:
        return dict(self.replicas)

    def to_status(self) -> dict[str, Any]:
        return {"time": self.time, "replicas": self.as_dict(), "rate": self.rate,
                "demand": self.demand}

    @classmethod
    def from_status(cls, d: Mapping[str, Any]) -> HistoryEntry:
        return cls(float(d["time"]), tuple((str(k), int(v)) for k, v in d["replicas"].items()),
                   _opt_float(d.get("rate")), _opt_float(d.get("demand")))


def _opt_float(x: Any) -> float | None:
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise ValueError(f"not a number: {x!r}")
    return float(x)


@dataclass(frozen=True)
class Decision:
    """The policy's answer; pass it back in as ``previous`` next time."""

    time: float
    replicas: dict[str, int]
    reason: str
    """One line explaining the decision (goes to status, events and report.json)."""
    code: Reason
    desired_rps: float | None
    """Load the decision planned for (forecast), None without metrics."""
    capacity_rps: float
    """Capacity at the SLO of the chosen replicas."""
    hourly_cost: float
    slo_met: bool | None
    """Observed p95 within the SLO; None when unknown (SLOMet=Unknown)."""
    history: tuple[HistoryEntry, ...] = field(default=(), repr=False)
    season: Season | None = field(default=None, repr=False)
    """The learnt daily/weekly shape of the load (None: nothing learnt yet)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON for report.json's ``autoscaling`` list and the status."""
        return {
            "time": self.time,
            "replicas": dict(self.replicas),
            "reason": self.reason,
            "code": self.code.value,
            "desired_rps": self.desired_rps,
            "capacity_rps": self.capacity_rps,
            "hourly_cost": self.hourly_cost,
            "slo_met": self.slo_met,
        }

    def to_status(self) -> dict[str, Any]:
        """Everything ``decide`` reads back, as JSON-safe data of bounded size (at most
        HISTORY_KEEP history entries and one Season: a few kB): status.autoscaling."""
        return {"version": STATUS_VERSION, "last": self.to_dict(),
                "history": [h.to_status() for h in self.history[-HISTORY_KEEP:]],
                "season": None if self.season is None else self.season.to_status()}

    @classmethod
    def from_status(cls, saved: Mapping[str, Any] | None) -> Decision | None:
        """The Decision ``to_status`` wrote; None when there is none or it is unreadable (an
        unreadable record only costs the policy's memory, never an exception)."""
        if not isinstance(saved, Mapping) or not isinstance(saved.get("last"), Mapping):
            return None
        last = saved["last"]
        try:
            history = tuple(HistoryEntry.from_status(h) for h in saved.get("history") or [])
            season = (Season.from_status(saved["season"])
                      if isinstance(saved.get("season"), Mapping) else None)
            slo_met = last.get("slo_met")
            if slo_met is not None and not isinstance(slo_met, bool):
                raise ValueError("slo_met")
            return cls(time=float(last["time"]),
                       replicas={str(k): int(v) for k, v in last["replicas"].items()},
                       reason=str(last.get("reason", "")), code=Reason(last["code"]),
                       desired_rps=_opt_float(last.get("desired_rps")),
                       capacity_rps=float(last.get("capacity_rps") or 0.0),
                       hourly_cost=float(last.get("hourly_cost") or 0.0),
                       slo_met=slo_met, history=history[-HISTORY_KEEP:], season=season)
        except (KeyError, TypeError, ValueError, AttributeError):
            return None


STATUS_VERSION = 2


# ------------------------------------------------------------------------------------------
# cost model


def hourly_cost(replicas: Mapping[str, int], pools: Sequence[PoolCapacity]) -> float:
    """USD per hour of a replica mix: sum of replicas x price."""
    return sum(replicas.get(p.name, 0) * p.hourly_price for p in pools)


def capacity(replicas: Mapping[str, int], pools: Sequence[PoolCapacity]) -> float:
    """Requests/s a replica mix serves within the SLO when the Service spreads requests evenly
    over its pods (what ships): every pod gets the same share, so the slowest pool present sets
    the pace (one pool: replicas x capacity_rps)."""
    present = [p for p in pools if replicas.get(p.name, 0) > 0]
    if not present:
        return 0.0
    return sum(replicas.get(p.name, 0) for p in present) * min(p.capacity_rps for p in present)


def _fmt(mix: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in mix.items()) or "none"


def replicas_for(need_rps: float, pool: PoolCapacity, target: Target, per_replica: float
                 ) -> tuple[int, bool]:
    """(replicas of ``pool`` carrying need_rps at ``per_replica`` req/s each within the limits,
    whether that is enough). Overflowing needs (a rate of 1e308) are just infeasible."""
    top = target.affordable(pool)
    ratio = max(0.0, need_rps) / per_replica if per_replica > 0 else math.inf
    n = math.ceil(ratio - 1e-9) if ratio <= top else top + 1
    n = max(n, target.min_replicas)
    return min(n, top), n <= top


def cheapest_pool(need_rps: float, pools: Sequence[PoolCapacity], target: Target,
                  quantile: float, prefer: str | None = None, margin: float = 0.0,
                  room: float = 1.0) -> tuple[dict[str, int], bool]:
    """The cheapest ONE-pool mix carrying need_rps with ``quantile`` of requests within the SLO,
    within minReplicas, maxReplicas and the budget: (mix, feasible). Pools that could carry
    ``room`` x the need within the limits come first (a pool filled to its limits leaves no room
    to switch away from it without dropping capacity). ``prefer`` (the current pool) wins
    unless another is ``margin`` cheaper. When no pool suffices, the one that carries the most
    (feasible=False); when minReplicas cannot be afforded at all, the cheapest pool at what
    the budget allows."""
    if not pools:
        raise PolicyError("no node pools to scale: spec.nodePools is empty")
    options = []
    for p in pools:
        per = p.per_replica(quantile)
        n, ok = replicas_for(need_rps, p, target, per)
        options.append((p, n, ok, n * p.hourly_price, n * per))
    feasible = [o for o in options if o[2] and o[1] >= target.min_replicas]

    def roomy(o: tuple[PoolCapacity, int, bool, float, float], r: float) -> bool:
        return target.affordable(o[0]) * o[0].per_replica(quantile) + 1e-9 >= r * need_rps

    feasible = [o for o in feasible if roomy(o, room)] or feasible
    if feasible:
        best = min(feasible, key=lambda o: (o[3], -o[4]))
        cur = next((o for o in feasible if o[0].name == prefer), None)
        if cur is not None and best[3] >= (1 - margin) * cur[3] - 1e-12:
            best = cur
        return {p.name: (best[1] if p is best[0] else 0) for p in pools}, True
    viable = [o for o in options if o[1] >= target.min_replicas]
    if viable:
        best = max(viable, key=lambda o: (o[4], -o[3]))
        return {p.name: (best[1] if p is best[0] else 0) for p in pools}, False
    cheapest = min(pools, key=lambda p: p.hourly_price)
    n = min(target.max_replicas, target.affordable(cheapest))
    return {p.name: (n if p is cheapest else 0) for p in pools}, False


def fit_limits(mix: Mapping[str, int], pools: Sequence[PoolCapacity], target: Target,
               prefer: Mapping[str, int] | None = None) -> dict[str, int]:
    """Trim a mix until it is within maxReplicas and the budget.

    Removes first replicas above ``prefer``, the least cost-efficient pool first.
    """
    out = {p.name: max(0, int(mix.get(p.name, 0))) for p in pools}
    prefer = prefer or {}
    order = sorted(pools, key=lambda p: -p.price_per_rps)

    def over() -> bool:
        return (sum(out.values()) > target.max_replicas
                or hourly_cost(out, pools) > target.budget + 1e-9)

    for floor_map in (prefer, {}):
        for p in order:
            while over() and out[p.name] > floor_map.get(p.name, 0):
                out[p.name] -= 1
    return out


def within_limits(mix: Mapping[str, int], pools: Sequence[PoolCapacity], target: Target) -> bool:
    return (sum(mix.values()) <= target.max_replicas
            and hourly_cost(mix, pools) <= target.budget + 1e-9)


# ------------------------------------------------------------------------------------------
# the decision


def _valid(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x >= 0


def _trend(history: Sequence[HistoryEntry], now: float, load: float, window: float) -> float:
    """Least-squares slope (req/s per s) of the load over the window, shrunk by one standard
    error (on a noisy flat load the slope is noise), 0 with fewer than 3 points or when the
    load is not above the window's mean now (a past rise is no reason to provision ahead)."""
    pts = [(h.time, h.rate) for h in history
           if h.rate is not None and now - window <= h.time < now]
    pts.append((now, load))
    n = len(pts)
    if n < 3:
        return 0.0
    mt = sum(t for t, _ in pts) / n
    mr = sum(r for _, r in pts) / n
    var = sum((t - mt) ** 2 for t, _ in pts)
    if var <= 0 or load < mr:
        return 0.0
    slope = sum((t - mt) * (r - mr) for t, r in pts) / var
    res = sum((r - mr - slope * (t - mt)) ** 2 for t, r in pts) / (n - 2)
    return max(0.0, slope - math.sqrt(res / var))


def _noise(history: Sequence[HistoryEntry], now: float, load: float) -> float | None:
    """Relative noise of the load: std of successive differences / sqrt 2 over the mean
    (insensitive to a steady trend), over NOISE_WINDOW_SECONDS; None with < 4 points. Jumps
    count: a load that jumped recently may jump again before a replica starts (a robust
    estimate that ignored them was measured: 0.63 instead of 0.94 of requests within the SLO
    on bench/traces/step.csv)."""
    rs = [h.rate for h in history
          if h.rate is not None and now - NOISE_WINDOW_SECONDS <= h.time < now]
    rs.append(load)
    mean = sum(rs) / len(rs)
    if len(rs) < 4 or mean <= 0:
        return None
    diffs = [b - a for a, b in itertools.pairwise(rs)]
    md = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - md) ** 2 for d in diffs) / (len(diffs) - 1)) / math.sqrt(2)
    return sd / mean


def _prune(history: Sequence[HistoryEntry], now: float, keep: float) -> tuple[HistoryEntry, ...]:
    return tuple(h for h in history if now - keep <= h.time <= now)[-(HISTORY_KEEP - 1):]


def _carry(mix: Mapping[str, int], pools: Sequence[PoolCapacity], quantile: float) -> float:
    """Requests/s a mix carries at ``quantile`` within the SLO, spread evenly over its pods."""
    present = [p for p in pools if mix.get(p.name, 0) > 0]
    if not present:
        return 0.0
    return sum(mix.get(p.name, 0) for p in present) * min(p.per_replica(quantile)
                                                          for p in present)


def _saturation(ready: Mapping[str, int], pools: Sequence[PoolCapacity]) -> float:
    """Requests/s the ready pods complete at most (the curves' saturation throughput)."""
    present = [p for p in pools if ready.get(p.name, 0) > 0]
    if not present:
        return 0.0
    n = sum(ready.get(p.name, 0) for p in present)
    return n * min(p.curve.m * p.capacity_rps for p in present)


def _predicted_p95_share(load: float, ready: Mapping[str, int],
                         pools: Sequence[PoolCapacity]) -> float:
    """p95 / SLO the curves predict for ``load`` spread evenly over the ready pods (the
    slowest pool's)."""
    n = sum(ready.get(p.name, 0) for p in pools)
    if n == 0:
        return math.inf
    return max(p.curve.p95_share(load / n / p.capacity_rps)
               for p in pools if ready.get(p.name, 0) > 0)


def decide(observed: Observation, pools: Sequence[PoolCapacity], spec: Any,
           previous: Decision | None, now: float,
           settings: PolicySettings = SETTINGS) -> Decision:
    """Replicas per pool for this moment; pure (no clock, no I/O). See the module docstring."""
    target = Target.from_spec(spec)
    names = [p.name for p in pools]
    if not pools:
        raise PolicyError("no node pools to scale: spec.nodePools is empty")
    by_name = {p.name: p for p in pools}
    q = settings.target_quantile
    known = observed.current if observed.current is not None else (
        previous.replicas if previous is not None else None)
    keep = max(target.scale_down_stabilization_seconds, settings.trend_window_seconds,
               NOISE_WINDOW_SECONDS)
    history = _prune(previous.history if previous is not None else (), now, keep)
    season = previous.season if previous is not None else None

    if known is None:
        current = cheapest_pool(0.0, pools, target, q)[0]
    else:
        current = {n: int(known.get(n, 0)) for n in names}
    ready = ({n: int(observed.ready.get(n, 0)) for n in names}
             if observed.ready is not None else dict(current))
    slo = target.latency_p95_ms

    arrival = observed.arrival_rate if _valid(observed.arrival_rate) else None
    served = observed.request_rate if _valid(observed.request_rate) else None
    if arrival is None and served is None:
        held = fit_limits(current, pools, target, prefer=current)
        raised = ""
        short = target.min_replicas - sum(held.values())
        # holding never goes below minReplicas (raised since, or replicas that were never
        # there): on the pool already holding the most, else the cheapest per request
        order = sorted(pools, key=lambda p: (-held[p.name], p.price_per_rps))
        for p in order if short > 0 else ():
            mix = {**held, p.name: held[p.name] + short}
            if within_limits(mix, pools, target):
                held, raised = mix, f" (raised to minReplicas {target.min_replicas})"
                break
        why = (f"{Reason.METRICS_UNAVAILABLE.value}: no request rate (Prometheus unreachable, "
               f"empty or NaN result); holding {_fmt(held)}{raised}")
        entry = HistoryEntry(now, tuple(held.items()), None)
        return Decision(now, held, why, Reason.METRICS_UNAVAILABLE, None,
                        capacity(held, pools), hourly_cost(held, pools), None,
                        (*history, entry), season)
    # arrivals, checked against completions: a served rate above the arrival rate means the
    # arrival query is off (a pending gauge reset), and the served rate is a lower bound
    load = max(x for x in (arrival, served) if x is not None)
    p95 = observed.p95_ms if _valid(observed.p95_ms) else None
    breach = p95 is not None and p95 > slo
    if p95 is not None:
        slo_met: bool | None = p95 <= slo
    elif load == 0:
        slo_met = True  # no requests, none late
    else:
        slo_met = None
    parts = [f"load {load:.1f} req/s" + ("" if arrival is not None
                                         else " (served; no arrival rate)")
             + (f" ({observed.rate_note})" if observed.rate_note else "")]

    # a backlog (pending requests beyond what the load keeps in flight within the SLO, by
    # Little's law) grows while the load exceeds what the ready pods complete, until new pods
    # serve: what it will be then is drained within one interval after that
    backlog = 0.0
    horizon = settings.startup_seconds + target.interval_seconds
    if _valid(observed.pending):
        assert observed.pending is not None
        excess = max(0.0, observed.pending - load * slo / 1000.0)
        if excess > 0:
            growth = max(0.0, load - _saturation(ready, pools)) * horizon
            backlog = (excess + growth) / target.interval_seconds
            parts.append(f"backlog {excess:.0f} requests (+{growth:.0f} before new pods serve), "
                         f"+{backlog:.1f} req/s to drain it")

    if settings.seasonal:
        season = (season or Season()).observe(now, load)
    slope = _trend(history, now, load, settings.trend_window_seconds)
    lag = observed.window_seconds / 2 if _valid(observed.window_seconds) else 0.0
    demand = load + slope * (horizon + lag)
    if slope > 0:
        parts.append(f"rising {slope:.2f} req/s² -> {demand:.1f} req/s in {horizon:g}s"
                     + (f" (+{lag:g}s: the rate is a {2 * lag:g}s average)" if lag else ""))
    rise = season.rise(now, horizon) if settings.seasonal and season is not None else None
    if rise is not None and load * rise > demand:
        demand = load * rise
        parts.append(f"daily shape rises {rise:.2f}x within {horizon:g}s -> {demand:.1f} req/s")
    factor = 1.0
    if breach and arrival is None:
        # without the arrival rate the load is the served rate, capped by saturation: a p95
        # above the SLO that the curve does not explain says the load is higher than it shows
        assert p95 is not None
        if _predicted_p95_share(load, ready, pools) <= 1.0:
            factor = min(MAX_BREACH_FACTOR, p95 / slo)
            demand *= factor
    cv = _noise(history, now, load)
    headroom = min(MAX_HEADROOM, settings.noise_z * cv) if cv is not None else 0.0
    # the window remembers the need without the backlog: draining is a one-off
    steady_need = demand * (1 + headroom)
    demand += backlog
    need = demand * (1 + headroom)
    if p95 is not None:
        parts.append(f"p95 {p95:.0f} ms {'>' if breach else '<='} SLO {slo:g} ms"
                     + (f" although the curve predicts it met: x{factor:.2f}"
                        if factor > 1 else ""))
    else:
        parts.append("p95 unknown")
    parts.append(f"need {need:.1f} req/s ({headroom:.0%} noise headroom) with {q:.0%} of "
                 "requests within the SLO")

    # the pool the policy is in (or switching to): the one the previous decision chose
    last_choice = next((dict(h.replicas) for h in reversed(history) if h.rate is not None),
                       None)
    prefer = next((n for n, v in (last_choice or {}).items() if v > 0 and n in by_name), None)
    if prefer is None and any(current.values()):
        prefer = max(names, key=lambda n: (current[n] * by_name[n].capacity_rps, n))

    # scale-down stabilization: plan for no less than the most needed within the window, but
    # never grow because of it
    window = target.scale_down_stabilization_seconds
    recent = [h.demand for h in history
              if h.demand is not None and h.time >= now - window and h.rate is not None]
    plan = need
    held_by_window = False
    if recent and not breach:
        carried = _carry(current, pools, q)
        plan = max(need, min(max(recent), carried))
        held_by_window = plan > need + 1e-9
    fresh, feasible = cheapest_pool(plan, pools, target, q, prefer, settings.switch_margin,
                                    settings.room)
    new = next(n for n in names if fresh[n] > 0) if any(fresh.values()) else names[0]
    held_by_breach = False
    if breach and fresh[new] < current[new]:
        fresh[new] = current[new]
        held_by_breach = True
    final = dict(fresh)
    old = [n for n in names if n != new and current[n] > 0]
    switching = limited = False
    if old:
        if ready[new] * by_name[new].per_replica(q) + 1e-9 >= need:
            parts.append(f"{new} ready for the demand: {', '.join(old)} released")
        else:
            for n in old:
                final[n] = current[n]
            switching = True
            if not within_limits(final, pools, target):
                final = fit_limits(final, pools, target, prefer={n: current[n] for n in old})
                limited = True
            if final[new] == 0:
                # the limits leave no room to start the new pool beside the old one: stay (a
                # new pool that got some replicas keeps them: dropping replicas that are
                # starting or serving to start others of the old pool only loses capacity)
                stay = max(old, key=lambda n: (current[n] * by_name[n].capacity_rps, n))
                n_stay, ok = replicas_for(plan, by_name[stay], target,
                                          by_name[stay].per_replica(q))
                if breach:
                    n_stay = max(n_stay, current[stay])
                final = fit_limits({n: (n_stay if n == stay else 0) for n in names}, pools,
                                   target)
                fresh = dict(final)
                feasible = feasible and ok
                switching = False
                parts.append(f"no room within maxReplicas={target.max_replicas}/maxHourlyCost="
                             f"{target.max_hourly_cost} to start {new} beside {stay}: "
                             f"staying on {stay}")
            else:
                parts.append(f"switching to {new}: keeping {', '.join(old)} until {new}'s ready "
                             "replicas carry the demand")
    if not within_limits(final, pools, target):
        final = fit_limits(final, pools, target, prefer=fresh)
        limited = True

    cost = hourly_cost(final, pools)
    cap = capacity(final, pools)
    up = any(final[n] > current[n] for n in names)
    down = any(final[n] < current[n] for n in names)
    at_risk = breach or load > capacity(ready, pools)
    if up and down:
        up, down = cap + 1e-9 >= capacity(current, pools), cap + 1e-9 < capacity(current, pools)
    if not feasible or limited:
        code = Reason.LIMITED
    elif at_risk and up:
        code = Reason.SLO_AT_RISK
    elif up:
        code = Reason.SCALE_UP
    elif switching:
        code = Reason.SWITCHING
    elif down:
        code = Reason.SCALE_DOWN
    elif held_by_window or held_by_breach:
        code = Reason.STABILIZING
    else:
        code = Reason.STEADY
    parts.append(f"cheapest {_fmt(fresh)}" + ("" if feasible else
                 f" (cannot meet it within maxReplicas={target.max_replicas}, "
                 f"maxHourlyCost={target.max_hourly_cost})"))
    if held_by_window:
        parts.append(f"keeping what was needed within the {window:g}s scale-down "
                     "stabilization window")
    if held_by_breach:
        parts.append("no scale-down while p95 is above the SLO")
    parts.append(f"-> {_fmt(final)} (${cost:.2f}/h, {cap:.0f} req/s)")
    reason = f"{code.value}: " + "; ".join(parts)
    entry = HistoryEntry(now, tuple(fresh.items()), load, steady_need)
    return Decision(now, final, reason, code, demand, cap, cost, slo_met, (*history, entry),
                    season)


def with_time(decision: Decision, now: float) -> Decision:
    """A copy stamped with another time (for adapters that record when they applied it)."""
    return replace(decision, time=now)


# ------------------------------------------------------------------------------------------
# profile


MIN_CAPACITY_RPS = 1e-6
MAX_CAPACITY_RPS = 1e9
"""A replica's capacity at the SLO, in requests/s: anything outside is a broken profile (and
would overflow the replica arithmetic)."""


def pools_from_profile(profile: Mapping[str, Any], spec: Any) -> list[PoolCapacity]:
    """Pools with capacity from `leanserve profile` JSON, price from the spec, and the latency
    curve fitted to the profile's trials of its chosen config (capacity.curve_from_profile; the
    default shape when it has none).

    Every pool in spec.nodePools must appear in profile["pools"] with a positive capacity_rps;
    the message names the pool and what to do otherwise.
    """
    table = profile.get("pools") if isinstance(profile, Mapping) else None
    if not isinstance(table, Mapping):
        raise PolicyError('profile: missing "pools" object (run `leanserve profile REPO --spec '
                          'SPEC` to make one)')
    out = []
    curve = curve_from_profile(profile)
    for pool in spec.node_pools:
        entry = table.get(pool.name)
        if not isinstance(entry, Mapping):
            raise PolicyError(f"profile: no entry for node pool {pool.name!r} (profile has "
                              f"{sorted(table)}); re-run `leanserve profile` with this spec")
        cap = entry.get("capacity_rps")
        if not isinstance(cap, int | float) or isinstance(cap, bool) or not cap > 0 \
                or not math.isfinite(cap):
            raise PolicyError(f"profile: pools.{pool.name}.capacity_rps must be a positive "
                              f"number, got {cap!r}")
        if not MIN_CAPACITY_RPS <= cap <= MAX_CAPACITY_RPS:
            raise PolicyError(f"profile: pools.{pool.name}.capacity_rps {cap!r} is out of range "
                              f"(allowed: {MIN_CAPACITY_RPS:g} to {MAX_CAPACITY_RPS:g} requests/s "
                              "per replica)")
        out.append(PoolCapacity(pool.name, float(cap), float(pool.hourly_price), curve))
    return out
