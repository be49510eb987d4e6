"""Low-rank factorization: each Linear (and Conv2d) weight replaced by two thinner layers.

A weight W [out, in] is approximated by its truncated SVD, U_r S_r V_r^T, and the layer becomes
Linear(in, r) followed by Linear(r, out) (a Conv2d k x k becomes Conv2d(in, r, k) followed by a
1 x 1 Conv2d(r, out)). The rank is chosen per layer by ``rankRatio`` (a share of the full rank)
or by ``energy`` (the smallest rank keeping that share of the sum of squared singular values).
A layer is left as it is when r * (in + out) >= in * out: the two layers would cost as much
compute and memory as the one they replace. With ``fineTuneEpochs`` the factored model then
learns the original's outputs on the training rows (in ``precision``: fp32, bf16 or fp16).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from leanserve.api.spec import LowRankStep
from leanserve.compression.precision import check
from leanserve.compression.prune import editable_copy, field, fine_tune
from leanserve.compression.registry import Context, Model, Stage, StepError, register


def choose_rank(singular: torch.Tensor, cfg: LowRankStep) -> int:
    """The rank kept for singular values ``singular`` (descending)."""
    full = int(singular.numel())
    if cfg.rank_ratio is not None:
        return max(1, min(full, math.ceil(cfg.rank_ratio * full)))
    energy = singular.double().pow(2)
    share = energy.cumsum(0) / energy.sum().clamp(min=1e-30)
    assert cfg.energy is not None
    # the first rank whose cumulative share reaches the target (tolerating float rounding)
    return max(1, min(full, int((share < cfg.energy - 1e-9).sum()) + 1))


def saves_compute(rank: int, n_in: int, n_out: int) -> bool:
    return rank * (n_in + n_out) < n_in * n_out


def _factor_linear(layer: nn.Linear, rank: int, u: torch.Tensor, s: torch.Tensor,
                   vh: torch.Tensor) -> nn.Sequential:
    root = s[:rank].sqrt()
    first = nn.Linear(layer.in_features, rank, bias=False)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
    # split the singular values evenly between the two factors so neither gets tiny weights
    first.weight = nn.Parameter((root[:, None] * vh[:rank]).contiguous())
    second.weight = nn.Parameter((u[:, :rank] * root[None, :]).contiguous())
    if layer.bias is not None:
        second.bias = nn.Parameter(layer.bias.detach().clone())
    return nn.Sequential(first, second)


def _factor_conv(layer: nn.Conv2d, rank: int, u: torch.Tensor, s: torch.Tensor,
                 vh: torch.Tensor) -> nn.Sequential:
    root = s[:rank].sqrt()
    first = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding,
                      layer.dilation, bias=False, padding_mode=layer.padding_mode)
    second = nn.Conv2d(rank, layer.out_channels, 1, bias=layer.bias is not None)
    first.weight = nn.Parameter((root[:, None] * vh[:rank]).reshape(
        rank, layer.in_channels, *layer.kernel_size).contiguous())
    second.weight = nn.Parameter((u[:, :rank] * root[None, :]).reshape(
        layer.out_channels, rank, 1, 1).contiguous())
    if layer.bias is not None:
        second.bias = nn.Parameter(layer.bias.detach().clone())
    return nn.Sequential(first, second)


def factorize(module: nn.Module, cfg: LowRankStep) -> dict[str, Any]:
    """Factor every eligible layer of ``module`` in place; returns what the report shows."""
    ranks: dict[str, int] = {}
    skipped: dict[str, int] = {}
    before = sum(p.numel() for p in module.parameters())
    targets = [(name, m) for name, m in module.named_modules()
               if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)]
    for name, layer in targets:
        w = layer.weight.detach().float().reshape(layer.weight.shape[0], -1)
        n_out, n_in = w.shape
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        rank = choose_rank(s, cfg)
        if not saves_compute(rank, n_in, n_out):
            skipped[name] = rank
            continue
        new = (_factor_linear(layer, rank, u, s, vh) if isinstance(layer, nn.Linear)
               else _factor_conv(layer, rank, u, s, vh))
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, new)
        ranks[name] = rank
    after = sum(p.numel() for p in module.parameters())
    return {"ranks": ranks, "factored_layers": len(ranks), "skipped_layers": len(skipped),
            "params_before": before, "params_after": after}


@register(LowRankStep, Stage.TORCH)
def low_rank(model: Model, cfg: LowRankStep, ctx: Context) -> Model:
    """Factor a copy of ``model.module``; the input model is left unchanged."""
    if model.module is None:
        raise StepError(f"{field(ctx, 'lowRank', 'rankRatio')}: low-rank factorization needs a "
                        "torch model (put lowRank before any ONNX quantization step)")
    if cfg.fine_tune_epochs:
        check(cfg.precision.value, field(ctx, "lowRank", "precision"))
    module = editable_copy(model.module, ctx)
    with torch.no_grad():
        notes = factorize(module, cfg)
    if not notes["ranks"]:
        knob = "rankRatio" if cfg.rank_ratio is not None else "energy"
        value = cfg.rank_ratio if cfg.rank_ratio is not None else cfg.energy
        raise StepError(f"{field(ctx, 'lowRank', knob)}: {value} keeps so high a rank that no "
                        "layer gets cheaper by factoring (allowed: a lower value)")
    if cfg.fine_tune_epochs:
        started = time.monotonic()
        fine_tune(module, ctx, cfg.fine_tune_epochs, precision=cfg.precision.value,
                  kind="lowRank")
        notes.update(fine_tune_epochs=cfg.fine_tune_epochs, precision=cfg.precision.value,
                     fine_tune_seconds=round(time.monotonic() - started, 1))
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return Model(module=module, notes={**model.notes, **notes})
