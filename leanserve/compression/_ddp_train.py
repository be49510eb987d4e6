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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from leanserve.api.spec import Task
from leanserve.compression.precision import MixedPrecision, module_device

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

    def lengths(self) -> torch.Tensor | None:
        """Real tokens per row (None for inputs without an attention mask)."""
        mask = self.inputs.get(ATTENTION_MASK)
        return None if mask is None else mask.sum(1)

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
def collect(batches: list, teacher: nn.Module, *, tokens: bool = True,
            outputs: bool = True) -> TrainData:
    """Turn the pipeline's batches into rows with the teacher's outputs (run once, in eval).

    With ``tokens`` and a transformer teacher (a ``backbone`` attribute), the last hidden state
    of every token is kept too: a few hundred sentences give a few thousand token targets,
    far more signal for a student than one embedding per sentence.

    Without ``outputs`` the teacher is not run at all and ``targets`` is empty ([rows, 0]): for
    training that runs the teacher on each batch anyway (``train(..., teacher=...)``), where
    computing its outputs up front for tens of thousands of rows would only cost time.
    """
    if not batches:
        raise ValueError("no training rows")
    names = list(batches[0].inputs)
    inputs = {n: _pad_cat([b.inputs[n] for b in batches]) for n in names}
    have_labels = all(b.labels is not None for b in batches)
    labels = torch.cat([b.labels for b in batches]).long() if have_labels else None
    if not outputs:
        rows = next(iter(inputs.values())).shape[0]
        return TrainData(inputs=inputs, targets=torch.zeros(rows, 0), labels=labels)
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


def freeze_unused(module: nn.Module, data: TrainData, task: Task,
                  teacher: nn.Module | None = None) -> list[str]:
    """Stop training parameters the output does not depend on (BERT's pooler, say).

    DDP refuses parameters that get no gradient; one probe backward on two rows finds them,
    and it finds the same ones on every rank.
    """
    module.zero_grad(set_to_none=True)
    inputs, targets, labels = data.rows(torch.arange(min(2, len(data))))
    if teacher is not None:
        with torch.no_grad():
            targets = teacher(**inputs).float()
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


# --------------------------------------------------------------------------------------------
# intermediate-layer losses: the teacher runs beside the student on each batch


class Taps:
    """Forward hooks on a transformer text model (a ``backbone`` with ``encoder.layer``):
    the outputs of the encoder layers named in ``layers`` and, with ``relations``, the last
    layer's query, key and value projections ([batch, seq, width] each)."""

    def __init__(self, module: nn.Module, layers: list[int], *, relations: bool) -> None:
        inner = getattr(module, "module", module)  # under DDP the model is .module
        encoder_layers = list(inner.backbone.encoder.layer)
        self.hidden: dict[int, torch.Tensor] = {}
        self.qkv: dict[str, torch.Tensor] = {}
        self._handles = []
        for i in layers:
            self._handles.append(encoder_layers[i].register_forward_hook(
                lambda _m, _a, out, i=i: self.hidden.__setitem__(
                    i, out[0] if isinstance(out, tuple) else out)))
        if relations:
            attn = relation_projections(encoder_layers[-1])
            if attn is None:
                raise ValueError("the attention of this model has no query/key/value "
                                 "projections to take relations from")
            for name, lin in attn.items():
                self._handles.append(lin.register_forward_hook(
                    lambda _m, _a, out, name=name: self.qkv.__setitem__(name, out)))

    def clear(self) -> None:
        self.hidden.clear()
        self.qkv.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def relation_projections(layer: nn.Module) -> dict[str, nn.Module] | None:
    """A BERT-style layer's query, key and value Linear modules (None where it has none)."""
    attn = getattr(getattr(layer, "attention", None), "self", None)
    found = {n: getattr(attn, n, None) for n in ("query", "key", "value")}
    if any(not isinstance(m, nn.Linear) for m in found.values()):
        return None
    return found  # type: ignore[return-value]


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
    """Mean squared error between a student layer's and a teacher layer's hidden states over
    real tokens, relative to the teacher's mean square (so every layer weighs alike whatever
    its scale)."""
    m = mask.unsqueeze(-1).to(torch.float32)
    s, t = student.float(), teacher.float()
    err = ((s - t).pow(2) * m).sum()
    return err / (t.pow(2) * m).sum().clamp(min=1e-12)


