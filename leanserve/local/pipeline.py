"""`leanserve run`: the whole pipeline on one machine, with the code the operator runs.

compress (leanserve.compression) -> quality gate -> Triton repository -> a real tritonserver ->
capacity profile per pool (leanserve.serving) -> a local Prometheus scraping every replica ->
a rising-then-falling load burst -> the autoscaling policy (leanserve.autoscaling) every
interval, acted on by starting and stopping tritonserver replicas (LocalPlatform) -> report.

Everything started here is stopped on success, on error and on Ctrl-C (one ExitStack).
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from leanserve.api.load import LoadedSpec
from leanserve.autoscaling.exporter import LeanserveMetrics
from leanserve.autoscaling.metrics import PrometheusSource, Queries, Reading, observe
from leanserve.autoscaling.policy import (
    SETTINGS,
    Decision,
    PoolCapacity,
    Target,
    decide,
    pools_from_profile,
)
from leanserve.errors import LeanserveError
from leanserve.local.direct import DirectSource
from leanserve.local.outcome import summary, verdict
from leanserve.local.platform import LocalPlatform
from leanserve.local.prometheus import LocalPrometheus, prometheus_binary
from leanserve.local.recheck import recheck
from leanserve.local.report import pareto_png, render_html, timeline_png
from leanserve.serving.profile import available_cores
from leanserve.serving.server import free_port

Say = Callable[[str], None]


#: Per-request timeout of the load burst's clients; a failed request counts as this long in
#: the clients' p95 the policy reads.
CLIENT_TIMEOUT_S = 10.0
#: How often the load generator re-reads the ready replicas, and how long a replica scaled
#: down keeps serving after it left them (a pod's preStop grace): a client never picks one
#: whose port is closing.
SERVERS_REFRESH_S = 0.1
DRAIN_S = 0.5


class RunError(LeanserveError):
    """`leanserve run` could not go on; the message says where its logs are."""


@dataclass(frozen=True)
class RunSettings:
    """How `leanserve run` drives the local pipeline."""

    load_seconds: float = 60.0
    """Length of the load burst (rising, then falling)."""
    peak_factor: float = 0.75
    """Peak offered load as a share of what all local replicas (one per core) sustain at the
    SLO: more than one replica can serve, so the autoscaler has to scale up to meet it."""
    sustained_share: float = 0.6
    """Share of a local replica's short-trial capacity it is planned at. The profiler's trials
    last about a second each, too short for a queue to build near saturation, and during the
    burst the load generator and Prometheus share the cores: in two runs on 2 cores a single
    replica missed the SLO from 55-60% of its short-trial figure (at 212 of 371 req/s and at
    136 of 256), while two replicas held it at 0.6x. Costs use the measured figure."""
    cooldown_seconds: float | None = None
    """Observation after the burst, to see the scale-down (default: the stabilization window
    plus three intervals)."""
    quick_profile: bool = True
    """Search a small config grid (keeps `leanserve run` within minutes)."""
    metrics_window_s: int | None = None
    """rate() window of the PromQL queries; None: the spec's autoscaling interval, so that each
    decision reads all of the interval since the previous one, and never under
    ``SCRAPES_PER_WINDOW`` scrapes (see ``rate_window``)."""
    scrape_interval_s: float = 1.0


SCRAPES_PER_WINDOW = 4
"""rate() needs two samples inside its window; Prometheus advises a window of four scrape
intervals, so that a late scrape or one missed still leaves two."""


def rate_window(interval_s: float, scrape_s: float, fixed: int | None = None) -> int:
    """Whole seconds of the rate() window: ``fixed`` if given, else the decision interval,
    raised to SCRAPES_PER_WINDOW scrapes where the interval is shorter."""
    if fixed is not None:
        return fixed
    return max(math.ceil(interval_s), math.ceil(SCRAPES_PER_WINDOW * scrape_s))


@dataclass
class RunState:
    decisions: list[dict[str, Any]] = field(default_factory=list)
    records: list[tuple[float, float | None, bool]] = field(default_factory=list)
    """(seconds since load start it was sent at, ms until it was answered or failed or None
    when not known, ok) per request."""
    offered: list[tuple[float, float]] = field(default_factory=list)
    ready: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    """(monotonic time, ready replicas per pool) whenever they change: a replica became ready,
    stopped or was reaped."""
    t0: float | None = None
    """When the load started (time.monotonic); None before."""
    load_error: str | None = None
    """Why the load generator's thread stopped early (an exception it did not expect)."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note_ready(self, ready: dict[str, int], now: float | None = None) -> None:
        """Record the ready replicas if they changed (a stopped replica that never was ready
        changes nothing)."""
        with self.lock:
            if not self.ready or self.ready[-1][1] != ready:
                self.ready.append((time.monotonic() if now is None else now, dict(ready)))

    def ready_series(self) -> list[dict[str, Any]]:
        """report.json's ``replicas_ready``: seconds since the load started (from 0) and ready
        replicas per pool; a step function, each entry holding until the next."""
        with self.lock:
            if self.t0 is None:
                return []
            t0, points = self.t0, list(self.ready)
        before = [r for t, r in points if t <= t0]
        out = [{"time_s": 0.0, "ready": before[-1]}] if before else []
        out += [{"time_s": round(t - t0, 2), "ready": r} for t, r in points if t > t0]
        return out


