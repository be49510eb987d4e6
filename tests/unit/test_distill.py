"""Distillation on a tiny BERT: students shrink as configured and learn the teacher."""

from __future__ import annotations

import copy
import io
import json
import re
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from leanserve.api.spec import DistillStep, Task
from leanserve.compression import _ddp_train
from leanserve.compression.distill import (
    build_from_description,
    describe_student,
    distill,
    layer_indices,
    select_layers,
    torchrun_command,
    write_job,
)
from leanserve.compression.modules import ImageClassifier, TextEncoder
from leanserve.compression.registry import Batch, Context, Model, StepError, lookup

STEP_PATH = "spec.compression.candidates[distilled].steps[0]"


def tiny_text(layers: int = 4, head: nn.Module | None = None) -> TextEncoder:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=layers,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    return TextEncoder(BertModel(cfg).eval(), head=head).eval()


def batches(n: int = 4, rows: int = 16, labels: bool = False) -> list[Batch]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 120, (rows, 10), generator=gen)
        mask = torch.ones_like(ids)
        mask[::2, 6:] = 0
        y = torch.randint(0, 3, (rows,), generator=gen) if labels else None
        out.append(Batch(inputs={"input_ids": ids, "attention_mask": mask}, labels=y))
    return out


def ctx_for(teacher: nn.Module, task: Task, data: list[Batch], tmp: Path) -> Context:
    return Context(task=task, train=data, teacher=teacher, workdir=tmp,
                   extra={"step_path": STEP_PATH})


def mean_cos(a: nn.Module, b: nn.Module, data: list[Batch]) -> float:
    with torch.no_grad():
        return float(torch.cat([nn.functional.cosine_similarity(a(**x.inputs), b(**x.inputs))
                                for x in data]).mean())


def test_registered_for_distill_step() -> None:
    assert lookup(DistillStep(student_layers=1)).transform is distill


def test_layer_indices_keep_the_last_layer() -> None:
    assert layer_indices(6, 3) == [1, 3, 5]
    assert layer_indices(6, 2) == [2, 5]
    assert layer_indices(4, 1) == [3]
    assert layer_indices(12, 4) == [2, 5, 8, 11]


def test_layer_selection_starts_closer_than_even_spacing(tmp_path: Path) -> None:
    teacher = tiny_text(layers=6)
    data = _ddp_train.collect(batches(), teacher)
    kept, loss = select_layers(teacher, 3, data, Task.FEATURE_EXTRACTION)
    assert len(kept) == 3 and len(teacher.backbone.encoder.layer) == 6  # teacher untouched

    def start_loss(layers: list[int]) -> float:
        student = copy.deepcopy(teacher)
        student.backbone.encoder.layer = nn.ModuleList(
            [student.backbone.encoder.layer[i] for i in layers])
        inputs, targets, _ = data.rows(torch.arange(len(data)))
        with torch.no_grad():
            return float(_ddp_train.kd_loss(student(**inputs), targets, None, alpha=1.0,
                                            task=Task.FEATURE_EXTRACTION, temperature=1.0))

    assert start_loss(kept) == pytest.approx(loss, rel=1e-4)
    assert loss <= start_loss(layer_indices(6, 3)) + 1e-6


def test_student_layers_learn_teacher_embeddings(tmp_path: Path) -> None:
    teacher = tiny_text()
    data = batches()
    ctx = ctx_for(teacher, Task.FEATURE_EXTRACTION, data, tmp_path)
    student = distill(Model(module=teacher), DistillStep(student_layers=2, epochs=1,
                                                         learning_rate=1e-9), ctx).module
    untrained = mean_cos(student, teacher, data)
    out = distill(Model(module=teacher), DistillStep(student_layers=2, epochs=15,
                                                     learning_rate=1e-3, batch_size=16), ctx)
    assert len(out.module.backbone.encoder.layer) == 2
    kept = out.notes["teacher_layers_kept"]
    assert len(kept) == 2 and kept == sorted(kept)
    assert len(teacher.backbone.encoder.layer) == 4  # teacher untouched
    losses = out.notes["distill_loss"]
    assert losses[-1] < losses[0]
    assert mean_cos(out.module, teacher, data) > untrained
    assert not any(p.requires_grad for p in out.module.parameters())


