"""`leanserve run` end to end: the real pipeline on one machine, and its cleanup on Ctrl-C.

Both tests run the CLI as a user would (a subprocess), then check what it wrote and that no
tritonserver or Prometheus it started is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def _processes_under(path: Path) -> list[str]:
    """Command lines of live processes that mention ``path`` (their repository or config)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
        except OSError:
            continue
        cmd = raw.replace(b"\0", b" ").decode(errors="replace")
        if str(path) in cmd and state != "Z" and "leanserve run" not in cmd:
            found.append(cmd)
    return found


def _minilm_one_candidate(tmp_path: Path) -> Path:
    doc = yaml.safe_load((ROOT / "examples" / "minilm-cpu.yaml").read_text())
    spec = doc["spec"]
    spec["data"]["uri"] = (ROOT / "examples" / "data" / "sentences.jsonl").as_uri()
    spec["compression"]["candidates"] = [spec["compression"]["candidates"][0]]  # int8
    spec["autoscaling"].update(intervalSeconds=3, scaleDownStabilizationSeconds=6, maxReplicas=2)
    path = tmp_path / "minilm-one.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_run_minilm_writes_the_report_and_leaves_nothing_running(tmp_path: Path) -> None:
    spec = _minilm_one_candidate(tmp_path)
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "leanserve", "run", str(spec), "--workdir", str(workdir),
         "--load-seconds", "15"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((workdir / "report.json").read_text())

    comp = report["compression"]
    assert comp["selected"] == "int8"
    sel = comp["candidates"][0]
    assert sel["passed"] and sel["quality_drop"] <= 0.01
    assert sel["size_bytes"] < comp["baseline"]["size_bytes"] / 3  # int8 weights
    assert (workdir / "compression" / "artifacts" / "int8" / "model.onnx").exists()

    pools = report["profile"]["pools"]
    assert set(pools) == {"cpu-small", "cpu-large"}
    assert pools["cpu-small"]["measured"] is True and pools["cpu-small"]["capacity_rps"] > 0
    cost = report["cost"]
    assert cost["chosen_pool"] in pools
    for pool in ("cpu-small", "cpu-large"):
        c = cost[pool]
        assert c["per_million_requests"] == pytest.approx(
            c["hourly_price"] / (c["capacity_rps"] * 3600) * 1e6, rel=1e-3)

    decisions = report["autoscaling"]
    assert len(decisions) >= 5
    assert all(set(d["replicas"]) == {"cpu-small", "cpu-large"} and d["reason"]
               for d in decisions)
    # the policy read live metrics: at least one decision saw a request rate from Prometheus
    assert any(d["observed_rps"] for d in decisions), [d["reason"] for d in decisions]
    assert report["timeline"] and sum(p["achieved_rps"] for p in report["timeline"]) > 0

    page = (workdir / "report.html").read_text()
    assert "data:image/png;base64," in page and "int8" in page and "Autoscaler decisions" in page
    assert (workdir / "timeline.png").stat().st_size > 10_000
    assert "leanserve run: minilm" in proc.stdout
    assert _processes_under(workdir) == []


def test_sigint_mid_run_stops_everything(tmp_path: Path) -> None:
    spec = _minilm_one_candidate(tmp_path)
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "leanserve", "run", str(spec), "--workdir", str(workdir),
         "--load-seconds", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 600
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if "load burst" in line:
                break
            assert time.monotonic() < deadline, "".join(seen[-30:])
        else:
            pytest.fail("run ended before the load started:\n" + "".join(seen[-30:]))
        time.sleep(3)
        assert _processes_under(workdir), "expected tritonserver/prometheus to be running"
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, rest[-2000:]
    assert "interrupted" in rest and "Traceback" not in rest
    deadline = time.monotonic() + 20
    while _processes_under(workdir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_under(workdir) == []
