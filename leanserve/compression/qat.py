"""Quantization-aware training (``quantize: {method: qat}``): int8 weights and activations
simulated during a short fine-tune, then served as a real int8 ONNX graph.

What is simulated is what the served graph computes, so the fine-tune learns around the very
rounding ONNX Runtime will do:
- weights of every Linear and Conv: symmetric int8 as ORT's quantizer writes them (one scale per
  output channel with ``perChannel``, else one per tensor; scale = max|w| / 127);
- the input activation of each of those layers, uint8 asymmetric with a range that includes 0:
  ``activations: dynamic`` takes the range of each call's tensor (ORT's DynamicQuantizeLinear
  in front of MatMulInteger), over real tokens only, as the padding-free graph sees them;
  ``activations: static`` takes the running min/max over the training rows (what ORT's MinMax
  calibrator finds on the same rows);
- with ``embeddingBits: 4``, the vocabulary tables at 4 bits per weight, one scale per
  EMBEDDING_BLOCK weights (``quantize.quantize_embeddings``).
Rounding passes gradients straight through (the straight-through estimator). ``precision``
(leanserve.compression.precision) runs the fine-tune's forward pass in bf16 autocast (CPU or GPU)
or fp16 with a gradient scaler (GPU only); the weights, their int8 simulation and the optimizer
stay fp32. The loss is the
distillation loss of the other training steps against the uncompressed model (cosine + MSE for
embeddings; soft targets and labels for classifiers). After ``trainSteps`` steps the
fake-quantization is removed, the fine-tuned fp32 module is exported by the pipeline's own
export, and quantized for real: ``dynamic`` through ``quantize.int8_dynamic`` (MatMulInteger),
``static`` through ``quantize.int8_static`` (QDQ graph with ranges calibrated on
``calibrationSamples`` training rows of the fine-tuned model; ORT's CPU provider fuses it into
QLinear kernels). The static graph also quantizes ops QAT did not simulate (attention's
activation products, Gather): its figure is what the served graph gives, measured.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from leanserve.api.spec import ActivationQuant, QuantizeMethod, QuantizeStep
from leanserve.compression.registry import Context, Model, Stage, StepError, register

QAT_TEMPERATURE = 2.0
QAT_ALPHA = 0.5


def _ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``q`` forward, identity backward."""
    return x + (q - x).detach()


