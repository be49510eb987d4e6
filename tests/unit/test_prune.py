"""Pruning on tiny models: what is removed really goes, the rest still runs and exports."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from leanserve.api.spec import PruneStep, Task
from leanserve.compression.modules import ImageClassifier, TextEncoder
from leanserve.compression.prune import prune
from leanserve.compression.registry import Batch, Context, Model, StepError, lookup

STEP_PATH = "spec.compression.candidates[pruned].steps[0]"


def tiny_text(seed: int = 0, layers: int = 2) -> TextEncoder:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=layers,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    return TextEncoder(BertModel(cfg).eval()).eval()


def text_batches(n: int = 3, rows: int = 8, seq: int = 12) -> list[Batch]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 120, (rows, seq), generator=gen)
        mask = torch.ones_like(ids)
        mask[: rows // 2, seq // 2:] = 0
        out.append(Batch(inputs={"input_ids": ids, "attention_mask": mask}))
    return out


def tiny_cnn(scripted: bool = False) -> ImageClassifier:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))
    net.eval()
    return ImageClassifier(torch.jit.script(net) if scripted else net).eval()


def image_batches(n: int = 3, rows: int = 16) -> list[Batch]:
    gen = torch.Generator().manual_seed(2)
    return [Batch(inputs={"pixel_values": torch.rand(rows, 1, 8, 8, generator=gen)},
                  labels=torch.randint(0, 10, (rows,), generator=gen)) for _ in range(n)]


def ctx_for(teacher: nn.Module, task: Task, batches: list[Batch], tmp: Path) -> Context:
    return Context(task=task, train=batches, teacher=teacher, workdir=tmp,
                   extra={"step_path": STEP_PATH})


def onnx_output_shape(module: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[int, ...]:
    import onnxruntime as ort

    buf = io.BytesIO()
    names = list(inputs)
    torch.onnx.export(module, (), buf, kwargs=inputs, input_names=names, output_names=["out"],
                      dynamo=False)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    return tuple(sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0].shape)


def test_registered_for_prune_step() -> None:
    assert lookup(PruneStep(method="magnitude", sparsity=0.5)).transform is prune


@pytest.mark.parametrize("importance", ["l1", "taylor", "gradient-norm"])
def test_magnitude_reaches_sparsity_and_keeps_teacher(tmp_path: Path, importance: str) -> None:
    teacher = tiny_text()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ctx = ctx_for(teacher, Task.FEATURE_EXTRACTION, text_batches(), tmp_path)
    cfg = PruneStep(method="magnitude", sparsity=0.5, importance=importance)
    out = prune(Model(module=teacher), cfg, ctx)
    assert out.notes["sparsity"] == pytest.approx(0.5, abs=0.01)
    zeros = sum(int((m.weight == 0).sum()) for m in out.module.modules()
                if isinstance(m, nn.Linear))
    assert zeros == out.notes["pruned_weights"]
    # masks are permanent: no reparametrization left behind
    assert not any(k.endswith("_orig") or k.endswith("_mask") for k in out.module.state_dict())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_magnitude_iterative_with_fine_tuning(tmp_path: Path) -> None:
    teacher = tiny_text()
    ctx = ctx_for(teacher, Task.FEATURE_EXTRACTION, text_batches(), tmp_path)
    cfg = PruneStep(method="magnitude", sparsity=0.6, iterations=3, fine_tune_epochs=1)
    out = prune(Model(module=teacher), cfg, ctx)
    # fine-tuning runs with the masks applied, so pruned weights stay zero
    assert out.notes["sparsity"] == pytest.approx(0.6, abs=0.01)


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor", "gradient-norm"])
def test_ffn_neurons_removed(tmp_path: Path, importance: str) -> None:
    teacher = tiny_text()
    batches = text_batches()
    ctx = ctx_for(teacher, Task.FEATURE_EXTRACTION, batches, tmp_path)
    out = prune(Model(module=teacher),
                PruneStep(method="structured", granularity="neuron", importance=importance,
                          sparsity=0.25), ctx)
    for layer in out.module.backbone.encoder.layer:
        assert layer.intermediate.dense.out_features == 48
        assert layer.output.dense.in_features == 48
    assert out.notes["removed_neurons"] == 2 * 16
    emb = out.module(**batches[0].inputs)
    assert emb.shape == (8, 32)
    # removing the least important quarter keeps the embeddings close to the teacher's
    cos = nn.functional.cosine_similarity(emb, teacher(**batches[0].inputs)).mean()
    assert cos > 0.8
    assert teacher.backbone.encoder.layer[0].intermediate.dense.out_features == 64


def test_heads_removed_and_onnx_exports(tmp_path: Path) -> None:
    teacher = tiny_text()
    batches = text_batches()
    ctx = ctx_for(teacher, Task.FEATURE_EXTRACTION, batches, tmp_path)
    out = prune(Model(module=teacher), PruneStep(method="structured", granularity="head",
                                                 sparsity=0.5, iterations=2), ctx)
    for layer in out.module.backbone.encoder.layer:
        att = layer.attention.self
        assert att.num_attention_heads == 2
        assert att.query.out_features == att.key.out_features == att.value.out_features == 16
        assert layer.attention.output.dense.in_features == 16
    assert out.notes["removed_heads"] == 4
    assert out.notes["kept_heads_per_layer"] == [2, 2]
    inputs = batches[0].inputs
    assert out.module(**inputs).shape == (8, 32)
    assert onnx_output_shape(out.module, inputs) == (8, 32)


def test_pruned_heads_equal_masked_teacher(tmp_path: Path) -> None:
    """Slicing a head out must compute exactly what the teacher computes with that head's
    value projection and output columns zeroed: the q/k/v rows and output columns align."""
    teacher = tiny_text(layers=1)
    batches = text_batches()
    ctx = ctx_for(teacher, Task.FEATURE_EXTRACTION, batches, tmp_path)
    out = prune(Model(module=teacher), PruneStep(method="structured", granularity="head",
                                                 sparsity=0.25), ctx)
    kept_q = out.module.backbone.encoder.layer[0].attention.self.query.weight
    q = teacher.backbone.encoder.layer[0].attention.self.query.weight
    dropped = [h for h in range(4) if not any(torch.equal(q[h * 8:(h + 1) * 8], kept_q[i:i + 8])
                                              for i in range(0, kept_q.shape[0], 8))]
    assert len(dropped) == 1
    masked = tiny_text(layers=1)
    with torch.no_grad():
        cols = slice(dropped[0] * 8, (dropped[0] + 1) * 8)
        masked.backbone.encoder.layer[0].attention.output.dense.weight[:, cols] = 0
    inputs = batches[0].inputs
    torch.testing.assert_close(out.module(**inputs), masked(**inputs), atol=1e-5, rtol=1e-4)


def test_cnn_channels_removed_from_torchscript(tmp_path: Path) -> None:
    teacher = tiny_cnn(scripted=True)
    batches = image_batches()
    ctx = ctx_for(teacher, Task.IMAGE_CLASSIFICATION, batches, tmp_path)
    out = prune(Model(module=teacher),
                PruneStep(method="structured", granularity="channel", importance="l2",
                          sparsity=0.5, iterations=2, fine_tune_epochs=1), ctx)
    convs = [m for m in out.module.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8]
    first_linear = next(m for m in out.module.modules() if isinstance(m, nn.Linear))
    assert first_linear.in_features == 8 * 4 * 4  # the Linear after Flatten was fixed up
    assert out.notes["params_after"] < out.notes["params_before"]
    inputs = batches[0].inputs
    assert out.module(**inputs).shape == (16, 10)
    assert onnx_output_shape(out.module, inputs) == (16, 10)


@pytest.mark.parametrize("importance", ["taylor", "gradient-norm"])
def test_mlp_neurons_with_gradient_importance(tmp_path: Path, importance: str) -> None:
    teacher = tiny_cnn()
    ctx = ctx_for(teacher, Task.IMAGE_CLASSIFICATION, image_batches(), tmp_path)
    out = prune(Model(module=teacher), PruneStep(method="structured", granularity="neuron",
                                                 importance=importance, sparsity=0.5), ctx)
    linears = [m for m in out.module.modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [16, 10]


def test_head_pruning_on_cnn_names_granularity(tmp_path: Path) -> None:
    ctx = ctx_for(tiny_cnn(), Task.IMAGE_CLASSIFICATION, image_batches(), tmp_path)
    with pytest.raises(StepError) as err:
        prune(Model(module=ctx.teacher), PruneStep(method="structured", granularity="head",
                                                   sparsity=0.3), ctx)
    msg = str(err.value)
    assert msg.startswith(f"{STEP_PATH}.prune.granularity:")
    assert "got a CNN" in msg and "allowed: neuron, channel" in msg


def test_channel_pruning_on_transformer_names_granularity(tmp_path: Path) -> None:
    ctx = ctx_for(tiny_text(), Task.FEATURE_EXTRACTION, text_batches(), tmp_path)
    with pytest.raises(StepError, match=r"prune\.granularity: channel pruning needs a CNN"):
        prune(Model(module=ctx.teacher), PruneStep(method="structured", granularity="channel",
                                                   sparsity=0.3), ctx)


@pytest.mark.parametrize(("granularity", "sparsity"), [("head", 0.9), ("neuron", 0.995)])
def test_sparsity_that_leaves_nothing(tmp_path: Path, granularity: str, sparsity: float) -> None:
    ctx = ctx_for(tiny_text(), Task.FEATURE_EXTRACTION, text_batches(), tmp_path)
    with pytest.raises(StepError) as err:
        prune(Model(module=ctx.teacher), PruneStep(method="structured", granularity=granularity,
                                                   sparsity=sparsity), ctx)
    assert str(err.value).startswith(f"{STEP_PATH}.prune.sparsity:")
    assert "removes all" in str(err.value)


def test_channel_sparsity_that_leaves_nothing(tmp_path: Path) -> None:
    ctx = ctx_for(tiny_cnn(), Task.IMAGE_CLASSIFICATION, image_batches(), tmp_path)
    with pytest.raises(StepError, match=r"prune\.sparsity: 0\.9 removes all 8 channels"):
        prune(Model(module=ctx.teacher), PruneStep(method="structured", granularity="channel",
                                                   sparsity=0.9), ctx)


class _Doubled(nn.Module):
    """A scripted model that is not a plain chain of standard layers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) * 2


