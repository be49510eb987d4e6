"""Tiny models and specs for the compression tests (no test here: builders only).

A 2-layer BERT with random weights and a 60-word tokenizer saved as a real Hugging Face
directory (safetensors), a small TorchScript CNN with npz images, and a spec pointing at them,
so the tests go through the same loading, export and ORT paths as MiniLM, in seconds.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from leanserve.api.load import LoadedSpec, load_one
from leanserve.compression.benchmark import BenchSettings
from leanserve.compression.modules import ImageClassifier
from leanserve.compression.pipeline import Settings
from leanserve.compression.registry import Batch

WORDS = (
    "the", "a", "cat", "dog", "runs", "fast", "slow", "model", "server", "cluster", "node",
    "pod", "deploy", "scale", "cost", "price", "latency", "quality", "small", "large", "red",
    "blue", "green", "yellow", "book", "reads", "writes", "data", "table", "chair", "sun",
    "moon", "star", "river", "lake", "hill", "road", "car", "train", "plane", "ship", "city",
    "town", "house", "tree", "leaf", "water", "fire", "earth", "wind", "music", "song",
    "dance", "paint", "code", "test", "bug", "fix"
)

FAST = Settings(bench=BenchSettings(warmup=1, iterations_b1=3, iterations_bn=2, rounds=2,
                                    min_round_s=0.005), batch_size=8)
"""Pipeline settings for tests: a real benchmark, a few iterations."""


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def tiny_hf_dir(root: Path, *, classifier: bool = False, seed: int = 0) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    d = root / ("tiny-bert-cls" if classifier else "tiny-bert")
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                            *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(str(d))
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                     num_labels=3)
    model = BertForSequenceClassification(cfg) if classifier else BertModel(cfg)
    model.save_pretrained(str(d))
    return d


def write_jsonl(path: Path, n: int, *, labels: bool = True) -> Path:
    rows = [{"text": t, **({"label": i % 3} if labels else {})}
            for i, t in enumerate(sentences(n))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                                      nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(),
                                        nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def tiny_cnn_files(root: Path, n: int = 64) -> tuple[Path, Path]:
    """A TorchScript CNN and npz data labelled by the CNN itself (baseline accuracy 1.0)."""
    torch.manual_seed(0)
    net = TinyCNN().eval()
    model_path = root / "cnn.pt"
    torch.jit.save(torch.jit.script(net), str(model_path))
    x = torch.rand(n, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = net(x[:, None]).argmax(1)
    data = root / "digits.npz"
    np.savez(data, x=x.numpy(), y=y.numpy())
    return model_path, data


Digits = tuple[list[Batch], list[Batch], ImageClassifier]


@functools.cache
def digits_cnn() -> Digits:
    """scikit-learn's 8x8 digits (train 70%, held out 30%, batches of 64) and a narrower copy
    of the examples' CNN trained on the training rows for a few epochs (seconds; made once per
    session, shared by the test files that use it: they must not change it)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32)[:, None])
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = int(len(x) * 0.7)
    parts = [[Batch(inputs={"pixel_values": x[idx[i:i + 64]]}, labels=y[idx[i:i + 64]])
              for i in range(0, len(idx), 64)] for idx in (perm[:cut], perm[cut:])]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(6):
        for b in parts[0]:
            opt.zero_grad()
            nn.functional.cross_entropy(net(b.inputs["pixel_values"]), b.labels).backward()
            opt.step()
    return parts[0], parts[1], ImageClassifier(net.eval()).eval()


def accuracy(module: nn.Module, held: list[Batch]) -> float:
    """Top-1 accuracy of an image classifier on labelled batches (on the CPU)."""
    with torch.no_grad():
        right = sum(int((module(**b.inputs).argmax(1) == b.labels).sum()) for b in held)
    return right / sum(len(b.labels) for b in held)


def spec_dict(model_uri: str, data_uri: str, candidates: list[dict[str, Any]], *,
              fmt: str = "huggingface", task: str = "feature-extraction",
              metric: str = "cosine", max_drop: float = 0.05) -> dict[str, Any]:
    return {
        "apiVersion": "leanserve.io/v1alpha1", "kind": "CompressedModel",
        "metadata": {"name": "tiny"},
        "spec": {
            "model": {"uri": model_uri, "format": fmt, "task": task, "maxSequenceLength": 32},
            "data": {"uri": data_uri, "evalFraction": 0.25},
            "compression": {"candidates": candidates},
            "quality": {"metric": metric, "maxDrop": max_drop},
            "serving": {"maxBatchSize": 8},
            "nodePools": [{"name": "cpu", "hourlyPrice": 0.1}],
            "slo": {"latencyP95Ms": 100},
        },
    }


def write_spec(root: Path, doc: dict[str, Any]) -> LoadedSpec:
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_one(path)


def q(method: str, **extra: Any) -> dict[str, Any]:
    return {"quantize": {"method": method, **extra}}
