"""`leanserve run`'s load burst against a real, slow HTTP server (KServe v2 infer, as much of
it as tritonclient's HTTP client needs): the load stays on the clock however slow the server,
follows the replicas as they change, and stops within a fraction of a second."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from leanserve.local.pipeline import RunState, _drive
from leanserve.serving.loadgen import LoadSpec, Record, run_load

pytestmark = pytest.mark.integration

PAYLOADS = [{"x": np.zeros((1, 4), dtype=np.float32)}]


class SlowServer(ThreadingHTTPServer):
    """Answers every infer after ``delay_s`` (one thread per connection: no queueing of its
    own), and counts what it received."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(("127.0.0.1", 0), SlowInfer)
        self.delay_s = delay_s
        self.closing = False  # then every request fails at once, as on a stopped replica
        self.received = 0
        self.count_lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up on a request it stopped waiting for


class SlowInfer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as tritonclient's pooled connections expect
    server: SlowServer

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.server.closing:
            self.send_error(503)
            return
        with self.server.count_lock:
            self.server.received += 1
        time.sleep(self.server.delay_s)
        model = self.path.split("/")[3] if self.path.startswith("/v2/models/") else ""
        body = json.dumps({"model_name": model, "outputs": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _serve(delay_s: float) -> Iterator[SlowServer]:
    server = SlowServer(delay_s)
    thread = threading.Thread(target=server.serve_forever, name="slow-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()  # joins the handler threads (each ends when its client hangs up)
        thread.join(5)


@pytest.fixture
def slow() -> Iterator[SlowServer]:
    yield from _serve(1.5)


@pytest.fixture
def slow_b() -> Iterator[SlowServer]:
    yield from _serve(1.5)


class Replicas:
    """The replicas a LocalPlatform reports ready: ``first`` at the first read, then ``later``."""

    def __init__(self, first: list[str], later: list[str]) -> None:
        self.first, self.later = first, later
        self.reads = 0

    def endpoints(self) -> list[tuple[str, str]]:
        urls = self.first if self.reads == 0 else self.later
        self.reads += 1
        return [("small", u) for u in urls]


def test_the_load_stays_on_the_clock_when_the_server_is_slower_than_a_segment(
        slow: SlowServer) -> None:
    # 50 req/s (Poisson) for 2 s in 0.5 s segments at a server taking 1.5 s: before, each
    # segment waited for its requests, so the second began at 2 s and 17 of the 90 requests
    # drawn were sent (the offered load and the SLO figures read a fifth of the overload)
    rate, seconds, segment = 50.0, 2.0, 0.5
    state = RunState()
    began = time.monotonic()
    _drive(Replicas([slow.url], [slow.url]), "slow", PAYLOADS,  # type: ignore[arg-type]
           lambda _t: rate, seconds, began, state, threading.Event(), segment_s=segment)
    took = time.monotonic() - began
    sent = [t for t, _lat, _ok in state.records]
    assert len(sent) >= 0.85 * rate * seconds, f"{len(sent)} of {rate * seconds:.0f} sent"
    assert slow.received == len(sent)
    # every segment sent its share (Poisson: 17 to 28 of 25 here), at the scheduled times
    per_segment = Counter(int(t // segment) for t in sent)
    assert sorted(per_segment) == [0, 1, 2, 3]
    assert min(per_segment.values()) >= 0.5 * rate * segment, per_segment
    assert all(ok for _t, _lat, ok in state.records)
    # latency from the scheduled time: the server's 1.5 s, not hidden by a late send
    lats = sorted(lat for _t, lat, _ok in state.records if lat is not None)
    assert lats[0] >= 1450 and lats[-1] < 3000
    # every segment's planned rate is noted when it starts, on the clock
    assert [round(t / segment) * segment for t, _r in state.offered] == [0.0, 0.5, 1.0, 1.5]
    assert took < seconds + 1.5 + 2.0  # the tail drains once, at the end


def test_the_load_follows_the_replicas_and_stops_within_a_fraction_of_a_second(
        slow: SlowServer, slow_b: SlowServer) -> None:
    replicas = Replicas([slow.url], [slow.url, slow_b.url])  # a second one from the next read
    state = RunState()
    stop = threading.Event()
    before = set(threading.enumerate())
    began = time.monotonic()
    loader = threading.Thread(target=_drive, name="load", daemon=True,
                              args=(replicas, "slow", PAYLOADS, lambda _t: 40.0, 30.0, began,
                                    state, stop, 0.5))
    loader.start()
    time.sleep(1.2)
    stopped = time.monotonic()
    stop.set()
    loader.join(5)
    assert not loader.is_alive()
    assert time.monotonic() - stopped < 0.5
    # B from the segment it appeared in (least outstanding: it takes the load until it holds
    # as many in flight as A)
    assert slow.received > 0 and slow_b.received > 0
    assert 30 <= slow.received + slow_b.received <= 70  # 40 req/s for 1.2 s
    assert state.records == []  # nothing answered yet (1.5 s); cancelled ones are not records
    time.sleep(0.1)
    # no thread of the load left behind (the servers' own still sleep on cancelled requests)
    left = {t for t in threading.enumerate() if "process_request" not in t.name}
    assert left <= before


def test_requests_over_the_in_flight_cap_are_dropped_and_reported(slow: SlowServer) -> None:
    got: list[Record] = []
    result = run_load([slow.url], PAYLOADS,
                      LoadSpec(model="slow", rate=50.0, duration_s=0.6, arrivals="constant",
                               max_outstanding=5, timeout_s=5.0),
                      on_result=got.append)
    dropped = [r for r in got if "backlog full" in r.error]
    assert len(got) == result["requests"] == 29  # every scheduled request, each reported once
    assert slow.received == 5 and len(dropped) == 24
    assert all(r.server == -1 and not r.ok for r in dropped)
    assert result["errors"] == 24


def test_a_request_due_while_no_replica_is_ready_fails_instead_of_going_unsent(
        slow: SlowServer) -> None:
    got: list[Record] = []
    result = run_load(lambda t: [] if t < 0.5 else [slow.url], PAYLOADS,
                      LoadSpec(model="slow", rate=20.0, duration_s=1.0, arrivals="constant"),
                      on_result=got.append, refresh_s=0.5)
    assert len(got) == result["requests"] == 19  # 0.05, 0.10, ... 0.95 s
    assert all((r.error == "no server to send to") == (r.scheduled < 0.5) for r in got)
    early = sum(r.scheduled < 0.5 for r in got)
    assert 9 <= early <= 10 and result["errors"] == early
    assert slow.received == 19 - early
    assert result["servers"] == [slow.url]


class Shrinking:
    """Two replicas, then one: the second leaves the ready list at ``at_s`` and fails every
    request from then on (the worst case; LocalPlatform also waits drain_s before it stops
    the process)."""

    def __init__(self, keep: SlowServer, leaving: SlowServer, at_s: float) -> None:
        self.keep, self.leaving, self.at = keep, leaving, time.monotonic() + at_s
        self.timer = threading.Timer(at_s, lambda: setattr(leaving, "closing", True))
        self.timer.start()

    def endpoints(self) -> list[tuple[str, str]]:
        if time.monotonic() < self.at:
            return [("small", self.keep.url), ("small", self.leaving.url)]
        return [("small", self.keep.url)]


def test_a_replica_scaled_down_mid_segment_gets_no_more_requests() -> None:
    """The ready replicas are re-read every 0.1 s, not once a 2 s segment: before, a replica
    scaled down kept being picked until the segment ended, a closed port fails at once (so the
    balancer, least outstanding, sent it most of the load), and 40 of ~68 requests failed; each
    counts as the client's 10 s timeout in the p95 the autoscaler reads."""
    from leanserve.local.pipeline import ClientLatency

    fast = [_serve(0.05), _serve(0.05)]
    keep, leaving = (next(g) for g in fast)
    try:
        state = RunState()
        began = time.monotonic()
        replicas = Shrinking(keep, leaving, 0.7)
        _drive(replicas, "fast", PAYLOADS,  # type: ignore[arg-type]
               lambda _t: 40.0, 2.0, began, state, threading.Event())
        replicas.timer.join()
        failed = [t for t, _lat, ok in state.records if not ok]
        assert len(state.records) >= 60 and len(failed) <= 3, failed
        assert keep.received > leaving.received > 0
        p95, n = ClientLatency(state, began, 2.0, clock=lambda: began + 2.3).p95()
        assert n >= 60 and p95 is not None and p95 < 1000
    finally:
        for g in fast:
            g.close()