def test_unrebuildable_torchscript_is_refused(tmp_path: Path) -> None:
    teacher = ImageClassifier(torch.jit.script(_Doubled()))
    ctx = ctx_for(teacher, Task.IMAGE_CLASSIFICATION, image_batches(), tmp_path)
    with pytest.raises(StepError, match=r"^spec\.model: the TorchScript submodule net "
                                        r"\(_Doubled\) cannot be rebuilt"):
        prune(Model(module=teacher), PruneStep(method="magnitude", sparsity=0.5), ctx)


def test_scripted_chain_is_rebuilt_exactly(tmp_path: Path) -> None:
    teacher = tiny_cnn(scripted=True)
    batches = image_batches()
    ctx = ctx_for(teacher, Task.IMAGE_CLASSIFICATION, batches, tmp_path)
    out = prune(Model(module=teacher), PruneStep(method="magnitude", sparsity=0.0), ctx)
    assert not any(isinstance(m, torch.jit.ScriptModule) for m in out.module.modules())
    x = batches[0].inputs
    torch.testing.assert_close(out.module(**x), teacher(**x))


def _ffn_error(student: nn.Module, teacher: nn.Module, batches: list[Batch]) -> float:
    with torch.no_grad():
        return float(sum((1 - nn.functional.cosine_similarity(
            student(**b.inputs), teacher(**b.inputs))).mean() for b in batches) / len(batches))


