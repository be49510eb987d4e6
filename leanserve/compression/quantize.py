"""Quantization: every QuantizeStep method, registered by method.

Where each method runs, and why:
- int8-dynamic, int8-static (ONNX stage): ONNX Runtime's quantization tools, the maintained path
  (torch.ao.quantization is deprecated). Dynamic quantizes weights to int8 and activations at run
  time (MatMulInteger), on the plain (unfused) graph: measured on MiniLM, quantizing ORT's
  offline BERT-fused graph ran 10-14% slower. Where training rows exist it also tries
  SmoothQuant-style activation smoothing (``smooth_activations``) and keeps whichever int8 graph
  is closer to the float one on training rows (MiniLM: 1 - cosine 0.0065 -> 0.0022 on the
  padding-free graph, held-out cosine 0.9976 vs 0.9933 without). Static calibrates activation
  ranges on ``calibrationSamples`` training rows through a CalibrationDataReader and writes a
  QDQ graph (per-channel weights when asked), which ORT's CPU provider fuses into QLinear kernels.
- fp16 (ONNX stage): ORT's float16 converter with fp32 inputs/outputs kept, so the served
  contract (FP32 in/out) holds; ORT's CPU provider runs the fp16 graph (slower than fp32 on most
  CPUs: fp16 is for the GPU pools, and half the size everywhere).
- bf16 (ONNX stage): ORT's CPU provider has few bf16 kernels, so weights are *stored* as bf16
  initializers with a Cast to fp32 in front: half the file, fp32 compute, bf16 rounding error.
- int8-weight-only (ONNX stage): weights of MatMul/Gemm/Conv/Gather stored int8 with per-channel
  fp32 scales behind DequantizeLinear; compute stays fp32 (ORT folds the dequantization at load).
  torchao's int8 weight-only tensors do not survive ONNX export, so the ONNX form is used.
- int4-weight-only (ONNX stage): served at 4 bits for real. Every MatMul with a constant
  weight (Gemm rewritten as MatMul + Add first) becomes ONNX Runtime's MatMulNBits contrib op
  (symmetric, one fp32 scale per ``blockSize`` weights of a column), vocabulary tables become
  4-bit tables (``quantize_embeddings``); Conv weights stay fp32. The file is the size. Measured
  on MiniLM (2 threads, batch 32): no faster than fp32 (MatMulNBits is built for memory-bound
  decoding; here it dequantizes blocks into an fp32 GEMM) and a cosine of ~0.97: it is smaller,
  not faster, and the gate decides.
- qat (torch stage, then ONNX): quantization-aware training, in ``qat.py``.
- power-of-two, binary (torch stage): fake-quantized weights (the rounded values stored back as
  fp32, so later training steps and the export see them) with ``packed_bytes`` counting what
  the packing alone holds: power-of-two = 4 bits (sign + 3-bit exponent) + one fp32 scale per
  row; binary = 1 bit/weight + one fp32 scale (mean |w|) per row. Parameters not quantized
  (biases, norms) count at 4 bytes. When the candidate's graph is exported, ``serve_packed``
  stores every weight still exactly on the grid packed, decoded by ONNX Runtime when it loads
  the graph: the served file (size_bytes) is about the packed size, the compute is fp32. The
  packed size stays its own field, never selected on.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from leanserve.api.spec import QuantizeMethod, QuantizeStep
from leanserve.compression.export import feeds
from leanserve.compression.registry import Context, Model, Stage, StepError, register

WEIGHT_OPS = {"MatMul": (1,), "Gemm": (1,), "Conv": (1,), "Gather": (0,), "Attention": (1,),
              "EmbedLayerNormalization": (2, 3, 4)}
"""Ops whose inputs at these indexes are weights worth quantizing (ORT's fused BERT ops too)."""


def _out_path(model: Model, ctx: Context, tag: str) -> Path:
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    return ctx.workdir / f"model.{tag}.onnx"


def _onnx_in(model: Model, cfg: QuantizeStep) -> Path:
    if model.onnx_path is None:
        raise StepError(f"quantize {cfg.method.value} runs on the ONNX graph; export first")
    return model.onnx_path


def _done(model: Model, out: Path, method: QuantizeMethod, **notes: object) -> Model:
    return Model(onnx_path=out, packed_bytes=None,
                 notes={**model.notes, "quantize": method.value, **notes})


# --------------------------------------------------------------------------------------------
# ONNX Runtime int8


SMOOTH_ALPHA = 0.7
"""Migration strength of activation smoothing (SmoothQuant's alpha): measured on MiniLM, 0.7
gave the smallest int8 error (0.5: worse than none; 0.8-1.0: worse again)."""
SMOOTH_PROBE_BATCHES = 4
"""Training batches used to measure activation ranges and to compare the two int8 graphs."""


def _activation_ranges(src: Path, names: list[str], batches: list, workdir: Path
                       ) -> dict[str, np.ndarray]:
    """Per-channel max |x| of the tensors ``names`` over ``batches`` (real tokens only)."""
    from leanserve.compression.export import session

    probe = onnx.load(str(src))
    known = {o.name for o in probe.graph.output}
    for name in names:
        if name not in known:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                                    None))
    path = workdir / "model.probe.onnx"
    onnx.save(probe, str(path))
    sess = session(path)
    outs = [o.name for o in sess.get_outputs()]
    inputs = {i.name for i in sess.get_inputs()}
    ranges: dict[str, np.ndarray] = {}
    for batch in batches:
        f = {k: v for k, v in feeds(batch).items() if k in inputs}
        mask = f.get("attention_mask")
        for name, value in zip(outs, sess.run(None, f), strict=True):
            if name not in names:
                continue
            if value.ndim == 3 and mask is not None and value.shape[:2] == mask.shape:
                flat = value[mask.astype(bool)]
            else:
                flat = value.reshape(-1, value.shape[-1])
            amax = np.abs(flat).max(0)
            ranges[name] = np.maximum(ranges[name], amax) if name in ranges else amax
    path.unlink(missing_ok=True)
    return ranges


