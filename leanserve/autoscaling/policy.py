"""The autoscaling policy: observed load and latency -> replicas per node pool, priced.

Why a pure function: the operator (a kopf timer), the local platform and the simulator all call the
same ``decide`` with what they observed, the pools' capacities, the spec and the previous
``Decision``; every bit of memory the policy needs (the scale-down stabilization window, the rate
history for the trend) travels inside the Decision, never in globals or a clock read here. That is
what lets the simulator replay hours of traffic in milliseconds and the tests pin every branch.

What it does, in order:

1. No usable request rate (None, NaN, inf, negative: Prometheus down, empty result) -> hold the
   current replicas, SLOMet Unknown, reason MetricsUnavailable. Missing data is never zero load.
2. Demand = the observed rate, raised by its recent upward trend projected over the start-up
   time of a replica (new replicas serve only after they start, so scale for where load will be).
3. Required capacity = demand / target utilisation (or, with adaptive headroom, x 1 + the
   headroom the observed noise or the policy's own past forecast errors call for); when p95 is
   above the SLO the capacity estimate is evidently too optimistic, so at least
   ``breach_factor`` x the current capacity. With ``censored_saturation`` a rate observed during
   a breach is read as what it is, a lower bound set by saturated replicas: it is kept out of
   the trend and noise estimates and the breach factor applies to it as well. With
   ``jump_memory_seconds`` a saturated breach plans for the largest jump the load made recently
   instead, and ``burst_headroom`` keeps more headroom while a burst that came back is
   remembered.
4. The cheapest integer mix of replicas over the pools that provides it within minReplicas,
   maxReplicas and maxHourlyCost (a small exhaustive search; a tiny switching penalty keeps the
   current mix when another is only marginally cheaper, so the policy does not churn pools).
5. Scale up at once; scale down per pool only to the highest count desired over the last
   scaleDownStabilizationSeconds, never while p95 is above the SLO, and never below what keeps
   the ready capacity sufficient while new replicas of another pool are still starting.
6. Clamp to maxReplicas and maxHourlyCost last: limits win over everything.
"""

from __future__ import annotations

import collections
import enum
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

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


