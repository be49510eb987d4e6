"""Per-replica capacity at the SLO, the config search, and the price of a million requests.

Capacity is what the autoscaler divides load by and what cost per request is made of, so it is
measured, not guessed: for each Triton config of a small grid (max_batch_size x dynamic-batching
queue delay x instance count, plus Triton's default: batch 1, no dynamic batching, one instance)
a real local tritonserver is started and driven open-loop at rising rates until p95 latency
leaves the SLO, then bisected. Capacity = the highest rate whose p95 stayed within
``slo.latencyP95Ms`` with (almost) no errors and the offered rate actually served.

Pools whose hardware is not on this machine get a derived figure marked ``measured: false`` with
a ``basis`` string that says how it was derived. The planning parts (grid, search, pricing) are
pure functions; ``profile_repository`` only wires them to servers and the load generator.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from leanserve.api.spec import Accelerator, CompressedModelSpec, NodePool
from leanserve.serving import pbtxt
from leanserve.serving.errors import ServingError
from leanserve.serving.repository import (
    MODEL_FILE,
    VERSION,
    ModelEntry,
    ServingConfig,
    primary_model,
    with_serving_config,
)

PROFILE_VERSION = 1
PROFILE_FILE = "profile.json"

#: GPU pools cannot be measured here. Assumption, stated in every GPU pool's basis: one
#: datacenter GPU (T4 class) running the model with onnxruntime + TensorRT serves as many
#: requests as this many of the measured CPU cores. BERT-class encoders at small batch typically
#: land between 8 and 30 CPU cores per T4; 16 is the middle, and it is never presented as measured.
GPU_EQUIVALENT_CPU_CORES = 16.0


@dataclass(frozen=True)
class SearchSettings:
    """How hard the capacity search works; ``quick()`` keeps ``leanserve run`` short."""

    #: Seconds of open-loop load per trial rate (after warm-up).
    trial_s: float = 3.0
    #: Seconds at the start of each trial left out of the statistics.
    warmup_s: float = 0.7
    #: Rate multiplier while ramping up.
    growth: float = 1.6
    #: Bisection steps between the last passing and the first failing rate.
    bisect_steps: int = 3
    #: Share of failed requests a passing trial may have.
    max_error_rate: float = 0.01
    #: Longest wait for the server's queue to drain between trials.
    drain_timeout_s: float = 30.0
    #: Hard bound on trials per config, so profiling time stays bounded.
    max_trials: int = 12
    max_rate: float = 20_000.0
    min_rate: float = 0.5
    #: Tokens per generated text request.
    sequence_length: int = 32
    protocol: str = "grpc"
    #: Seconds of closed-loop probing that seeds the first trial rate.
    probe_s: float = 1.5

    @classmethod
    def quick(cls) -> SearchSettings:
        return cls(trial_s=1.5, warmup_s=0.4, growth=1.8, bisect_steps=2, probe_s=0.8)


@dataclass(frozen=True)
class Trial:
    """One open-loop run at one rate."""

    rate: float
    p95_ms: float | None
    throughput_rps: float
    errors: int
    requests: int

    def passes(self, slo_ms: float, settings: SearchSettings) -> bool:
        if self.p95_ms is None or self.requests == 0:
            return False
        # Overload shows as p95 (late completions count, measured from their scheduled time)
        # or as errors (client timeouts, backlog drops): no separate throughput test, which
        # Poisson arrival counts would fail by chance in short trials.
        return (self.p95_ms <= slo_ms
                and self.errors <= settings.max_error_rate * self.requests)

    def to_json(self) -> dict[str, Any]:
        return {"rate": round(self.rate, 3), "p95_ms": self.p95_ms,
                "throughput_rps": round(self.throughput_rps, 3), "errors": self.errors,
                "requests": self.requests}


@dataclass
class CapacityResult:
    capacity_rps: float
    trials: list[Trial] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# pure planning


def plan_grid(max_batch_size: int, max_queue_delay_us: int, *, cores: int, quick: bool
              ) -> list[ServingConfig]:
    """Configs to try, Triton's default first (batch 1, no dynamic batching, one instance).

    Batch sizes: the spec's and 8; queue delays: the spec's and 4x it (more batching for more
    latency); instances: 1 and 2 when there are at least 2 cores. Each instance gets an equal
    share of the cores as onnxruntime threads. Quick mode tries the spec's batch and delay only.
    """
    cores = max(1, cores)
    default = ServingConfig(max_batch_size=1, dynamic_batching=False, instance_count=1,
                            intra_op_threads=cores)
    delay = max(0, max_queue_delay_us)
    instances = [1, 2] if cores >= 2 else [1]
    if quick:
        batches, delays = [max_batch_size], [delay]
    else:
        batches = sorted({max_batch_size, min(8, max_batch_size)})
        delays = sorted({delay, max(4 * delay, 2000)})
    grid = [default]
    for batch in batches:
        for d in delays:
            for count in instances:
                cfg = ServingConfig(max_batch_size=batch, max_queue_delay_us=d,
                                    dynamic_batching=batch > 1, instance_count=count,
                                    intra_op_threads=max(1, cores // count))
                if cfg not in grid:
                    grid.append(cfg)
    return grid


def search_capacity(measure: Callable[[float], Trial], slo_ms: float, start_rate: float,
                    settings: SearchSettings) -> CapacityResult:
    """Highest passing rate: ramp up geometrically from ``start_rate``, then bisect.

    ``measure(rate)`` runs one trial; the search itself is pure, so it is tested against
    synthetic servers.
    """
    result = CapacityResult(0.0)

    def run(rate: float) -> bool:
        if len(result.trials) >= settings.max_trials:
            raise _OutOfTrials
        trial = measure(rate)
        result.trials.append(trial)
        return trial.passes(slo_ms, settings)

    good: float | None = None
    try:
        good = _ramp_and_bisect(run, start_rate, settings)
    except _OutOfTrials:
        passing = [t.rate for t in result.trials if t.passes(slo_ms, settings)]
        good = max(passing) if passing else None
    result.capacity_rps = good or 0.0
    return result


class _OutOfTrials(Exception):
    """The search used ``max_trials``: report the best rate seen so far."""


def _ramp_and_bisect(run: Callable[[float], bool], start_rate: float,
                     settings: SearchSettings) -> float | None:
    rate = min(max(start_rate, settings.min_rate), settings.max_rate)
    good: float | None = None
    bad: float | None = None
    if run(rate):
        good = rate
        while good < settings.max_rate:
            rate = min(good * settings.growth, settings.max_rate)
            if run(rate):
                good = rate
            else:
                bad = rate
                break
    else:
        bad = rate
        while rate > settings.min_rate:
            rate = rate / settings.growth
            if run(rate):
                good = rate
                break
            bad = rate
    if good is None:
        return None
    if bad is not None:
        for _ in range(settings.bisect_steps):
            mid = math.sqrt(good * bad)
            if run(mid):
                good = mid
            else:
                bad = mid
    return good


def cost_per_million(hourly_price: float, capacity_rps: float) -> float | None:
    """USD per million requests at full per-replica capacity; None when capacity is 0."""
    if capacity_rps <= 0:
        return None
    return hourly_price / (capacity_rps * 3600.0) * 1e6


def parse_cpu(quantity: int | float | str | None) -> float | None:
    """Kubernetes CPU quantity ("2", "500m", 1.5) in cores."""
    if quantity is None:
        return None
    text = str(quantity).strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m?)", text)
    if not match:
        raise ServingError(f"cpu quantity {text!r} not understood (allowed: e.g. 2, 1.5, 500m)")
    value = float(match.group(1))
    return value / 1000.0 if match.group(2) else value


def derive_pool(pool: NodePool, measured_rps: float, measured_cores: float) -> dict[str, Any]:
    """Capacity and price of one pool from the capacity measured on this machine."""
    per_core = measured_rps / measured_cores if measured_cores > 0 else 0.0
    if pool.accelerator is Accelerator.NVIDIA_GPU:
        capacity = per_core * GPU_EQUIVALENT_CPU_CORES
        measured = False
        basis = (f"derived, not measured: no GPU here; assumes one GPU serves like "
                 f"{GPU_EQUIVALENT_CPU_CORES:g} of the {measured_cores:g} CPU cores measured "
                 f"({per_core:.1f} req/s per core)")
    else:
        cpu = parse_cpu(pool.resources.requests.get("cpu") or pool.resources.limits.get("cpu"))
        if cpu is None:
            capacity, measured = measured_rps, False
            basis = (f"pool sets no cpu request; assumed equal to the {measured_cores:g} cores "
                     "measured here")
        elif abs(cpu - measured_cores) < 1e-9:
            capacity, measured = measured_rps, True
            basis = (f"measured on this machine with {measured_cores:g} cores (the load "
                     "generator shared them)")
        else:
            capacity, measured = per_core * cpu, False
            basis = (f"derived, not measured: scaled linearly from {measured_cores:g} measured "
                     f"cores to the pool's {cpu:g} cores ({per_core:.1f} req/s per core)")
    cost = cost_per_million(pool.hourly_price, capacity)
    return {"capacity_rps": round(capacity, 3),
            "cost_per_million_requests": None if cost is None else round(cost, 6),
            "hourly_price": pool.hourly_price, "measured": measured, "basis": basis}


def best_config(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The result with the highest capacity (ties: fewer instances, then smaller batches)."""
    return max(results, key=lambda r: (r["capacity_rps"], -r["config"]["instance_count"],
                                       -r["config"]["max_batch_size"]))


