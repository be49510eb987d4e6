"""Low-rank factorization on tiny models: ranks as configured, compute never grows."""

from __future__ import annotations

import io
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from leanserve.api.spec import LowRankStep, Task
from leanserve.compression.lowrank import choose_rank, low_rank, saves_compute
from leanserve.compression.modules import ImageClassifier, TextEncoder
from leanserve.compression.registry import Batch, Context, Model, StepError, lookup

STEP_PATH = "spec.compression.candidates[lr].steps[0]"


def tiny_text() -> TextEncoder:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    return TextEncoder(BertModel(cfg).eval()).eval()


def text_batches() -> list[Batch]:
    ids = torch.randint(1, 120, (8, 12), generator=torch.Generator().manual_seed(1))
    return [Batch(inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})]


def tiny_cnn(scripted: bool = False) -> ImageClassifier:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))
    return ImageClassifier(torch.jit.script(net.eval()) if scripted else net.eval()).eval()


def image_batches() -> list[Batch]:
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    return [Batch(inputs={"pixel_values": x})]


def ctx_for(teacher: nn.Module, task: Task, batches: list[Batch], tmp: Path) -> Context:
    return Context(task=task, train=batches, teacher=teacher, workdir=tmp,
                   extra={"step_path": STEP_PATH})


def onnx_output_shape(module: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[int, ...]:
    buf = io.BytesIO()
    torch.onnx.export(module, (), buf, kwargs=inputs, input_names=list(inputs),
                      output_names=["out"], dynamo=False)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    return tuple(sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0].shape)


def test_registered_for_low_rank_step() -> None:
    assert lookup(LowRankStep(rank_ratio=0.5)).transform is low_rank


def test_rank_by_energy_and_ratio() -> None:
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # squared: 9, 4, 1 -> cumulative 9/14, 13/14, 1
    assert choose_rank(s, LowRankStep(energy=0.6)) == 1
    assert choose_rank(s, LowRankStep(energy=0.9)) == 2
    assert choose_rank(s, LowRankStep(energy=1.0)) == 3
    assert choose_rank(s, LowRankStep(rank_ratio=0.5)) == 2
    assert choose_rank(s, LowRankStep(rank_ratio=0.01)) == 1
    assert saves_compute(7, 32, 32) and not saves_compute(16, 32, 32)


def test_exact_low_rank_layer_is_reproduced(tmp_path: Path) -> None:
    """A Linear whose weight has rank 3 is factored at rank 3 with the same outputs."""
    torch.manual_seed(0)
    layer = nn.Linear(40, 30)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(30, 3) @ torch.randn(3, 40))
    net = nn.Sequential(layer)
    x = torch.randn(5, 40)
    ctx = ctx_for(net, Task.IMAGE_CLASSIFICATION, [], tmp_path)
    out = low_rank(Model(module=net), LowRankStep(energy=0.999999), ctx)
    assert out.notes["ranks"] == {"0": 3}
    factored = out.module[0]
    assert [m.weight.shape for m in factored] == [torch.Size([3, 40]), torch.Size([30, 3])]
    torch.testing.assert_close(out.module(x), net(x), atol=1e-4, rtol=1e-4)
    assert out.notes["params_after"] < out.notes["params_before"]


def test_transformer_factored_runs_and_exports(tmp_path: Path) -> None:
    teacher = tiny_text()
    batches = text_batches()
    ctx = ctx_for(teacher, Task.FEATURE_EXTRACTION, batches, tmp_path)
    out = low_rank(Model(module=teacher), LowRankStep(rank_ratio=0.25), ctx)
    # 32x32 attention projections at rank 8 and 32x64 FFN at rank 8 all get cheaper
    assert out.notes["ranks"]["backbone.encoder.layer.0.attention.self.query"] == 8
    assert out.notes["ranks"]["backbone.encoder.layer.1.output.dense"] == 8
    assert isinstance(out.module.backbone.encoder.layer[0].attention.self.query, nn.Sequential)
    assert isinstance(teacher.backbone.encoder.layer[0].attention.self.query, nn.Linear)
    inputs = batches[0].inputs
    assert out.module(**inputs).shape == (8, 32)
    assert onnx_output_shape(out.module, inputs) == (8, 32)


def test_skips_layers_where_factoring_costs_more(tmp_path: Path) -> None:
    teacher = tiny_text()
    ctx = ctx_for(teacher, Task.FEATURE_EXTRACTION, text_batches(), tmp_path)
    out = low_rank(Model(module=teacher), LowRankStep(rank_ratio=0.45), ctx)
    # rank 15 on 32x32 costs 15*64 = 960 < 1024 (factored); on 32x64 rank 15 costs
    # 15*96 = 1440 < 2048 (factored); at 0.6 the square ones would be skipped
    assert out.notes["factored_layers"] > 0
    out2 = low_rank(Model(module=teacher), LowRankStep(rank_ratio=0.6), ctx)
    assert "backbone.encoder.layer.0.attention.self.query" not in out2.notes["ranks"]
    assert out2.notes["skipped_layers"] > 0
    for name, rank in out2.notes["ranks"].items():
        layer = teacher.get_submodule(name)
        assert saves_compute(rank, layer.in_features, layer.out_features)


def test_cnn_conv_factored_from_torchscript(tmp_path: Path) -> None:
    teacher = tiny_cnn(scripted=True)
    batches = image_batches()
    ctx = ctx_for(teacher, Task.IMAGE_CLASSIFICATION, batches, tmp_path)
    out = low_rank(Model(module=teacher), LowRankStep(rank_ratio=0.25), ctx)
    conv = out.module.net[2]  # Conv2d(8, 16, 3): 72 inputs, 16 outputs: full rank 16 -> 4
    assert isinstance(conv, nn.Sequential)
    assert conv[0].weight.shape == (4, 8, 3, 3) and conv[1].weight.shape == (16, 4, 1, 1)
    inputs = batches[0].inputs
    assert out.module(**inputs).shape == (16, 10)
    assert onnx_output_shape(out.module, inputs) == (16, 10)


def test_nothing_cheaper_names_the_field(tmp_path: Path) -> None:
    ctx = ctx_for(tiny_cnn(), Task.IMAGE_CLASSIFICATION, image_batches(), tmp_path)
    with pytest.raises(StepError) as err:
        low_rank(Model(module=ctx.teacher), LowRankStep(energy=1.0), ctx)
    assert str(err.value).startswith(f"{STEP_PATH}.lowRank.energy:")
