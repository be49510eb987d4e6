"""The pure and in-process parts of `leanserve run`: the load shape, the local platform's
replica bookkeeping, the direct-scrape metric source, the timeline and report.html."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from leanserve.autoscaling.metrics import PrometheusSource, Queries, Reading, observe
from leanserve.autoscaling.platform import InMemoryPlatform
from leanserve.local.commands import plan_line
from leanserve.local.direct import DirectSource
from leanserve.local.outcome import (
    costs_before_after,
    group_decisions,
    slo_attainment,
    span,
    summary,
    verdict,
)
from leanserve.local.pipeline import (
    ClientLatency,
    LocalSource,
    RunSettings,
    RunState,
    _timeline,
    burst,
    cap_note,
    rate_window,
)
from leanserve.local.platform import LocalPlatform
from leanserve.local.recheck import judge
from leanserve.local.report import (
    pareto_figure,
    pareto_png,
    render_html,
    timeline_figure,
    timeline_png,
)
from leanserve.quiet import quiet_libraries
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


def test_a_replica_scaled_down_leaves_the_endpoints_before_it_stops(tmp_path: Path) -> None:
    """A pod's preStop grace: while ``drain_s`` runs, clients no longer see the replica, and
    its process still answers the requests they sent it just before."""
    FakeServer.started = []
    plat = LocalPlatform(tmp_path, tmp_path / "logs", server_factory=FakeServer)
    plat.drain_s = 0.3
    plat.scale("m", {"small": 2})
    plat.wait_ready(10)
    seen: list[tuple[int, bool]] = []
    leaving = FakeServer.started[1]
    watcher = threading.Thread(target=lambda: [
        (seen.append((len(plat.endpoints()), leaving.stopped)), time.sleep(0.05))
        for _ in range(12)])
    began = time.monotonic()
    watcher.start()
    plat.scale("m", {"small": 1})
    took = time.monotonic() - began
    watcher.join()
    assert leaving.stopped and took >= 0.3
    assert (1, False) in seen  # out of the endpoints, still running
    assert (2, True) not in seen  # never listed once stopped
    plat.stop_all()  # at exit nothing waits
    assert all(s.stopped for s in FakeServer.started)


def test_platform_records_a_replica_that_fails_to_start(tmp_path: Path) -> None:
    def factory(repo: Path, *, log_dir: Path) -> FakeServer:
        return FakeServer(repo, log_dir=log_dir, fail=True)

    plat = LocalPlatform(tmp_path, tmp_path / "logs", server_factory=factory)
    plat.scale("m", {"small": 1})
    plat.wait_ready(10)
    assert plat.ready_replicas("m") == {} and plat.errors and "boom" in plat.errors[0]
    assert plat.current_replicas("m") == {"small": 1}  # as set: the next scale starts another
    plat.scale("m", {"small": 1})
    plat.wait_ready(10)
    assert len(plat.errors) == 2


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


def test_direct_source_counts_rejected_requests_as_load() -> None:
    """Triton's failures (a queue timeout's REJECTED among them) are requests that arrived, as
    the cluster's request-rate query counts them; before, only successes were."""
    now = [100.0]
    counts = {"ok": 0, "rejected": 0}

    def fetch(url: str, _timeout: float) -> str:
        return METRICS.format(n=counts["ok"], q=0, p95=20000) + (
            "# TYPE nv_inference_request_failure counter\n"
            f'nv_inference_request_failure{{model="m",reason="REJECTED",version="1"}} '
            f"{counts['rejected']}\n"
            'nv_inference_request_failure{model="m-text",reason="REJECTED",version="1"} 7\n')

    src = DirectSource(Targets(), "m", clock=lambda: now[0], fetch=fetch)
    src.read()
    now[0] = 110.0
    counts.update(ok=100, rejected=60)
    assert src.read().request_rate == pytest.approx(2 * (100 + 60) / 10)  # two replicas


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
    state.records += [(1.0, 1500.0, True)]  # sent in [0, 2), served in [2, 4)
    points = _timeline(state, bucket_s=2.0)
    assert [p["time_s"] for p in points] == [0.0, 2.0]
    assert points[0]["achieved_rps"] == 10.0 and points[0]["errors"] == 0
    assert points[0]["p95_ms"] == 29.0 and points[0]["planned_rps"] == 10.0
    assert points[0]["offered_rps"] == 10.5  # 21 sent in 2 s
    # one of its two requests failed: its p95 is a request never answered (no p95)
    assert points[1]["errors"] == 1 and points[1]["p95_ms"] is None
    assert points[1]["achieved_rps"] == 1.0  # the slow one and the one at 3.0 s