def _load(src: Path) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto], dict[str, int]]:
    """The model, its initializers by name, and how many node inputs read each tensor."""
    model = onnx.load(str(src))
    return model, {t.name: t for t in model.graph.initializer}, _uses(model.graph)


def _uses(graph: onnx.GraphProto) -> dict[str, int]:
    """How many node inputs read each tensor (a weight read twice cannot be rewritten alone)."""
    used: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            used[name] = used.get(name, 0) + 1
    return used


def smooth_activations(src: Path, out: Path, batches: list, workdir: Path,
                       alpha: float = SMOOTH_ALPHA) -> int:
    """SmoothQuant on the ONNX graph: for every activation x feeding MatMuls with constant
    weights W, per input channel k, x_k / s_k and W_k * s_k with
    s_k = max|x_k|^alpha / max|W_k|^(1 - alpha). The product is unchanged (checked by the
    caller's comparison); the activation loses its outlier channels, so per-tensor dynamic
    int8 of it loses less. BERT's LayerNorm outputs are also the residual stream, so the
    division is an explicit Mul before the MatMuls, not folded into the LayerNorm.
    Returns how many activations were smoothed."""
    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if w is not None and len(w.dims) == 2 and w.data_type == TensorProto.FLOAT:
            groups.setdefault(node.input[0], []).append(node)
    groups = {x: ns for x, ns in groups.items() if x not in inits}
    if not groups:
        return 0
    ranges = _activation_ranges(src, list(groups), batches, workdir)
    used = _uses(graph)
    inserted: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []
    for x, nodes in groups.items():
        if x not in ranges or any(used.get(n.input[1], 0) > 1 for n in nodes):
            continue  # shared weights (tied embeddings) cannot take two scalings
        ws = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        if len({w.shape[0] for w in ws}) != 1 or ws[0].shape[0] != ranges[x].shape[0]:
            continue
        wmax = np.max([np.abs(w).max(1) for w in ws], axis=0)
        scale = (np.maximum(ranges[x], 1e-5) ** alpha
                 / np.maximum(wmax, 1e-5) ** (1 - alpha))
        scale = np.clip(scale, 1e-2, 1e2).astype(np.float32)
        inv = numpy_helper.from_array((1.0 / scale).astype(np.float32), f"{x}__smooth_inv")
        graph.initializer.append(inv)
        smoothed = f"{x}__smoothed"
        mul = helper.make_node("Mul", [x, inv.name], [smoothed], name=f"{x}__smooth")
        for node, w in zip(nodes, ws, strict=True):
            t = inits[node.input[1]]
            t.CopyFrom(numpy_helper.from_array((w * scale[:, None]).astype(np.float32), t.name))
            node.input[0] = smoothed
        inserted.append((nodes[0], mul))
    order = list(graph.node)
    for first, mul in inserted:  # just before the first consumer: still topologically sorted
        order.insert(order.index(first), mul)
    del graph.node[:]
    graph.node.extend(order)
    onnx.save(model, str(out))
    return len(inserted)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ORT's quantizer logs advice and shape-inference misses on the root logger (e.g. for
    NonZero in the padding-free graph); none of it is actionable for a user."""
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in _ORT_LOGGERS)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


_ORT_LOGGERS = ("onnxruntime.quantization.matmul_nbits_quantizer",
                "onnxruntime.quantization.quant_utils")


def _quantize_dynamic(src: Path, out: Path, per_channel: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # the 4-bit tables' scale lookups stay fp32 (quantize_embeddings)
    keep = [n.name for n in onnx.load(str(src), load_external_data=False).graph.node
            if "__q4_" in n.name]
    with _quiet():
        # DefaultTensorType: fused contrib ops (Attention, BiasGelu) have no ONNX shape inference
        quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8,
                         per_channel=per_channel, nodes_to_exclude=keep,
                         extra_options={"DefaultTensorType": TensorProto.FLOAT})


EMBEDDING_BLOCK = 64
"""Weights per fp32 scale in a 4-bit embedding table. MiniLM (30522 x 384 table, with int8
everything else), held-out cosine / file size: block 128 0.9951 / 17.5 MB, 64 0.9961 /
17.8 MB, 32 0.9963 / 18.5 MB; same speed."""
MIN_VOCAB_ROWS = 1024
"""Gather tables with at least this many rows are vocabularies (position tables stay int8)."""


NIBBLES = "leanserve_nibbles"
"""The shared 256 x 2 decoding table: byte -> (low nibble - 8, high nibble - 8)."""


def _nibbles() -> onnx.TensorProto:
    byte = np.arange(256)
    return numpy_helper.from_array(
        np.stack([byte & 15, byte >> 4], axis=1).astype(np.float32) - 8.0, NIBBLES)


def _nibble_lookup(prefix: str, table: str, scales: str, ids: str, output: str, width: int,
                   block: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Standard ONNX ops for ``output = table4[ids]`` with ``table`` the packed nibbles
    [rows, width / 2] and ``scales`` [rows, width / block]: gather the packed rows, decode
    every byte into its two centred nibbles through a 256-entry table, scale every block.
    Only the gathered rows are touched."""
    def n(name: str) -> str:
        return f"{prefix}_{name}"

    consts = {n("blocks"): np.array([-1, width // block, block], np.int64),
              n("block_scales"): np.array([-1, width // block, 1], np.int64),
              n("width"): np.array([width], np.int64)}
    nodes = [
        helper.make_node("Gather", [table, ids], [n("rows")], axis=0),  # [..., width / 2]
        helper.make_node("Cast", [n("rows")], [n("bytes")], to=TensorProto.INT32),
        helper.make_node("Gather", [NIBBLES, n("bytes")], [n("pairs")], axis=0),
        helper.make_node("Reshape", [n("pairs"), n("blocks")], [n("centred")]),
        helper.make_node("Gather", [scales, ids], [n("row_scales")], axis=0),
        helper.make_node("Reshape", [n("row_scales"), n("block_scales")], [n("s")]),
        helper.make_node("Mul", [n("centred"), n("s")], [n("values")]),
        helper.make_node("Shape", [ids], [n("ids_shape")]),
        helper.make_node("Concat", [n("ids_shape"), n("width")], [n("shape")], axis=0),
        helper.make_node("Reshape", [n("values"), n("shape")], [output]),
    ]
    for i, node in enumerate(nodes):
        node.name = f"{prefix}_{i}"  # _quantize_dynamic leaves nodes named *__q4_* alone
    return nodes, [numpy_helper.from_array(v, name) for name, v in consts.items()]


def quantize_embeddings(src: Path, out: Path, bits: int = 4, *,
                        min_rows: int | None = None) -> int:
    """Store vocabulary tables (``Gather`` on a constant [rows >= MIN_VOCAB_ROWS, width]
    table) as ``bits``-bit integers with one fp32 scale per EMBEDDING_BLOCK weights of a row.
    The table is half of MiniLM's weights and a lookup reads one row, so its precision costs
    memory, not time. Symmetric rounding; two weights per byte, low nibble first, zero point
    8. The lookup is written in standard ONNX ops (``_nibble_lookup``) rather than ONNX
    Runtime's GatherBlockQuantized contrib op, which older runtimes (the ORT inside Triton
    24.08, CUDA before ORT 1.23) lack. Returns how many tables were rewritten."""
    if bits != 4:
        raise StepError(f"quantize.embeddingBits: {bits}-bit tables are not supported (4 or 8)")
    least = MIN_VOCAB_ROWS if min_rows is None else min_rows
    model, inits, used = _load(src)
    graph = model.graph
    order: list[onnx.NodeProto] = []
    n = 0
    for node in graph.node:
        t = inits.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"),
                    0)
        # blocks are powers of two >= 16 that divide the row
        block = None if t is None or len(t.dims) != 2 else next(
            (b for b in (EMBEDDING_BLOCK, 32, 16) if t.dims[1] % b == 0), None)
        if (t is None or block is None or axis != 0 or t.dims[0] < least
                or t.data_type != TensorProto.FLOAT or used[t.name] > 1):
            order.append(node)
            continue
        w = numpy_helper.to_array(t)
        rows, width = w.shape
        blocks = w.reshape(rows, width // block, block)
        scale = np.maximum(np.abs(blocks).max(-1), 1e-12) / 7
        q = (np.clip(np.round(blocks / scale[..., None]), -8, 7) + 8).astype(np.uint8)
        q = q.reshape(rows, width)
        t.CopyFrom(numpy_helper.from_array((q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8),
                                           t.name))
        scales = numpy_helper.from_array(scale.astype(np.float32), f"{t.name}__scales")
        nodes, consts = _nibble_lookup(f"{t.name}__q4", t.name, scales.name, node.input[1],
                                       node.output[0], width, block)
        graph.initializer.extend([scales, *consts])
        order.extend(nodes)
        n += 1
    if n:
        graph.initializer.append(_nibbles())
    del graph.node[:]
    graph.node.extend(order)
    onnx.save(model, str(out))
    return n


def gemm_as_matmul(src: Path, out: Path) -> int:
    """Rewrite ``Gemm(x, W, b)`` with constant W (alpha = beta = 1, no transA) as
    ``Add(MatMul(x, W'), b)``: the same function, in the form the smoothing and ORT's dynamic
    int8 fusions (DynamicQuantizeMatMul with the bias folded in) know. The exporter writes a
    Linear on a 2-D input (the padding-free graph's [tokens, hidden]) as Gemm. Returns how
    many nodes were rewritten (0: ``out`` is a copy of ``src``)."""
    model, inits, used = _load(src)
    graph = model.graph
    order: list[onnx.NodeProto] = []
    n = 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w = inits.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        if (w is None or len(w.dims) != 2 or attrs.get("transA", 0) or used[w.name] > 1
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            order.append(node)
            continue
        if attrs.get("transB", 0):
            w.CopyFrom(numpy_helper.from_array(
                np.ascontiguousarray(numpy_helper.to_array(w).T), w.name))
        has_bias = len(node.input) > 2 and node.input[2] != ""
        mm_out = f"{node.output[0]}__mm" if has_bias else node.output[0]
        order.append(helper.make_node("MatMul", [node.input[0], w.name], [mm_out],
                                      name=f"{node.name or node.output[0]}__matmul"))
        if has_bias:
            order.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]],
                                          name=f"{node.name or node.output[0]}__bias"))
        n += 1
    del graph.node[:]
    graph.node.extend(order)
    onnx.save(model, str(out))
    return n


def _error(reference: list[np.ndarray], path: Path, batches: list) -> float:
    """Mean (1 - cosine) of the rows of ``path``'s outputs against ``reference``."""
    from leanserve.compression.export import run_onnx, session

    sess = session(path)
    errs = []
    for ref, batch in zip(reference, batches, strict=True):
        out = run_onnx(sess, batch)
        num = (out * ref).sum(-1)
        den = np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1)
        errs.append(1.0 - num / np.maximum(den, 1e-12))
    return float(np.mean(np.concatenate([e.reshape(-1) for e in errs])))


