"""LocalPlatform with real tritonserver replicas, read by the direct-scrape metric source:
what `leanserve run` falls back to without Prometheus."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from leanserve.api.spec import Task
from leanserve.autoscaling.metrics import PrometheusSource, Queries
from leanserve.local.direct import DirectSource
from leanserve.local.pipeline import rate_window
from leanserve.local.platform import LocalPlatform
from leanserve.serving.loadgen import LoadSpec, run_load
from leanserve.serving.repository import write_model_repository

pytestmark = pytest.mark.integration

def two_ready_replicas(tmp_path: Path, onnx: Path) -> LocalPlatform:
    """A LocalPlatform of the tiny model with two ready replicas in pool ``small``."""
    repo = write_model_repository(onnx, tmp_path / "repo", "tiny",
                                  task=Task.FEATURE_EXTRACTION, max_batch_size=8,
                                  max_queue_delay_us=500, backend="python")
    plat = LocalPlatform(repo, tmp_path / "logs")
    try:
        plat.scale("tiny", {"small": 2})
        plat.wait_ready(120)
        assert plat.ready_replicas("tiny") == {"small": 2}, plat.errors
    except BaseException:
        plat.stop_all()
        raise
    return plat


@contextlib.contextmanager
def metrics_server(body: Callable[[], str]) -> Iterator[str]:
    """A scrape target on loopback serving ``body()`` as Prometheus text; yields host:port."""

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = body().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_replicas_start_serve_report_metrics_and_stop(tmp_path: Path,
                                                      serving_tiny_onnx: Path) -> None:
    """The direct source counts every completion between two readings, a replica's that was
    stopped in between included (read as the platform stops it; before, its last completions
    were left out)."""
    import numpy as np

    plat = two_ready_replicas(tmp_path, serving_tiny_onnx)
    try:
        source = DirectSource(plat, "tiny", clock=time.monotonic)
        plat.on_stop = lambda _pool, target: source.final_read(target)
        first = source.read()
        assert first.request_rate is None  # first scrape: no rate yet, not zero
        # a replica whose first read failed (a busy machine: its metrics page timed out once in
        # CI) has no counters to count from, and the next reading rightly leaves it out
        def unread(r: Any) -> list[str]:  # problems of a replica, not "no rate yet"
            return [p for p in r.problems if not p.startswith("request rate")]

        deadline = time.monotonic() + 20
        while unread(first) and time.monotonic() < deadline:
            time.sleep(0.5)
            first = source.read()
        assert not unread(first), first.problems
        ids = np.full((1, 12), 1000, dtype=np.int64)
        payload = {"input_ids": ids, "attention_mask": np.ones_like(ids)}

        def load(seconds: float) -> int:
            result = run_load([u for _p, u in plat.endpoints()], [payload],
                              LoadSpec(model="tiny", rate=40.0, duration_s=seconds))
            assert result["errors"] == 0
            return int(result["requests"])

        sent = load(3.0)
        assert sent > 60
        reading = source.read()
        assert reading.request_rate is not None and reading.request_rate > 5
        assert reading.request_rate * source.window_seconds == pytest.approx(sent), reading
        assert reading.p95_ms is not None and reading.p95_ms > 0
        pids = [r.server.pid for r in plat._replicas]
        sent = load(2.0)  # over both replicas; then one stops before the next reading
        plat.scale("tiny", {"small": 1})
        assert plat.current_replicas("tiny") == {"small": 1}
        reading = source.read()
        assert reading.request_rate * source.window_seconds == pytest.approx(sent), reading
    finally:
        plat.stop_all()
    for pid in pids:
        assert pid is None or not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] == "Z"


def test_a_killed_replica_is_found_reaped_and_replaced(tmp_path: Path,
                                                     serving_tiny_onnx: Path) -> None:
    """Fault injection: SIGKILL one of two ready replicas. The health check reaps it (no longer
    counted, no longer routed to), the next scale starts a replacement that becomes ready, and
    ``replaced`` says what happened (it reaches the run report)."""
    import os
    import signal

    plat = two_ready_replicas(tmp_path, serving_tiny_onnx)
    try:
        # both alive: the real probe answers every time, so nothing is reaped however often
        # it runs (it once failed on every live replica and reaped each after 3 intervals)
        from leanserve.local.platform import LIVENESS_FAILURES

        for _ in range(LIVENESS_FAILURES + 1):
            assert plat.check_health() == []
        assert [r.missed_probes for r in plat._replicas] == [0, 0]
        victim = plat._replicas[0]
        os.kill(victim.server.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while victim.server.running and time.monotonic() < deadline:
            time.sleep(0.1)
        found = plat.check_health()
        assert found == [f"{victim.name}: exited with code -9"]
        assert plat.ready_replicas("tiny") == {"small": 1}
        assert plat.current_replicas("tiny") == {"small": 2}  # as set: still 2 asked for
        assert victim.server.http_url not in [u for _p, u in plat.endpoints()]
        plat.scale("tiny", {"small": 2})  # what the autoscaler's next decision does
        plat.wait_ready(120)
        assert plat.ready_replicas("tiny") == {"small": 2}, plat.errors
        assert plat.replaced == found
    finally:
        plat.stop_all()


def test_a_replica_that_stops_answering_is_reaped_after_repeated_probes(tmp_path: Path) -> None:
    """A hung server (alive, not answering) is declared dead only after LIVENESS_FAILURES
    consecutive failed probes, so one slow answer on a loaded machine does not kill it."""
    from leanserve.local.platform import LIVENESS_FAILURES

    class Hung:
        running, returncode, pid = True, None, None
        http_url = "127.0.0.1:9"  # host:port, as LocalTriton's

        def start(self) -> None: ...

        def stop(self) -> None:
            self.running = False

    plat = LocalPlatform(tmp_path, tmp_path / "logs", server_factory=lambda *a, **k: Hung())
    plat.scale("tiny", {"small": 1})
    plat.wait_ready(5)
    for _ in range(LIVENESS_FAILURES - 1):
        assert plat.check_health(probe=lambda r: False) == []
    assert plat.check_health(probe=lambda r: True) == []  # an answer resets the count
    for _ in range(LIVENESS_FAILURES - 1):
        plat.check_health(probe=lambda r: False)
    assert plat.check_health(probe=lambda r: False) == [
        f"small-1: failed {LIVENESS_FAILURES} liveness probes in a row"]
    assert plat.ready_replicas("tiny") == {} and plat.current_replicas("tiny") == {"small": 1}
    plat.stop_all()
    assert plat.current_replicas("tiny") == {}


def test_prometheus_in_a_relative_workdir_scrapes_its_targets(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`leanserve run`'s default workdir is relative: Prometheus must still find its file_sd
    targets (it resolves relative paths against its config's folder, not the cwd)."""
    from leanserve.local.prometheus import LocalPrometheus, prometheus_binary

    if prometheus_binary() is None:
        pytest.skip("prometheus is not installed (apt-get install -y prometheus)")
    monkeypatch.chdir(tmp_path)
    with metrics_server(lambda: 'nv_inference_request_success{model="m",version="1"} 7\n') \
            as address, LocalPrometheus(Path("leanserve-run") / "prometheus") as prom:
        config = (tmp_path / "leanserve-run" / "prometheus" / "prometheus.yml").read_text()
        assert str(tmp_path / "leanserve-run" / "prometheus" / "targets.json") in config
        prom.set_targets([([address], {"pool": "small", "role": "triton"})])
        assert prom.wait_scraped([address], timeout_s=20) == [], prom.active_targets()
        # `leanserve run`'s shortest rate() window for its scrape interval holds two samples
        window = rate_window(1, prom.scrape_seconds)
        src = PrometheusSource(prom.url, Queries("m", window=f"{window}s"), clock=time.time)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            samples = src.query(f"count_over_time(nv_inference_request_success[{window}s])")
            if samples and samples[0][1] >= 2:
                break
            time.sleep(0.5)
        assert samples and samples[0][1] >= 2, samples
        assert src.read().request_rate == 0.0  # a counter that stays at 7: zero, not no data


