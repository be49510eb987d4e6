"""Every quantize method on a tiny BERT (and CNN): the result runs in ORT with the contract's
I/O, stays close to the fp32 model, and its size is what the method promises."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from test_compression_fixtures import TinyCNN, sentences, tiny_hf_dir

from leanserve.api.spec import ModelFormat, QuantizeMethod, QuantizeStep, Task
from leanserve.compression import quantize as quantize_mod
from leanserve.compression import techniques
from leanserve.compression.evaluate import mean_cosine
from leanserve.compression.export import (
    export_onnx,
    is_packed,
    optimize,
    run_onnx,
    session,
)
from leanserve.compression.loading import Rows, batches, load_model
from leanserve.compression.modules import ImageClassifier
from leanserve.compression.packed import packable
from leanserve.compression.quantize import (
    fake_binary,
    fake_int4,
    fake_power_of_two,
    fake_quantize,
    gemm_as_matmul,
    quantize_embeddings,
    serve_packed,
    smooth_activations,
)
from leanserve.compression.registry import Batch, Context, Model, Stage, StepError, lookup

techniques.load_all()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("q")
    m = load_model(tiny_hf_dir(root).name, ModelFormat.HUGGINGFACE, Task.FEATURE_EXTRACTION,
                   root)
    data = batches(Rows(texts=sentences(24)), tokenizer=m.tokenizer, max_length=32,
                   batch_size=8)
    base = export_onnx(m.module, data[0], root / "base" / "raw.onnx", Task.FEATURE_EXTRACTION)
    opt = optimize(base, root / "base" / "model.onnx", bert=m.bert, check=data[0])
    ref = run_onnx(session(opt.path), data[1])
    return m, data, opt.path, ref, root


def _ctx(m, data, tmp: Path) -> Context:
    return Context(task=Task.FEATURE_EXTRACTION, train=data, teacher=m.module, workdir=tmp)


ONNX_METHODS = {
    # method: (min cosine to fp32, max ratio of initializer bytes to fp32's)
    QuantizeMethod.INT8_DYNAMIC: (0.95, 0.4),
    QuantizeMethod.INT8_STATIC: (0.90, 0.4),
    QuantizeMethod.FP16: (0.999, 0.55),
    QuantizeMethod.BF16: (0.99, 0.55),
    QuantizeMethod.INT8_WEIGHT_ONLY: (0.99, 0.4),
}


@pytest.mark.parametrize("method", list(ONNX_METHODS))
def test_onnx_stage_methods(method: QuantizeMethod, tiny, tmp_path: Path) -> None:
    m, data, base, ref, _ = tiny
    cfg = QuantizeStep(method=method, per_channel=True, calibration_samples=10)
    tech = lookup(cfg)
    assert tech.stage is Stage.ONNX
    out = tech.transform(Model(onnx_path=base), cfg, _ctx(m, data, tmp_path))
    assert out.onnx_path is not None and out.onnx_path.exists()
    assert out.notes["quantize"] == method.value
    sess = session(out.onnx_path)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in sess.get_outputs()] == ["embedding"]
    got = run_onnx(sess, data[1])
    assert got.dtype == np.float32 and got.shape == ref.shape
    min_cos, max_ratio = ONNX_METHODS[method]
    assert mean_cosine(got, ref) >= min_cos
    assert weight_bytes(out.onnx_path) <= max_ratio * weight_bytes(base)
    assert out.onnx_path.stat().st_size < base.stat().st_size


def weight_bytes(path: Path) -> int:
    """Bytes of the initializers (the tiny graph's structure would dominate the file size)."""
    return sum(len(numpy_helper.to_array(t).tobytes())
               for t in onnx.load(str(path)).graph.initializer)


def test_static_int8_calibrates_on_at_most_the_samples_asked(tiny, tmp_path: Path) -> None:
    m, data, base, _, _ = tiny
    cfg = QuantizeStep(method=QuantizeMethod.INT8_STATIC, calibration_samples=5)
    out = lookup(cfg).transform(Model(onnx_path=base), cfg, _ctx(m, data, tmp_path))
    assert out.notes["calibration_rows"] == 5
    ops = {n.op_type for n in onnx.load(str(out.onnx_path)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


def test_smoothing_keeps_the_float_function(tiny, tmp_path: Path) -> None:
    _, data, base, ref, _ = tiny
    out = tmp_path / "smoothed.onnx"
    n = smooth_activations(base, out, data[:2], tmp_path)
    assert n > 0
    muls = [nd for nd in onnx.load(str(out)).graph.node if nd.name.endswith("__smooth")]
    assert len(muls) == n
    got = run_onnx(session(out), data[1])
    assert np.max(np.abs(got - ref)) < 1e-4


def test_int8_dynamic_keeps_the_graph_closer_on_training_rows(tiny, tmp_path: Path) -> None:
    m, data, base, _, _ = tiny
    cfg = QuantizeStep(method=QuantizeMethod.INT8_DYNAMIC, per_channel=True)
    out = lookup(cfg).transform(Model(onnx_path=base), cfg, _ctx(m, data, tmp_path))
    plain, smoothed = out.notes["train_error_plain"], out.notes["train_error_smoothed"]
    has_muls = any(nd.name.endswith("__smooth")
                   for nd in onnx.load(str(out.onnx_path)).graph.node)
    assert out.notes["smoothing"].startswith("kept off") != has_muls
    assert (smoothed <= plain) if has_muls else (smoothed >= plain)


def test_int8_weight_only_stores_int8_weights(tiny, tmp_path: Path) -> None:
    m, data, base, _, _ = tiny
    cfg = QuantizeStep(method=QuantizeMethod.INT8_WEIGHT_ONLY)
    out = lookup(cfg).transform(Model(onnx_path=base), cfg, _ctx(m, data, tmp_path))
    g = onnx.load(str(out.onnx_path)).graph
    int8 = [t for t in g.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    assert len(int8) == out.notes["weights_int8"] > 0


FAKE_BITS = {QuantizeMethod.POWER_OF_TWO: 4, QuantizeMethod.BINARY: 1}


@pytest.mark.parametrize("method", list(FAKE_BITS))
def test_fake_quant_methods_account_packed_bytes(method: QuantizeMethod, tiny,
                                                 tmp_path: Path) -> None:
    m, data, _, _, _ = tiny
    cfg = QuantizeStep(method=method)
    tech = lookup(cfg)
    assert tech.stage is Stage.TORCH
    out = tech.transform(Model(module=m.module), cfg, _ctx(m, data, tmp_path))
    bits = FAKE_BITS[method]
    expected = 0
    qids = set()
    for layer in out.module.modules():
        if isinstance(layer, torch.nn.Linear | torch.nn.Embedding) and \
                id(layer.weight) not in qids:
            qids.add(id(layer.weight))
            w = layer.weight
            expected += (w.numel() * bits + 7) // 8 + 4 * w.shape[0]
    expected += 4 * sum(p.numel() for p in out.module.parameters() if id(p) not in qids)
    expected += 4 * sum(b.numel() for b in out.module.buffers() if b.is_floating_point())
    assert out.packed_bytes == expected
    fp32 = 4 * sum(p.numel() for p in m.module.parameters())
    assert out.packed_bytes < fp32 * (bits + 2) / 32
    # the teacher is untouched
    assert not torch.equal(next(out.module.parameters()), next(m.module.parameters()))


def test_fake_quant_values_are_on_the_grid() -> None:
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    pow2 = fake_power_of_two(w)
    scale = w.abs().amax(1, keepdim=True)
    ratio = (pow2.abs() / scale)
    nz = ratio[ratio > 0]
    assert torch.allclose(torch.log2(nz), torch.round(torch.log2(nz)), atol=1e-5)
    assert nz.min() >= 2.0 ** -6 - 1e-7 and torch.equal(torch.sign(pow2[pow2 != 0]),
                                                      torch.sign(w[pow2 != 0]))
    b = fake_binary(w)
    assert all(len(torch.unique(row.abs())) == 1 for row in b)
    assert torch.allclose(b.abs()[:, 0], w.abs().mean(1))
    i4 = fake_int4(w)
    assert all(len(torch.unique(row)) <= 16 for row in i4)
    assert (i4 - w).abs().max() <= (scale / 7 / 2).max() + 1e-6


def test_fake_quant_on_cnn_counts_conv_weights() -> None:
    net = ImageClassifier(TinyCNN()).eval()
    q, packed, n = fake_quantize(net, QuantizeMethod.BINARY)
    assert n == 4  # two convs, two linears
    fp32 = 4 * sum(p.numel() for p in net.parameters())
    assert packed < fp32 / 8
    x = torch.rand(2, 1, 8, 8)
    assert q(pixel_values=x).shape == (2, 10)


def test_image_model_exports_pixel_values_to_logits(tmp_path: Path) -> None:
    net = ImageClassifier(TinyCNN()).eval()
    batch = Batch(inputs={"pixel_values": torch.rand(4, 1, 8, 8)})
    path = export_onnx(net, batch, tmp_path / "m.onnx", Task.IMAGE_CLASSIFICATION)
    sess = session(path)
    assert [i.name for i in sess.get_inputs()] == ["pixel_values"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    big = Batch(inputs={"pixel_values": torch.rand(7, 1, 8, 8)})  # dynamic batch axis
    with torch.no_grad():
        ref = net(**big.inputs).numpy()
    assert np.allclose(run_onnx(sess, big), ref, atol=1e-4)


def test_text_export_has_dynamic_batch_and_sequence(tiny) -> None:
    m, _, base, _, _ = tiny
    g = onnx.load(str(base)).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in g.input}
    assert set(dims) == {"input_ids", "attention_mask"}
    assert all(isinstance(d[0], str) and isinstance(d[1], str) for d in dims.values())
    assert [o.name for o in g.output] == ["embedding"]
    assert {i.type.tensor_type.elem_type for i in g.input} == {onnx.TensorProto.INT64}
    # the optimized graph equals the torch module, pooling and normalization included
    ids = torch.tensor([[2, 9, 10, 11, 3, 0, 0], [2, 12, 13, 3, 0, 0, 0]])
    b = Batch(inputs={"input_ids": ids, "attention_mask": (ids > 0).long()})
    with torch.no_grad():
        ref = m.module(**b.inputs).numpy()
    assert np.allclose(run_onnx(session(base), b), ref, atol=1e-4)


def test_bert_fusions_were_applied(tiny) -> None:
    _, _, base, _, _ = tiny
    ops = {n.op_type for n in onnx.load(str(base)).graph.node}
    assert "SkipLayerNormalization" in ops


@pytest.mark.parametrize("ids", [
    [[2, 9, 10, 11, 3, 0, 0], [2, 12, 13, 3, 0, 0, 0], [2, 14, 15, 16, 17, 18, 3]],
    [[2, 9, 10, 3]],  # one row, no padding
])
def test_padding_free_export_equals_the_module(ids, tiny, tmp_path: Path) -> None:
    m, data, _, _, _ = tiny
    path = export_onnx(m.module, data[0], tmp_path / "packed.onnx", Task.FEATURE_EXTRACTION,
                       pack=True)
    assert is_packed(path)
    sess = session(path)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in sess.get_outputs()] == ["embedding"]
    t = torch.tensor(ids)
    b = Batch(inputs={"input_ids": t, "attention_mask": (t > 0).long()})
    with torch.no_grad():
        ref = m.module(**b.inputs).numpy()
        assert np.allclose(packable(m.module)(**b.inputs).numpy(), ref, atol=1e-5)
    assert np.allclose(run_onnx(sess, b), ref, atol=1e-4)


def test_padding_free_needs_a_bert_text_encoder(tiny, tmp_path: Path) -> None:
    m = tiny[0]
    factorized = copy.deepcopy(m.module)
    att = factorized.backbone.encoder.layer[0].attention.self
    att.query = torch.nn.Sequential(torch.nn.Linear(att.query.in_features, 4),
                                    torch.nn.Linear(4, att.query.out_features))
    assert packable(factorized) is None  # lowRank's factorized layers: plain export
    cnn = ImageClassifier(TinyCNN().eval())
    assert packable(cnn) is None
    x = Batch(inputs={"pixel_values": torch.randn(2, 1, 8, 8)})
    path = export_onnx(cnn, x, tmp_path / "cnn.onnx", Task.IMAGE_CLASSIFICATION, pack=True)
    assert not is_packed(path)


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _packed_after_ort(tiny, tmp_path: Path) -> onnx.GraphProto:
    """The tiny BERT's padding-free graph as ONNX Runtime's session optimizations leave it."""
    import onnxruntime as ort

    m, data, _, _, _ = tiny
    path = export_onnx(m.module, data[0], tmp_path / "packed.onnx", Task.FEATURE_EXTRACTION,
                       pack=True)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "optimized.onnx")).graph


def test_padding_free_graph_escapes_the_skip_layer_norm_fusion(tiny, tmp_path: Path) -> None:
    """The packed graph keeps hidden states 2-D, which ORT's SkipLayerNormFusion does not match
    (its CPU kernel measured ~6x slower than Add + LayerNormalization): after ORT's own session
    optimizations the graph still has plain LayerNormalization, no SkipLayerNormalization."""
    ops = [n.op_type for n in _packed_after_ort(tiny, tmp_path).node]
    assert "SkipLayerNormalization" not in ops
    assert ops.count("LayerNormalization") >= 2 * 2  # two per layer of the tiny BERT


def test_padding_free_attention_reads_q_k_v_in_place(tiny, tmp_path: Path) -> None:
    """The sequence-major query/key/value of the packed graph let ORT's MatmulTransposeFusion
    fold the head split into the attention products at session load: two FusedMatMul per
    layer (the scores also with the keys transposed), one 4-D Transpose (the context's), and
    the query/key/value split before they are unpacked."""
    m = tiny[0]
    graph = _packed_after_ort(tiny, tmp_path)
    layers = len(m.module.backbone.encoder.layer)

    def attrs(node: onnx.NodeProto) -> dict:
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    fused = [attrs(n) for n in graph.node if n.op_type == "FusedMatMul"]
    assert len(fused) == 2 * layers
    assert sum(f.get("transB") == 1 and f.get("transBatchA") == 1 for f in fused) == layers
    assert all(f.get("transBatchB") == 1 for f in fused)
    four_d = [n for n in graph.node if n.op_type == "Transpose"
              and len(attrs(n)["perm"]) == 4]
    assert len(four_d) == layers
    # q, k, v are split on the packed rows, before any unpacking Gather
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    splits = [n for n in graph.node if n.op_type in ("Split", "Slice")
              and n.input[0] in made_by and made_by[n.input[0]] in ("Gemm", "Add", "MatMul")]
    assert len(splits) == layers
    assert not any(n.op_type in ("Split", "Slice") and made_by.get(n.input[0]) == "Gather"
                   for n in graph.node)


def _word_lookup_ids(path: Path) -> str:
    graph = onnx.load(str(path)).graph
    tables = {t.name for t in graph.initializer if "word_embeddings" in t.name}
    return next(n.input[1] for n in graph.node if n.op_type == "Gather" and n.input[0] in tables)


def test_padding_free_embeds_real_tokens_only(tiny, tmp_path: Path) -> None:
    """BERT embeddings run on the packed ids (positions passed in); embeddings that derive
    positions from the padding (RoBERTa's ``padding_idx``) run padded, then are packed."""
    m, data, _, _, _ = tiny
    ids = torch.tensor([[2, 9, 10, 11, 3, 0, 0], [2, 12, 13, 3, 0, 0, 0]])
    b = Batch(inputs={"input_ids": ids, "attention_mask": (ids > 0).long()})
    roberta_like = copy.deepcopy(m.module)
    roberta_like.backbone.embeddings.padding_idx = 0
    for module, packed_ids in ((m.module, True), (roberta_like, False)):
        assert packable(module).embed_packed is packed_ids
        path = export_onnx(module, data[0], tmp_path / f"{packed_ids}.onnx",
                           Task.FEATURE_EXTRACTION, pack=True)
        assert is_packed(path)
        assert (_word_lookup_ids(path) != "input_ids") is packed_ids
        with torch.no_grad():
            ref = module(**b.inputs).numpy()
        assert np.allclose(run_onnx(session(path), b), ref, atol=1e-4)


def test_gemm_as_matmul_keeps_the_function(tiny, tmp_path: Path) -> None:
    m, data, _, _, _ = tiny
    path = export_onnx(m.module, data[0], tmp_path / "packed.onnx", Task.FEATURE_EXTRACTION,
                       pack=True)
    assert "Gemm" in _ops(path)  # Linear on [tokens, hidden] exports as Gemm
    n = gemm_as_matmul(path, tmp_path / "mm.onnx")
    assert n == _ops(path).count("Gemm") and "Gemm" not in _ops(tmp_path / "mm.onnx")
    before, after = session(path), session(tmp_path / "mm.onnx")
    for b in data[:2]:
        assert np.allclose(run_onnx(after, b), run_onnx(before, b), atol=1e-5)


def test_embedding_table_at_4_bits(tiny, tmp_path: Path) -> None:
    m, data, _, _, _ = tiny
    base = export_onnx(m.module, data[0], tmp_path / "plain.onnx", Task.FEATURE_EXTRACTION)
    ref = run_onnx(session(base), data[1])
    out = tmp_path / "q4.onnx"
    assert quantize_embeddings(base, out, 4, min_rows=1) == 3  # word, position, token type
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Gather") >= 3 * 3  # per table: packed rows, nibble decoding, scales
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)  # standard ops only
    name = next(t.name for t in model.graph.initializer if "word_embeddings" in t.name)
    table = next(t for t in model.graph.initializer if t.name == name)
    fp32 = next(t for t in onnx.load(str(base)).graph.initializer if t.name == name)
    assert table.data_type == onnx.TensorProto.UINT8
    assert list(table.dims) == [fp32.dims[0], fp32.dims[1] // 2]  # two weights per byte
    got = run_onnx(session(out), data[1])
    assert mean_cosine(got, ref) > 0.99
    with pytest.raises(StepError, match="embeddingBits"):
        quantize_embeddings(base, tmp_path / "q3.onnx", 3)


def test_int8_dynamic_with_4_bit_tables_is_smaller(tiny, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    m, data, _, _, _ = tiny
    base = export_onnx(m.module, data[0], tmp_path / "packed.onnx", Task.FEATURE_EXTRACTION,
                       pack=True)
    ref = run_onnx(session(base), data[1])
    monkeypatch.setattr(quantize_mod, "MIN_VOCAB_ROWS", 1)  # the tiny tables count
    fn = lookup(QuantizeStep(method=QuantizeMethod.INT8_DYNAMIC, embedding_bits=4))
    sizes = {}
    for bits in (8, 4):
        cfg = QuantizeStep(method=QuantizeMethod.INT8_DYNAMIC, embedding_bits=bits)
        out = fn.transform(Model(onnx_path=base), cfg, _ctx(m, data, tmp_path / str(bits)))
        sizes[bits] = sum(len(numpy_helper.to_array(t).tobytes())  # the word table's bytes
                          for t in onnx.load(str(out.onnx_path)).graph.initializer
                          if "word_embeddings" in t.name)
        assert mean_cosine(run_onnx(session(out.onnx_path), data[1]), ref) > 0.95
        assert out.notes.get("embedding_tables_4bit") == (3 if bits == 4 else None)
        # standard ONNX ops only: the artifact loads on any ONNX Runtime a Triton image ships
        assert {n.domain for n in onnx.load(str(out.onnx_path)).graph.node} <= {"", "ai.onnx"}
    assert sizes[4] < sizes[8]


def test_int4_is_served_at_4_bits(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m, data, _, _, _ = tiny
    base = export_onnx(m.module, data[0], tmp_path / "packed.onnx", Task.FEATURE_EXTRACTION,
                       pack=True)
    ref = run_onnx(session(base), data[1])
    monkeypatch.setattr(quantize_mod, "MIN_VOCAB_ROWS", 1)  # the tiny tables count
    cfg = QuantizeStep(method=QuantizeMethod.INT4_WEIGHT_ONLY, block_size=16)
    tech = lookup(cfg)
    assert tech.stage is Stage.ONNX
    out = tech.transform(Model(onnx_path=base), cfg, _ctx(m, data, tmp_path))
    assert out.packed_bytes is None  # the file is the size
    g = onnx.load(str(out.onnx_path)).graph
    nbits = [n for n in g.node if n.op_type == "MatMulNBits"]
    # per layer: fused QKV, attention output, FFN in and out
    assert len(nbits) == out.notes["int4_matmuls"] == 4 * 2
    assert all(next(a.i for a in n.attribute if a.name == "bits") == 4 for n in nbits)
    assert not [n for n in g.node if n.op_type == "MatMul" and n.input[1] in
                {t.name for t in g.initializer}]  # no fp32 weight MatMul is left
    got = run_onnx(session(out.onnx_path), data[1])
    assert got.shape == ref.shape and mean_cosine(got, ref) > 0.9
    assert weight_bytes(out.onnx_path) < 0.25 * weight_bytes(base)
    with pytest.raises(ValueError, match="power of two"):
        QuantizeStep(method=QuantizeMethod.INT4_WEIGHT_ONLY, block_size=48)


def test_int4_on_the_cnn_quantizes_its_linear_layers(tmp_path: Path) -> None:
    net = ImageClassifier(TinyCNN()).eval()
    batch = Batch(inputs={"pixel_values": torch.rand(4, 1, 8, 8)})
    path = export_onnx(net, batch, tmp_path / "m.onnx", Task.IMAGE_CLASSIFICATION)
    ctx = Context(task=Task.IMAGE_CLASSIFICATION, train=[batch], teacher=net,
                  workdir=tmp_path / "w")
    cfg = QuantizeStep(method=QuantizeMethod.INT4_WEIGHT_ONLY, block_size=16)
    out = lookup(cfg).transform(Model(onnx_path=path), cfg, ctx)
    assert out.notes["int4_matmuls"] == 2 and out.notes["embedding_tables_4bit"] == 0
    got = run_onnx(session(out.onnx_path), batch)
    with torch.no_grad():
        ref = net(**batch.inputs).numpy()
    assert np.abs(got - ref).max() < 0.2 * np.abs(ref).max()


@pytest.mark.parametrize("method,bits", [(QuantizeMethod.POWER_OF_TWO, 4),
                                         (QuantizeMethod.BINARY, 1)])
def test_grid_weights_are_served_packed_and_decoded_at_load(method: QuantizeMethod, bits: int,
                                                            tiny, tmp_path: Path) -> None:
    """Power-of-two and binary weights are stored packed in the served file and decoded by
    ONNX Runtime when it loads the graph: the outputs are the fp32 graph's, bit for bit, on
    the BERT-fused graph (QKV weights concatenated, MatMul weights transposed) and on a CNN."""
    m, data, _, _, root = tiny
    q, packed_estimate, n = fake_quantize(m.module, method)
    raw = export_onnx(q, data[0], tmp_path / "raw.onnx", Task.FEATURE_EXTRACTION)
    fp32 = optimize(raw, tmp_path / "fp32.onnx", bert=m.bert, check=data[0]).path
    notes = serve_packed(fp32, tmp_path / "packed.onnx", method)
    g = onnx.load(str(tmp_path / "packed.onnx")).graph
    big = [i for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT and
           int(np.prod(i.dims)) >= quantize_mod.PACKED_MIN_WEIGHTS and
           not i.name.startswith("leanserve_")]
    # every weight matrix is packed (q, k and v fused into one per layer; what stays fp32 is
    # small: biases, norms, the token-type table)
    assert notes["served_packed"] == 10 and n == 16 and big == []
    def weight_bytes(graph: onnx.GraphProto) -> int:
        return sum(numpy_helper.to_array(i).nbytes for i in graph.initializer)

    # the weights take what the packed estimate says (+ the 256-entry decoding table and each
    # weight's two shapes), and the file shrinks by what they no longer take (less under 1 kB
    # per weight for its decoding nodes)
    table = 256 * (8 // bits) * 4
    assert weight_bytes(g) <= packed_estimate + table + 32 * notes["served_packed"]
    size, before = (tmp_path / "packed.onnx").stat().st_size, fp32.stat().st_size
    saved = weight_bytes(onnx.load(str(fp32)).graph) - weight_bytes(g)
    assert size <= before - saved + 1024 * notes["served_packed"]
    for batch in data[1:]:
        assert np.array_equal(run_onnx(session(tmp_path / "packed.onnx"), batch),
                              run_onnx(session(fp32), batch))
    # decoded at load: the graph ONNX Runtime runs has no decoding node left
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "as-loaded.onnx")
    ort.InferenceSession(str(tmp_path / "packed.onnx"), opts, providers=["CPUExecutionProvider"])
    loaded = onnx.load(str(tmp_path / "as-loaded.onnx")).graph
    assert not [n for n in loaded.node if any("leanserve_" in x for x in n.input)]
    net, x = ImageClassifier(TinyCNN()).eval(), torch.rand(4, 1, 8, 8)
    qc, _, _ = fake_quantize(net, method)
    cnn = export_onnx(qc, Batch({"pixel_values": x}), tmp_path / "cnn.onnx",
                      Task.IMAGE_CLASSIFICATION)
    # three of its four weights (the first conv's 72 values stay fp32: below
    # PACKED_MIN_WEIGHTS)
    assert serve_packed(cnn, tmp_path / "cnn-packed.onnx", method)["served_packed"] == 3
    assert np.array_equal(run_onnx(session(tmp_path / "cnn-packed.onnx"),
                                   Batch({"pixel_values": x})),
                          run_onnx(session(cnn), Batch({"pixel_values": x})))
    # the uncompressed graph has no weight on the grid: refused, not silently left fp32
    with pytest.raises(StepError, match="no weight of the exported graph is on the"):
        serve_packed(root / "base" / "model.onnx", tmp_path / "no.onnx", method)
