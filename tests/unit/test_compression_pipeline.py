"""compress() end to end on tiny models: report schema, failure isolation, gate, selection,
files written (and nothing half-written), bad inputs named by field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_compression_fixtures import (
    FAST,
    q,
    spec_dict,
    tiny_cnn_files,
    tiny_hf_dir,
    write_jsonl,
    write_spec,
)

from leanserve.api.spec import QualityMetric
from leanserve.compression.evaluate import Gate, mean_cosine, score
from leanserve.compression.pipeline import EventKind, compress, select
from leanserve.compression.registry import CompressionError

CANDIDATE_KEYS = {"name", "steps", "size_bytes", "quality", "quality_drop", "latency_ms",
                  "throughput_rps", "speedup", "passed", "artifact", "error"}


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("pipe")
    tiny_hf_dir(root)
    write_jsonl(root / "data.jsonl", 40)
    doc = spec_dict("tiny-bert", "data.jsonl", [
        {"name": "int8", "steps": [q("int8-dynamic", perChannel=True)]},
        # an ONNX step followed by a torch step: refused, recorded, the others go on
        {"name": "bad-order", "steps": [q("fp16"), q("binary")]},
        {"name": "fp16", "steps": [q("fp16")]},
        {"name": "binary", "steps": [q("binary")]},
        {"name": "qat", "steps": [q("qat", trainSteps=4, perChannel=True)]},
    ], max_drop=0.05)
    loaded = write_spec(root, doc)
    events = []
    out = root / "out"
    report = compress(loaded, out, progress=events.append, settings=FAST)
    return report, out, events


def test_report_schema(text_run) -> None:
    report, out, _ = text_run
    assert json.loads((out / "report.json").read_text()) == report
    assert report["metric"] == "cosine"
    base = report["baseline"]
    assert {"size_bytes", "quality", "latency_ms", "throughput_rps"} <= set(base)
    assert set(base["latency_ms"]) == {"p50", "p95"} and base["quality"] == pytest.approx(1.0)
    assert next(c["name"] for c in report["candidates"]) == report["selected"]
    for c in report["candidates"]:
        assert set(c) >= CANDIDATE_KEYS
    # every model that built was timed in the same interleaved rounds; the report says how
    timing = base["timing"]
    assert timing["rounds"] == FAST.bench.rounds and "interleaved" in timing["order"]
    for c in [base, *(c for c in report["candidates"] if c["error"] is None)]:
        assert c["bench_calls"] >= timing["calls_batch"] >= FAST.bench.iterations_bn


def test_failure_is_recorded_and_others_go_on(text_run) -> None:
    report, out, _ = text_run
    by = {c["name"]: c for c in report["candidates"]}
    bad = by["bad-order"]
    assert bad["passed"] is False and bad["artifact"] is None
    assert "spec.compression.candidates[1].steps[1].quantize" in bad["error"]
    assert "earlier step already produced the ONNX graph" in bad["error"]
    # qat: fine-tuned in torch, exported by the pipeline (padding-free), served as int8
    assert by["qat"]["notes"]["qat_steps"] == 4
    assert by["qat"]["notes"]["graph"].startswith("padding-free")
    for name in ("int8", "fp16", "binary", "qat"):
        assert by[name]["error"] is None
        assert (out / by[name]["artifact"]).exists()
        assert (out / "artifacts" / name / "tokenizer" / "tokenizer_config.json").exists()
    assert not (out / "artifacts" / "bad-order").exists()


def test_gate_and_selection(text_run) -> None:
    report, out, _ = text_run
    by = {c["name"]: c for c in report["candidates"]}
    for c in by.values():
        if c["error"] is None:
            assert c["quality_drop"] == pytest.approx(1.0 - c["quality"])
            assert c["passed"] == (c["quality_drop"] <= 0.05 + 1e-9)
            assert c["speedup"] == pytest.approx(
                c["throughput_rps"] / report["baseline"]["throughput_rps"])
    # binary weights on a random tiny BERT cannot hold 0.95 cosine
    assert by["binary"]["passed"] is False
    # size_bytes is the served file; binary weights are served packed (decoded at load), so it
    # is near the separately reported packed size, far below the fp32 file
    assert by["binary"]["size_bytes"] == (out / by["binary"]["artifact"]).stat().st_size
    assert by["binary"]["notes"]["served_packed"] >= 1
    assert by["binary"]["size_bytes"] < report["baseline"]["size_bytes"] / 2
    assert by["int8"]["packed_size_bytes"] is None
    assert report["selected"] == select(report["candidates"])
    assert by[report["selected"]]["passed"]


def test_validation_gates_and_test_and_long_inputs_are_reported(text_run) -> None:
    report, _, _ = text_run
    base = report["baseline"]
    # 40 rows, a quarter held out: 5 validation rows gate, 5 test rows are only reported
    assert base["test"]["rows"] == 5 and base["test"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert base["long_inputs"]["rows"] >= 1
    for c in report["candidates"]:
        if c["error"] is not None:
            continue
        assert c["validation"]["rows"] == 5
        assert c["validation"]["mean"] == pytest.approx(c["quality"])
        for split in ("validation", "test", "long_inputs"):
            fig = c[split]
            assert fig["worst"] <= fig["p5"] <= fig["mean"] <= 1.0 + 1e-6


def test_each_candidate_says_what_it_cost_saves_and_holds_in_memory(text_run) -> None:
    report, _, _ = text_run
    base_rps = report["baseline"]["throughput_rps"]
    assert report["baseline"]["peak_rss_bytes"] > report["baseline"]["size_bytes"]
    for c in report["candidates"]:
        cost = c["cost"]
        assert cost["cpu_seconds"] > 0 and cost["pool"] == "cpu"
        # no GPU trained anything here: no GPU time, and none priced
        assert cost["gpu_seconds"] is None and cost["gpu_pool"] is None
        # the spec's one pool: $0.10 an hour, no cpu request, so one core
        assert cost["usd"] == pytest.approx(cost["cpu_seconds"] / 3600 * 0.1, rel=0.01)
        if c["error"] is not None:
            assert cost["serving"] is None and "peak_rss_bytes" not in c
            continue
        assert c["peak_rss_bytes"] > c["size_bytes"]
        serving = cost["serving"]
        assert serving["usd_per_million_baseline"] == pytest.approx(
            0.1 * 2 / (base_rps * 3600) * 1e6)
        assert serving["saving_per_million"] == pytest.approx(
            serving["usd_per_million_baseline"] - serving["usd_per_million"])
        if serving["saving_per_million"] > 0:
            # the saving on that many requests covers the compression cost, one fewer does not
            n = cost["payback_requests"]
            assert n * serving["saving_per_million"] / 1e6 >= cost["usd"]
            assert (n - 1) * serving["saving_per_million"] / 1e6 < cost["usd"]
        else:
            assert cost["payback_requests"] is None


def test_the_table_shows_the_test_split_and_packed_sizes(text_run) -> None:
    from rich.console import Console

    from leanserve.compression.commands import report_table

    report, _, _ = text_run
    console = Console(width=250, record=True)
    console.print(report_table(report))
    text = console.export_text()
    assert "test mean/p5/worst" in text
    by = {c["name"]: c for c in report["candidates"]}
    assert f"{by['int8']['test']['mean']:.4f} /" in text
    packed = by["binary"]["packed_size_bytes"]
    assert f"(packed {packed / 1e3:.1f} kB)" in text or f"(packed {packed / 1e6:.1f} MB)" in text
    # every candidate's name whole, also in an ordinary 100-column terminal
    narrow = Console(width=100, record=True)
    narrow.print(report_table(report))
    shown = narrow.export_text()
    assert max(map(len, shown.splitlines())) <= 100
    for c in report["candidates"]:
        assert any(line.startswith(f"│ {c['name']} ") for line in shown.splitlines()), c["name"]
        assert c["quality"] is None or f"{c['quality']:.4f}" in shown
    assert f"{by['int8']['cost']['cpu_seconds']:.0f} cpu-s" in text
    payback = by["int8"]["cost"]["payback_requests"]
    assert (f"{payback:,} requests" if payback else "never (saves nothing)") in text
    # one serving instance's peak memory next to the served file's size
    assert "peak RSS MB" in text and f"{by['int8']['peak_rss_bytes'] / 1e6:.0f}" in text
    # how the speeds were measured: how many calls, interleaved
    timing = report["baseline"]["timing"]
    assert f"speed: {timing['calls_batch']}+ calls per model at batch" in text
    assert f"{timing['rounds']} interleaved rounds" in text


def test_files_and_no_staging_left(text_run) -> None:
    report, out, events = text_run
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "artifacts", "baseline", "pareto.png"} <= names
    assert not [n for n in names if n.startswith(".staging")]
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    if "model_repository_error" not in report:
        assert (out / "model_repository" / "tiny" / "config.pbtxt").exists()
    kinds = [e.kind for e in events]
    assert kinds[0] is EventKind.BASELINE and kinds[-1] is EventKind.DONE
    assert kinds.count(EventKind.CANDIDATE_DONE) == 5


def test_missing_model_fails_run_and_leaves_no_result(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.jsonl", 10)
    loaded = write_spec(tmp_path, spec_dict("nowhere", "data.jsonl",
                                            [{"name": "a", "steps": [q("fp16")]}]))
    out = tmp_path / "out"
    with pytest.raises(CompressionError, match=r"spec\.model\.uri: 'nowhere' does not exist"):
        compress(loaded, out, settings=FAST)
    assert list(out.iterdir()) == []


def test_empty_data_fails_run_naming_data_uri(tmp_path: Path) -> None:
    tiny_hf_dir(tmp_path)
    (tmp_path / "data.jsonl").write_text("")
    loaded = write_spec(tmp_path, spec_dict("tiny-bert", "data.jsonl",
                                            [{"name": "a", "steps": [q("fp16")]}]))
    with pytest.raises(CompressionError, match=r"spec\.data\.uri: .* has no rows"):
        compress(loaded, tmp_path / "out", settings=FAST)


def test_torchscript_cnn_with_accuracy_and_onnx_input(tmp_path: Path) -> None:
    model, data = tiny_cnn_files(tmp_path)
    doc = spec_dict(model.name, data.name, [
        {"name": "w8", "steps": [q("int8-weight-only")]},
        {"name": "pow2", "steps": [q("power-of-two")]},
        {"name": "qat", "steps": [q("qat", activations="static", trainSteps=4,
                                    calibrationSamples=16, perChannel=True)]},
        {"name": "int4", "steps": [q("int4-weight-only", blockSize=16)]},
    ], fmt="torchscript", task="image-classification", metric="accuracy", max_drop=0.5)
    report = compress(write_spec(tmp_path, doc), tmp_path / "out", settings=FAST)
    assert report["baseline"]["quality"] == pytest.approx(1.0)  # labels are its own argmax
    by = {c["name"]: c for c in report["candidates"]}
    assert by["w8"]["error"] is None and by["w8"]["quality"] >= 0.9
    # power-of-two weights are served packed at 4 bits (the first conv's few stay fp32)
    assert by["pow2"]["packed_size_bytes"] < report["baseline"]["size_bytes"] / 4
    assert by["pow2"]["size_bytes"] < report["baseline"]["size_bytes"] / 3
    assert by["pow2"]["notes"]["served_packed"] == 3
    # QAT trains an eager copy: a TorchScript forward that is not a plain Sequential cannot be
    # rebuilt, and the candidate says so (test_compression_qat trains an eager CNN)
    assert "cannot be rebuilt" in by["qat"]["error"]
    # int4: MatMulNBits in the served file
    assert by["int4"]["error"] is None and by["int4"]["notes"]["int4_matmuls"] == 2
    assert by["int4"]["size_bytes"] < report["baseline"]["size_bytes"]
    # the exported artifact, given back as an onnx model: ONNX steps run, torch steps refused
    onnx_doc = spec_dict("out/baseline/model.onnx", data.name, [
        {"name": "int8", "steps": [q("int8-dynamic")]},
        {"name": "pow2", "steps": [q("power-of-two")]},
    ], fmt="onnx", task="image-classification", metric="accuracy", max_drop=0.5)
    report2 = compress(write_spec(tmp_path, onnx_doc), tmp_path / "out2", settings=FAST)
    by2 = {c["name"]: c for c in report2["candidates"]}
    assert by2["int8"]["error"] is None
    assert "the model's format is onnx" in by2["pow2"]["error"]
    # the torchscript baseline was checked against its exported graph; the ONNX input had none
    assert report["baseline"]["export_min_cosine"] >= 0.9999
    assert report2["baseline"]["export_min_cosine"] is None


def test_an_export_that_changes_the_outputs_fails_the_run() -> None:
    import numpy as np
    import torch

    from leanserve.compression.pipeline import _export_agreement
    from leanserve.compression.registry import Batch

    torch.manual_seed(0)
    net = torch.nn.Linear(8, 4)
    held = [Batch({"input": torch.randn(5, 8)}), Batch({"input": torch.randn(3, 8)})]
    with torch.no_grad():
        exact = np.concatenate([net(**b.inputs).numpy() for b in held])
    assert _export_agreement(net, held, exact) == pytest.approx(1.0, abs=1e-6)
    wrong = exact.copy()
    wrong[6] = -wrong[6]  # one row of eight flipped: the mean would still look fine-ish
    with pytest.raises(CompressionError, match="differs from the torch model"):
        _export_agreement(net, held, wrong)


def test_accuracy_summary_carries_a_wilson_interval() -> None:
    import numpy as np

    from leanserve.compression.evaluate import summary, wilson

    logits = np.array([[0.1, 0.9]] * 8 + [[0.9, 0.1]] * 2)
    fig = summary(QualityMetric.ACCURACY, logits, logits, np.ones(10, int))
    assert fig["accuracy"] == 0.8 and fig["rows"] == 10
    lo, hi = fig["ci95"]
    assert lo < 0.8 < hi and (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson(1.0, 50)[1] == 1.0 and wilson(0.0, 0) == (0.0, 1.0)


def test_gate_passes_at_equality_and_scores() -> None:
    import numpy as np

    gate = Gate(QualityMetric.COSINE, 0.01, 1.0)
    assert gate.passed(0.99) and not gate.passed(0.9899)
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert mean_cosine(a, a * 3) == pytest.approx(1.0)
    logits = np.array([[0.1, 0.9], [0.8, 0.2]])
    assert score(QualityMetric.ACCURACY, logits, logits, np.array([1, 1])) == 0.5


def test_select_prefers_throughput_then_quality_then_size() -> None:
    base = {"passed": True, "error": None, "quality_drop": 0.005}
    cands = [{**base, "name": "a", "throughput_rps": 10, "size_bytes": 5},
             {**base, "name": "b", "throughput_rps": 10, "size_bytes": 3},
             {**base, "name": "c", "throughput_rps": 99, "size_bytes": 1, "passed": False}]
    assert select(cands) == "b"
    assert select([cands[2]]) is None
    # within the noise of the benchmark (10%), the one that keeps more quality
    near = [{**base, "name": "fast", "throughput_rps": 100, "size_bytes": 1},
            {**base, "name": "exact", "throughput_rps": 91, "size_bytes": 2, "quality_drop": 0.001}]
    assert select(near) == "exact"
    # clearly faster wins whatever its quality (it passed the gate)
    near[1]["throughput_rps"] = 85
    assert select(near) == "fast"
