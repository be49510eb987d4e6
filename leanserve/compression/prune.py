"""Pruning: unstructured magnitude masks, and structured removal of neurons, channels or heads.

Unstructured pruning zeroes the least important weights (torch.nn.utils.prune masks, made
permanent); it shrinks nothing by itself and only pays off with sparse kernels or compression,
so it reports the sparsity it really reached. Structured pruning removes whole units and leaves a
smaller dense model that runs faster on any runtime:

- transformers (BERT-like encoders): FFN intermediate units (``neuron``) and attention heads
  (``head``). Both are self-contained inside one layer (rows of one Linear, columns of the next),
  so this module slices them directly; torch-pruning 1.6's head pruning did not remove any head
  of transformers 5.23's BertModel when tried, and a wrong q/k pairing would silently break the
  model, which direct slicing cannot do.
- CNNs and MLPs: Conv2d out-channels (``channel``) or hidden Linear units (``neuron``) through
  torch-pruning's DepGraph, which fixes up every dependent layer (BatchNorm, the Linear after a
  Flatten, ...).

Reconstruction (``reconstruct``, transformers): removing units changes what the Linear after
them (FFN output, attention output) receives; its weights and bias are refit by ridge least
squares so that, on real-token activations of the training rows, it reproduces the unpruned
layer's output from the kept units alone (the layer-wise reconstruction of Kwon et al., "A Fast
Post-Training Pruning Framework for Transformers", 2022; the bias absorbs the removed units'
mean as in FLAP). Layers are pruned in order, each on the activations of the already pruned
layers before it, so errors do not compound unseen. No gradient step, no labels.

Importance: ``l1``/``l2`` weight norms, ``taylor`` |w * dL/dw| and ``gradient-norm`` |dL/dw|,
with gradients of the loss against the teacher's outputs on a few training batches. An
optional schedule reaches the sparsity in ``iterations`` steps with ``fineTuneEpochs`` of
fine-tuning against the teacher between them.

TorchScript models cannot be edited structurally; ``editable_copy`` rebuilds an eager module
from a scripted Sequential of standard layers (what examples/digits/train.py writes) and checks
that the rebuilt module computes the same outputs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune as torch_prune

from leanserve.api.spec import Granularity, Importance, PruneMethod, PruneStep
from leanserve.compression import _ddp_train
from leanserve.compression import precision as precision_mod
from leanserve.compression.registry import Context, Model, Stage, StepError, register

GRAD_BATCHES = 4
"""Training batches whose gradients rank weights for taylor and gradient-norm importance."""

FINE_TUNE_LR = {True: 5e-5, False: 1e-3}
"""Fine-tuning learning rate between pruning steps, by "is a transformer"."""


# --------------------------------------------------------------------------------------------
# helpers shared with lowrank.py and distill.py


def field(ctx: Context, kind: str, name: str) -> str:
    """The spec path of a step's field, e.g. spec.compression.candidates[x].steps[0].prune.sparsity.

    The pipeline puts the step's own path in ``ctx.extra["step_path"]``; without it the message
    still names the step kind and field.
    """
    prefix = ctx.extra.get("step_path")
    return f"{prefix}.{kind}.{name}" if prefix else f"{kind}.{name}"


_SIMPLE_LAYERS: dict[str, Callable[[Any], nn.Module]] = {
    "ReLU": lambda m: nn.ReLU(),
    "GELU": lambda m: nn.GELU(),
    "Sigmoid": lambda m: nn.Sigmoid(),
    "Tanh": lambda m: nn.Tanh(),
    "Identity": lambda m: nn.Identity(),
    "Dropout": lambda m: nn.Dropout(m.p),
    "Flatten": lambda m: nn.Flatten(m.start_dim, m.end_dim),
    "MaxPool2d": lambda m: nn.MaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation,
                                        ceil_mode=m.ceil_mode),
    "AvgPool2d": lambda m: nn.AvgPool2d(m.kernel_size, m.stride, m.padding,
                                        ceil_mode=m.ceil_mode),
    "AdaptiveAvgPool2d": lambda m: nn.AdaptiveAvgPool2d(m.output_size),
    "Conv2d": lambda m: nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride,
                                  m.padding, m.dilation, m.groups, bias=m.bias is not None,
                                  padding_mode=m.padding_mode),
    "Linear": lambda m: nn.Linear(m.in_features, m.out_features, bias=m.bias is not None),
    "BatchNorm2d": lambda m: nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine,
                                            m.track_running_stats),
    "BatchNorm1d": lambda m: nn.BatchNorm1d(m.num_features, m.eps, m.momentum, m.affine,
                                            m.track_running_stats),
}


def _unscript(sm: torch.jit.ScriptModule, where: str) -> nn.Module:
    kind = getattr(sm, "original_name", type(sm).__name__)
    if kind == "Sequential":
        return nn.Sequential(*[_unscript(c, f"{where}.{n}") for n, c in sm.named_children()])
    if kind not in _SIMPLE_LAYERS:
        raise StepError(
            f"spec.model: the TorchScript submodule {where} ({kind}) cannot be rebuilt for "
            f"editing (allowed: a Sequential of {', '.join(sorted(_SIMPLE_LAYERS))}); save the "
            "model as such a Sequential, or use format huggingface for transformers")
    eager = _SIMPLE_LAYERS[kind](sm)
    state = {k: v.detach().clone() for k, v in sm.state_dict().items()}
    eager.load_state_dict(state)
    return eager


def _replace_scripted(module: nn.Module) -> tuple[nn.Module, bool]:
    if isinstance(module, torch.jit.ScriptModule):
        return _unscript(module, "net"), True
    changed = False
    for name, child in list(module.named_children()):
        new, did = _replace_scripted(child)
        if did:
            setattr(module, name, new)
            changed = True
    return module, changed


def editable_copy(module: nn.Module, ctx: Context) -> nn.Module:
    """A deep copy of ``module`` that structural edits may change, TorchScript parts rebuilt.

    The caller's module (possibly the teacher itself) is never touched.
    """
    scripted = any(isinstance(m, torch.jit.ScriptModule) for m in module.modules())
    if not scripted:
        return copy.deepcopy(module)
    rebuilt, _ = _replace_scripted(copy.deepcopy(module))
    if ctx.train:
        sample = ctx.train[0].inputs
        with torch.no_grad():
            same = torch.allclose(module(**sample), rebuilt(**sample), atol=1e-5, rtol=1e-4)
        if not same:
            raise StepError("spec.model: the TorchScript model's forward is not a plain chain "
                            "of its submodules, so it cannot be rebuilt for editing (allowed: "
                            "a Sequential of standard layers)")
    return rebuilt


def transformer_layers(module: nn.Module) -> list[nn.Module] | None:
    """The encoder layers of a BERT-like backbone inside ``module``, or None."""
    backbone = getattr(module, "backbone", None)
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    if layers is None or not len(layers):
        return None
    first = layers[0]
    if not (hasattr(first, "attention") and hasattr(first, "intermediate")):
        return None
    return list(layers)


def describe(module: nn.Module) -> str:
    if transformer_layers(module) is not None:
        return "a transformer"
    if any(isinstance(m, nn.Conv2d) or getattr(m, "original_name", None) == "Conv2d"
           for m in module.modules()):  # eager, or a TorchScript submodule
        return "a CNN"
    return "an MLP"


def fine_tune(module: nn.Module, ctx: Context, epochs: int, *, lr: float | None = None,
              precision: str = "fp32", kind: str = "prune") -> None:
    """Train ``module`` towards the teacher's outputs on ctx.train for ``epochs`` epochs, in
    ``precision`` (precision.py; ``kind`` names the step in a refusal)."""
    if epochs <= 0 or not ctx.train:
        return
    # The teacher's outputs do not change between calls: compute them once per context.
    cached = ctx.extra.get("_teacher_rows")
    if cached is None or cached[0] is not ctx.teacher:
        cached = (ctx.teacher, _ddp_train.collect(ctx.train, ctx.teacher))
        ctx.extra["_teacher_rows"] = cached
    data = cached[1]
    is_text = transformer_layers(module) is not None
    rows = next(iter(ctx.train[0].inputs.values())).shape[0]
    cfg = _ddp_train.TrainConfig(
        task=ctx.task, epochs=epochs,
        learning_rate=lr if lr is not None else FINE_TUNE_LR[is_text],
        batch_size=max(1, int(rows)), seed=ctx.seed, precision=precision,
        precision_field=field(ctx, kind, "precision"))
    for p in module.parameters():
        p.requires_grad_(True)
    with precision_mod.on_training_device(module):
        _ddp_train.train(module, data, cfg)


def accumulate_grads(module: nn.Module, ctx: Context, batches: int = GRAD_BATCHES) -> None:
    """Fill .grad with the gradient of the loss against the teacher on a few batches."""
    if not ctx.train:
        raise StepError("spec.data: taylor and gradient-norm importance need training rows")
    module.zero_grad(set_to_none=True)
    module.eval()
    for batch in ctx.train[:batches]:
        with torch.no_grad():
            target = ctx.teacher(**batch.inputs).float()
        with torch.enable_grad():
            out = module(**batch.inputs)
            loss = _ddp_train.kd_loss(out, target, batch.labels, task=ctx.task,
                                      temperature=2.0, alpha=0.5)
            loss.backward()


def _needs_grads(importance: Importance) -> bool:
    return importance in (Importance.TAYLOR, Importance.GRADIENT_NORM)


def _score(weight: torch.Tensor, grad: torch.Tensor | None, importance: Importance) -> torch.Tensor:
    """Elementwise importance of weights (summed/normed over a unit by the caller)."""
    w = weight.detach()
    if importance is Importance.L1:
        return w.abs()
    if importance is Importance.L2:
        return w.pow(2)
    if grad is None:
        return torch.zeros_like(w)
    if importance is Importance.TAYLOR:
        return (w * grad).abs()
    return grad.pow(2)


def _schedule(target: float, iterations: int) -> list[float]:
    """Cumulative sparsity after each iteration (linear in the number of units kept)."""
    return [target * (k + 1) / iterations for k in range(iterations)]


# --------------------------------------------------------------------------------------------
# unstructured magnitude


def _prunable(module: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in module.modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def _magnitude(module: nn.Module, cfg: PruneStep, ctx: Context) -> dict[str, Any]:
    params = _prunable(module)
    if not params:
        raise StepError(f"{field(ctx, 'prune', 'method')}: magnitude pruning found no Linear or "
                        "Conv2d weights in the model")
    done = 0.0
    for target in _schedule(cfg.sparsity, cfg.iterations):
        scores = None
        if _needs_grads(cfg.importance):
            accumulate_grads(module, ctx)
            scores = {}
            for m, name in params:
                w = getattr(m, name + "_orig", getattr(m, name))
                scores[(m, name)] = _score(w, w.grad, cfg.importance)
        # Each call prunes a share of what is still unpruned, so convert the cumulative target.
        amount = (target - done) / (1.0 - done) if done < 1.0 else 0.0
        torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured,
                                        importance_scores=scores, amount=float(amount))
        done = target
        # with the masks still applied, so pruned weights stay zero while the rest adapts
        fine_tune(module, ctx, cfg.fine_tune_epochs, precision=cfg.precision.value)
    for m, name in params:
        torch_prune.remove(m, name)
    module.zero_grad(set_to_none=True)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in params)
    total = sum(m.weight.numel() for m, _ in params)
    return {"sparsity": round(zeros / total, 4), "sparsity_target": cfg.sparsity,
            "pruned_weights": zeros, "prunable_weights": total}


# --------------------------------------------------------------------------------------------
# structured: transformer FFN neurons and attention heads (direct slicing)


def _kept_count(n: int, sparsity: float) -> int:
    # rounded to the nearest unit, so a high sparsity on a small layer can remove all of it
    return n - math.floor(n * sparsity + 0.5)


def _check_leaves_something(n: int, kept: int, sparsity: float, what: str, ctx: Context) -> None:
    if kept < 1:
        raise StepError(f"{field(ctx, 'prune', 'sparsity')}: {sparsity} removes all {n} {what} "
                        f"of a layer (allowed: below {1 - 1 / n:.4g} for this model)")


def _slice_linear(layer: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping output rows (dim 0) or input columns (dim 1) ``keep``."""
    weight = layer.weight.detach().index_select(dim, keep).clone()
    out_f, in_f = weight.shape
    new = nn.Linear(in_f, out_f, bias=layer.bias is not None)
    new.weight = nn.Parameter(weight)
    if layer.bias is not None:
        bias = layer.bias.detach()
        new.bias = nn.Parameter((bias.index_select(0, keep) if dim == 0 else bias).clone())
    return new