@register(QuantizeStep, Stage.ONNX, method=QuantizeMethod.INT8_DYNAMIC.value)
def int8_dynamic(model: Model, cfg: QuantizeStep, ctx: Context) -> Model:
    """int8 weights (per channel when asked), activations quantized at run time.

    With training rows, a second graph is built with activation smoothing first
    (``smooth_activations``) and the one whose outputs stay closer to the float graph's on
    those training rows is kept (never the held-out rows: the gate's figure stays honest)."""
    from leanserve.compression.export import run_onnx, session

    original = src = _onnx_in(model, cfg)
    out = _out_path(model, ctx, "int8-dynamic")
    matmuls = ctx.workdir / "model.matmul.onnx"
    if gemm_as_matmul(src, matmuls):
        src = matmuls
    tables = 0
    if cfg.embedding_bits != 8:
        tables_path = ctx.workdir / "model.tables.onnx"
        tables = quantize_embeddings(src, tables_path, cfg.embedding_bits)
        src = tables_path
    base: dict[str, object] = {"per_channel": cfg.per_channel}
    if cfg.embedding_bits != 8:
        # 0 when the tables sit inside a fused op (EmbedLayerNormalization): they stay int8
        base["embedding_tables_4bit"] = tables
    _quantize_dynamic(src, out, cfg.per_channel)
    probe = list(ctx.train[:SMOOTH_PROBE_BATCHES])
    if not probe:
        return _done(model, out, cfg.method, smoothing="no rows", **base)
    float_sess = session(original)
    reference = [run_onnx(float_sess, b) for b in probe]
    plain_err = _error(reference, out, probe)
    smoothed_src = ctx.workdir / "model.smoothed.onnx"
    n = smooth_activations(src, smoothed_src, probe, ctx.workdir)
    if n == 0:
        return _done(model, out, cfg.method, smoothing="none", **base)
    smoothed = ctx.workdir / "model.int8-dynamic-smoothed.onnx"
    _quantize_dynamic(smoothed_src, smoothed, cfg.per_channel)
    smooth_err = _error(reference, smoothed, probe)
    notes = {**base,
             "train_error_plain": float(f"{plain_err:.4g}"),
             "train_error_smoothed": float(f"{smooth_err:.4g}")}
    if smooth_err < plain_err:
        smoothed.replace(out)
        return _done(model, out, cfg.method, smoothing=f"{n} activations, alpha "
                     f"{SMOOTH_ALPHA}", **notes)
    return _done(model, out, cfg.method, smoothing="kept off (no gain on training rows)",
                 **notes)


