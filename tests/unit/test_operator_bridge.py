"""Stopping an autoscaling step: its requests run on the operator's loop (operator/bridge.py).

A Prometheus stand-in that accepts connections and never answers holds a query for as long as
the query's timeout, set here to a minute; every test below ends long before that, because the
stop cancels the query rather than waiting for it. The tests run the real bridge, the real
aiohttp request and ``handlers.autoscale_once`` with a step function of their own.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import kopf
import pytest

from leanserve.autoscaling.metrics import PrometheusSource, Queries
from leanserve.operator.bridge import Bridge, DaemonResolver, Request, Stopped
from leanserve.operator.handlers import Runtime, autoscale_once
from leanserve.operator.metrics import OperatorMetrics
from leanserve.operator.settings import OperatorSettings

HANG = 60.0  # the query timeout: far longer than any test here may take


class Silent:
    """A TCP server that accepts and never answers; counts connections and their closing."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = threading.Semaphore(0)
        self.closed = threading.Event()  # a client closed its connection (EOF)
        self.count = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.count += 1
            self.accepted.release()
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    if not conn.recv(65536):
                        self.closed.set()
                        return
                except OSError:
                    return

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        self.sock.close()
        self._thread.join(timeout=5)


@pytest.fixture
def silent() -> Iterator[Silent]:
    server = Silent()
    try:
        yield server
    finally:
        server.close()


async def accepted(server: Silent) -> None:
    assert await asyncio.to_thread(server.accepted.acquire, True, 10), "no query arrived"


async def test_stop_cancels_a_query_in_flight_and_the_step_thread_ends(silent: Silent) -> None:
    bridge = Bridge(asyncio.get_running_loop())
    step = asyncio.create_task(asyncio.to_thread(
        bridge.http_get, silent.url + "/api/v1/query", {"query": "up"}, HANG))
    await accepted(silent)
    bridge.stop()
    with pytest.raises(Stopped):
        await asyncio.wait_for(step, HANG / 2)
    # the request was cancelled, not abandoned: its connection is closed, no thread waits on it
    assert await asyncio.to_thread(silent.closed.wait, 10)
    # and nothing new starts: a second query is refused without a connection
    with pytest.raises(Stopped):
        await asyncio.to_thread(bridge.http_get, silent.url, {}, HANG)
    await bridge.close()
    assert silent.count == 1


def test_a_name_lookup_that_never_returns_holds_no_exit() -> None:
    """A DNS server that does not answer holds getaddrinfo for its timeouts (glibc: 5 s, twice).
    aiohttp's default resolver runs it in the loop's executor, which asyncio.run joins; the
    bridge's resolver does not, so the operator's asyncio.run returns with the lookup pending."""
    started, released = threading.Event(), threading.Event()

    def lookup(*args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        started.set()
        released.wait(HANG)
        raise socket.gaierror("no answer")

    async def main() -> None:
        bridge = Bridge(asyncio.get_running_loop(), DaemonResolver(lookup))
        step = asyncio.create_task(asyncio.to_thread(
            bridge.http_get, "http://prometheus.example:9090/api/v1/query", {}, HANG))
        assert await asyncio.to_thread(started.wait, 10)
        bridge.stop()
        with pytest.raises(Stopped):
            await step
        await bridge.close()

    try:
        asyncio.run(main())
        assert started.is_set() and not released.is_set()  # returned, the lookup still pending
    finally:
        released.set()


async def test_the_resolver_answers_as_aiohttp_expects() -> None:
    found = await DaemonResolver().resolve("localhost", 9090, socket.AF_INET)
    assert {"host": "127.0.0.1", "port": 9090, "hostname": "localhost"}.items() <= \
        found[0].items()

    def unknown(*args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    with pytest.raises(socket.gaierror):  # an OSError: aiohttp's ClientConnectorDNSError
        await DaemonResolver(unknown).resolve("prometheus.example", 9090)


async def test_an_unreachable_prometheus_is_no_data_in_one_line() -> None:
    """The bridge's transport failures read as metrics.requests_get's did: MetricsError, kind
    unreachable, named by the error's class."""
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    bridge = Bridge(asyncio.get_running_loop())
    source = PrometheusSource(f"http://127.0.0.1:{port}", Queries("m"), clock=time.time,
                              http=bridge.http_get)
    reading = await asyncio.to_thread(source.read)
    await bridge.close()
    assert reading.request_rate is None and set(reading.error_kinds) == {"unreachable"}
    assert reading.problems[0] == f"request rate: Prometheus unreachable at " \
        f"http://127.0.0.1:{port}/api/v1/query: ClientConnectorError"


async def test_a_decision_being_written_is_finished_after_stop_until_abort() -> None:
    bridge = Bridge(asyncio.get_running_loop())
    release = asyncio.Event()
    written: list[str] = []

    async def write(what: str) -> str:
        await release.wait()
        written.append(what)
        return what

    # a write in flight at the stop is not cancelled, and the rest of its decision may follow
    first = asyncio.create_task(asyncio.to_thread(bridge.call, write("scale"), HANG,
                                                  Request.WRITE))
    while not bridge._calls:
        await asyncio.sleep(0.01)
    bridge.stop()
    rest = asyncio.create_task(asyncio.to_thread(bridge.call, write("status"), HANG,
                                                 Request.FINISH))
    release.set()
    assert await first == "scale" and await rest == "status"
    assert written == ["scale", "status"]
    # a step that has not begun writing writes nothing once the operator stops
    with pytest.raises(Stopped):
        await asyncio.to_thread(bridge.call, write("late"), HANG, Request.WRITE)
    # after abort, not even the rest of a decision is sent, and one in flight is cancelled
    release.clear()
    hanging = asyncio.create_task(asyncio.to_thread(bridge.call, write("cut"), HANG,
                                                    Request.FINISH))
    while not bridge._calls:
        await asyncio.sleep(0.01)
    bridge.abort()
    with pytest.raises(Stopped):
        await hanging
    with pytest.raises(Stopped):
        await asyncio.to_thread(bridge.call, write("after"), HANG, Request.FINISH)
    assert written == ["scale", "status"]
    await bridge.close()


async def test_a_call_times_out_and_its_request_is_cancelled() -> None:
    bridge = Bridge(asyncio.get_running_loop())
    cancelled = asyncio.Event()

    async def never() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError):
        await asyncio.to_thread(bridge.call, never(), 0.2)
    await asyncio.wait_for(cancelled.wait(), 10)
    await bridge.close()


def serving_model() -> dict[str, Any]:
    return {"metadata": {"name": "m", "namespace": "ns"},
            "spec": {"autoscaling": {"intervalSeconds": 30}},
            "status": {"phase": "Serving"}}


async def test_a_cancelled_autoscale_once_stops_its_step_and_the_thread_ends(
        silent: Silent) -> None:
    """What the operator's cleanup does to a step blocked on a Prometheus that never answers:
    the loop task is cancelled, the query with it, and the worker thread ends (asyncio.run's
    executor shutdown, which joins it, no longer waits for the query's timeout)."""
    ended = threading.Event()

    def step(body: dict[str, Any], rt: Runtime, logger: Any, bridge: Bridge,
             deployments: Any) -> None:
        try:
            bridge.http_get(silent.url + "/api/v1/query", {"query": "up"}, HANG)
        finally:
            ended.set()

    rt = Runtime(settings=OperatorSettings(), metrics=OperatorMetrics(),
                 login=lambda: kopf.ConnectionInfo(server="http://127.0.0.1:1"),
                 autoscale=step, serving_index={})
    task = asyncio.create_task(autoscale_once(rt, ("ns", "m"), serving_model(), None))
    await accepted(silent)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, HANG / 2)
    assert ended.is_set(), "the step's thread outlived the operator's loop task"
    assert rt.bridge is not None and rt.bridge.stopping
    assert await asyncio.to_thread(silent.closed.wait, 10)
    await rt.bridge.close()


