"""Quantization-aware training: the fake quantization is ONNX Runtime's arithmetic, the
fine-tune leaves a plain module, and what is served is a real int8 graph that is closer to the
float teacher than post-training int8 of the same model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from test_compression_fixtures import TinyCNN, sentences, tiny_hf_dir

from leanserve.api.spec import ModelFormat, QuantizeMethod, QuantizeStep, Task
from leanserve.compression import techniques
from leanserve.compression.evaluate import row_cosines
from leanserve.compression.export import export_onnx, run_onnx, session
from leanserve.compression.loading import Rows, batches, load_model
from leanserve.compression.modules import ImageClassifier
from leanserve.compression.qat import FakeQuant, fake_activation_uint8, fake_weight_int8
from leanserve.compression.registry import Batch, Context, Model, Stage, StepError, lookup

techniques.load_all()


def _ort(graph: onnx.GraphProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, feed)


def test_fake_activation_is_ort_dynamic_quantize_linear() -> None:
    x = (np.random.default_rng(0).standard_normal((64, 48)) * 3 + 0.5).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "dq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 48])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 48])])
    want = _ort(graph, {"x": x})[0]
    t = torch.from_numpy(x)
    got = fake_activation_uint8(t, t.min(), t.max()).numpy()
    step = (x.max() - min(0.0, x.min())) / 255
    # same grid; a value exactly between two levels may round the other way (float order)
    assert np.mean(np.isclose(got, want, atol=1e-5)) > 0.999
    assert np.abs(got - want).max() <= step + 1e-5


def test_fake_weight_is_ort_symmetric_int8_per_channel() -> None:
    from onnxruntime.quantization.quant_utils import quantize_data

    w = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))
    got = fake_weight_int8(w, per_channel=True)
    for row, fq in zip(w.numpy(), got.numpy(), strict=True):
        zero, scale, q = quantize_data(row, TensorProto.INT8, symmetric=True)
        assert int(zero) == 0
        assert np.allclose(fq, q.astype(np.float32) * float(scale), atol=1e-6)
    # gradients pass straight through the rounding
    w.requires_grad_(True)
    fake_weight_int8(w, per_channel=False).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("qat")
    m = load_model(tiny_hf_dir(root, seed=1).name, ModelFormat.HUGGINGFACE,
                   Task.FEATURE_EXTRACTION, root)
    # Two outlier channels in every layer's residual stream, as trained transformers have:
    # per-tensor int8 of the activations then loses what QAT can learn around.
    with torch.no_grad():
        for layer in m.module.backbone.encoder.layer:
            layer.attention.output.LayerNorm.weight[:2] *= 30
    data = batches(Rows(texts=sentences(96, seed=4)), tokenizer=m.tokenizer, max_length=32,
                   batch_size=16)
    return m, data


def _ctx(m, train: list[Batch], tmp: Path, task: Task = Task.FEATURE_EXTRACTION) -> Context:
    def to_onnx(model: Model, where: Path) -> Model:
        path = export_onnx(model.module, train[0], where / "model.onnx", task,
                           pack=task.is_text)
        return Model(onnx_path=path, notes=model.notes)

    return Context(task=task, train=train, teacher=m.module if hasattr(m, "module") else m,
                   workdir=tmp, to_onnx=to_onnx)


def test_fake_quant_is_removed_after_training(tiny) -> None:
    m, _ = tiny
    import copy

    module = copy.deepcopy(m.module)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    fq = FakeQuant(module, static=False).attach(True, None, 1)
    # q, k, v, attention output, FFN in, FFN out per layer, and BERT's (unused) pooler
    assert fq.layers == 2 * 6 + 1
    fq.remove()
    assert not any(hasattr(x, "parametrizations") for x in module.modules())
    assert module.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_qat_serves_int8_closer_to_the_teacher_than_post_training_int8(tiny,
                                                                        tmp_path: Path) -> None:
    m, data = tiny
    train, held = data[:4], data[4:]
    cfg = QuantizeStep(method=QuantizeMethod.QAT, per_channel=True, train_steps=20,
                       learning_rate=1e-4)
    tech = lookup(cfg)
    assert tech.stage is Stage.TORCH
    out = tech.transform(Model(module=m.module), cfg, _ctx(m, train, tmp_path / "qat"))
    assert out.module is None and out.onnx_path is not None
    ops = {n.op_type for n in onnx.load(str(out.onnx_path)).graph.node}
    assert "MatMulInteger" in ops  # a real int8 graph, activations quantized per call
    assert out.notes["qat_steps"] == 20 and out.notes["quantize"] == "qat"
    assert out.notes["qat_loss_last"] < out.notes["qat_loss_first"]
    ptq_cfg = QuantizeStep(method=QuantizeMethod.INT8_DYNAMIC, per_channel=True)
    base = export_onnx(m.module, train[0], tmp_path / "base.onnx", Task.FEATURE_EXTRACTION,
                       pack=True)
    ptq = lookup(ptq_cfg).transform(Model(onnx_path=base), ptq_cfg,
                                    _ctx(m, train, tmp_path / "ptq"))
    with torch.no_grad():
        ref = np.concatenate([m.module(**b.inputs).numpy() for b in held])

    def cos(path: Path) -> float:
        sess = session(path)
        return float(row_cosines(np.concatenate([run_onnx(sess, b) for b in held]), ref).mean())

    assert cos(out.onnx_path) > cos(ptq.onnx_path)  # on rows neither trained on


def test_static_qat_on_a_cnn_writes_a_qdq_graph(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = ImageClassifier(TinyCNN()).eval()
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    train = [Batch(inputs={"pixel_values": x[i:i + 16]}) for i in range(0, 64, 16)]
    cfg = QuantizeStep(method=QuantizeMethod.QAT, activations="static", per_channel=True,
                       train_steps=8, calibration_samples=32, learning_rate=1e-4)
    out = lookup(cfg).transform(Model(module=net), cfg,
                                _ctx(net, train, tmp_path, Task.IMAGE_CLASSIFICATION))
    g = onnx.load(str(out.onnx_path)).graph
    ops = [n.op_type for n in g.node]
    assert ops.count("QuantizeLinear") >= 4 and "Conv" in ops
    assert out.notes["qat_layers"] == 4 and out.notes["qat_activations"] == "static"
    assert any(t.data_type == TensorProto.INT8 and len(t.dims) == 4 for t in g.initializer)
    got = run_onnx(session(out.onnx_path), train[0])
    with torch.no_grad():
        ref = net(**train[0].inputs).numpy()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.75


def test_qat_trains_in_bf16_autocast_and_refuses_what_cannot_train(tiny, tmp_path: Path) -> None:
    """Mixed precision is an option of QAT as of every training step: bf16 autocast on the CPU
    (the int8 simulation and the weights stay fp32), fp16 refused off a GPU naming the field,
    and no precision on a method that does not train."""
    from pydantic import ValidationError

    from leanserve.api.spec import Precision

    m, data = tiny
    train, held = data[:4], data[4:]
    cfg = QuantizeStep(method=QuantizeMethod.QAT, per_channel=True, train_steps=20,
                       learning_rate=1e-4, precision="bf16")
    seen: list[torch.dtype] = []
    first = next(x for x in m.module.modules() if isinstance(x, torch.nn.Linear))
    hook = first.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    try:
        out = lookup(cfg).transform(Model(module=m.module), cfg,
                                    _ctx(m, train, tmp_path / "bf16"))
    finally:
        hook.remove()
    assert out.notes["precision"] == "bf16" and out.notes["qat_steps"] == 20
    assert out.notes["qat_loss_last"] < out.notes["qat_loss_first"] / 10
    # the fine-tuned copy (deep-copied with the hook) computed in bf16, the teacher in fp32
    assert torch.bfloat16 in seen and torch.float32 in seen
    ops = {n.op_type for n in onnx.load(str(out.onnx_path)).graph.node}
    assert "MatMulInteger" in ops  # still served as a real int8 graph
    with torch.no_grad():
        ref = np.concatenate([m.module(**b.inputs).numpy() for b in held])
    got = np.concatenate([run_onnx(session(out.onnx_path), b) for b in held])
    # on rows it did not train on (fp32 QAT: 0.99992, post-training int8: 0.99959, bf16
    # QAT 0.99943 here: bf16's rounding costs this toy model a little)
    assert row_cosines(got, ref).mean() > 0.999
    if not torch.cuda.is_available():
        fp16 = QuantizeStep(method=QuantizeMethod.QAT, train_steps=2, precision="fp16")
        ctx = _ctx(m, train, tmp_path / "fp16")
        ctx.extra["step_path"] = "spec.compression.candidates[0].steps[0]"
        with pytest.raises(StepError, match=r"steps\[0\]\.quantize\.precision: fp16 trains "
                                            "only on a CUDA GPU"):
            lookup(fp16).transform(Model(module=m.module), fp16, ctx)
    with pytest.raises(ValidationError, match="method int8-dynamic does not train"):
        QuantizeStep(method=QuantizeMethod.INT8_DYNAMIC, precision=Precision.BF16)