def _with_shapes(src: Path, ctx: Context) -> Path:
    """The graph with value types inferred by ORT's symbolic shape inference, which knows the
    fused contrib ops (Attention, SkipLayerNormalization); without it the static quantizer
    skips every MatMul behind one of them."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        inferred = SymbolicShapeInference.infer_shapes(onnx.load(str(src)), auto_merge=True)
    except Exception:
        return src
    path = ctx.workdir / "model.shapes.onnx"
    onnx.save(inferred, str(path))
    return path


class _Calibration:
    """Feeds ``samples`` training rows, one batch at a time, to ORT's calibrator."""

    def __init__(self, ctx: Context, samples: int, names: set[str]) -> None:
        self._it = self._rows(ctx, samples, names)

    @staticmethod
    def _rows(ctx: Context, samples: int, names: set[str]) -> Iterator[dict[str, np.ndarray]]:
        left = samples
        for batch in ctx.train:
            if left <= 0:
                return
            f = {k: v[:left] for k, v in feeds(batch).items() if k in names}
            left -= next(iter(f.values())).shape[0]
            yield f

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # part of ORT's reader protocol; one pass is enough here
        pass


@register(QuantizeStep, Stage.ONNX, method=QuantizeMethod.INT8_STATIC.value)
def int8_static(model: Model, cfg: QuantizeStep, ctx: Context) -> Model:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if not ctx.train:
        raise StepError("quantize.calibrationSamples: int8-static needs calibration rows, "
                        "and the data has none left after the eval split")
    src, out = _onnx_in(model, cfg), _out_path(model, ctx, "int8-static")
    src = _with_shapes(src, ctx)
    names = {i.name for i in onnx.load(str(src), load_external_data=False).graph.input}
    reader = _Calibration(ctx, cfg.calibration_samples, names)
    CalibrationDataReader.register(_Calibration)
    with _quiet():
        quantize_static(str(src), str(out), reader, quant_format=QuantFormat.QDQ,
                        per_channel=cfg.per_channel, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8,
                        op_types_to_quantize=["MatMul", "Gemm", "Conv", "Gather", "Attention",
                                              "EmbedLayerNormalization"],
                        extra_options={"DefaultTensorType": TensorProto.FLOAT,
                                       "ActivationSymmetric": False,
                                       "WeightSymmetric": True})
    rows = min(cfg.calibration_samples, sum(len(next(iter(b.inputs.values())))
                                            for b in ctx.train))
    return _done(model, out, cfg.method, per_channel=cfg.per_channel, calibration_rows=rows)


