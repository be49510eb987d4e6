"""Loading the model and the data a spec names, with errors that name the spec field.

Why one module: every path the compression pipeline reads from the user (spec.model.uri,
spec.data.uri) goes through the same URI rules (DESIGN.md section 2: file://, package://,
pvc://, s3://, relative to the spec file, never `..`) and the same refusal to unpickle: Hugging
Face weights load from safetensors only, TorchScript through ``torch.jit.load`` (a TorchScript
archive, not a pickle of Python objects) and npz with ``allow_pickle=False``.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torch import nn

from leanserve.api.spec import ModelFormat, Task
from leanserve.compression.modules import ImageClassifier, TextEncoder
from leanserve.compression.registry import Batch, CompressionError

MODEL_URI = "spec.model.uri"
MODEL_FORMAT = "spec.model.format"
DATA_URI = "spec.data.uri"

PVC_ROOT_ENV = "LEANSERVE_PVC_ROOT"
"""Where pvc:// claims are mounted (the Job mounts CLAIM at $LEANSERVE_PVC_ROOT/CLAIM)."""
S3_ROOT_ENV = "LEANSERVE_S3_ROOT"
"""Where s3:// buckets were synced to by the Job's init container ($LEANSERVE_S3_ROOT/BUCKET)."""


TRAIN_SPLIT = "train"
"""A jsonl row with ``"split": "train"`` is used for training and calibration, never held out."""
VALIDATION_SPLIT = "validation"
"""A jsonl row with ``"split": "validation"`` is always a validation row (gates quality, chooses
settings), never trained or calibrated on."""
TEST_SPLIT = "test"
"""A jsonl row with ``"split": "test"`` is always a test row (reported only), never trained or
calibrated on."""
SPLITS = (TRAIN_SPLIT, VALIDATION_SPLIT, TEST_SPLIT)
"""The values of a jsonl row's ``"split"`` key; a row without the key is divided by
spec.data.evalFraction."""


class LoadError(CompressionError):
    """The model or the data named by the spec cannot be read; the message names the field."""


# --------------------------------------------------------------------------------------------
# URIs


def resolve_uri(uri: str, base_dir: Path | None, field_name: str) -> Path:
    """A local path for a spec URI; raises LoadError naming ``field_name``."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        scheme, rest = "", uri
    if ".." in PurePosixPath(rest).parts:
        raise LoadError(f"{field_name}: {uri!r} contains a '..' segment (not allowed; "
                        "use a path without '..')")
    if scheme == "file":
        if not rest.startswith("/"):
            raise LoadError(f"{field_name}: {uri!r} must be file:///absolute/path")
        return Path(rest)
    if scheme == "package":
        pkg, _, sub = rest.partition("/")
        try:
            root = importlib.resources.files(pkg)
        except (ModuleNotFoundError, TypeError):
            raise LoadError(f"{field_name}: package {pkg!r} of {uri!r} is not installed "
                            f"(pip install it, or use a file:// path)") from None
        return Path(str(root.joinpath(sub))) if sub else Path(str(root))
    if scheme in ("pvc", "s3"):
        env = PVC_ROOT_ENV if scheme == "pvc" else S3_ROOT_ENV
        mount = os.environ.get(env)
        if not mount:
            raise LoadError(f"{field_name}: {uri!r} is only readable in the cluster, where the "
                            f"Job mounts it (set {env} to a local mount, or use file://)")
        return Path(mount) / rest
    if scheme:
        raise LoadError(f"{field_name}: unknown scheme {scheme!r} in {uri!r} (allowed: file://, "
                        "package://, pvc://, s3://, or a path relative to the spec file)")
    path = Path(rest)
    if path.is_absolute():
        return path
    if base_dir is None:
        raise LoadError(f"{field_name}: relative path {uri!r} needs the spec file's directory; "
                        "use file:///absolute/path")
    return base_dir / path


def _existing(uri: str, base_dir: Path | None, field_name: str) -> Path:
    path = resolve_uri(uri, base_dir, field_name)
    if not path.exists():
        raise LoadError(f"{field_name}: {uri!r} does not exist (looked at {path})")
    return path


# --------------------------------------------------------------------------------------------
# models


@dataclass
class LoadedModel:
    """The uncompressed model as the pipeline needs it."""

    task: Task
    module: nn.Module | None = None
    """Torch module taking the DESIGN.md section 4 inputs by keyword (None for onnx input)."""
    onnx_path: Path | None = None
    """The given ONNX file (format onnx only)."""
    tokenizer: Any = None
    tokenizer_dir: Path | None = None
    num_labels: int | None = None
    bert: tuple[int, int] | None = None
    """(num_heads, hidden_size) when the model is BERT-like: enables ORT's transformer fusions."""
    source: Path = field(default_factory=Path)


