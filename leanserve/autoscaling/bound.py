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
``_step_share``. A queue timeout, ``SimConfig.queue_timeout_ms``, only turns some of the
requests a backlog delays into misses, so it too stays under this share.) (P) is an integer
program; its Lagrangian dual,

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from leanserve.autoscaling.capacity import LN20
from leanserve.autoscaling.policy import PoolCapacity, Target
from leanserve.autoscaling.simulate import SATURATED_U, SimConfig, Trace, step_grid

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
    h, _, steps = step_grid(trace, target, cfg or SimConfig())
    t0 = trace.times[0]
    loads = np.array([trace.at(t0 + i * h) for i in range(steps)])
    uniq, counts = np.unique(loads, return_counts=True)
    arrivals = uniq * h * counts  # requests per distinct load over the trace
    total = float(loads.sum() * h)
    _, every, usable = _mix_grid(pools, target)
    mixes = [m for m, ok in zip(every, usable, strict=True) if ok]
    price = _price(mixes, pools, h)
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

    return CostBound(share, _maximise(dual, BISECTIONS), best_share, True)


def _maximise(dual: Callable[[float], tuple[float, float]], bisections: int) -> float:
    """The most of a concave dual L(lam) over lam >= 0 found by bisection on its subgradient
    (every value it returns is a valid lower bound: weak duality holds at every lam)."""
    best, _ = dual(0.0)
    lo, hi = 0.0, 1.0
    while dual(hi)[1] > 0 and hi < 1e12:
        lo, hi = hi, hi * 4
    for _ in range(bisections):
        mid = (lo + hi) / 2
        value, grad = dual(mid)
        best = max(best, value)
        lo, hi = (mid, hi) if grad > 0 else (lo, mid)
    return max(best, dual(lo)[0], dual(hi)[0])


def _mix_grid(pools: Sequence[PoolCapacity], target: Target
              ) -> tuple[list[int], list[dict[str, int]], np.ndarray]:
    """Every replica mix within each pool's limits, pool by pool as a grid: (the grid's shape,
    the mixes in its order, whether each has minReplicas)."""
    ranges = [range(target.affordable(p) + 1) for p in pools]
    mixes = [dict(zip([p.name for p in pools], ns, strict=True))
             for ns in itertools.product(*ranges)]
    usable = np.array([sum(m.values()) >= max(1, target.min_replicas) for m in mixes])
    return [len(r) for r in ranges], mixes, usable


def _price(mixes: Sequence[dict[str, int]], pools: Sequence[PoolCapacity], h: float
           ) -> np.ndarray:
    """USD each mix costs for one step of ``h`` seconds."""
    return np.array([sum(m[p.name] * p.hourly_price for p in pools) * h / 3600 for m in mixes])


GAUSS_HERMITE_NODES = 8
BLIND_BISECTIONS = 30
CHUNK = 1024
"""Laws per block of the blind bounds' arrays (memory: mixes x CHUNK x outcomes floats)."""


@dataclass(frozen=True)
class StepLaws:
    """What each step's load may be, as seen when the replicas serving it had to be asked for.

    Rows are steps (or runs of steps with one law, ``count`` of them); columns the law's
    outcomes. ``asked_sees`` and ``ready_sees`` group the outcomes that the replicas paid for
    (asked one start-up before the step) and the ready replicas (trimmed up to the step) cannot
    tell apart; every ``ready_sees`` group lies within one ``asked_sees`` group. A row's
    probabilities may sum to less than 1: outcomes left out count for nothing (which can only
    lower the bound)."""

    loads: np.ndarray
    """[rows, outcomes] requests/s."""
    probs: np.ndarray
    asked_sees: np.ndarray
    """[rows, outcomes] ints in 0..outcomes-1."""
    ready_sees: np.ndarray
    count: np.ndarray
    """[rows] steps with this law."""
    charged: np.ndarray
    """[rows] False where the replicas were paid for before the trace began (charged nothing)."""

    def __post_init__(self) -> None:
        shape = self.loads.shape
        if any(np.shape(a) != shape for a in (self.probs, self.asked_sees, self.ready_sees)) \
                or np.shape(self.count) != shape[:1] or np.shape(self.charged) != shape[:1]:
            raise ValueError("StepLaws: arrays of mismatched shapes")
        if np.any(self.probs < 0) or np.any(self.probs.sum(axis=1) > 1 + 1e-9):
            raise ValueError("StepLaws: probabilities must be >= 0 and sum to <= 1 per row")
        for a in (self.asked_sees, self.ready_sees):
            if np.any((a < 0) | (a >= shape[1])):
                raise ValueError("StepLaws: group ids must lie within 0..outcomes-1")
        # every ready group within one asked group
        for g in range(shape[1]):
            sel = self.ready_sees == g
            asked = np.where(sel, self.asked_sees, -1)
            lo = np.where(sel, asked, shape[1]).min(axis=1)
            if np.any(sel.any(axis=1) & (asked.max(axis=1) != lo)):
                raise ValueError("StepLaws: a ready_sees group spans two asked_sees groups")