def available_cores() -> int:
    """Cores this process may run on (the measurement's hardware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------
# measuring


def write_variant(entry: ModelEntry, config: ServingConfig, dest_repo: Path) -> str:
    """``dest_repo/<name>`` = the primary model with ``config``; returns the model name."""
    model_dir = dest_repo / entry.name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    (model_dir / VERSION).mkdir(parents=True)
    src = entry.onnx_path
    assert src is not None
    try:
        os.link(src, model_dir / VERSION / MODEL_FILE)
    except OSError:
        shutil.copyfile(src, model_dir / VERSION / MODEL_FILE)
    extra = src.with_name(src.name + ".data")
    if extra.exists():
        shutil.copyfile(extra, model_dir / VERSION / (MODEL_FILE + ".data"))
    pbtxt.write(with_serving_config(entry.config, config), model_dir)
    return entry.name


def measure_config(entry: ModelEntry, config: ServingConfig, slo_ms: float,
                   settings: SearchSettings, workdir: Path,
                   note: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Start a server with ``config`` and search its capacity."""
    from leanserve.serving.inputs import make_inputs
    from leanserve.serving.loadgen import LoadSpec, Protocol, run_load
    from leanserve.serving.server import LocalTriton

    repo = workdir / config.label / "repository"
    repo.mkdir(parents=True, exist_ok=True)
    name = write_variant(entry, config, repo)
    protocol = Protocol(settings.protocol)
    payloads = make_inputs(pbtxt.read(repo / name), sequence_length=settings.sequence_length)
    with LocalTriton(repo, log_dir=workdir / config.label) as server:
        url = server.grpc_url if protocol is Protocol.GRPC else server.http_url
        probe = run_load([url], payloads, LoadSpec(
            model=name, protocol=protocol,
            concurrency=config.instance_count * (min(8, config.max_batch_size)
                                                 if config.dynamic_batching else 1),
            duration_s=settings.probe_s + 0.3, warmup_s=0.3))
        start_rate = max(settings.min_rate, 0.6 * probe["throughput_rps"])

        def measure(rate: float) -> Trial:
            result = run_load([url], payloads, LoadSpec(
                model=name, protocol=protocol, rate=rate,
                duration_s=settings.trial_s + settings.warmup_s, warmup_s=settings.warmup_s,
                timeout_s=max(5.0, 20 * slo_ms / 1000.0), seed=int(rate * 1000)))
            trial = Trial(rate, result["latency_ms"]["p95"], result["throughput_rps"],
                          result["errors"], result["requests"])
            wait_idle(server.metrics_url, name, settings.drain_timeout_s)
            note(f"{config.label}: {rate:.1f} req/s -> p95 "
                 f"{'n/a' if trial.p95_ms is None else f'{trial.p95_ms:.1f} ms'}"
                 f"{' ok' if trial.passes(slo_ms, settings) else ' over'}")
            return trial

        found = search_capacity(measure, slo_ms, start_rate, settings)
    passing = [t for t in found.trials if t.passes(slo_ms, settings)]
    at_capacity = max(passing, key=lambda t: t.rate) if passing else None
    return {"config": config.to_json(), "label": config.label,
            "capacity_rps": round(found.capacity_rps, 3),
            "p95_ms_at_capacity": at_capacity.p95_ms if at_capacity else None,
            "closed_loop_probe_rps": round(probe["throughput_rps"], 3),
            "trials": [t.to_json() for t in found.trials]}