def test_classifier_soft_and_hard_targets(tmp_path: Path) -> None:
    teacher = tiny_text(head=nn.Linear(32, 3))
    data = batches(labels=True)
    ctx = ctx_for(teacher, Task.TEXT_CLASSIFICATION, data, tmp_path)
    out = distill(Model(module=teacher), DistillStep(student_layers=1, epochs=10, alpha=0.7,
                                                     temperature=3.0, learning_rate=1e-3), ctx)
    logits = out.module(**data[0].inputs)
    assert logits.shape == (16, 3)
    assert out.notes["distill_loss"][-1] < out.notes["distill_loss"][0]


def test_token_loss_counts_real_tokens_only() -> None:
    t = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    s = t.clone()
    s[0, 3:] = -t[0, 3:]  # padding positions differ: must not count
    assert float(_ddp_train.token_loss(s, t, mask)) == pytest.approx(0.0, abs=1e-6)
    s[1, 0] = -t[1, 0]  # one real token opposite: 1 - (-1) = 2 over 8 real tokens
    assert float(_ddp_train.token_loss(s, t, mask)) == pytest.approx(2 / 8, abs=1e-5)


def test_kd_loss_mixes_soft_and_hard() -> None:
    s = torch.tensor([[2.0, 0.0, -1.0]])
    t = torch.tensor([[2.0, 0.0, -1.0]])
    y = torch.tensor([1])
    kw = {"task": Task.TEXT_CLASSIFICATION, "temperature": 2.0}
    soft_only = _ddp_train.kd_loss(s, t, y, alpha=1.0, **kw)
    assert float(soft_only) == pytest.approx(0.0, abs=1e-6)  # identical logits: no KL
    hard_only = _ddp_train.kd_loss(s, t, y, alpha=0.0, **kw)
    assert float(hard_only) == pytest.approx(float(nn.functional.cross_entropy(s, y)))
    half = _ddp_train.kd_loss(s, t, y, alpha=0.5, **kw)
    assert float(half) == pytest.approx(0.5 * float(hard_only))
    # without labels only the soft targets count
    assert float(_ddp_train.kd_loss(s, t + 1, None, alpha=0.0, **kw)) == pytest.approx(0.0,
                                                                                     abs=1e-6)


def test_student_config_shrinks_and_exports(tmp_path: Path) -> None:
    teacher = tiny_text()
    data = batches(n=2)
    ctx = ctx_for(teacher, Task.FEATURE_EXTRACTION, data, tmp_path)
    cfg = DistillStep(student={"numLayers": 2, "intermediateSize": 32, "numAttentionHeads": 2},
                      epochs=1)
    out = distill(Model(module=teacher), cfg, ctx)
    layers = out.module.backbone.encoder.layer
    assert len(layers) == 2
    assert layers[0].intermediate.dense.out_features == 32
    assert out.module.backbone.config.num_attention_heads == 2
    assert out.notes["copied_tensors"] > 0  # embeddings and attention weights still fit
    inputs = data[0].inputs
    buf = io.BytesIO()
    torch.onnx.export(out.module, (), buf, kwargs=inputs, input_names=list(inputs),
                      output_names=["embedding"], dynamo=False)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    assert got.shape == (16, 32)