def burst(peak_rps: float, seconds: float, floor: float = 0.15) -> Callable[[float], float]:
    """Requests/s at t: a half-sine from ``floor*peak`` up to ``peak`` and back."""
    def rate(t: float) -> float:
        x = min(max(t / seconds, 0.0), 1.0)
        return peak_rps * (floor + (1 - floor) * math.sin(math.pi * x))
    return rate


def run_pipeline(loaded: LoadedSpec, workdir: Path, settings: RunSettings, *, say: Say,
                 progress: Any = None) -> dict[str, Any]:
    """Run everything; returns report.json's content (also written, with report.html).

    On Ctrl-C (or SIGTERM) what was done so far is written as a report marked interrupted, then
    KeyboardInterrupt goes on up. The report's ``verdict`` says whether the run is usable."""
    # one absolute workdir for everything: Prometheus resolves relative paths in its config
    # against the config's folder, other tools against the cwd
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    slo_ms = loaded.spec.slo.latency_p95_ms
    report: dict[str, Any] = {"name": loaded.name, "workdir": str(workdir)}
    state = RunState()
    phase = ["compression"]
    try:
        # SIGTERM cleans up like Ctrl-C for the whole run, not only the load burst: profiling
        # and the recheck start tritonservers in their own sessions, which a plain SIGTERM
        # (no atexit, no __exit__) would leave running
        with _sigterm_as_interrupt():
            _run(loaded, workdir, settings, say, progress, report, state, phase)
    except KeyboardInterrupt:
        report["interrupted"] = phase[0]
        _finish(workdir, report, state, slo_ms, loaded.spec)
        raise
    except LeanserveError as exc:
        report["error"] = f"during {phase[0]}: {str(exc).splitlines()[0] if str(exc) else exc}"
        _finish(workdir, report, state, slo_ms, loaded.spec)
        raise
    except Exception as exc:  # a bug: the report of what was done is still written, then it
        # goes on up with its traceback
        first = str(exc).splitlines()[0] if str(exc) else ""
        report["error"] = (f"during {phase[0]}: unexpected {type(exc).__name__}"
                           + (f": {first}" if first else ""))
        _finish(workdir, report, state, slo_ms, loaded.spec)
        raise
    _finish(workdir, report, state, slo_ms, loaded.spec)
    return report


