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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

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
    events: tuple[tuple[float, ...], ...] = ()
    """The two-hour shapes' draws: bursts (start step, length, amplitude), spikes (start step,
    height) or plateaus (level of each, in order); what ``event_laws`` conditions on."""

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
    bursts = []
    i = 0
    while i < n:
        i += int(rng.exponential(60))  # a burst every ~10 minutes on average
        if i >= n:
            break
        length = int(rng.integers(6, 31))
        amp = rng.uniform(1.5, 3.0)
        ramp = np.minimum(1.0, np.arange(length) / 2.0 + 0.5)
        rate[i:i + length] = np.maximum(rate[i:i + length], 150.0 * amp * ramp[: n - i][:length])
        bursts.append((float(i), float(length), float(amp)))
        i += length
    return Drawn(_times(), rate, 0.05, rng, tuple(bursts))


def step(seed: int) -> Drawn:
    rng = np.random.default_rng(seed)
    levels = rng.permutation(np.array([100, 300, 200, 550, 150, 400, 600, 250], dtype=float))
    per = DURATION_S // STEP_S // len(levels)
    rate = np.repeat(levels, per)
    return Drawn(_times(), rate, 0.02, rng, (tuple(float(v) for v in levels),))


def spike(seed: int) -> Drawn:
    rng = np.random.default_rng(seed)
    t = _times()
    rate = np.full(t.size, 80.0)
    spikes = []
    for start in sorted(rng.choice(np.arange(30, t.size - 30), size=6, replace=False)):
        height = 80.0 * rng.uniform(5.0, 8.0)
        k = np.arange(t.size - start)
        rate[start:] = np.maximum(rate[start:], 80.0 + (height - 80.0) * np.exp(-k / 12.0))
        spikes.append((float(start), float(height)))
    return Drawn(t, rate, 0.03, rng, tuple(spikes))


SHORT = {"diurnal": (diurnal, 1), "bursty": (bursty, 2), "step": (step, 3), "spike": (spike, 4)}


# --- what each two-hour shape's next steps may be, as its generator knows -------------------

BURST_GAP, BURST_AMP = 60.0, (1.5, 3.0)
SPIKES, SPIKE_EDGE, SPIKE_HEIGHT, SPIKE_DECAY = 6, 30, (5.0, 8.0), 12.0


def event_laws(name: str, d: Drawn, scale: float, lead: int, nodes: int = 6,
               amp_nodes: int = 3) -> Any:
    """The StepLaws (leanserve.autoscaling.bound) of one draw of a two-hour shape with
    events (bursty, spike, step), its rates times ``scale``, on its own 10 s steps: what step
    i's load may be given the draw up to step i - lead - 1 (what the replicas asked for step i
    can have seen, ``lead`` steps of start-up before it) and up to step i - 1 (what the ready
    ones can). It is granted the events' future parameters once they have begun (a burst's
    length, a spike's height); it is not granted when the next event begins nor how high it
    is. Outcomes with two events beginning within one window are left out (an event a few
    times an hour; leaving outcomes out only lowers the bound). The first ``lead`` steps are
    uncharged and seen."""
    from leanserve.autoscaling.bound import StepLaws

    n = d.mean.size
    x, w = np.polynomial.hermite.hermgauss(nodes)
    eps = np.maximum(0.0, 1.0 + d.noise * np.sqrt(2.0) * x)
    wn = w / np.sqrt(np.pi)
    y, v = np.polynomial.legendre.leggauss(amp_nodes)
    unit = (y + 1) / 2  # nodes on [0, 1], weights v / 2
    va = v / 2
    rows = []
    for i in range(n):
        j = max(i - lead - 1, 0)  # every contender starts warm for step 0's load
        events: list[tuple[float, float, int]] = []  # (noiseless load, prob, ready id)
        if i < lead:
            events = [(float(d.mean[i]), 1.0, 0)]
        elif name == "bursty":
            events = _bursty_outcomes(d, i, j, unit, va)
        elif name == "spike":
            events = _spike_outcomes(d, i, j, unit, va)
        elif name == "step":
            events = _step_outcomes(d, i, j)
        else:
            raise ValueError(f"event_laws: {name!r} has no events")
        # (load, probability, what the asked replicas see, what the ready ones see): neither
        # sees the step's own noise; the first steps' (uncharged) replicas see everything
        rows.append([(load * e * scale, p * q, *((m * nodes + k,) * 2 if i < lead else (0, r)))
                     for m, (load, p, r) in enumerate(events)
                     for k, (e, q) in enumerate(zip(eps, wn, strict=True))])
    width = max(len(r) for r in rows)
    loads, probs = np.zeros((n, width)), np.zeros((n, width))
    asked, ready = np.zeros((n, width), dtype=int), np.zeros((n, width), dtype=int)
    for i, row in enumerate(rows):
        for k, (load, p, a, r) in enumerate(row):
            loads[i, k], probs[i, k], asked[i, k], ready[i, k] = load, p, a, r
    return StepLaws(loads, probs, asked, ready, np.ones(n), np.arange(n) >= lead)


