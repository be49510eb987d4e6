"""Torch -> ONNX with the I/O names of DESIGN.md section 4, then ONNX Runtime graph fusions.

Exporter choice (measured here with torch 2.13 on all-MiniLM-L6-v2): the TorchScript-based
exporter (``dynamo=False``) writes one self-contained opset-17 file whose attention subgraph
ONNX Runtime's BERT optimizer recognises (6/6 Attention, 12 SkipLayerNormalization, 6 BiasGelu,
EmbedLayerNormalization fused); the dynamo exporter needs a version down-conversion that fails
for opset 17, writes external data, and its graph is not matched by the fusions. Models are
loaded with eager attention for the same reason (SDPA exports a pattern the fuser skips).

The pipeline exports BERT-like text encoders padding-free (``packed.py``, ``pack=True``) and,
by default, leaves ORT's offline BERT fusions off (``pipeline.Settings.transformer_fusions``):
int8 of the fused graph was slower than int8 of the plain one, and ORT applies its
Gelu/LayerNorm/SkipLayerNorm fusions when a session loads the graph anyway.

Every optimization is checked: the optimized graph must give the same outputs as the exported
one on a real batch, otherwise the unoptimized graph is kept and the note says why.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from leanserve.api.spec import Task
from leanserve.compression.registry import Batch, CompressionError

OPSET = 17
TEXT_INPUTS = ("input_ids", "attention_mask")
IMAGE_INPUTS = ("pixel_values",)


class ExportError(CompressionError):
    """The torch model could not be exported or its ONNX graph does not run."""


def input_names(task: Task) -> tuple[str, ...]:
    return TEXT_INPUTS if task.is_text else IMAGE_INPUTS


def output_name(task: Task) -> str:
    return "embedding" if task is Task.FEATURE_EXTRACTION else "logits"


def export_onnx(module: nn.Module, example: Batch, path: Path, task: Task, *,
                pack: bool = False) -> Path:
    """Export ``module`` (called by keyword) with dynamic batch (and sequence) axes.

    With ``pack`` a BERT-like text encoder is exported in its padding-free form
    (``packed.PackedEncoder``: token-wise layers on real tokens only) when it fits and gives
    the module's outputs on ``example``; otherwise the plain graph is exported."""
    if pack:
        from leanserve.compression.packed import packable

        packed = packable(module)
        if packed is not None and _same_outputs(module, packed, example):
            module = packed
    names = input_names(task)
    missing = [n for n in names if n not in example.inputs]
    if missing:
        raise ExportError(f"example batch lacks inputs {missing} for task {task.value}")
    args = tuple(example.inputs[n][:2] for n in names)
    axes: dict[str, dict[int, str]] = {n: {0: "batch"} for n in names}
    if task.is_text:
        for n in names:
            axes[n][1] = "sequence"
    axes[output_name(task)] = {0: "batch"}
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    # A TorchScript model loaded as it is: export the script module itself (tracing through a
    # ScriptModule held by a wrapper is refused by the exporter); it takes the same positional
    # inputs in the same order.
    inner = getattr(module, "net", None)
    if isinstance(inner, torch.jit.ScriptModule):
        module = inner
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), input_names=list(names),
                              output_names=[output_name(task)], dynamic_axes=axes,
                              opset_version=OPSET, dynamo=False, do_constant_folding=True)
    except Exception as exc:  # the exporter raises many unrelated types for unsupported ops
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return path


def _same_outputs(a: nn.Module, b: nn.Module, example: Batch, tol: float = 1e-4) -> bool:
    with torch.no_grad():
        try:
            x, y = a.eval()(**example.inputs), b.eval()(**example.inputs)
        except Exception:  # a structure packing misread: keep the plain graph
            return False
    return x.shape == y.shape and float((x - y).abs().max()) <= tol


def is_packed(path: Path) -> bool:
    """Whether an exported graph is the padding-free form (it gathers the real tokens)."""
    return any(n.op_type == "NonZero" for n in onnx.load(str(path),
                                                         load_external_data=False).graph.node)


def session(path: Path, threads: int = 2):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def feeds(batch: Batch) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in batch.inputs.items()}


def run_onnx(sess, batch: Batch) -> np.ndarray:
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds(batch).items() if k in names})[0]


@dataclass
class OptimizeResult:
    path: Path
    fused: dict[str, int]
    note: str


def optimize(path: Path, out: Path, *, bert: tuple[int, int] | None, check: Batch,
             attention: bool = True, tol: float = 1e-3, threads: int = 2) -> OptimizeResult:
    """ONNX Runtime's transformer fusions for BERT-like graphs (``bert`` = (heads, hidden));
    with ``bert`` None the graph is copied as it is (the session's own graph optimizations
    apply at load time anyway)."""
    if bert is None:
        if out != path:
            shutil.copyfile(path, out)
        return OptimizeResult(out, {}, "no offline transformer fusions (ORT's own graph "
                              "optimizations apply at session load)")
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    heads, hidden = bert
    opts = FusionOptions("bert")
    opts.enable_attention = attention
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = optimizer.optimize_model(str(path), model_type="bert", num_heads=heads,
                                         hidden_size=hidden, opt_level=0,
                                         optimization_options=opts)
    fused = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
    tmp = out.with_suffix(".opt.onnx")
    model.save_model_to_file(str(tmp))
    before = run_onnx(session(path, threads), check)
    after = run_onnx(session(tmp, threads), check)
    diff = float(np.max(np.abs(before - after)))
    if not np.isfinite(diff) or diff > tol:
        tmp.unlink()
        if out != path:
            shutil.copyfile(path, out)
        return OptimizeResult(out, {}, f"fusions dropped: max output diff {diff:.2g} > {tol}")
    tmp.replace(out)
    return OptimizeResult(out, fused, f"ORT BERT fusions, max output diff {diff:.2g}")


def onnx_param_count(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)
