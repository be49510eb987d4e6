"""Distillation: a smaller student trained to reproduce the teacher.

A transformer's student is either ``studentLayers`` encoder layers taken from the teacher
(chosen by greedily dropping the layers whose removal costs least on a few training rows;
weights copied, so training starts close to the teacher), or an explicit ``student`` config
(layers, width, MLP width, heads; weights copied where shapes still match, fresh init
elsewhere). It learns with the seeds' loss (``_ddp_train.kd_loss``): soft targets at temperature
T weighted by alpha plus hard labels where the data has them, or the teacher's embeddings
(cosine + MSE) for embedding models; plus, for transformers of the teacher's width, the
teacher's last hidden state per token (``_ddp_train.token_loss``).

A CNN or MLP student (``studentWidth``, ``_distill_width``) is a thinner copy of the model: each
hidden Conv2d keeps that share of its out-channels and each hidden Linear of its units (the
last Linear's outputs stay), the strongest by L2 norm, removed through torch-pruning's DepGraph
(``prune.remove_units``, shared with structured pruning) with the weights copied; it learns the
seeds' loss and, with ``hiddenWeight`` > 0, FitNets' hint loss (Romero et al. 2015): each
hidden layer's output against the teacher's same layer on the channels it kept
(``_ddp_train.Hints``; a subset of the teacher's channels, so no projection). It trains in
process only (``workers`` 1). On the digits CNN see bench/distill_cnn.py.

Measured on all-MiniLM-L6-v2 with examples/data/sentences.jsonl (300 training sentences, 100
held out): 3 of 6 layers start at mean cosine 0.770 to the teacher (layers 0, 4, 5) and reach
0.866-0.868 after 2 epochs (lr 2e-4, batch 16), far from a 0.99 gate: a 3-layer student needs
much more text than 300 sentences.

The teacher's outputs are computed once here; training then needs only tensors. With
``workers`` > 1 it runs under torch.distributed DDP in ``workers`` processes launched by torchrun
(``leanserve.compression._ddp_distill``), exchanging the student and the data through files in
``ctx.workdir``. In the cluster every pod of the operator's Indexed Job runs ``leanserve
compress`` with MASTER_ADDR/WORLD_SIZE/RANK set; there each pod joins the group in process with
the same training code (``_ddp_distill.train_in_group``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from leanserve.api.spec import DistillStep, Importance, Task
from leanserve.compression import _ddp_distill, _ddp_train, precision
from leanserve.compression.modules import TextEncoder
from leanserve.compression.prune import (
    describe,
    editable_copy,
    field,
    remove_units,
    transformer_layers,
    units,
)
from leanserve.compression.registry import (
    CompressionError,
    Context,
    Model,
    Stage,
    StepError,
    register,
)

DDP_TIMEOUT_S = 3600.0
"""Hard limit on a torchrun distillation; the process group is killed past it."""

FINISH_GRACE_S = 30.0
"""How long workers may still run after rank 0 wrote result.json. Rank 0 writes it after the
last all-reduce and barrier, so by then every rank has trained; a rank still alive this long
after is stuck tearing the process group down (seen with gloo on CPU: a rank waits in its
teardown for a peer that has exited, and torchrun waits for it forever). It is stopped and the
result stands."""

ON_STEP = "on_train_step"
"""ctx.extra key: an optional callable(step, total, loss, student) called after each
in-process training step (bench/distill.py evaluates checkpoints with it)."""

JOB_FILES = ("student.json", "student.safetensors", "data.pt", "train.json")


class DistillError(CompressionError):
    """The distributed training run failed (a worker crashed or timed out)."""


PROBE_ROWS = 64
"""Training rows on which candidate layer subsets are compared."""


def layer_indices(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers, always keeping the last one (6 -> 3 gives 1, 3, 5).

    Used where no data can rank the layers (a student config copying weights)."""
    if student_layers >= teacher_layers:
        return list(range(teacher_layers))
    step = teacher_layers / student_layers
    return [round(teacher_layers - 1 - step * (student_layers - 1 - i)) for i in
            range(student_layers)]