def _grad(p: torch.Tensor) -> torch.Tensor | None:
    return None if p.grad is None else p.grad.detach()


def _activation_scores(after: nn.Linear, x: torch.Tensor | None) -> torch.Tensor:
    """Per input column of ``after``: rms of what it receives x the norm of its weights."""
    if x is None:
        raise StepError("activation importance needs the layer's activations")
    return x.float().pow(2).mean(0).sqrt() * after.weight.detach().norm(dim=0)


def _ffn_scores(layer: nn.Module, importance: Importance,
                x: torch.Tensor | None = None) -> torch.Tensor:
    up, down = layer.intermediate.dense, layer.output.dense
    if importance is Importance.ACTIVATION:
        return _activation_scores(down, x)
    s = _score(up.weight, _grad(up.weight), importance).sum(1)
    s = s + _score(down.weight, _grad(down.weight), importance).sum(0)
    return s


def _head_scores(layer: nn.Module, importance: Importance,
                 x: torch.Tensor | None = None) -> torch.Tensor:
    att = layer.attention.self
    heads, size = att.num_attention_heads, att.attention_head_size
    if importance is Importance.ACTIVATION:
        per_dim = _activation_scores(layer.attention.output.dense, x)
        return per_dim.view(heads, size).pow(2).sum(1).sqrt()
    total = torch.zeros(heads)
    for lin in (att.query, att.key, att.value):
        total += _score(lin.weight, _grad(lin.weight), importance).sum(1).view(heads, size).sum(1)
    out = layer.attention.output.dense
    total += _score(out.weight, _grad(out.weight), importance).sum(0).view(heads, size).sum(1)
    return total