async def test_a_cancelled_autoscale_once_lets_a_decision_being_written_finish() -> None:
    release = threading.Event()
    written: list[dict[str, Any]] = []

    async def patch(what: dict[str, Any]) -> None:
        written.append(what)

    def step(body: dict[str, Any], rt: Runtime, logger: Any, bridge: Bridge,
             deployments: Any) -> dict[str, Any]:
        bridge.call(patch({"scale": 2}), HANG, Request.WRITE)  # the decision's first write
        release.wait(HANG)  # the operator is told to stop here
        bridge.call(patch({"status": 2}), HANG, Request.FINISH)
        return {"autoscaling": {"replicas": 2}}

    rt = Runtime(settings=OperatorSettings(), metrics=OperatorMetrics(),
                 login=lambda: kopf.ConnectionInfo(server="http://127.0.0.1:1"),
                 autoscale=step, serving_index={})
    task = asyncio.create_task(autoscale_once(rt, ("ns", "m"), serving_model(), None))
    while not written:
        await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.sleep(0.05)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, HANG / 2)
    assert written == [{"scale": 2}, {"status": 2}]
    assert rt.bridge is not None
    await rt.bridge.close()


async def test_a_reconcile_queued_behind_an_autoscaling_step_plans_from_its_result(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A child's event takes the model's body, then waits for the lock an autoscaling step
    holds; the step's status write replaces the body. The reconcile must plan from the new one,
    or it applies the replicas the step had just replaced."""
    from leanserve.operator import handlers

    rt = Runtime(settings=OperatorSettings(), metrics=OperatorMetrics(),
                 login=lambda: kopf.ConnectionInfo(server="http://127.0.0.1:1"),
                 serving_index={})
    key = ("ns", "m")
    rt.models[key] = serving_model()
    taken = rt.models[key]  # what child_event hands to reconcile
    planned: list[dict[str, Any]] = []

    async def plan(rt_: Runtime, body: dict[str, Any], logger: Any) -> float | None:
        planned.append(body)
        return None

    monkeypatch.setattr(handlers, "_reconcile", plan)
    async with rt.lock(*key):  # the autoscaling step
        waiting = asyncio.create_task(handlers.reconcile(rt, taken, None))
        await asyncio.sleep(0.01)
        handlers.remember_status(rt, key, {"autoscaling": {"last": {"replicas": {"a": 3}}}})
    await waiting
    assert planned[0]["status"]["autoscaling"]["last"]["replicas"] == {"a": 3}

