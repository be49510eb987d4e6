"""An open-loop load generator for Triton over HTTP and gRPC (tritonclient's asyncio clients).

Open loop means requests leave at their scheduled times whether or not earlier ones came back,
as real users do, and latency is measured from the scheduled time, so a slow server cannot hide
its queueing by slowing the generator down (coordinated omission). Arrivals are Poisson or
constant at a fixed rate or at a rate that is a function of time (``leanserve run`` drives a
rising-then-falling burst); load may be spread over several servers, round-robin or to the one
with the fewest outstanding requests, and in open loop the set of servers may change during the
run (re-read on the clock, without pausing the arrivals). A closed-loop mode (N clients back to
back) and a concurrency sweep are there for the classic throughput curve.

The pure parts (arrival schedules, balancers, the summary) are separate functions so they can be
tested without a server; the clock is injected.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from leanserve.serving.errors import LoadError
from leanserve.serving.inputs import wire_type


class Protocol(str, enum.Enum):
    HTTP = "http"
    GRPC = "grpc"


class Arrivals(str, enum.Enum):
    POISSON = "poisson"
    CONSTANT = "constant"


class Balance(str, enum.Enum):
    ROUND_ROBIN = "round-robin"
    LEAST_OUTSTANDING = "least-outstanding"


RateSchedule = Callable[[float], float]
#: The servers to send to: a fixed list of URLs or, in open loop, a function of the seconds since
#: the start that gives the URLs to spread the next ``refresh_s`` seconds of arrivals over.
Servers = Sequence[str] | Callable[[float], Sequence[str]]


@dataclass(frozen=True)
class LoadSpec:
    """What load to drive. Exactly one of ``rate``, ``rate_schedule`` or ``concurrency``."""

    model: str
    protocol: Protocol = Protocol.HTTP
    #: Open loop: requests per second.
    rate: float | None = None
    #: Open loop: requests per second as a function of seconds since the start.
    rate_schedule: RateSchedule | None = None
    #: Closed loop: clients sending back to back.
    concurrency: int | None = None
    duration_s: float = 10.0
    arrivals: Arrivals = Arrivals.POISSON
    #: Seconds at the start whose requests are sent but left out of the statistics.
    warmup_s: float = 0.0
    #: Per-request client timeout; a request past it counts as an error.
    timeout_s: float = 10.0
    #: Requests in flight beyond this are dropped and counted as errors (the client's queue).
    max_outstanding: int = 1024
    balance: Balance = Balance.ROUND_ROBIN
    seed: int = 0

    def __post_init__(self) -> None:
        # accept the plain strings a CLI or a JSON file gives, keep enums inside
        for name, kind in (("protocol", Protocol), ("arrivals", Arrivals), ("balance", Balance)):
            value = getattr(self, name)
            if not isinstance(value, kind):
                try:
                    object.__setattr__(self, name, kind(value))
                except ValueError:
                    allowed = ", ".join(k.value for k in kind)
                    raise LoadError(f"{name} {value!r} not supported (allowed: {allowed})"
                                    ) from None

    def validate(self) -> None:
        modes = [self.rate is not None, self.rate_schedule is not None,
                 self.concurrency is not None]
        if sum(modes) != 1:
            raise LoadError("give exactly one of --rate (open loop) or --concurrency "
                            "(closed loop)")
        if self.rate is not None and not self.rate > 0:
            raise LoadError(f"rate {self.rate} out of range (allowed: > 0 requests/s)")
        if self.concurrency is not None and self.concurrency < 1:
            raise LoadError(f"concurrency {self.concurrency} out of range (allowed: >= 1)")
        if not self.duration_s > 0:
            raise LoadError(f"duration {self.duration_s} out of range (allowed: > 0 s)")


@dataclass
class Record:
    """One request: when it was due, how long it took (seconds), and how it ended."""

    scheduled: float
    latency: float | None
    ok: bool
    server: int
    error: str = ""


# --------------------------------------------------------------------------------------------
# pure parts


def arrival_offsets(rate: RateSchedule, duration_s: float, arrivals: Arrivals,
                    rng: np.random.Generator, *, idle_step_s: float = 0.01) -> list[float]:
    """Send times in [0, duration_s) for a (possibly time-varying) rate.

    Poisson gaps are exponential with the rate at the current time (piecewise-constant
    intensity); constant gaps are 1/rate. Where the rate is 0 time advances by ``idle_step_s``.
    """
    times: list[float] = []
    t = 0.0
    while True:
        r = max(0.0, float(rate(t)))
        if r <= 0:
            t += idle_step_s
        else:
            t += rng.exponential(1.0 / r) if arrivals is Arrivals.POISSON else 1.0 / r
            if t < duration_s:
                times.append(t)
        if t >= duration_s:
            return times


class RoundRobin:
    """Each server in turn."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._next = 0

    def pick(self, outstanding: Sequence[int]) -> int:
        i = self._next
        self._next = (self._next + 1) % self.n
        return i


