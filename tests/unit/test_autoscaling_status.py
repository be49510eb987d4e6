"""The policy's memory survives the operator's status: Decision.to_status / from_status is a
lossless, JSON-safe, bounded round trip, and the operator's glue is exactly it."""

from __future__ import annotations

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from leanserve.autoscaling.policy import (
    HISTORY_KEEP,
    Decision,
    Observation,
    PoolCapacity,
    Target,
    decide,
)
from leanserve.operator.autoscale import decision_from_status, decision_to_status

POOLS = [PoolCapacity("cpu-small", 40.0, 0.10), PoolCapacity("cpu-large", 170.0, 0.38)]
TARGET = Target(100, 1, 10, 2.0, 30, 300)


def through_json(d: Decision) -> Decision | None:
    text = json.dumps(d.to_status(), allow_nan=False)  # what the API server stores
    return Decision.from_status(json.loads(text))


def run(rates: list[float], p95s: list[float | None], step: float = 30.0,
        start: float = 0.0) -> list[Decision]:
    prev: Decision | None = None
    cur = {"cpu-small": 1, "cpu-large": 0}
    out = []
    for i, (r, p) in enumerate(zip(rates, p95s, strict=True)):
        t = start + i * step
        d = decide(Observation(t, r, p, None, cur, cur, arrival_rate=r,
                               pending=None if r is None else r * 0.05), POOLS, TARGET, prev, t)
        out.append(d)
        prev, cur = d, dict(d.replicas)
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.none(), st.floats(0, 600)),
                          st.one_of(st.none(), st.floats(0, 500))), min_size=1, max_size=40),
       st.floats(0, 3e9))
def test_decide_after_a_round_trip_equals_decide(seq, start):
    decisions = run([r for r, _ in seq], [p for _, p in seq], start=start)
    d = decisions[-1]
    back = through_json(d)
    assert back == d
    t = start + len(seq) * 30.0
    nxt = Observation(t, 123.0, 50.0, None, d.replicas, d.replicas, arrival_rate=130.0,
                      pending=3.0)
    assert decide(nxt, POOLS, TARGET, back, t) == decide(nxt, POOLS, TARGET, d, t)


def test_days_of_history_and_the_learnt_shape_round_trip_within_a_bounded_size():
    # two days at 5-minute decisions: the season has learnt every bucket of a weekday
    rates = [200 + 150 * math.sin(2 * math.pi * i / 288) for i in range(2 * 288)]
    decisions = run(rates, [40.0] * len(rates), step=300.0)
    d = decisions[-1]
    assert d.season is not None and sum(d.season.days[0]) > 0
    status = d.to_status()
    assert len(status["history"]) <= HISTORY_KEEP
    assert len(json.dumps(status)) < 64_000
    back = through_json(d)
    assert back == d
    t = len(rates) * 300.0
    nxt = Observation(t, 300.0, 40.0, None, d.replicas, d.replicas, arrival_rate=300.0)
    assert decide(nxt, POOLS, TARGET, back, t) == decide(nxt, POOLS, TARGET, d, t)


def test_the_operator_stores_and_reads_exactly_the_policys_round_trip():
    d = run([100.0, 150.0, 400.0], [30.0, 60.0, 300.0])[-1]
    assert decision_to_status(d) == d.to_status()
    assert decision_from_status(decision_to_status(d)) == d


def test_unreadable_status_costs_only_the_memory():
    for saved in (None, {}, {"last": "x"}, {"last": {"time": "soon"}},
                  {"last": {"time": 1, "replicas": {"a": 1}, "code": "Nope"}},
                  {"last": {"time": 1, "replicas": {"a": 1}, "code": "Steady"},
                   "history": [{"time": 1}]},
                  {"last": {"time": 1, "replicas": {"a": 1}, "code": "Steady"},
                   "season": {"levels": [[1.0]], "days": [[1]], "open": [0, 0, 0]}}):
        assert Decision.from_status(saved) is None  # type: ignore[arg-type]
    # a status written before the season existed still reads (its memory is the history)
    old = {"last": {"time": 5.0, "replicas": {"cpu-small": 2}, "reason": "", "code": "Steady",
                    "desired_rps": 10.0, "capacity_rps": 80.0, "hourly_cost": 0.2,
                    "slo_met": True},
           "history": [{"time": 5.0, "replicas": {"cpu-small": 2}, "rate": 10.0}]}
    d = Decision.from_status(old)
    assert d is not None and d.season is None and d.history[0].demand is None
