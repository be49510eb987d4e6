"""The training steps on every device this machine has: the CPU always, and CUDA's first GPU
where there is one (the steps pick it themselves: ``precision.training_device``).

Each step moves the model to the training device, trains it there in fp32, bf16 or (CUDA only)
fp16, and moves it back: these tests check, per device, that training ran there (the layers'
outputs were on it, in the precision's dtype), that it changed the weights, that the model comes
back with fp32 weights on the CPU, and that bf16/fp16 land within a margin of fp32. On the CPU
they run in CI; the cuda variants skip there and run on a GPU machine
(``scripts/device-check.sh``). fp16's loss scaling on the CPU (the same loop, CPU autocast) is
in test_precision.py.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_compression_fixtures import (
    FAST,
    Digits,
    accuracy,
    digits_cnn,
    spec_dict,
    write_spec,
)
from test_distill import batches, ctx_for, tiny_text
from torch import nn

from leanserve.api.spec import (
    DistillStep,
    LowRankStep,
    PruneStep,
    QuantizeMethod,
    QuantizeStep,
    Task,
)
from leanserve.compression import _ddp_train, pipeline, precision
from leanserve.compression.distill import distill
from leanserve.compression.lowrank import low_rank
from leanserve.compression.pipeline import compress
from leanserve.compression.precision import module_device
from leanserve.compression.prune import prune
from leanserve.compression.qat import train_qat
from leanserve.compression.registry import Context, Model

STEP_PATH = "spec.compression.candidates[c].steps[0]"
CUDA = torch.cuda.is_available()
DEVICES = [pytest.param("cpu"),
           pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA GPU here"))]
MARGIN = 0.02
"""How far bf16/fp16 fine-tunes may land from fp32's held-out accuracy on the digits (540
rows: 11 of them). Measured on the CPU: bf16 equal to fp32 (prune 0.909, lowRank 0.644);
fp16 on CUDA not yet measured."""


def precisions(device: str) -> tuple[str, ...]:
    """The reduced precisions a step can train in on ``device`` (fp16 needs CUDA)."""
    return ("bf16", "fp16") if device == "cuda" else ("bf16",)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The device the training steps use in this test; on a machine with a GPU the cpu variant
    pins them to the CPU (the pipeline reads the same choice to record GPU time)."""
    if request.param == "cpu":
        def on_the_cpu() -> torch.device:
            return torch.device("cpu")

        monkeypatch.setattr(precision, "training_device", on_the_cpu)
        monkeypatch.setattr(pipeline, "training_device", on_the_cpu)
    assert precision.training_device().type == request.param
    return request.param


@pytest.fixture(scope="module")
def digits() -> Digits:
    return digits_cnn()


@dataclass
class Trained:
    """What one call of the shared training loop did."""

    device: str
    outputs: set[tuple[str, torch.dtype]]
    """(device type, dtype) of every Linear/Conv2d output while it trained."""
    changed: bool
    losses: list[float]


@dataclass
class Layers:
    """Records the (device type, dtype) of the outputs of ``module``'s Linear and Conv2d
    layers while it is attached."""

    module: nn.Module
    seen: set[tuple[str, torch.dtype]] = field(default_factory=set)
    _hooks: list[Any] = field(default_factory=list)

    def __enter__(self) -> set[tuple[str, torch.dtype]]:
        def record(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            self.seen.add((out.device.type, out.dtype))

        self._hooks = [m.register_forward_hook(record) for m in self.module.modules()
                       if isinstance(m, nn.Linear | nn.Conv2d)]
        return self.seen

    def __exit__(self, *_exc: object) -> None:
        for h in self._hooks:
            h.remove()


def snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().cpu().clone() for p in module.parameters()]


def changed(before: list[torch.Tensor], module: nn.Module) -> bool:
    return any(not torch.equal(a, b.detach().cpu())
               for a, b in zip(before, module.parameters(), strict=True))


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> list[Trained]:
    """Every call of ``_ddp_train.train`` (prune and lowRank fine-tunes, distillation) in the
    test, watched: the real loop runs."""
    runs: list[Trained] = []
    real: Callable[..., list[float]] = _ddp_train.train

    def watched(module: nn.Module, data: Any, cfg: Any, **kw: Any) -> list[float]:
        owner = kw.get("params") or module
        before = snapshot(owner)
        with Layers(owner) as seen:
            losses = real(module, data, cfg, **kw)
        runs.append(Trained(module_device(owner).type, set(seen), changed(before, owner),
                            losses))
        return losses

    monkeypatch.setattr(_ddp_train, "train", watched)
    return runs


