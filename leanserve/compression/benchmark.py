"""CPU benchmark of ONNX artifacts with ONNX Runtime (2 intra-op threads by default).

Latency is measured per call at batch 1 (p50/p95, the figure the SLO is about) and at batch 32
(rows/s = throughput). Inputs are real held-out rows, not random tensors: a text model's cost
depends on the sequence length, and the same rows are used for every candidate. The clock is
injected so tests can drive it; nothing here asserts on time.

Selection compares models timed on a shared machine, so ``benchmark_many`` times them together
rather than one after the other: every model is warmed up first, then ``rounds`` rounds each
run a few calls of every model, in a rotated order (round r starts at model r), with a short
pause before each model so the previous one's spinning thread pool is idle; the figures are
medians over all of a model's calls. Load that comes and goes on the machine then hits every
model alike instead of whichever ran during it. With the defaults each model gets 24 timed
calls at batch 32 and 32 at batch 1 over 8 rounds; on MiniLM two runs of the same candidates
agree on the selected one (tests/unit/test_compression_timing.py checks the ranking of clearly
different models across two runs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leanserve.compression.export import run_onnx, session
from leanserve.compression.registry import Batch


@dataclass(frozen=True)
class BenchSettings:
    threads: int = 2
    """ORT intra-op threads (the cpu request of a small replica)."""
    batch: int = 32
    """Rows per call for the throughput figure."""
    warmup: int = 2
    """Calls discarded before timing (allocations, thread pools), per model and batch size."""
    iterations_b1: int = 32
    """Timed calls at batch 1, per model, spread over the rounds."""
    iterations_bn: int = 24
    """Timed calls at ``batch`` rows, per model, spread over the rounds."""
    rounds: int = 8
    """Interleaved rounds (``benchmark_many``)."""
    pause_s: float = 0.02
    """Idle time before each model's calls in a round: ORT's (and OpenMP's) idle threads
    busy-wait after a call and would slow whichever model runs next on 2 cores."""
    min_round_s: float = 0.05
    """A model's calls in one round last at least this long (estimated from its warm-up): a
    sub-millisecond model gets hundreds of calls, not a handful of noisy ones."""

    def timing(self) -> dict[str, object]:
        """What the report says of how the figures were measured (the fewest calls a model
        gets; faster models get more, see ``min_round_s``)."""
        r = max(1, self.rounds)
        return {"rounds": r, "calls_batch": _per_round(self.iterations_bn, r) * r,
                "calls_1": _per_round(self.iterations_b1, r) * r, "warmup": self.warmup,
                "min_round_s": self.min_round_s, "batch": self.batch, "threads": self.threads,
                "order": "interleaved (rotated each round), medians over all calls"}


def _per_round(total: int, rounds: int) -> int:
    return max(1, -(-total // rounds))


@dataclass
class BenchResult:
    latency_ms: dict[str, float]
    latency_ms_batch: dict[str, float]
    throughput_rps: float
    batch: int

    calls: int = 0
    """Timed calls at ``batch`` rows the throughput is the median of."""

    def as_report(self) -> dict[str, object]:
        return {"latency_ms": self.latency_ms, "latency_ms_batch": self.latency_ms_batch,
                "throughput_rps": self.throughput_rps, "bench_batch": self.batch,
                "bench_calls": self.calls}


def take_rows(batches: list[Batch], n: int) -> Batch:
    """The first ``n`` rows of ``batches`` as one batch (cycling when there are fewer);
    text inputs are padded to the longest row, as a tokenizer does for a batch."""
    rows: list[dict[str, torch.Tensor]] = []
    while len(rows) < n:
        for b in batches:
            size = next(iter(b.inputs.values())).shape[0]
            for i in range(size):
                rows.append({k: v[i] for k, v in b.inputs.items()})
                if len(rows) == n:
                    break
            if len(rows) == n:
                break
    if "attention_mask" in rows[0]:
        length = max(int(r["attention_mask"].sum()) for r in rows)
        return Batch(inputs={k: torch.stack([_fit(r[k], length) for r in rows])
                             for k in rows[0]})
    return Batch(inputs={k: torch.stack([r[k] for r in rows]) for k in rows[0]})


def _fit(row: torch.Tensor, length: int) -> torch.Tensor:
    """Cut or zero-pad a token row to ``length`` (padding sits under attention_mask 0)."""
    if row.shape[0] >= length:
        return row[:length]
    return torch.cat([row, row.new_zeros(length - row.shape[0])])


def _percentiles(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1000.0
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95))}


def time_calls(fn: Callable[[], object], n: int, warmup: int,
               clock: Callable[[], float] = time.perf_counter) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        start = clock()
        fn()
        out.append(clock() - start)
    return out


def benchmark(onnx_path: Path, rows: list[Batch], settings: BenchSettings | None = None,
              clock: Callable[[], float] = time.perf_counter) -> BenchResult:
    """One model alone (``benchmark_many`` of one)."""
    return benchmark_many({"model": onnx_path}, rows, settings, clock)["model"]


def benchmark_many(paths: dict[str, Path], rows: list[Batch],
                   settings: BenchSettings | None = None,
                   clock: Callable[[], float] = time.perf_counter,
                   sleep: Callable[[float], None] = time.sleep) -> dict[str, BenchResult]:
    """Every model of ``paths`` timed in interleaved rounds (see the module docstring)."""
    s = settings or BenchSettings()
    one, many = take_rows(rows, 1), take_rows(rows, s.batch)
    sessions = {name: session(path, s.threads) for name, path in paths.items()}
    calls = {}
    for name, sess in sessions.items():
        calls[(name, "n")] = lambda sess=sess: run_onnx(sess, many)
        calls[(name, "1")] = lambda sess=sess: run_onnx(sess, one)
    rounds = max(1, s.rounds)
    per_round = {k: _per_round(s.iterations_bn if k[1] == "n" else s.iterations_b1, rounds)
                 for k in calls}
    times = interleave(calls, rounds, per_round, warmup=s.warmup, pause_s=s.pause_s,
                       min_round_s=s.min_round_s, clock=clock, sleep=sleep,
                       group=lambda k: k[0])
    out = {}
    for name in sessions:
        tn, t1 = times[(name, "n")], times[(name, "1")]
        median = float(np.median(tn))
        out[name] = BenchResult(latency_ms=_percentiles(t1), latency_ms_batch=_percentiles(tn),
                                throughput_rps=s.batch / median if median > 0 else float("inf"),
                                batch=s.batch, calls=len(tn))
    return out


def interleave(calls: dict[Any, Callable[[], object]], rounds: int,
               per_round: dict[Any, int] | int, *, warmup: int = 2, pause_s: float = 0.02,
               min_round_s: float = 0.0, clock: Callable[[], float] = time.perf_counter,
               sleep: Callable[[float], None] = time.sleep,
               group: Callable[[Any], Any] = lambda k: k) -> dict[Any, list[float]]:
    """Seconds of every timed call of each of ``calls``: warm-up, then ``rounds`` rounds in a
    rotated order (round r starts at group r), a pause before each group (one model's calls
    at every batch size), and at least ``per_round`` calls per round, more for fast calls
    (``min_round_s`` of calls, estimated from the warm-up)."""
    wanted = {k: per_round if isinstance(per_round, int) else per_round[k] for k in calls}
    for key, fn in calls.items():
        time_calls(fn, 0, warmup, clock)
        est = float(np.min(time_calls(fn, 3, 0, clock)))  # a first call pays for allocations
        if min_round_s > 0 and est > 0:
            wanted[key] = max(wanted[key], min(10_000, int(np.ceil(min_round_s / est))))
    groups: dict[Any, list[Any]] = {}
    for key in calls:
        groups.setdefault(group(key), []).append(key)
    order = list(groups)
    times: dict[Any, list[float]] = {k: [] for k in calls}
    for r in range(rounds):
        for g in order[r % len(order):] + order[:r % len(order)]:
            if pause_s > 0:
                sleep(pause_s)
            for key in groups[g]:
                times[key] += time_calls(calls[key], wanted[key], 0, clock)
    return times
