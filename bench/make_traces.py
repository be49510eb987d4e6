"""Make the load traces of bench/autoscaling.py: a TUNING set and a HELD-OUT set.

Deterministic (fixed seeds; re-running rewrites them byte for byte). Shapes real serving traffic
has, each from a parameterised generator:

Several days (60 s resolution), time_s from a Monday 00:00 UTC (1970-01-05, so the policy's
weekday/weekend classes line up with the trace's):
- ``week``: seven days of diurnal traffic with weekly seasonality (weekends lower, their peak
  later), a sharp office-hours ramp every weekday morning, 5% noise and a slow drift of the
  level from day to day;
- ``flash``: four diurnal days with flash crowds (Poisson, a couple a day: 2-4x the load within
  a minute or two, decaying over tens of minutes);
- ``quiet``: four days of business-hours traffic with long quiet stretches (nights and a whole
  day at a few percent of the peak).

Two hours (10 s resolution), the older shapes: ``diurnal`` (a day compressed into two hours),
``bursty`` (bursts of 1-5 minutes at 1.5-3x), ``step`` (15-minute plateaus), ``spike`` (5-8x
spikes in 10 s, decaying over two minutes).

The held-out set draws every shape with other seeds AND other parameters (peak hours, weekend
share, ramp time, noise, flash-crowd rate and height, quiet level): it is never used for any
choice of the policy or its settings; bench/autoscaling.py reports it apart.

Each generator returns a ``Drawn``: the noiseless mean rate and the relative noise each point is
drawn with (``mean x N(1, noise)``, independently), which bench/autoscaling.py hands to
leanserve.autoscaling.bound.blind_cost_lower_bound.

Usage: python bench/make_traces.py            # writes bench/traces/ and bench/traces-heldout/
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
DAY = 86400.0
MONDAY = 4 * DAY
"""1970-01-05 00:00 UTC, a Monday: multi-day traces start here."""


@dataclass(frozen=True)
class Shape:
    """Parameters of the multi-day generators (tuning and held-out differ in all of them)."""

    seed: int
    peak_hour: float = 14.0
    """Hour of the day's main peak."""
    evening: float = 0.5
    """Height of a second, evening peak (share of the main one)."""
    weekend: float = 0.55
    """Weekend level over weekdays'."""
    ramp_hour: float = 8.5
    """Office hours start: the load steps up over ``ramp_minutes`` from here on weekdays."""
    ramp_minutes: float = 10.0
    noise: float = 0.05
    drift: float = 0.08
    """Day-to-day random change of the level (relative std)."""
    flashes_per_day: float = 2.0
    flash_height: tuple[float, float] = (2.0, 4.0)
    quiet: float = 0.03
    """Load in the quiet stretches, as a share of the peak."""


@dataclass(frozen=True)
class TraceSet:
    seed_offset: int
    """Added to the two-hour shapes' seeds."""
    shape: Shape


TUNING = TraceSet(0, Shape(seed=11))
HELDOUT = TraceSet(100, Shape(
    seed=111, peak_hour=11.0, evening=0.8, weekend=0.4, ramp_hour=7.0, ramp_minutes=6.0,
    noise=0.07, drift=0.12, flashes_per_day=3.0, flash_height=(1.5, 3.5), quiet=0.05))


def _day_curve(hours: np.ndarray, s: Shape, weekend: np.ndarray) -> np.ndarray:
    """The diurnal shape: night trough, office-hours ramp, main and evening peaks."""
    peak = np.where(weekend, s.peak_hour + 2.0, s.peak_hour)
    base = 0.08 + np.exp(-((hours - peak) / 3.0) ** 2) \
        + s.evening * np.exp(-((hours - 20.0) / 1.8) ** 2)
    ramp = np.clip((hours - s.ramp_hour) / (s.ramp_minutes / 60.0), 0.0, 1.0)
    office = np.where(weekend, 0.0, 0.35 * ramp * (hours < 18.5))
    return base + office


def multi_day(days: int, s: Shape, rng: np.random.Generator, step: float = 60.0
              ) -> tuple[np.ndarray, np.ndarray]:
    t = MONDAY + np.arange(0, days * DAY, step)
    day = np.floor((t - MONDAY) / DAY).astype(int)
    hours = (t % DAY) / 3600.0
    weekend = (day % 7) >= 5
    level = np.exp(rng.normal(0.0, s.drift, size=days))[day]
    rate = _day_curve(hours, s, weekend) * np.where(weekend, s.weekend, 1.0) * level
    return t, rate


@dataclass(frozen=True)
class Drawn:
    """One trace before its noise: the rate every point is drawn around, and the noise."""

    times: np.ndarray
    mean: np.ndarray
    """The noiseless rate (shape, level drift, bursts, flash crowds: everything but the noise)."""
    noise: float
    """Each point is ``mean x N(1, noise)``, independently of every other (bound.py's
    ``blind_cost_lower_bound`` reads this)."""
    rng: np.random.Generator

    def noisy(self) -> np.ndarray:
        return self.mean * self.rng.normal(1.0, self.noise, size=self.mean.size)