# --------------------------------------------------------------------------------------------
# ONNX float and weight-only storage


@register(QuantizeStep, Stage.ONNX, method=QuantizeMethod.FP16.value)
def fp16(model: Model, cfg: QuantizeStep, ctx: Context) -> Model:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src, out = _onnx_in(model, cfg), _out_path(model, ctx, "fp16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(converted, str(out))
    return _done(model, out, cfg.method, compute="fp16 (fp32 inputs/outputs)")


def _weights(graph: onnx.GraphProto) -> dict[str, tuple[str, int]]:
    """Initializer name -> (op type, index of the node's input) for weight inputs."""
    inits = {t.name for t in graph.initializer}
    found: dict[str, tuple[str, int]] = {}
    for node in graph.node:
        for idx in WEIGHT_OPS.get(node.op_type, ()):
            if len(node.input) <= idx or node.input[idx] not in inits:
                continue
            op = node.op_type
            if op == "Gemm":
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                op = "Gemm_T" if trans_b else "Gemm"
            found.setdefault(node.input[idx], (op, idx))
    return found


def _channel_axis(op: str, ndim: int) -> int:
    """The output-channel axis of a weight (one scale per output channel / row)."""
    return {"MatMul": ndim - 1, "Attention": ndim - 1, "Gemm": 1, "Gemm_T": 0, "Conv": 0,
            "Gather": 0, "EmbedLayerNormalization": 0}[op]


def _rewrite_weights(src: Path, out: Path, replace) -> int:
    """Replace each float weight initializer W (ndim >= 2) by ``replace(name, W, axis)`` ->
    (new initializers, nodes producing W); returns how many were replaced."""
    model = onnx.load(str(src))
    graph = model.graph
    targets = _weights(graph)
    keep, new_nodes, count = [], [], 0
    for init in graph.initializer:
        spec = targets.get(init.name)
        if spec is None or init.data_type != TensorProto.FLOAT or len(init.dims) < 2:
            keep.append(init)
            continue
        w = numpy_helper.to_array(init)
        inits, nodes = replace(init.name, w, _channel_axis(spec[0], w.ndim))
        keep.extend(inits)
        new_nodes.extend(nodes)
        count += 1
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = list(new_nodes) + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return count


@register(QuantizeStep, Stage.ONNX, method=QuantizeMethod.BF16.value)
def bf16(model: Model, cfg: QuantizeStep, ctx: Context) -> Model:
    src, out = _onnx_in(model, cfg), _out_path(model, ctx, "bf16")

    def replace(name: str, w: np.ndarray, axis: int):
        u = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32).astype(np.uint64)
        bits = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # round to nearest even
        t = helper.make_tensor(name + "__bf16", TensorProto.BFLOAT16, w.shape,
                               bits.astype(np.uint16).tobytes(), raw=True)
        return [t], [helper.make_node("Cast", [t.name], [name], to=TensorProto.FLOAT)]

    n = _rewrite_weights(src, out, replace)
    return _done(model, out, cfg.method, weights_bf16=n, compute="fp32")