def detect_format(path: Path) -> ModelFormat | None:
    """What the files at ``path`` look like (None when none of the formats)."""
    if path.is_dir():
        if (path / "config.json").exists():
            return ModelFormat.HUGGINGFACE
        if (path / "model.onnx").exists():
            return ModelFormat.ONNX
        return None
    if zipfile.is_zipfile(path):
        return ModelFormat.TORCHSCRIPT
    if path.suffix == ".onnx":
        return ModelFormat.ONNX
    return None


def load_model(uri: str, fmt: ModelFormat, task: Task, base_dir: Path | None) -> LoadedModel:
    path = _existing(uri, base_dir, MODEL_URI)
    found = detect_format(path)
    if found is not fmt:
        hint = f"; the files look like {found.value}" if found else ""
        raise LoadError(f"{MODEL_FORMAT}: {fmt.value} does not match {uri!r}{hint} "
                        f"({_expects(fmt)})")
    if fmt is ModelFormat.HUGGINGFACE:
        return _load_huggingface(path, task)
    if fmt is ModelFormat.ONNX:
        onnx_file = path / "model.onnx" if path.is_dir() else path
        tok_dir = path if path.is_dir() and (path / "tokenizer_config.json").exists() else None
        return LoadedModel(task=task, onnx_path=onnx_file, tokenizer_dir=tok_dir,
                           tokenizer=_tokenizer(tok_dir) if tok_dir else None, source=path)
    return _load_torchscript(path, task)


def _expects(fmt: ModelFormat) -> str:
    return {
        ModelFormat.HUGGINGFACE: "huggingface expects a directory with config.json and "
                                 "model.safetensors",
        ModelFormat.ONNX: "onnx expects a .onnx file or a directory with model.onnx",
        ModelFormat.TORCHSCRIPT: "torchscript expects a file saved by torch.jit.save",
    }[fmt]


def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise LoadError(f"{MODEL_URI}: no usable tokenizer in {path} ({exc})".splitlines()[0]
                        ) from None


def _load_huggingface(path: Path, task: Task) -> LoadedModel:
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    if not task.is_text:
        raise LoadError(f"spec.model.task: {task.value} with format huggingface is not "
                        "supported (allowed: feature-extraction, text-classification; export "
                        "image models as torchscript)")
    if not list(path.glob("*.safetensors")):
        raise LoadError(f"{MODEL_URI}: {path} has no *.safetensors weights (leanserve never "
                        "unpickles .bin files; convert them with safetensors)")
    config = AutoConfig.from_pretrained(str(path))
    # eager attention exports to the MatMul/Softmax pattern ONNX Runtime's BERT fusions match.
    kwargs: dict[str, Any] = {"use_safetensors": True, "attn_implementation": "eager"}
    if task is Task.FEATURE_EXTRACTION:
        backbone = AutoModel.from_pretrained(str(path), **kwargs)
        pooling, normalize = _sentence_transformers_head(path)
        module: nn.Module = TextEncoder(backbone, pooling=pooling, normalize=normalize)
        num_labels = None
    else:
        full = AutoModelForSequenceClassification.from_pretrained(str(path), **kwargs)
        module = _classifier_as_text_encoder(full, path)
        num_labels = int(full.config.num_labels)
    bert = None
    if getattr(config, "model_type", "") in ("bert", "roberta", "xlm-roberta", "distilbert"):
        bert = (int(config.num_attention_heads), int(config.hidden_size))
    return LoadedModel(task=task, module=module.eval(), tokenizer=_tokenizer(path),
                       tokenizer_dir=path, num_labels=num_labels, bert=bert, source=path)


