"""The compression Job's entry point: what it runs after `leanserve compress`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leanserve.operator import jobrunner


def test_the_job_profiles_then_serves_the_profiled_config(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The profile's capacity is what the autoscaler plans with, so the repository the pods
    serve must hold the config it was measured for: the Job runs `leanserve profile --apply`.
    (Before, it profiled and uploaded the repository as compress wrote it.)"""
    out = tmp_path / "out"
    ran: list[list[str]] = []

    def fake_run(argv: list[str], timeout: float) -> tuple[int, str]:
        ran.append(argv)
        if argv[1] == "compress":
            (out / "model_repository").mkdir(parents=True)
            (out / "report.json").write_text(json.dumps({"selected": "int8", "candidates": []}))
        else:
            (out / "profile.json").write_text(json.dumps({"pools": {}, "capacity_rps": 1.0}))
        return 0, ""

    monkeypatch.setattr(jobrunner, "run", fake_run)
    log = tmp_path / "termination-log"
    code = jobrunner.main(["--artifact-uri", "pvc://x/y", "--profile", "--termination-log",
                           str(log), "--", "leanserve", "compress", "/spec/spec.yaml", "--out",
                           str(out)])
    assert code == 0 and log.read_text()
    profile = ran[1]
    assert profile[:3] == ["leanserve", "profile", str(out / "model_repository")]
    assert "--apply" in profile and profile[profile.index("--spec") + 1] == "/spec/spec.yaml"


def test_the_gpu_repository_keeps_the_spec_s_batching(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The profile measures the Job's CPU: what --apply writes is for the CPU pools. The GPU
    repository is copied before it, with the spec's batching (and queue timeout); before, a
    CPU-best max_batch_size of 1 went to the GPU pods too."""
    from test_serving_repository import tiny_text_onnx

    from leanserve.api.spec import Task
    from leanserve.serving import pbtxt
    from leanserve.serving.repository import (
        ServingConfig,
        serving_config_of,
        with_serving_config,
        write_model_repository,
    )

    out = tmp_path / "out"

    def fake_run(argv: list[str], timeout: float) -> tuple[int, str]:
        repo = out / "model_repository"
        if argv[1] == "compress":
            write_model_repository(tiny_text_onnx(tmp_path / "m.onnx"), repo, "enc",
                                   task=Task.FEATURE_EXTRACTION, max_batch_size=32,
                                   max_queue_delay_us=1000, queue_timeout_us=50_000)
            (out / "report.json").write_text(json.dumps({"selected": "int8", "candidates": []}))
        else:  # what --apply does with a CPU-best config of batch 1
            config = pbtxt.read(repo / "enc")
            pbtxt.write(with_serving_config(config, ServingConfig(max_batch_size=1)), repo / "enc")
            (out / "profile.json").write_text(json.dumps({"pools": {}, "capacity_rps": 1.0}))
        return 0, ""

    monkeypatch.setattr(jobrunner, "run", fake_run)
    code = jobrunner.main(["--artifact-uri", "pvc://x/y", "--profile", "--gpu-repository",
                           "--termination-log", str(tmp_path / "log"), "--", "leanserve",
                           "compress", "/spec/spec.yaml", "--out", str(out)])
    assert code == 0
    cpu = serving_config_of(pbtxt.read(out / "model_repository" / "enc"))
    gpu = serving_config_of(pbtxt.read(out / "model_repository-gpu" / "enc"))
    assert cpu.max_batch_size == 1
    assert (gpu.max_batch_size, gpu.queue_timeout_us, gpu.kind.value) == (32, 50_000, "KIND_GPU")
