"""CPU benchmark of ONNX artifacts with ONNX Runtime (2 intra-op threads by default).

Latency is measured per call at batch 1 (p50/p95, the figure the SLO is about) and at batch 32
(rows/s = throughput). Inputs are real held-out rows, not random tensors: a text model's cost
depends on the sequence length, and the same rows are used for every candidate. The clock is
injected so tests can drive it; nothing here asserts on time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
    """Calls discarded before timing (allocations, thread pools)."""
    iterations_b1: int = 30
    """Timed calls at batch 1."""
    iterations_bn: int = 8
    """Timed calls at ``batch`` rows."""


@dataclass
class BenchResult:
    latency_ms: dict[str, float]
    latency_ms_batch: dict[str, float]
    throughput_rps: float
    batch: int

    def as_report(self) -> dict[str, object]:
        return {"latency_ms": self.latency_ms, "latency_ms_batch": self.latency_ms_batch,
                "throughput_rps": self.throughput_rps, "bench_batch": self.batch}


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
    s = settings or BenchSettings()
    sess = session(onnx_path, s.threads)
    one, many = take_rows(rows, 1), take_rows(rows, s.batch)
    b1 = time_calls(lambda: run_onnx(sess, one), s.iterations_b1, s.warmup, clock)
    bn = time_calls(lambda: run_onnx(sess, many), s.iterations_bn, s.warmup, clock)
    median = float(np.median(bn))
    return BenchResult(latency_ms=_percentiles(b1), latency_ms_batch=_percentiles(bn),
                       throughput_rps=s.batch / median if median > 0 else float("inf"),
                       batch=s.batch)
