"""Quality of an ONNX artifact against the uncompressed baseline, and the quality gate.

Quality is always measured on the ONNX file through ONNX Runtime, so the figure in the report is
the served model's, not the torch module's it came from. The baseline's outputs on the held-out
rows are computed once and every candidate is compared with them:
- cosine: mean cosine similarity of each row's output with the baseline's (embeddings, or
  logits for a classifier gated on cosine); the baseline scores 1.0 against itself;
- accuracy: share of held-out rows whose argmax matches the label.
quality_drop = baseline quality - candidate quality; the gate passes when it is <= maxDrop.

The held-out rows are split in two: the validation split gates (and is what any setting may be
chosen on), the test split is only reported (``summary``: mean, 5th percentile and worst row, or
accuracy with its interval), so the figure a user reads was never used to decide anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.api.spec import QualityMetric
from leanserve.compression.export import run_onnx, session
from leanserve.compression.registry import Batch, CompressionError

GATE_EPS = 1e-9
"""Float slack so that a drop equal to maxDrop passes, as the spec says (<=)."""


class EvaluationError(CompressionError):
    """The held-out data cannot score this model (no labels for accuracy, bad outputs)."""


def predict(onnx_path: Path, batches: list[Batch], threads: int = 2) -> np.ndarray:
    sess = session(onnx_path, threads)
    return np.concatenate([run_onnx(sess, b).astype(np.float32) for b in batches])


def labels_of(batches: list[Batch]) -> np.ndarray | None:
    if any(b.labels is None for b in batches):
        return None
    return np.concatenate([b.labels.numpy() for b in batches])  # type: ignore[union-attr]


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` to the same row of ``b``."""
    num = (a * b).sum(1)
    return num / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise EvaluationError(f"output shape {list(a.shape)} differs from the baseline's "
                              f"{list(b.shape)}")
    return float(np.mean(row_cosines(a, b)))


def score(metric: QualityMetric, outputs: np.ndarray, reference: np.ndarray,
          labels: np.ndarray | None) -> float:
    if not np.all(np.isfinite(outputs)):
        raise EvaluationError("the model produces NaN or infinite outputs on the held-out rows")
    if metric is QualityMetric.COSINE:
        return mean_cosine(outputs, reference)
    if labels is None:
        raise EvaluationError("spec.quality.metric: accuracy needs labelled rows in spec.data "
                              "(a \"label\" per jsonl row or y in the npz)")
    return float(np.mean(outputs.argmax(1) == labels))


def summary(metric: QualityMetric, outputs: np.ndarray, reference: np.ndarray,
            labels: np.ndarray | None) -> dict[str, Any]:
    """Quality on a split as a user should read it: for cosine the mean, the 5th percentile and
    the worst row; for accuracy the share right with its 95% Wilson interval."""
    n = int(outputs.shape[0])
    if metric is QualityMetric.COSINE:
        cos = row_cosines(outputs, reference) if outputs.shape == reference.shape else None
        if cos is None:
            raise EvaluationError(f"output shape {list(outputs.shape)} differs from the "
                                  f"baseline's {list(reference.shape)}")
        return {"rows": n, "mean": float(cos.mean()), "p5": float(np.percentile(cos, 5)),
                "worst": float(cos.min())}
    acc = score(metric, outputs, reference, labels)
    return {"rows": n, "accuracy": acc, "ci95": list(wilson(acc, n))}


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``p`` observed on ``n`` rows."""
    if n == 0:
        return (0.0, 1.0)
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


@dataclass(frozen=True)
class Gate:
    metric: QualityMetric
    max_drop: float
    baseline: float

    def drop(self, quality: float) -> float:
        return self.baseline - quality

    def passed(self, quality: float) -> bool:
        return self.drop(quality) <= self.max_drop + GATE_EPS