def _run(loaded: LoadedSpec, workdir: Path, settings: RunSettings, say: Say, progress: Any,
         report: dict[str, Any], state: RunState, phase: list[str]) -> None:
    from leanserve.compression.pipeline import compress
    from leanserve.serving.profile import profile_repository

    spec = loaded.spec
    logs = workdir / "logs"
    say("compressing every candidate and applying the quality gate")
    comp = compress(loaded, workdir / "compression", progress=progress)
    report["compression"] = comp
    if comp.get("selected") is None:
        return
    repo = workdir / "compression" / "model_repository"

    phase[0] = "the timing recheck"
    say("rechecking the timings: baseline and selected candidate, interleaved")
    report["measurement"] = recheck(loaded, workdir / "compression", comp, note=say)
    if report["measurement"]["noisy"]:
        say("[yellow]warning:[/yellow] other work on this machine disturbed the timings ("
            + "; ".join(report["measurement"]["notes"]) + ")")

    phase[0] = "profiling"
    say(f"profiling {comp['selected']} on a real tritonserver (capacity at p95 <= "
        f"{spec.slo.latency_p95_ms:g} ms)")
    profile = profile_repository(repo, spec, quick=settings.quick_profile,
                                 workdir=logs / "profile", note=say)
    (workdir / "profile.json").write_text(json.dumps(profile, indent=2))
    report["profile"] = profile
    pools_from_profile(profile, spec)  # every pool priced, or a clear error
    report["cost"] = _costs(profile, spec)
    # On one machine every pool's replicas share these cores. A local replica is therefore one
    # core's worth of the best config (one instance, one thread), measured here, and at most
    # one replica per core runs; the cluster's pool choice above uses the profile's figures.
    replica = _local_replica(repo, profile, spec, logs, say)
    local_rps = replica["capacity_rps"] * settings.sustained_share
    pools = [PoolCapacity(p.name, local_rps, p.hourly_price) for p in spec.node_pools]
    cores = available_cores()
    local_max = max(1, min(spec.autoscaling.max_replicas, cores))
    local_spec = spec.model_copy(update={"autoscaling": spec.autoscaling.model_copy(update={
        "max_replicas": local_max,
        "min_replicas": min(spec.autoscaling.min_replicas, local_max)})})
    report["local"] = {"replica": replica, "planned_rps": local_rps, "max_replicas": local_max,
                       "spec_max_replicas": spec.autoscaling.max_replicas, "cores": cores,
                       "pools": {p.name: {"capacity_rps": p.capacity_rps,
                                          "hourly_price": p.hourly_price} for p in pools}}
    explain_cap = cap_note(spec.autoscaling.max_replicas, local_max, cores)

    phase[0] = "the load burst"
    target = Target.from_spec(local_spec)
    model = _served_model(repo)
    with ExitStack() as stack:
        platform = LocalPlatform(_local_repository(
            repo, replica["config"], workdir, spec.serving.queue_timeout_microseconds), logs)
        platform.drain_s = DRAIN_S

        def replica_record() -> None:  # last out: every report has them, interrupted or not
            report["replica_errors"] = list(platform.errors)
            report["replicas_replaced"] = list(platform.replaced)

        stack.callback(replica_record)
        stack.callback(platform.stop_all)
        prom, source_note = _metrics_source(stack, workdir, settings, say)
        exporter = LeanserveMetrics()
        exporter_port = free_port()
        server = exporter.serve(exporter_port, addr="127.0.0.1")
        stack.callback(server.shutdown)

        def retarget() -> None:
            if prom is not None:
                groups = [([t], {"pool": pool, "role": "triton"})
                          for pool, t in platform.metrics_targets()]
                groups.append(([f"127.0.0.1:{exporter_port}"], {"role": "leanserve"}))
                prom.set_targets(groups)

        noting = threading.Lock()

        def changed() -> None:  # boot threads and the main thread: read and note as one step,
            with noting:        # or an older count could be noted last
                state.note_ready(platform.ready_replicas(model))
            retarget()

        platform.on_change = changed
        first = min(pools, key=lambda p: p.price_per_rps)
        start_replicas = {p.name: 0 for p in pools}
        start_replicas[first.name] = max(1, target.min_replicas)
        say(f"starting {start_replicas[first.name]} tritonserver replica(s) in pool {first.name}")
        platform.scale(model, start_replicas)
        started = time.monotonic()
        platform.wait_ready(180)
        # the shipped policy settings; the start-up they look ahead by is this machine's
        # (a local tritonserver, measured just now), not a cluster pod's image pull
        policy_settings = replace(SETTINGS, startup_seconds=round(time.monotonic() - started, 1))
        report["policy_settings"] = dict(policy_settings.__dict__)
        say(f"policy: PolicySettings() as shipped, start-up "
            f"{policy_settings.startup_seconds:g}s (measured here)")
        if not platform.endpoints():
            raise RunError("no tritonserver replica became ready: " + "; ".join(platform.errors)
                           + f" (logs under {logs})")
        retarget()
        if prom is not None:
            missing = prom.wait_scraped([t for _p, t in platform.metrics_targets()], 20)
            if missing:
                say(f"[yellow]warning:[/yellow] prometheus has not scraped {', '.join(missing)} "
                    f"after 20 s (log {prom.log_path})")
        interval = spec.autoscaling.interval_seconds
        # each decision reads the whole interval since the previous one: the clients' p95 over
        # the interval, the rate over it too (Prometheus: at least four scrapes; Triton read
        # directly: the time since the previous reading, which is the interval)
        p95_window = float(interval)
        inner: Any
        if prom is not None:
            window = rate_window(interval, prom.scrape_seconds, settings.metrics_window_s)
            inner = PrometheusSource(prom.url, Queries(model, window=f"{window}s"),
                                     clock=time.time)
            rate_note = (f"request rate = rate() over the last {window} s (decisions every "
                         f"{interval:g} s, Prometheus scraping every {prom.scrape_seconds} s)")
        else:
            direct = DirectSource(platform, model, clock=time.time)
            platform.on_stop = lambda _pool, target: direct.final_read(target)
            inner = direct
            rate_note = ("request rate = completions since the previous decision (every "
                         f"{interval:g} s), stopped and new replicas included")
        report["metrics_source"] = (
            f"{source_note}; {rate_note}; p95 = the load generator's p95 over the last "
            f"{p95_window:g} s (what clients see, over the interval the policy acts on)")
        say(f"each decision reads: {rate_note}; the clients' p95 over the last "
            f"{p95_window:g} s")

        peak = max(1.0, settings.peak_factor * local_rps * local_max)
        schedule = burst(peak, settings.load_seconds)
        cooldown = settings.cooldown_seconds
        if cooldown is None:
            cooldown = spec.autoscaling.scale_down_stabilization_seconds + \
                3 * spec.autoscaling.interval_seconds
        say(f"load burst: {settings.load_seconds:.0f} s rising to {peak:.1f} req/s "
            f"({settings.peak_factor:g}x what {local_max} one-core replicas sustain at the "
            f"SLO: {settings.sustained_share:g}x their short-trial {replica['capacity_rps']:.0f} "
            "req/s each), "
            f"then {cooldown:.0f} s of quiet")
        payloads = _payloads(platform, model,
                             int(report["profile"].get("measured_on", {})
                                 .get("sequence_length", 32)))
        inner.read()  # the direct source needs a first scrape to compute rates from
        stop = threading.Event()
        t0 = time.monotonic()
        state.note_ready(platform.ready_replicas(model), t0)
        with state.lock:
            state.t0 = t0
        source = LocalSource(inner, ClientLatency(state, t0, p95_window))
        loader = threading.Thread(target=_drive_noting_errors, name="load", daemon=True,
                                  args=(platform, model, payloads, schedule, settings.load_seconds,
                                        t0, state, stop))
        loader.start()
        stack.callback(lambda: (stop.set(), loader.join(30)))
        previous: Decision | None = None
        end = t0 + settings.load_seconds + cooldown
        while time.monotonic() < end:
            time.sleep(max(0.0, min(interval, end - time.monotonic())))
            with state.lock:
                load_error = state.load_error
            if load_error is not None:
                raise RunError(f"the load generator stopped: {load_error} (the requests sent "
                               "until then are in the report)")
            for dead in platform.check_health():  # reaped: this decision's scale replaces it
                say(f"replica {dead}; replacing it")
            # stamped with wall time; its Prometheus scrapes each ready replica
            obs, reading = observe(source, platform, model, ready_are_scraped=True)
            decision = decide(obs, pools, local_spec, previous, obs.time, policy_settings)
            platform.scale(model, decision.replicas)
            exporter.record(model, decision, target, actual=platform.current_replicas(model),
                            ready=platform.ready_replicas(model),
                            observed_rate=reading.request_rate,
                            observed_p95_ms=reading.p95_ms, reading=reading)
            entry = {"time_s": round(time.monotonic() - t0, 2), "replicas": dict(decision.replicas),
                     "reason": explain_cap(decision.reason), "code": decision.code.value,
                     "observed_rps": reading.request_rate, "observed_p95_ms": reading.p95_ms,
                     "p95_samples": source.last_samples,
                     "rate_window_s": _round(obs.window_seconds),
                     "p95_window_s": p95_window,
                     "server_mean_ms": source.last_server_mean_ms,
                     "hourly_cost": decision.hourly_cost,
                     "ready": platform.ready_replicas(model),
                     "problems": list(reading.problems)[:3]}
            with state.lock:
                state.decisions.append(entry)
            say(f"t={entry['time_s']:6.1f}s  {_mix(decision.replicas)}  {entry['reason']}")
            previous = decision
        stop.set()
        loader.join(30)


