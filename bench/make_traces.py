"""Make the load traces in bench/traces/ (deterministic: fixed seeds; re-running rewrites them
byte for byte).

Four shapes an autoscaler must handle, each two hours at 10 s resolution, requests/s peaking near
600 (bench/autoscaling.py rescales them to the pools it prices):
- diurnal: a day compressed into two hours (night trough, morning ramp, lunch dip, evening peak)
  with 4% noise;
- bursty: a steady base with Poisson-arriving bursts of 1-5 minutes at 1.5-3x the base;
- step: plateaus of 15 minutes at different levels (deploys, batch jobs, failovers);
- spike: a low base with short sharp spikes (5-8x in 10 s, decaying over about two minutes).

``--seed-offset N`` adds N to every generator's seed: the same four shapes, other draws. The
held-out traces in bench/traces-heldout/ were made with ``--seed-offset 100`` and are NEVER used
for tuning (leanserve.autoscaling.policy's TUNED_SETTINGS was tuned on bench/traces/ only); they
exist to check whether that tuning generalises or overfits. Default 0 rewrites bench/traces/
byte for byte.

Usage: python bench/make_traces.py [--out bench/traces] [--seed-offset 0]
    python bench/make_traces.py --out bench/traces-heldout --seed-offset 100
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

STEP_S = 10
DURATION_S = 2 * 3600


def _times() -> np.ndarray:
    return np.arange(0, DURATION_S, STEP_S, dtype=float)


def diurnal(seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = _times() / DURATION_S * 24.0  # hours of a compressed day
    shape = (0.15 + 0.55 * np.exp(-((t - 10.5) / 2.5) ** 2)
             + 0.35 * np.exp(-((t - 13.5) / 1.5) ** 2)
             + 0.85 * np.exp(-((t - 19.0) / 2.8) ** 2))
    shape = shape / shape.max()
    noise = rng.normal(1.0, 0.04, size=t.size)
    return 600.0 * shape * noise


def bursty(seed: int = 2) -> np.ndarray:
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
    return rate * rng.normal(1.0, 0.05, size=n)


def step(seed: int = 3) -> np.ndarray:
    levels = [100, 300, 200, 550, 150, 400, 600, 250]
    per = DURATION_S // STEP_S // len(levels)
    rng = np.random.default_rng(seed)
    rate = np.repeat(np.array(levels, dtype=float), per)
    return rate * rng.normal(1.0, 0.02, size=rate.size)


def spike(seed: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = _times()
    rate = np.full(t.size, 80.0)
    for start in sorted(rng.choice(np.arange(30, t.size - 30), size=6, replace=False)):
        height = 80.0 * rng.uniform(5.0, 8.0)
        k = np.arange(t.size - start)
        rate[start:] = np.maximum(rate[start:], 80.0 + (height - 80.0) * np.exp(-k / 12.0))
    return rate * rng.normal(1.0, 0.03, size=t.size)


TRACES = {"diurnal": diurnal, "bursty": bursty, "step": step, "spike": spike}
SEEDS = {"diurnal": 1, "bursty": 2, "step": 3, "spike": 4}
"""Each generator's seed for bench/traces/ (offset 0); a held-out set adds one offset to all."""


def write(out: Path, seed_offset: int = 0) -> list[Path]:
    """Write the four traces under ``out``, each generated with its seed + ``seed_offset``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fn in TRACES.items():
        rates = np.maximum(0.0, fn(SEEDS[name] + seed_offset))
        p = out / f"{name}.csv"
        lines = ["time_s,requests_per_s"]
        lines += [f"{t:.0f},{r:.2f}" for t, r in zip(_times(), rates, strict=True)
                  if not math.isnan(r)]
        p.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "traces")
    ap.add_argument("--seed-offset", type=int, default=0,
                    help="add N to every generator's seed (100: the held-out traces in "
                         "bench/traces-heldout/, never used for tuning)")
    args = ap.parse_args()
    if args.seed_offset < 0:
        ap.error(f"--seed-offset {args.seed_offset}: must be >= 0 (seeds are non-negative)")
    for p in write(args.out, args.seed_offset):
        print(p)


if __name__ == "__main__":
    main()
