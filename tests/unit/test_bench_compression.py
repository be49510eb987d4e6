"""bench/compression.py: speed-ups are paired by round, so a disturbance of a few rounds moves
them far less than it moves a ratio of overall medians."""

from __future__ import annotations

import numpy as np
import pytest
from scripts_by_path import load_script


def _bench():
    return load_script("bench/compression.py")


def test_by_round_takes_each_rounds_median_and_refuses_uneven_rounds() -> None:
    mod = _bench()
    got = mod.by_round([1.0, 3.0, 2.0, 10.0, 20.0, 30.0], 2)
    assert got.tolist() == [2.0, 20.0]
    with pytest.raises(ValueError, match="7 timed calls do not split into 2 equal rounds"):
        mod.by_round([1.0] * 7, 2)


def test_a_disturbance_of_a_few_rounds_barely_moves_the_paired_speedup() -> None:
    mod = _bench()
    rng = np.random.default_rng(0)
    rounds, calls = 12, 4
    # the candidate takes 1/1.6 of the reference's time; the machine slows down 1.5x-2.5x in
    # four rounds while the candidate runs (a neighbour's burst), and drifts 30% over the run
    drift = np.linspace(1.0, 1.3, rounds)
    burst = np.ones(rounds)
    burst[[1, 4, 6, 9]] = [2.5, 1.5, 2.0, 1.8]
    reference = [40e-3 * d * x for d in drift for x in rng.normal(1, 0.02, calls)]
    candidate = [25e-3 * d * b * x for d, b in zip(drift, burst, strict=True)
                 for x in rng.normal(1, 0.02, calls)]
    per_round = {"ref": mod.by_round(reference, rounds), "cand": mod.by_round(candidate, rounds)}
    median, lo, hi = mod.speedup(per_round, "cand", over="ref")
    overall = float(np.median(reference) / np.median(candidate))
    assert abs(median - 1.6) < 0.05, median
    assert lo < median <= hi
    assert abs(overall - 1.6) > 3 * abs(median - 1.6), (overall, median)