def _onsets(first: int, last: int, hazard: float) -> list[tuple[int, float]]:
    """(step, probability) of a memoryless onset in first..last, given none before ``first``."""
    return [(o, (1 - hazard) ** (o - first) * hazard) for o in range(first, last + 1)]


def _bursty_outcomes(d: Drawn, i: int, j: int, unit: np.ndarray, va: np.ndarray
                     ) -> list[tuple[float, float, int]]:
    base = 150.0
    began = [b for b in d.events if b[0] <= j]
    if began and j < began[-1][0] + began[-1][1]:
        start, length, _ = began[-1]
        if i < start + length:  # the burst seen running covers step i: known
            return [(float(d.mean[i]), 1.0, 0)]
        first = int(start + length)  # it ends within the window; the gap starts then
    else:
        first = j + 1
    hazard = 1 - np.exp(-1.0 / BURST_GAP)  # int(exponential(60)) is geometric
    out = [(base, (1 - hazard) ** (i - first + 1), 0)]
    lo, hi = BURST_AMP
    for o, p in _onsets(first, i, hazard):
        ramp = min(1.0, (i - o) / 2.0 + 0.5)
        for k, (a, q) in enumerate(zip(unit, va, strict=True)):
            out.append((max(base, base * (lo + (hi - lo) * a) * ramp), p * q,
                        0 if o == i else 1 + (o - first) * len(unit) + k))
    return out


def _spike_outcomes(d: Drawn, i: int, j: int, unit: np.ndarray, va: np.ndarray
                    ) -> list[tuple[float, float, int]]:
    from math import comb

    n = d.mean.size
    known = [s for s in d.events if s[0] <= j]
    base = max([80.0] + [80.0 + (h - 80.0) * np.exp(-(i - s) / SPIKE_DECAY) for s, h in known])
    left = SPIKES - len(known)
    lo_pos, hi_pos = max(j + 1, SPIKE_EDGE), n - SPIKE_EDGE  # candidates still free
    free = max(0, hi_pos - lo_pos)
    window = [o for o in range(j + 1, i + 1) if lo_pos <= o < hi_pos]
    if left <= 0 or free <= 0 or not window:
        return [(base, 1.0, 0)]
    total = comb(free, left)
    out = [(base, comb(free - len(window), left) / total, 0)]
    one = comb(free - len(window), left - 1) / total  # exactly this one in the window
    lo, hi = SPIKE_HEIGHT
    for o in window:
        for k, (a, q) in enumerate(zip(unit, va, strict=True)):
            h = 80.0 * (lo + (hi - lo) * a)
            load = max(base, 80.0 + (h - 80.0) * np.exp(-(i - o) / SPIKE_DECAY))
            out.append((load, one * q, 0 if o == i else 1 + (o - j - 1) * len(unit) + k))
    return out


def _step_outcomes(d: Drawn, i: int, j: int) -> list[tuple[float, float, int]]:
    levels = d.events[0]
    per = d.mean.size // len(levels)
    now = i // per
    seen = j // per + 1 if j >= 0 else 0
    if now < seen:
        return [(levels[now], 1.0, 0)]
    unseen = sorted(levels[seen:])  # the rest come in a uniformly random order
    change = now * per
    return [(v, 1.0 / len(unseen), 0 if change == i else 1 + k) for k, v in enumerate(unseen)]
LONG = {"week": week, "flash": flash, "quiet": quiet}


def _write(path: Path, t: np.ndarray, rates: np.ndarray) -> None:
    rates = np.maximum(0.0, rates)
    # 6 significant digits: the multi-day shapes are in units of about 1 at their peak, and a
    # fixed two decimals rounded their nights (0.04-0.09) in steps of 11-25%, a noise far above
    # the one they are drawn with (and the one the noise bound is computed for)
    lines = ["time_s,requests_per_s"]
    lines += [f"{a:.0f},{r:.6g}" for a, r in zip(t, rates, strict=True) if not math.isnan(r)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def reseeded(which: TraceSet, offset: int) -> TraceSet:
    """The same parameters as ``which`` with every seed moved by ``offset``: another draw of
    each of its shapes (bench/autoscaling.py's fresh draws of the held-out set)."""
    return TraceSet(which.seed_offset + offset,
                    replace(which.shape, seed=which.shape.seed + offset))


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