def test_job_files_round_trip(tmp_path: Path) -> None:
    teacher = tiny_text(layers=2, head=nn.Linear(32, 3))
    data = _ddp_train.collect(batches(n=1, labels=True), teacher)
    tc = _ddp_train.TrainConfig(task=Task.TEXT_CLASSIFICATION, epochs=1, learning_rate=1e-3)
    write_job(tmp_path, teacher, data, tc, threads=1)
    rebuilt = build_from_description(json.loads((tmp_path / "student.json").read_text()))
    from safetensors.torch import load_file

    rebuilt.load_state_dict(load_file(str(tmp_path / "student.safetensors")))
    rebuilt.eval()
    x = batches(n=1)[0].inputs
    torch.testing.assert_close(rebuilt(**x), teacher(**x))
    loaded = _ddp_train.TrainData.load(tmp_path / "data.pt")
    torch.testing.assert_close(loaded.targets, data.targets)
    # the teacher's per-token states travel too: [rows, seq, hidden] in fp16
    assert data.token_targets is not None and data.token_targets.shape == (16, 10, 32)
    torch.testing.assert_close(loaded.token_targets, data.token_targets)
    assert describe_student(rebuilt)["head"] == {"in_features": 32, "out_features": 3}
    cmd = torchrun_command(tmp_path, 2)
    assert "--nproc_per_node=2" in cmd and "leanserve.compression._ddp_distill" in cmd


@pytest.mark.parametrize(("cfg", "fieldname"), [
    (DistillStep(student_layers=4), "distill.studentLayers"),
    (DistillStep(student={"numLayers": 1, "hiddenSize": 16}), "distill.student.hiddenSize"),
    (DistillStep(student={"numLayers": 1, "numAttentionHeads": 3}),
     "distill.student.numAttentionHeads"),
    (DistillStep(student_layers=1, workers=64), "distill.workers"),
])
def test_bad_configs_name_the_field(tmp_path: Path, cfg: DistillStep, fieldname: str) -> None:
    teacher = tiny_text()
    ctx = ctx_for(teacher, Task.FEATURE_EXTRACTION, batches(n=1), tmp_path)
    with pytest.raises(StepError) as err:
        distill(Model(module=teacher), cfg, ctx)
    assert str(err.value).startswith(f"{STEP_PATH}.{fieldname}:")