def fake_weight_int8(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """ORT's symmetric int8 weights: scale = max|w| / 127 (per output channel or tensor),
    values rounded into [-127, 127]."""
    flat = w.reshape(w.shape[0], -1)
    amax = flat.abs().amax(1, keepdim=True) if per_channel else flat.abs().amax().reshape(1, 1)
    scale = (amax / 127.0).clamp(min=1e-12).detach()
    q = torch.clamp(torch.round(flat / scale), -127, 127) * scale
    return _ste(w, q.reshape(w.shape))


def fake_activation_uint8(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """DynamicQuantizeLinear's arithmetic with the range [lo, hi] (widened to include 0)."""
    lo = torch.clamp(lo, max=0.0).detach()
    hi = torch.clamp(hi, min=0.0).detach()
    scale = ((hi - lo) / 255.0).clamp(min=1e-12)
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    q = (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale
    return _ste(x, q)


def fake_table_4bit(w: torch.Tensor, block: int) -> torch.Tensor:
    """``quantize.quantize_embeddings``'s 4-bit rows: one scale per ``block`` weights."""
    rows, width = w.shape
    b = w.reshape(rows, width // block, block)
    scale = (b.abs().amax(-1, keepdim=True) / 7.0).clamp(min=1e-12).detach()
    q = torch.clamp(torch.round(b / scale), -8, 7) * scale
    return _ste(w, q.reshape(rows, width))


class _Weight(nn.Module):
    def __init__(self, per_channel: bool) -> None:
        super().__init__()
        self.per_channel = per_channel

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_weight_int8(w, self.per_channel)


class _Table(nn.Module):
    def __init__(self, block: int) -> None:
        super().__init__()
        self.block = block

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_table_4bit(w, self.block)


@dataclass
class _Observer:
    """The input range of one layer: per call (dynamic) or the running min/max (static)."""

    static: bool
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None

    def range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = x.detach().min(), x.detach().max()
        if not self.static:
            return lo, hi
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        return self.lo, self.hi


@dataclass
class FakeQuant:
    """Fake-quantization attached to a module in place (parametrized weights, input hooks);
    ``remove()`` leaves the module with its trained fp32 weights and nothing else."""

    module: nn.Module
    static: bool
    mask: list[torch.Tensor | None] = field(default_factory=lambda: [None])
    """The attention mask of the batch being run: ranges come from real tokens only."""
    layers: int = 0
    tables: int = 0
    _hooks: list = field(default_factory=list)
    _params: list[nn.Module] = field(default_factory=list)

    def attach(self, per_channel: bool, table_block: int | None, min_rows: int) -> FakeQuant:
        for layer in self.module.modules():
            if isinstance(layer, nn.Linear | nn.Conv1d | nn.Conv2d):
                parametrize.register_parametrization(layer, "weight", _Weight(per_channel))
                self._params.append(layer)
                self._hooks.append(layer.register_forward_pre_hook(self._input_hook()))
                self.layers += 1
            elif (isinstance(layer, nn.Embedding) and table_block is not None
                  and layer.num_embeddings >= min_rows
                  and layer.embedding_dim % table_block == 0):
                parametrize.register_parametrization(layer, "weight", _Table(table_block))
                self._params.append(layer)
                self.tables += 1
        return self

    def _input_hook(self):
        obs = _Observer(self.static)

        def hook(_layer: nn.Module, args: tuple) -> tuple:
            x = args[0]
            mask = self.mask[0]
            real = x
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                real = x[mask.bool()]
            lo, hi = obs.range(real.float())
            # the rounding in fp32 whatever autocast runs the layer in (bf16 holds the 256
            # levels, not the arithmetic that finds them)
            return (fake_activation_uint8(x.float(), lo, hi).to(x.dtype), *args[1:])

        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        for layer in self._params:
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        self._hooks.clear()
        self._params.clear()


def _batches(ctx: Context, steps: int) -> Iterator:
    rng = random.Random(ctx.seed)
    order: list = []
    for _ in range(steps):
        if not order:
            order = list(ctx.train)
            rng.shuffle(order)
        yield order.pop()


@contextmanager
def _grad_enabled() -> Iterator[None]:
    with torch.enable_grad():
        yield


def train_qat(module: nn.Module, ctx: Context, cfg: QuantizeStep) -> dict[str, object]:
    """Fine-tune ``module`` in place with int8 fake-quantization; returns what the report
    says of it (steps, loss at the start and the end, layers simulated)."""
    from leanserve.compression._ddp_train import kd_loss
    from leanserve.compression.precision import (
        MixedPrecision,
        on_training_device,
        training_device,
    )
    from leanserve.compression.quantize import EMBEDDING_BLOCK, MIN_VOCAB_ROWS

    where = f"{ctx.extra.get('step_path', 'quantize')}.quantize.precision"
    amp = MixedPrecision.create(cfg.precision.value, training_device(), field_name=where)
    static = cfg.activations is ActivationQuant.STATIC
    block = EMBEDDING_BLOCK if cfg.embedding_bits == 4 and not static else None
    fq = FakeQuant(module, static).attach(cfg.per_channel, block, MIN_VOCAB_ROWS)
    if fq.layers == 0:
        fq.remove()
        raise StepError(f"{ctx.extra.get('step_path', 'quantize')}.quantize.method: qat found "
                        "no Linear or Conv layer to quantize in the model")
    module.eval()  # dropout off, BatchNorm statistics frozen (they are folded at export)
    for p in module.parameters():
        p.requires_grad_(True)
    losses: list[float] = []
    teacher = ctx.teacher if isinstance(ctx.teacher, nn.Module) else None
    try:
        with _grad_enabled(), on_training_device(module, *([teacher] if teacher else [])) as dev:
            # the optimizer is made where the parameters train (its state follows them)
            opt = torch.optim.AdamW(list(module.parameters()), lr=cfg.learning_rate,
                                    weight_decay=0.0)

            def on(b: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
                return ({k: v.to(dev) for k, v in b.inputs.items()},
                        None if b.labels is None else b.labels.to(dev))

            if static:  # ranges first seen on the calibration rows, as the calibrator will
                with torch.no_grad():
                    for b in ctx.train[:max(1, math.ceil(cfg.calibration_samples / 32))]:
                        inputs, _ = on(b)
                        fq.mask[0] = inputs.get("attention_mask")
                        module(**inputs)
            for b in _batches(ctx, cfg.train_steps):
                inputs, labels = on(b)
                with torch.no_grad():
                    target = ctx.teacher(**inputs).float()
                fq.mask[0] = inputs.get("attention_mask")
                with amp.autocast():
                    out = module(**inputs)
                loss = kd_loss(out.float(), target, labels, task=ctx.task,
                               temperature=QAT_TEMPERATURE, alpha=QAT_ALPHA)
                amp.step(loss, opt)
                losses.append(loss.item())
    finally:
        fq.mask[0] = None
        fq.remove()
    for p in module.parameters():
        p.requires_grad_(False)
    head = losses[:max(1, len(losses) // 10)]
    tail = losses[-max(1, len(losses) // 10):]
    return {"qat_steps": len(losses), "qat_layers": fq.layers, "qat_tables_4bit": fq.tables,
            "qat_loss_first": float(f"{sum(head) / len(head):.4g}"),
            "qat_loss_last": float(f"{sum(tail) / len(tail):.4g}"),
            "qat_activations": cfg.activations.value, "precision": cfg.precision.value,
            **({"skipped_steps": amp.skipped_steps} if amp.scaler is not None else {})}


@register(QuantizeStep, Stage.TORCH, method=QuantizeMethod.QAT.value)
def qat(model: Model, cfg: QuantizeStep, ctx: Context) -> Model:
    from leanserve.compression.prune import editable_copy
    from leanserve.compression.quantize import int8_dynamic, int8_static

    if model.module is None:
        raise StepError("quantize qat fine-tunes the torch model; the model is already ONNX "
                        "(put it before ONNX steps, or use a format other than onnx)")
    if not ctx.train:
        raise StepError("spec.data: qat needs training rows, and the data has none left after "
                        "the validation and test splits")
    if ctx.to_onnx is None:
        raise StepError("quantize qat: no export available in this context")
    from leanserve.compression.precision import check

    check(cfg.precision.value, f"{ctx.extra.get('step_path', 'quantize')}.quantize.precision")
    module = editable_copy(model.module, ctx)  # TorchScript Sequentials become eager modules
    notes = train_qat(module, ctx, cfg)
    exported = ctx.to_onnx(Model(module=module.eval(), notes=model.notes),
                           ctx.workdir / "qat-export")
    exported.notes = {**exported.notes, **notes}
    if cfg.activations is ActivationQuant.STATIC:
        out = int8_static(exported, cfg, ctx)
    else:
        out = int8_dynamic(exported, cfg, ctx)
    out.notes = {**out.notes, "quantize": QuantizeMethod.QAT.value}
    return out


__all__ = ["FakeQuant", "fake_activation_uint8", "fake_table_4bit", "fake_weight_int8",
           "train_qat"]
