"""The training loop shared by distillation and by fine-tuning between pruning steps.

It lives apart from the techniques because it must run in three places with the same behaviour:
in-process (workers = 1, prune fine-tuning), in each torchrun worker on one machine, and in each
pod of an Indexed Job in the cluster. So it only ever sees plain tensors (``TrainData``): the
student's inputs, the teacher's outputs computed once up front, and optional labels. Workers
never need the teacher, and the data travels between processes as a tensor-only file loaded
with ``weights_only=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from leanserve.api.spec import Task

ATTENTION_MASK = "attention_mask"

MAX_TOKEN_TARGET_ELEMENTS = 64_000_000
"""Per-token teacher states are kept (as fp16) only up to this many numbers (128 MB)."""


@dataclass
class TrainData:
    """Every training row at once: inputs by name, the teacher's outputs, optional labels, and
    for transformers the teacher's last hidden state per token (fp16, [rows, seq, hidden])."""

    inputs: dict[str, torch.Tensor]
    targets: torch.Tensor
    labels: torch.Tensor | None = None
    token_targets: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def rows(self, idx: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor,
                                               torch.Tensor | None]:
        inputs = {k: v[idx] for k, v in self.inputs.items()}
        mask = inputs.get(ATTENTION_MASK)
        if mask is not None:
            # Rows were padded to the longest sequence of all; trim to this slice's longest so
            # short sentences do not pay for long ones.
            length = max(int(mask.sum(1).max()), 1)
            inputs = {k: v[:, :length] if v.dim() == 2 else v for k, v in inputs.items()}
        labels = self.labels[idx] if self.labels is not None else None
        return inputs, self.targets[idx], labels

    def tokens(self, idx: torch.Tensor, length: int) -> torch.Tensor | None:
        if self.token_targets is None:
            return None
        return self.token_targets[idx, :length].float()

    def save(self, path: Path) -> None:
        blob: dict[str, torch.Tensor] = {f"inputs.{k}": v for k, v in self.inputs.items()}
        blob["targets"] = self.targets
        if self.labels is not None:
            blob["labels"] = self.labels
        if self.token_targets is not None:
            blob["token_targets"] = self.token_targets
        torch.save(blob, path)

    @classmethod
    def load(cls, path: Path) -> TrainData:
        blob = torch.load(path, weights_only=True)
        inputs = {k.split(".", 1)[1]: v for k, v in blob.items() if k.startswith("inputs.")}
        return cls(inputs=inputs, targets=blob["targets"], labels=blob.get("labels"),
                   token_targets=blob.get("token_targets"))


def _pad_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate [batch, seq] tensors whose seq differ, right-padding with zeros."""
    if tensors[0].dim() != 2 or len({t.shape[1] for t in tensors}) == 1:
        return torch.cat(tensors)
    width = max(t.shape[1] for t in tensors)
    return torch.cat([F.pad(t, (0, width - t.shape[1])) for t in tensors])


def _pad_cat3(tensors: list[torch.Tensor]) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    return torch.cat([F.pad(t, (0, 0, 0, width - t.shape[1])) for t in tensors])


@torch.no_grad()
def collect(batches: list, teacher: nn.Module, *, tokens: bool = True) -> TrainData:
    """Turn the pipeline's batches into rows with the teacher's outputs (run once, in eval).

    With ``tokens`` and a transformer teacher (a ``backbone`` attribute), the last hidden state
    of every token is kept too: a few hundred sentences give a few thousand token targets,
    far more signal for a student than one embedding per sentence.
    """
    if not batches:
        raise ValueError("no training rows")
    names = list(batches[0].inputs)
    inputs = {n: _pad_cat([b.inputs[n] for b in batches]) for n in names}
    backbone = getattr(teacher, "backbone", None)
    width = inputs[ATTENTION_MASK].shape[1] if ATTENTION_MASK in inputs else 0
    hidden = getattr(getattr(backbone, "config", None), "hidden_size", 0)
    keep_tokens = (tokens and backbone is not None and width > 0
                   and len(inputs[ATTENTION_MASK]) * width * hidden <= MAX_TOKEN_TARGET_ELEMENTS)
    states: list[torch.Tensor] = []
    handle = None
    if keep_tokens:
        # a hook removed right after, so the teacher computes each batch once and is unchanged
        handle = backbone.register_forward_hook(
            lambda _m, _a, out: states.append(out[0].detach().half()))
    try:
        targets = torch.cat([teacher(**b.inputs).detach().float() for b in batches])
    finally:
        if handle is not None:
            handle.remove()
    have_labels = all(b.labels is not None for b in batches)
    labels = torch.cat([b.labels for b in batches]).long() if have_labels else None
    return TrainData(inputs=inputs, targets=targets, labels=labels,
                     token_targets=_pad_cat3(states) if keep_tokens else None)


def token_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - cosine between the student's and the teacher's last hidden state, over real tokens."""
    cos = F.cosine_similarity(student.float(), teacher, dim=-1)
    m = mask.to(cos.dtype)
    return ((1.0 - cos) * m).sum() / m.sum().clamp(min=1.0)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, *,
            task: Task, temperature: float, alpha: float) -> torch.Tensor:
    """The seeds' loss.

    Embedding models learn the teacher's embeddings (1 - cosine, plus MSE). Classifiers learn
    the teacher's soft targets at temperature T (KL, scaled by T^2 so its gradients keep their
    size as T changes) weighted by alpha, plus cross-entropy on hard labels weighted by
    1 - alpha where the data has labels.
    """
    if task is Task.FEATURE_EXTRACTION:
        cos = F.cosine_similarity(student, teacher, dim=-1)
        return (1.0 - cos).mean() + F.mse_loss(student, teacher)
    t = temperature
    soft = F.kl_div(F.log_softmax(student / t, dim=-1), F.softmax(teacher / t, dim=-1),
                    reduction="batchmean") * (t * t)
    if labels is None:
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student, labels)


