"""`leanserve run` end to end: the real pipeline on one machine, and its cleanup on Ctrl-C.

Both tests run the CLI as a user would, from a copy of the repository's layout (examples/ with
its data), with the README's relative paths and the default relative workdir: a trial that
passed an absolute --workdir never saw Prometheus scrape nothing because of a relative path.
Each test stops what it started even when pytest runs as a background job (SIGINT ignored by
inheritance): the child restores the default SIGINT handler, and a hard timeout kills the run's
process group and every process that names the test's directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SPEC = "examples/minilm-one.yaml"
DECISION = re.compile(r"\bt=\s*\d+\.\ds\s")
NOISE = ("is an Enum subclass", "Loading weights", "Failed to load", "Traceback")


def _processes_under(path: Path) -> dict[int, str]:
    """Live processes (pid: command line) that mention ``path`` (their repository or config)."""
    found = {}
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
            found[int(pid)] = cmd
    return found


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[Path]:
    """The repository's examples/ as a user has them, with a one-candidate copy of the default
    spec (its data path stays relative to the spec's folder, as in the README's example)."""
    (tmp_path / "examples" / "data").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "data" / "minilm.jsonl",
                tmp_path / "examples" / "data" / "minilm.jsonl")
    doc = yaml.safe_load((ROOT / "examples" / "minilm-cpu.yaml").read_text())
    spec = doc["spec"]
    assert spec["data"]["uri"] == "data/minilm.jsonl"
    spec["compression"]["candidates"] = [spec["compression"]["candidates"][0]]  # int8
    spec["autoscaling"].update(intervalSeconds=3, scaleDownStabilizationSeconds=6)
    (tmp_path / SPEC).write_text(yaml.safe_dump(doc))
    yield tmp_path
    for pid in _processes_under(tmp_path):  # whatever a failed or killed run left behind
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _default_sigint() -> None:
    # pytest started as a background job ignores SIGINT, and children inherit that
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(cwd: Path, *args: str, merge: bool = False) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    return subprocess.Popen([sys.executable, "-m", "leanserve", "run", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge else subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_default_sigint)


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def test_run_as_the_readme_does_from_the_repository_root(layout: Path) -> None:
    proc = _start(layout, SPEC, "--load-seconds", "20")
    try:
        out, err = proc.communicate(timeout=900)
    finally:
        _kill(proc)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    workdir = layout / "leanserve-run"  # the default, relative to the cwd
    report = json.loads((workdir / "report.json").read_text())
    assert report["verdict"]["usable"], report["verdict"]

    comp = report["compression"]
    assert comp["selected"] == "int8"
    sel = comp["candidates"][0]
    assert sel["passed"] and sel["quality_drop"] <= 0.01
    assert sel["size_bytes"] < comp["baseline"]["size_bytes"] / 3  # int8 weights
    assert len(report["measurement"]["rounds"]) == 3 and report["measurement"]["speedup"] > 0

    pools = report["profile"]["pools"]
    assert pools["cpu-small"]["measured"] is True and pools["cpu-small"]["capacity_rps"] > 0
    cost = report["cost"]
    for pool in ("cpu-small", "cpu-large"):
        c = cost[pool]
        assert c["per_million_requests"] == pytest.approx(
            c["hourly_price"] / (c["capacity_rps"] * 3600) * 1e6, rel=1e-3)

    decisions = report["autoscaling"]
    assert len(decisions) >= 5 and all(d["reason"] for d in decisions)
    # live metrics from the first decision on: Prometheus found its targets from a relative
    # workdir, and the direct source was primed before the load
    assert decisions[0]["observed_rps"] is not None, decisions[0]
    assert all(d["code"] != "MetricsUnavailable" for d in decisions), \
        [d["reason"] for d in decisions]
    if shutil.which("prometheus"):
        assert report["metrics_source"].startswith("prometheus")
        config = (workdir / "prometheus" / "prometheus.yml").read_text()
        assert str(workdir / "prometheus" / "targets.json") in config
    # the p95 a decision read is the clients' over the last window, not Triton's minute
    assert any(d["observed_p95_ms"] is not None and d["p95_samples"] >= 5 for d in decisions)
    # each decision read its 3 s interval: the clients' p95 over it, the rate over it too (with
    # Prometheus scraping every second, four scrapes: 4 s)
    assert all(d["p95_window_s"] == 3 for d in decisions), decisions
    rate_windows = {d["rate_window_s"] for d in decisions}
    if shutil.which("prometheus"):
        assert rate_windows == {4}, rate_windows
    else:
        assert all(w == pytest.approx(3, abs=1.5) for w in rate_windows), rate_windows
    # the replicas ready over time, from one at the start; replicas asked for are the decisions'
    ready = report["replicas_ready"]
    assert ready[0]["time_s"] == 0 and sum(ready[0]["ready"].values()) >= 1, ready
    assert report["replica_errors"] == [] and report["replicas_replaced"] == []
    assert "served it on cpu-small" in report["summary"]

    page = (workdir / "report.html").read_text()
    assert 'class="verdict' in page and "Cost of one million requests" in page
    assert "MiB" in page and page.count("data:image/png;base64,") == 2
    assert "result" in out and "leanserve run: minilm" in out
    assert "gate: quality drop <= 0.01 (cosine)" in out
    assert not [n for n in NOISE if n in err], err[-3000:]
    assert _processes_under(layout) == {}


def test_sigint_mid_run_stops_everything_and_writes_a_partial_report(layout: Path) -> None:
    proc = _start(layout, SPEC, "--load-seconds", "120", merge=True)
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 600
        assert proc.stdout is not None
        # mid-burst: once the load runs and the autoscaler has taken its first decision (the
        # run prints each decision, "t=  3.0s ...", after it is in the report's state)
        burst = False
        for line in proc.stdout:
            seen.append(line)
            burst = burst or "load burst" in line
            if burst and DECISION.search(line):
                break
            assert time.monotonic() < deadline, "".join(seen[-30:])
        else:
            pytest.fail("run ended before its first decision under load:\n"
                        + "".join(seen[-30:]))
        assert _processes_under(layout), "expected tritonserver/prometheus to be running"
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        _kill(proc)
    assert proc.returncode == 130, rest[-2000:]
    assert rest.count("interrupted") == 1 and "Traceback" not in rest, rest[-3000:]
    deadline = time.monotonic() + 20
    while _processes_under(layout) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_under(layout) == {}
    report = json.loads((layout / "leanserve-run" / "report.json").read_text())
    assert report["interrupted"] == "the load burst"
    assert report["verdict"]["status"] == "interrupted" and report["autoscaling"]
    assert report["replica_errors"] == [] and report["replicas_replaced"] == []
    assert report["replicas_ready"][0]["time_s"] == 0
    page = (layout / "leanserve-run" / "report.html").read_text()
    assert "INTERRUPTED" in page


def test_a_run_where_no_candidate_passes_fails_and_says_why(layout: Path) -> None:
    doc = yaml.safe_load((layout / SPEC).read_text())
    doc["spec"]["quality"]["maxDrop"] = 0.0001  # int8 drops 0.004: nothing can pass
    (layout / SPEC).write_text(yaml.safe_dump(doc))
    proc = _start(layout, SPEC)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        _kill(proc)
    assert proc.returncode == 1, out[-2000:] + err[-2000:]
    assert "FAILED: no candidate passed the quality gate" in err
    report = json.loads((layout / "leanserve-run" / "report.json").read_text())
    assert report["verdict"]["status"] == "failed" and not report["verdict"]["usable"]
    page = (layout / "leanserve-run" / "report.html").read_text()
    assert 'class="verdict failed"' in page and "no candidate passed" in page
    assert "FAILED" in out  # the closing table's first row
    assert _processes_under(layout) == {}