def test_prometheus_stopped_mid_run_holds_then_recovers(tmp_path: Path) -> None:
    """Fault injection: the autoscaling step on a real Prometheus scraping a counter that grows.
    Prometheus is stopped: the step holds (MetricsUnavailable, replicas unchanged) and counts an
    ``unreachable`` error; a Prometheus started again on the same port and data brings the rate
    back, and the step decides on it."""
    import itertools

    from prometheus_client import generate_latest

    from leanserve.autoscaling.exporter import LeanserveMetrics
    from leanserve.autoscaling.metrics import PrometheusSource, Queries, observe
    from leanserve.autoscaling.platform import InMemoryPlatform
    from leanserve.autoscaling.policy import PoolCapacity, Reason, Target, decide
    from leanserve.local.prometheus import LocalPrometheus, prometheus_binary

    if prometheus_binary() is None:
        pytest.skip("prometheus is not installed (apt-get install -y prometheus)")
    served = itertools.count(step=50)  # 50 more requests at every scrape

    plat = InMemoryPlatform(["a"], clock=time.time)
    plat.set_ready("m", {"a": 2})
    target = Target(100, 1, 5)
    exporter = LeanserveMetrics()

    def step(src: PrometheusSource):
        obs, reading = observe(src, plat, "m")
        d = decide(obs, [PoolCapacity("a", 1000, 0.1)], target, None, time.time())
        exporter.record("m", d, target, reading=reading)
        return d, reading

    def rate_seen(src: PrometheusSource, timeout_s: float = 30) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            rate = src.read().request_rate
            if rate:
                return rate
            time.sleep(0.5)
        raise AssertionError("Prometheus never gave a request rate")

    workdir = tmp_path / "prometheus"
    counter = 'nv_inference_request_success{{model="m",version="1"}} {}\n'
    with metrics_server(lambda: counter.format(next(served))) as address:
        with LocalPrometheus(workdir) as prom:
            port = prom.port
            prom.set_targets([([address], {"pool": "a"})])
            src = PrometheusSource(prom.url, Queries("m", window="5s"), clock=time.time)
            assert rate_seen(src) > 0
            assert step(src)[0].code is not Reason.METRICS_UNAVAILABLE
        # stopped: every poll fails to connect
        d, reading = step(src)
        assert d.code is Reason.METRICS_UNAVAILABLE and d.replicas == {"a": 2}
        assert "unreachable" in reading.error_kinds
        assert 'leanserve_metrics_errors_total{kind="unreachable",model="m"}' in \
            generate_latest(exporter.registry).decode()
        with LocalPrometheus(workdir, port=port) as prom:
            prom.set_targets([([address], {"pool": "a"})])
            assert rate_seen(src) > 0
            d, reading = step(src)
            # the rate is back (p95 and queue stay empty: this exporter serves only a counter)
            assert d.code is not Reason.METRICS_UNAVAILABLE
            assert reading.request_rate and "unreachable" not in reading.error_kinds