def freeze_unused(module: nn.Module, data: TrainData, task: Task) -> list[str]:
    """Stop training parameters the output does not depend on (BERT's pooler, say).

    DDP refuses parameters that get no gradient; one probe backward on two rows finds them,
    and it finds the same ones on every rank.
    """
    module.zero_grad(set_to_none=True)
    inputs, targets, labels = data.rows(torch.arange(min(2, len(data))))
    with torch.enable_grad():
        out = module(**inputs)
        kd_loss(out, targets, labels, task=task, temperature=1.0, alpha=0.5).backward()
    frozen = []
    for name, p in module.named_parameters():
        if p.requires_grad and p.grad is None:
            p.requires_grad_(False)
            frozen.append(name)
    module.zero_grad(set_to_none=True)
    return frozen


@dataclass(frozen=True)
class TrainConfig:
    task: Task
    epochs: int
    learning_rate: float
    batch_size: int = 32
    temperature: float = 2.0
    alpha: float = 0.5
    seed: int = 0
    warmup_fraction: float = 0.1
    """Share of the steps with a linearly rising learning rate, then linear decay to zero."""
    token_weight: float = 1.0
    """Weight of the per-token hidden-state loss where the data carries token targets."""


def train(module: nn.Module, data: TrainData, cfg: TrainConfig, *, rank: int = 0,
          world: int = 1, params: nn.Module | None = None) -> list[float]:
    """Train ``module`` (a DDP wrapper when world > 1) to match ``data.targets``.

    Each epoch draws one permutation of the rows from the seed (identical on every rank) and
    gives rank r the rows r, r + world, ...; every rank takes the same number of steps, which
    DDP requires. Returns the mean loss per epoch as this rank saw it.

    The module stays in eval mode: we fit a teacher's deterministic function from a few hundred
    rows, and dropout only slows that down (there is no BatchNorm statistic to learn either).
    """
    owner = params if params is not None else module
    trainable = [p for p in owner.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=0.01)
    per_rank = len(data) // world
    if per_rank == 0:
        raise ValueError(f"{len(data)} training rows cannot be split over {world} workers")
    steps_per_epoch = math.ceil(per_rank / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, int(total * cfg.warmup_fraction))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(cfg.seed)
    module.eval()
    inner = getattr(module, "module", module)  # under DDP the model is .module
    backbone = getattr(inner, "backbone", None)
    captured: list[torch.Tensor] = []
    handle = None
    width = getattr(getattr(backbone, "config", None), "hidden_size", None)
    if (data.token_targets is not None and cfg.token_weight > 0
            and width == data.token_targets.shape[-1]):
        handle = backbone.register_forward_hook(lambda _m, _a, out: captured.append(out[0]))
    history: list[float] = []
    try:
        for _ in range(cfg.epochs):
            perm = torch.randperm(len(data), generator=gen)
            mine = perm[rank::world][:per_rank]
            losses = []
            for start in range(0, per_rank, cfg.batch_size):
                idx = mine[start:start + cfg.batch_size]
                inputs, targets, labels = data.rows(idx)
                with torch.enable_grad():
                    captured.clear()
                    out = module(**inputs)
                    loss = kd_loss(out, targets, labels, task=cfg.task,
                                   temperature=cfg.temperature, alpha=cfg.alpha)
                    if handle is not None and captured:
                        mask = inputs[ATTENTION_MASK]
                        want = data.tokens(idx, mask.shape[1])
                        assert want is not None
                        loss = loss + cfg.token_weight * token_loss(captured[-1], want, mask)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
            history.append(sum(losses) / len(losses))
    finally:
        if handle is not None:
            handle.remove()
    return history