def _shallow(module: nn.Module) -> nn.Module:
    """A copy sharing parameters whose children can be replaced without touching ``module``
    (copy.copy alone would share the dict of children)."""
    new = copy.copy(module)
    new._modules = dict(module._modules)
    return new


@torch.no_grad()
def select_layers(teacher: nn.Module, keep_n: int, data: _ddp_train.TrainData,
                  task: Task) -> tuple[list[int], float]:
    """The teacher layers a student starts from: greedily drop, one at a time, the layer whose
    removal raises the distillation loss least on a few training rows.

    Which layers matter is model-specific: on all-MiniLM-L6-v2 the evenly spaced 1, 3, 5 start
    at mean cosine 0.60 to the teacher on held-out sentences, 0, 4, 5 at 0.77; greedy dropping
    costs n + (n - 1) + ... forward passes on PROBE_ROWS rows, not n-choose-k.
    Returns the kept indices and their loss.
    """
    probe = _shallow(teacher)
    probe.backbone = _shallow(teacher.backbone)
    probe.backbone.encoder = _shallow(teacher.backbone.encoder)
    layers = list(teacher.backbone.encoder.layer)
    inputs, targets, labels = data.rows(torch.arange(min(PROBE_ROWS, len(data))))
    if targets.shape[-1] == 0:  # the teacher runs per batch in training: run it here too
        targets = teacher(**inputs).float()

    def loss_of(subset: list[int]) -> float:
        probe.backbone.encoder.layer = nn.ModuleList([layers[i] for i in subset])
        out = probe(**inputs)
        return float(_ddp_train.kd_loss(out, targets, labels, task=task, temperature=1.0,
                                        alpha=1.0))

    kept = list(range(len(layers)))
    best = loss_of(kept)
    while len(kept) > keep_n:
        trials = [(loss_of([j for j in kept if j != i]), i) for i in kept]
        best, drop = min(trials)
        kept.remove(drop)
    return kept, best


# --------------------------------------------------------------------------------------------
# building students; describing them as JSON + safetensors so another process can rebuild them


def _head_desc(head: nn.Module | None) -> dict[str, int] | None:
    if head is None:
        return None
    if not isinstance(head, nn.Linear):
        raise StepError("distill: the model's classification head must be a single Linear "
                        f"layer (got {type(head).__name__})")
    return {"in_features": head.in_features, "out_features": head.out_features}


def describe_student(student: TextEncoder) -> dict[str, Any]:
    """A JSON description from which ``build_from_description`` recreates the architecture."""
    backbone = student.backbone
    return {"kind": "text-encoder", "backbone_class": type(backbone).__name__,
            "config": backbone.config.to_dict(), "pooling": student.pooling,
            "normalize": student.normalize, "head": _head_desc(student.head)}


def build_from_description(desc: dict[str, Any]) -> TextEncoder:
    """The inverse of ``describe_student``; weights are loaded separately (safetensors)."""
    import transformers

    if desc.get("kind") != "text-encoder":
        raise DistillError(f"unknown student kind {desc.get('kind')!r}")
    name = desc["backbone_class"]
    if not (name.endswith("Model") and hasattr(transformers, name)):
        raise DistillError(f"unknown backbone class {name!r}")
    cls = getattr(transformers, name)
    config = cls.config_class.from_dict(desc["config"])
    backbone = cls(config)
    head = desc.get("head")
    return TextEncoder(backbone, pooling=desc["pooling"], normalize=desc["normalize"],
                       head=nn.Linear(head["in_features"], head["out_features"]) if head else None)