def test_prometheus_interrupted_while_starting_is_stopped(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (or SIGTERM) while Prometheus starts: the caller never gets the object to stop, and
    the process runs in its own session, so start() stops it itself."""
    from leanserve.local.prometheus import LocalPrometheus, prometheus_binary

    if prometheus_binary() is None:
        pytest.skip("prometheus is not installed (apt-get install -y prometheus)")

    def interrupted(self: LocalPrometheus) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(LocalPrometheus, "_wait_ready", interrupted)
    prom = LocalPrometheus(tmp_path / "prom")
    with pytest.raises(KeyboardInterrupt):
        prom.start()
    assert prom.proc is None or prom.proc.poll() is not None


def test_a_replica_still_starting_is_stopped_at_exit(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A tritonserver is on the exit list from its launch, not only once ready: a replica
    starting in a boot thread when a second Ctrl-C cuts the clean-up short would outlive us."""
    from leanserve.serving import server

    repo = tmp_path / "repo"
    (repo / "slow" / "1").mkdir(parents=True)
    (repo / "slow" / "1" / "model.py").write_text("class TritonPythonModel:\n    pass\n")
    (repo / "slow" / "config.pbtxt").write_text(
        'name: "slow"\nbackend: "python"\nmax_batch_size: 1\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n')
    seen: list[bool] = []

    def waiting(self: server.LocalTriton, n_models: int) -> None:
        seen.append(self in server._running)
        server._stop_all()  # what atexit runs
        assert self._proc is None or self._proc.poll() is not None
        raise KeyboardInterrupt

    monkeypatch.setattr(server.LocalTriton, "_wait_ready", waiting)
    with pytest.raises(KeyboardInterrupt):
        server.LocalTriton(repo, log_dir=tmp_path / "logs").start()
    assert seen == [True]