@dataclass(frozen=True)
class PoolCapacity:
    """One node pool as the policy sees it."""

    name: str
    capacity_rps: float
    """Requests/s one replica serves with p95 within the SLO (from `leanserve profile`)."""
    hourly_price: float
    """USD for one replica for one hour."""

    @property
    def price_per_rps(self) -> float:
        return self.hourly_price / self.capacity_rps if self.capacity_rps > 0 else math.inf


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
    """Knobs of the policy that are not in the spec; the defaults are what the bench measures."""

    target_utilisation: float = 0.9
    """Share of the capacity at the SLO to plan for; the rest absorbs noise between decisions."""
    breach_factor: float = 1.5
    """When p95 exceeds the SLO, scale to at least min(this, p95/SLO) x the ready capacity."""
    breach_min_factor: float = 1.1
    """... and at least this multiple, however small the overshoot."""
    startup_seconds: float = 30.0
    """How long a new replica takes to serve; the trend is projected this far (+1 interval)."""
    trend_window_seconds: float = 60.0
    """History used to estimate the load trend (least squares over the window)."""
    switch_penalty: float = 0.03
    """Cost of changing a replica, as a share of its hourly price, when ranking mixes."""
    stabilization_startups: float = 0.0
    """Scale down only to the most capacity desired within this many start-up times, when that
    is longer than scaleDownStabilizationSeconds: a replica given up takes a start-up to return,
    so releasing it on a shorter dip than that buys a violation for a few cents."""
    adaptive_headroom: bool = False
    """Size the headroom from the observed volatility instead of target_utilisation."""
    min_headroom: float = 0.05
    """Headroom above the planned load even on a perfectly steady rate."""
    volatility_z: float = 2.0
    """Headroom per unit of relative rate noise (std between observations / mean)."""
    max_headroom: float = 0.5
    volatility_window_seconds: float = 120.0
    censored_saturation: bool = False
    """Treat rates observed while p95 was above the SLO as censored: the replicas were
    saturated, so the served rate they report is a lower bound on the load, set by capacity.
    Such rates are left out of the trend and noise estimates (their rise while new replicas
    come up is capacity arriving, not load growing), and a breach scales to breach_factor x
    the observed rate as well as x the ready capacity."""
    forecast_headroom: bool = False
    """With adaptive_headroom: size the headroom from how wrong this policy's own forecasts were
    (the demand planned at t against the rate observed at t + start-up + interval, over the
    volatility window): mean + volatility_z x std of the relative errors. That one figure covers
    noise, trend error and ramps, instead of adding a noise term to a trend term."""
    trend_z: float = 0.0
    """Project only the part of the trend slope that stands this many standard errors above
    zero: on a noisy flat rate the least-squares slope is noise, and projecting its positive
    half over the start-up horizon buys headroom twice (the noise headroom already covers it)."""
    breach_on_measured_capacity: bool = False
    """Scale a breach from the capacity that produced the p95, not from today's ready capacity.
    The p95 (and the rate) describe the last interval; replicas that became ready since did not
    serve in it. Multiplying the *new* ready capacity by the overshoot of the *old* one
    compounds a breach that is already fixed: at the end of every burst the policy jumps to the
    budget's ceiling for a start-up. The capacity that produced it is the lower of the ready
    capacity now and at the previous decision."""
    jump_memory_seconds: float = 0.0
    """Remember the largest jump of the load seen over this long (0: off) and size a saturated
    breach by it. A saturated replica reports the rate it can serve, not the load: once p95 is
    beyond what ``breach_factor`` answers, the overshoot says nothing of how far the load went,
    and stepping up breach_factor at a time costs a whole start-up per step. The load's own
    recent history does say it: a jump is a rate over the lowest uncensored rate of the
    ``jump_span_seconds`` before it (a censored rate may be the top of a jump: it is a lower
    bound on the load, so the jump is too). When the largest jump remembered is at least
    breach_factor, a saturated breach plans for the last uncensored rate before it times that
    jump (at most ``max_jump_factor``), at the current headroom, instead of breach_factor x the
    censored rate: traffic that jumped 6x twenty minutes ago is better evidence of what a
    saturated breach hides now than a fixed factor, and on traffic whose jumps stay below the
    factor the fixed factor stays. The jump multiplies the rate it jumped from, not the ready
    capacity or the censored rate: those carry headroom and saturation, and multiplying them
    too overshoots every burst by that much times the jump."""
    jump_span_seconds: float = 120.0
    """How far back from a rate to look for the level it jumped from."""
    burst_headroom: float = 0.0
    """With forecast_headroom and jump_memory_seconds: the least headroom while a burst is
    remembered (0: off). A burst is a jump of at least ``burst_min_jump`` after which the load
    came back to within ``burst_return`` of where it jumped from. Load that bursts and returns
    will burst again, and the forecast errors the headroom is sized from cannot show it: they
    leave out the saturated intervals, and the rates they compare are averages over a metric
    window, smoother than the intervals the SLO is judged on. A level shift (a step that stays)
    is not a burst and buys no headroom."""
    burst_min_jump: float = 1.5
    """Smallest jump that counts as a burst (noise on a steady rate stays well below it)."""
    burst_return: float = 0.2
    """How close (relative) to the level it jumped from the load must come back."""
    hold_breach_seconds: float = 0.0
    """With censored_saturation and volatility headroom: for this long after a breach, the
    scale-down window holds the load the breach response planned for, not the censored rate
    (0: off). Otherwise the window forgets the breach the moment it ends, and the first rates
    after it (still averaged over saturated samples, a metric window behind) release the
    capacity that just ended it."""
    max_jump_factor: float = 8.0
    """The most a remembered jump may multiply a saturated breach's plan by."""


DEFAULT_SETTINGS = PolicySettings()
"""Spec-faithful: the scale-down window is exactly scaleDownStabilizationSeconds, fixed headroom."""

TUNED_SETTINGS = PolicySettings(
    stabilization_startups=2.0, adaptive_headroom=True, forecast_headroom=True, volatility_z=1.5,
    censored_saturation=True, trend_z=1.0, breach_factor=2.0, breach_on_measured_capacity=True,
    jump_memory_seconds=2700.0, hold_breach_seconds=30.0, burst_headroom=0.16)