def test_more_torchrun_workers_than_gpus_is_refused_before_launch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CUDA machine each local DDP worker takes cuda:LOCAL_RANK (nccl cannot share one
    GPU between ranks): two workers on a one-GPU machine are refused, naming the field, before
    torchrun starts (decided here without a GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    teacher = tiny_text()
    ctx = ctx_for(teacher, Task.FEATURE_EXTRACTION, batches(n=2), tmp_path)
    with pytest.raises(StepError, match=rf"^{re.escape(STEP_PATH)}\.distill\.workers: 2 "
                                        r"torchrun workers .* has 1 \(allowed: at most 1\)"):
        distill(Model(module=teacher), DistillStep(student_layers=1, workers=2), ctx)
    assert not (tmp_path / "distill-job").exists()


def test_cnn_is_refused_with_a_reason(tmp_path: Path) -> None:
    net = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    data = [Batch(inputs={"pixel_values": torch.rand(4, 1, 8, 8)})]
    ctx = ctx_for(net, Task.IMAGE_CLASSIFICATION, data, tmp_path)
    with pytest.raises(StepError, match=r"distill\.studentLayers: .*got an MLP"):
        distill(Model(module=net), DistillStep(student_layers=1), ctx)


def test_hidden_and_relation_losses_are_zero_only_for_the_teacher_itself() -> None:
    gen = torch.Generator().manual_seed(4)
    t = torch.randn(2, 6, 32, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert float(_ddp_train.hidden_loss(t, t, mask)) == pytest.approx(0.0, abs=1e-7)
    assert float(_ddp_train.relation_loss(t, t, mask, heads=4)) == pytest.approx(0.0, abs=1e-6)
    s = t.clone()
    s[0, 4:] = torch.randn(2, 32, generator=gen)  # padding differs: neither loss may see it
    assert float(_ddp_train.hidden_loss(s, t, mask)) == pytest.approx(0.0, abs=1e-7)
    assert float(_ddp_train.relation_loss(s, t, mask, heads=4)) == pytest.approx(0.0, abs=1e-6)
    # hidden: relative squared error (s = 2t gives |t|^2 / |t|^2 = 1)
    assert float(_ddp_train.hidden_loss(2 * t, t, mask)) == pytest.approx(1.0, rel=1e-5)
    # relations compare [seq, seq] maps, so a student of another width still compares
    other = torch.randn(2, 6, 16, generator=gen)
    assert float(_ddp_train.relation_loss(other, t, mask, heads=4)) > 0.01


def test_hidden_and_relation_losses_train_a_closer_student(tmp_path: Path) -> None:
    teacher = tiny_text()
    data = batches()
    hooks = [len(m._forward_hooks) for m in teacher.modules()]
    ctx = ctx_for(teacher, Task.FEATURE_EXTRACTION, data, tmp_path)
    base = {"studentLayers": 2, "steps": 30, "learningRate": 1e-3, "batchSize": 16}
    plain = distill(Model(module=teacher), DistillStep.model_validate(base), ctx)
    both = distill(Model(module=teacher), DistillStep.model_validate(
        {**base, "hiddenWeight": 1.0, "relationWeight": 1.0, "relationHeads": 4}), ctx)
    assert both.notes["distill_losses"] == ["soft-target/embedding", "hidden-state",
                                            "attention-relation"]
    assert both.notes["distill_steps"] == 30
    assert both.notes["distill_loss"][-1] < both.notes["distill_loss"][0]
    # the intermediate losses pull every kept layer towards the teacher's: the student's
    # hidden states end closer to the teacher layers they came from than the plain student's
    assert [len(m._forward_hooks) for m in teacher.modules()] == hooks  # taps removed
    kept = both.notes["teacher_layers_kept"]
    assert plain.notes["teacher_layers_kept"] == kept
    mask = data[0].inputs["attention_mask"]

    def layer_gap(student: nn.Module) -> float:
        with torch.no_grad():
            s = student.backbone(**data[0].inputs, output_hidden_states=True).hidden_states
            t = teacher.backbone(**data[0].inputs, output_hidden_states=True).hidden_states
        return sum(float(_ddp_train.hidden_loss(s[i + 1], t[k + 1], mask))
                   for i, k in enumerate(kept[:-1]))

    assert layer_gap(both.module) < layer_gap(plain.module)
    assert len(teacher.backbone.encoder.layer) == 4


def test_relation_heads_must_divide_the_width(tmp_path: Path) -> None:
    teacher = tiny_text()
    ctx = ctx_for(teacher, Task.FEATURE_EXTRACTION, batches(n=1), tmp_path)
    cfg = DistillStep(student_layers=1, relation_weight=1.0, relation_heads=5)
    with pytest.raises(StepError) as err:
        distill(Model(module=teacher), cfg, ctx)
    assert str(err.value).startswith(f"{STEP_PATH}.distill.relationHeads:")


def test_length_grouping_keeps_every_row_once_in_similar_length_batches() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 129, (1000,), generator=gen)
    rows = torch.randperm(1000, generator=gen)
    out = _ddp_train.length_grouped(rows, lengths, 32, gen)
    assert sorted(torch.cat(out).tolist()) == list(range(1000))
    padded = sum(len(b) * int(lengths[b].max()) for b in out)
    plain = sum(len(b) * int(lengths[b].max()) for b in rows.split(32))
    assert padded < 0.7 * plain  # far less padding than random batches


def test_job_carries_the_teacher_and_the_new_settings(tmp_path: Path) -> None:
    teacher = tiny_text(layers=2)
    student = copy.deepcopy(teacher)
    data = _ddp_train.collect(batches(n=1), teacher, outputs=False)
    assert data.targets.shape == (16, 0) and data.token_targets is None
    tc = _ddp_train.TrainConfig(task=Task.FEATURE_EXTRACTION, epochs=1, learning_rate=1e-3,
                                steps=7, hidden_weight=0.5, relation_weight=2.0,
                                relation_heads=4, layer_map=(0, 1), precision="bf16")
    write_job(tmp_path, student, data, tc, threads=1, teacher=teacher)
    from leanserve.compression.distill import load_model_files, read_train_config

    assert read_train_config(tmp_path) == (tc, 1)
    x = batches(n=1)[0].inputs
    torch.testing.assert_close(load_model_files(tmp_path, "teacher").eval()(**x), teacher(**x))


def test_token_noise_replaces_inner_real_tokens_from_the_training_text() -> None:
    data = _ddp_train.collect(batches(n=2), tiny_text(layers=1), outputs=False)
    pool = _ddp_train.token_pool(data)
    ids, mask = data.inputs["input_ids"], data.inputs["attention_mask"]
    last = mask.sum(1) - 1
    inner = mask.bool().clone()
    inner[:, 0] = False
    inner[torch.arange(len(ids)), last] = False
    assert set(pool.tolist()) == set(ids[inner].tolist())  # first/last tokens, padding out
    gen = torch.Generator().manual_seed(0)
    noisy = _ddp_train.noisy_inputs(data.inputs, 0.5, pool, gen)["input_ids"]
    changed = noisy != ids
    assert not (changed & ~inner).any()  # [CLS], [SEP] and padding stay
    assert 0.3 < float(changed[inner].float().mean()) < 0.6  # ~half (a draw may match)
    assert set(noisy[changed].tolist()) <= set(pool.tolist())
    again = _ddp_train.noisy_inputs(data.inputs, 0.5, pool, torch.Generator().manual_seed(0))
    assert torch.equal(again["input_ids"], noisy)  # seeded
    assert torch.equal(_ddp_train.noisy_inputs(data.inputs, 0.0, pool, gen)["input_ids"], ids)


def test_frozen_embeddings_and_token_noise_train_the_layers_only(tmp_path: Path) -> None:
    teacher = tiny_text()
    ctx = ctx_for(teacher, Task.FEATURE_EXTRACTION, batches(n=2), tmp_path)
    cfg = DistillStep.model_validate({"studentLayers": 2, "steps": 10, "learningRate": 1e-3,
                                      "batchSize": 16, "freezeEmbeddings": True,
                                      "tokenNoise": 0.2})
    out = distill(Model(module=teacher), cfg, ctx)
    student = out.module
    for name, p in teacher.backbone.embeddings.state_dict().items():
        torch.testing.assert_close(student.backbone.embeddings.state_dict()[name], p)
    moved = [n for n, p in student.backbone.encoder.layer[0].state_dict().items()
             if not torch.equal(p, teacher.backbone.encoder.layer[
                 out.notes["teacher_layers_kept"][0]].state_dict()[n])]
    assert moved  # the layers trained
    assert out.notes["distill_loss"][-1] < out.notes["distill_loss"][0]
    assert mean_cos(student, teacher, batches(n=1)) > 0.9


def test_frozen_embeddings_in_a_ddp_group(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The DDP path freezes before wrapping (DDP would wait forever for the frozen tables'
    gradients otherwise): a group of one, gloo, in process."""
    import socket

    from leanserve.compression import _ddp_distill

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    teacher = tiny_text(layers=2)
    student = copy.deepcopy(teacher)
    data = _ddp_train.collect(batches(n=1), teacher, outputs=False)
    tc = _ddp_train.TrainConfig(task=Task.FEATURE_EXTRACTION, epochs=1, learning_rate=1e-3,
                                steps=3, hidden_weight=0.5, layer_map=(0, 1),
                                freeze_embeddings=True, token_noise=0.1)
    write_job(tmp_path, student, data, tc, threads=1, teacher=teacher)
    from leanserve.compression.distill import read_train_config

    assert read_train_config(tmp_path) == (tc, 1)
    losses, _ = _ddp_distill.train_in_group(student, data, tc, 0, 1, teacher=teacher)
    assert len(losses) == 3  # one step per pass over the 16 rows
    torch.testing.assert_close(student.backbone.embeddings.word_embeddings.weight,
                               teacher.backbone.embeddings.word_embeddings.weight)
    assert not torch.equal(student.backbone.encoder.layer[0].output.dense.weight,
                           teacher.backbone.encoder.layer[0].output.dense.weight)
