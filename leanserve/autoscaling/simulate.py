"""Replay a request-rate trace against leanserve's policy, HPA-style baselines and an oracle,
judging every request.

Why: an autoscaler's worth is cost at a given share of requests served within the SLO over
realistic load, and that needs the same load replayed against every contender with the same
physics. The physics here:

- Time advances in steps of ``step_seconds`` (at most the decision interval); the trace
  (``time_s, requests_per_s``) is held constant between its points.
- Replicas per pool live on an ``InMemoryPlatform``: a new replica serves ``startup_seconds``
  after it is asked for (default 120 s: a pod that pulls the Triton image and loads the model);
  removed replicas stop costing at once.
- Routing is what ships: ONE pool at a time, and during a pool switch the Service spreads
  requests evenly over every ready pod of both pools (each pool gets its share of pods).
- Each ready pool is a queue. A pod's latency at a load follows the pool's latency curve
  (leanserve.autoscaling.capacity: fitted to the serving profile; the share of requests within
  the SLO at that load comes from it). Load beyond a pool's saturation throughput (the curve's
  m x capacity_rps per pod) is a backlog that carries over to the next step; a request that
  arrives behind a backlog waits for it (first come, first served) before its own latency, and
  is within the SLO only if both fit. No ready pod at all: the step's requests miss.
- Judged per request: ``slo_attainment`` is the share of all requests within the SLO; as a
  second figure, ``interval_attainment`` is the share of decision intervals whose p95 is within
  it (at least 95% of the interval's requests within the SLO).
- What autoscalers see is what the operator's PromQL gives (leanserve.autoscaling.metrics,
  the same window): the arrival rate and the served rate averaged over the last
  ``metrics_window_seconds``, Triton's pending requests now (in flight by Little's law plus the
  backlog), and the p95 over the window.

Contenders (each starts warm, sized for the first load):
- leanserve: ``policy.decide`` with the shipped ``PolicySettings()`` (its start-up set to the
  simulator's) every intervalSeconds.
- static: the cheapest one-pool count for the trace's peak, all the time.
- hpa (70% target) and hpa85 (85%): the Kubernetes HPA algorithm on one pool, the one with the
  lowest price per request/s, on the served rate per ready pod (what a CPU or request-rate pod
  metric shows; it saturates under overload), 100% being a replica's capacity at the SLO: 10%
  tolerance, sync every 15 s, not-ready pods counted at 0% on scale-up, scale-up limited to
  max(4 pods, +100%) per 15 s, scale-down to the highest recommendation over 300 s.
- keda: KEDA's Prometheus scaler on the same pool (threshold 80% of a replica's capacity on the
  served rate, AverageValue, polled every 30 s).
- oracle: knows each step's load and pays for no start-up: the cheapest one-pool count that
  keeps 99% of requests within the SLO at that load. A reference for cost, not a policy anyone
  can run.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from leanserve.api.spec import MAX_REPLICA_MIXES
from leanserve.autoscaling.errors import TraceError
from leanserve.autoscaling.metrics import WINDOW_SECONDS
from leanserve.autoscaling.platform import InMemoryPlatform
from leanserve.autoscaling.policy import (
    MAX_CAPACITY_RPS,
    MIN_CAPACITY_RPS,
    SETTINGS,
    Decision,
    Observation,
    PolicySettings,
    PoolCapacity,
    Target,
    capacity,
    cheapest_pool,
    decide,
    hourly_cost,
)

POLICIES = ("leanserve", "static", "hpa", "hpa85", "keda", "oracle")
MODEL = "sim"
ORACLE_QUANTILE = 0.99
DEFAULT_STARTUP_SECONDS = 120.0
"""A realistic start-up for a serving pod: schedule, pull a multi-GB Triton image (cached on
some nodes, not on a fresh one), start tritonserver and load the model."""

MAX_TICKS = 200_000
"""At most this many decision intervals per contender: a trace with a huge time gap would
otherwise replay for hours. A week at the examples' 5 s interval (120,960) fits: `leanserve
simulate` replayed one in 21 s (six contenders, one core), so the limit is about 35 s."""
MAX_MIXES = MAX_REPLICA_MIXES
"""At most this many replica mixes (a product over the pools); a valid spec never has more."""
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

    def scaled_to_peak(self, peak_rps: float) -> Trace:
        """The same shape with its highest rate at ``peak_rps`` (a trace of zeros cannot be)."""
        top = max(self.rates)
        if not (math.isfinite(peak_rps) and 0 < peak_rps <= MAX_RATE):
            raise TraceError(f"peak {peak_rps!r} req/s: allowed 0 < peak <= {MAX_RATE:g}")
        if top <= 0:
            raise TraceError("the trace is all zeros: it has no peak to rescale")
        return Trace(self.times, tuple(r * peak_rps / top for r in self.rates))


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

    startup_seconds: float = DEFAULT_STARTUP_SECONDS
    """Seconds from asking for a replica until it serves."""
    metrics_window_seconds: float = WINDOW_SECONDS
    """The window of the operator's rate() queries (metrics.WINDOW_SECONDS)."""
    step_seconds: float = 10.0
    """Physics resolution (at most the decision interval)."""
    hpa_tolerance: float = 0.1
    hpa_sync_seconds: float = 15.0
    hpa_scale_down_window_seconds: float = 300.0
    keda_threshold_share: float = 0.8
    keda_polling_seconds: float = 30.0
    queue_timeout_ms: float = 0.0
    """Triton's queue policy (spec.serving.queueTimeoutMicroseconds / 1000): a request that
    waited longer than this in a pool's queue is rejected (HTTP 503), so the backlog holds at
    most this long of the pool's work; 0 keeps every request queued however long it waits."""
    settings: PolicySettings = SETTINGS
    """leanserve's policy settings (its startup_seconds is set to this config's)."""


HPA_TARGETS = {"hpa": 0.7, "hpa85": 0.85}
"""Utilisation targets of the HPA-style baselines (100%: a replica's capacity at the SLO)."""
SATURATED_U = 1.0
"""While a pool has a backlog, its pods run at saturation: a request's own latency is the
curve's at capacity_rps (u = 1), on top of its wait behind the backlog."""


@dataclass
class PolicyRun:
    """One contender's time series (one point per decision interval) and totals."""

    name: str
    times: list[float] = field(default_factory=list)
    replicas: list[dict[str, int]] = field(default_factory=list)
    capacity: list[float] = field(default_factory=list)
    interval_share: list[float] = field(default_factory=list)
    """Share of each interval's requests within the SLO (1.0 with none)."""
    p95: list[float] = field(default_factory=list)
    cost_cum: list[float] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    requests: float = 0.0
    within: float = 0.0
    cost: float = 0.0
    replica_minutes: float = 0.0
    note: str = ""

    @property
    def met(self) -> list[bool]:
        """Per interval: p95 within the SLO (at least 95% of its requests within it)."""
        return [s >= 0.95 - 1e-12 for s in self.interval_share]

    def summary(self) -> dict[str, Any]:
        n = len(self.interval_share)
        met = sum(self.met)
        return {
            "cost": round(self.cost, 6),
            "slo_attainment": self.within / self.requests if self.requests > 0 else 1.0,
            "interval_attainment": met / n if n else 1.0,
            "requests": round(self.requests),
            "replica_minutes": round(self.replica_minutes, 3),
            "intervals": n,
            "violations": n - met,
            "max_replicas": max((sum(r.values()) for r in self.replicas), default=0),
            "note": self.note,
        }


Controller = Callable[[Observation], dict[str, int] | None]
"""Sees an Observation, answers replicas per pool or None for "no action this step"."""


def _cheapest_per_rps(pools: Sequence[PoolCapacity]) -> PoolCapacity:
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

    def warm(self, load: float) -> int:
        return max(self.min_r, min(self.max_r, math.ceil(load / self.target - 1e-9)))

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


@dataclass
class _Queues:
    """Per pool backlog (requests beyond what the pods serve) and the last step's figures.

    With a queue timeout, the requests that would wait longer than it are rejected: the
    backlog stops at ``timeout x`` the pool's throughput, and the overflow counts as requests
    that missed (a 503 is not an answer within the SLO)."""

    backlog: dict[str, float]
    timeout_s: float = 0.0

    def step(self, load: float, ready: dict[str, int], pools: Sequence[PoolCapacity],
             slo_ms: float, h: float) -> tuple[float, float, float, float, float]:
        """Advance one step: (requests, within the SLO, completed, pending at the end, p95 ms)."""
        arrivals = load * h
        n = sum(ready.values())
        if n == 0:
            # nothing serves: every request of the step misses (and nothing is queued)
            for k in self.backlog:
                self.backlog[k] = 0.0
            return arrivals, 0.0, 0.0, 0.0, 10 * slo_ms
        # a pool that stopped serving hands its backlog to the ones still ready
        orphan = sum(b for k, b in self.backlog.items() if ready.get(k, 0) == 0)
        if orphan > 0:
            for k in self.backlog:
                self.backlog[k] = (0.0 if ready.get(k, 0) == 0
                                   else self.backlog[k] + orphan * ready[k] / n)
        within = completed = pending = 0.0
        p95 = 0.0
        for p in pools:
            r = ready.get(p.name, 0)
            if r == 0:
                continue
            lam = load * r / n
            cap = r * p.capacity_rps
            u = lam / cap
            b0 = self.backlog[p.name]
            c = p.curve
            if b0 <= 0 and u < c.m * 0.999:
                share = c.within(u)
                within += share * lam * h
                completed += lam * h
                pending += lam * c.mean_share(u) * slo_ms / 1000
                p95 = max(p95, c.p95_share(u) * slo_ms)
                continue
            mu = c.m * cap  # the pool's saturation throughput
            b1 = max(0.0, b0 + (lam - mu) * h)
            rejected = 0.0
            if self.timeout_s > 0 and b1 > self.timeout_s * mu:
                rejected = b1 - self.timeout_s * mu
                b1 -= rejected
            w0, w1 = b0 / mu, b1 / mu  # seconds a request waits behind the backlog
            ue = min(u, SATURATED_U)
            ws = [w * 1000 / slo_ms for w in (w0, (w0 + w1) / 2, w1)]
            share = (c.within(ue, ws[0]) + 4 * c.within(ue, ws[1]) + c.within(ue, ws[2])) / 6
            within += share * (lam * h - rejected)
            completed += min(b0 + lam * h - rejected, mu * h)
            pending += b1 + mu * c.mean_share(ue) * slo_ms / 1000
            p95 = max(p95, ((w0 + w1) / 2) * 1000 + c.p95_share(ue) * slo_ms)
            self.backlog[p.name] = b1
        return arrivals, within, completed, pending, p95


def _simulate(name: str, trace: Trace, pools: Sequence[PoolCapacity], target: Target,
              cfg: SimConfig, controller: Controller | None,
              fixed: Callable[[float, float], dict[str, int]] | None = None,
              warm: dict[str, int] | None = None) -> PolicyRun:
    """Run one contender; either a controller with start-up delays or a fixed/oracle schedule."""
    h, per_interval, n_steps = step_grid(trace, target, cfg)
    t0 = trace.times[0]
    now = [t0]
    plat = InMemoryPlatform([p.name for p in pools], clock=lambda: now[0],
                            startup_seconds=cfg.startup_seconds)
    run = PolicyRun(name)
    slo = target.latency_p95_ms
    queues = _Queues({p.name: 0.0 for p in pools}, cfg.queue_timeout_ms / 1000)
    window = max(1, round(cfg.metrics_window_seconds / h))
    arrived: list[float] = []
    served: list[float] = []
    p95s: list[tuple[float, float]] = []
    pending = 0.0
    if warm is not None:
        plat.set_ready(MODEL, warm)
    interval_req = interval_within = 0.0
    for i in range(n_steps):
        t = t0 + i * h
        now[0] = t
        load = trace.at(t)
        if fixed is not None:
            plat.set_ready(MODEL, fixed(t, load))
        else:
            assert controller is not None
            if arrived:
                arr = sum(arrived[-window:]) / (len(arrived[-window:]) * h)
                srv = sum(served[-window:]) / (len(served[-window:]) * h)
                last = p95s[-window:]
                p95 = _weighted_p95(last)
            else:
                arr = srv = trace.at(t0)
                p95 = None
            obs = Observation(t, srv, p95, None, plat.ready_replicas(MODEL),
                              plat.current_replicas(MODEL), arrival_rate=arr, pending=pending,
                              window_seconds=window * h)
            want = controller(obs)
            if want is not None:
                plat.scale(MODEL, want)
        current = plat.current_replicas(MODEL)
        ready = plat.ready_replicas(MODEL)
        req, ok, done, pending, step_p95 = queues.step(load, ready, pools, slo, h)
        arrived.append(req)
        served.append(done)
        p95s.append((req, step_p95))
        if len(arrived) > 4 * window:
            del arrived[:-window], served[:-window], p95s[:-window]
        run.requests += req
        run.within += ok
        interval_req += req
        interval_within += ok
        run.cost += hourly_cost(current, pools) * h / 3600
        run.replica_minutes += sum(current.values()) * h / 60
        if (i + 1) % per_interval == 0:
            run.times.append(t - (per_interval - 1) * h)
            run.replicas.append(current)
            run.capacity.append(capacity(ready, pools))
            run.interval_share.append(interval_within / interval_req if interval_req > 0
                                      else 1.0)
            run.p95.append(step_p95)
            run.cost_cum.append(run.cost)
            interval_req = interval_within = 0.0
    if isinstance(controller, LeanserveController):
        run.decisions = controller.decisions
    return run


def _weighted_p95(points: Sequence[tuple[float, float]]) -> float | None:
    """The p95 over a window of steps: the step p95 at 95% of the requests, by weight."""
    total = sum(w for w, _ in points)
    if total <= 0:
        return None
    acc = 0.0
    for w, v in sorted(points, key=lambda x: x[1]):
        acc += w
        if acc >= 0.95 * total:
            return v
    return points[-1][1]


@dataclass
class Simulation:
    """Every contender's run over one trace."""

    trace: Trace
    pools: list[PoolCapacity]
    target: Target
    runs: dict[str, PolicyRun]
    settings: PolicySettings = SETTINGS
    startup_seconds: float = DEFAULT_STARTUP_SECONDS
    queue_timeout_ms: float = 0.0

    def summary(self) -> dict[str, Any]:
        """simulation.json (DESIGN.md section 6) plus context fields."""
        return {
            "policies": {k: r.summary() for k, r in self.runs.items()},
            "pools": [{"name": p.name, "capacity_rps": p.capacity_rps,
                       "hourly_price": p.hourly_price, "curve": p.curve.to_dict()}
                      for p in self.pools],
            "slo_p95_ms": self.target.latency_p95_ms,
            "interval_seconds": self.target.interval_seconds,
            "startup_seconds": self.startup_seconds,
            "queue_timeout_ms": self.queue_timeout_ms,
            "settings": settings_dict(self.settings),
        }


def settings_dict(settings: PolicySettings) -> dict[str, Any]:
    """The policy settings a run used, for JSON and for printing."""
    return dict(settings.__dict__)


def simulate(trace: Trace, pools: Sequence[PoolCapacity], target: Target,
             cfg: SimConfig | None = None, extra: dict[str, Controller] | None = None,
             only: Collection[str] = POLICIES) -> Simulation:
    """Run leanserve, static, hpa, hpa85, keda and oracle (plus any ``extra`` controllers).

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
    settings = replace(cfg.settings, startup_seconds=cfg.startup_seconds)
    cfg = replace(cfg, settings=settings)
    pools = list(pools)
    q = settings.target_quantile
    first = trace.at(trace.times[0])
    warm = cheapest_pool(first, pools, target, q)[0]
    runs: dict[str, PolicyRun] = {}
    if "leanserve" in only:
        runs["leanserve"] = _simulate("leanserve", trace, pools, target, cfg,
                                      LeanserveController(pools, target, settings), warm=warm)
    peak = max(trace.rates)
    if "static" in only:
        static_mix = cheapest_pool(peak, pools, target, ORACLE_QUANTILE)[0]
        runs["static"] = _simulate("static", trace, pools, target, cfg, None,
                                   fixed=lambda _t, _l: static_mix)
        runs["static"].note = f"peak {peak:g} req/s"
    hp = _cheapest_per_rps(pools)
    max_r = target.affordable(hp)
    for key, share in HPA_TARGETS.items():
        if key in only:
            runs[key] = simulate_hpa(trace, pools, target, cfg, share, key)
    if "keda" in only:
        keda = HPAController(hp, cfg.keda_threshold_share * hp.capacity_rps, target.min_replicas,
                             max_r, cfg, pods_metric=False, period=cfg.keda_polling_seconds,
                             down_window=cfg.hpa_scale_down_window_seconds)
        runs["keda"] = _simulate("keda", trace, pools, target, cfg, keda,
                                 warm=_one(pools, hp, keda.warm(first)))
        runs["keda"].note = (f"pool {hp.name}, threshold "
                             f"{cfg.keda_threshold_share * hp.capacity_rps:g} req/s per replica")
    if "oracle" in only:
        runs["oracle"] = _simulate(
            "oracle", trace, pools, target, cfg, None,
            fixed=lambda _t, load: cheapest_pool(load, pools, target, ORACLE_QUANTILE)[0])
        runs["oracle"].note = ("knows the load, no start-up, "
                               f"{ORACLE_QUANTILE:.0%} within the SLO: a cost reference")
    for k, ctl in (extra or {}).items():
        runs[k] = _simulate(k, trace, pools, target, cfg, ctl, warm=warm)
    return Simulation(trace, pools, target, runs, settings, cfg.startup_seconds,
                      cfg.queue_timeout_ms)


def simulate_hpa(trace: Trace, pools: Sequence[PoolCapacity], target: Target, cfg: SimConfig,
                 utilisation: float, name: str = "hpa") -> PolicyRun:
    """The HPA-style baseline at one utilisation target (a share of a replica's capacity at
    the SLO), on the pool cheapest per request, started with what the first load needs."""
    hp = _cheapest_per_rps(pools)
    hpa = HPAController(hp, utilisation * hp.capacity_rps, target.min_replicas,
                        target.affordable(hp), cfg, pods_metric=True,
                        period=cfg.hpa_sync_seconds,
                        down_window=cfg.hpa_scale_down_window_seconds)
    run = _simulate(name, trace, pools, target, cfg, hpa,
                    warm=_one(pools, hp, hpa.warm(trace.at(trace.times[0]))))
    run.note = f"pool {hp.name}, target {utilisation:.0%}"
    return run


FRONTIER_TARGETS = (0.85, 0.7, 0.6, 0.5, 0.4, 0.33, 0.25, 0.2, 0.15, 0.1)
"""Utilisation targets ``hpa_for_share`` tries, most to least utilised."""


def hpa_for_share(trace: Trace, pools: Sequence[PoolCapacity], target: Target,
                  cfg: SimConfig, share: float) -> tuple[float, PolicyRun] | None:
    """The most utilised HPA target of FRONTIER_TARGETS whose run keeps ``share`` of requests
    within the SLO, with that run; None when even the least utilised does not.

    What a reactive policy of the HPA's kind pays for that share on this trace: a measured
    point, not a bound (policy.decide or another reactive rule may do better or worse; only the
    clairvoyant leanserve.autoscaling.bound is a bound)."""
    for u in FRONTIER_TARGETS:
        run = simulate_hpa(trace, pools, target, cfg, u, f"hpa{round(u * 100)}")
        if run.requests <= 0 or run.within / run.requests >= share - 1e-12:
            return u, run
    return None


def _one(pools: Sequence[PoolCapacity], pool: PoolCapacity, n: int) -> dict[str, int]:
    return {p.name: (n if p is pool else 0) for p in pools}


def ticks(trace: Trace, target: Target) -> int:
    """How many intervals of spec.autoscaling.intervalSeconds the trace spans."""
    return max(1, math.ceil(trace.duration / target.interval_seconds - 1e-9))


def step_grid(trace: Trace, target: Target, cfg: SimConfig) -> tuple[float, int, int]:
    """The physics' steps: (seconds per step, steps per decision interval, steps in all); a
    step is at most cfg.step_seconds and divides the interval."""
    dt = target.interval_seconds
    per_interval = max(1, round(dt / min(cfg.step_seconds, dt)))
    return dt / per_interval, per_interval, ticks(trace, target) * per_interval


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
