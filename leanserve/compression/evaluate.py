"""Quality of an ONNX artifact against the uncompressed baseline, and the quality gate.

Quality is always measured on the ONNX file through ONNX Runtime, so the figure in the report is
the served model's, not the torch module's it came from. The baseline's outputs on the held-out
rows are computed once and every candidate is compared with them:
- cosine: mean cosine similarity of each row's output with the baseline's (embeddings, or
  logits for a classifier gated on cosine); the baseline scores 1.0 against itself;
- accuracy: share of held-out rows whose argmax matches the label.
quality_drop = baseline quality - candidate quality; the gate passes when it is <= maxDrop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class Gate:
    metric: QualityMetric
    max_drop: float
    baseline: float

    def drop(self, quality: float) -> float:
        return self.baseline - quality

    def passed(self, quality: float) -> bool:
        return self.drop(quality) <= self.max_drop + GATE_EPS
