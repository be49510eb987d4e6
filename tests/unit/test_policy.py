"""The autoscaling policy: one pool at a time, the arrival-rate load signal, the latency curve,
pool switches that never drop capacity; a decision matrix plus hypothesis properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leanserve.autoscaling.capacity import DEFAULT_CURVE
from leanserve.autoscaling.errors import PolicyError
from leanserve.autoscaling.policy import (
    SETTINGS,
    Observation,
    PolicySettings,
    PoolCapacity,
    Reason,
    Target,
    capacity,
    decide,
    hourly_cost,
    pools_from_profile,
)

SMALL = PoolCapacity("cpu-small", 40.0, 0.10)
LARGE = PoolCapacity("cpu-large", 170.0, 0.38)
POOLS = [SMALL, LARGE]
TARGET = Target(latency_p95_ms=100, min_replicas=1, max_replicas=10, max_hourly_cost=2.0,
                interval_seconds=5, scale_down_stabilization_seconds=20)
PER_SMALL = SMALL.per_replica(SETTINGS.target_quantile)  # 99% within the SLO: ~30.8 req/s


def obs(t: float, rate: float | None, p95: float | None = 30.0,
        cur: dict[str, int] | None = None, ready: dict[str, int] | None = None,
        arrival: float | None = None, pending: float | None = None) -> Observation:
    cur = cur if cur is not None else {"cpu-small": 1, "cpu-large": 0}
    return Observation(t, rate, p95, None, ready if ready is not None else cur, cur,
                       arrival_rate=arrival, pending=pending)


def test_the_curve_sets_what_a_replica_carries():
    # 99% of requests within the SLO below the load where p95 reaches it (default shape)
    assert pytest.approx(40.0 * DEFAULT_CURVE.load_for(0.99)) == PER_SMALL
    assert PER_SMALL < 40.0
    assert DEFAULT_CURVE.p95_share(1.0) == pytest.approx(1.0)


@pytest.mark.parametrize(("rate", "p95", "cur", "expect", "code"), [
    # light load: one small replica
    (10.0, 20.0, {"cpu-small": 1, "cpu-large": 0}, {"cpu-small": 1, "cpu-large": 0},
     Reason.STEADY),
    # moderate load: more small replicas (the ready one is over its capacity: SLO at risk)
    (70.0, 30.0, {"cpu-small": 1, "cpu-large": 0}, {"cpu-small": 3, "cpu-large": 0},
     Reason.SLO_AT_RISK),
    # load shrinks within one pool, no window yet: down at once
    (100.0, 40.0, {"cpu-small": 0, "cpu-large": 3}, {"cpu-small": 0, "cpu-large": 1},
     Reason.SCALE_DOWN),
    # more than the budget allows: the most within it, flagged
    (2000.0, 400.0, {"cpu-small": 0, "cpu-large": 1}, {"cpu-small": 0, "cpu-large": 5},
     Reason.LIMITED),
])
def test_decision_matrix(rate, p95, cur, expect, code):
    d = decide(obs(0, rate, p95, cur), POOLS, TARGET, None, 0)
    assert d.replicas == expect
    assert d.code is code
    assert d.reason.startswith(code.value)
    assert d.hourly_cost == pytest.approx(hourly_cost(expect, POOLS))


@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -1.0])
def test_missing_metrics_hold_and_unknown(bad):
    cur = {"cpu-small": 3, "cpu-large": 0}
    d = decide(obs(0, bad, None, cur, arrival=bad), POOLS, TARGET, None, 0)
    assert d.replicas == cur
    assert d.slo_met is None
    assert d.code is Reason.METRICS_UNAVAILABLE
    assert d.reason.startswith("MetricsUnavailable: no request rate")


def test_missing_metrics_hold_at_least_min_replicas():
    import dataclasses

    at_least_3 = dataclasses.replace(TARGET, min_replicas=3)
    # replicas below minReplicas (raised while Prometheus is down): up to it, on the same pool
    d = decide(obs(0, None, None, {"cpu-small": 0, "cpu-large": 1}), POOLS, at_least_3, None, 0)
    assert d.replicas == {"cpu-small": 0, "cpu-large": 3}
    assert d.code is Reason.METRICS_UNAVAILABLE and "raised to minReplicas 3" in d.reason
    # nothing at all: the cheapest pool per request
    d = decide(obs(0, None, None, {"cpu-small": 0, "cpu-large": 0}), POOLS, TARGET, None, 0)
    assert d.replicas == {"cpu-small": 0, "cpu-large": 1}
    assert LARGE.price_per_rps < SMALL.price_per_rps


def test_the_arrival_rate_keeps_rising_where_the_served_rate_saturates():
    # 3 small replicas serve at most ~171 req/s whatever arrives; the arrival rate shows 400
    cur = {"cpu-small": 3, "cpu-large": 0}
    served = decide(obs(0, 120.0, 900.0, cur), POOLS, TARGET, None, 0)
    arrivals = decide(obs(0, 120.0, 900.0, cur, arrival=400.0), POOLS, TARGET, None, 0)
    assert capacity(arrivals.replicas, POOLS) > capacity(served.replicas, POOLS)
    assert arrivals.desired_rps == pytest.approx(400.0)
    assert "served; no arrival rate" in served.reason
    # a broken arrival query (below what was served) never hides load
    low = decide(obs(0, 120.0, 30.0, cur, arrival=10.0), POOLS, TARGET, None, 0)
    assert low.desired_rps == pytest.approx(120.0)


def test_a_backlog_of_pending_requests_is_drained():
    cur = {"cpu-small": 3, "cpu-large": 0}
    calm = decide(obs(0, 60.0, 30.0, cur, arrival=60.0, pending=6.0), POOLS, TARGET, None, 0)
    backed = decide(obs(0, 60.0, 30.0, cur, arrival=60.0, pending=600.0), POOLS, TARGET,
                    None, 0)
    assert calm.desired_rps == pytest.approx(60.0)  # 6 in flight at 60 req/s: no backlog
    assert backed.desired_rps > 60.0 + 500 / TARGET.interval_seconds - 1e-9
    assert "to drain it" in backed.reason


def test_scale_down_waits_for_stabilization_window():
    cur = {"cpu-small": 0, "cpu-large": 3}
    prev = decide(obs(0, 350.0, 50.0, cur), POOLS, TARGET, None, 0)
    assert prev.replicas["cpu-large"] == 3
    seen = []
    for t in range(5, 60, 5):
        cur = dict(prev.replicas)
        prev = decide(obs(t, 30.0, 20.0, cur), POOLS, TARGET, prev, t)
        seen.append((t, prev.replicas["cpu-large"], prev.code, prev.reason))
    # within the 20 s window of the 350 req/s need the large replicas stay
    assert all(n == 3 for t, n, _, _ in seen if t < 20)
    assert all(c is Reason.STABILIZING and "20s scale-down stabilization" in r
               for t, _, c, r in seen if t < 20)
    # afterwards one pool again, the cheapest for 30 req/s (plus the headroom the fall from
    # 350 leaves in the noise estimate): small replicas, after the switch completed
    assert prev.replicas["cpu-large"] == 0 and 1 <= prev.replicas["cpu-small"] <= 2


def test_a_pool_switch_keeps_the_old_pool_until_the_new_one_is_ready():
    # 320 req/s on small replicas: 20 of them could not carry twice that (no room to grow,
    # and none to switch later), large ones can; the switch starts them and keeps every small
    # replica until the large pool's READY replicas carry the demand
    cur = {"cpu-small": 11, "cpu-large": 0}
    t = Target(100, 1, 20, 5.0, 5, 0)
    d = decide(obs(0, 320.0, 50.0, cur, arrival=320.0), POOLS, t, None, 0)
    assert d.replicas["cpu-small"] == 11 and d.replicas["cpu-large"] >= 3
    assert "switching to cpu-large" in d.reason and d.code is Reason.SCALE_UP
    starting = dict(d.replicas)
    d2 = decide(obs(5, 320.0, 50.0, starting, {"cpu-small": 11, "cpu-large": 0}, 320.0),
                POOLS, t, d, 5)
    assert d2.replicas == starting and d2.code is Reason.SWITCHING
    d3 = decide(obs(10, 320.0, 50.0, starting, starting, 320.0), POOLS, t, d2, 10)
    assert d3.replicas == {"cpu-small": 0, "cpu-large": starting["cpu-large"]}
    assert "cpu-small released" in d3.reason


def test_no_switch_where_the_limits_leave_no_room_beside_the_old_pool():
    # 10 small replicas at maxReplicas=10: starting large ones beside them does not fit, and
    # dropping small ones first would lose capacity: stay, flagged
    cur = {"cpu-small": 10, "cpu-large": 0}
    d = decide(obs(0, 380.0, 50.0, cur, arrival=380.0), POOLS, Target(100, 1, 10, 5.0, 5, 0),
               None, 0)
    assert d.replicas == cur
    assert d.code is Reason.LIMITED and "staying on cpu-small" in d.reason


def test_rising_trend_provisions_ahead():
    prev = None
    for i, r in enumerate([50, 80, 110, 140]):
        d = decide(obs(i * 5, float(r), 30, {"cpu-small": 6, "cpu-large": 0}), POOLS, TARGET,
                   prev, i * 5)
        prev = d
    assert prev is not None and prev.desired_rps > 140
    assert "rising" in prev.reason


def test_a_windowed_rate_trails_a_ramp_by_half_its_window():
    # a perfect ramp of 6 req/s per 5 s decision: the trend projects start-up + interval ahead,
    # and from a W-second average W/2 more (what that average lags the load now by)
    def last(window: float | None) -> float:
        prev = None
        for i in range(6):
            o = obs(i * 5, 50.0 + 6 * i, 30, {"cpu-small": 6, "cpu-large": 0})
            o = Observation(o.time, o.request_rate, o.p95_ms, None, o.ready, o.current,
                            window_seconds=window)
            prev = decide(o, POOLS, TARGET, prev, i * 5)
        assert prev is not None and prev.desired_rps is not None
        return prev.desired_rps

    plain, windowed = last(None), last(60.0)
    assert plain > 80.0  # projected ahead of the last load at all
    # a perfect ramp: the trend is its slope (1.2 req/s per s), less one standard error of 0
    assert windowed - plain == pytest.approx(1.2 * 30.0, rel=1e-6)
    assert last(0.0) == plain


def test_pools_from_profile_and_errors():
    class P:
        def __init__(self, name, price):
            self.name, self.hourly_price = name, price

    class S:
        node_pools = [P("cpu-small", 0.1), P("cpu-large", 0.38)]

    prof = {"pools": {"cpu-small": {"capacity_rps": 41.5}, "cpu-large": {"capacity_rps": 160}}}
    pools = pools_from_profile(prof, S())
    assert [(p.name, p.capacity_rps, p.hourly_price) for p in pools] == [
        ("cpu-small", 41.5, 0.1), ("cpu-large", 160.0, 0.38)]
    assert all(p.curve == DEFAULT_CURVE for p in pools)  # no trials: the default shape
    with pytest.raises(PolicyError, match="cpu-large"):
        pools_from_profile({"pools": {"cpu-small": {"capacity_rps": 1}}}, S())
    with pytest.raises(PolicyError, match="capacity_rps must be a positive"):
        pools_from_profile({"pools": {"cpu-small": {"capacity_rps": 0},
                                      "cpu-large": {"capacity_rps": 1}}}, S())


def test_every_caller_of_the_policy_runs_the_shipped_settings():
    """The operator, `leanserve run`, `leanserve simulate` and the benches run PolicySettings()
    as shipped: nothing in the project builds other settings, and a copy of them changes only
    the start-up (physics: each platform's own), except the bench's labelled knob ablation."""
    import ast
    import inspect
    from pathlib import Path

    from leanserve.autoscaling.policy import decide
    from leanserve.autoscaling.simulate import SimConfig

    assert inspect.signature(decide).parameters["settings"].default is SETTINGS
    assert SimConfig().settings is SETTINGS
    root = Path(__file__).resolve().parents[2]
    copies = 0
    for path in [*root.glob("leanserve/**/*.py"), *root.glob("bench/*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        exempt = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                  and f.name == "ablation" and path.name == "autoscaling.py"
                  for n in ast.walk(f)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or id(node) in exempt:
                continue
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(
                f, ast.Attribute) else ""
            if name == "PolicySettings":
                assert path.name == "policy.py", f"{path}:{node.lineno} builds PolicySettings"
            first = node.args[0] if node.args else None
            if name == "replace" and (
                    (isinstance(first, ast.Name) and first.id == "SETTINGS")
                    or (isinstance(first, ast.Attribute) and first.attr == "settings")):
                changed = {k.arg for k in node.keywords}
                assert changed == {"startup_seconds"}, f"{path}:{node.lineno} changes {changed}"
                copies += 1
    assert copies >= 2  # `leanserve run` (its measured start-up) and the simulator's
    assert PolicySettings() == SETTINGS


mixes = st.fixed_dictionaries({"cpu-small": st.integers(0, 12), "cpu-large": st.integers(0, 6)})


@settings(max_examples=300, deadline=None)
@given(rate=st.one_of(st.none(), st.just(math.nan), st.floats(0, 5000)),
       arrival=st.one_of(st.none(), st.floats(0, 8000)),
       pending=st.one_of(st.none(), st.floats(0, 1e5)),
       p95=st.one_of(st.none(), st.floats(0, 2000)), cur=mixes, ready_share=st.floats(0, 1),
       max_r=st.integers(1, 12), budget=st.floats(0.1, 5.0), min_r=st.integers(0, 3))
def test_properties(rate, arrival, pending, p95, cur, ready_share, max_r, budget, min_r):
    t = Target(100, min(min_r, max_r), max_r, budget, 5, 20)
    ready = {k: math.floor(v * ready_share) for k, v in cur.items()}
    d = decide(obs(0, rate, p95, cur, ready, arrival, pending), POOLS, t, None, 0)
    # never above maxReplicas or the budget
    assert sum(d.replicas.values()) <= max_r
    assert hourly_cost(d.replicas, POOLS) <= budget + 1e-9
    within = sum(cur.values()) <= max_r and hourly_cost(cur, POOLS) <= budget
    no_rate = (rate is None or math.isnan(rate)) and arrival is None
    if no_rate:
        # held: never more than it had, except up to minReplicas
        if sum(cur.values()) >= t.min_replicas and within:
            assert d.replicas == cur
        elif sum(cur.values()) >= t.min_replicas:  # trimmed to the limits, then up to minReplicas
            assert sum(d.replicas.values()) <= sum(cur.values())
        else:
            assert sum(d.replicas.values()) <= t.min_replicas
            if any(hourly_cost({**cur, p.name: cur[p.name] + t.min_replicas - sum(cur.values())},
                               POOLS) <= budget for p in POOLS) and within:
                assert sum(d.replicas.values()) == t.min_replicas
        assert d.slo_met is None
        return
    # ONE pool is chosen; any other pool keeps at most its current replicas (a switch in
    # progress), never grows
    chosen = [n for n, v in d.history[-1].replicas if v > 0]
    assert len(chosen) <= 1
    for k in cur:
        if k not in chosen:
            assert d.replicas[k] <= cur[k]
    if p95 is not None and p95 > 100 and within:
        # never scales down while p95 is above the SLO (unless a limit forces it)
        assert all(d.replicas[k] >= cur[k] for k in chosen) or d.code is Reason.LIMITED


def test_a_switch_the_limits_trim_keeps_the_new_pools_replicas():
    # a flood mid-switch: 12 large replicas serve beside 3 small ones and still do not carry
    # the load; the budget leaves no room for a 13th. The large ones stay (dropping serving
    # replicas to start small ones only loses capacity: bench/autoscaling.py's 300 s start-up
    # row on the held-out quiet trace found this)
    cur = {"cpu-small": 3, "cpu-large": 12}
    d = decide(obs(0, 120.0, 5000.0, cur, cur, 5000.0, 1e5),
               POOLS, Target(100, 1, 20, 5.0, 5, 0), None, 0)
    assert d.replicas == cur
    assert d.code is Reason.LIMITED and "switching to cpu-large" in d.reason