def _sentence_transformers_head(path: Path) -> tuple[str, bool]:
    """Pooling mode and normalization from a sentence-transformers directory (mean + L2 when
    the directory carries no such files, as all-MiniLM and most embedding models do)."""
    pooling, normalize = "mean", True
    modules = path / "modules.json"
    if modules.exists():
        entries = json.loads(modules.read_text())
        normalize = any("Normalize" in e.get("type", "") for e in entries)
        for e in entries:
            if "Pooling" in e.get("type", ""):
                cfg = path / e.get("path", "") / "config.json"
                if cfg.exists() and json.loads(cfg.read_text()).get("pooling_mode_cls_token"):
                    pooling = "cls"
    return pooling, normalize


def _classifier_as_text_encoder(full: nn.Module, path: Path) -> TextEncoder:
    """A BERT-style sequence classifier as TextEncoder(cls pooling, head=pooler+classifier),
    which computes the same logits and exposes the backbone to the techniques."""
    base = getattr(full, "base_model", None)
    pooler = getattr(base, "pooler", None)
    classifier = getattr(full, "classifier", None)
    if base is None or pooler is None or not isinstance(classifier, nn.Linear):
        raise LoadError(f"{MODEL_URI}: {path}: text-classification supports BERT-style models "
                        "(a pooler and a linear classifier)")
    head = nn.Sequential(pooler.dense, nn.Tanh(), classifier)
    base.pooler = None
    return TextEncoder(base, pooling="cls", normalize=False, head=head)


class _ScriptedText(nn.Module):
    """A TorchScript text model called by keyword like every other module."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids, attention_mask)


def _load_torchscript(path: Path, task: Task) -> LoadedModel:
    try:
        net = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        raise LoadError(f"{MODEL_FORMAT}: torchscript cannot load {path} "
                        f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                        ) from None
    module: nn.Module = _ScriptedText(net) if task.is_text else ImageClassifier(net)
    tok_dir = path.parent if (path.parent / "tokenizer_config.json").exists() else None
    if task.is_text and tok_dir is None:
        raise LoadError(f"{MODEL_URI}: a torchscript text model needs its tokenizer files "
                        f"beside it (tokenizer_config.json in {path.parent})")
    return LoadedModel(task=task, module=module.eval(), tokenizer_dir=tok_dir,
                       tokenizer=_tokenizer(tok_dir) if tok_dir else None, source=path)


# --------------------------------------------------------------------------------------------
# data


@dataclass
class Rows:
    """The spec's data: texts (text tasks) or an array of images, with optional labels."""

    texts: list[str] | None = None
    x: np.ndarray | None = None
    labels: np.ndarray | None = None
    marks: np.ndarray | None = None
    """Per row, the jsonl ``"split"`` value ("train", "validation" or "test"), or "" for a row
    without one (divided by evalFraction); None when no row is marked."""

    @property
    def train_only(self) -> np.ndarray | None:
        """Bool per row: True for rows marked ``"split": "train"`` (never held out); None when
        no row is marked."""
        return None if self.marks is None else self.marks == TRAIN_SPLIT

    def __len__(self) -> int:
        return len(self.texts) if self.texts is not None else (
            0 if self.x is None else int(self.x.shape[0]))

    def take(self, idx: np.ndarray) -> Rows:
        return Rows(
            texts=[self.texts[i] for i in idx] if self.texts is not None else None,
            x=self.x[idx] if self.x is not None else None,
            labels=self.labels[idx] if self.labels is not None else None,
            marks=self.marks[idx] if self.marks is not None else None,
        )


def load_data(uri: str, task: Task, base_dir: Path | None) -> Rows:
    path = _existing(uri, base_dir, DATA_URI)
    if path.is_dir():
        raise LoadError(f"{DATA_URI}: {uri!r} is a directory (allowed: a .jsonl or .npz file)")
    if path.suffix == ".npz":
        rows = _load_npz(path, uri)
    elif path.suffix in (".jsonl", ".json"):
        rows = _load_jsonl(path, uri, task)
    else:
        raise LoadError(f"{DATA_URI}: {uri!r} is neither .jsonl nor .npz (allowed: jsonl with "
                        "{\"text\", \"label\"} rows, npz with x and y)")
    if len(rows) == 0:
        raise LoadError(f"{DATA_URI}: {uri!r} has no rows (add at least 2 rows)")
    if task.is_text and rows.texts is None:
        raise LoadError(f"{DATA_URI}: {task.value} needs text rows (jsonl), got {uri!r}")
    if not task.is_text and rows.x is None:
        raise LoadError(f"{DATA_URI}: {task.value} needs images (npz with x), got {uri!r}")
    return rows