RECONSTRUCT_TOKENS = 16384
"""Real-token activations collected per layer for the least-squares refit."""
RIDGE = 1e-2
"""Ridge term of the refit (towards the sliced weights), relative to the mean diagonal of the
Gram matrix. MiniLM, 20% of FFN neurons, held-out cosine: 1e-4 0.9798, 1e-2 0.9802 with 16k
tokens; with 36 training rows (~500 tokens for 1441 unknowns per output) 1e-4 overfits to
0.866 while 1e-2 gives 0.991 (tests/integration/test_compression_minilm.py)."""

Refit = Callable[[nn.Linear, torch.Tensor], nn.Linear]
"""(the Linear after the pruned units, kept input columns) -> the Linear to use instead."""


def _slice_inputs(layer: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    return _slice_linear(layer, keep, 1)


class _Captured(Exception):
    """Raised by ``layer_inputs``' hook once it holds the Linear's input: the rest of the
    forward pass (the layers after it) would compute nothing it keeps."""


def layer_inputs(module: nn.Module, linear: nn.Linear, ctx: Context,
                 limit: int = RECONSTRUCT_TOKENS) -> torch.Tensor:
    """What ``linear`` receives inside ``module`` on the training rows, real tokens only.

    Each batch's forward pass stops at ``linear``: for layer i of n that is about (i + 1) / n
    of a full pass, so collecting for every layer in turn costs about half as much."""
    rows: list[torch.Tensor] = []
    mask: list[torch.Tensor | None] = [None]

    def grab(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach()
        m = mask[0]
        if m is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape):
            rows.append(x[m.bool()])
        else:
            rows.append(x.reshape(-1, x.shape[-1]))
        raise _Captured

    handle = linear.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            for batch in ctx.train:
                mask[0] = batch.inputs.get("attention_mask")
                with suppress(_Captured):
                    module(**batch.inputs)
                if sum(len(r) for r in rows) >= limit:
                    break
    finally:
        handle.remove()
    if not rows:
        raise StepError("spec.data: prune.reconstruct needs training rows")
    return torch.cat(rows)[:limit]


def refit(layer: nn.Linear, keep: torch.Tensor, x: torch.Tensor) -> nn.Linear:
    """``layer`` restricted to input columns ``keep``, with weights and bias refit by least
    squares so that on inputs ``x`` [N, in] it gives what the full layer gave. The ridge term
    pulls towards the plainly sliced weights, not towards zero: with few rows (N below the
    kept units, an underdetermined fit) the answer stays near slicing instead of overfitting
    them."""
    x64 = x.double()
    w = layer.weight.detach().double()
    b = (layer.bias.detach().double() if layer.bias is not None
         else torch.zeros(layer.out_features, dtype=torch.float64))
    target = x64 @ w.T + b  # [N, out]
    a = torch.cat([x64[:, keep], torch.ones(len(x64), 1, dtype=torch.float64)], dim=1)
    prior = torch.cat([w[:, keep].T, b[None, :]], dim=0)  # [kept + 1, out]: the slice
    gram = a.T @ a
    lam = RIDGE * gram.diagonal().mean()
    gram += lam * torch.eye(len(gram), dtype=torch.float64)
    solution = torch.linalg.solve(gram, a.T @ target + lam * prior)
    new = nn.Linear(len(keep), layer.out_features, bias=True)
    new.weight = nn.Parameter(solution[:-1].T.contiguous().float())
    new.bias = nn.Parameter(solution[-1].contiguous().float())
    return new


def _prune_ffn(layer: nn.Module, keep_n: int, importance: Importance,
               next_layer: Refit = _slice_inputs, x: torch.Tensor | None = None) -> int:
    scores = _ffn_scores(layer, importance, x)
    keep = torch.topk(scores, keep_n).indices.sort().values
    removed = scores.numel() - keep_n
    layer.intermediate.dense = _slice_linear(layer.intermediate.dense, keep, 0)
    layer.output.dense = next_layer(layer.output.dense, keep)
    return removed


def _prune_heads(layer: nn.Module, keep_n: int, importance: Importance,
                 next_layer: Refit = _slice_inputs, x: torch.Tensor | None = None) -> int:
    att = layer.attention.self
    heads, size = att.num_attention_heads, att.attention_head_size
    scores = _head_scores(layer, importance, x)
    keep_heads = torch.topk(scores, keep_n).indices.sort().values
    keep = (keep_heads[:, None] * size + torch.arange(size)[None, :]).reshape(-1)
    for name in ("query", "key", "value"):
        setattr(att, name, _slice_linear(getattr(att, name), keep, 0))
    layer.attention.output.dense = next_layer(layer.attention.output.dense, keep)
    # transformers reshapes with -1 heads, but keep the attributes true for anyone reading them.
    att.num_attention_heads = keep_n
    att.all_head_size = keep_n * size
    return heads - keep_n


def _transformer_structured(module: nn.Module, layers: list[nn.Module], cfg: PruneStep,
                            ctx: Context) -> dict[str, Any]:
    by_heads = cfg.granularity is Granularity.HEAD
    sizes = [(lay.attention.self.num_attention_heads if by_heads
              else lay.intermediate.dense.out_features) for lay in layers]
    for n in sizes:
        _check_leaves_something(n, _kept_count(n, cfg.sparsity), cfg.sparsity,
                                "heads" if by_heads else "FFN neurons", ctx)
    removed = 0
    for target in _schedule(cfg.sparsity, cfg.iterations):
        if _needs_grads(cfg.importance):
            accumulate_grads(module, ctx)
        for lay, n in zip(layers, sizes, strict=True):
            keep_n = _kept_count(n, target)
            current = (lay.attention.self.num_attention_heads if by_heads
                       else lay.intermediate.dense.out_features)
            if keep_n < current:
                fn = _prune_heads if by_heads else _prune_ffn
                after = lay.attention.output.dense if by_heads else lay.output.dense
                x = (layer_inputs(module, after, ctx)
                     if cfg.reconstruct or cfg.importance is Importance.ACTIVATION else None)
                if cfg.reconstruct:
                    removed += fn(lay, keep_n, cfg.importance,
                                  lambda linear, keep, x=x: refit(linear, keep, x), x)
                else:
                    removed += fn(lay, keep_n, cfg.importance, x=x)
        module.zero_grad(set_to_none=True)
        fine_tune(module, ctx, cfg.fine_tune_epochs, precision=cfg.precision.value)
    unit = "heads" if by_heads else "neurons"
    kept = [(lay.attention.self.num_attention_heads if by_heads
             else lay.intermediate.dense.out_features) for lay in layers]
    notes: dict[str, Any] = {f"removed_{unit}": removed, f"kept_{unit}_per_layer": kept,
                             "sparsity": round(removed / sum(sizes), 4)}
    if cfg.reconstruct:
        notes["reconstructed"] = "least squares on training activations"
    return notes


# --------------------------------------------------------------------------------------------
# structured: CNN channels and MLP neurons (torch-pruning DepGraph)


@contextmanager
def _grads_as_weights(module: nn.Module) -> Iterator[None]:
    """Let a weight-norm importance read gradients instead: gradient-norm importance is the
    group L2 norm of dL/dw, which is exactly MagnitudeImportance(p=2) applied to the grads."""
    saved = []
    for p in module.parameters():
        saved.append(p.data)
        p.data = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p.data)
    try:
        yield
    finally:
        for p, data in zip(module.parameters(), saved, strict=True):
            p.data = data