def relation_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                  heads: int) -> torch.Tensor:
    """MiniLM v2's self-attention relation loss for one of query, key or value: both
    [batch, seq, width] are split into ``heads`` relation heads, each gives the relation
    softmax(X X^T / sqrt(d)) over real tokens, and the student's relations learn the
    teacher's by KL divergence (averaged over heads and real query tokens). The widths of the
    two models may differ: the relations are [seq, seq] either way."""

    def relations(x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        if w % heads:
            raise ValueError(f"{heads} relation heads do not divide width {w}")
        d = w // heads
        x = x.float().view(b, n, heads, d).transpose(1, 2)  # [b, heads, n, d]
        scores = x @ x.transpose(-1, -2) / math.sqrt(d)
        keep = mask[:, None, None, :].bool()
        return scores.masked_fill(~keep, torch.finfo(scores.dtype).min).log_softmax(-1)

    log_s, log_t = relations(student), relations(teacher)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # [b, heads, n]
    q = mask[:, None, :].to(kl.dtype)
    return (kl * q).sum() / (q.sum() * heads).clamp(min=1.0)


def hint_layers(module: nn.Module) -> list[nn.Module]:
    """The layers of a CNN or MLP whose outputs a width student's hint loss compares: every
    Conv2d, then every Linear but the last (which gives the outputs), in module order."""
    inner = getattr(module, "module", module)
    convs = [m for m in inner.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in inner.modules() if isinstance(m, nn.Linear)]
    return convs + linears[:-1]


def hint_loss(student: torch.Tensor, teacher: torch.Tensor, kept: torch.Tensor
              ) -> torch.Tensor:
    """FitNets' hint for one layer of a width student: mean squared error between the
    student's output [batch, channels, ...] and the teacher's same layer's output on the
    channels the student kept (a subset of the teacher's, so no projection is needed),
    relative to the teacher's mean square there (so every layer weighs alike whatever its
    scale)."""
    t = teacher.float().index_select(1, kept)
    return (student.float() - t).pow(2).sum() / t.pow(2).sum().clamp(min=1e-12)


class Hints:
    """Forward hooks on the ``hint_layers`` of a width student and of its teacher, and the
    mean of their ``hint_loss`` over layers. ``kept[i]`` lists the teacher channels that the
    student's i-th hint layer kept."""

    def __init__(self, student: nn.Module, teacher: nn.Module,
                 kept: tuple[tuple[int, ...], ...]) -> None:
        s_layers, t_layers = hint_layers(student), hint_layers(teacher)
        if not (len(s_layers) == len(t_layers) == len(kept)):
            raise ValueError(f"hint layers differ: student {len(s_layers)}, teacher "
                             f"{len(t_layers)}, kept channel lists {len(kept)}")
        self.kept = [torch.tensor(k, dtype=torch.long) for k in kept]
        self.student: dict[int, torch.Tensor] = {}
        self.teacher: dict[int, torch.Tensor] = {}
        self._handles = []
        for i, (s, t) in enumerate(zip(s_layers, t_layers, strict=True)):
            self._handles.append(s.register_forward_hook(
                lambda _m, _a, out, i=i: self.student.__setitem__(i, out)))
            self._handles.append(t.register_forward_hook(
                lambda _m, _a, out, i=i: self.teacher.__setitem__(i, out)))

    def clear(self) -> None:
        self.student.clear()
        self.teacher.clear()

    def loss(self) -> torch.Tensor:
        terms = [hint_loss(self.student[i], self.teacher[i],
                           self.kept[i].to(self.teacher[i].device))
                 for i in range(len(self.kept))]
        return torch.stack(terms).mean()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def freeze_embeddings(module: nn.Module) -> list[str]:
    """Stop training a transformer's input embeddings; returns the names frozen.

    A student copies the teacher's embedding table (on MiniLM 12M of its parameters, more than
    four encoder layers). Training moves only the rows of the tokens the training text holds,
    so the layers learn to read moved rows while every other token keeps the teacher's: frozen,
    a word the training text never had reaches the layers as the teacher's did.

    Measured on all-MiniLM-L6-v2, 4 of 6 layers, 1200 steps (bench/distill.py, fortunes and
    docstrings only): validation mean cosine 0.942 frozen, 0.943 not; no gain there."""
    inner = getattr(module, "module", module)
    embeddings = getattr(getattr(inner, "backbone", None), "embeddings", None)
    if embeddings is None:
        return []
    frozen = []
    for name, p in embeddings.named_parameters():
        if p.requires_grad:
            p.requires_grad_(False)
            frozen.append(f"backbone.embeddings.{name}")
    return frozen


def token_pool(data: TrainData) -> torch.Tensor:
    """The distinct token ids of the training rows, without each row's first and last real
    token (a BERT tokenizer's [CLS] and [SEP]) and padding: what ``noisy_inputs`` draws from."""
    ids = data.inputs["input_ids"]
    return torch.unique(ids[_inner_tokens(data.inputs[ATTENTION_MASK])])


def _inner_tokens(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's real tokens but its first and last ([CLS] and [SEP] of a BERT tokenizer)."""
    mask = attention_mask.bool()
    inner = mask.clone()
    inner[:, 0] = False
    inner[torch.arange(len(mask)), (mask.sum(1) - 1).clamp(min=0)] = False
    return inner


def noisy_inputs(inputs: dict[str, torch.Tensor], share: float, pool: torch.Tensor,
                 gen: torch.Generator) -> dict[str, torch.Tensor]:
    """``inputs`` with about ``share`` of each row's real tokens (not its first or last)
    replaced by tokens drawn uniformly from ``pool``: new sentences every step from the same
    text, and words the rows hold in contexts they do not. The teacher labels the noisy rows,
    so the student learns the teacher's function on them rather than a corrupted target.

    Measured on all-MiniLM-L6-v2, 4 of 6 layers, 1200 steps, lr 5e-4 (bench/distill.py): 0.15
    gives validation mean cosine 0.945, none 0.948; it does not help a run that short (whether
    it narrows the gap of longer runs, which fit their training rows far better than new
    text, is not measured)."""
    ids = inputs["input_ids"]
    hit = (torch.rand(ids.shape, generator=gen) < share) & _inner_tokens(inputs[ATTENTION_MASK])
    draw = pool[torch.randint(len(pool), ids.shape, generator=gen)]
    return {**inputs, "input_ids": torch.where(hit, draw.to(ids.dtype), ids)}


GROUP_BATCHES = 50
"""Length grouping: rows are sorted by length within windows of this many batches."""


def length_grouped(rows: torch.Tensor, lengths: torch.Tensor, batch_size: int,
                   gen: torch.Generator) -> list[torch.Tensor]:
    """``rows`` (already in random order) cut into batches of rows of similar length, in a
    random order of batches: rows are sorted by token count within windows of GROUP_BATCHES
    batches. Each batch is trimmed to its longest row (``TrainData.rows``), so on real text
    (a mean of ~20 tokens, a few rows of 128) a step computes on far less padding. The draw
    depends only on the generator and the number of rows, so every DDP rank takes as many
    steps."""
    window = batch_size * GROUP_BATCHES
    out: list[torch.Tensor] = []
    for start in range(0, len(rows), window):
        part = rows[start:start + window]
        part = part[torch.argsort(lengths[part], stable=True)]
        out += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    shuffle = torch.randperm(len(out), generator=gen)
    return [out[int(i)] for i in shuffle]


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
    steps: int | None = None
    """Optimizer steps in all (overrides epochs; the rows are cycled, a new order each pass)."""
    hidden_weight: float = 0.0
    """Weight of the hidden-state loss between each student layer and its teacher layer
    (needs the teacher at training time)."""
    relation_weight: float = 0.0
    """Weight of MiniLM v2's attention-relation loss between the last layers (query, key and
    value relations; needs the teacher at training time)."""
    relation_heads: int = 12
    layer_map: tuple[int, ...] | None = None
    """The teacher layer each student layer learns from (hidden-state loss)."""
    precision: str = "fp32"
    """fp32, bf16 (autocast) or fp16 (CUDA autocast + GradScaler): see precision.py."""
    precision_field: str = "precision"
    """The spec field named when the precision cannot run here."""
    freeze_embeddings: bool = False
    """Keep the student's input embeddings (word, position, type, their LayerNorm) as they
    are: only the encoder layers learn (``freeze_embeddings``)."""
    token_noise: float = 0.0
    """Share of each training row's real tokens replaced, afresh at every step, by tokens
    drawn from the training text (``noisy_inputs``; needs the teacher at training time)."""
    hint_channels: tuple[tuple[int, ...], ...] | None = None
    """A width student of a CNN or MLP: per ``hint_layers`` layer, the teacher channels it
    kept. With ``hidden_weight`` > 0 the hidden-state loss is then ``Hints``' loss."""

    @property
    def uses_teacher(self) -> bool:
        return self.hidden_weight > 0 or self.relation_weight > 0 or self.token_noise > 0


def train(module: nn.Module, data: TrainData, cfg: TrainConfig, *, rank: int = 0,
          world: int = 1, params: nn.Module | None = None,
          teacher: nn.Module | None = None,
          on_step: Callable[[int, int, float, nn.Module], None] | None = None
          ) -> list[float]:
    """Train ``module`` (a DDP wrapper when world > 1) to match the teacher.

    Each epoch draws one permutation of the rows from the seed (identical on every rank) and
    gives rank r the rows r, r + world, ...; every rank takes the same number of steps, which
    DDP requires. Returns the mean loss per epoch (per pass over the rows) as this rank saw it.

    With ``teacher`` (needed when ``cfg.uses_teacher``), the teacher runs on each batch: its
    output is the target (``data.targets`` may then be empty) and its hidden states and last
    layer's query/key/value feed the hidden-state and attention-relation losses (for a width
    student of a CNN or MLP, ``cfg.hint_channels``: the ``Hints`` loss instead).

    The module stays in eval mode: we fit a teacher's deterministic function, and dropout only
    slows that down (there is no BatchNorm statistic to learn either).

    ``on_step(step, total, loss, module)`` is called after every optimizer step (progress,
    checkpoints).
    """
    owner = params if params is not None else module
    if cfg.freeze_embeddings:  # under DDP done before wrapping (train_in_group)
        freeze_embeddings(owner)
    trainable = [p for p in owner.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=0.01)
    device = module_device(owner)
    amp = MixedPrecision.create(cfg.precision, device, field_name=cfg.precision_field)
    per_rank = len(data) // world
    if per_rank == 0:
        raise ValueError(f"{len(data)} training rows cannot be split over {world} workers")
    steps_per_epoch = math.ceil(per_rank / cfg.batch_size)
    total = cfg.steps if cfg.steps is not None else steps_per_epoch * cfg.epochs
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
    if cfg.uses_teacher and teacher is None:
        raise ValueError("hidden-state and relation losses need the teacher")
    s_taps = t_taps = None
    pairs: list[tuple[int, int]] = []
    hints = None
    if teacher is not None:
        teacher.eval()
        if cfg.uses_teacher and cfg.hint_channels is not None:
            hints = Hints(inner, teacher, cfg.hint_channels)
        elif cfg.uses_teacher:
            t_width = teacher.backbone.config.hidden_size
            n_student = len(inner.backbone.encoder.layer)
            layer_map = cfg.layer_map or tuple(range(n_student))
            if cfg.hidden_weight > 0 and width == t_width:
                pairs = list(enumerate(layer_map))
            relations = cfg.relation_weight > 0
            s_taps = Taps(inner, [s for s, _ in pairs], relations=relations)
            t_taps = Taps(teacher, sorted({t for _, t in pairs}), relations=relations)
    elif (data.token_targets is not None and cfg.token_weight > 0
            and width == data.token_targets.shape[-1]):
        handle = backbone.register_forward_hook(lambda _m, _a, out: captured.append(out[0]))
    pool = None
    if cfg.token_noise > 0:
        if teacher is None:
            raise ValueError("token noise needs the teacher at training time")
        pool = token_pool(data)
    noise_gen = torch.Generator().manual_seed(cfg.seed + 1 + rank)
    history: list[float] = []
    done = 0
    lengths = data.lengths()
    try:
        while done < total:
            perm = torch.randperm(len(data), generator=gen)
            mine = perm[rank::world][:per_rank]
            order = (length_grouped(mine, lengths, cfg.batch_size, gen) if lengths is not None
                     else [mine[i:i + cfg.batch_size] for i in range(0, per_rank,
                                                                     cfg.batch_size)])
            losses = []
            for idx in order:
                if done >= total:
                    break
                inputs, targets, labels = data.rows(idx)
                if pool is not None:
                    inputs = noisy_inputs(inputs, cfg.token_noise, pool, noise_gen)
                if device.type != "cpu":
                    inputs = {k: v.to(device) for k, v in inputs.items()}
                    targets = targets.to(device)
                    labels = labels.to(device) if labels is not None else None
                mask = inputs.get(ATTENTION_MASK)
                with amp.autocast():
                    if teacher is not None:
                        with torch.no_grad():
                            if t_taps is not None:
                                t_taps.clear()
                            if hints is not None:
                                hints.clear()
                            targets = teacher(**inputs).float()
                    with torch.enable_grad():
                        captured.clear()
                        if s_taps is not None:
                            s_taps.clear()
                        out = module(**inputs)
                        loss = kd_loss(out.float(), targets, labels, task=cfg.task,
                                       temperature=cfg.temperature, alpha=cfg.alpha)
                        if handle is not None and captured:
                            assert mask is not None
                            want = data.tokens(idx, mask.shape[1])
                            assert want is not None
                            want = want.to(device)
                            loss = loss + cfg.token_weight * token_loss(captured[-1], want, mask)
                        if hints is not None:
                            loss = loss + cfg.hidden_weight * hints.loss()
                        if s_taps is not None and t_taps is not None:
                            assert mask is not None
                            if pairs:
                                hid = sum(hidden_loss(s_taps.hidden[s], t_taps.hidden[t], mask)
                                          for s, t in pairs) / len(pairs)
                                loss = loss + cfg.hidden_weight * hid
                            if cfg.relation_weight > 0:
                                rel = sum(relation_loss(s_taps.qkv[k], t_taps.qkv[k], mask,
                                                        cfg.relation_heads)
                                          for k in ("query", "key", "value")) / 3
                                loss = loss + cfg.relation_weight * rel
                with torch.enable_grad():
                    took = amp.step(loss, opt)
                if took:  # a step fp16's loss scaler skipped does not advance the schedule
                    sched.step()
                done += 1
                losses.append(float(loss.detach()))
                if on_step is not None:
                    on_step(done, total, losses[-1], inner)
            if losses:
                history.append(sum(losses) / len(losses))
    finally:
        if handle is not None:
            handle.remove()
        for taps in (s_taps, t_taps):
            if taps is not None:
                taps.remove()
        if hints is not None:
            hints.remove()
    return history