@pytest.mark.parametrize("granularity", ["neuron", "head"])
def test_reconstruction_brings_the_pruned_layers_closer(tmp_path: Path, granularity: str) -> None:
    """The least-squares refit of the Linear after the removed units lowers the error against
    the teacher on held-out batches, for neurons and for heads, at the same kept units."""
    teacher = tiny_text(layers=2)
    train, held = text_batches(n=8), text_batches(n=10)[8:]
    errors = {}
    for reconstruct in (False, True):
        ctx = ctx_for(teacher, Task.FEATURE_EXTRACTION, train, tmp_path / str(reconstruct))
        out = prune(Model(module=teacher),
                    PruneStep(method="structured", granularity=granularity,
                              importance="activation", sparsity=0.5, reconstruct=reconstruct),
                    ctx)
        errors[reconstruct] = _ffn_error(out.module, teacher, held)
        assert ("reconstructed" in out.notes) == reconstruct
        layer = out.module.backbone.encoder.layer[0]
        width = (layer.attention.output.dense.in_features if granularity == "head"
                 else layer.output.dense.in_features)
        assert width == 16 if granularity == "head" else width == 32
    assert errors[True] < errors[False]


def test_refit_is_exact_when_nothing_is_removed() -> None:
    from leanserve.compression.prune import refit

    torch.manual_seed(0)
    layer = nn.Linear(12, 5)
    x = torch.randn(200, 12)
    new = refit(layer, torch.arange(12), x)
    assert torch.allclose(new(x), layer(x), atol=1e-3)