class LeastOutstanding:
    """The server with the fewest requests in flight (ties: the lowest index after the last)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._last = -1

    def pick(self, outstanding: Sequence[int]) -> int:
        order = [(self._last + 1 + k) % self.n for k in range(self.n)]
        i = min(order, key=lambda j: outstanding[j])
        self._last = i
        return i


BALANCERS: dict[Balance, Callable[[int], RoundRobin | LeastOutstanding]] = {
    Balance.ROUND_ROBIN: RoundRobin,
    Balance.LEAST_OUTSTANDING: LeastOutstanding,
}


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty sequence."""
    return float(np.percentile(np.asarray(values, dtype=float), q))


def summarize(records: Sequence[Record], *, duration_s: float, warmup_s: float = 0.0,
              urls: Sequence[str] = ()) -> dict[str, Any]:
    """The result dict of a run: requests after warm-up, throughput and latency percentiles."""
    measured = [r for r in records if r.scheduled >= warmup_s]
    ok = [r.latency * 1000.0 for r in measured if r.ok and r.latency is not None]
    window = max(duration_s - warmup_s, 1e-9)
    latency: dict[str, float | None]
    if ok:
        latency = {"p50": percentile(ok, 50), "p95": percentile(ok, 95),
                   "p99": percentile(ok, 99), "mean": float(np.mean(ok)), "max": float(max(ok))}
    else:
        latency = {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    errors = [r for r in measured if not r.ok]
    samples: list[str] = []
    for r in errors:
        if r.error and r.error not in samples:
            samples.append(r.error)
        if len(samples) >= 5:
            break
    per_server = {}
    for i, url in enumerate(urls):
        mine = [r for r in measured if r.server == i]
        per_server[url] = {"requests": len(mine), "errors": sum(not r.ok for r in mine)}
    return {
        "requests": len(measured),
        "errors": len(errors),
        "throughput_rps": len(ok) / window,
        "latency_ms": latency,
        "duration_s": window,
        "error_samples": samples,
        "per_server": per_server,
    }


# --------------------------------------------------------------------------------------------
# clients


class _Client:
    """One tritonclient asyncio client with prepared inputs."""

    def __init__(self, url: str, protocol: Protocol, conn_limit: int, timeout_s: float) -> None:
        self.url = url
        self.protocol = protocol
        self.timeout_s = timeout_s
        if protocol is Protocol.HTTP:
            import tritonclient.http as module
            import tritonclient.http.aio as aio

            self.client: Any = aio.InferenceServerClient(_strip_scheme(url),
                                                         conn_limit=conn_limit)
        else:
            import tritonclient.grpc as module  # type: ignore[no-redef]
            import tritonclient.grpc.aio as aio  # type: ignore[no-redef]

            self.client = aio.InferenceServerClient(_strip_scheme(url))
        self.module = module

    def make_inputs(self, payload: dict[str, np.ndarray]) -> list[Any]:
        inputs = []
        for name, array in payload.items():
            item = self.module.InferInput(name, list(array.shape), wire_type(array))
            if self.protocol is Protocol.HTTP:
                item.set_data_from_numpy(array, binary_data=True)
            else:
                item.set_data_from_numpy(array)
            inputs.append(item)
        return inputs

    async def infer(self, model: str, inputs: list[Any]) -> None:
        if self.protocol is Protocol.HTTP:
            await asyncio.wait_for(self.client.infer(model, inputs), self.timeout_s)
        else:
            await self.client.infer(model, inputs, client_timeout=self.timeout_s)

    async def close(self) -> None:
        await self.client.close()


def _strip_scheme(url: str) -> str:
    for scheme in ("http://", "https://", "grpc://"):
        if url.startswith(scheme):
            return url[len(scheme):].rstrip("/")
    return url.rstrip("/")


# --------------------------------------------------------------------------------------------
# running


@dataclass
class _State:
    records: list[Record] = field(default_factory=list)
    sent: int = 0
    done: int = 0


class _Pool:
    """A client per server URL, made when the URL first appears; a server keeps its index (the
    ``server`` of its records) for the whole run, and the balancer picks among the active ones."""

    def __init__(self, spec: LoadSpec, payloads: Sequence[dict[str, np.ndarray]]) -> None:
        self.spec = spec
        self.payloads = payloads
        self.urls: list[str] = []
        self.clients: list[_Client] = []
        self.prepared: list[list[list[Any]]] = []
        self.outstanding: list[int] = []
        self.active: list[int] = []
        self.balancer: RoundRobin | LeastOutstanding | None = None

    def use(self, urls: Sequence[str]) -> None:
        active = []
        for url in urls:
            if url not in self.urls:
                client = _Client(url, self.spec.protocol, self.spec.max_outstanding,
                                 self.spec.timeout_s)
                self.urls.append(url)
                self.clients.append(client)
                self.prepared.append([client.make_inputs(p) for p in self.payloads])
                self.outstanding.append(0)
            active.append(self.urls.index(url))
        if active != self.active:
            self.active = active
            self.balancer = BALANCERS[self.spec.balance](len(active)) if active else None

    def pick(self) -> int | None:
        """The server for the next request; None when no server is there to send to."""
        if self.balancer is None:
            return None
        return self.active[self.balancer.pick([self.outstanding[i] for i in self.active])]

    def in_flight(self) -> int:
        return sum(self.outstanding)

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


async def run_load_async(urls: Servers, payloads: Sequence[dict[str, np.ndarray]],
                         spec: LoadSpec, *,
                         on_result: Callable[[Record], None] | None = None,
                         on_progress: Callable[[int, int, float], None] | None = None,
                         record_series: bool = False,
                         refresh_s: float = 2.0,
                         stop: Callable[[], bool] | None = None,
                         clock: Callable[[], float] = time.perf_counter,
                         start: float | None = None) -> dict[str, Any]:
    """Drive ``spec`` at ``urls`` with ``payloads`` (cycled); returns the result dict.

    ``urls`` may be a function of the seconds since the start (open loop only): it is called at
    the start and again before the first request of each later ``refresh_s`` segment, with the
    segment's start, and the arrivals stay on the clock across it (no segment waits for the
    previous one's requests); a request due while it gives no server fails ("no server to send
    to"). A request due while ``spec.max_outstanding`` are in flight fails too. ``stop``
    is polled at least every 0.1 s: once it is true no more requests are sent and those in
    flight are cancelled (not recorded). ``start`` is the ``clock`` reading the schedule counts
    from (default: now); records' ``scheduled`` are seconds since it."""
    spec.validate()
    servers_at: Callable[[float], Sequence[str]] | None = None
    if callable(urls):
        servers_at = urls
        if spec.concurrency is not None:
            raise LoadError("a changing set of servers needs open loop (a rate), not a "
                            "concurrency")
    elif not urls:
        raise LoadError("no server URL given (allowed: one or more HOST:PORT)")
    if not payloads:
        raise LoadError("no request payloads to send")
    if not refresh_s > 0:
        raise LoadError(f"refresh {refresh_s} out of range (allowed: > 0 s)")
    origin = clock() if start is None else start
    pool = _Pool(spec, payloads)
    state = _State()
    pool.use(list(urls) if servers_at is None else servers_at(max(0.0, clock() - origin)))
    ticker = asyncio.create_task(_progress(state, origin, clock, on_progress))

    def finish(record: Record) -> None:
        state.done += 1
        state.records.append(record)
        if on_result is not None:
            on_result(record)

    async def one(index: int, scheduled: float, server: int) -> None:
        """Send one request to ``server``, which the caller already counted in flight (a burst
        of overdue arrivals created in one go must see each other: the cap, the balancer)."""
        try:
            await pool.clients[server].infer(spec.model,
                                             pool.prepared[server][index % len(payloads)])
            record = Record(scheduled, clock() - origin - scheduled, True, server)
        except TimeoutError:
            record = Record(scheduled, None, False, server, f"timeout after {spec.timeout_s} s")
        except Exception as exc:  # every client error is a failed request, counted and sampled
            record = Record(scheduled, None, False, server, _one_line(exc))
        finally:
            pool.outstanding[server] -= 1
        finish(record)

    try:
        if spec.concurrency is not None:
            await _closed_loop(spec, state, pool, one, clock, origin)
            mode = "closed-loop"
        else:
            schedule = spec.rate_schedule or _constant(spec.rate or 0.0)
            offsets = arrival_offsets(schedule, spec.duration_s, spec.arrivals,
                                      np.random.default_rng(spec.seed))
            await _open_loop(offsets, _Loop(spec, state, pool, one, finish, clock, origin,
                                            servers_at, refresh_s, stop))
            mode = "open-loop"
    finally:
        ticker.cancel()
        await pool.close()
    result = summarize(state.records, duration_s=spec.duration_s, warmup_s=spec.warmup_s,
                       urls=pool.urls)
    result.update({
        "model": spec.model, "protocol": spec.protocol.value, "mode": mode,
        "arrivals": spec.arrivals.value if mode == "open-loop" else None,
        "target_rate_rps": spec.rate, "concurrency": spec.concurrency,
        "batch": _batch_of(payloads[0]),
        "balance": spec.balance.value, "servers": list(pool.urls),
    })
    result["rows_per_s"] = result["throughput_rps"] * result["batch"]
    if record_series:
        result["series"] = [[round(r.scheduled, 4),
                             None if r.latency is None else round(r.latency * 1000, 3),
                             r.ok, r.server] for r in sorted(state.records,
                                                             key=lambda r: r.scheduled)]
    return result


@dataclass
class _Loop:
    """What the open loop works with (one run's)."""

    spec: LoadSpec
    state: _State
    pool: _Pool
    one: Callable[[int, float, int], Any]
    finish: Callable[[Record], None]
    clock: Callable[[], float]
    start: float
    servers_at: Callable[[float], Sequence[str]] | None
    refresh_s: float
    stop: Callable[[], bool] | None

    def stopped(self) -> bool:
        return self.stop is not None and self.stop()


_POLL_S = 0.1


async def _open_loop(offsets: list[float], loop: _Loop) -> None:
    """Send each request at its time, whatever happened to the earlier ones: the servers are
    re-read on the clock and in-flight requests are never waited for until the last is sent."""
    spec, state, pool = loop.spec, loop.state, loop.pool
    tasks: set[asyncio.Task[None]] = set()
    next_refresh = loop.refresh_s
    try:
        for index, due in enumerate(offsets):
            while (delay := due - (loop.clock() - loop.start)) > 0:
                if loop.stopped():
                    return
                await asyncio.sleep(min(delay, _POLL_S) if loop.stop is not None else delay)
            if loop.stopped():
                return
            if loop.servers_at is not None and due >= next_refresh:
                boundary = math.floor(due / loop.refresh_s) * loop.refresh_s
                pool.use(loop.servers_at(boundary))
                next_refresh = boundary + loop.refresh_s
            state.sent += 1
            if pool.in_flight() >= spec.max_outstanding:
                loop.finish(Record(due, None, False, -1, "client backlog full "
                                   f"({spec.max_outstanding} in flight)"))
                continue
            server = pool.pick()
            if server is None:
                loop.finish(Record(due, None, False, -1, "no server to send to"))
                continue
            pool.outstanding[server] += 1
            task = asyncio.create_task(loop.one(index, due, server))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        deadline = loop.clock() + spec.timeout_s + 1.0
        while tasks and not loop.stopped() and (left := deadline - loop.clock()) > 0:
            await asyncio.wait(set(tasks), timeout=min(left, _POLL_S) if loop.stop is not None
                               else left)
    finally:
        for task in list(tasks):
            task.cancel()
        if tasks:
            await asyncio.wait(set(tasks))


async def _closed_loop(spec: LoadSpec, state: _State, pool: _Pool, one: Callable[..., Any],
                       clock: Callable[[], float], start: float) -> None:
    async def worker(w: int) -> None:
        index = w
        while clock() - start < spec.duration_s:
            state.sent += 1
            server = pool.pick()
            assert server is not None  # a fixed, non-empty list of servers
            pool.outstanding[server] += 1
            await one(index, clock() - start, server)
            index += spec.concurrency or 1

    await asyncio.gather(*(worker(w) for w in range(spec.concurrency or 1)))


async def _progress(state: _State, start: float, clock: Callable[[], float],
                    on_progress: Callable[[int, int, float], None] | None) -> None:
    if on_progress is None:
        return
    while True:
        on_progress(state.done, state.sent, clock() - start)
        await asyncio.sleep(0.25)


def _constant(rate: float) -> RateSchedule:
    return lambda _t: rate


def _batch_of(payload: dict[str, np.ndarray]) -> int:
    first = next(iter(payload.values()))
    return int(first.shape[0]) if first.ndim else 1


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def run_load(urls: Servers, payloads: Sequence[dict[str, np.ndarray]], spec: LoadSpec,
             **kwargs: Any) -> dict[str, Any]:
    """Synchronous ``run_load_async`` (its own event loop; not for use inside one)."""
    return asyncio.run(run_load_async(urls, payloads, spec, **kwargs))


def concurrency_sweep(urls: Sequence[str], payloads: Sequence[dict[str, np.ndarray]],
                      spec: LoadSpec, levels: Sequence[int]) -> list[dict[str, Any]]:
    """Closed-loop runs at each concurrency level (the classic throughput/latency curve)."""
    results = []
    for level in levels:
        level_spec = LoadSpec(**{**spec.__dict__, "rate": None, "rate_schedule": None,
                                 "concurrency": level})
        results.append(run_load(urls, payloads, level_spec))
    return results


def fetch_model_config(url: str, model: str, protocol: Protocol,
                       timeout_s: float = 10.0) -> dict[str, Any]:
    """The model's config from a running server, as a config dict (same shape as pbtxt.read)."""
    from leanserve.serving.pbtxt import message_to_dict

    address = _strip_scheme(url)
    try:
        if protocol is Protocol.HTTP:
            import tritonclient.http as th

            client = th.InferenceServerClient(address, connection_timeout=timeout_s,
                                              network_timeout=timeout_s)
            try:
                config = client.get_model_config(model)
            finally:
                client.close()
            return _normalize_http_config(config)
        import tritonclient.grpc as tg

        gclient = tg.InferenceServerClient(address)
        try:
            response = gclient.get_model_config(model, client_timeout=timeout_s)
        finally:
            gclient.close()
        return message_to_dict(response.config)
    except Exception as exc:  # tritonclient raises its own and socket errors; name the server
        raise LoadError(f"cannot get the config of model {model!r} from {url} over "
                        f"{protocol.value}: {_one_line(exc)} (is the server up and the model "
                        "name right?)") from None


def _normalize_http_config(config: dict[str, Any]) -> dict[str, Any]:
    """Triton's JSON config has 64-bit ints as strings; make dims ints again."""
    for key in ("input", "output"):
        for item in config.get(key, []):
            item["dims"] = [int(d) for d in item.get("dims", [])]
    config["max_batch_size"] = int(config.get("max_batch_size", 0))
    return config


def offered_rate(offsets: Sequence[float], duration_s: float) -> float:
    """Requests per second a schedule offers (for reports)."""
    return len(offsets) / duration_s if duration_s > 0 else math.nan