def _load_jsonl(path: Path, uri: str, task: Task | None = None) -> Rows:
    texts: list[str] = []
    labels: list[int] = []
    marks: list[str] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise LoadError(f"{DATA_URI}: {uri!r} line {n} is not JSON") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise LoadError(f"{DATA_URI}: {uri!r} line {n} has no \"text\" string")
        split_name = obj.get("split")
        if split_name is not None and split_name not in SPLITS:
            raise LoadError(f"{DATA_URI}: {uri!r} line {n}: \"split\" is {split_name!r} "
                            f"(allowed: \"{TRAIN_SPLIT}\" for training-only rows, "
                            f"\"{VALIDATION_SPLIT}\" or \"{TEST_SPLIT}\" for rows always held "
                            "out, or no key to let evalFraction divide them)")
        marks.append(split_name or "")
        texts.append(obj["text"])
        if "label" in obj:
            labels.append(int(obj["label"]))
    if labels and len(labels) != len(texts) and task is Task.FEATURE_EXTRACTION:
        labels = []  # an embedding model learns and is judged without labels: mixed is fine
    if labels and len(labels) != len(texts):
        raise LoadError(f"{DATA_URI}: {uri!r}: some rows have a label and some do not")
    return Rows(texts=texts, labels=np.asarray(labels, dtype=np.int64) if labels else None,
                marks=np.asarray(marks, dtype=object) if any(marks) else None)


def _load_npz(path: Path, uri: str) -> Rows:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z:
                raise LoadError(f"{DATA_URI}: {uri!r} has no array 'x' (allowed: x, y)")
            x = np.asarray(z["x"], dtype=np.float32)
            y = np.asarray(z["y"], dtype=np.int64) if "y" in z else None
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise LoadError(f"{DATA_URI}: {uri!r} is not a readable npz ({exc})") from None
    if x.ndim == 3:  # [N, H, W] grayscale: add the channel axis the models take
        x = x[:, None]
    if y is not None and y.shape[0] != x.shape[0]:
        raise LoadError(f"{DATA_URI}: {uri!r}: x has {x.shape[0]} rows but y {y.shape[0]}")
    return Rows(x=x, labels=y)


def split(rows: Rows, eval_fraction: float, seed: int) -> tuple[Rows, Rows]:
    """(train, held out), deterministic for a seed; each part gets at least one row.

    Rows marked ``"split": "train"`` always train, rows marked ``"validation"`` or ``"test"``
    are always held out; ``eval_fraction`` of the *unmarked* rows is held out, drawn exactly as
    if the marked rows were not in the file (so adding marked rows never changes which unmarked
    rows evaluate quality). A training row whose text (compared case- and space-insensitively)
    is also a held-out row's is dropped when either of the two is marked: no model may train on
    a sentence its quality is judged on.
    """
    train, held, _ = _divide(rows, eval_fraction, seed)
    return rows.take(train), rows.take(held)


