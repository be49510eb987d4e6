"""The real MiniLM path: package:// model, spec data, padding-free export, three candidates,
gate.

Small on purpose (48 rows of the example sentences, a short benchmark) so it runs in about a
minute on 2 cores; bench/compression.py runs the full spec.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from leanserve.api.load import load_one
from leanserve.compression.benchmark import BenchSettings
from leanserve.compression.pipeline import Settings, compress

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_minilm_compresses_and_gates(tmp_path: Path) -> None:
    doc = yaml.safe_load((ROOT / "examples" / "minilm-cpu.yaml").read_text())
    lines = (ROOT / "examples" / "data" / "sentences.jsonl").read_text().splitlines()[::8]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    doc["spec"]["data"]["uri"] = "data.jsonl"
    # examples/minilm-cluster.yaml's pruned-int8 as it stands (prune with a least-squares refit,
    # then int8): its only real-MiniLM run; tests/cluster/test_operator_e2e.py's Job compresses
    # that example's int8 candidate alone
    cluster = yaml.safe_load((ROOT / "examples" / "minilm-cluster.yaml").read_text())
    (pruned_int8,) = [c for c in cluster["spec"]["compression"]["candidates"]
                      if c["name"] == "pruned-int8"]
    doc["spec"]["compression"]["candidates"] = [
        {"name": "int8", "steps": [{"quantize": {"method": "int8-dynamic", "perChannel": True,
                                                 "embeddingBits": 4}}]},
        {"name": "low-rank", "steps": [{"lowRank": {"rankRatio": 0.05}}]},
        pruned_int8,
    ]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(doc))
    settings = Settings(bench=BenchSettings(warmup=1, iterations_b1=5, iterations_bn=2, rounds=2))
    report = compress(load_one(tmp_path / "spec.yaml"), tmp_path / "out", settings=settings)

    assert json.loads((tmp_path / "out" / "report.json").read_text())["selected"] in (
        "int8", "pruned-int8")
    assert report["baseline"]["notes"]["graph"].startswith("padding-free")
    by = {c["name"]: c for c in report["candidates"]}
    int8 = by["int8"]
    # per-channel dynamic int8 keeps MiniLM's embeddings within the 0.01 cosine gate
    assert int8["error"] is None and int8["passed"] and int8["quality"] >= 0.99
    assert int8["notes"]["graph"].startswith("padding-free")
    # int8 layers and a 4-bit vocabulary table: under a fifth of the fp32 file
    assert int8["size_bytes"] < 0.21 * report["baseline"]["size_bytes"]
    assert int8["notes"]["embedding_tables_4bit"] == 1
    # 96 of 1536 FFN neurons per layer removed, the next layer refit by least squares, then
    # the same int8 as above
    pruned = by["pruned-int8"]
    assert pruned["error"] is None and pruned["notes"]["reconstructed"]
    assert pruned["notes"]["kept_neurons_per_layer"] == [1440] * 6
    assert pruned["notes"]["quantize"] == "int8-dynamic"
    assert pruned["notes"]["embedding_tables_4bit"] == 1
    assert pruned["size_bytes"] < 0.21 * report["baseline"]["size_bytes"]
    assert pruned["quality"] >= 0.98
    # 5% of the rank destroys the embeddings: the gate must catch it
    low = by["low-rank"]
    assert low["error"] is None and not low["passed"] and low["quality_drop"] > 0.01
    repo = tmp_path / "out" / "model_repository"
    if "model_repository_error" not in report:
        assert (repo / "minilm" / "config.pbtxt").exists()
    assert (tmp_path / "out" / "artifacts" / "int8" / "tokenizer" / "tokenizer.json").exists()