def _copy_matching(dst: nn.Module, src_state: dict[str, torch.Tensor]) -> int:
    own = dst.state_dict()
    same = {k: v for k, v in src_state.items() if k in own and own[k].shape == v.shape}
    dst.load_state_dict(same, strict=False)
    return len(same)


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_width_student(model: nn.Module, cfg: DistillStep, ctx: Context
                        ) -> tuple[nn.Module, dict[str, Any]]:
    """A CNN or MLP student: an editable copy of ``model`` that keeps the share
    ``studentWidth`` of each hidden Conv2d's out-channels and hidden Linear's units (the last
    Linear's outputs stay), the strongest by the group L2 norm of their weights (theirs and
    those that read them), through prune.py's DepGraph removal, weights copied; so training
    starts close to the teacher. The notes record which teacher channels each layer kept."""
    width = cfg.student_width
    assert width is not None
    where = field(ctx, "distill", "studentWidth")
    if not ctx.train:
        raise StepError("spec.data: a width student needs a sample input (the data has no "
                        "training rows)")
    student = editable_copy(model, ctx)
    targets = _ddp_train.hint_layers(student)
    if not targets:
        raise StepError(f"{where}: {describe(student)} with no Conv2d and a single Linear has "
                        "no hidden layer to make thinner (allowed: a model with a Conv2d or "
                        "two Linear layers)")
    for m in targets:
        n = units(m)
        if int(n * width) < 1:  # torch-pruning keeps int(n * (1 - ratio)) units
            raise StepError(f"{where}: {width} keeps no unit of a layer of {n} (allowed: at "
                            f"least {1 / n:.4g} for this model)")
    before = _param_count(student)
    teacher_units = [units(m) for m in targets]
    kept = remove_units(student, targets, 1.0 - width, Importance.L2, ctx)
    student.eval()
    return student, {"student_width": width, "teacher_units_per_layer": teacher_units,
                     "kept_units_per_layer": [units(m) for m in targets],
                     "teacher_units_kept": kept,
                     "params_before": before, "params_after": _param_count(student)}


def _width_on_a_transformer(ctx: Context) -> StepError:
    return StepError(f"{field(ctx, 'distill', 'studentWidth')}: a width student is a thinner "
                     "copy of a CNN or MLP (got a transformer; allowed here: studentLayers or "
                     "student)")


def build_student(teacher: nn.Module, cfg: DistillStep, ctx: Context,
                  data: _ddp_train.TrainData | None = None) -> tuple[TextEncoder, dict[str, Any]]:
    """The student and what the report says about it; ``data`` ranks the teacher's layers."""
    layers = transformer_layers(teacher)
    if layers is None or not isinstance(teacher, TextEncoder):
        knob = "student" if cfg.student is not None else "studentLayers"
        raise StepError(f"{field(ctx, 'distill', knob)}: {knob} builds a student from a "
                        f"transformer text model (got {describe(teacher)}); a CNN or MLP "
                        "student is a thinner copy (allowed here: studentWidth in (0, 1))")
    if cfg.student_width is not None:
        raise _width_on_a_transformer(ctx)
    n_teacher = len(layers)
    backbone = teacher.backbone
    if cfg.student is None:
        assert cfg.student_layers is not None
        if cfg.student_layers >= n_teacher:
            raise StepError(f"{field(ctx, 'distill', 'studentLayers')}: {cfg.student_layers} "
                            f"is not fewer than the teacher's {n_teacher} layers "
                            f"(allowed: 1..{n_teacher - 1})")
        start_loss = None
        if data is not None and len(data):
            keep, start_loss = select_layers(teacher, cfg.student_layers, data, ctx.task)
        else:
            keep = layer_indices(n_teacher, cfg.student_layers)
        student = copy.deepcopy(teacher)
        student.backbone.encoder.layer = nn.ModuleList(
            [student.backbone.encoder.layer[i] for i in keep])
        student.backbone.config.num_hidden_layers = len(keep)
        for new_idx, lay in enumerate(student.backbone.encoder.layer):
            for m in lay.modules():
                if hasattr(m, "layer_idx"):
                    m.layer_idx = new_idx
        notes: dict[str, Any] = {"student_layers": len(keep), "teacher_layers_kept": keep}
        if start_loss is not None:
            notes["distill_start_loss"] = round(start_loss, 5)
        return student, notes

    sc = cfg.student
    config = copy.deepcopy(backbone.config)
    config.num_hidden_layers = sc.num_layers
    hidden = sc.hidden_size or config.hidden_size
    heads = sc.num_attention_heads or config.num_attention_heads
    if hidden % heads:
        raise StepError(f"{field(ctx, 'distill', 'student.numAttentionHeads')}: {heads} heads "
                        f"do not divide hiddenSize {hidden} (allowed: a divisor of {hidden})")
    if ctx.task is Task.FEATURE_EXTRACTION and hidden != backbone.config.hidden_size:
        raise StepError(f"{field(ctx, 'distill', 'student.hiddenSize')}: an embedding student "
                        f"must keep the teacher's width {backbone.config.hidden_size} so its "
                        f"embeddings compare (allowed: {backbone.config.hidden_size} or unset)")
    config.hidden_size = hidden
    config.num_attention_heads = heads
    config.intermediate_size = sc.intermediate_size or config.intermediate_size
    torch.manual_seed(ctx.seed)
    new_backbone = type(backbone)(config)
    head = teacher.head
    if head is not None:
        head = copy.deepcopy(head) if hidden == backbone.config.hidden_size else nn.Linear(
            hidden, _head_desc(head)["out_features"])  # type: ignore[index]
    student = TextEncoder(new_backbone, pooling=teacher.pooling, normalize=teacher.normalize,
                          head=head)
    # Copy what still fits: embeddings, and evenly spaced teacher layers onto student layers.
    keep = layer_indices(n_teacher, min(sc.num_layers, n_teacher))
    src = {k: v for k, v in backbone.state_dict().items() if not k.startswith("encoder.layer.")}
    for new_idx, old_idx in enumerate(keep):
        prefix = f"encoder.layer.{old_idx}."
        src.update({f"encoder.layer.{new_idx}.{k[len(prefix):]}": v
                    for k, v in backbone.state_dict().items() if k.startswith(prefix)})
    copied = _copy_matching(new_backbone, src)
    return student, {"student_layers": sc.num_layers, "student_hidden_size": hidden,
                     "student_intermediate_size": config.intermediate_size,
                     "student_heads": heads, "copied_tensors": copied}