@pytest.mark.parametrize("change", [{"reconstruct": True}, {"importance": "activation"}])
def test_transformer_only_options_are_refused_on_a_cnn(tmp_path: Path, change: dict) -> None:
    cnn = tiny_cnn()
    ctx = ctx_for(cnn, Task.IMAGE_CLASSIFICATION, image_batches(), tmp_path)
    cfg = {"method": "structured", "granularity": "channel", "sparsity": 0.25, **change}
    with pytest.raises(StepError) as err:
        prune(Model(module=cnn), PruneStep(**cfg), ctx)
    assert str(err.value).startswith(f"{STEP_PATH}.prune.{next(iter(change))}: ")


def test_layer_inputs_stop_at_the_linear_and_match_a_full_pass(tmp_path: Path) -> None:
    """``layer_inputs`` ends each forward pass at the hooked Linear: the layers after it never
    run, and what it collects equals the real-token inputs a full pass gives that Linear."""
    from leanserve.compression.prune import layer_inputs

    teacher = tiny_text(layers=3)
    batches = text_batches(n=3)
    layers = teacher.backbone.encoder.layer
    target = layers[1].output.dense
    full: list[torch.Tensor] = []

    def keep(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        full.append(args[0].detach())

    handle = target.register_forward_pre_hook(keep)
    with torch.no_grad():
        expected = []
        for b in batches:
            teacher(**b.inputs)
            expected.append(full[-1][b.inputs["attention_mask"].bool()])
    handle.remove()
    later: list[int] = []
    handle = layers[2].register_forward_pre_hook(lambda *_: later.append(1))
    try:
        got = layer_inputs(teacher, target, ctx_for(teacher, Task.FEATURE_EXTRACTION, batches,
                                                    tmp_path), limit=10_000)
    finally:
        handle.remove()
    torch.testing.assert_close(got, torch.cat(expected))
    assert later == []  # the third layer never ran
    # the limit still ends collection early, on real tokens
    first = int(batches[0].inputs["attention_mask"].sum())
    short = layer_inputs(teacher, target, ctx_for(teacher, Task.FEATURE_EXTRACTION, batches,
                                                  tmp_path), limit=first)
    torch.testing.assert_close(short, expected[0])
