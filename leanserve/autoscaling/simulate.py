"""Replay a request-rate trace against leanserve's policy, three baselines and an oracle.

Why: an autoscaler's worth is cost at a given SLO attainment over realistic load, and that needs
the same load replayed against every contender with the same physics. The physics here:

- Time advances in ticks of spec.autoscaling.intervalSeconds; the trace (``time_s,
  requests_per_s``) is held constant between its points.
- Replicas per pool live on an ``InMemoryPlatform``: a new replica serves ``startup_seconds``
  after it is asked for (default 30 s); removed replicas stop costing at once.
- Routing is capacity-proportional (least-outstanding-requests balancing does this in practice),
  so a mix of pools serves the sum of its replicas' capacities.
- Latency model (utilisation-based, M/M/1-like per replica): with u = load / capacity-at-SLO of
  the ready replicas, the replicas' own utilisation is rho = u (1 - a) and the modelled
  p95 = a SLO / (1 - rho) (capped at 10x SLO), a = ``base_latency_share`` (0.3: p95 at no load is
  30% of the SLO). So p95 <= SLO exactly when load <= capacity at SLO, the definition of
  capacity_rps in the profile; an interval meets the SLO iff that holds (no load always meets it).
- What autoscalers see is late: the request rate averaged over the last ``metrics_window_seconds``
  of *served* requests (an overloaded replica completes at most its saturation rate), the p95 of
  the last interval: what rate(...[window]) and Triton's summary give through Prometheus.

Contenders (each starts warm, sized for the first observation):
- leanserve: ``policy.decide`` every intervalSeconds over all pools.
- static: the cheapest mix for the trace's peak at the policy's target utilisation, all the time.
- hpa: the Kubernetes HPA algorithm on one pool, the one with the lowest price per request/s (the
  pool an HPA user who profiled would pick; any other pool only costs the HPA more). Target 70%
  utilisation where 100% is the replica's capacity at the SLO (generous: CPU utilisation would put
  70% near saturation), 10% tolerance, sync every 15 s, not-ready pods counted at 0% on scale-up,
  scale-up limited to max(4 pods, +100%) per 15 s, scale-down to the highest recommendation over
  300 s. maxReplicas is what the budget affords on that pool.
- keda: KEDA's Prometheus scaler on the same pool: threshold = 80% of a replica's capacity, the
  external metric through the same HPA (AverageValue: ceil(rate / threshold), 10% tolerance,
  300 s scale-down window), polled every 30 s; scale to zero only after a 300 s cooldown.
- oracle: knows each interval's load and pays for no start-up: the cheapest mix whose capacity at
  the SLO covers it exactly. A lower bound on cost, not a policy anyone can run.
"""

from __future__ import annotations

import bisect
import csv
import itertools
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leanserve.api.spec import MAX_REPLICA_MIXES
from leanserve.autoscaling.errors import TraceError
from leanserve.autoscaling.platform import InMemoryPlatform
from leanserve.autoscaling.policy import (
    MAX_CAPACITY_RPS,
    MIN_CAPACITY_RPS,
    TUNED_SETTINGS,
    Decision,
    Observation,
    PolicySettings,
    PoolCapacity,
    Target,
    capacity,
    cheapest_mix,
    decide,
    hourly_cost,
)

POLICIES = ("leanserve", "static", "hpa", "keda", "oracle")
MODEL = "sim"

MAX_TICKS = 50_000
"""At most this many intervals per contender (about a minute of work for all of them): a trace
with a huge time gap would otherwise replay for hours. A week at 15 s intervals fits."""
MAX_MIXES = MAX_REPLICA_MIXES
"""At most this many replica mixes for the bounds' price table (every mix within maxReplicas and
the budget is enumerated once; more pools and replicas grow it as a product); a valid spec never
has more."""
MAX_RATE = 1e9
"""Requests/s a trace may name (far above any real service; beyond it the arithmetic is not
meaningful)."""


@dataclass(frozen=True)
class Trace:
    """A load trace: times (s, increasing) and rates (requests/s, >= 0)."""

    times: tuple[float, ...]
    rates: tuple[float, ...]

    def at(self, t: float) -> float:
        """Rate at time t: the last point at or before t (held constant)."""
        lo, hi = 0, len(self.times) - 1
        if t <= self.times[0]:
            return self.rates[0]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.times[mid] <= t:
                lo = mid
            else:
                hi = mid - 1
        return self.rates[lo]

    @property
    def duration(self) -> float:
        step = self.times[1] - self.times[0] if len(self.times) > 1 else 1.0
        return self.times[-1] - self.times[0] + step


