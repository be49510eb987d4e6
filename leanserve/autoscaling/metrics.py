"""The metric source: PromQL over Triton's metrics through Prometheus's HTTP API.

Why a stated policy for every odd answer (after KEDA's prometheus scaler): an autoscaler that reads
"no data" as zero load scales a busy service to its minimum exactly when monitoring breaks. Here:

- unreachable, timeout, HTTP error, bad JSON, ``status: error``  -> no data (the reason is kept);
- an empty result (no series: Triton not scraped yet, wrong labels)  -> no data;
- more than one series for a query that must give one  -> no data ("ambiguous"), like KEDA;
- NaN or +-Inf (Triton's summary quantiles are NaN while idle; 0/0 rates)  -> no data.

"No data" is None in the Observation, and the policy holds the current replicas with SLOMet
Unknown (reason MetricsUnavailable). A rate of 0 from series that exist is real zero load.

Triton metric names were checked against the tritonserver in nvidia-pytriton: counters
nv_inference_request_success, nv_inference_request_failure{reason}, nv_inference_count,
nv_inference_request_duration_us, nv_inference_queue_duration_us and, with
``--metrics-config summary_latencies=true``, the summary nv_inference_request_summary_us
{quantile="0.5|0.9|0.95|0.99|0.999"}. Pools come from a ``pool`` label that the scrape config adds
(a static label per target, or relabeling from the pod's leanserve.io/pool label).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from leanserve.autoscaling.errors import MetricsError
from leanserve.autoscaling.platform import Platform
from leanserve.autoscaling.policy import Observation


class HttpGet(Protocol):
    """GET url with query params; returns (HTTP status, body). Raises OSError-like on failure."""

    def __call__(self, url: str, params: dict[str, str], timeout: float) -> tuple[int, bytes]:
        ...


def requests_get(url: str, params: dict[str, str], timeout: float) -> tuple[int, bytes]:
    """The default HttpGet, on requests."""
    import requests

    try:
        r = requests.get(url, params=params, timeout=timeout)
    except requests.RequestException as exc:
        raise MetricsError(f"Prometheus unreachable at {url}: {exc.__class__.__name__}") from None
    return r.status_code, r.content


@dataclass(frozen=True)
class Queries:
    """The PromQL leanserve runs, for one Triton model; ``window`` is the rate() range."""

    model: str
    window: str = "1m"

    @property
    def _sel(self) -> str:
        return f'model="{self.model}"'

    @property
    def request_rate(self) -> str:
        # failures are load too; absent failure series (none yet) add nothing, but the success
        # series must exist or the whole answer is empty (= no data, never zero)
        return (f"sum(rate(nv_inference_request_success{{{self._sel}}}[{self.window}])) + "
                f"(sum(rate(nv_inference_request_failure{{{self._sel}}}[{self.window}])) "
                "or vector(0))")

    @property
    def p95_ms(self) -> str:
        # the slowest replica's p95: the SLO holds only if it holds on every replica. Triton's
        # summary keeps its last quantiles while a replica is idle, so only replicas that served
        # requests within the window count: an idle model has no p95 (unknown, not stale).
        return (f'max(nv_inference_request_summary_us{{{self._sel},quantile="0.95"}} '
                f"and on(instance, model, version) "
                f"(rate(nv_inference_request_success{{{self._sel}}}[{self.window}]) > 0)) / 1000")

    @property
    def queue_ms(self) -> str:
        return (f"sum(rate(nv_inference_queue_duration_us{{{self._sel}}}[{self.window}])) / "
                f"sum(rate(nv_inference_request_success{{{self._sel}}}[{self.window}])) / 1000")

    @property
    def rate_by_pool(self) -> str:
        return (f"sum by (pool) (rate(nv_inference_request_success{{{self._sel}}}"
                f"[{self.window}]))")


@dataclass
class Reading:
    """One poll of Prometheus; None means no data, with the why in ``problems``."""

    request_rate: float | None
    p95_ms: float | None
    queue_ms: float | None
    rate_by_pool: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class PrometheusSource:
    """Reads Triton's metrics through Prometheus's /api/v1/query; clock and HTTP injected."""

    url: str
    queries: Queries
    clock: Callable[[], float]
    http: HttpGet = requests_get
    timeout: float = 5.0

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """Instant vector as (labels, value) pairs; MetricsError when Prometheus cannot answer."""
        endpoint = self.url.rstrip("/") + "/api/v1/query"
        try:
            status, body = self.http(endpoint, {"query": expr, "time": f"{self.clock():.3f}"},
                                     self.timeout)
        except MetricsError:
            raise
        except OSError as exc:
            raise MetricsError(f"Prometheus unreachable at {self.url}: {exc}") from None
        if status != 200:
            raise MetricsError(f"Prometheus {self.url} answered HTTP {status} to {expr!r}")
        try:
            doc = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MetricsError(f"Prometheus {self.url} answered non-JSON to {expr!r}") from None
        if not isinstance(doc, dict) or doc.get("status") != "success":
            err = doc.get("error") if isinstance(doc, dict) else None
            raise MetricsError(f"Prometheus query {expr!r} failed: {err or 'bad answer'}")
        data = doc.get("data") or {}
        kind = data.get("resultType")
        result = data.get("result")
        if kind == "scalar" and isinstance(result, list) and len(result) == 2:
            return [({}, _float(result[1]))]
        if kind != "vector" or not isinstance(result, list):
            raise MetricsError(f"Prometheus query {expr!r}: expected a vector, got {kind}")
        out = []
        for item in result:
            try:
                out.append((dict(item.get("metric") or {}), _float(item["value"][1])))
            except (KeyError, IndexError, TypeError):
                raise MetricsError(f"Prometheus query {expr!r}: malformed sample") from None
        return out

    def scalar(self, expr: str, problems: list[str], what: str) -> float | None:
        """One number or None (empty, several series, NaN/Inf, or an error), noting why."""
        try:
            rows = self.query(expr)
        except MetricsError as exc:
            problems.append(f"{what}: {exc}")
            return None
        if not rows:
            problems.append(f"{what}: no data (empty result)")
            return None
        if len(rows) > 1:
            problems.append(f"{what}: {len(rows)} series where one was expected (ambiguous)")
            return None
        v = rows[0][1]
        if not math.isfinite(v):
            problems.append(f"{what}: {v} (not a number)")
            return None
        return v

    def read(self) -> Reading:
        problems: list[str] = []
        rate = self.scalar(self.queries.request_rate, problems, "request rate")
        p95 = self.scalar(self.queries.p95_ms, problems, "p95")
        queue = self.scalar(self.queries.queue_ms, problems, "queue time")
        by_pool: dict[str, float] = {}
        if rate is not None:
            try:
                for labels, v in self.query(self.queries.rate_by_pool):
                    if math.isfinite(v):
                        by_pool[labels.get("pool", "")] = v
            except MetricsError as exc:
                problems.append(f"rate by pool: {exc}")
        return Reading(rate, p95, queue, by_pool, problems)


def _float(x: object) -> float:
    # Prometheus encodes sample values as strings: "1.5", "NaN", "+Inf"
    return float(str(x))


def observe(source: PrometheusSource, platform: Platform, model: str) -> tuple[Observation,
                                                                               Reading]:
    """An Observation for policy.decide: metrics from Prometheus, replicas from the platform."""
    reading = source.read()
    obs = Observation(
        time=source.clock(),
        request_rate=reading.request_rate,
        p95_ms=reading.p95_ms,
        queue_ms=reading.queue_ms,
        ready=platform.ready_replicas(model),
        current=platform.current_replicas(model),
    )
    return obs, reading
