"""A proven lower bound on what ANY autoscaler must pay to keep a share of requests within the SLO.

Why: the bench's targets pair a share of requests within the SLO with a cost ceiling (for example
"at least as many as the 70% HPA, at no more than 0.85x its cost"). Whether a target pair can be
met at all on a trace is a property of the trace and the physics, not of a policy, and a claim
that one cannot is worth only what its proof is worth. This module computes that proof under the
simulator's own physics (leanserve.autoscaling.simulate), for a contender far stronger than any
real one: it knows every step's load in advance, its replicas serve the moment they are asked
for (no start-up, so it never pays for a replica that is not serving), it may use any replica mix
of the pools within maxReplicas and the budget per pool, and every step starts with no backlog.

Each of those only lowers the cost or raises the share, so for every policy the simulator can run:

    cost(policy) >= min { sum_t c(mix_t) : sum_t within(t, mix_t) >= share x requests }   (P)

(Per step, a backlog can only lengthen a request's wait, and the simulator's saturated branch
uses the curve at u = min(u, 1); the per-step share used here is the larger of the two, see
``_step_share``.) (P) is an integer program; its Lagrangian dual,

    L(lam) = sum_t min_mix [ c(mix) + lam x misses(t, mix) ] - lam x (1 - share) x requests,

is below (P)'s optimum for every lam >= 0 (weak duality), so ``max_lam L(lam)`` is a lower bound
on the cost of any policy that reaches ``share``. When it exceeds a cost ceiling, no autoscaler
meets both targets on that trace under this physics: a proof, not a failed search.

``blind_cost_lower_bound`` takes one of those powers away where the trace's noise model is known:
the contender no longer foresees the noise, and the bound is on the expected cost over it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from leanserve.autoscaling.capacity import LN20
from leanserve.autoscaling.policy import PoolCapacity, Target
from leanserve.autoscaling.simulate import SATURATED_U, SimConfig, Trace, ticks

BISECTIONS = 60


@dataclass(frozen=True)
class CostBound:
    """max_lam L(lam): no policy keeps ``share`` of requests within the SLO for less."""

    share: float
    cost: float
    """USD over the trace: a lower bound on any policy's cost at ``share``."""
    best_share: float
    """The most any policy could keep within the SLO on this trace (the richest mix always)."""
    feasible: bool
    """False when even the richest mix at every step stays under ``share`` (cost is then inf)."""


def _within(u: np.ndarray, wait: np.ndarray | float, a: float, b: float, m: float) -> np.ndarray:
    """LatencyCurve.within, vectorised."""
    slack = 1.0 - a - np.asarray(wait)
    share = 1.0 - np.exp(-LN20 * np.maximum(slack, 0.0) * np.maximum(m - np.maximum(u, 0.0), 0.0)
                         / b)
    return np.where((u >= m) | (slack <= 0), 0.0, share)


def _step_share(load: np.ndarray, mix: dict[str, int], pools: Sequence[PoolCapacity],
                slo_ms: float, h: float) -> np.ndarray:
    """The most a step at ``load`` can keep within the SLO with ``mix`` ready (share of its
    requests): the simulator's per-pool queue from an empty backlog, taking the better of its
    two branches where they differ (below saturation a request is never judged at a load above
    u = min(u, SATURATED_U); at saturation the backlog built within the step is waited for)."""
    n = sum(mix.values())
    if n == 0:
        return np.zeros_like(load)
    within = np.zeros_like(load)
    for p in pools:
        r = mix.get(p.name, 0)
        if r == 0:
            continue
        c = p.curve
        lam = load * r / n
        cap = r * p.capacity_rps
        u = lam / cap
        mu = c.m * cap
        below = _within(np.minimum(u, SATURATED_U), 0.0, c.a, c.b, c.m)
        w1 = np.maximum(0.0, (lam - mu) * h) / mu * 1000 / slo_ms
        ue = np.minimum(u, SATURATED_U)
        sat = (_within(ue, 0.0, c.a, c.b, c.m) + 4 * _within(ue, w1 / 2, c.a, c.b, c.m)
               + _within(ue, w1, c.a, c.b, c.m)) / 6
        share = np.where(u < c.m * 0.999, below, sat)
        within += share * r / n
    return within