# --------------------------------------------------------------------------------------------
# training: in-process, or torchrun with DDP


def _train_config(cfg: DistillStep, ctx: Context,
                  layer_map: list[int] | None = None) -> _ddp_train.TrainConfig:
    return _ddp_train.TrainConfig(
        task=ctx.task, epochs=cfg.epochs, learning_rate=cfg.learning_rate,
        batch_size=cfg.batch_size, temperature=cfg.temperature, alpha=cfg.alpha,
        seed=ctx.seed, steps=cfg.steps, hidden_weight=cfg.hidden_weight,
        relation_weight=cfg.relation_weight, relation_heads=cfg.relation_heads,
        layer_map=tuple(layer_map) if layer_map else None, precision=cfg.precision.value,
        precision_field=field(ctx, "distill", "precision"),
        freeze_embeddings=cfg.freeze_embeddings, token_noise=cfg.token_noise)


def _save_model(job: Path, name: str, model: TextEncoder) -> None:
    (job / f"{name}.json").write_text(json.dumps(describe_student(model)))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(job / f"{name}.safetensors"))


def load_model_files(job: Path, name: str) -> TextEncoder:
    """A model ``write_job`` saved as ``name``.json + ``name``.safetensors."""
    model = build_from_description(json.loads((job / f"{name}.json").read_text()))
    model.load_state_dict(load_file(str(job / f"{name}.safetensors")))
    return model


def write_job(job: Path, student: TextEncoder, data: _ddp_train.TrainData,
              tc: _ddp_train.TrainConfig, threads: int,
              teacher: TextEncoder | None = None) -> None:
    """Everything a DDP worker needs, as tensor-only and JSON files (no pickled code); the
    teacher too when the losses need it at training time."""
    job.mkdir(parents=True, exist_ok=True)
    _save_model(job, "student", student)
    if teacher is not None:
        _save_model(job, "teacher", teacher)
    data.save(job / "data.pt")
    raw = dataclasses.asdict(tc)
    raw.update(task=tc.task.value, threads=threads,
               layer_map=list(tc.layer_map) if tc.layer_map else None)
    (job / "train.json").write_text(json.dumps(raw))