def concat_laws(parts: Sequence[StepLaws]) -> StepLaws:
    """Several traces' StepLaws as one (the bound then covers the sum of their costs); rows of
    fewer outcomes are padded with outcomes of probability 0."""
    width = max(p.loads.shape[1] for p in parts)

    def pad(a: np.ndarray) -> np.ndarray:
        return np.pad(a, ((0, 0), (0, width - a.shape[1])))

    return StepLaws(np.concatenate([pad(p.loads) for p in parts]),
                    np.concatenate([pad(p.probs) for p in parts]),
                    np.concatenate([pad(p.asked_sees) for p in parts]),
                    np.concatenate([pad(p.ready_sees) for p in parts]),
                    np.concatenate([p.count for p in parts]),
                    np.concatenate([p.charged for p in parts]))


def law_cost_lower_bound(laws: StepLaws, pools: Sequence[PoolCapacity], target: Target,
                         share: float, step_seconds: float) -> CostBound:
    """A lower bound on the EXPECTED cost of keeping ``share`` of the expected requests within
    the SLO, for any policy whose replicas are paid for from the moment they are asked for and
    serve one start-up later, on loads that follow ``laws`` (see StepLaws), under the
    simulator's physics on steps of ``step_seconds``, mixing pools freely, with no backlog.

    Charging each step for the replicas asked for it (C) and keeping only the constraint that
    the ready ones (R) are among them, the steps decouple; by weak duality (module doc, on
    expected cost and misses), for every lam >= 0:

        E[cost] >= sum_rows count x V_row(lam) - lam x (1 - share) x E[requests]
        V = sum over asked groups a of min over C of [P(a) x c(C) + lam x sum over the ready
            groups r within a of min over the sub-mixes R of C of P(r) x E[misses(R) | r]]
    """
    h = step_seconds
    grid, mixes, usable = _mix_grid(pools, target)
    price = _price([m for m, ok in zip(mixes, usable, strict=True) if ok], pools, h)
    rows, k = laws.loads.shape
    count = np.asarray(laws.count, dtype=float)
    total = float((count * (laws.probs * laws.loads).sum(axis=1)).sum() * h)
    allowed = (1.0 - share) * total
    if not usable.any():  # no mix within the limits has minReplicas: nothing can serve
        return CostBound(share, math.inf, 0.0 if total > 0 else 1.0, False)

    def block(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(A [usable mixes, rows, asked groups]: the best sub-mix's weighted expected misses
        summed over the ready groups of each asked group; P [rows, asked groups] x charged)."""
        n, rows_here = hi - lo, order[lo:hi]
        loads, probs = laws.loads[rows_here], laws.probs[rows_here]
        rs, asks = laws.ready_sees[rows_here], laws.asked_sees[rows_here]
        kc = int(asks.max()) + 1  # asked groups in this block (rows sorted by it)
        values, where = np.unique(loads.ravel(), return_inverse=True)
        by_ready = (np.arange(n)[:, None] * k + rs).ravel()
        expected = np.full((len(mixes), n, k), np.inf)
        for j, m in enumerate(mixes):
            if usable[j]:
                within = _step_share(values, m, pools, target.latency_p95_ms, h)
                miss = (values * h * (1.0 - within))[where] * probs.ravel()
                expected[j] = np.bincount(by_ready, miss, n * k).reshape(n, k)
        # a usable mix is its own sub-mix: its best is finite; unusable ones go
        best = _prefix_min(expected.reshape(*grid, n, k), grid).reshape(expected.shape)[usable]
        m = len(best)
        # each ready group's misses go to its asked group
        owner = np.zeros((n, k), dtype=int)
        owner[np.arange(n)[:, None], rs] = asks
        flat = (np.arange(m)[:, None, None] * (n * kc)
                + (np.arange(n)[:, None] * kc + owner)[None]).ravel()
        groups = np.bincount(flat, best.ravel(), m * n * kc).reshape(m, n, kc)
        p_asked = np.bincount((np.arange(n)[:, None] * kc + asks).ravel(), probs.ravel(),
                              n * kc).reshape(n, kc)
        return groups, p_asked * np.asarray(laws.charged[rows_here], dtype=float)[:, None]

    order = np.argsort(laws.asked_sees.max(axis=1), kind="stable")
    count = count[order]
    blocks = [(lo, min(lo + CHUNK, rows)) for lo in range(0, rows, CHUNK)]
    cached = [block(lo, hi) for lo, hi in blocks]
    fewest = sum(float((count[lo:hi] * a.min(axis=0).sum(axis=1)).sum())
                 for (lo, hi), (a, _) in zip(blocks, cached, strict=True))
    best_share = 1.0 - fewest / total if total > 0 else 1.0
    if fewest > allowed + 1e-9 * total:
        return CostBound(share, math.inf, best_share, False)

    def dual(lam: float) -> tuple[float, float]:
        """(L(lam), its subgradient: expected misses at the minimisers - allowed)."""
        value = spent = 0.0
        for (lo, hi), (a, pc) in zip(blocks, cached, strict=True):
            v = price[:, None, None] * pc[None] + lam * a
            j = v.argmin(axis=0)[None]
            c = count[lo:hi, None]
            value += float((c * np.take_along_axis(v, j, 0)[0]).sum())
            spent += float((c * np.take_along_axis(a, j, 0)[0]).sum())
        return value - lam * allowed, spent - allowed

    return CostBound(share, _maximise(dual, BLIND_BISECTIONS), best_share, True)


def noise_laws(mean: Trace, noise: float, target: Target, cfg: SimConfig | None = None,
               nodes: int = GAUSS_HERMITE_NODES) -> tuple[StepLaws, float]:
    """(the StepLaws of a trace drawn as each point = ``mean`` x N(1, ``noise``),
    independently, on the simulator's steps; the step length). A point's noise shows first in
    the requests of its first step: the replicas asked for a step of a point that had not begun
    one start-up + one step before cannot tell its noise, the ready ones only from the point's
    second step on; the first start-up's steps were paid for before the trace (uncharged).
    Expectations over the noise by Gauss-Hermite quadrature (``nodes`` points, exact for
    polynomials of degree 2 x nodes - 1)."""
    cfg = cfg or SimConfig()
    if not 0 <= noise < 1:  # NaN too
        raise ValueError(f"noise {noise!r}: expected a relative std within [0, 1)")
    h, _, steps = step_grid(mean, target, cfg)
    times = np.asarray(mean.times, dtype=float)
    at = times[0] + h * np.arange(steps)
    point = np.clip(np.searchsorted(times, at + 1e-9, side="right") - 1, 0, len(times) - 1)
    offset = at - times[point]
    lead = math.ceil(cfg.startup_seconds / h - 1e-9)
    # 0: asked and ready blind to the point's noise; 1: asked blind, ready not; 2: asked sees
    # it; 3: asked before the trace (uncharged, sees it)
    kind = np.where(offset < h - 1e-9, 0, np.where(offset < (lead + 1) * h - 1e-9, 1, 2))
    kind = np.where(np.arange(steps) < lead, 3, kind)
    counts = np.zeros((len(times), 4))
    np.add.at(counts, (point, kind), 1.0)
    pts, kinds = np.nonzero(counts)
    x, w = np.polynomial.hermite.hermgauss(nodes)
    eps = np.maximum(0.0, 1.0 + noise * math.sqrt(2.0) * x)
    mu = np.asarray(mean.rates, dtype=float)[pts]
    each = np.arange(nodes)[None, :].repeat(len(pts), axis=0)
    none = np.zeros_like(each)
    return StepLaws(
        loads=mu[:, None] * eps[None, :],
        probs=np.repeat((w / math.sqrt(math.pi))[None, :], len(pts), axis=0),
        asked_sees=np.where(kinds[:, None] >= 2, each, none),
        ready_sees=np.where(kinds[:, None] >= 1, each, none),
        count=counts[pts, kinds], charged=kinds != 3), h


def blind_cost_lower_bound(mean: Trace, noise: float, pools: Sequence[PoolCapacity],
                           target: Target, share: float, cfg: SimConfig | None = None,
                           nodes: int = GAUSS_HERMITE_NODES) -> CostBound:
    """A lower bound on the EXPECTED cost of keeping ``share`` of the expected requests within the
    SLO, for any policy that cannot foresee the load's noise, on a trace drawn as each point's
    rate = ``mean`` x N(1, ``noise``), independently (bench/make_traces.py draws its traces so).

    The contender knows ``mean`` everywhere, mixes pools freely and starts every step with no
    backlog, as ``cost_lower_bound``'s, but it cannot foresee the noise, and it pays for a
    replica from the moment it asks for it, as the simulator charges: a replica ready at step i
    was asked for by t_i - S (the start-up) and has been paid for since, chosen seeing only the
    steps before i - S/h; the ready replicas are trimmed seeing the steps before i (scale-down
    is instant); a point's noise shows first in the requests of its first step
    (``noise_laws``, ``law_cost_lower_bound``). A bound on the average over draws of the noise,
    not on one draw; ``share`` is of the expected requests.
    """
    laws, h = noise_laws(mean, noise, target, cfg, nodes)
    return law_cost_lower_bound(laws, pools, target, share, h)


def _prefix_min(g: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """Over the mix grid (the leading axes, one per pool), the least value among each mix and
    its sub-mixes (no more replicas of any pool)."""
    for axis in range(len(grid)):
        g = np.minimum.accumulate(g, axis=axis)
    return g