def load_trace(path: Path) -> Trace:
    """Read ``time_s,requests_per_s`` CSV; TraceError with the line and the fix otherwise."""
    if not path.is_file():
        raise TraceError(f"trace {path}: no such file (expected CSV with header "
                         "time_s,requests_per_s)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"trace {path}: cannot read ({exc})") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows or [c.strip() for c in rows[0]] != ["time_s", "requests_per_s"]:
        got = ",".join(rows[0]) if rows else "an empty file"
        raise TraceError(f"trace {path}: header must be 'time_s,requests_per_s', got {got!r}")
    times: list[float] = []
    rates: list[float] = []
    for i, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2:
            raise TraceError(f"trace {path}:{i}: expected 2 columns, got {len(row)}")
        try:
            t, r = float(row[0]), float(row[1])
        except ValueError:
            raise TraceError(f"trace {path}:{i}: not numbers: {','.join(row)!r}") from None
        if not (math.isfinite(t) and math.isfinite(r)):
            raise TraceError(f"trace {path}:{i}: time and rate must be finite")
        if r < 0:
            raise TraceError(f"trace {path}:{i}: requests_per_s must be >= 0, got {r:g}")
        if r > MAX_RATE:
            raise TraceError(f"trace {path}:{i}: requests_per_s must be <= {MAX_RATE:g}, "
                             f"got {r:g}")
        if times and t <= times[-1]:
            raise TraceError(f"trace {path}:{i}: time_s must increase ({t:g} after "
                             f"{times[-1]:g})")
        times.append(t)
        rates.append(r)
    if not times:
        raise TraceError(f"trace {path}: no data rows after the header")
    return Trace(tuple(times), tuple(rates))


@dataclass(frozen=True)
class SimConfig:
    """The simulator's physics and the baselines' settings (see the module docstring)."""

    startup_seconds: float = 30.0
    """Seconds from asking for a replica until it serves."""
    metrics_window_seconds: float = 15.0
    """The rate every autoscaler sees is averaged over this much past."""
    base_latency_share: float = 0.3
    """p95 at no load, as a share of the SLO (the latency model's a)."""
    hpa_target: float = 0.7
    hpa_tolerance: float = 0.1
    hpa_sync_seconds: float = 15.0
    hpa_scale_down_window_seconds: float = 300.0
    keda_threshold_share: float = 0.8
    keda_polling_seconds: float = 30.0
    keda_cooldown_seconds: float = 300.0
    settings: PolicySettings = field(default_factory=lambda: TUNED_SETTINGS)
    """leanserve's policy settings (its startup_seconds is set to this config's)."""


def modelled_p95(load: float, cap: float, slo_ms: float, a: float) -> float:
    """p95 (ms) of ``load`` on replicas with capacity-at-SLO ``cap`` (see module docstring)."""
    if load <= 0:
        return a * slo_ms
    if cap <= 0:
        return 10 * slo_ms
    rho = load / cap * (1 - a)
    if rho >= 1:
        return 10 * slo_ms
    return min(10 * slo_ms, a * slo_ms / (1 - rho))


@dataclass
class PolicyRun:
    """One contender's time series and totals."""

    name: str
    times: list[float] = field(default_factory=list)
    replicas: list[dict[str, int]] = field(default_factory=list)
    capacity: list[float] = field(default_factory=list)
    met: list[bool] = field(default_factory=list)
    p95: list[float] = field(default_factory=list)
    cost_cum: list[float] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    cost: float = 0.0
    replica_minutes: float = 0.0
    note: str = ""

    def summary(self) -> dict[str, Any]:
        n = len(self.met)
        return {
            "cost": round(self.cost, 6),
            "slo_attainment": (sum(self.met) / n) if n else 1.0,
            "replica_minutes": round(self.replica_minutes, 3),
            "intervals": n,
            "violations": n - sum(self.met),
            "max_replicas": max((sum(r.values()) for r in self.replicas), default=0),
            "note": self.note,
        }


# A controller sees (time, observed served rate, observed p95, ready, current) and answers
# replicas per pool, or None for "no action this tick".
Controller = Callable[[Observation], dict[str, int] | None]


def _hpa_pool(pools: Sequence[PoolCapacity]) -> PoolCapacity:
    return min(pools, key=lambda p: (p.price_per_rps, p.hourly_price))


class HPAController:
    """The Kubernetes HPA algorithm (replica calculator + default behaviour) on one pool."""

    def __init__(self, pool: PoolCapacity, per_pod_target_rps: float, min_r: int, max_r: int,
                 cfg: SimConfig, *, pods_metric: bool, period: float,
                 down_window: float) -> None:
        self.pool, self.target = pool, per_pod_target_rps
        self.min_r, self.max_r, self.cfg = max(1, min_r), max_r, cfg
        self.pods_metric, self.period, self.down_window = pods_metric, period, down_window
        self.recs: list[tuple[float, int]] = []
        self.last = -math.inf

    def __call__(self, obs: Observation) -> dict[str, int] | None:
        if obs.time - self.last < self.period - 1e-9:
            return None
        self.last = obs.time
        assert obs.current is not None and obs.ready is not None
        cur = obs.current.get(self.pool.name, 0)
        ready = obs.ready.get(self.pool.name, 0)
        rate = obs.request_rate or 0.0
        tol = self.cfg.hpa_tolerance
        if cur == 0:
            desired = self.min_r
        elif self.pods_metric:
            # utilisation averaged over ready pods; not-ready pods count as 0% on scale-up
            ratio = rate / (max(ready, 1) * self.target) if ready else math.inf
            if abs(ratio - 1) <= tol:
                desired = cur
            elif ratio > 1 and ready < cur:
                ratio2 = rate / (cur * self.target)
                desired = cur if ratio2 <= 1 + tol else math.ceil(ratio2 * cur)
            else:
                desired = math.ceil(ratio * ready)
        else:
            # external metric, AverageValue target: ceil(metric / target), with tolerance
            ratio = rate / (cur * self.target)
            desired = cur if abs(ratio - 1) <= tol else math.ceil(rate / self.target)
        desired = max(self.min_r, min(self.max_r, desired))
        self.recs = [(t, d) for t, d in self.recs if obs.time - t < self.down_window]
        self.recs.append((obs.time, desired))
        if desired < cur:
            desired = min(cur, max(d for _, d in self.recs))
        # default scale-up policy: max(4 pods, 100%) per 15 s
        desired = min(desired, max(cur + 4, 2 * cur))
        return {self.pool.name: desired}


class LeanserveController:
    """policy.decide on the platform's observation, keeping the previous Decision."""

    def __init__(self, pools: Sequence[PoolCapacity], target: Target,
                 settings: PolicySettings) -> None:
        self.pools, self.target, self.settings = list(pools), target, settings
        self.previous: Decision | None = None
        self.decisions: list[Decision] = []
        self.last = -math.inf

    def __call__(self, obs: Observation) -> dict[str, int] | None:
        if obs.time - self.last < self.target.interval_seconds - 1e-9:
            return None
        self.last = obs.time
        d = decide(obs, self.pools, self.target, self.previous, obs.time, self.settings)
        self.previous = d
        self.decisions.append(d)
        return d.replicas


def _simulate(name: str, trace: Trace, pools: Sequence[PoolCapacity], target: Target,
              cfg: SimConfig, controller: Controller | None,
              fixed: Callable[[float, float], dict[str, int]] | None = None) -> PolicyRun:
    """Run one contender; either a controller with start-up delays or a fixed/oracle schedule."""
    dt = target.interval_seconds
    t0 = trace.times[0]
    n_ticks = ticks(trace, target)
    now = [t0]
    plat = InMemoryPlatform([p.name for p in pools], clock=lambda: now[0],
                            startup_seconds=cfg.startup_seconds)
    run = PolicyRun(name)
    slo = target.latency_p95_ms
    a = cfg.base_latency_share
    served_hist: list[float] = []
    last_p95: float | None = None
    window_ticks = max(1, round(cfg.metrics_window_seconds / dt))
    first = trace.at(t0)
    if controller is not None:
        warm = cheapest_mix(first / cfg.settings.target_utilisation, pools, target)[0]
        if isinstance(controller, HPAController):
            pool = controller.pool
            n = math.ceil(first / controller.target - 1e-9)
            warm = {p.name: 0 for p in pools}
            warm[pool.name] = max(controller.min_r, min(controller.max_r, n))
        plat.set_ready(MODEL, warm)
    for i in range(n_ticks):
        t = t0 + i * dt
        now[0] = t
        load = trace.at(t)
        if fixed is not None:
            plat.set_ready(MODEL, fixed(t, load))
        else:
            assert controller is not None
            if served_hist:
                rate: float | None = sum(served_hist[-window_ticks:]) / len(
                    served_hist[-window_ticks:])
            else:
                rate = first
            obs = Observation(t, rate, last_p95, None, plat.ready_replicas(MODEL),
                              plat.current_replicas(MODEL))
            want = controller(obs)
            if want is not None:
                plat.scale(MODEL, want)
        current = plat.current_replicas(MODEL)
        ready = plat.ready_replicas(MODEL)
        cap = capacity(ready, pools)
        p95 = modelled_p95(load, cap, slo, a)
        met = load <= 0 or load <= cap + 1e-9
        served_hist.append(min(load, cap / (1 - a)))
        last_p95 = p95 if load > 0 else None
        run.cost += hourly_cost(current, pools) * dt / 3600
        run.replica_minutes += sum(current.values()) * dt / 60
        run.times.append(t)
        run.replicas.append(current)
        run.capacity.append(cap)
        run.met.append(met)
        run.p95.append(p95)
        run.cost_cum.append(run.cost)
    if isinstance(controller, LeanserveController):
        run.decisions = controller.decisions
    return run


@dataclass
class Simulation:
    """Every contender's run over one trace."""

    trace: Trace
    pools: list[PoolCapacity]
    target: Target
    runs: dict[str, PolicyRun]

    def summary(self) -> dict[str, Any]:
        """simulation.json (DESIGN.md section 6) plus context fields."""
        return {
            "policies": {k: r.summary() for k, r in self.runs.items()},
            "pools": [{"name": p.name, "capacity_rps": p.capacity_rps,
                       "hourly_price": p.hourly_price} for p in self.pools],
            "slo_p95_ms": self.target.latency_p95_ms,
            "interval_seconds": self.target.interval_seconds,
        }


def simulate(trace: Trace, pools: Sequence[PoolCapacity], target: Target,
             cfg: SimConfig | None = None, extra: dict[str, Controller] | None = None,
             only: Collection[str] = POLICIES) -> Simulation:
    """Run leanserve, static, hpa, keda and oracle (plus any ``extra`` controllers).

    ``only`` names the contenders to run (a sensitivity sweep needs leanserve and the oracle).
    """
    unknown = set(only) - set(POLICIES)
    if unknown:
        raise TraceError(f"simulate: unknown policies {sorted(unknown)}; known: {POLICIES}")
    check_bounded(trace, pools, target)
    cfg = cfg or SimConfig()
    if not 0 <= cfg.startup_seconds <= 86_400:
        raise TraceError(f"simulate: startup_seconds must be within 0..86400, got "
                         f"{cfg.startup_seconds!r}")
    settings = PolicySettings(**{**cfg.settings.__dict__, "startup_seconds": cfg.startup_seconds})
    cfg = SimConfig(**{**cfg.__dict__, "settings": settings})
    pools = list(pools)
    runs: dict[str, PolicyRun] = {}
    if "leanserve" in only:
        runs["leanserve"] = _simulate("leanserve", trace, pools, target, cfg,
                                      LeanserveController(pools, target, settings))
    peak = max(trace.rates)
    if "static" in only:
        static_mix = cheapest_mix(peak / settings.target_utilisation, pools, target)[0]
        runs["static"] = _simulate("static", trace, pools, target, cfg, None,
                                   fixed=lambda _t, _l: static_mix)
        runs["static"].note = f"peak {peak:g} req/s at {settings.target_utilisation:.0%}"
    hp = _hpa_pool(pools)
    max_r = target.affordable(hp)
    if "hpa" in only:
        hpa = HPAController(hp, cfg.hpa_target * hp.capacity_rps, target.min_replicas, max_r,
                            cfg, pods_metric=True, period=cfg.hpa_sync_seconds,
                            down_window=cfg.hpa_scale_down_window_seconds)
        runs["hpa"] = _simulate("hpa", trace, pools, target, cfg, hpa)
        runs["hpa"].note = f"pool {hp.name}, target {cfg.hpa_target:.0%}"
    if "keda" in only:
        keda = HPAController(hp, cfg.keda_threshold_share * hp.capacity_rps, target.min_replicas,
                             max_r, cfg, pods_metric=False, period=cfg.keda_polling_seconds,
                             down_window=cfg.hpa_scale_down_window_seconds)
        runs["keda"] = _simulate("keda", trace, pools, target, cfg, keda)
        runs["keda"].note = (f"pool {hp.name}, threshold "
                             f"{cfg.keda_threshold_share * hp.capacity_rps:g} req/s per replica")
    if "oracle" in only:
        runs["oracle"] = _simulate("oracle", trace, pools, target, cfg, None,
                                   fixed=lambda _t, load: cheapest_mix(load, pools, target)[0])
        runs["oracle"].note = "knows the load, no start-up: a cost lower bound"
    for k, ctl in (extra or {}).items():
        runs[k] = _simulate(k, trace, pools, target, cfg, ctl)
    return Simulation(trace, pools, target, runs)


def ticks(trace: Trace, target: Target) -> int:
    """How many intervals of spec.autoscaling.intervalSeconds the trace spans."""
    return max(1, math.ceil(trace.duration / target.interval_seconds - 1e-9))


def check_bounded(trace: Trace, pools: Sequence[PoolCapacity], target: Target) -> None:
    """Refuse, with what to change, a replay whose work has no useful bound: a trace spanning
    more than MAX_TICKS intervals (a huge time gap, or far too long), or pools whose replica
    mixes are more than MAX_MIXES."""
    if max(trace.rates) > MAX_RATE:
        raise TraceError(f"trace: a rate of {max(trace.rates):g} requests/s is above "
                         f"{MAX_RATE:g}")
    for p in pools:
        if not MIN_CAPACITY_RPS <= p.capacity_rps <= MAX_CAPACITY_RPS:
            raise TraceError(f"pool {p.name}: capacity {p.capacity_rps:g} requests/s is out of "
                             f"range ({MIN_CAPACITY_RPS:g} to {MAX_CAPACITY_RPS:g})")
    n = ticks(trace, target)
    if n > MAX_TICKS:
        gaps = [(b - a, a, b) for a, b in itertools.pairwise(trace.times)]
        gap, t_a, t_b = max(gaps) if gaps else (0.0, trace.times[0], trace.times[0])
        where = (f"; its largest gap is {gap:g} s (from time_s {t_a:g} to {t_b:g}): remove it "
                 "or split the trace there" if gap > trace.duration / 10 else
                 "; shorten or split the trace")
        raise TraceError(f"trace spans {trace.duration:g} s = {n} intervals of "
                         f"{target.interval_seconds:g} s (spec.autoscaling.intervalSeconds), more "
                         f"than the {MAX_TICKS} the simulator replays{where}, or raise "
                         "intervalSeconds")
    mixes = 1
    for p in pools:
        mixes *= target.affordable(p) + 1
        if mixes > MAX_MIXES:
            raise TraceError(f"the node pools allow more than {MAX_MIXES} replica mixes "
                             f"({len(pools)} pools of up to {target.max_replicas} replicas); "
                             "lower spec.autoscaling.maxReplicas or set maxHourlyCost")


class MixPrices:
    """``need -> (capacity, hourly cost)`` of ``cheapest_mix(need)``, by table lookup.

    The bounds price hundreds of thousands of needs; cheapest_mix searches every mix each call.
    Every mix within the limits is enumerated once, sorted by capacity, and each suffix keeps its
    cheapest member (the most capacity among equals, as cheapest_mix does), so a need is one
    binary search (``many`` does a numpy array of them at once). A need beyond every mix gets
    the one with the most capacity, as in cheapest_mix.
    """

    def __init__(self, pools: Sequence[PoolCapacity], target: Target) -> None:
        import numpy as np

        mixes = []
        for counts in itertools.product(*(range(target.affordable(p) + 1) for p in pools)):
            total = sum(counts)
            cost = sum(n * p.hourly_price for n, p in zip(counts, pools, strict=True))
            if target.min_replicas <= total <= target.max_replicas \
                    and cost <= target.budget + 1e-9:
                mixes.append((sum(n * p.capacity_rps
                                  for n, p in zip(counts, pools, strict=True)), cost))
        if not mixes:  # nothing affordable: cheapest_mix's own fallback, at any need
            mix = cheapest_mix(0.0, pools, target)[0]
            mixes = [(capacity(mix, pools), hourly_cost(mix, pools))]
        mixes.sort()
        best = list(mixes)
        for j in range(len(mixes) - 2, -1, -1):
            c, cost = mixes[j]
            nxt = best[j + 1]
            best[j] = (c, cost) if (cost, -c) < (nxt[1], -nxt[0]) else nxt
        top = mixes[-1][0]
        # one past the end: beyond every mix, the most capacity at its least cost
        best.append((top, min(cost for c, cost in mixes if c == top)))
        self._caps = [c for c, _ in mixes]
        self._best = best
        self._caps_np = np.array(self._caps)
        self._best_cap = np.array([c for c, _ in best])
        self._best_cost = np.array([c for _, c in best])

    def __call__(self, need: float) -> tuple[float, float]:
        return self._best[bisect.bisect_left(self._caps, max(0.0, need) - 1e-9)]

    def many(self, needs: Any) -> tuple[Any, Any]:
        """(capacities, hourly costs) for a numpy array of needs."""
        import numpy as np

        j = np.searchsorted(self._caps_np, np.maximum(0.0, needs) - 1e-9, side="left")
        return self._best_cap[j], self._best_cost[j]


def _tick_loads(trace: Trace, pools: Sequence[PoolCapacity], target: Target, cfg: SimConfig
                ) -> tuple[list[float], MixPrices, int]:
    """The bounds' common ground: the load at every tick (the simulator's ticks), the capacity
    and hourly cost of the cheapest mix covering a need (what the oracle pays) and the start-up
    in ticks."""
    dt = target.interval_seconds
    check_bounded(trace, pools, target)
    n = ticks(trace, target)
    loads = [trace.at(trace.times[0] + i * dt) for i in range(n)]
    return loads, MixPrices(pools, target), math.ceil(cfg.startup_seconds / dt - 1e-9)


@dataclass(frozen=True)
class ReactiveBound:
    """What perfect knowledge of the present buys with the same start-up delay (see below)."""

    attainment: float
    """Best SLO attainment of the family at a cost <= max_cost_ratio x the oracle."""
    cost_ratio: float
    headroom: float
    hold_seconds: float
    cheapest_at_99: float | None
    """Lowest cost / oracle of a member reaching 99% attainment (None: none does)."""
    trend_seconds: float = 0.0
    """Window of the trend the best member projects (0: none)."""
    trend_gain: float = 0.0
    """How much of that trend it projects over the start-up (1: the least-squares line)."""


TREND_MEMBERS = ((0.0, 0.0), (60.0, 1.0), (120.0, 1.0), (120.0, 1.5), (240.0, 1.0))
"""(window seconds, gain) of the trend projections the reactive family tries; (0, 0): none."""


def reactive_bound(trace: Trace, pools: Sequence[PoolCapacity], target: Target,
                   cfg: SimConfig | None = None, max_cost_ratio: float = 1.15,
                   headrooms: Sequence[float] = (1.0, 1.02, 1.04, 1.06, 1.08, 1.1, 1.12, 1.15,
                                                 1.2, 1.3, 1.5, 2.0, 3.0),
                   holds: Sequence[float] = (0.0, 30.0, 60.0, 120.0, 300.0),
                   trends: Sequence[tuple[float, float]] = TREND_MEMBERS) -> ReactiveBound:
    """An upper bound on what causal policies of the reactive kind can attain at a given cost.

    A replica serving at t was asked for at t - startup or earlier, so its owner knew the load
    only up to then. The ideal reactive policy knows that load exactly (no metric window, no
    lag, no noise) and provisions ``headroom`` x the larger of the peak of the last
    ``hold_seconds`` before t - startup and the least-squares line through the last
    ``trend_seconds`` of load projected to t (``gain`` times its rise); it swaps pools for free
    and pays nothing for starting replicas: every one of those is in its favour. Over the grid
    of headroom, hold and trend, returns the best attainment at <= max_cost_ratio x the
    oracle's cost, same ticks and same SLO test (load <= ready capacity) as every contender.
    When even that is below 99%, no policy of this kind meets both targets on the trace: the
    load moves faster than a replica starts.
    """
    import numpy as np

    cfg = cfg or SimConfig()
    loads, priced, lag = _tick_loads(trace, pools, target, cfg)
    n = len(loads)
    load = np.asarray(loads, dtype=float)
    oracle = float(priced.many(load)[1].sum())
    known = np.maximum(0, np.arange(n) - lag)  # the last tick known when asking for tick i
    dt = target.interval_seconds
    best: tuple[float, float, float, float, float, float] | None = None
    cheapest99: float | None = None
    peaks = {hold: np.array([load[max(0, j - round(hold / dt)):j + 1].max() for j in range(n)])
             for hold in holds}  # the peak of the last ``hold`` seconds at every tick
    for window, gain in trends:
        w = round(window / dt)
        projected = np.zeros(n)
        if w >= 2 and gain > 0:
            x = np.arange(w) - (w - 1) / 2
            for j in range(w - 1, n):
                y = load[j - w + 1:j + 1]
                slope = float(x @ y) / float(x @ x)
                projected[j] = y.mean() + gain * max(0.0, slope) * ((w - 1) / 2 + lag)
        for hold in holds:
            base = np.maximum(peaks[hold], projected)[known]
            for h in headrooms:
                caps, costs = priced.many(h * base)
                att = float(np.mean(load <= caps + 1e-9))
                ratio = float(costs.sum()) / oracle if oracle > 0 else 1.0
                if ratio <= max_cost_ratio + 1e-9 and (best is None or (att, -ratio) > (
                        best[0], -best[1])):
                    best = (att, ratio, h, hold, window if gain > 0 else 0.0, gain)
                if att >= 0.99 and (cheapest99 is None or ratio < cheapest99):
                    cheapest99 = ratio
    if best is None:
        return ReactiveBound(0.0, math.inf, math.nan, math.nan, cheapest99)
    return ReactiveBound(best[0], best[1], best[2], best[3], cheapest99, best[4], best[5])


@dataclass(frozen=True)
class RiseBound:
    """What sudden rises and noise of the load cost any policy that cannot foresee them."""

    rises: int
    """Rises counted: ticks whose load exceeds ``rise_ratio`` x the peak of the start-up before."""
    lag_ticks: int
    """Ticks a replica asked for takes to serve (the start-up over the interval, rounded up)."""
    unabsorbed_attainment: float
    """Attainment ceiling when no rise is provisioned for in advance (rise ticks only)."""
    min_cost_ratio: float
    """Least cost / the oracle's at which ``attainment`` is reachable at all (see rise_bound)."""
    attainment: float
    noise: float
    """Relative noise of the load (robust std of the trace around its running median; 0: off)."""
    headroom: float
    """The noise headroom of the cheapest way found (0 without noise)."""
    startup_share: float = 0.0
    """The least start-up spend (replicas paid for while starting), as a share of the oracle's
    cost, included in min_cost_ratio."""


MIN_RESIDUALS = 20
"""Fewer trace points than this away from the rises say nothing of the noise: none is assumed."""


def _noise(trace: Trace, skip: Callable[[float], bool]) -> tuple[list[float], list[float]]:
    """(sorted relative residuals of the trace around its 5-point running median, the median at
    every trace point): the part of the load no policy can foresee from its neighbours. Points
    ``skip`` names (near the rises, which the bound prices on their own) give no residual."""
    rates = trace.rates
    med = []
    for j in range(len(rates)):
        near = sorted(rates[max(0, j - 2):j + 3])
        med.append(near[len(near) // 2])
    res = sorted(r / m - 1 for t, r, m in zip(trace.times, rates, med, strict=True)
                 if m > 0 and not skip(t))
    return res, med


def rise_bound(trace: Trace, pools: Sequence[PoolCapacity], target: Target,
               cfg: SimConfig | None = None, attainment: float = 0.99,
               rise_ratio: float = 1.15, noise: bool = True) -> RiseBound:
    """A lower bound on cost at a given SLO attainment for any policy, reactive or not, that
    cannot tell in advance when a rise of the load starts, nor the load's noise. No policy
    family is assumed.

    Rises. A replica serving at tick i was asked for by tick i - lag, so the capacity during
    the first ``lag`` ticks of a rise (at tick i, load above ``rise_ratio`` x the peak of the
    ``lag`` ticks before) was fixed before the rise began, and any window tick whose load
    exceeds it misses the SLO. A policy that cannot tell when the rise comes (the trace
    generator draws burst and spike starts at random; steps come unannounced) and still wants
    capacity c in that window must hold c throughout the stretch before it, since the previous
    rise's window ended; holding it for only a share p of that stretch catches a rise whose
    start is uniform there with probability p, at p times the cost, so mixes are allowed.

    Noise (``noise``). Outside the rise windows the load is its running median (5 points, given
    to the policy for free) times 1 + e, with e drawn from the trace's own residuals around that
    median: a capacity of median x (1 + h), fixed before e is drawn, misses with the share of
    residuals above h. One headroom h is chosen for the whole trace (the cheapest found on a
    grid), a stretch held for a rise at c counts max(c, median x (1 + h)). Residuals within two
    trace points of a rise window are left out: the rise is priced already.

    Start-ups. Replicas are paid for while they start (every contender but the oracle is), and
    the ready capacity must climb from the warm start to the busiest tick it serves: at least
    that climb, at the cheapest price per req/s, for a start-up each.

    The bound is the least cost, priced by the same cheapest mix the oracle pays, of choosing
    the headroom and a level per rise so that the expected misses fit in (1 - attainment) of all
    ticks. In the policy's favour: the median is known exactly, the residuals' tail is the
    trace's own (no tail beyond the largest seen), a missed tick counts as free, and misses left
    in the budget are spent on the dearest ticks of the trace. A min_cost_ratio above the target
    ratio means no such policy meets both targets on this trace at this start-up.
    """
    cfg = cfg or SimConfig()
    loads, priced, lag = _tick_loads(trace, pools, target, cfg)
    n = len(loads)
    base = [priced(x)[1] for x in loads]
    oracle = sum(base)
    budget = math.floor((1 - attainment) * n + 1e-9)
    lag = max(1, lag)
    # rises, non-overlapping: (start of the stretch the policy was blind in, the rise's tick)
    rises: list[tuple[int, int]] = []
    i, stretch = lag, 0
    while i < n:
        if loads[i] > rise_ratio * max(loads[i - lag:i]) + 1e-9:
            rises.append((stretch, i))
            stretch = i + lag
            i += lag
        else:
            i += 1
    windows = {k for _, i in rises for k in range(i, min(n, i + lag))}
    stretches = {k for s, i in rises for k in range(s, i)}
    dt = target.interval_seconds
    residuals: list[float] = []
    med: list[float] = []
    if noise:
        step = trace.duration / max(1, len(trace.times))
        near = {k + d for k in windows
                for d in range(-math.ceil(2 * step / dt), math.ceil(2 * step / dt) + 1)}
        residuals, med = _noise(trace, lambda t: round((t - trace.times[0]) / dt) in near)
    if noise and len(residuals) >= MIN_RESIDUALS:
        smooth = Trace(trace.times, tuple(med))
        mids = [smooth.at(trace.times[0] + k * dt) for k in range(n)]
        sigma = 1.4826 * sorted(abs(e) for e in residuals)[len(residuals) // 2]
        headrooms = [x / 200 for x in range(61)]  # 0 to 30% in 0.5% steps
    else:  # off, or too few points to tell noise from shape: no noise (the policy's favour)
        residuals, mids, sigma, headrooms = [], loads, 0.0, [0.0]

    def tail(h: float) -> float:
        """Share of residuals above h: the chance a capacity of median x (1 + h) misses."""
        return (len(residuals) - bisect.bisect_right(residuals, h + 1e-12)) / len(residuals) \
            if residuals else 0.0

    rest = [k for k in range(n) if k not in windows and k not in stretches]
    dearest = sorted(base, reverse=True)
    best: tuple[float, float] | None = None  # (extra cost, headroom)
    for h in headrooms:
        q = tail(h)
        misses = q * len(rest)
        extra = sum(priced(mids[k] * (1 + h))[1] - base[k] for k in rest)
        hulls = []
        for start, i in rises:
            window = range(i, min(n, i + lag))
            options: dict[float, float] = {}
            for c in {0.0, *(loads[k] for k in window)}:
                miss = sum(loads[k] > c + 1e-9 for k in window) + sum(
                    tail(max(h, c / mids[k] - 1 if mids[k] > 0 else h)) for k in range(start, i))
                cost = (sum(priced(max(mids[k] * (1 + h), c))[1] - base[k]
                            for k in range(start, i))
                        - sum(base[k] for k in window if loads[k] > c + 1e-9))
                options[miss] = min(cost, options.get(miss, math.inf))
            hulls.append(_lower_hull(options))
        misses += sum(hull[0][0] for hull in hulls)
        extra += sum(hull[0][1] for hull in hulls)
        steps = sorted(((b[1] - a[1]) / (a[0] - b[0]), a[0] - b[0], b[1] - a[1])
                       for hull in hulls for a, b in itertools.pairwise(hull))
        for _slope, dv, dc in steps:
            if misses <= budget + 1e-9:
                break
            take = min(1.0, (misses - budget) / dv)
            misses -= take * dv
            extra += take * dc
        if misses > budget + 1e-9:
            continue  # this headroom misses too often whatever is held for the rises
        extra -= sum(dearest[:int(budget - misses + 1e-9)])
        if best is None or extra < best[0]:
            best = (extra, h)
    unabsorbed = sum(1 for _, i in rises for k in range(i, min(n, i + lag))
                     if loads[k] > max(loads[i - lag:i]) + 1e-9)
    extra, h = best if best is not None else (math.inf, math.nan)
    # start-ups: a replica is paid for from when it is asked for, ``lag`` ticks before it serves
    # (the simulator's physics for every contender but the oracle). Whatever the path, the ready
    # capacity has to climb from the warm start to the load of the busiest tick it does not miss
    # (misses spent on the busiest ticks), and the cheapest capacity per req/s starting for lag
    # ticks is the least that climb costs.
    warm = priced(loads[0] / cfg.settings.target_utilisation)[0]
    peak = sorted(loads, reverse=True)[budget] if budget < n else 0.0
    per_rps = min(p.price_per_rps for p in pools)
    startup = max(0.0, peak - warm) * per_rps * lag
    ratio = (oracle + extra + startup) / oracle if oracle > 0 else 1.0
    return RiseBound(len(rises), lag, 1 - unabsorbed / n, max(0.0, ratio), attainment,
                     sigma, h, startup / oracle if oracle > 0 else 0.0)


def _lower_hull(options: dict[float, float]) -> list[tuple[float, float]]:
    """From {misses: cost}, the cheapest option and then, towards fewer misses, the lower convex
    hull: each step the one with the least extra cost per miss saved."""
    hull = [min(options.items(), key=lambda mc: (mc[1], mc[0]))]
    while True:
        m0, c0 = hull[-1]
        fewer = [(m, c) for m, c in options.items() if m < m0 - 1e-12]
        if not fewer:
            return hull
        hull.append(min(fewer, key=lambda mc: ((mc[1] - c0) / (m0 - mc[0]), mc[0])))


def plot(sim: Simulation, path: Path, title: str = "") -> None:
    """simulation.png: load vs capacity, leanserve's replicas per pool, cumulative cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ls = sim.runs["leanserve"]
    mins = [(t - ls.times[0]) / 60 for t in ls.times]
    fig, axes = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    ax = axes[0]
    ax.plot(mins, [sim.trace.at(t) for t in ls.times], color="black", lw=1.2, label="load")
    for k, r in sim.runs.items():
        if k in ("leanserve", "hpa", "oracle"):
            ax.plot(mins, r.capacity, lw=0.9, label=f"{k} ready capacity at SLO")
    ax.set_ylabel("requests/s")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or "load and capacity")
    ax = axes[1]
    bottom = [0.0] * len(mins)
    for p in sim.pools:
        ys = [float(r.get(p.name, 0)) for r in ls.replicas]
        ax.fill_between(mins, bottom, [b + y for b, y in zip(bottom, ys, strict=True)],
                        step="post", alpha=0.6, label=f"leanserve {p.name}")
        bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    ax.step(mins, [sum(r.values()) for r in sim.runs["hpa"].replicas], where="post",
            color="red", lw=1, label="hpa replicas")
    ax.set_ylabel("replicas")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[2]
    for k, r in sim.runs.items():
        ax.plot(mins, r.cost_cum, lw=1, label=f"{k} (${r.cost:.3f})")
    ax.set_ylabel("cumulative cost (USD)")
    ax.set_xlabel("minutes")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
