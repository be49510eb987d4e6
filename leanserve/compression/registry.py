"""One registry for every compression technique.

A technique is a transform registered for its step config type (QuantizeStep, PruneStep, ...).
Transforms work in one of two stages: on a torch module (pruning, distillation, low-rank,
fake-quantized weight schemes) or on an exported ONNX file (ONNX Runtime's int8 quantization).
The pipeline runs a candidate's steps in order and exports to ONNX when a step needs it; a torch
step after an ONNX one is refused (the model can no longer be changed in torch).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from leanserve.api.spec import Task
from leanserve.errors import LeanserveError


class CompressionError(LeanserveError):
    """A candidate or the baseline could not be built."""


class StepError(CompressionError):
    """A step that does not fit the model or the data; the message names the field."""


class Stage(str, enum.Enum):
    TORCH = "torch"
    ONNX = "onnx"


@dataclass
class Batch:
    """Model inputs for one batch, by input name (input_ids/attention_mask or pixel_values)."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None = None


@dataclass
class Context:
    """What a transform may read besides the model: the task, the training/calibration data and
    the uncompressed teacher. Transforms never read files or the clock on their own."""

    task: Task
    train: list[Batch]
    """Calibration / fine-tuning / distillation batches (the non-held-out rows)."""
    teacher: torch.nn.Module
    """The uncompressed model, in eval mode; never modified."""
    workdir: Path
    """Scratch space for this candidate (exports, DDP checkpoints)."""
    seed: int = 0
    threads: int = 2
    num_labels: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    to_onnx: Callable[[Model, Path], Model] | None = None
    """The pipeline's export (padding-free where it fits, the checks it runs): a torch step
    whose result is only meaningful as a quantized graph (``qat``) exports with it."""


@dataclass
class Model:
    """A candidate as it moves through its steps."""

    module: torch.nn.Module | None = None
    onnx_path: Path | None = None
    packed_bytes: int | None = None
    """Size the weights take when stored packed (power-of-two, binary, int4), when smaller than
    the file on disk; the report uses it as size_bytes."""
    notes: dict[str, Any] = field(default_factory=dict)
    """What a step wants in the report (sparsity reached, ranks kept, student layers, ...)."""

    @property
    def stage(self) -> Stage:
        return Stage.ONNX if self.onnx_path is not None else Stage.TORCH


Transform = Callable[[Model, Any, Context], Model]


@dataclass(frozen=True)
class Technique:
    stage: Stage
    transform: Transform


_REGISTRY: dict[tuple[type, str | None], Technique] = {}


def register(config_type: type, stage: Stage, method: str | None = None) -> Callable[[F], F]:
    """Register a transform for a config type (and optionally one of its `method` values)."""

    def deco(fn: F) -> F:
        key = (config_type, method)
        if key in _REGISTRY:
            raise RuntimeError(f"technique {config_type.__name__}/{method} registered twice")
        _REGISTRY[key] = Technique(stage, fn)
        return fn

    return deco


F = Callable[..., Any]


def lookup(config: Any) -> Technique:
    method = getattr(config, "method", None)
    method = getattr(method, "value", method)
    for key in ((type(config), method), (type(config), None)):
        if key in _REGISTRY:
            return _REGISTRY[key]
    raise StepError(f"no technique registered for {type(config).__name__} method {method!r}")


def registered() -> list[tuple[str, str | None, Stage]]:
    return [(t.__name__, m, tech.stage) for (t, m), tech in _REGISTRY.items()]