"""What bench/autoscaling.py measures (the simulator's default), one object for every trace:
a scale-down window of at least two replica start-ups; headroom from the errors of the policy's
own forecasts over the start-up horizon (mean + 1.5 std: the window already holds the highest
recent demand, so the headroom need not cover the tail alone); only the part of the trend that
stands one standard error above noise projected; saturated observations treated as censored,
and a deep breach doubling (as HPA's default scale-up does) the capacity that produced it, or,
when the load jumped 2x or more within the last 45 minutes, planning for that jump at once; the
window holds a breach's plan for a start-up after it; and at least 16% headroom while a burst
that came back (load up 1.5x, then back within 20%) is remembered. Measured side by side by
bench/autoscaling.py; the start-up sensitivity table there shows what holds at other start-up
times. Opt-in for the operator and the local platform (their callers pass ``settings``), whose
tests and short local runs rely on the spec's own window and fixed headroom.

Tuned on bench/traces/ (seed offset 0) alone, so bench/autoscaling_seeds.py measures it on other
draws of the same four shapes (30 s start-up; issue 6). Offset 0 meets every pair no bound rules
out but diurnal's HPA pair (4/5); the development offsets 0, 200, 300, 400 meet 28/64 targets
and 10 of 18 feasible pairs, the held-out offsets 100, 500-900 38/96 and 12 of 25: what is
missed there is diurnal's oracle pair (99% at 1.14-1.16x oracle, knife-edge on either side),
diurnal's HPA pair (HPA attains 100%) and, on some draws, bursty's HPA pair. Each knob still
earns its place on the development offsets: switched off one at a time, jump memory (5/14
feasible pairs met), the breach hold (6/14), a one-start-up window (8/14), breach_factor 1.5
(8/14), burst_headroom (9/14) and scaling a breach from today's capacity (9/14) all lose pairs
(then 10/14; the bounds have since grown the feasible set to 18). Measured and not adopted
(none met more feasible pairs without losing one on offset 0): headroom as a quantile of the
forecast errors, planning from the level of the load instead of its last rate, adding the
per-interval noise read through the metric window, and releasing sooner on a significant
fall (see the issue-6 experiment commits in the history of this file)."""


@dataclass(frozen=True)
class Observation:
    """What a metric source saw at one moment; None (or NaN) means "no data", never zero."""

    time: float
    request_rate: float | None
    """Total requests/s over all pools."""
    p95_ms: float | None = None
    queue_ms: float | None = None
    ready: Mapping[str, int] | None = None
    """Ready replicas per pool (serving traffic)."""
    current: Mapping[str, int] | None = None
    """Replicas per pool as set on the platform (ready or starting)."""


@dataclass(frozen=True)
class HistoryEntry:
    """One past decision, as much as the stabilization window and the trend need."""

    time: float
    replicas: tuple[tuple[str, int], ...]
    rate: float | None
    demand: float | None = None
    """Load (req/s) the decision planned for, before headroom; None: unknown."""
    censored: bool = False
    """The rate was observed while p95 was above the SLO (a lower bound on the load)."""
    ready_capacity: float | None = None
    """Capacity at the SLO of the replicas ready when the decision was taken; None: unknown."""
    breach_demand: float | None = None
    """Load a breach response planned for (hold_breach_seconds); None: no breach or off."""

    def as_dict(self) -> dict[str, int]:
        return dict(self.replicas)


@dataclass(frozen=True)
class Decision:
    """The policy's answer; pass it back in as ``previous`` next time."""

    time: float
    replicas: dict[str, int]
    reason: str
    """One line explaining the decision (goes to status, events and report.json)."""
    code: Reason
    desired_rps: float | None
    """Load the decision planned for (observed rate plus trend), None without metrics."""
    capacity_rps: float
    """Capacity at the SLO of the chosen replicas."""
    hourly_cost: float
    slo_met: bool | None
    """Observed p95 within the SLO; None when unknown (SLOMet=Unknown)."""
    history: tuple[HistoryEntry, ...] = field(default=(), repr=False)

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


# ------------------------------------------------------------------------------------------
# cost model


def hourly_cost(replicas: Mapping[str, int], pools: Sequence[PoolCapacity]) -> float:
    """USD per hour of a replica mix: sum of replicas x price."""
    return sum(replicas.get(p.name, 0) * p.hourly_price for p in pools)


def capacity(replicas: Mapping[str, int], pools: Sequence[PoolCapacity]) -> float:
    """Requests/s a replica mix serves within the SLO (capacity-proportional routing)."""
    return sum(replicas.get(p.name, 0) * p.capacity_rps for p in pools)


