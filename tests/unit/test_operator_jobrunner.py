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
