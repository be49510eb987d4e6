"""The cost lower bound is below what every contender the simulator runs pays for the share it
reaches (so "the bound is above the ceiling" proves a target pair impossible), close to the oracle
(so it is not vacuous), and rises with the share asked."""

from __future__ import annotations

import math

import numpy as np
import pytest

from leanserve.autoscaling.bound import (
    StepLaws,
    _step_share,
    _within,
    blind_cost_lower_bound,
    cost_lower_bound,
)
from leanserve.autoscaling.capacity import DEFAULT_CURVE, LatencyCurve
from leanserve.autoscaling.policy import PoolCapacity, Target
from leanserve.autoscaling.simulate import SimConfig, Trace, _Queues, simulate

POOLS = [PoolCapacity("cpu-small", 40.0, 0.10), PoolCapacity("cpu-large", 170.0, 0.38)]
TARGET = Target(latency_p95_ms=100.0, max_replicas=10, max_hourly_cost=2.0)
CFG = SimConfig(startup_seconds=30.0)


def _trace() -> Trace:
    """Half an hour: a slow rise, a jump and a fall, with noise (seeded)."""
    rng = np.random.default_rng(7)
    t = np.arange(0, 1800, 10.0)
    rate = 60 + 140 * np.clip((t - 300) / 600, 0, 1) + np.where((t > 1100) & (t < 1300), 250, 0)
    rate = rate * rng.normal(1.0, 0.05, t.size)
    return Trace(tuple(t), tuple(float(max(0.0, r)) for r in rate))


def test_no_contender_pays_less_than_the_bound_at_the_share_it_reaches():
    trace = _trace()
    sim = simulate(trace, POOLS, TARGET, CFG)
    for name, run in sim.runs.items():
        s = run.summary()
        bound = cost_lower_bound(trace, POOLS, TARGET, s["slo_attainment"], CFG)
        assert bound.feasible
        assert bound.cost <= s["cost"] * (1 + 1e-9), name
    # the oracle pays for no start-up either: the bound is close to it, not vacuous
    oracle = sim.runs["oracle"].summary()
    assert cost_lower_bound(trace, POOLS, TARGET, oracle["slo_attainment"], CFG).cost \
        >= 0.9 * oracle["cost"]


def test_the_bound_rises_with_the_share_and_refuses_the_unreachable():
    trace = _trace()
    costs = [cost_lower_bound(trace, POOLS, TARGET, s, CFG).cost for s in (0.9, 0.99, 0.9999)]
    assert costs[0] < costs[1] < costs[2]
    # a budget that affords one small replica cannot keep 99% within the SLO at 400 req/s
    poor = Target(latency_p95_ms=100.0, max_replicas=10, max_hourly_cost=0.1)
    b = cost_lower_bound(trace, POOLS, poor, 0.99, CFG)
    assert not b.feasible and math.isinf(b.cost) and b.best_share < 0.99


@pytest.mark.parametrize("load", [10.0, 39.0, 60.0, 120.0, 400.0])
def test_a_steps_share_is_at_least_the_simulators_from_any_backlog(load: float):
    mix = {"cpu-small": 2, "cpu-large": 0}
    upper = float(_step_share(np.array([load]), mix, POOLS, 100.0, 10.0)[0])
    for backlog in (0.0, 1e-6, 5.0, 500.0):
        q = _Queues({"cpu-small": backlog, "cpu-large": 0.0})
        req, within, *_ = q.step(load, mix, POOLS, 100.0, 10.0)
        assert within / req <= upper + 1e-12


@pytest.mark.parametrize("curve", [DEFAULT_CURVE, LatencyCurve(0.017, 0.180, 1.236, True)])
def test_the_vectorised_share_is_the_curves(curve: LatencyCurve):
    """bound._within is LatencyCurve.within over arrays (the bound needs millions of them)."""
    us = np.linspace(-0.1, 1.5, 33)
    for wait in (0.0, 0.3, 1.2):
        got = _within(us, wait, curve.a, curve.b, curve.m)
        assert got == pytest.approx([curve.within(float(u), wait) for u in us], abs=1e-12)


def _mean(point_s: float = 10.0) -> Trace:
    """_trace's shape without its noise, one point every ``point_s`` seconds."""
    t = np.arange(0, 1800, point_s)
    rate = 60 + 140 * np.clip((t - 300) / 600, 0, 1) + np.where((t > 1100) & (t < 1300), 250, 0)
    return Trace(tuple(float(x) for x in t), tuple(float(r) for r in rate))


@pytest.mark.parametrize("point_s", [10.0, 60.0])
def test_no_policy_blind_to_the_noise_pays_less_than_the_blind_bound_on_average(point_s: float):
    mean, noise = _mean(point_s), 0.1
    rng = np.random.default_rng(3)
    cost: dict[str, float] = {}
    within: dict[str, float] = {}
    requests: dict[str, float] = {}
    draws = 12
    for _ in range(draws):
        noisy = Trace(mean.times, tuple(float(max(0.0, r * rng.normal(1.0, noise)))
                                        for r in mean.rates))
        sim = simulate(noisy, POOLS, TARGET, CFG)
        for name, run in sim.runs.items():
            cost[name] = cost.get(name, 0.0) + run.cost / draws
            within[name] = within.get(name, 0.0) + run.within
            requests[name] = requests.get(name, 0.0) + run.requests
    for name in cost:
        share = within[name] / requests[name]
        bound = blind_cost_lower_bound(mean, noise, POOLS, TARGET, share, CFG)
        if name != "oracle":
            assert bound.feasible and bound.cost <= cost[name], name
        elif point_s == 10.0:
            # the oracle foresees every step's noise, which the bound forbids: here it does
            # better than any blind policy could (it is not a contender the bound covers)
            assert cost[name] < bound.cost
    # without noise it is the clairvoyant bound on that load but for the first start-up's
    # worth of steps, which it charges nothing (3 of 180); blindness costs more than that
    still = blind_cost_lower_bound(mean, 0.0, POOLS, TARGET, 0.999, CFG)
    clairvoyant = cost_lower_bound(mean, POOLS, TARGET, 0.999, CFG).cost
    assert 0.97 * clairvoyant <= still.cost <= clairvoyant
    assert blind_cost_lower_bound(mean, noise, POOLS, TARGET, 0.999, CFG).cost > still.cost


def test_the_blind_bound_refuses_a_noise_it_cannot_model():
    for bad in (-0.1, 1.0, math.nan):
        with pytest.raises(ValueError, match="noise"):
            blind_cost_lower_bound(_mean(), bad, POOLS, TARGET, 0.99, CFG)


def test_step_laws_refuse_what_the_bound_cannot_read():
    ones = np.ones((2, 2))
    ids = np.zeros((2, 2), dtype=int)
    ok = dict(loads=ones * 10, probs=ones / 2, asked_sees=ids, ready_sees=ids,
              count=np.ones(2), charged=np.ones(2, dtype=bool))
    StepLaws(**ok)
    for change, why in ((dict(probs=ones), "sum to <= 1"), (dict(probs=-ones / 2), ">= 0"),
                        (dict(count=np.ones(3)), "mismatched"),
                        (dict(ready_sees=ids + 2), "within 0..outcomes-1"),
                        # two outcomes the ready replicas cannot tell apart, but the asked ones can
                        (dict(asked_sees=np.array([[0, 1], [0, 0]]), ready_sees=ids),
                         "spans two")):
        with pytest.raises(ValueError, match=why):
            StepLaws(**{**ok, **change})