def cap_note(spec_max: int, local_max: int, cores: int) -> Callable[[str], str]:
    """Rewrites the policy's "maxReplicas=N" where N is this machine's cap, not the spec's."""
    if spec_max == local_max:
        return lambda reason: reason
    said = f"maxReplicas={local_max}"
    why = (f"maxReplicas={local_max} (the spec allows {spec_max}; capped here at one replica "
           f"per core on this {cores}-core machine)")
    return lambda reason: reason.replace(said, why, 1)


def _finish(workdir: Path, report: dict[str, Any], state: RunState, slo_ms: float,
            spec: Any) -> None:
    with state.lock:
        report["autoscaling"] = list(state.decisions)
    report["replicas_ready"] = state.ready_series()
    report["timeline"] = _timeline(state)
    _write_json(workdir, report)  # the data first: nothing computed below can lose it
    report["verdict"] = verdict(report, slo_ms)
    report["summary"] = summary(report, slo_ms)
    _write(workdir, report, slo_ms=slo_ms)


@dataclass
class ClientLatency:
    """p95 of the load generator's requests that ended (answered or failed) in the last
    ``window_s`` seconds, a failed one (timeout, error, dropped) as ``failed_ms``: the client's
    timeout, what a user waits before giving up. A failed request has no latency of its own,
    and leaving it out let a run where most requests failed read a low p95, so the autoscaler
    did not scale up. (The report's buckets count it as never answered; the policy needs a
    finite figure, and reads a non-finite p95 as unknown.) A failure whose end is not known
    counts in the window it was sent in.

    Why not Triton's summary quantile: it covers about a minute, so a policy acting every few
    seconds reads a p95 that lags the load by most of a burst (a trial read 175-190 ms while
    clients saw 38 ms). Where the load is driven locally, the clients' own latency is the
    figure the SLO is about."""

    state: RunState
    t0: float
    window_s: float
    min_samples: int = 5
    clock: Callable[[], float] = time.monotonic
    failed_ms: float = CLIENT_TIMEOUT_S * 1000

    def p95(self) -> tuple[float | None, int]:
        now = self.clock() - self.t0
        lats: list[float] = []
        with self.state.lock:
            for t, lat, ok in self.state.records:
                if ok and lat is None:
                    continue
                ended = t if lat is None else t + lat / 1000
                if now - self.window_s <= ended <= now:
                    lats.append(lat if ok and lat is not None else self.failed_ms)
        lats.sort()
        if len(lats) < self.min_samples:
            return None, len(lats)
        return lats[min(len(lats) - 1, int(0.95 * len(lats)))], len(lats)