def on_cpu_in_fp32(module: nn.Module) -> bool:
    return all(p.device.type == "cpu" and p.dtype == torch.float32
               for p in module.parameters())


def dtype_of(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


@pytest.mark.parametrize("step", ["prune", "lowRank"])
def test_fine_tunes_train_on_the_device_and_keep_fp32_accuracy(
        tmp_path: Path, digits: Digits, device: str, trained: list[Trained], step: str) -> None:
    train, held, teacher = digits
    base = accuracy(teacher, held)
    assert base > 0.9
    ctx = Context(task=Task.IMAGE_CLASSIFICATION, train=train, teacher=teacher, workdir=tmp_path,
                  extra={"step_path": STEP_PATH})

    def run(name: str, epochs: int = 2) -> Model:
        if step == "prune":
            return prune(Model(module=teacher), PruneStep(
                method="structured", granularity="channel", importance="l2", sparsity=0.5,
                fine_tune_epochs=epochs, precision=name), ctx)
        return low_rank(Model(module=teacher), LowRankStep(
            rank_ratio=0.3, fine_tune_epochs=epochs, precision=name), ctx)

    untuned = accuracy(run("fp32", epochs=0).module, held)
    assert not trained
    got = {}
    for name in ("fp32", *precisions(device)):
        out = run(name)
        assert on_cpu_in_fp32(out.module)
        last = trained[-1]
        assert last.device == device and last.changed
        assert last.outputs == {(device, dtype_of(name))}
        got[name] = accuracy(out.module, held)
    print(f"digits {step} on {device}: baseline {base:.4f}, untuned {untuned:.4f}, "
          + ", ".join(f"{k} {v:.4f}" for k, v in got.items()))
    assert len(trained) == len(got)
    # the fine-tune wins back accuracy the step lost (lowRank's rank 0.3 needs more epochs to
    # come near the baseline than these two)
    assert min(got.values()) > untuned + 0.05
    if step == "prune":
        assert got["fp32"] > base - 0.05
    for name in precisions(device):
        assert abs(got[name] - got["fp32"]) <= MARGIN, (name, got)


def test_a_width_student_distills_on_the_device(tmp_path: Path, digits: Digits, device: str,
                                                trained: list[Trained]) -> None:
    """studentWidth 0.25 with the hint loss: the student and an eager copy of the teacher
    both train/run on the device."""
    train, held, teacher = digits
    ctx = Context(task=Task.IMAGE_CLASSIFICATION, train=train, teacher=teacher, workdir=tmp_path,
                  extra={"step_path": STEP_PATH})
    name = precisions(device)[-1]
    cfg = DistillStep(student_width=0.25, epochs=3, learning_rate=3e-3, hidden_weight=1.0,
                      precision=name)
    out = distill(Model(module=teacher), cfg, ctx)
    (run,) = trained
    assert run.device == device and run.changed and run.outputs == {(device, dtype_of(name))}
    assert out.notes["distill_precision"] == name
    assert out.notes["distill_losses"][-1] == "feature-hint"
    assert run.losses[-1] < run.losses[0]
    assert on_cpu_in_fp32(out.module) and on_cpu_in_fp32(teacher)
    acc = accuracy(out.module, held)
    print(f"digits width-0.25 student on {device} in {name}: {acc:.4f} "
          f"(teacher {accuracy(teacher, held):.4f}), losses {out.notes['distill_loss']}")
    assert acc > 0.5  # from a quarter of the teacher's channels, after three short epochs


def test_qat_trains_on_the_device_in_reduced_precision(tmp_path: Path, digits: Digits,
                                                      device: str) -> None:
    train, _, teacher = digits
    ctx = Context(task=Task.IMAGE_CLASSIFICATION, train=train, teacher=teacher, workdir=tmp_path,
                  extra={"step_path": STEP_PATH})
    for name in precisions(device):
        student = copy.deepcopy(teacher)
        before = snapshot(student)
        with Layers(student) as seen:
            notes = train_qat(student, ctx, QuantizeStep(
                method=QuantizeMethod.QAT, train_steps=12, learning_rate=1e-4, precision=name))
        print(f"digits QAT on {device} in {name}: {notes}")
        assert seen == {(device, dtype_of(name))}
        assert notes["precision"] == name and notes["qat_steps"] == 12
        assert math.isfinite(notes["qat_loss_last"])
        if name == "fp16":
            assert notes["skipped_steps"] < 12
        assert changed(before, student)
        assert on_cpu_in_fp32(student) and on_cpu_in_fp32(teacher)
        assert all(bool(torch.isfinite(p).all()) for p in student.parameters())


def test_a_transformer_distills_with_hidden_and_relation_losses_on_the_device(
        tmp_path: Path, device: str, trained: list[Trained]) -> None:
    teacher = tiny_text()
    data = batches()
    ctx = ctx_for(teacher, Task.FEATURE_EXTRACTION, data, tmp_path)
    for name in precisions(device):
        out = distill(Model(module=teacher), DistillStep.model_validate(
            {"studentLayers": 2, "steps": 12, "learningRate": 1e-3, "batchSize": 16,
             "hiddenWeight": 1.0, "relationWeight": 1.0, "relationHeads": 4,
             "precision": name}), ctx)
        run = trained[-1]
        assert run.device == device and run.changed
        assert (device, dtype_of(name)) in run.outputs
        assert out.notes["distill_losses"] == ["soft-target/embedding", "hidden-state",
                                               "attention-relation"]
        assert out.notes["distill_precision"] == name
        assert all(math.isfinite(x) for x in run.losses)
        assert on_cpu_in_fp32(out.module) and on_cpu_in_fp32(teacher)
    assert len(trained) == len(precisions(device))


def test_the_report_prices_gpu_time_only_where_training_ran_on_a_gpu(
        tmp_path: Path, digits: Digits, device: str) -> None:
    """compress() of 256 digits rows (a scripted Sequential, as the examples save it) with a
    fine-tuned candidate and a GPU pool in the spec."""
    train, held, teacher = digits
    torch.jit.save(torch.jit.script(teacher.net), str(tmp_path / "cnn.pt"))
    rows = train[:3] + held[:1]
    np.savez(tmp_path / "digits.npz",
             x=torch.cat([b.inputs["pixel_values"] for b in rows])[:, 0].numpy(),
             y=torch.cat([b.labels for b in rows]).numpy())
    doc = spec_dict("cnn.pt", "digits.npz", [
        {"name": "tuned", "steps": [{"prune": {"method": "magnitude", "sparsity": 0.5,
                                               "fineTuneEpochs": 1}}]},
        {"name": "untrained", "steps": [{"quantize": {"method": "int8-weight-only"}}]},
    ], fmt="torchscript", task="image-classification", metric="accuracy", max_drop=1.0)
    doc["spec"]["nodePools"].append({"name": "gpu", "hourlyPrice": 3.6,
                                     "accelerator": "nvidia-gpu",
                                     "resources": {"limits": {"nvidia.com/gpu": 1}}})
    report = compress(write_spec(tmp_path, doc), tmp_path / "out", settings=FAST)
    cand, untrained = report["candidates"]
    assert cand["error"] is None and untrained["error"] is None, (cand, untrained)
    # a candidate that trains nothing never holds the GPU: no GPU time billed to it
    assert untrained["cost"]["gpu_seconds"] == (None if device == "cpu" else 0.0)
    assert untrained["cost"]["gpu_pool"] is None
    cost = cand["cost"]
    print(f"cost on {device}: {cost}")
    cpu_part = cost["cpu_seconds"] / 3600.0 * 0.1
    assert cost["pool"] == "cpu"
    if device == "cpu":
        assert cost["gpu_seconds"] is None and cost["gpu_pool"] is None
        assert cost["usd"] == pytest.approx(cpu_part)
    else:
        assert cost["gpu_seconds"] > 0 and cost["gpu_pool"] == "gpu"
        assert cost["usd"] == pytest.approx(cpu_part + cost["gpu_seconds"] / 3600.0 * 3.6)
