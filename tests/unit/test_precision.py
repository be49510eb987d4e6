"""Mixed-precision training: bf16 autocast on the CPU, fp16 only with CUDA and a GradScaler."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from test_compression_fixtures import Digits, digits_cnn
from torch import nn

from leanserve.api.spec import LowRankStep, PruneStep, Task
from leanserve.compression.lowrank import low_rank
from leanserve.compression.precision import MixedPrecision, resolve
from leanserve.compression.prune import prune
from leanserve.compression.registry import Batch, Context, Model, StepError

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


def accuracy(module: nn.Module, held: list[Batch]) -> float:
    with torch.no_grad():
        right = sum(int((module(**b.inputs).argmax(1) == b.labels).sum()) for b in held)
    return right / sum(len(b.labels) for b in held)


def test_bf16_fine_tune_keeps_digits_accuracy_close_to_fp32(tmp_path: Path, digits: Digits) -> None:
    train, held, teacher = digits
    base = accuracy(teacher, held)
    assert base > 0.9
    ctx = Context(task=Task.IMAGE_CLASSIFICATION, train=train, teacher=teacher, workdir=tmp_path,
                  extra={"step_path": STEP_PATH})
    got, seconds = {}, {}
    for precision in ("fp32", "bf16"):
        cfg = PruneStep(method="structured", granularity="channel", importance="l2",
                        sparsity=0.5, fine_tune_epochs=2, precision=precision)
        started = time.perf_counter()
        out = prune(Model(module=teacher), cfg, ctx)
        seconds[precision] = time.perf_counter() - started
        assert all(p.dtype == torch.float32 for p in out.module.parameters())
        got[precision] = accuracy(out.module, held)
    print(f"digits: baseline {base:.4f}, fp32 {got['fp32']:.4f}, bf16 {got['bf16']:.4f}, "
          f"bf16/fp32 time {seconds['bf16'] / seconds['fp32']:.2f}")
    assert got["fp32"] > base - 0.05
    assert abs(got["bf16"] - got["fp32"]) <= 0.02


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


def test_low_rank_fine_tune_recovers_accuracy(tmp_path: Path, digits: Digits) -> None:
    train, held, teacher = digits
    ctx = Context(task=Task.IMAGE_CLASSIFICATION, train=train, teacher=teacher, workdir=tmp_path,
                  extra={"step_path": STEP_PATH})
    plain = low_rank(Model(module=teacher), LowRankStep(rank_ratio=0.3), ctx)
    tuned = low_rank(Model(module=teacher), LowRankStep(rank_ratio=0.3, fine_tune_epochs=2,
                                                        precision="bf16"), ctx)
    assert tuned.notes["fine_tune_epochs"] == 2 and tuned.notes["precision"] == "bf16"
    assert accuracy(tuned.module, held) > accuracy(plain.module, held)
