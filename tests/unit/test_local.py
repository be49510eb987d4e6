"""The pure and in-process parts of `leanserve run`: the load shape, the local platform's
replica bookkeeping, the direct-scrape metric source, the timeline and report.html."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from leanserve.local.direct import DirectSource
from leanserve.local.pipeline import RunState, _timeline, burst
from leanserve.local.platform import LocalPlatform
from leanserve.local.report import render_html, timeline_png
from leanserve.serving.errors import ServerStartError


def test_burst_rises_then_falls() -> None:
    rate = burst(100.0, 60.0, floor=0.2)
    assert rate(0) == pytest.approx(20.0)
    assert rate(30) == pytest.approx(100.0)
    assert rate(60) == pytest.approx(20.0)
    assert rate(10) < rate(20) < rate(30) > rate(40) > rate(50)
    assert rate(-5) == rate(0) and rate(500) == rate(60)


class FakeServer:
    """Stands in for LocalTriton: the platform's bookkeeping is what is under test here."""

    started: list[FakeServer] = []

    def __init__(self, repo: Path, *, log_dir: Path, fail: bool = False) -> None:
        self.log_dir, self.fail, self.stopped = log_dir, fail, False
        self.http_url = f"127.0.0.1:{9000 + len(FakeServer.started)}"
        self.metrics_url = f"http://127.0.0.1:{9500 + len(FakeServer.started)}/metrics"
        FakeServer.started.append(self)

    def start(self) -> FakeServer:
        if self.fail:
            raise ServerStartError("tritonserver exited at start: boom")
        return self

    def stop(self) -> None:
        self.stopped = True


def test_platform_scales_pools_up_and_down_newest_first(tmp_path: Path) -> None:
    FakeServer.started = []
    changes = threading.Semaphore(0)
    plat = LocalPlatform(tmp_path, tmp_path / "logs", server_factory=FakeServer,
                         on_change=changes.release)
    plat.scale("m", {"small": 2, "large": 1})
    plat.wait_ready(10)
    assert plat.ready_replicas("m") == {"small": 2, "large": 1}
    assert len(plat.endpoints()) == 3 and len(plat.metrics_targets()) == 3
    assert all(":" in t and "/" not in t for _pool, t in plat.metrics_targets())
    plat.scale("m", {"small": 1, "large": 0})
    assert plat.current_replicas("m") == {"small": 1}
    small = [s for s in FakeServer.started if "small" in str(s.log_dir)]
    assert [s.stopped for s in small] == [False, True]  # the newest replica went first
    plat.stop_all()
    assert all(s.stopped for s in FakeServer.started)
    assert plat.current_replicas("m") == {}


def test_platform_records_a_replica_that_fails_to_start(tmp_path: Path) -> None:
    def factory(repo: Path, *, log_dir: Path) -> FakeServer:
        return FakeServer(repo, log_dir=log_dir, fail=True)

    plat = LocalPlatform(tmp_path, tmp_path / "logs", server_factory=factory)
    plat.scale("m", {"small": 1})
    plat.wait_ready(10)
    assert plat.ready_replicas("m") == {} and plat.current_replicas("m") == {}
    assert plat.errors and "boom" in plat.errors[0]


METRICS = """\
# TYPE nv_inference_request_success counter
nv_inference_request_success{{model="m",version="1"}} {n}
nv_inference_request_success{{model="m-text",version="1"}} 99
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{{model="m",version="1"}} {q}
# TYPE nv_inference_request_summary_us summary
nv_inference_request_summary_us{{model="m",version="1",quantile="0.95"}} {p95}
"""


class Targets:
    def metrics_targets(self) -> list[tuple[str, str]]:
        return [("small", "a:1"), ("small", "b:1")]


def test_direct_source_needs_two_scrapes_then_reads_rate_p95_and_queue() -> None:
    now = [100.0]
    pages = {"a": (0, 0, 20000), "b": (0, 0, 50000)}

    def fetch(url: str, _timeout: float) -> str:
        n, q, p95 = pages[url.split("//")[1][0]]
        return METRICS.format(n=n, q=q, p95=p95)

    src = DirectSource(Targets(), "m", clock=lambda: now[0], fetch=fetch)
    first = src.read()
    assert first.request_rate is None and first.problems  # no data is never zero load
    now[0] = 110.0
    pages.update(a=(100, 200_000, 20000), b=(50, 100_000, 50000))
    second = src.read()
    assert second.request_rate == pytest.approx(15.0)  # (100 + 50) / 10 s
    assert second.p95_ms == pytest.approx(50.0)  # the slowest replica
    assert second.queue_ms == pytest.approx(2.0)  # 300 ms of queue over 150 requests


def test_direct_source_reports_unreachable_replicas() -> None:
    def fetch(url: str, _timeout: float) -> str:
        raise OSError("connection refused")

    reading = DirectSource(Targets(), "m", clock=lambda: 1.0, fetch=fetch).read()
    assert reading.request_rate is None and any("OSError" in p for p in reading.problems)


def test_timeline_buckets_served_load_errors_and_p95() -> None:
    state = RunState()
    state.offered = [(0.0, 10.0), (2.0, 20.0)]
    state.records = [(0.1 * i, 10.0 + i, True) for i in range(20)]  # 20 ok in [0, 2)
    state.records += [(2.5, None, False), (3.0, 100.0, True)]
    points = _timeline(state, bucket_s=2.0)
    assert [p["time_s"] for p in points] == [0.0, 2.0]
    assert points[0]["achieved_rps"] == 10.0 and points[0]["errors"] == 0
    assert points[0]["p95_ms"] == 29.0 and points[0]["offered_rps"] == 20.0
    assert points[1]["errors"] == 1 and points[1]["p95_ms"] == 100.0


def _report() -> dict[str, Any]:
    cand = {"name": "int8", "size_bytes": 25, "quality": 0.995, "quality_drop": 0.005,
            "latency_ms": {"p50": 3.0, "p95": 4.0}, "throughput_rps": 900.0, "speedup": 2.0,
            "passed": True, "error": None}
    return {
        "name": "minilm", "summary": "selected int8 <fast>",
        "compression": {"selected": "int8", "candidates": [cand], "baseline": {
            "size_bytes": 100, "quality": 1.0, "latency_ms": {"p50": 6.0}, "throughput_rps": 450}},
        "cost": {"small": {"hourly_price": 0.1, "capacity_rps": 50.0,
                           "per_million_requests": 0.556, "measured": True},
                 "chosen_pool": "small"},
        "autoscaling": [{"time_s": 1.0, "replicas": {"small": 1}, "reason": "Steady"},
                        {"time_s": 6.0, "replicas": {"small": 2}, "reason": "ScaleUp"}],
        "timeline": [{"time_s": 0.0, "offered_rps": 5.0, "achieved_rps": 5.0, "p95_ms": 20.0},
                     {"time_s": 2.0, "offered_rps": 9.0, "achieved_rps": 8.0, "p95_ms": None}],
    }


def test_report_html_is_self_contained_and_escaped(tmp_path: Path) -> None:
    report = _report()
    img = timeline_png(report["timeline"], report["autoscaling"], 100.0, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    page = render_html(report, pareto_png=None, timeline_b64=img)
    assert page.count("data:image/png;base64,") == 1
    assert "selected int8 &lt;fast&gt;" in page  # user-visible text is escaped
    assert "<td>int8</td>" in page and "selected" in page and "ScaleUp" in page
    assert "Chosen pool: <b>small</b>" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched when opened