def pending_requests(metrics_text: str, model: str) -> int | None:
    """``nv_inference_pending_request_count`` of ``model`` summed over versions (None: absent)."""
    total, seen = 0.0, False
    prefix = "nv_inference_pending_request_count{"
    for line in metrics_text.splitlines():
        if line.startswith(prefix) and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    return int(total) if seen else None


def wait_idle(metrics_url: str, model: str, timeout_s: float, poll_s: float = 0.1) -> bool:
    """Wait until Triton holds no queued request of ``model``, so an overloaded trial's
    backlog does not spill into the next trial. False when it did not drain in time."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(metrics_url, timeout=2.0) as resp:
                pending = pending_requests(resp.read().decode(), model)
        except OSError:
            return False
        if not pending:  # 0, or a server without the metric: nothing to wait for
            return True
        time.sleep(poll_s)
    return False


def profile_repository(repo: Path, spec: CompressedModelSpec, *, quick: bool = False,
                       settings: SearchSettings | None = None, cores: int | None = None,
                       workdir: Path | None = None,
                       note: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """DESIGN.md section 6's profile for ``repo`` under ``spec``'s SLO and node pools."""
    settings = settings or (SearchSettings.quick() if quick else SearchSettings())
    cores = cores or available_cores()
    entry = primary_model(Path(repo))
    if int(entry.config.get("max_batch_size", 0)) < 1:
        raise ServingError(f"{entry.path}: max_batch_size 0 (no batching) cannot be profiled "
                           "over batch sizes; regenerate the repository with max_batch_size >= 1")
    slo_ms = spec.slo.latency_p95_ms
    grid = plan_grid(spec.serving.max_batch_size, spec.serving.max_queue_delay_microseconds,
                     cores=cores, quick=quick)
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="leanserve-profile-")) if own else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for i, config in enumerate(grid, 1):
            note(f"config {i}/{len(grid)}: {config.label}")
            results.append(measure_config(entry, config, slo_ms, settings, work, note))
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    best = best_config(results)
    default = results[0]
    pools = {p.name: derive_pool(p, best["capacity_rps"], float(cores)) for p in spec.node_pools}
    speedup = (best["capacity_rps"] / default["capacity_rps"]
               if default["capacity_rps"] > 0 else None)
    return {
        "version": PROFILE_VERSION,
        "model": entry.name,
        "config": best["config"],
        "capacity_rps": best["capacity_rps"],
        "slo_latency_p95_ms": slo_ms,
        "slo_met": best["capacity_rps"] > 0,
        "pools": pools,
        "default": {"config": default["config"], "capacity_rps": default["capacity_rps"]},
        "speedup_vs_default": None if speedup is None else round(speedup, 3),
        "grid": results,
        "measured_on": {"cores": cores, "protocol": settings.protocol,
                        "sequence_length": settings.sequence_length,
                        "trial_s": settings.trial_s},
        "quick": quick,
    }


def apply_profile_config(repo: Path, profile: dict[str, Any], queue_timeout_us: int = 0) -> Path:
    """Rewrite the primary model's config.pbtxt in ``repo`` with the profile's best config.

    The profile is measured without a queue policy (its trials saturate on purpose); the
    deployment's ``queue_timeout_us`` (spec.serving.queueTimeoutMicroseconds) goes on top."""
    entry = primary_model(Path(repo))
    config = replace(ServingConfig.from_json(profile["config"]), queue_timeout_us=queue_timeout_us)
    return pbtxt.write(with_serving_config(entry.config, config), entry.path)