def _tp_importance(importance: Importance) -> tp.importance.Importance:
    if importance is Importance.L1:
        return tp.importance.MagnitudeImportance(p=1)
    if importance is Importance.TAYLOR:
        return tp.importance.TaylorImportance()
    return tp.importance.MagnitudeImportance(p=2)  # l2, and gradient-norm on swapped-in grads


def units(layer: nn.Module) -> int:
    """Out-channels of a Conv2d, output units of a Linear."""
    return int(layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features)


def remove_units(module: nn.Module, targets: list[nn.Module], ratio: float,
                 importance: Importance, ctx: Context, *, iterations: int = 1,
                 after_step: Callable[[], None] | None = None) -> list[list[int]]:
    """Remove the share ``ratio`` of the out-channels (Conv2d) or units (Linear) of each of
    ``targets`` inside ``module``, in place, through torch-pruning's DepGraph (which also cuts
    what reads them: the next layer's inputs, a BatchNorm, the Linear after a Flatten). Every
    other Conv2d and Linear keeps its outputs. The weakest units by ``importance`` go, over
    ``iterations`` steps with ``after_step`` (fine-tuning) after each.

    Returns, per target, the indices (in the original layer) of the units it kept: shared with
    distill.py, whose student learns each kept unit's teacher output."""
    ignored = [m for m in module.modules()
               if isinstance(m, nn.Conv2d | nn.Linear) and not any(m is t for t in targets)]
    example = {k: v[:2] for k, v in ctx.train[0].inputs.items()}
    pruner = tp.pruner.MetaPruner(
        module, example, importance=_tp_importance(importance),
        pruning_ratio=ratio, iterative_steps=iterations,
        ignored_layers=ignored, global_pruning=False)
    kept = [list(range(units(m))) for m in targets]
    position = {id(m): i for i, m in enumerate(targets)}

    def step() -> None:
        for group in pruner.step(interactive=True):
            for dep, idxs in group:
                i = position.get(id(dep.target.module))
                if i is not None and pruner.DG.is_out_channel_pruning_fn(dep.handler):
                    gone = {int(getattr(j, "idx", j)) for j in idxs}
                    kept[i] = [k for pos, k in enumerate(kept[i]) if pos not in gone]
            group.prune()

    for _ in range(iterations):
        if _needs_grads(importance):
            accumulate_grads(module, ctx)
        if importance is Importance.GRADIENT_NORM:
            with _grads_as_weights(module):
                step()
        else:
            step()
        module.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
    return kept