def cost_lower_bound(trace: Trace, pools: Sequence[PoolCapacity], target: Target,
                     share: float, cfg: SimConfig | None = None) -> CostBound:
    """The Lagrangian lower bound (module doc) on the cost of keeping ``share`` of the trace's
    requests within the SLO, on the simulator's step grid."""
    cfg = cfg or SimConfig()
    dt = target.interval_seconds
    per_interval = max(1, round(dt / min(cfg.step_seconds, dt)))
    h = dt / per_interval
    t0 = trace.times[0]
    steps = ticks(trace, target) * per_interval
    loads = np.array([trace.at(t0 + i * h) for i in range(steps)])
    uniq, counts = np.unique(loads, return_counts=True)
    arrivals = uniq * h * counts  # requests per distinct load over the trace
    total = float(loads.sum() * h)
    ranges = [range(target.affordable(p) + 1) for p in pools]
    mixes = [dict(zip([p.name for p in pools], ns, strict=True))
             for ns in itertools.product(*ranges) if sum(ns) >= max(1, target.min_replicas)]
    price = np.array([sum(m[p.name] * p.hourly_price for p in pools) * h / 3600 for m in mixes])
    # misses[k, j]: requests of the distinct load j that miss with mix k; cost[k, j] likewise
    misses = np.stack([arrivals * (1.0 - _step_share(uniq, m, pools, target.latency_p95_ms, h))
                       for m in mixes])
    cost = price[:, None] * counts[None, :]
    allowed = (1.0 - share) * total
    fewest = float(misses.min(axis=0).sum())
    best_share = 1.0 - fewest / total if total > 0 else 1.0
    if fewest > allowed + 1e-9 * total:
        return CostBound(share, math.inf, best_share, False)

    def dual(lam: float) -> tuple[float, float]:
        """(L(lam), its subgradient: misses at the minimisers - allowed)."""
        v = cost + lam * misses
        k = v.argmin(axis=0)
        cols = np.arange(v.shape[1])
        return float(v[k, cols].sum() - lam * allowed), float(misses[k, cols].sum() - allowed)

    best, _ = dual(0.0)
    lo, hi = 0.0, 1.0
    while dual(hi)[1] > 0 and hi < 1e12:
        lo, hi = hi, hi * 4
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2
        value, grad = dual(mid)
        best = max(best, value)
        lo, hi = (mid, hi) if grad > 0 else (lo, mid)
    best = max(best, dual(lo)[0], dual(hi)[0])
    return CostBound(share, best, best_share, True)


GAUSS_HERMITE_NODES = 16
BLIND_BISECTIONS = 30
CHUNK = 1024
"""Trace points per block of the blind bound's arrays (memory: mixes x CHUNK x nodes floats)."""


