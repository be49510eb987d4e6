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