def _divide(rows: Rows, eval_fraction: float, seed: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, held out, the unmarked held-out rows) as sorted row indices (see ``split``)."""
    marks = rows.marks if rows.marks is not None else np.full(len(rows), "", dtype=object)
    pool = np.flatnonzero(marks == "")
    fixed_held = np.flatnonzero((marks == VALIDATION_SPLIT) | (marks == TEST_SPLIT))
    n = len(pool)
    if n < 2 and not len(fixed_held):
        raise LoadError(f"{DATA_URI}: has {n} row(s) that may be held out; at least 2 are "
                        "needed (train and eval), or rows marked \"split\": \"validation\" "
                        "and \"test\"")
    perm = np.random.default_rng(seed).permutation(n)
    # with no marked held-out rows, one unmarked row always trains (as it always did)
    n_eval = 0 if n < 2 else min(n - 1, max(1, round(n * eval_fraction)))
    drawn = np.sort(pool[perm[:n_eval]])
    held = np.sort(np.concatenate([drawn, fixed_held]))
    train = np.sort(np.concatenate([pool[perm[n_eval:]], np.flatnonzero(marks == TRAIN_SPLIT)]))
    if rows.texts is not None and rows.marks is not None and len(train):
        every = {_norm(rows.texts[i]) for i in held}
        fixed = {_norm(rows.texts[i]) for i in fixed_held}
        train = np.asarray([i for i in train if _norm(rows.texts[i]) not in
                            (every if marks[i] == TRAIN_SPLIT else fixed)], dtype=np.int64)
    if not len(train):
        raise LoadError(f"{DATA_URI}: no row is left to train on (every row is held out or "
                        "repeats a held-out one): add rows, or mark some \"split\": \"train\"")
    return train, held, drawn


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def split3(rows: Rows, eval_fraction: float, seed: int) -> tuple[Rows, Rows, Rows]:
    """(train, validation, test), deterministic for a seed. The unmarked held-out rows of
    ``split`` are halved at random (the larger half to validation); rows marked
    ``"split": "validation"`` or ``"test"`` join their split. Validation chooses settings and
    gates quality; test is reported and never decides anything. Their union is ``split``'s
    held-out set, so adding training-only text moves neither, and adding marked held-out rows
    moves no unmarked one."""
    train, _held, drawn = _divide(rows, eval_fraction, seed)
    marks = rows.marks if rows.marks is not None else np.full(len(rows), "", dtype=object)
    perm = np.random.default_rng(seed + 1).permutation(len(drawn))
    half = (len(drawn) + 1) // 2
    val = np.sort(np.concatenate([drawn[np.sort(perm[:half])],
                                  np.flatnonzero(marks == VALIDATION_SPLIT)]))
    test = np.sort(np.concatenate([drawn[np.sort(perm[half:])],
                                   np.flatnonzero(marks == TEST_SPLIT)]))
    if not len(val) or not len(test):
        raise LoadError(f"{DATA_URI}: {len(val)} validation and {len(test)} test row(s); at "
                        "least 1 of each is needed: add rows, raise spec.data.evalFraction, or "
                        "mark rows \"split\": \"validation\" / \"test\"")
    return rows.take(train), rows.take(val), rows.take(test)


def long_rows(rows: Rows, *, tokenizer: Any, max_length: int) -> Rows:
    """Texts of at least 90% of ``max_length`` tokens, each made of consecutive held-out
    sentences joined (real text, no padding; a small split is cycled through), for the quality
    figure on long inputs: one per ``max_length`` tokens the rows hold, at least one. Empty for
    image rows."""
    if rows.texts is None or not rows.texts:
        return Rows(texts=[])
    lengths = [max(1, len(ids)) for ids in
               tokenizer(rows.texts, add_special_tokens=False)["input_ids"]]
    budget = max_length - 2  # [CLS] and [SEP]
    wanted = max(1, sum(lengths) // budget)
    out: list[str] = []
    i = 0
    while len(out) < wanted:
        current, used = [], 0
        while used < budget * 0.9:
            current.append(rows.texts[i % len(rows.texts)])
            used += lengths[i % len(lengths)]
            i += 1
        out.append(" ".join(current))
    return Rows(texts=out)


def batches(rows: Rows, *, tokenizer: Any, max_length: int, batch_size: int = 32
            ) -> list[Batch]:
    """Model-ready batches (padding to the longest row of each batch)."""
    out = []
    for start in range(0, len(rows), batch_size):
        part = rows.take(np.arange(start, min(start + batch_size, len(rows))))
        labels = torch.from_numpy(part.labels) if part.labels is not None else None
        if part.texts is not None:
            enc = tokenizer(part.texts, padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            inputs = {k: enc[k].to(torch.int64) for k in ("input_ids", "attention_mask")}
        else:
            assert part.x is not None
            inputs = {"pixel_values": torch.from_numpy(part.x)}
        out.append(Batch(inputs=inputs, labels=labels))
    return out
