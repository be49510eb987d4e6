"""The policy's answers to bursts (TUNED_SETTINGS): remembered jumps, burst headroom, breaches
scaled from the capacity that produced them, and the window holding a breach's plan.

Each behaviour is checked against the same observations with it switched off, so a test fails
when the behaviour stops making the difference it is there for. One pool of 1 req/s replicas makes
the replica count read back the capacity the policy asked for.
"""

from __future__ import annotations

import pytest
from test_autoscaling_tuned import run as run_decisions

from leanserve.autoscaling.policy import (
    DEFAULT_SETTINGS,
    TUNED_SETTINGS,
    Decision,
    Observation,
    PolicySettings,
    PoolCapacity,
    Target,
    decide,
)

UNIT = [PoolCapacity("unit", 1.0, 0.01)]
NO_WINDOW = Target(latency_p95_ms=100, min_replicas=1, max_replicas=1000, max_hourly_cost=None,
                   interval_seconds=5, scale_down_stabilization_seconds=0)
WINDOW = Target(latency_p95_ms=100, min_replicas=1, max_replicas=1000, max_hourly_cost=None,
                interval_seconds=5, scale_down_stabilization_seconds=60)


def run(rates: list[float], p95s: list[float], target: Target, st_: PolicySettings,
        start: int = 100) -> list[Decision]:
    """Decisions every interval on the 1 req/s pool; what the policy asks for is ready at the
    next one."""
    return run_decisions(rates, list(p95s), UNIT, target, st_, {"unit": start})


def test_default_settings_leave_the_burst_behaviour_off():
    # the operator and the local platform decide with DEFAULT_SETTINGS: unchanged by all this
    assert DEFAULT_SETTINGS.jump_memory_seconds == 0
    assert DEFAULT_SETTINGS.burst_headroom == 0
    assert DEFAULT_SETTINGS.hold_breach_seconds == 0
    assert not DEFAULT_SETTINGS.breach_on_measured_capacity
    assert TUNED_SETTINGS.jump_memory_seconds > 0 and TUNED_SETTINGS.burst_headroom > 0
    assert TUNED_SETTINGS.breach_on_measured_capacity and TUNED_SETTINGS.hold_breach_seconds > 0


@pytest.mark.parametrize("measured", [False, True])
def test_breach_scales_from_the_capacity_that_produced_it(measured):
    # p95 10x the SLO was measured while 100 replicas were ready; 200 are ready now. Doubling
    # the 200 answers a breach the 200 already fixed
    st_ = PolicySettings(breach_factor=2.0, breach_on_measured_capacity=measured)
    first = decide(Observation(0, 150.0, 1000.0, None, {"unit": 100}, {"unit": 200}), UNIT,
                   NO_WINDOW, None, 0, st_)
    assert first.replicas["unit"] == 200
    now = decide(Observation(5, 150.0, 1000.0, None, {"unit": 200}, {"unit": 200}), UNIT,
                 NO_WINDOW, first, 5, st_)
    assert now.replicas["unit"] == (200 if measured else 400)


def jump_then_breach(jump_to: float) -> tuple[list[float], list[float]]:
    """100 req/s, a jump the replicas served (p95 fine), 100 again, then a saturated breach."""
    rates = [100.0] * 10 + [jump_to] * 5 + [100.0] * 10 + [150.0]
    p95s = [50.0] * 25 + [1000.0]
    return rates, p95s


@pytest.mark.parametrize("memory", [0.0, 30.0, 600.0])
def test_saturated_breach_plans_for_the_jump_remembered(memory):
    st_ = PolicySettings(censored_saturation=True, breach_factor=2.0, jump_memory_seconds=memory)
    rates, p95s = jump_then_breach(500.0)
    last = run(rates, p95s, NO_WINDOW, st_)[-1]
    if memory == 600.0:
        # the load jumped 5x from 100 a minute ago: plan for 500 at 90% utilisation at once
        assert last.replicas["unit"] == pytest.approx(500 / 0.9, abs=1)
        assert "jumped up to 5.0x" in last.reason
    else:
        # no memory, or the jump is older than it (30 s): 2x the censored 150 req/s
        assert last.replicas["unit"] == pytest.approx(300, abs=1)
        assert "jumped" not in last.reason


def test_a_jump_smaller_than_the_breach_factor_leaves_the_breach_rule():
    on = PolicySettings(censored_saturation=True, breach_factor=2.0, jump_memory_seconds=600)
    off = PolicySettings(censored_saturation=True, breach_factor=2.0)
    rates, p95s = jump_then_breach(150.0)
    assert run(rates, p95s, NO_WINDOW, on)[-1].replicas == run(rates, p95s, NO_WINDOW,
                                                                 off)[-1].replicas


def test_a_censored_rate_can_top_a_jump():
    # the jump itself was saturated (p95 10x the SLO at 400 served): the load was at least 4x
    st_ = PolicySettings(censored_saturation=True, breach_factor=2.0, jump_memory_seconds=600)
    rates = [100.0] * 10 + [400.0] * 3 + [100.0] * 10 + [150.0]
    p95s = [50.0] * 10 + [1000.0] * 3 + [50.0] * 10 + [1000.0]
    last = run(rates, p95s, NO_WINDOW, st_)[-1]
    assert "jumped up to 4.0x" in last.reason
    assert last.replicas["unit"] == pytest.approx(400 / 0.9, abs=1)


HEADROOM = dict(adaptive_headroom=True, forecast_headroom=True, min_headroom=0.05,
                jump_memory_seconds=600.0)


@pytest.mark.parametrize(("shape", "burst_headroom", "want"), [
    ("burst", 0.3, 130),   # went up 2x and came back: at least 30% headroom
    ("burst", 0.0, 105),   # switched off: min_headroom
    ("step", 0.3, 210),    # went up 2x and stayed: a new level, not a burst
])
def test_burst_headroom_only_after_a_burst_that_came_back(shape, burst_headroom, want):
    st_ = PolicySettings(**HEADROOM, burst_headroom=burst_headroom)
    if shape == "burst":
        rates = [100.0] * 20 + [200.0] * 4 + [100.0] * 40
    else:
        rates = [100.0] * 20 + [200.0] * 44
    last = run(rates, [50.0] * len(rates), NO_WINDOW, st_)[-1]
    # the forecast errors of the burst itself have left the 120 s volatility window by now
    assert last.replicas["unit"] == pytest.approx(want, abs=1)


@pytest.mark.parametrize("hold", [0.0, 30.0])
def test_window_holds_a_breach_plan_for_a_while(hold):
    # a saturated breach at 140 req/s served asks for 2x; the first rate after it (120, still an
    # average over saturated samples) would release that capacity at once without the hold
    st_ = PolicySettings(adaptive_headroom=True, forecast_headroom=True, censored_saturation=True,
                         breach_factor=2.0, hold_breach_seconds=hold)
    rates = [100.0] * 20 + [140.0] * 3 + [120.0]
    p95s = [50.0] * 20 + [1000.0] * 3 + [50.0]
    ds = run(rates, p95s, WINDOW, st_)
    assert ds[-2].replicas["unit"] >= 280
    if hold:
        assert ds[-1].replicas["unit"] >= 280
    else:
        assert ds[-1].replicas["unit"] < 200
