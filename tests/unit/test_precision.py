"""Mixed-precision training: bf16 autocast on the CPU, fp16 only with CUDA and a GradScaler."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
from test_compression_fixtures import Digits, accuracy, digits_cnn
from torch import nn

from leanserve.api.spec import LowRankStep, PruneStep, QuantizeMethod, QuantizeStep, Task
from leanserve.compression import precision
from leanserve.compression.lowrank import low_rank
from leanserve.compression.precision import MixedPrecision, resolve
from leanserve.compression.prune import prune
from leanserve.compression.qat import train_qat
from leanserve.compression.registry import Context, Model, StepError

STEP_PATH = "spec.compression.candidates[c].steps[0]"


def test_selection_per_precision_and_device() -> None:
    assert resolve("fp32", "cpu") == ("cpu", None, False)
    assert resolve("bf16", "cpu") == ("cpu", torch.bfloat16, False)
    # fp16 selects CUDA autocast with a GradScaler where CUDA is there (decided without a GPU)
    assert resolve("fp16", "cuda:0", cuda_available=True) == ("cuda", torch.float16, True)
    assert resolve("bf16", "cuda:0", cuda_available=True) == ("cuda", torch.bfloat16, False)
    with pytest.raises(StepError, match=r"^x\.precision: fp16 trains only on a CUDA GPU.*"
                                        r"allowed here: fp32, bf16"):
        resolve("fp16", "cpu", field_name="x.precision", cuda_available=True)
    with pytest.raises(StepError, match="fp16 trains only on a CUDA GPU"):
        resolve("fp16", "cuda:0", cuda_available=False)
    with pytest.raises(StepError, match=r"'fp8' is not a precision \(allowed: fp32, bf16, fp16"):
        resolve("fp8", "cpu")


def test_bf16_autocast_computes_in_bf16_and_keeps_fp32_weights() -> None:
    layer = nn.Linear(8, 4)
    amp = MixedPrecision.create("bf16", "cpu")
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = layer.weight.detach().clone()
    with amp.autocast():
        out = layer(torch.randn(3, 8))
        loss = out.float().pow(2).mean()
    assert out.dtype == torch.bfloat16
    assert amp.step(loss, opt)
    assert layer.weight.dtype == torch.float32 and not torch.equal(layer.weight, before)
    fp32 = MixedPrecision.create("fp32", "cpu")
    with fp32.autocast():
        assert layer(torch.randn(3, 8)).dtype == torch.float32
    assert fp32.scaler is None and not fp32.enabled


@pytest.fixture(scope="module")
def digits() -> Digits:
    return digits_cnn()


def test_fp16_on_the_cpu_is_refused_naming_the_field(tmp_path: Path, digits: Digits) -> None:
    train, _, teacher = digits
    ctx = Context(task=Task.IMAGE_CLASSIFICATION, train=train[:2], teacher=teacher,
                  workdir=tmp_path, extra={"step_path": STEP_PATH})
    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without CUDA")
    cfg = PruneStep(method="magnitude", sparsity=0.5, fine_tune_epochs=1, precision="fp16")
    with pytest.raises(StepError, match=rf"^{re.escape(STEP_PATH)}\.prune\.precision: fp16"):
        prune(Model(module=teacher), cfg, ctx)
    cfg_lr = LowRankStep(energy=0.5, fine_tune_epochs=1, precision="fp16")
    with pytest.raises(StepError, match=rf"^{re.escape(STEP_PATH)}\.lowRank\.precision: fp16"):
        low_rank(Model(module=teacher), cfg_lr, ctx)


def test_fp16_gradient_scaler_skips_overflowing_steps_and_counts_them() -> None:
    """The loss-scaling bookkeeping of fp16 training (CUDA's), run here with torch's CPU
    GradScaler since this machine has no GPU: a finite step updates the weights; a step whose
    gradients overflow is skipped, counted, leaves the weights as they were and halves the
    scale; the next finite step trains again."""
    layer = nn.Linear(8, 4)
    amp = MixedPrecision("fp16", "cpu", torch.float16, torch.amp.GradScaler("cpu"))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(3, 8)

    def loss(scale: float = 1.0) -> torch.Tensor:
        with amp.autocast():
            out = layer(x)
        assert out.dtype == torch.float16
        return out.float().pow(2).mean() * scale

    before = layer.weight.detach().clone()
    assert amp.step(loss(), opt) and not torch.equal(layer.weight, before)
    scale = amp.scaler.get_scale()
    before = layer.weight.detach().clone()
    assert not amp.step(loss(float("inf")), opt)
    assert amp.skipped_steps == 1 and torch.equal(layer.weight, before)
    assert amp.scaler.get_scale() == scale / 2
    assert amp.step(loss(), opt) and amp.skipped_steps == 1
    assert layer.weight.dtype == torch.float32


@pytest.fixture
def fp16_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let fp16 (autocast + GradScaler) run on the CPU, which ``resolve`` refuses for users
    (CPU fp16 kernels are few and slow): the training loops' fp16 path is then exercised here
    with the same code that runs on CUDA, only the device differs."""
    real = precision.resolve

    def on_cpu(name: str, device: torch.device | str, *, field_name: str = "precision",
               cuda_available: bool | None = None) -> tuple[str, torch.dtype | None, bool]:
        if name == "fp16":
            return "cpu", torch.float16, True
        return real(name, device, field_name=field_name, cuda_available=cuda_available)

    monkeypatch.setattr(precision, "resolve", on_cpu)
    # on a machine with a GPU the steps would train on cuda:0, outside the CPU's autocast
    monkeypatch.setattr(precision, "training_device", lambda: torch.device("cpu"))


def test_the_training_steps_run_their_fp16_path_with_a_gradient_scaler(
        tmp_path: Path, digits: Digits, fp16_on_the_cpu: None) -> None:
    """The shared training loop (prune and lowRank fine-tunes, distillation) and QAT's own
    loop, in fp16 with loss scaling: they train, keep fp32 weights, and land where fp32 does."""
    train, held, teacher = digits
    ctx = Context(task=Task.IMAGE_CLASSIFICATION, train=train, teacher=teacher, workdir=tmp_path,
                  extra={"step_path": STEP_PATH})
    got = {}
    seen: list[torch.dtype] = []
    for name in ("fp32", "fp16"):
        cfg = PruneStep(method="structured", granularity="channel", importance="l2",
                        sparsity=0.5, fine_tune_epochs=2, precision=name)
        hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
                 for m in teacher.modules() if isinstance(m, nn.Conv2d)]
        try:  # the hooks travel into the pruned copy, whose fine-tune they watch
            out = prune(Model(module=teacher), cfg, ctx)
        finally:
            for h in hooks:
                h.remove()
        assert all(p.dtype == torch.float32 for p in out.module.parameters())
        got[name] = accuracy(out.module, held)
    print(f"digits prune fine-tune: fp32 {got['fp32']:.4f}, fp16 {got['fp16']:.4f}")
    assert torch.float16 in seen  # the fine-tune's convolutions ran in fp16
    assert abs(got["fp16"] - got["fp32"]) <= 0.02
    cfg_qat = QuantizeStep(method=QuantizeMethod.QAT, train_steps=20, learning_rate=1e-4,
                           precision="fp16")
    student = copy.deepcopy(teacher)
    before = [p.detach().clone() for p in student.parameters()]
    notes = train_qat(student, ctx, cfg_qat)
    print(f"digits QAT in fp16: {notes}")
    assert notes["precision"] == "fp16" and notes["qat_steps"] == 20
    assert notes["skipped_steps"] < 20 and math.isfinite(notes["qat_loss_last"])
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all())
               for p in student.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))


def test_gpu_time_counts_training_on_a_gpu_only() -> None:
    """GPU-seconds grow inside training blocks on a GPU and by what torchrun's workers held;
    training on the CPU adds none (the report's gpu_seconds is the difference across a
    candidate)."""
    before = precision.gpu_seconds_used()
    if not torch.cuda.is_available():
        with precision.on_training_device(nn.Linear(2, 2)) as dev:
            assert dev.type == "cpu"
        assert precision.gpu_seconds_used() == before
    precision.add_gpu_seconds(2.5)
    precision.add_gpu_seconds(-1.0)  # a clock that went backwards adds nothing
    assert precision.gpu_seconds_used() >= before + 2.5