def week(s: Shape) -> Drawn:
    rng = np.random.default_rng(s.seed)
    t, rate = multi_day(7, s, rng)
    return Drawn(t, rate, s.noise, rng)


def flash(s: Shape) -> Drawn:
    rng = np.random.default_rng(s.seed + 1)
    t, rate = multi_day(4, s, rng)
    step = t[1] - t[0]
    n = t.size
    i = 0
    extra = np.zeros(n)
    while True:
        i += int(rng.exponential(DAY / s.flashes_per_day / step))
        if i >= n:
            break
        height = rng.uniform(*s.flash_height)
        rise = max(1, int(rng.uniform(60, 180) / step))
        decay = rng.uniform(600, 2400) / step
        k = np.arange(n - i)
        shape = np.where(k < rise, (k + 1) / rise, np.exp(-(k - rise) / decay))
        extra[i:] = np.maximum(extra[i:], (height - 1.0) * rate[i] * shape)
    return Drawn(t, rate + extra, s.noise, rng)


def quiet(s: Shape) -> Drawn:
    rng = np.random.default_rng(s.seed + 2)
    t, rate = multi_day(4, s, rng)
    hours = (t % DAY) / 3600.0
    day = np.floor((t - MONDAY) / DAY).astype(int)
    business = (hours >= s.ramp_hour) & (hours < 19.0)
    top = rate.max()
    rate = np.where(business & (day != 2), rate, s.quiet * top)  # day 2: a holiday, all quiet
    return Drawn(t, rate, s.noise, rng)


# the two-hour shapes (10 s resolution), as before; the offset changes their seeds
STEP_S = 10
DURATION_S = 2 * 3600


def _times() -> np.ndarray:
    return np.arange(0, DURATION_S, STEP_S, dtype=float)


def diurnal(seed: int) -> Drawn:
    rng = np.random.default_rng(seed)
    t = _times() / DURATION_S * 24.0  # hours of a compressed day
    shape = (0.15 + 0.55 * np.exp(-((t - 10.5) / 2.5) ** 2)
             + 0.35 * np.exp(-((t - 13.5) / 1.5) ** 2)
             + 0.85 * np.exp(-((t - 19.0) / 2.8) ** 2))
    shape = shape / shape.max()
    return Drawn(_times(), 600.0 * shape, 0.04, rng)


def bursty(seed: int) -> Drawn:
    rng = np.random.default_rng(seed)
    n = _times().size
    rate = np.full(n, 150.0)
    i = 0
    while i < n:
        i += int(rng.exponential(60))  # a burst every ~10 minutes on average
        if i >= n:
            break
        length = int(rng.integers(6, 31))
        amp = rng.uniform(1.5, 3.0)
        ramp = np.minimum(1.0, np.arange(length) / 2.0 + 0.5)
        rate[i:i + length] = np.maximum(rate[i:i + length], 150.0 * amp * ramp[: n - i][:length])
        i += length
    return Drawn(_times(), rate, 0.05, rng)


def step(seed: int) -> Drawn:
    rng = np.random.default_rng(seed)
    levels = rng.permutation(np.array([100, 300, 200, 550, 150, 400, 600, 250], dtype=float))
    per = DURATION_S // STEP_S // len(levels)
    rate = np.repeat(levels, per)
    return Drawn(_times(), rate, 0.02, rng)


def spike(seed: int) -> Drawn:
    rng = np.random.default_rng(seed)
    t = _times()
    rate = np.full(t.size, 80.0)
    for start in sorted(rng.choice(np.arange(30, t.size - 30), size=6, replace=False)):
        height = 80.0 * rng.uniform(5.0, 8.0)
        k = np.arange(t.size - start)
        rate[start:] = np.maximum(rate[start:], 80.0 + (height - 80.0) * np.exp(-k / 12.0))
    return Drawn(t, rate, 0.03, rng)


SHORT = {"diurnal": (diurnal, 1), "bursty": (bursty, 2), "step": (step, 3), "spike": (spike, 4)}
LONG = {"week": week, "flash": flash, "quiet": quiet}


def _write(path: Path, t: np.ndarray, rates: np.ndarray) -> None:
    rates = np.maximum(0.0, rates)
    lines = ["time_s,requests_per_s"]
    lines += [f"{a:.0f},{r:.2f}" for a, r in zip(t, rates, strict=True) if not math.isnan(r)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def drawn(which: TraceSet) -> dict[str, Drawn]:
    """Every trace of one set before its noise, by name (the noise not yet drawn)."""
    out = {name: fn(which.shape) for name, fn in LONG.items()}
    out.update({name: fn(seed + which.seed_offset) for name, (fn, seed) in SHORT.items()})
    return out


def write(out: Path, which: TraceSet) -> list[Path]:
    """Every trace of one set under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, d in drawn(which).items():
        paths.append(out / f"{name}.csv")
        _write(paths[-1], d.times, d.noisy())
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tuning", type=Path, default=ROOT / "traces")
    ap.add_argument("--heldout", type=Path, default=ROOT / "traces-heldout")
    args = ap.parse_args()
    for p in [*write(args.tuning, TUNING), *write(args.heldout, HELDOUT)]:
        print(p)


if __name__ == "__main__":
    main()