def blind_cost_lower_bound(mean: Trace, noise: float, pools: Sequence[PoolCapacity],
                           target: Target, share: float, cfg: SimConfig | None = None,
                           nodes: int = GAUSS_HERMITE_NODES) -> CostBound:
    """A lower bound on the EXPECTED cost of keeping ``share`` of the expected requests within the
    SLO, for any policy that cannot foresee the load's noise, on a trace drawn as each point's
    rate = ``mean`` x N(1, ``noise``), independently (bench/make_traces.py draws its traces so).

    The contender knows ``mean`` everywhere, mixes pools freely and starts every step with no
    backlog, as ``cost_lower_bound``'s, but it cannot foresee the noise, and it pays for a
    replica from the moment it asks for it, as the simulator charges. What that implies, for the
    simulator's steps of h seconds and a start-up of S:

    - a replica ready at step i was asked for by t_i - S and has been paid for since: the
      replicas paid for at step i - S/h (C) contain those ready at step i (R), and C was chosen
      seeing only the steps before i - S/h;
    - R is chosen seeing the steps before i (scale-down is instant);
    - a point's noise shows first in the requests of its first step.

    Charging each step for its C only (dropping the other steps a replica is paid for) and
    keeping only the constraint R within C, the steps decouple, and by weak duality (module doc,
    on expected cost and misses), for every lam >= 0:

        E[cost] >= sum_steps V_step(lam) - lam x (1 - share) x E[requests]

    with, for a step whose point's noise C cannot have seen, V = min over C of [c(C) + lam x
    E[misses of the best sub-mix R of C]] (R picked before or after seeing the noise, as the step
    allows); for one whose noise C could have seen, V = E[min over C of (c(C) + lam x misses)];
    the first S/h steps, whose C precede the trace, are charged nothing. Expectations over the
    noise are taken by Gauss-Hermite quadrature (``nodes`` points: a numerical expectation, exact
    for polynomials of degree 2 x nodes - 1). A bound on the average over draws of the noise,
    not on one draw; ``share`` is of the expected requests.
    """
    cfg = cfg or SimConfig()
    if not 0 <= noise < 1:  # NaN too
        raise ValueError(f"noise {noise!r}: expected a relative std within [0, 1)")
    dt = target.interval_seconds
    per_interval = max(1, round(dt / min(cfg.step_seconds, dt)))
    h = dt / per_interval
    steps = ticks(mean, target) * per_interval
    times = np.asarray(mean.times, dtype=float)
    at = times[0] + h * np.arange(steps)
    point = np.clip(np.searchsorted(times, at + 1e-9, side="right") - 1, 0, len(times) - 1)
    offset = at - times[point]
    lead = math.ceil(cfg.startup_seconds / h - 1e-9)  # C is paid this many steps before R serves
    # 0: R and C blind to the point's noise; 1: C blind, R not; 2: C sees it; 3: C precedes the
    # trace (charged nothing)
    kind = np.where(offset < h - 1e-9, 0, np.where(offset < (lead + 1) * h - 1e-9, 1, 2))
    kind = np.where(np.arange(steps) < lead, 3, kind)
    counts = np.zeros((len(times), 4))
    np.add.at(counts, (point, kind), 1.0)
    mu = np.asarray(mean.rates, dtype=float)
    x, w = np.polynomial.hermite.hermgauss(nodes)
    eps = np.maximum(0.0, 1.0 + noise * math.sqrt(2.0) * x)
    w = w / math.sqrt(math.pi)
    ranges = [range(target.affordable(p) + 1) for p in pools]
    grid = [len(r) for r in ranges]
    mixes = [dict(zip([p.name for p in pools], ns, strict=True))
             for ns in itertools.product(*ranges)]
    usable = np.array([sum(m.values()) >= max(1, target.min_replicas) for m in mixes])
    price = np.array([sum(m[p.name] * p.hourly_price for p in pools) * h / 3600 if ok
                      else np.inf for m, ok in zip(mixes, usable, strict=True)])
    total = float((mu * counts.sum(axis=1)).sum() * h)
    allowed = (1.0 - share) * total

    def block(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For points lo..hi: misses [mixes, points, nodes] (0 for unusable mixes), the
        expected misses of each mix's best sub-mix picked blind (kind 0) and after seeing the
        noise (kind 1), [mixes, points] (inf for unusable), and the fewest per draw."""
        loads = (mu[lo:hi, None] * eps[None, :]).ravel()
        miss = np.zeros((len(mixes), hi - lo, nodes))
        for k, m in enumerate(mixes):
            if usable[k]:
                within = _step_share(loads, m, pools, target.latency_p95_ms, h)
                miss[k] = (loads * h * (1.0 - within)).reshape(hi - lo, nodes)
        inf = np.where(usable[:, None, None], miss, np.inf)
        shape = (*grid, hi - lo)
        blind = _prefix_min((inf @ w).reshape(shape), grid).reshape(len(mixes), hi - lo)
        seen = _prefix_min(inf.reshape(*shape, nodes), grid).reshape(inf.shape) @ w
        return miss, blind, seen, inf.min(axis=0) @ w

    blocks = [(lo, min(lo + CHUNK, len(times))) for lo in range(0, len(times), CHUNK)]
    cached = [block(lo, hi) for lo, hi in blocks]
    fewest = sum(float((fw * counts[lo:hi].sum(axis=1)).sum())
                 for (lo, hi), (*_, fw) in zip(blocks, cached, strict=True))
    best_share = 1.0 - fewest / total if total > 0 else 1.0
    if fewest > allowed + 1e-9 * total:
        return CostBound(share, math.inf, best_share, False)

    def dual(lam: float) -> tuple[float, float]:
        """(L(lam), its subgradient: expected misses at the minimisers - allowed)."""
        value = spent = 0.0
        for (lo, hi), (miss, blind, seen, fw) in zip(blocks, cached, strict=True):
            cols = np.arange(hi - lo)
            parts = []
            for pm in (blind, seen):  # C blind; R blind (0) or not (1)
                v = np.where(usable[:, None], price[:, None] + lam * np.where(
                    usable[:, None], pm, 0.0), np.inf)
                k = v.argmin(axis=0)
                parts.append((v[k, cols], pm[k, cols]))
            v = price[:, None, None] + lam * miss  # C sees the noise
            k = v.argmin(axis=0)[None]
            parts.append((np.take_along_axis(v, k, 0)[0] @ w,
                          np.take_along_axis(miss, k, 0)[0] @ w))
            parts.append((lam * fw, fw))  # C before the trace: free
            c = counts[lo:hi]
            for j, (val, mis) in enumerate(parts):
                value += float((c[:, j] * val).sum())
                spent += float((c[:, j] * mis).sum())
        return value - lam * allowed, spent - allowed

    best, _ = dual(0.0)
    lo_l, hi_l = 0.0, 1.0
    while dual(hi_l)[1] > 0 and hi_l < 1e12:
        lo_l, hi_l = hi_l, hi_l * 4
    for _ in range(BLIND_BISECTIONS):
        mid = (lo_l + hi_l) / 2
        value, grad = dual(mid)
        best = max(best, value)
        lo_l, hi_l = (mid, hi_l) if grad > 0 else (lo_l, mid)
    best = max(best, dual(lo_l)[0], dual(hi_l)[0])
    return CostBound(share, best, best_share, True)


def _prefix_min(g: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """Over the mix grid (the leading axes, one per pool), the least value among each mix and
    its sub-mixes (no more replicas of any pool)."""
    for axis in range(len(grid)):
        g = np.minimum.accumulate(g, axis=axis)
    return g