@dataclass
class LocalSource:
    """The request rate from Prometheus (or Triton directly); p95 from the clients' window."""

    inner: Any
    latency: ClientLatency
    last_samples: int = 0
    last_server_mean_ms: float | None = None

    @property
    def clock(self) -> Callable[[], float]:
        return self.inner.clock  # type: ignore[no-any-return]

    @property
    def window_seconds(self) -> float | None:
        """The inner source's rate window: Prometheus' rate() range, or for Triton read
        directly the time between its last two readings (what its rate spans)."""
        return getattr(self.inner, "window_seconds", None)

    def read(self) -> Reading:
        reading = self.inner.read()
        p95, n = self.latency.p95()
        self.last_samples = n
        reading.p95_ms = p95
        # the inner source's p95 problems go, and their kinds with them: the two lists are
        # parallel (one kind per problem), and the exporter counts the kinds
        kept = [(p, k) for p, k in zip(reading.problems, _kinds(reading), strict=True)
                if not p.startswith("p95")]
        reading.problems = [p for p, _k in kept]
        reading.error_kinds = [k for _p, k in kept]
        if p95 is None and n:
            reading.problems.append(f"p95: only {n} requests ended in the window")
            reading.error_kinds.append("empty")
        self.last_server_mean_ms = None
        if isinstance(self.inner, PrometheusSource):
            q = self.inner.queries
            expr = (f'sum(rate(nv_inference_request_duration_us{{model="{q.model}"}}'
                    f"[{q.window}])) / sum(rate(nv_inference_request_success"
                    f'{{model="{q.model}"}}[{q.window}])) / 1000')
            self.last_server_mean_ms = self.inner.scalar(expr, [], "server mean")
        return reading


