"""Forecasting from the learnt daily shape: it scales ahead of a rise that comes at the same time
every day, where the reactive path can only follow it; and it learns nothing from one day."""

from __future__ import annotations

import dataclasses

import numpy as np

from leanserve.autoscaling.policy import SETTINGS, PoolCapacity, Season, Target
from leanserve.autoscaling.simulate import SimConfig, Trace, simulate

DAY = 86400.0
MONDAY = 4 * DAY  # 1970-01-05, a Monday: the policy's weekday/weekend classes line up
POOLS = [PoolCapacity("cpu-small", 400.0, 0.10), PoolCapacity("cpu-large", 1600.0, 0.38)]


def daily_rush(days: int = 3, seed: int = 7) -> Trace:
    """A shape no setting was chosen on: a flat load that jumps 2.5x within two minutes at
    13:20 every day (a scheduled job, a daily push) and falls back an hour later, 3% noise."""
    rng = np.random.default_rng(seed)
    t = MONDAY + np.arange(0, days * DAY, 60.0)
    hours = (t % DAY) / 3600
    rush = np.clip((hours - 13 - 1 / 3) * 30, 0, 1) * (hours < 14 + 1 / 3)
    rate = 1500.0 * (1 + 1.5 * rush) * rng.normal(1, 0.03, t.size)
    return Trace(tuple(float(x) for x in t), tuple(float(x) for x in rate))


def test_the_learnt_shape_beats_the_reactive_path_on_a_daily_rush():
    tr = daily_rush()
    target = Target(100, 1, 20, 8.0, 30, 300)
    runs = {}
    for seasonal in (True, False):
        cfg = SimConfig(settings=dataclasses.replace(SETTINGS, seasonal=seasonal))
        runs[seasonal] = simulate(tr, POOLS, target, cfg, only=("leanserve",)).runs["leanserve"]
    with_shape, reactive = runs[True].summary(), runs[False].summary()
    # the first day is the same (nothing learnt yet); on the next two the rush is met ahead
    assert with_shape["slo_attainment"] > reactive["slo_attainment"] + 0.002
    assert with_shape["interval_attainment"] > reactive["interval_attainment"]
    assert with_shape["cost"] <= 1.05 * reactive["cost"]
    # ... by scaling before 13:20 on the days after the first, never on the first

    def before_rush(seasonal: bool, day: int) -> float:
        run = runs[seasonal]
        i = next(k for k, t in enumerate(run.times) if t >= MONDAY + day * DAY + 13.3 * 3600)
        return run.capacity[i - 1]

    assert before_rush(True, 2) > before_rush(False, 2)
    assert before_rush(True, 0) == before_rush(False, 0)


def test_the_shape_needs_a_day_and_tells_weekdays_from_weekends():
    s = Season()
    for k in range(0, int(DAY), 300):  # one Monday: 100 req/s, 300 from 12:00
        s = s.observe(MONDAY + k, 300.0 if k >= 12 * 3600 else 100.0)
    # six minutes before noon the next Monday it sees most of the 3x rise coming (the shape
    # is a 5-minute average, read linearly between bucket centres)
    rise = s.rise(MONDAY + DAY + 11.9 * 3600, 150)
    assert rise is not None and 2.0 < rise <= 3.0
    assert s.rise(MONDAY + DAY + 6 * 3600, 150) == 1.0  # flat there
    # Saturday has not been seen: the weekday shape stands in for it
    assert s.rise(MONDAY + 5 * DAY + 11.9 * 3600, 150) is not None
    fresh = Season().observe(MONDAY, 100.0)
    assert fresh.rise(MONDAY + 60, 150) is None  # nothing learnt: the reactive path decides