def _fmt(mix: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in mix.items()) or "none"


def cheapest_mix(required_rps: float, pools: Sequence[PoolCapacity], target: Target,
                 current: Mapping[str, int] | None = None,
                 switch_penalty: float = 0.0,
                 lower: Mapping[str, int] | None = None) -> tuple[dict[str, int], bool]:
    """The lowest-cost integer mix with capacity >= required_rps within the target's limits.

    Returns (mix, feasible). When nothing within maxReplicas and the budget is enough, the mix
    with the most capacity within them (feasible=False). Exhaustive over counts bounded by what
    could possibly help, which is small for the handful of pools a spec names. ``lower`` gives
    per-pool floors (replicas kept by the stabilization window: top up, do not swap).
    """
    if not pools:
        raise PolicyError("no node pools to scale: spec.nodePools is empty")
    current = current or {}
    lower = lower or {}
    need = max(0.0, required_rps)
    bounds = []
    for p in pools:
        ratio = need / p.capacity_rps if p.capacity_rps > 0 else 0.0
        # more than maxReplicas is as good as infinite here (and an overflowing ratio must not
        # raise: a rate of 1e308 from Prometheus is odd, not fatal)
        by_need = math.ceil(ratio - 1e-9) if ratio <= target.max_replicas else \
            target.max_replicas + 1
        by_price = target.affordable(p)
        hi = min(target.max_replicas, by_price, max(by_need, target.min_replicas))
        lo = max(0, int(lower.get(p.name, 0)))
        bounds.append(range(lo, max(hi, lo) + 1))
    best: tuple[float, ...] | None = None
    best_mix: tuple[int, ...] = ()
    fallback: tuple[float, ...] | None = None
    fallback_mix: tuple[int, ...] = ()
    for counts in itertools.product(*bounds):
        total = sum(counts)
        if total > target.max_replicas or total < target.min_replicas:
            continue
        cost = sum(n * p.hourly_price for n, p in zip(counts, pools, strict=True))
        if cost > target.budget + 1e-9:
            continue
        cap = sum(n * p.capacity_rps for n, p in zip(counts, pools, strict=True))
        churn = sum(abs(n - current.get(p.name, 0)) * p.hourly_price
                    for n, p in zip(counts, pools, strict=True))
        if cap + 1e-9 >= need:
            key = (cost + switch_penalty * churn, -cap, total)
            if best is None or key < best:
                best, best_mix = key, counts
        else:
            key = (-cap, cost, total)
            if fallback is None or key < fallback:
                fallback, fallback_mix = key, counts
    if best is not None:
        return {p.name: n for p, n in zip(pools, best_mix, strict=True)}, True
    if fallback is None:
        # minReplicas cannot be afforded at all: the cheapest pool, as many as the budget allows
        cheapest = min(pools, key=lambda p: p.hourly_price)
        n = min(target.max_replicas, target.affordable(cheapest))
        return {p.name: (n if p is cheapest else 0) for p in pools}, False
    return {p.name: n for p, n in zip(pools, fallback_mix, strict=True)}, False