def read_train_config(job: Path) -> tuple[_ddp_train.TrainConfig, int]:
    raw = json.loads((job / "train.json").read_text())
    threads = int(raw.pop("threads", 1))
    raw["task"] = Task(raw["task"])
    if raw.get("layer_map") is not None:
        raw["layer_map"] = tuple(raw["layer_map"])
    return _ddp_train.TrainConfig(**raw), threads


def torchrun_command(job: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={workers}",
            "--standalone", "-m", "leanserve.compression._ddp_distill", "--job", str(job)]


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid``, from /proc (empty where there is no /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _kill_tree(pid: int) -> None:
    """SIGKILL torchrun's process group and each worker's: torchrun starts every worker in a
    session of its own, so killing the launcher's group alone leaves them running."""
    workers = _children(pid)
    for group in (pid, *workers):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    for worker in workers:  # one that is not its group's leader
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(worker, signal.SIGKILL)


def run_torchrun(job: Path, workers: int, timeout_s: float = DDP_TIMEOUT_S) -> dict[str, Any]:
    """Run the DDP job with ``workers`` local processes; returns rank 0's result.

    The launcher and every worker are killed on timeout, on error, and when workers outlive
    rank 0's result by FINISH_GRACE_S, so no worker outlives the call.
    """
    result = job / "result.json"
    result.unlink(missing_ok=True)
    log = job / "torchrun.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    deadline = time.monotonic() + timeout_s
    finished_at: float | None = None
    with log.open("wb") as out:
        proc = subprocess.Popen(torchrun_command(job, workers), stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            while (code := proc.poll()) is None:
                now = time.monotonic()
                if finished_at is None and result.exists():
                    finished_at = now
                if now >= deadline or (finished_at is not None
                                       and now - finished_at >= FINISH_GRACE_S):
                    break
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                _kill_tree(proc.pid)
                proc.wait()
    if code is None and finished_at is not None:
        return json.loads(result.read_text())  # trained; a rank hung in its teardown
    lines = log.read_text(errors="replace").strip().splitlines()
    errors = [ln for ln in lines if "Error" in ln and "Traceback" not in ln]
    tail = " | ".join(errors[-1:] or lines[-3:]) + f" (full log: {log})"
    if code is None:
        raise DistillError(f"distill: DDP training with {workers} workers exceeded "
                           f"{timeout_s:.0f}s and was stopped: {tail}")
    if code != 0 or not result.exists():
        raise DistillError(f"distill: DDP training with {workers} workers failed with exit "
                           f"code {code}: {tail}")
    return json.loads(result.read_text())


def _train_here(student: nn.Module, data: _ddp_train.TrainData, tc: _ddp_train.TrainConfig,
                teacher: nn.Module | None, ctx: Context) -> list[float]:
    """Train ``student`` in this process (on the training device, seeded), every parameter
    trainable; the per-epoch losses."""
    torch.manual_seed(ctx.seed)
    for p in student.parameters():
        p.requires_grad_(True)
    with precision.on_training_device(student, *([teacher] if teacher else [])):
        return _ddp_train.train(student, data, tc, teacher=teacher,
                                on_step=ctx.extra.get(ON_STEP))


def _distill_width(model: Model, cfg: DistillStep, ctx: Context) -> Model:
    """distill with ``studentWidth``: a thinner CNN or MLP trained with the seeds' loss and,
    with ``hiddenWeight`` > 0, FitNets' hint loss on every hidden layer's kept channels
    (``_ddp_train.Hints``), in process."""
    assert model.module is not None
    refused = [("relationWeight", cfg.relation_weight > 0, "0"),
               ("tokenNoise", cfg.token_noise > 0, "0"),
               ("freezeEmbeddings", cfg.freeze_embeddings, "false"),
               ("workers", cfg.workers > 1, "1")]
    for knob, bad, allowed in refused:
        if bad:
            raise StepError(f"{field(ctx, 'distill', knob)}: a width student of a CNN or MLP "
                            f"does not take {knob} (allowed: {allowed})")
    precision.check(cfg.precision.value, field(ctx, "distill", "precision"))
    student, notes = build_width_student(model.module, cfg, ctx)
    hint = cfg.hidden_weight > 0
    teacher = None
    if hint:
        # forward hooks need eager layers: the teacher rebuilt like the student (unchanged)
        teacher = editable_copy(ctx.teacher, ctx)
        widths = [units(m) for m in _ddp_train.hint_layers(teacher)]
        if widths != notes["teacher_units_per_layer"]:
            raise StepError(f"{field(ctx, 'distill', 'hiddenWeight')}: the hint loss compares "
                            "each layer with the uncompressed teacher's, whose widths "
                            f"{widths} an earlier step changed to "
                            f"{notes['teacher_units_per_layer']} (allowed: 0 there, or put "
                            "distill first)")
    # Without hints the teacher's outputs are computed once; with them it runs per batch.
    data = _ddp_train.collect(ctx.train, ctx.teacher, outputs=not hint, tokens=False)
    tc = dataclasses.replace(_train_config(cfg, ctx), hint_channels=tuple(
        tuple(k) for k in notes["teacher_units_kept"]) if hint else None)
    started = time.monotonic()
    losses = _train_here(student, data, tc, teacher, ctx)
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    if data.labels is None:
        terms = ["soft-target"]
    else:
        terms = (["soft-target"] if cfg.alpha > 0 else []) + (["hard-label"] if cfg.alpha < 1
                                                              else [])
    notes.update({"distill_workers": 1, "distill_mode": "in-process",
                  "distill_epochs": cfg.epochs, "distill_steps": tc.steps,
                  "distill_precision": tc.precision,
                  "distill_losses": terms + (["feature-hint"] if hint else []),
                  "distill_alpha": cfg.alpha, "distill_temperature": cfg.temperature,
                  "distill_rows": len(data),
                  "distill_loss": [round(x, 5) for x in losses],
                  "distill_seconds": round(time.monotonic() - started, 1)})
    return Model(module=student, notes={**model.notes, **notes})


@register(DistillStep, Stage.TORCH)
def distill(model: Model, cfg: DistillStep, ctx: Context) -> Model:
    """Build a student from ``model.module`` and train it against the teacher's outputs."""
    if model.module is None:
        raise StepError(f"{field(ctx, 'distill', 'studentLayers')}: distillation needs a torch "
                        "model (put distill before any ONNX quantization step)")
    if not ctx.train:
        raise StepError("spec.data: distillation needs training rows (the data has none)")
    if cfg.student_width is not None:
        if transformer_layers(model.module) is not None:
            raise _width_on_a_transformer(ctx)
        return _distill_width(model, cfg, ctx)
    cluster = _ddp_distill.environment() if cfg.workers > 1 else None
    if cfg.workers == 1:  # DDP workers check on their own device (a GPU pod may have one)
        precision.check(cfg.precision.value, field(ctx, "distill", "precision"))
    elif cluster is None:  # torchrun here: refuse before any work
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if 0 < gpus < cfg.workers:  # nccl: each worker on a GPU of its own (cuda:LOCAL_RANK)
            raise StepError(f"{field(ctx, 'distill', 'workers')}: {cfg.workers} torchrun "
                            f"workers on this machine need a CUDA GPU each, and it has {gpus} "
                            f"(allowed: at most {gpus})")
    # Learn the uncompressed model's outputs even when an earlier step changed the model: the
    # quality gate compares against that model.
    per_batch = cfg.hidden_weight > 0 or cfg.relation_weight > 0 or cfg.token_noise > 0
    teacher = ctx.teacher if per_batch else None
    if per_batch and not (isinstance(teacher, TextEncoder)
                          and transformer_layers(teacher) is not None):
        knob = ("hiddenWeight" if cfg.hidden_weight > 0 else
                "relationWeight" if cfg.relation_weight > 0 else "tokenNoise")
        raise StepError(f"{field(ctx, 'distill', knob)}: intermediate-layer losses need a "
                        f"transformer teacher (got {describe(ctx.teacher)}; allowed: 0)")
    if cfg.relation_weight > 0 and _ddp_train.relation_projections(
            transformer_layers(ctx.teacher)[-1]) is None:  # type: ignore[index]
        raise StepError(f"{field(ctx, 'distill', 'relationWeight')}: the teacher's attention "
                        "has no query/key/value projections (allowed: 0)")
    # With per-batch losses the teacher runs beside the student on every batch; its outputs
    # are not computed up front (tens of thousands of rows would cost a pass for nothing).
    data = _ddp_train.collect(ctx.train, ctx.teacher, outputs=not per_batch,
                              tokens=not per_batch)
    student, notes = build_student(model.module, cfg, ctx, data)
    if len(data) < cfg.workers:
        raise StepError(f"{field(ctx, 'distill', 'workers')}: {cfg.workers} workers for "
                        f"{len(data)} training rows (allowed: at most {len(data)})")
    layer_map = notes.get("teacher_layers_kept")
    if layer_map is None and cfg.student is not None:
        layer_map = layer_indices(len(transformer_layers(ctx.teacher) or []),
                                  cfg.student.num_layers)
    tc = _train_config(cfg, ctx, layer_map)
    if cfg.relation_weight > 0:
        for m in (student, ctx.teacher):
            width = m.backbone.config.hidden_size  # type: ignore[union-attr]
            if width % cfg.relation_heads:
                raise StepError(f"{field(ctx, 'distill', 'relationHeads')}: "
                                f"{cfg.relation_heads} does not divide the width {width} "
                                f"(allowed: a divisor of {width})")
    started = time.monotonic()
    if cfg.workers == 1:
        losses = _train_here(student, data, tc, teacher, ctx)
        mode = "in-process"
    elif cluster is not None:
        rank, world = cluster
        if world != cfg.workers:
            raise StepError(f"{field(ctx, 'distill', 'workers')}: {cfg.workers} workers, but "
                            f"this pod belongs to a group of WORLD_SIZE={world} (allowed: "
                            "the same workers on every distill step of a spec)")
        # Every pod built this same student from the same rows: train it together in process.
        losses, _ = _ddp_distill.train_in_group(student, data, tc, rank, world,
                                                teacher=teacher)
        mode = f"pods (rank {rank})"
    else:
        job = Path(ctx.workdir) / "distill-job"
        write_job(job, student, data, tc, threads=max(1, ctx.threads // cfg.workers),
                  teacher=teacher)  # type: ignore[arg-type]
        launched = time.monotonic()
        result = run_torchrun(job, cfg.workers)
        if torch.cuda.is_available():  # each worker held a GPU of its own (nccl, LOCAL_RANK)
            precision.add_gpu_seconds((time.monotonic() - launched) * cfg.workers)
        student.load_state_dict(load_file(str(job / "trained.safetensors")))
        losses = result["losses"]
        mode = "torchrun"
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    notes.update({"distill_workers": cfg.workers, "distill_mode": mode,
                  "distill_epochs": cfg.epochs, "distill_steps": tc.steps,
                  "distill_precision": tc.precision,
                  "distill_losses": ["soft-target/embedding"]
                  + (["hidden-state"] if cfg.hidden_weight > 0 else [])
                  + (["attention-relation"] if cfg.relation_weight > 0 else []),
                  "distill_rows": len(data),
                  "distill_loss": [round(x, 5) for x in losses],
                  "distill_seconds": round(time.monotonic() - started, 1)})
    return Model(module=student, notes={**model.notes, **notes})


__all__ = [
    "JOB_FILES",
    "DistillError",
    "build_from_description",
    "build_student",
    "distill",
    "layer_indices",
    "load_model_files",
    "read_train_config",
    "run_torchrun",
    "select_layers",
    "torchrun_command",
    "write_job",
]