def _cnn_structured(module: nn.Module, cfg: PruneStep, ctx: Context) -> dict[str, Any]:
    if not ctx.train:
        raise StepError("spec.data: structured pruning of a CNN or MLP needs a sample input "
                        "(the data has no training rows)")
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if cfg.granularity is Granularity.CHANNEL:
        targets = convs
        unit = "channels"
    else:
        targets = linears[:-1]  # the last Linear produces the outputs: its units stay
        unit = "neurons"
    if not targets:
        raise StepError(f"{field(ctx, 'prune', 'granularity')}: {cfg.granularity.value} "
                        f"pruning found no prunable layer in {describe(module)}"
                        f" (allowed: {'neuron' if convs == [] else 'channel, neuron'})")
    for m in targets:
        n = units(m)
        # torch-pruning keeps int(n * (1 - ratio)) units of a layer
        _check_leaves_something(n, int(n * (1 - cfg.sparsity)), cfg.sparsity, unit, ctx)
    before = sum(p.numel() for p in module.parameters())
    remove_units(module, targets, cfg.sparsity, cfg.importance, ctx, iterations=cfg.iterations,
                 after_step=lambda: fine_tune(module, ctx, cfg.fine_tune_epochs,
                                              precision=cfg.precision.value))
    after = sum(p.numel() for p in module.parameters())
    kept = [units(m) for m in targets]
    return {f"kept_{unit}_per_layer": kept, "params_before": before, "params_after": after,
            "sparsity": round(1 - after / before, 4)}