def _kinds(reading: Reading) -> list[str]:
    """One kind per problem; a source that gave fewer (none at all) has them as "query"."""
    kinds = list(reading.error_kinds)[:len(reading.problems)]
    return kinds + ["query"] * (len(reading.problems) - len(kinds))


# --------------------------------------------------------------------------------------------


def _metrics_source(stack: ExitStack, workdir: Path, settings: RunSettings,
                    say: Say) -> tuple[LocalPrometheus | None, str]:
    if prometheus_binary() is None:
        say("prometheus is not installed: reading Triton's metrics endpoints directly "
            "(apt-get install -y prometheus for the real path)")
        return None, "direct scrape of Triton /metrics (prometheus not installed)"
    prom = LocalPrometheus(workdir / "prometheus", scrape_interval_s=settings.scrape_interval_s)
    stack.enter_context(prom)
    say(f"prometheus at {prom.url} scraping every replica")
    return prom, f"prometheus {prom.url}"


def _served_model(repo: Path) -> str:
    from leanserve.serving.repository import primary_model

    return primary_model(repo).name


def _local_replica(repo: Path, profile: dict[str, Any], spec: Any, logs: Path,
                   say: Say) -> dict[str, Any]:
    """Capacity at the SLO of one local replica: the best config on one core."""
    from leanserve.serving.profile import SearchSettings, measure_config
    from leanserve.serving.repository import ServingConfig, primary_model

    best = ServingConfig.from_json(profile["config"])
    one_core = replace(best, instance_count=1, intra_op_threads=1)
    say(f"measuring one local replica ({one_core.label}, one thread)")
    return measure_config(primary_model(repo), one_core, spec.slo.latency_p95_ms,
                          SearchSettings.quick(), logs / "local-replica", note=say)


def _local_repository(repo: Path, config: dict[str, Any], workdir: Path,
                      queue_timeout_us: int = 0) -> Path:
    """A local (python-backend) copy of the repository serving ``config`` (and the spec's queue
    timeout)."""
    from leanserve.serving.profile import apply_profile_config
    from leanserve.serving.repository import to_local_repository

    dest = to_local_repository(repo, workdir / "serving_repository")
    apply_profile_config(dest, {"config": config}, queue_timeout_us)
    return dest


def _payloads(platform: LocalPlatform, model: str, seq_len: int) -> list[dict[str, Any]]:
    from leanserve.serving.inputs import make_inputs
    from leanserve.serving.loadgen import Protocol, fetch_model_config

    url = platform.endpoints()[0][1]
    return make_inputs(fetch_model_config(url, model, Protocol.HTTP), batch=1,
                       sequence_length=seq_len)


def _drive_noting_errors(platform: LocalPlatform, model: str, payloads: list[dict[str, Any]],
                         schedule: Callable[[float], float], seconds: float, t0: float,
                         state: RunState, stop: threading.Event) -> None:
    """``_drive``, with an exception it did not expect kept in ``state.load_error`` for the
    main thread to end the run with (a dead thread's traceback would only reach stderr, and
    the run would go on autoscaling no load)."""
    try:
        _drive(platform, model, payloads, schedule, seconds, t0, state, stop)
    except Exception as exc:
        with state.lock:
            state.load_error = f"{type(exc).__name__}: {exc}"