def fit_limits(mix: Mapping[str, int], pools: Sequence[PoolCapacity], target: Target,
               prefer: Mapping[str, int] | None = None) -> dict[str, int]:
    """Trim a mix until it is within maxReplicas and the budget.

    Removes first replicas above ``prefer`` (the fresh desire), the least cost-efficient pool
    first, so what is trimmed is what stabilization or make-before-break added.
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


# ------------------------------------------------------------------------------------------
# the decision


def _valid(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x >= 0


def _usable(h: HistoryEntry, settings: PolicySettings) -> bool:
    return h.rate is not None and not (settings.censored_saturation and h.censored)


def _fit(history: Sequence[HistoryEntry], now: float, rate: float, window: float,
         settings: PolicySettings) -> tuple[float, float, float] | None:
    """(slope, its standard error, mean rate) by least squares over the window; None: < 3 points."""
    pts = [(h.time, h.rate) for h in history
           if _usable(h, settings) and now - window <= h.time < now]
    pts.append((now, rate))
    n = len(pts)
    if n < 3:
        return None
    mt = sum(t for t, _ in pts) / n
    mr = sum(r for _, r in pts) / n
    var = sum((t - mt) ** 2 for t, _ in pts)
    if var <= 0:
        return None
    slope = sum((t - mt) * (r - mr) for t, r in pts) / var
    res = sum((r - mr - slope * (t - mt)) ** 2 for t, r in pts) / (n - 2)
    return slope, math.sqrt(res / var), mr


def _trend(history: Sequence[HistoryEntry], now: float, rate: float, window: float,
           settings: PolicySettings = DEFAULT_SETTINGS) -> float:
    """Least-squares slope (req/s per s) of the rate over the window, 0 with too few points.

    With ``trend_z`` the slope is shrunk by that many standard errors (never below 0).
    """
    fit = _fit(history, now, rate, window, settings)
    if fit is None or rate < fit[2]:
        return 0.0  # not rising now: a past rise is no reason to provision ahead
    slope, se, _ = fit
    if settings.trend_z > 0:
        slope = max(0.0, slope - settings.trend_z * se)
    return slope


def _jumps(history: Sequence[HistoryEntry], now: float,
           settings: PolicySettings) -> tuple[float, float]:
    """(largest jump, largest burst) over the jump memory; 1.0 where none was seen.

    A jump is a rate (censored or not: either is a lower bound on the load) over the lowest
    uncensored rate of the jump span before it (a sliding-window minimum keeps that linear in
    the history). A burst is a jump of at least
    ``burst_min_jump`` after which the rate came back to within ``burst_return`` of the level it
    jumped from: the load went up and returned, rather than moving to a new level.
    """
    start = now - settings.jump_memory_seconds
    span = settings.jump_span_seconds
    # every rate is a lower bound on the load (a censored one strictly), so any may be the top
    # of a jump; only uncensored rates may be the level it jumped from
    seen = [(h.time, h.rate, _usable(h, settings)) for h in history
            if h.rate is not None and start - span <= h.time]
    best = 1.0
    rises: list[tuple[int, float, float]] = []  # (index, level jumped from, ratio)
    window: collections.deque[tuple[float, float]] = collections.deque()  # rising minima
    for i, (t, r, exact) in enumerate(seen):
        while window and window[0][0] < t - span:
            window.popleft()
        if t >= start and window and window[0][1] > 0:
            ratio = r / window[0][1]
            best = max(best, ratio)
            if ratio >= settings.burst_min_jump:
                rises.append((i, window[0][1], ratio))
        if exact:
            while window and window[-1][1] >= r:
                window.pop()
            window.append((t, r))
    burst = 1.0
    tol = 1.0 + settings.burst_return
    for i, level, ratio in sorted(rises, key=lambda x: -x[2]):
        if ratio <= burst:
            break
        j = i + 1
        while j < len(seen) and not (seen[j][2] and level / tol <= seen[j][1] <= level * tol):
            j += 1
        if j < len(seen):
            burst = ratio
    return best, burst


def _forecast_utilisation(history: Sequence[HistoryEntry], now: float, rate: float | None,
                          settings: PolicySettings, horizon: float) -> tuple[float, float | None]:
    """Utilisation from the relative errors of past forecasts over the start-up horizon.

    Censored rates (seen during a breach) are left out on both ends: a forecast made while
    saturated was of a capped rate, and an error against a capped rate is only a lower bound.
    (Counting the latter anyway was measured: every saturation episode then inflates the
    headroom for a whole window, +5-7% cost on the bursty, spike and step traces for no gain.)
    """
    seen = [(h.time, h.rate) for h in history if _usable(h, settings)]
    if rate is not None:
        seen.append((now, rate))
    errs = []
    tol = horizon * 0.1 + 1e-9
    j = 0
    for h in history:
        if (h.demand is None or h.demand <= 0 or not _usable(h, settings)
                or h.time < now - settings.volatility_window_seconds):
            continue
        want = h.time + horizon
        while j + 1 < len(seen) and seen[j + 1][0] <= want + tol:
            j += 1
        t_seen, r_seen = seen[j]
        if abs(t_seen - want) <= tol:
            errs.append((r_seen - h.demand) / h.demand)
    if len(errs) < 4:
        return settings.target_utilisation, None
    mean = sum(errs) / len(errs)
    sd = math.sqrt(sum((e - mean) ** 2 for e in errs) / (len(errs) - 1))
    floor = settings.min_headroom
    if settings.burst_headroom > 0 and settings.jump_memory_seconds > 0 \
            and _jumps(history, now, settings)[1] > 1.0:
        floor = max(floor, settings.burst_headroom)
    headroom = min(settings.max_headroom, max(floor, mean + settings.volatility_z * sd))
    return 1.0 / (1.0 + headroom), sd


def _utilisation(history: Sequence[HistoryEntry], now: float, rate: float,
                 settings: PolicySettings, horizon: float = 0.0,
                 censored_now: bool = False) -> tuple[float, float | None]:
    """Target utilisation from the observed volatility: (utilisation, relative noise or None).

    Noise = std of successive rate differences / sqrt(2) (insensitive to a steady trend) over
    the mean rate in the window; headroom = min_headroom + volatility_z x noise, capped. Too
    little history: the fixed target_utilisation.
    """
    if not settings.adaptive_headroom:
        return settings.target_utilisation, None
    if settings.forecast_headroom:
        # the rate now, when censored, is left out like every other censored rate (counting it
        # inflated the headroom of the very breach response that is sized from it)
        return _forecast_utilisation(history, now, None if censored_now else rate,
                                     settings, horizon)
    rs = [h.rate for h in history if _usable(h, settings)
          and now - settings.volatility_window_seconds <= h.time < now]
    rs.append(rate)
    mean = sum(rs) / len(rs)
    if len(rs) < 4 or mean <= 0:
        return settings.target_utilisation, None
    diffs = [b - a for a, b in itertools.pairwise(rs)]
    md = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - md) ** 2 for d in diffs) / (len(diffs) - 1)) / math.sqrt(2)
    cv = sd / mean
    headroom = min(settings.max_headroom, settings.min_headroom + settings.volatility_z * cv)
    return 1.0 / (1.0 + headroom), cv


def _held_demand(h: HistoryEntry, now: float, settings: PolicySettings) -> float:
    """The load a past entry holds in the scale-down window (see hold_breach_seconds)."""
    assert h.demand is not None
    if h.breach_demand is not None and now - h.time <= settings.hold_breach_seconds:
        return max(h.demand, h.breach_demand)
    return h.demand


def _prune(history: Sequence[HistoryEntry], now: float, keep: float) -> tuple[HistoryEntry, ...]:
    return tuple(h for h in history if now - keep <= h.time <= now)


def decide(observed: Observation, pools: Sequence[PoolCapacity], spec: Any,
           previous: Decision | None, now: float,
           settings: PolicySettings = DEFAULT_SETTINGS) -> Decision:
    """Replicas per pool for this moment; pure (no clock, no I/O). See the module docstring."""
    target = Target.from_spec(spec)
    names = [p.name for p in pools]
    if not pools:
        raise PolicyError("no node pools to scale: spec.nodePools is empty")
    known = observed.current if observed.current is not None else (
        previous.replicas if previous is not None else None)
    history = previous.history if previous is not None else ()
    keep = max(target.scale_down_stabilization_seconds, settings.trend_window_seconds,
               settings.stabilization_startups * settings.startup_seconds,
               settings.volatility_window_seconds,
               settings.jump_memory_seconds + settings.jump_span_seconds)
    history = _prune(history, now, keep)

    if known is None:
        current = cheapest_mix(0.0, pools, target)[0]
    else:
        current = {n: int(known.get(n, 0)) for n in names}
    ready = ({n: int(observed.ready.get(n, 0)) for n in names}
             if observed.ready is not None else dict(current))
    slo = target.latency_p95_ms

    rate = observed.request_rate
    if not _valid(rate):
        held = fit_limits(current, pools, target, prefer=current)
        why = (f"{Reason.METRICS_UNAVAILABLE.value}: no request rate (Prometheus unreachable, "
               f"empty or NaN result); holding {_fmt(held)}")
        entry = HistoryEntry(now, tuple(held.items()), None)
        return Decision(now, held, why, Reason.METRICS_UNAVAILABLE, None,
                        capacity(held, pools), hourly_cost(held, pools), None,
                        (*history, entry))
    assert rate is not None
    p95 = observed.p95_ms if _valid(observed.p95_ms) else None
    breach = p95 is not None and p95 > slo
    ready_cap = capacity(ready, pools)
    if p95 is not None:
        slo_met: bool | None = p95 <= slo
    elif rate == 0:
        slo_met = True  # no requests, none late
    else:
        slo_met = None

    if settings.censored_saturation and breach:
        slope = 0.0  # a censored rate says nothing of the trend; the breach rule sizes this
    else:
        slope = _trend(history, now, rate, settings.trend_window_seconds, settings)
    horizon = settings.startup_seconds + target.interval_seconds
    demand = rate + max(0.0, slope) * horizon
    util, cv = _utilisation(history, now, rate, settings, horizon,
                            settings.censored_saturation and breach)
    required = demand / util
    factor = 1.0
    jump_note = ""
    if breach:
        # the ready replicas produced that p95: their capacity is evidently too small; step up
        # in proportion to the overshoot (p95 grows steeply near saturation), at least
        # breach_min_factor, at most breach_factor; replicas already starting count toward it,
        # so a breach that lasts a start-up does not compound every interval
        assert p95 is not None
        factor = min(settings.breach_factor, max(settings.breach_min_factor, p95 / slo))
        jump_need = 0.0
        if settings.jump_memory_seconds > 0 and p95 / slo >= settings.breach_factor:
            jump = min(settings.max_jump_factor, _jumps(history, now, settings)[0])
            level = next((h.rate for h in reversed(history)
                          if h.rate is not None and _usable(h, settings)), None)
            if level is not None and jump >= settings.breach_factor:
                jump_need = level * jump / util
                jump_note = (f"; saturated: load jumped up to {jump:.1f}x within "
                             f"{settings.jump_memory_seconds:g}s, planning {level * jump:.0f} "
                             f"req/s from {level:.0f}")
        base_cap = ready_cap
        if settings.breach_on_measured_capacity and history \
                and history[-1].ready_capacity is not None:
            base_cap = min(ready_cap, history[-1].ready_capacity)
        required = max(required, base_cap * factor)
        if settings.censored_saturation and jump_need <= 0:
            required = max(required, rate * factor)
        required = max(required, jump_need)
    at_risk = breach or rate > ready_cap

    # scale-down stabilization on capacity (HPA's rule, per capacity instead of per pool): plan
    # for no less than the highest capacity desired within the window, but never grow because
    # of it; which pools provide it is then the cheapest mix again, so a shrinking load
    # releases the expensive replicas first and the mix does not ratchet into many small ones
    window = max(target.scale_down_stabilization_seconds,
                 settings.stabilization_startups * settings.startup_seconds)
    window_start = now - window
    # with volatility headroom, the window holds the highest *demand* seen in it at today's
    # headroom, not the capacities desired then: those carry each moment's own headroom, and
    # their maximum picks whichever moment's noise estimate was highest (noise counted twice)
    # (entries without a demand, e.g. restored from an older status, count as their mix)
    recent = [_held_demand(h, now, settings) / util
              if cv is not None and h.demand is not None
              else capacity(h.as_dict(), pools)
              for h in history if h.time >= window_start and h.rate is not None]
    plan = required
    if recent and not breach:
        plan = max(required, min(max(recent), capacity(current, pools)))
    fresh, feasible = cheapest_mix(required, pools, target, current, settings.switch_penalty)
    if plan > required + 1e-9:
        final, ok = cheapest_mix(plan, pools, target, current, settings.switch_penalty)
        if not ok:
            final = dict(fresh)
    else:
        final = dict(fresh)
    held_by_window = capacity(final, pools) > capacity(fresh, pools) + 1e-9
    held_by_breach = False
    if breach:
        for n in names:
            if final[n] < current[n]:
                final[n] = current[n]
                held_by_breach = True
    # make-before-break: keep shrinking pools until the new replicas are ready
    held_for_ready = False
    ready_after = sum(min(final[p.name], ready[p.name]) * p.capacity_rps for p in pools)
    # (against the need with headroom, not the bare demand: a swap that drops the ready
    # capacity to exactly the load leaves no room for noise for a whole start-up)
    if ready_after + 1e-9 < required and any(final[n] < current[n] for n in names):
        for n in names:
            if final[n] < current[n]:
                final[n] = current[n]
                held_for_ready = True
    over = (sum(final.values()) > target.max_replicas
            or hourly_cost(final, pools) > target.budget + 1e-9)
    limited = False
    within_now = (sum(current.values()) <= target.max_replicas
                  and hourly_cost(current, pools) <= target.budget + 1e-9)
    if over and breach and within_now:
        # p95 above the SLO: never remove a serving replica (a pool swap loses its capacity for
        # a whole start-up), add what the limits still allow, and say the limits bind
        final = cheapest_mix(required, pools, target, current, settings.switch_penalty,
                             lower=current)[0]
        limited = True
    elif over:
        # limits bind during a transition: drop the replicas not started yet before ready ones,
        # unless what is ready cannot carry the load anyway (then swap, the only way forward)
        keep_old = fit_limits(final, pools, target,
                              prefer={n: min(final[n], current[n]) for n in names})
        kept_ready = sum(min(keep_old[p.name], ready[p.name]) * p.capacity_rps for p in pools)
        final = keep_old if kept_ready + 1e-9 >= demand and not breach else fit_limits(
            final, pools, target, prefer=fresh)

    cost = hourly_cost(final, pools)
    cap = capacity(final, pools)
    up = any(final[n] > current[n] for n in names)
    down = any(final[n] < current[n] for n in names)
    if up and down:
        # a pool swap: name it by what it does to capacity (a swap to fewer, cheaper replicas
        # at falling load is a scale-down, not "ScaleUp: load 0 req/s")
        cur_cap = capacity(current, pools)
        up, down = cap + 1e-9 >= cur_cap, cap + 1e-9 < cur_cap
    if not feasible or limited:
        code = Reason.LIMITED
    elif at_risk and up:
        code = Reason.SLO_AT_RISK
    elif up:
        code = Reason.SCALE_UP
    elif down:
        code = Reason.SCALE_DOWN
    elif held_by_window or held_by_breach or held_for_ready:
        code = Reason.STABILIZING
    else:
        code = Reason.STEADY
    parts = [f"load {rate:.1f} req/s"]
    if slope > 0:
        parts.append(f"rising {slope:.2f} req/s² -> plan {demand:.1f} req/s")
    if p95 is not None:
        parts.append(f"p95 {p95:.0f} ms {'>' if breach else '<='} SLO {slo:g} ms")
    else:
        parts.append("p95 unknown")
    parts.append(f"need {required:.1f} req/s at {util:.0%} utilisation"
                 + ("" if cv is None else f" (rate noise {cv:.1%})")
                 + (f" (p95 breach: >= {factor:.2g}x ready capacity{jump_note})"
                    if breach else ""))
    parts.append(f"cheapest {_fmt(fresh)}" + ("" if feasible else
                 f" (cannot meet it within maxReplicas={target.max_replicas}, "
                 f"maxHourlyCost={target.max_hourly_cost})"))
    if held_by_window:
        parts.append(f"keeping replicas desired within the "
                     f"{window:g}s scale-down stabilization "
                     "window")
    if held_by_breach:
        parts.append("no scale-down while p95 is above the SLO")
    if held_for_ready:
        parts.append("keeping old replicas until new ones are ready")
    if limited:
        parts.append(f"p95 above the SLO and maxReplicas={target.max_replicas}/maxHourlyCost="
                     f"{target.max_hourly_cost} leave no room to swap pools: keeping every "
                     "replica, adding what fits")
    parts.append(f"-> {_fmt(final)} (${cost:.2f}/h, {cap:.0f} req/s)")
    reason = f"{code.value}: " + "; ".join(parts)
    planned = None
    if breach and settings.hold_breach_seconds > 0 and settings.censored_saturation:
        planned = max(demand, required * util)
    entry = HistoryEntry(now, tuple(fresh.items()), rate, demand, breach, ready_cap, planned)
    return Decision(now, final, reason, code, demand, cap, cost, slo_met, (*history, entry))


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
    """Pools with capacity from `leanserve profile` JSON and price from the spec.

    Every pool in spec.nodePools must appear in profile["pools"] with a positive capacity_rps;
    the message names the pool and what to do otherwise.
    """
    table = profile.get("pools") if isinstance(profile, Mapping) else None
    if not isinstance(table, Mapping):
        raise PolicyError('profile: missing "pools" object (run `leanserve profile REPO --spec '
                          'SPEC` to make one)')
    out = []
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
        out.append(PoolCapacity(pool.name, float(cap), float(pool.hourly_price)))
    return out