# --------------------------------------------------------------------------------------------


@register(PruneStep, Stage.TORCH)
def prune(model: Model, cfg: PruneStep, ctx: Context) -> Model:
    """Prune a copy of ``model.module`` as ``cfg`` says; the input model is left unchanged."""
    if model.module is None:
        raise StepError(f"{field(ctx, 'prune', 'method')}: pruning needs a torch model "
                        "(put prune before any ONNX quantization step)")
    if cfg.fine_tune_epochs:
        precision_mod.check(cfg.precision.value, field(ctx, "prune", "precision"))
    module = editable_copy(model.module, ctx)
    layers = transformer_layers(module)
    if cfg.reconstruct and (layers is None or cfg.method is PruneMethod.MAGNITUDE):
        got = "magnitude pruning" if layers is not None else describe(module)
        raise StepError(f"{field(ctx, 'prune', 'reconstruct')}: reconstruction refits a "
                        f"transformer's layers after structured pruning (got {got}); "
                        "remove reconstruct or use method: structured on a transformer")
    if cfg.importance is Importance.ACTIVATION and (layers is None
                                                    or cfg.method is PruneMethod.MAGNITUDE):
        raise StepError(f"{field(ctx, 'prune', 'importance')}: activation importance ranks a "
                        "transformer's neurons or heads for structured pruning "
                        "(allowed here: l1, l2, taylor, gradient-norm)")
    if cfg.method is PruneMethod.MAGNITUDE:
        notes = _magnitude(module, cfg, ctx)
    elif layers is not None:
        if cfg.granularity is Granularity.CHANNEL:
            raise StepError(f"{field(ctx, 'prune', 'granularity')}: channel pruning needs a "
                            "CNN (got a transformer) (allowed: neuron, head)")
        notes = _transformer_structured(module, layers, cfg, ctx)
    else:
        if cfg.granularity is Granularity.HEAD:
            allowed = "neuron, channel" if describe(module) == "a CNN" else "neuron"
            raise StepError(f"{field(ctx, 'prune', 'granularity')}: head pruning needs a "
                            f"transformer (got {describe(module)}) (allowed: {allowed})")
        notes = _cnn_structured(module, cfg, ctx)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    notes = {"prune_method": cfg.method.value, **notes}
    if cfg.fine_tune_epochs:
        notes["precision"] = cfg.precision.value
    if cfg.method is PruneMethod.STRUCTURED:
        notes["granularity"] = cfg.granularity.value
    return Model(module=module, notes={**model.notes, **notes})


__all__ = ["editable_copy", "field", "fine_tune", "prune", "remove_units", "transformer_layers",
           "units"]