@register(QuantizeStep, Stage.ONNX, method=QuantizeMethod.INT8_WEIGHT_ONLY.value)
def int8_weight_only(model: Model, cfg: QuantizeStep, ctx: Context) -> Model:
    src, out = _onnx_in(model, cfg), _out_path(model, ctx, "int8-weight-only")

    def replace(name: str, w: np.ndarray, axis: int):
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        scale = np.maximum(np.abs(w).max(axis=reduce), 1e-12).astype(np.float32) / 127.0
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        qt = numpy_helper.from_array(q, name + "__q")
        st = numpy_helper.from_array(scale, name + "__scale")
        zt = numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), name + "__zp")
        node = helper.make_node("DequantizeLinear", [qt.name, st.name, zt.name], [name],
                                axis=axis)
        return [qt, st, zt], [node]

    n = _rewrite_weights(src, out, replace)
    return _done(model, out, cfg.method, weights_int8=n, compute="fp32")


@register(QuantizeStep, Stage.ONNX, method=QuantizeMethod.INT4_WEIGHT_ONLY.value)
def int4_weight_only(model: Model, cfg: QuantizeStep, ctx: Context) -> Model:
    """MatMul weights at 4 bits through ONNX Runtime's MatMulNBits, vocabulary tables at 4
    bits (``quantize_embeddings``): the served file holds 4-bit weights."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    src, out = _onnx_in(model, cfg), _out_path(model, ctx, "int4")
    matmuls = ctx.workdir / "model.matmul.onnx"
    if gemm_as_matmul(src, matmuls):
        src = matmuls
    tables_path = ctx.workdir / "model.tables.onnx"
    tables = quantize_embeddings(src, tables_path, 4)
    with _quiet():
        q = MatMulNBitsQuantizer(onnx.load(str(tables_path)), bits=4, block_size=cfg.block_size,
                                 is_symmetric=True, op_types_to_quantize=("MatMul",))
        q.process()
        q.model.save_model_to_file(str(out), False)
    ops = [n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node]
    if "MatMulNBits" not in ops and not tables:
        raise StepError(f"{ctx.extra.get('step_path', 'quantize')}.quantize.method: "
                        "int4-weight-only found no MatMul/Gemm weight or vocabulary table to "
                        "store at 4 bits")
    return _done(model, out, cfg.method, int4_matmuls=ops.count("MatMulNBits"),
                 embedding_tables_4bit=tables, block_size=cfg.block_size,
                 compute="fp32 (MatMulNBits dequantizes 4-bit blocks); Conv weights fp32")


# --------------------------------------------------------------------------------------------
# torch-stage fake quantization with honest packed sizes

QUANTIZED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def _is_weight_layer(layer: nn.Module) -> bool:
    """Linear/Conv/Embedding, also inside a TorchScript module (whose children are
    RecursiveScriptModules that keep only the original class name)."""
    if isinstance(layer, QUANTIZED_LAYERS):
        return True
    name = getattr(layer, "original_name", None)
    return name in QUANTIZED_NAMES and isinstance(getattr(layer, "weight", None), torch.Tensor)


QUANTIZED_NAMES = {cls.__name__ for cls in QUANTIZED_LAYERS}


def _rows(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


def fake_int4(w: torch.Tensor) -> torch.Tensor:
    r = _rows(w)
    scale = r.abs().amax(1, keepdim=True).clamp(min=1e-12) / 7.0
    return (torch.clamp(torch.round(r / scale), -8, 7) * scale).reshape(w.shape)


POW2_LEVELS = 7
"""Exponents 0..-6 below the row maximum, plus zero: 8 codes in 3 bits, and a sign bit."""


def fake_power_of_two(w: torch.Tensor) -> torch.Tensor:
    r = _rows(w)
    scale = r.abs().amax(1, keepdim=True).clamp(min=1e-12)
    mag = (r.abs() / scale).clamp(min=1e-30)
    exp = torch.clamp(torch.round(torch.log2(mag)), -(POW2_LEVELS - 1), 0)
    q = torch.pow(2.0, exp)
    # magnitudes below half the smallest level round to zero (the 8th code)
    q = torch.where(mag < 2.0 ** -(POW2_LEVELS - 1) / 2, torch.zeros_like(q), q)
    return (torch.sign(r) * q * scale).reshape(w.shape)


def fake_binary(w: torch.Tensor) -> torch.Tensor:
    r = _rows(w)
    scale = r.abs().mean(1, keepdim=True)
    return (torch.where(r >= 0, 1.0, -1.0) * scale).reshape(w.shape)


FAKE = {
    QuantizeMethod.POWER_OF_TWO: (fake_power_of_two, 4),
    QuantizeMethod.BINARY: (fake_binary, 1),
}


def fake_quantize(module: nn.Module, method: QuantizeMethod) -> tuple[nn.Module, int, int]:
    """A copy with fake-quantized weights; returns (module, packed bytes, weights quantized)."""
    fn, bits = FAKE[method]
    out = copy.deepcopy(module)
    quantized: set[int] = set()
    packed = 0
    with torch.no_grad():
        for layer in out.modules():
            if _is_weight_layer(layer) and id(layer.weight) not in quantized:
                w = layer.weight
                w.copy_(fn(w.data))
                quantized.add(id(w))
                packed += (w.numel() * bits + 7) // 8 + 4 * w.shape[0]
        seen: set[int] = set()
        for p in out.parameters():
            if id(p) not in quantized and id(p) not in seen:
                packed += 4 * p.numel()
            seen.add(id(p))
        for b in out.buffers():
            if b.is_floating_point():
                packed += 4 * b.numel()
    return out, packed, len(quantized)


def _fake(model: Model, cfg: QuantizeStep, ctx: Context) -> Model:
    if model.module is None:
        raise StepError(f"quantize {cfg.method.value} changes torch weights; the model is "
                        "already ONNX (put it before ONNX steps, or use a format other than onnx)")
    module, packed, n = fake_quantize(model.module, cfg.method)
    bits = FAKE[cfg.method][1]
    return Model(module=module, packed_bytes=packed,
                 notes={**model.notes, "quantize": cfg.method.value, "bits_per_weight": bits,
                        "weights_quantized": n, "size": "packed (fake-quantized fp32 graph)"})


for _method in FAKE:
    register(QuantizeStep, Stage.TORCH, method=_method.value)(_fake)


# --------------------------------------------------------------------------------------------
# power-of-two and binary weights served packed, decoded when ONNX Runtime loads the graph

PACKED_MIN_WEIGHTS = 256
"""Initializers with fewer values stay fp32 (biases, norms: not quantized, and not worth it)."""
POW2_TABLE = "leanserve_pow2_pairs"
SIGN_TABLE = "leanserve_sign_octets"


def _pow2_levels() -> np.ndarray:
    """The 16 values of a power-of-two code: bit 3 the sign, bits 0-2 zero (0) or 2^-(k-1)."""
    mags = np.array([0.0] + [2.0 ** -k for k in range(POW2_LEVELS)], np.float32)
    return np.concatenate([mags, -mags]).astype(np.float32)


def _pow2_codes(q: np.ndarray) -> np.ndarray | None:
    """Codes of values already on the grid (q = value / row scale), None when one is not."""
    levels = _pow2_levels()
    codes = np.full(q.shape, -1, np.int16)
    for code, level in enumerate(levels):
        if code == 8:  # -0 is 0
            continue
        codes[q == level] = code
    return None if (codes < 0).any() else codes.astype(np.uint8)


def _pack_rows(w: np.ndarray, method: QuantizeMethod) -> tuple[np.ndarray, np.ndarray] | None:
    """(packed bytes [rows, cols * bits / 8], scales [rows, 1]) of a [rows, cols] matrix whose
    every row is exactly on the method's grid (decoding gives back the same fp32 values); None
    otherwise."""
    cols = w.shape[1]
    if method is QuantizeMethod.POWER_OF_TWO:
        if cols % 2:
            return None
        scale = np.abs(w).max(1, keepdims=True).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(scale > 0, w / np.where(scale > 0, scale, 1), 0).astype(np.float32)
        codes = _pow2_codes(q)
        if codes is None:
            return None
        decoded = _pow2_levels()[codes] * scale
        packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    else:
        if cols % 8:
            return None
        scale = np.abs(w[:, :1]).astype(np.float32)
        bits = (w >= 0).astype(np.uint8)
        decoded = np.where(bits == 1, 1.0, -1.0).astype(np.float32) * scale
        packed = np.packbits(bits, axis=1, bitorder="little")
    if not np.array_equal(decoded.astype(np.float32), w):
        return None
    return packed, scale


def _decode_table(method: QuantizeMethod) -> onnx.TensorProto:
    """byte -> the 2 (power-of-two) or 8 (binary) values it holds, low bits first."""
    byte = np.arange(256)
    if method is QuantizeMethod.POWER_OF_TWO:
        lv = _pow2_levels()
        return numpy_helper.from_array(np.stack([lv[byte & 15], lv[byte >> 4]], 1), POW2_TABLE)
    signs = np.unpackbits(byte.astype(np.uint8)[:, None], axis=1, bitorder="little")
    return numpy_helper.from_array(np.where(signs == 1, 1.0, -1.0).astype(np.float32),
                                   SIGN_TABLE)


def serve_packed(src: Path, dst: Path, method: QuantizeMethod) -> dict[str, object]:
    """Write ``src`` with every fp32 weight that is exactly on ``method``'s grid (power-of-two:
    4 bits a weight; binary: 1 bit) stored packed, one fp32 scale per output channel, behind a
    decoding subgraph of standard ONNX ops (Gather through a 256-entry table, Reshape, Mul,
    Transpose). Every input of that subgraph is a constant, so ONNX Runtime folds it into the
    fp32 weights when it loads the graph: the file is the packed size, the compute and the
    results are the fp32 graph's. A weight's output channel is its first axis (Conv, Gemm with
    transB, Gather tables) or its last (MatMul); whichever makes every row exact is used, and a
    weight for which neither does is left as it is. Returns notes for the report."""
    model = onnx.load(str(src))
    graph = model.graph
    table = _decode_table(method)
    width = 2 if method is QuantizeMethod.POWER_OF_TWO else 8
    nodes: list[onnx.NodeProto] = []
    keep: list[onnx.TensorProto] = []
    extra: list[onnx.TensorProto] = []
    packed_n = 0
    for init in graph.initializer:
        w = numpy_helper.to_array(init) if init.data_type == TensorProto.FLOAT else None
        done = None
        if w is not None and w.ndim >= 2 and w.size >= PACKED_MIN_WEIGHTS:
            for axis in (0, w.ndim - 1):
                moved = np.moveaxis(w, axis, 0)
                got = _pack_rows(np.ascontiguousarray(moved.reshape(moved.shape[0], -1)), method)
                if got is not None:
                    done = (axis, moved.shape, got)
                    break
        if done is None:
            keep.append(init)
            continue
        axis, moved_shape, (packed, scale) = done
        name, n = init.name, f"leanserve_packed_{packed_n}"
        rows, cols = moved_shape[0], int(np.prod(moved_shape[1:]))
        extra += [numpy_helper.from_array(packed, f"{n}_bytes"),
                  numpy_helper.from_array(scale, f"{n}_scale"),
                  numpy_helper.from_array(np.array([rows, cols], np.int64), f"{n}_rows_shape"),
                  numpy_helper.from_array(np.array(moved_shape, np.int64), f"{n}_shape")]
        last = name if axis == 0 else f"{n}_moved"
        nodes += [
            helper.make_node("Cast", [f"{n}_bytes"], [f"{n}_index"], to=TensorProto.INT32),
            helper.make_node("Gather", [table.name, f"{n}_index"], [f"{n}_values"], axis=0),
            helper.make_node("Reshape", [f"{n}_values", f"{n}_rows_shape"], [f"{n}_rows"]),
            helper.make_node("Mul", [f"{n}_rows", f"{n}_scale"], [f"{n}_scaled"]),
            helper.make_node("Reshape", [f"{n}_scaled", f"{n}_shape"], [last]),
        ]
        if axis != 0:  # back from output channel first to the initializer's own layout
            perm = [*range(1, w.ndim), 0]
            nodes.append(helper.make_node("Transpose", [last], [name], perm=perm))
        assert packed.shape == (rows, cols // width)
        packed_n += 1
    if packed_n == 0:
        raise StepError(f"quantize {method.value}: no weight of the exported graph is on the "
                        f"{method.value} grid, so nothing could be stored packed")
    del graph.initializer[:]
    graph.initializer.extend([*keep, table, *extra])
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *old])
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return {"served_packed": packed_n,
            "size": f"served packed ({8 // width} bit(s) a weight + one fp32 scale per output "
                    "channel), decoded when ONNX Runtime loads the graph (fp32 compute)"}