def _drive(platform: LocalPlatform, model: str, payloads: list[dict[str, Any]],
           schedule: Callable[[float], float], seconds: float, t0: float, state: RunState,
           stop: threading.Event, segment_s: float = 2.0,
           clock: Callable[[], float] = time.monotonic) -> None:
    """Open-loop load on the clock from ``t0`` (a ``clock`` reading), spread over the ready
    replicas, re-read every SERVERS_REFRESH_S without pausing the arrivals, so a slow server
    cannot slow the offered load down (the planned rate is noted once a ``segment_s``). A
    replica scaled down leaves the list before it stops (``LocalPlatform.drain_s``). Returns
    when the last request was answered or failed, or within a fraction of a second of
    ``stop``."""
    from leanserve.serving.loadgen import Balance, LoadSpec, Record, run_load

    segment = [-1]

    def servers(t: float) -> list[str]:
        if int(t // segment_s) != segment[0]:  # the planned rate, once a segment
            segment[0] = int(t // segment_s)
            with state.lock:
                state.offered.append((t, schedule(t)))
        return [u for _pool, u in platform.endpoints()]

    def on_result(r: Record) -> None:
        # a failed request keeps when it failed (its latency slot), so the clients' p95 counts
        # it in the window it became known in
        took = r.latency if r.latency is not None else clock() - t0 - r.scheduled
        with state.lock:
            state.records.append((r.scheduled, took * 1000, r.ok))

    spec = LoadSpec(model=model, rate_schedule=schedule, duration_s=seconds,
                    balance=Balance.LEAST_OUTSTANDING, timeout_s=CLIENT_TIMEOUT_S)
    run_load(servers, payloads, spec, on_result=on_result, refresh_s=SERVERS_REFRESH_S,
             stop=stop.is_set, clock=clock, start=t0)


def _timeline(state: RunState, bucket_s: float = 2.0) -> list[dict[str, Any]]:
    with state.lock:
        records = list(state.records)
        offered = list(state.offered)
    if not records:
        return []
    # offered load and p95 by when requests were sent; served load by when they completed
    # (under saturation the two part: requests queue, and complete later)
    buckets: dict[int, list[tuple[float | None, bool]]] = {}
    done: dict[int, int] = {}
    for t, lat, ok in records:
        buckets.setdefault(int(t // bucket_s), []).append((lat, ok))
        if ok and lat is not None:
            b = int((t + lat / 1000) // bucket_s)
            done[b] = done.get(b, 0) + 1
    out = []
    for b in sorted(buckets):
        # every request sent in the bucket, a failed one (error, timeout, dropped) as never
        # answered: a bucket whose p95 is a failure has no p95, and misses the SLO
        lats = sorted(lat if ok and lat is not None else math.inf for lat, ok in buckets[b])
        p95 = lats[min(len(lats) - 1, int(0.95 * len(lats)))]
        t = b * bucket_s
        planned = [r for s, r in offered if t <= s < t + bucket_s]
        out.append({
            "time_s": t,
            "offered_rps": len(buckets[b]) / bucket_s,  # every request scheduled in it
            "planned_rps": planned[0] if planned else None,
            "achieved_rps": done.get(b, 0) / bucket_s,
            "errors": sum(1 for _lat, ok in buckets[b] if not ok),
            "p95_ms": None if math.isinf(p95) else p95,
        })
    return out


def _costs(profile: dict[str, Any], spec: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pool in spec.node_pools:
        p = profile["pools"][pool.name]
        out[pool.name] = {"hourly_price": pool.hourly_price,
                          "capacity_rps": p["capacity_rps"],
                          "per_million_requests": p["cost_per_million_requests"],
                          "measured": p.get("measured", False)}
    out["chosen_pool"] = min(spec.node_pools,
                             key=lambda p: out[p.name]["per_million_requests"]).name
    return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _mix(replicas: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in replicas.items())


def _write_json(workdir: Path, report: dict[str, Any]) -> None:
    tmp = workdir / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(workdir / "report.json")


def _write(workdir: Path, report: dict[str, Any], slo_ms: float) -> None:
    _write_json(workdir, report)
    img = timeline_png(report.get("timeline", []), report.get("autoscaling", []), slo_ms,
                       workdir / "timeline.png", ready=report.get("replicas_ready")) \
        if report.get("timeline") else None
    pareto = pareto_png(report["compression"]) if report.get("compression") else None
    page = render_html(report, timeline_b64=img, pareto_b64=pareto)
    (workdir / "report.html").write_text(page)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM cleans up like Ctrl-C (only in the main thread, where signals can be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
