"""How the synchronous autoscaling step reaches the operator's event loop, and how a stop does.

The policy and its metric source are synchronous (leanserve.autoscaling, shared with `leanserve
run`), so each step runs in a worker thread. Every request the step makes — its Prometheus
queries and its Kubernetes writes — runs on the operator's event loop through this bridge, never
as blocking I/O in the thread. That is what lets the operator stop at once: a blocking query in a
thread cannot be interrupted, and ``asyncio.run`` joins the default executor's threads before it
returns, so a Prometheus that never answers held every SIGTERM (each rollout of the operator's
Deployment) for up to one query timeout per query of the step.

On ``stop`` (the operator is stopping: SIGTERM, SIGINT, its stop flag, a lost Lease) queries in
flight are cancelled and no new request starts, except that a step which has begun writing its
decision (it scaled a Deployment) may finish writing it (the status) until ``abort``, which the
caller calls after a short grace (STOP_GRACE_SECONDS) and which cancels every request. A write is
one request, applied by the API server whole or not at all, and a decision's writes are begun
only before a stop: a decision is written or it is not.

The Prometheus host's name is looked up in a daemon thread of its own (``DaemonResolver``):
aiohttp's default resolver runs getaddrinfo in the loop's executor, which asyncio.run joins, and
a DNS server that does not answer holds getaddrinfo for its timeouts (glibc: 5 s, twice).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import socket
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from leanserve.autoscaling.errors import MetricsError

T = TypeVar("T")

STOP_GRACE_SECONDS = 1.0
"""How long a stopping operator lets a step finish writing a decision it has begun to write."""


class Request(enum.Enum):
    """What a request is to a stopping operator."""

    QUERY = "query"  # a read: cancelled by stop
    WRITE = "write"  # a decision's first write: refused after stop, finished once begun
    FINISH = "finish"  # the rest of a decision being written: sent after stop until abort


class Stopped(BaseException):
    """The operator is stopping: the step ends where it is.

    A BaseException, like asyncio.CancelledError, so that the metric source's catch-all for
    transport failures does not turn it into "no data" and carry on with the next query."""


Lookup = Callable[..., list[tuple[Any, ...]]]


class DaemonResolver(AbstractResolver):
    """aiohttp's resolver, with getaddrinfo in a daemon thread per lookup (aiohttp caches the
    answers): a lookup abandoned by a stop holds neither asyncio.run's executor shutdown nor
    the interpreter's exit, and delivers nothing once the loop is gone."""

    def __init__(self, lookup: Lookup = socket.getaddrinfo) -> None:
        self._lookup = lookup

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[list[tuple[Any, ...]]] = loop.create_future()

        def deliver(result: list[tuple[Any, ...]] | None, error: BaseException | None) -> None:
            if answer.done():
                return  # the request was cancelled meanwhile
            if error is not None:
                answer.set_exception(error)
            else:
                answer.set_result(result or [])

        def look_up() -> None:
            result, error = None, None
            try:
                result = self._lookup(host, port, family=family, type=socket.SOCK_STREAM)
            except Exception as exc:  # gaierror and the like: the request's failure
                error = exc
            # RuntimeError: the loop is closed, nobody waits for this answer any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(deliver, result, error)

        threading.Thread(target=look_up, name=f"resolve-{host}", daemon=True).start()
        infos = await answer
        found: list[ResolveResult] = []
        for fam, _, proto, _, address in infos:
            ip = str(address[0])
            if fam == socket.AF_INET6 and len(address) > 3 and address[3]:
                ip = f"{ip}%{address[3]}"  # a link-local address keeps its scope
            found.append({"hostname": host, "host": ip, "port": int(address[1]),
                          "family": fam, "proto": proto,
                          "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV})
        return found

    async def close(self) -> None:
        pass


class Bridge:
    """Runs the step's requests on ``loop``; ``call`` is for the worker thread, ``stop``,
    ``abort`` and ``close`` for the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 resolver: AbstractResolver | None = None) -> None:
        self._loop = loop
        self._resolver = resolver
        self._stopping = threading.Event()
        self._aborted = False  # read and written on the loop only
        self._calls: dict[asyncio.Task[Any], Request] = {}  # in flight
        self._session: aiohttp.ClientSession | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float,
             kind: Request = Request.QUERY) -> T:
        """Run ``coro`` on the loop and wait for it (worker thread only).

        Stopped when the operator stops first (see Request); TimeoutError after ``timeout``
        seconds (the request is cancelled)."""
        if self.stopping and kind is not Request.FINISH:
            coro.close()
            raise Stopped
        future = asyncio.run_coroutine_threadsafe(self._tracked(coro, kind), self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.CancelledError:
            raise Stopped from None
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no answer within {timeout:g}s") from None

    async def _tracked(self, coro: Coroutine[Any, Any, T], kind: Request) -> T:
        # On the loop, like stop and abort: a request starts either before them (and is
        # cancelled by them as its kind says) or after (and never starts).
        if self._aborted or (self.stopping and kind is not Request.FINISH):
            coro.close()
            raise asyncio.CancelledError
        task = asyncio.current_task()
        assert task is not None
        self._calls[task] = kind
        try:
            return await coro
        finally:
            self._calls.pop(task, None)

    def http_get(self, url: str, params: dict[str, str], timeout: float) -> tuple[int, bytes]:
        """leanserve.autoscaling.metrics.HttpGet on the loop's own session (no Kubernetes
        credentials: a session of its own, not the API client's)."""
        return self.call(self._get(url, params, timeout), timeout + 1.0)

    async def _get(self, url: str, params: dict[str, str], timeout: float) -> tuple[int, bytes]:
        if self._session is None:
            # trust_env: the proxy variables apply, as they did with requests
            self._session = aiohttp.ClientSession(
                trust_env=True,
                connector=aiohttp.TCPConnector(resolver=self._resolver or DaemonResolver()))
        try:
            async with self._session.get(url, params=params,
                                         timeout=aiohttp.ClientTimeout(total=timeout)) as reply:
                return reply.status, await reply.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:  # as metrics.requests_get
            raise MetricsError(f"Prometheus unreachable at {url}: "
                               f"{exc.__class__.__name__}") from None

    def stop(self) -> None:
        """Cancel the queries in flight; from now on only a decision being written proceeds."""
        self._stopping.set()
        for task, kind in list(self._calls.items()):
            if kind is Request.QUERY:
                task.cancel()

    def abort(self) -> None:
        """Cancel every request in flight and refuse every new one."""
        self._stopping.set()
        self._aborted = True
        for task in list(self._calls):
            task.cancel()

    async def close(self) -> None:
        self.abort()
        if self._session is not None:
            await self._session.close()
            self._session = None