def test_failed_requests_count_against_the_slo() -> None:
    # the first 200 requests fast, the last 200 all failed: before, a bucket's p95 counted only
    # successes and an all-failed bucket dropped out of the attainment (100%, verdict ok)
    state = RunState()
    state.records = [(0.01 * i, 20.0, True) for i in range(200)]
    state.records += [(2.0 + 0.01 * i, None, False) for i in range(200)]
    state.records += [(4.0 + 0.01 * i, 20.0 if i % 10 else None, i % 10 > 0)
                      for i in range(200)]  # 10% failed
    points = _timeline(state, bucket_s=2.0)
    assert [p["p95_ms"] for p in points] == [20.0, None, None]
    assert slo_attainment(points, 100.0) == 1 / 3
    assert slo_attainment([{"time_s": 0.0, "p95_ms": None, "errors": 0}], 100.0) is None


def _report() -> dict[str, Any]:
    cand = {"name": "int8", "size_bytes": 25 * 2**20, "quality": 0.995, "quality_drop": 0.005,
            "latency_ms": {"p50": 3.0, "p95": 4.0}, "throughput_rps": 900.0, "speedup": 2.0,
            "passed": True, "error": None}
    return {
        "name": "minilm", "summary": "selected int8 <fast>",
        "compression": {"selected": "int8", "candidates": [cand], "baseline": {
            "size_bytes": 100 * 2**20, "quality": 1.0, "latency_ms": {"p50": 6.0},
            "throughput_rps": 450}},
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
    report["verdict"] = verdict(report, 100.0)
    img = timeline_png(report["timeline"], report["autoscaling"], 100.0, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    page = render_html(report, timeline_b64=img, pareto_b64=pareto_png(report["compression"]))
    assert page.count("data:image/png;base64,") == 2
    assert "selected int8 &lt;fast&gt;" in page  # user-visible text is escaped
    assert "<td>int8</td>" in page and "selected" in page and "ScaleUp" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched when opened
    # human sizes and rates, and the cost of a million requests before and after
    assert "100.0 MiB" in page and "25.0 MiB" in page and "900 rows/s" in page
    assert "Cost of one million requests" in page and "$0.56" in page and "$1.11" in page


def test_report_of_a_failed_run_says_so_first() -> None:
    report = _report()
    for d in report["autoscaling"]:
        d["observed_rps"] = None
    report["verdict"] = verdict(report, 100.0)
    page = render_html(report, timeline_b64=None)
    banner = page.index('class="verdict failed"')
    assert banner < page.index("<h2>") and "never saw a metric" in page[banner:]


def _live(t: float, replicas: int, code: str = "Steady", rps: float | None = 10.0,
          p95: float | None = 20.0) -> dict[str, Any]:
    return {"time_s": t, "replicas": {"small": replicas, "large": 0}, "code": code,
            "reason": f"{code}: load {rps} req/s", "observed_rps": rps, "observed_p95_ms": p95}


def test_verdict_fails_a_run_whose_autoscaler_never_saw_a_metric() -> None:
    report = _report()
    report["autoscaling"] = [dict(_live(5.0 * i, 1, "MetricsUnavailable", None, None),
                                  problems=["request rate: no data (empty result)"])
                             for i in range(19)]
    v = verdict(report, 100.0)
    assert v["status"] == "failed" and not v["usable"]
    assert v["headline"].startswith("FAILED: the autoscaler never saw a metric")
    assert "empty result" in v["headline"]


def test_verdict_fails_when_no_candidate_passed_and_warns_on_a_missed_slo() -> None:
    report = _report()
    report["compression"]["selected"] = None
    assert not verdict(report, 100.0)["usable"]
    report = _report()
    report["autoscaling"] = [_live(0, 1), _live(5, 2, "ScaleUp"), _live(10, 1, "ScaleDown")]
    report["timeline"] = [{"time_s": 2.0 * i, "p95_ms": 150.0 if i % 3 else 20.0}
                          for i in range(10)]
    v = verdict(report, 100.0)
    assert v["usable"] and v["status"] == "warnings"
    assert any("SLO in only 40%" in w for w in v["warnings"])
    report["timeline"] = [{"time_s": 2.0 * i, "p95_ms": 20.0} for i in range(10)]
    assert verdict(report, 100.0)["status"] == "ok"
    report["autoscaling"] = [_live(0, 1), _live(5, 1), _live(10, 1)]
    assert any("never rose above 1" in w for w in verdict(report, 100.0)["warnings"])
    report["measurement"] = {"noisy": True, "notes": ["repeated timings differ by 40%"]}
    v = verdict(report, 100.0)
    assert any("40%" in w and "uncertain" in w for w in v["warnings"])
    report["replicas_replaced"] = ["cpu-small-2: exited with code -9"]
    assert "1 replica(s) died and were replaced: cpu-small-2: exited with code -9" in \
        verdict(report, 100.0)["warnings"]


def test_summary_names_the_pool_served_on_and_says_when_a_figure_is_derived() -> None:
    report = _report()
    report["cost"] = {"cpu-small": {"hourly_price": 0.1, "capacity_rps": 50.0,
                                    "per_million_requests": 0.556, "measured": True},
                      "cpu-large": {"hourly_price": 0.38, "capacity_rps": 220.0,
                                    "per_million_requests": 0.48, "measured": False},
                      "chosen_pool": "cpu-large"}
    report["autoscaling"] = [{"time_s": 5.0, "replicas": {"cpu-small": 1, "cpu-large": 0}},
                             {"time_s": 10.0, "replicas": {"cpu-small": 2, "cpu-large": 0}}]
    text = summary(report, 100.0)
    assert "served it on cpu-small" in text and "served it on cpu-large" not in text
    assert "cpu-large is the cheapest per request in a cluster" in text
    assert "derived from this machine's measurement" in text


def test_cap_note_explains_the_local_replica_cap() -> None:
    note = cap_note(4, 2, 2)
    reason = "ScaleUp: cheapest small=2 (cannot meet it within maxReplicas=2, maxHourlyCost=2)"
    assert "the spec allows 4; capped here at one replica per core on this 2-core machine" in \
        note(reason)
    assert cap_note(2, 2, 8)(reason) == reason


def test_client_latency_is_the_p95_of_requests_completed_in_the_window() -> None:
    state = RunState()
    now = [30.0]
    lat = ClientLatency(state, t0=0.0, window_s=10.0, clock=lambda: now[0])
    assert lat.p95() == (None, 0)
    state.records = [(5.0, 900.0, True)] * 50  # finished long before the window
    state.records += [(20.0 + 0.1 * i, float(i + 1), True) for i in range(20)]
    state.records += [(25.0, None, False), (29.99, 500.0, True)]  # the last one still running
    p95, n = lat.p95()
    assert n == 21 and p95 == 20.0  # one failure in 21 is under the 5% a p95 leaves out


def test_failed_requests_raise_the_clients_p95() -> None:
    # before, a failed request had no latency and dropped out: a window where 30 of 50
    # requests failed read the successes' 30 ms, and the autoscaler saw no breach
    state = RunState()
    lat = ClientLatency(state, t0=0.0, window_s=10.0, clock=lambda: 30.0, failed_ms=10_000.0)
    state.records = [(21.0 + 0.1 * i, 30.0, True) for i in range(20)]
    state.records += [(22.0 + 0.1 * i, 3.0, False) for i in range(20)]  # 503s, known at once
    state.records += [(15.0, 10_000.0, False)] * 5  # timed out, known at 25 s: in the window
    state.records += [(25.0, None, False)] * 5  # dropped, end unknown: counted when sent
    state.records += [(5.0, 10_000.0, False)] * 50  # failed before the window: not counted
    assert lat.p95() == (10_000.0, 50)
    # the same successes alone, and with one failure in 41: the successes' p95
    state.records = [(21.0 + 0.1 * i, 30.0, True) for i in range(40)]
    assert lat.p95() == (30.0, 40)
    state.records.append((22.0, 1.0, False))
    assert lat.p95() == (30.0, 41)


def test_local_source_reads_the_rate_from_metrics_and_p95_from_the_clients() -> None:
    class Inner:
        clock = staticmethod(lambda: 1.0)

        def read(self) -> Reading:
            return Reading(12.0, 180.0, 1.0, {}, ["p95: stale summary"])

    state = RunState()
    state.records = [(0.1 * i, 30.0, True) for i in range(40)]
    src = LocalSource(Inner(), ClientLatency(state, 0.0, 10.0, clock=lambda: 5.0))
    reading = src.read()
    assert reading.request_rate == 12.0 and reading.p95_ms == 30.0 and reading.problems == []
    assert src.last_samples == 40
    # the observation the policy gets: no rate window from a source that has none ...
    plat = InMemoryPlatform(["a"], clock=lambda: 1.0)
    obs, _ = observe(src, plat, "m")
    assert obs.request_rate == 12.0 and obs.window_seconds is None
    # ... Prometheus' rate() window through the local wrapper (the trend projects half of it)
    prom = PrometheusSource("http://127.0.0.1:1", Queries("m", "10s"), clock=lambda: 1.0,
                            http=lambda *a, **k: (200, b'{"status":"success","data":'
                                                  b'{"resultType":"vector","result":[]}}'))
    wrapped = LocalSource(prom, ClientLatency(state, 0.0, 10.0, clock=lambda: 5.0))
    assert observe(wrapped, plat, "m")[0].window_seconds == 10.0


def test_decisions_are_grouped_when_the_outcome_repeats() -> None:
    decisions = [_live(5.0 * i, 1, rps=10 + i) for i in range(6)]
    decisions += [_live(30, 2, "ScaleUp"), _live(35, 2), _live(40, 2)]
    groups = group_decisions(decisions)
    assert [(g["code"], g["count"]) for g in groups] == [("Steady", 6), ("ScaleUp", 1),
                                                         ("Steady", 2)]
    assert groups[0]["start_s"] == 0 and groups[0]["end_s"] == 25
    assert span(groups[0]["rps"], "req/s") == "10-15 req/s"


def test_costs_before_and_after_use_the_rechecked_speedup() -> None:
    report = _report()
    rows = costs_before_after(report)
    assert rows[0]["after"] == 0.556 and rows[0]["before"] == pytest.approx(1.112)
    report["measurement"] = {"speedup": 1.5}
    assert costs_before_after(report)[0]["before"] == pytest.approx(0.834)


def test_recheck_flags_a_disturbed_baseline_and_spread() -> None:
    quiet = judge(295.0, 1.3, [(290.0, 380.0), (300.0, 390.0), (296.0, 385.0)])
    assert not quiet.noisy and quiet.speedup == pytest.approx(1.30, abs=0.01)
    slow_first = judge(63.6, 5.3, [(290.0, 380.0), (300.0, 390.0), (296.0, 385.0)])
    assert slow_first.noisy
    assert any("63 rows/s when first timed" in n or "64 rows/s when first timed" in n
               for n in slow_first.notes)
    assert any("claimed 5.30x" in n for n in slow_first.notes)
    jumpy = judge(295.0, 1.3, [(290.0, 380.0), (150.0, 390.0), (296.0, 200.0)])
    assert jumpy.noisy and any("differ by" in n for n in jumpy.notes)


def test_timeline_plot_has_one_title_and_ends_with_the_data() -> None:
    report = _report()
    fig = timeline_figure(report["timeline"], report["autoscaling"], 100.0)
    assert fig.get_suptitle() == ""
    assert fig.axes[2].get_xlim() == (0.0, 6.0)
    # the replicas ready, next to those asked for: one ready until 4.5 s, two after
    ready = [{"time_s": 0.0, "ready": {"small": 1}}, {"time_s": 4.5, "ready": {"small": 2}}]
    fig = timeline_figure(report["timeline"], report["autoscaling"], 100.0, ready=ready)
    lines = {line.get_label(): line for line in fig.axes[1].get_lines()}
    assert set(lines) == {"small asked for", "small ready"}
    assert list(lines["small ready"].get_xdata()) == [0.0, 4.5, 6.0]
    assert list(lines["small ready"].get_ydata()) == [1, 2, 2]
    assert list(lines["small asked for"].get_ydata()) == [1, 1, 2]


def test_pareto_plot_keeps_the_baseline_inside_and_its_legend_as_keys() -> None:
    comp = _report()["compression"]
    comp["max_drop"], comp["metric"] = 0.01, "cosine"
    fig = pareto_figure(comp)
    ax = fig.axes[0]
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    assert x0 < 6.0 < x1 and y0 < 1.0 < y1  # the baseline star is not on the edge
    assert y1 - 0.1 * (y1 - y0) > 1.0 and x1 - 0.1 * (x1 - x0) > 6.0
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "baseline (reference)" and "gate: cosine drop <= 0.01" in labels


def test_quiet_libraries_drops_known_noise_and_keeps_the_rest(
        caplog: pytest.LogCaptureFixture) -> None:
    import logging

    quiet_libraries()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("Failed to load /x/_C.cpython-310.so: undefined")
        logging.getLogger("torchao").warning("something else went wrong")
        logging.getLogger("torchao").error("Failed to load and that is an error")
        logging.getLogger("torch.utils._pytree").warning(
            "<enum 'K'> is an Enum subclass and is now natively supported by torch.compile")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["something else went wrong", "Failed to load and that is an error"]


def test_help_shows_plain_names_and_plan_says_what_the_gate_allows() -> None:
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from leanserve.cli import app

    for args in (["--help"], ["run", "--help"]):
        out = CliRunner().invoke(app, args, terminal_width=100).output
        assert "<bool>" not in out and "{spec}" not in out, out
    assert "[SPEC]" in CliRunner().invoke(app, ["run", "--help"]).output
    # every positional argument is named in capitals, as `run`'s [SPEC] is
    for command, name in (("validate", "{SPEC}..."), ("compress", "{SPEC}"), ("serve", "{REPO}"),
                          ("profile", "{REPO}")):
        usage = CliRunner().invoke(app, [command, "--help"]).output.splitlines()[0]
        assert usage.endswith(f"[OPTIONS] {name}"), usage
    spec = SimpleNamespace(
        compression=SimpleNamespace(candidates=[SimpleNamespace(name="int8")]),
        node_pools=[SimpleNamespace(name="small", hourly_price=0.1)],
        slo=SimpleNamespace(latency_p95_ms=100.0),
        quality=SimpleNamespace(max_drop=0.01, metric=SimpleNamespace(value="cosine")))
    line = plan_line(spec)
    assert "gate: quality drop <= 0.01 (cosine)" in line and "cosine<=" not in line


def test_a_candidates_progress_line_says_nothing_of_speed_before_it_is_timed() -> None:
    from leanserve.local.commands import candidate_line

    before = candidate_line("int8", {"quality_drop": 0.0038, "speedup": None, "passed": True})
    assert before == "candidate int8: quality drop 0.0038, passed the gate"
    timed = candidate_line("int8", {"quality_drop": 0.0038, "speedup": 1.75, "passed": True})
    assert "speedup 1.75x" in timed
    assert candidate_line("x", {"error": "boom"}) == "candidate x: error: boom"


def test_run_says_what_the_selected_recipe_cost_when_it_pays_back_and_what_it_holds() -> None:
    """`leanserve run`'s table and report.html carry each candidate's compression cost, the
    requests after which its serving saving repays it, and one serving instance's peak memory
    next to the served file's size (the compression report's own figures)."""
    from rich.console import Console

    from leanserve.local.commands import summary_table

    report = _report()
    comp = report["compression"]
    comp["baseline"]["peak_rss_bytes"] = 300 * 2**20
    cand = comp["candidates"][0]
    cand["peak_rss_bytes"] = 180 * 2**20
    cand["cost"] = {"cpu_seconds": 412.0, "usd": 0.0114, "pool": "small",
                    "serving": {"saving_per_million": 0.2}, "payback_requests": 57_000}
    slower = {**cand, "name": "fp16", "speedup": 0.8, "passed": False, "peak_rss_bytes": None,
              "cost": {"cpu_seconds": 9.0, "usd": None, "serving": {"saving_per_million": -1},
                       "payback_requests": None}}
    comp["candidates"].append(slower)
    report["verdict"] = verdict(report, 100.0)
    console = Console(width=200, record=True)
    console.print(summary_table(report))
    text = console.export_text()
    assert "compression cost of the selected recipe" in text and "412 cpu-s, $0.0114" in text
    assert "pays for itself after" in text and "57,000 requests" in text
    assert "300.0 MiB -> 180.0 MiB" in text
    page = render_html(report, timeline_b64=None, pareto_b64=None)
    assert "pays for itself after" in page and "peak memory (one instance)" in page
    assert "<td>57,000 requests</td>" in page and "<td>412 cpu-s, $0.0114</td>" in page
    assert "<td>180.0 MiB</td>" in page and "<td>never (saves nothing)</td>" in page


def test_sigterm_anywhere_in_a_run_cleans_up_like_ctrl_c(tmp_path: Path, monkeypatch) -> None:
    """Not only during the load burst: profiling and the recheck start tritonservers in their
    own sessions, which a plain SIGTERM (no atexit, no __exit__) would leave running."""
    import os
    import signal

    from leanserve.api.load import load_one
    from leanserve.local import pipeline

    cleaned: list[str] = []

    def run(*args: Any) -> None:
        args[-1][0] = "profiling"  # the phase; any phase before the burst
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            cleaned.append("a tritonserver's __exit__")

    monkeypatch.setattr(pipeline, "_run", run)
    loaded = load_one(Path(__file__).resolve().parents[2] / "examples/minilm-cpu.yaml")
    unhandled: list[int] = []

    def outside(signum: int, _frame: Any) -> None:  # stands in for the default: die at once
        unhandled.append(signum)

    before = signal.signal(signal.SIGTERM, outside)
    try:
        with pytest.raises(KeyboardInterrupt):
            pipeline.run_pipeline(loaded, tmp_path, pipeline.RunSettings(),
                                  say=lambda _m: None)
        assert signal.getsignal(signal.SIGTERM) is outside  # given back after the run
    finally:
        signal.signal(signal.SIGTERM, before)
    assert unhandled == [] and cleaned == ["a tritonserver's __exit__"]
    assert json.loads((tmp_path / "report.json").read_text())["interrupted"] == "profiling"


def test_scrape_targets_written_from_several_threads_never_race(tmp_path: Path) -> None:
    # replicas' boot threads and the main thread both retarget Prometheus; through one shared
    # temporary name the writes raced (FileNotFoundError, or a file without a ready replica)
    from leanserve.local.prometheus import LocalPrometheus

    prom = LocalPrometheus(tmp_path)
    errors: list[BaseException] = []

    def write(k: int) -> None:
        try:
            for i in range(300):
                prom.set_targets([([f"127.0.0.1:{k}{i}"], {"pool": str(k)})])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(json.loads((tmp_path / "targets.json").read_text())) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["targets.json"]


class ChangingTargets:
    def __init__(self, *targets: str) -> None:
        self.targets = list(targets)

    def metrics_targets(self) -> list[tuple[str, str]]:
        return [("small", t) for t in self.targets]


def test_direct_source_counts_replicas_that_started_or_stopped_between_reads() -> None:
    """A reading's rate is every completion since the previous reading: a replica ready since
    then counts from zero, and one that stopped since counts up to its last counters (read by
    ``final_read`` as the platform stops it). Before, a new replica was left out of its first
    interval and a stopped one of its last."""
    now = [100.0]
    counts = {"a:1": 0}

    def fetch(url: str, _timeout: float) -> str:
        target = url.split("//")[1].split("/")[0]
        if target not in counts:
            raise OSError("connection refused")
        return METRICS.format(n=counts[target], q=0, p95=20000)

    targets = ChangingTargets("a:1")
    src = DirectSource(targets, "m", clock=lambda: now[0], fetch=fetch)
    assert src.read().request_rate is None and src.window_seconds is None
    now[0], counts["a:1"], counts["b:1"] = 110.0, 100, 40  # b became ready meanwhile
    targets.targets.append("b:1")
    reading = src.read()
    assert reading.request_rate == pytest.approx(14.0)  # (100 + 40) / 10 s; before: 10
    assert src.window_seconds == pytest.approx(10.0)
    now[0], counts["a:1"], counts["b:1"] = 115.0, 150, 60
    src.final_read("a:1")  # the platform stops a: its last counters
    targets.targets.remove("a:1")
    del counts["a:1"]
    now[0], counts["b:1"] = 120.0, 90
    reading = src.read()
    assert reading.request_rate == pytest.approx(10.0)  # (50 + 50) / 10 s; before: 5
    assert reading.problems == [] and reading.error_kinds == []
    # a new replica on a's old address counts from zero, not from a's last counters
    now[0], counts["a:1"], counts["b:1"] = 130.0, 30, 120
    targets.targets.append("a:1")
    assert src.read().request_rate == pytest.approx(6.0)  # (30 + 30) / 10 s
    # a replica that dies before its last scrape: left out, and the reading says so
    del counts["a:1"]
    src.final_read("a:1")
    targets.targets.remove("a:1")
    now[0], counts["b:1"] = 140.0, 170
    reading = src.read()
    assert reading.request_rate == pytest.approx(5.0)
    assert reading.problems == ["a:1: stopped unread, its completions since the previous "
                                "reading are left out"]
    assert reading.error_kinds == ["unreachable"]


def test_local_source_drops_the_inner_p95_problems_with_their_kinds() -> None:
    """The client p95 replaces the inner source's: its problems go, and so must their kinds
    (the exporter counts kinds; before, an empty Triton p95 was counted as an error on every
    reading whose problems no longer listed it)."""
    answers = {"request_rate": "12", "arrival_rate": "13", "pending": "0"}

    def http(url: str, params: dict[str, str], timeout: float) -> tuple[int, bytes]:
        q = Queries("m", "10s")
        name = next((k for k in answers if getattr(q, k) == params["query"]), None)
        result = ([] if name is None  # p95, queue time and rate by pool: empty
                  else [{"metric": {}, "value": [1.0, answers[name]]}])
        return 200, json.dumps({"status": "success", "data": {"resultType": "vector",
                                                              "result": result}}).encode()

    prom = PrometheusSource("http://127.0.0.1:1", Queries("m", "10s"), clock=lambda: 1.0,
                            http=http)
    inner = prom.read()
    assert inner.error_kinds == ["empty", "empty"]  # p95, queue time
    state = RunState()
    state.records = [(0.1 * i, 30.0, True) for i in range(40)]
    reading = LocalSource(prom, ClientLatency(state, 0.0, 10.0, clock=lambda: 5.0)).read()
    assert reading.p95_ms == 30.0 and reading.request_rate == 12.0
    assert [p.split(":")[0] for p in reading.problems] == ["queue time"]
    assert reading.error_kinds == ["empty"]
    state.records = state.records[:3]  # too few requests in the window: its own problem, kind
    reading = LocalSource(prom, ClientLatency(state, 0.0, 10.0, clock=lambda: 5.0)).read()
    assert reading.p95_ms is None and len(reading.error_kinds) == len(reading.problems) == 2
    assert reading.problems[-1].startswith("p95: only 3") and reading.error_kinds[-1] == "empty"
    # the direct source gives a kind per problem too
    direct = DirectSource(Targets(), "m", clock=lambda: 1.0,
                          fetch=lambda *_a: (_ for _ in ()).throw(OSError("refused")))
    reading = LocalSource(direct, ClientLatency(state, 0.0, 10.0, clock=lambda: 5.0)).read()
    assert len(reading.error_kinds) == len(reading.problems) == 4
    assert reading.error_kinds == ["unreachable", "unreachable", "empty", "empty"]


def test_the_decision_windows_follow_the_interval() -> None:
    """Each decision reads its whole interval: a 30 s interval (the spec's default) decided on
    the last 10 s of it before. Prometheus' rate() window is never under four scrapes."""
    assert rate_window(30, 1) == 30 and rate_window(5, 1) == 5
    assert rate_window(3, 1) == 4 and rate_window(5, 2) == 8  # rate() needs two samples in it
    assert rate_window(30, 1, fixed=10) == 10
    assert RunSettings().metrics_window_s is None  # the interval unless set


class LiveServer(FakeServer):
    """A fake tritonserver that runs until the test kills it, for the run's own loop."""

    fail_from = 2  # the second server started and later ones fail at start

    def __init__(self, repo: Path, *, log_dir: Path) -> None:
        super().__init__(repo, log_dir=log_dir,
                         fail=len(FakeServer.started) + 1 >= LiveServer.fail_from)
        self.running, self.returncode = True, None


def _burst_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, interval_s: int,
                stop_at: int, error: type[BaseException], drive_fails: bool = False
                ) -> tuple[Any, dict[str, Any]]:
    """`leanserve run`'s load burst on fake replicas and fake counters (everything before it
    stubbed; no Prometheus): the first replica dies after decision 1, its replacement fails to
    start, and ``error`` is raised at decision ``stop_at``. Returns (the spec, report.json)."""
    import dataclasses

    import leanserve.compression.pipeline as compression
    import leanserve.serving.profile as profiling
    from leanserve.api.load import load_one
    from leanserve.autoscaling import policy
    from leanserve.local import pipeline, platform

    loaded = load_one(Path(__file__).resolve().parents[2] / "examples/minilm-cpu.yaml")
    spec = loaded.spec.model_copy(update={"autoscaling": loaded.spec.autoscaling.model_copy(
        update={"interval_seconds": interval_s})})
    loaded = dataclasses.replace(loaded, resource=loaded.resource.model_copy(
        update={"spec": spec}))
    FakeServer.started = []
    pools = {p.name: {"capacity_rps": 100.0, "cost_per_million_requests": 0.3,
                      "measured": True} for p in spec.node_pools}
    monkeypatch.setattr(compression, "compress", lambda *_a, **_k: {"selected": "int8"})
    monkeypatch.setattr(profiling, "profile_repository",
                        lambda *_a, **_k: {"config": {}, "pools": pools})
    monkeypatch.setattr(pipeline, "recheck", lambda *_a, **_k: {"noisy": False})
    monkeypatch.setattr(pipeline, "_local_replica",
                        lambda *_a: {"capacity_rps": 100.0, "config": {}})
    monkeypatch.setattr(pipeline, "_local_repository", lambda *_a: tmp_path)
    monkeypatch.setattr(pipeline, "_served_model", lambda _repo: "m")
    monkeypatch.setattr(pipeline, "_payloads", lambda *_a: [{}])
    monkeypatch.setattr(pipeline, "_metrics_source", lambda *_a: (None, "direct (test)"))
    monkeypatch.setattr(pipeline, "LocalPlatform", lambda repo, logs: LocalPlatform(
        repo, logs, server_factory=LiveServer))
    monkeypatch.setattr(platform, "_live", lambda r: True)
    served = [0]

    def fetch(url: str, _timeout: float) -> str:  # a dead replica's port refuses
        if not any(s.running and s.metrics_url == url for s in FakeServer.started):
            raise OSError("connection refused")
        served[0] += 5
        return METRICS.format(n=served[0], q=0, p95=20000)

    monkeypatch.setattr(pipeline, "DirectSource", lambda *a, **k: DirectSource(
        *a, **k, fetch=fetch))

    def drive(*args: Any) -> None:  # the clients' requests, sent at these offsets
        state = args[6]
        with state.lock:  # slow ones done by 0.7 s; fast ones in the second interval
            state.records += [(0.1 + 0.01 * i, 600.0, True) for i in range(20)]
            state.records += [(interval_s * 1.35 + 0.015 * i, 20.0, True) for i in range(20)]
        if drive_fails:
            raise ValueError("no endpoints")

    monkeypatch.setattr(pipeline, "_drive", drive)
    calls = [0]

    def decide(*args: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            FakeServer.started[0].running = False  # found by the next health check
            FakeServer.started[0].returncode = -9
        if calls[0] == stop_at:
            raise error("boom")
        return policy.decide(*args)

    monkeypatch.setattr(pipeline, "decide", decide)
    with pytest.raises(error):
        pipeline.run_pipeline(loaded, tmp_path, RunSettings(load_seconds=30.0),
                              say=lambda _m: None)
    return loaded, json.loads((tmp_path / "report.json").read_text())


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_a_run_stopped_mid_burst_reports_replicas_and_windows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: type[BaseException]) -> None:
    """Interrupted or crashed mid-burst, the report still holds what the platform saw (before,
    replica_errors and replicas_replaced were written only by a burst that ran to its end, and
    an unexpected exception wrote no report at all), the replicas ready over time next to the
    ones asked for, and the windows each decision read: the whole interval. The only replica
    dies, so the next decision has no metrics and holds: at the replicas as set, which replaces
    the dead one (before, it held at the survivors: none, and nothing was ever started again)."""
    _loaded, report = _burst_only(monkeypatch, tmp_path, interval_s=1, stop_at=3, error=error)
    if error is KeyboardInterrupt:
        assert report["interrupted"] == "the load burst"
    else:
        assert report["error"] == "during the load burst: unexpected RuntimeError: boom"
    assert report["verdict"]["status"] == ("interrupted" if error is KeyboardInterrupt
                                           else "failed")
    assert report["replicas_replaced"] == ["cpu-small-1: exited with code -9"]
    assert len(report["replica_errors"]) == 1 and "boom" in report["replica_errors"][0]
    first, second = report["autoscaling"]
    assert first["replicas"] == second["replicas"] == {"cpu-small": 1, "cpu-large": 0}
    assert second["code"] == "MetricsUnavailable" and second["problems"][0].endswith(
        "stopped unread, its completions since the previous reading are left out")
    # ready: one at the start, none once the dead one was reaped (its replacement never was)
    ready = report["replicas_ready"]
    assert ready[0] == {"time_s": 0.0, "ready": {"cpu-small": 1}}
    assert ready[-1]["ready"] == {} and first["time_s"] < ready[-1]["time_s"] < \
        second["time_s"] + 0.5
    # each decision read its interval: the rate since the previous reading, the clients' p95
    # over the last interval (the slow requests done by 0.7 s are out of the second's; a 10 s
    # window read them until t=10.7)
    assert first["p95_window_s"] == second["p95_window_s"] == 1.0
    assert first["rate_window_s"] == pytest.approx(1.0, abs=0.3), first
    assert second["rate_window_s"] is None  # no rate read
    assert second["observed_p95_ms"] == 20.0, second
    assert "over the last 1 s" in report["metrics_source"]
    assert (tmp_path / "report.html").exists() and (tmp_path / "timeline.png").exists()


def test_a_load_generator_that_dies_ends_the_run_with_what_it_sent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception in the load thread ends the run at the next decision with a clear error and
    the report of what was sent; before, the thread died with a traceback on stderr and the run
    went on autoscaling no load to the end."""
    from leanserve.local.pipeline import RunError

    _loaded, report = _burst_only(monkeypatch, tmp_path, interval_s=1, stop_at=99,
                                  error=RunError, drive_fails=True)
    assert report["error"].endswith("the load generator stopped: ValueError: no endpoints (the "
                                    "requests sent until then are in the report)")
    assert report["verdict"]["status"] == "failed"
    assert len(report["autoscaling"]) <= 1
    assert sum(b["offered_rps"] * 2.0 for b in report["timeline"]) == pytest.approx(40)


def test_an_unexpected_exception_writes_the_report_then_goes_on_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug (any exception that is not a LeanserveError) still writes what was done, and the
    command says where it is before the traceback; before, it skipped the report."""
    from rich.console import Console

    from leanserve.local import pipeline
    from leanserve.local.commands import run_command

    def run(*args: Any) -> None:
        args[5]["compression"] = {"selected": None, "candidates": [], "metric": "cosine"}
        args[-1][0] = "profiling"
        raise RuntimeError("boom")

    monkeypatch.setattr(pipeline, "_run", run)
    console = Console(width=300, record=True)
    with pytest.raises(RuntimeError, match="boom"):
        run_command(Path(__file__).resolve().parents[2] / "examples/minilm-cpu.yaml",
                    workdir=tmp_path, load_seconds=1.0, console=console)
    text = console.export_text()
    assert "unexpected error RuntimeError: boom" in text
    assert f"report of what was done is in {tmp_path / 'report.html'}" in text
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["error"] == "during profiling: unexpected RuntimeError: boom"
    assert report["compression"]["metric"] == "cosine"  # what was done is kept
    assert report["verdict"]["status"] == "failed" and (tmp_path / "report.html").exists()
