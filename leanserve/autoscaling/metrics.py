"""The metric source: PromQL over Triton's metrics through Prometheus's HTTP API.

Why a stated policy for every odd answer (after KEDA's prometheus scaler): an autoscaler that reads
"no data" as zero load scales a busy service to its minimum exactly when monitoring breaks. Here:

- unreachable, timeout, HTTP error, bad JSON, ``status: error``  -> no data (the reason is kept);
- an empty result (no series: Triton not scraped yet, wrong labels)  -> no data;
- more than one series for a query that must give one  -> no data ("ambiguous"), like KEDA;
- NaN or +-Inf (Triton's summary quantiles are NaN while idle; 0/0 rates)  -> no data;
- a reply of any other shape (a list where an object belongs, missing keys, a value "abc",
  labels that are not strings, JSON nested too deep)  -> no data ("malformed"), never an
  exception out of ``read``.

Each no-data answer has a kind (ERROR_KINDS), counted by the exporter in
leanserve_metrics_errors_total{model, kind}.

The load signal is the arrival rate (completions plus the growth of pending requests over the
window), which keeps rising under overload; the served rate is read too, as a cross-check and a
fallback. "No data" is None in the Observation, and the policy holds the current replicas with
SLOMet Unknown (reason MetricsUnavailable). A rate of 0 from series that exist is real zero load.

Triton metric names were checked against the tritonserver in nvidia-pytriton: counters
nv_inference_request_success, nv_inference_request_failure{reason}, nv_inference_count,
nv_inference_request_duration_us, nv_inference_queue_duration_us and, with
``--metrics-config summary_latencies=true``, the summary nv_inference_request_summary_us
{quantile="0.5|0.9|0.95|0.99|0.999"}, and the gauge nv_inference_pending_request_count (the
string is in the wheel's libtritonserver). Pools come from a ``pool`` label that the scrape
config adds (a static label per target, or relabeling from the pod's leanserve.io/pool label).
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
from leanserve.serving.repository import TEXT_SUFFIX


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


WINDOW_SECONDS = 60.0
"""The rate() range of the operator's queries; the simulator models this same window
(simulate.SimConfig.metrics_window_seconds)."""
MODEL_LABEL = "leanserve_model"
"""The target label the operator's ServiceMonitor/PodMonitor gives every series a serving pod
exports: the CompressedModel it serves (Triton's own labels are model and version only)."""


def _seconds(window: str) -> float:
    """A PromQL duration of one unit ("90s", "1m", "2h") in seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for u in ("ms", "s", "m", "h"):
        if window.endswith(u) and window[:-len(u)].replace(".", "", 1).isdigit():
            return float(window[:-len(u)]) * units[u]
    raise MetricsError(f"metrics window {window!r}: expected a duration like 60s or 1m")


@dataclass(frozen=True)
class Queries:
    """The PromQL leanserve runs, for one Triton model; ``window`` is the rate() range."""

    model: str
    window: str = f"{WINDOW_SECONDS:g}s"
    namespace: str | None = None
    """The model's namespace (the operator's): series labelled with another namespace (a model of
    the same name elsewhere) are left out; series without the label (a scrape config that does
    not add it, `leanserve run`'s) still count."""

    @property
    def _sel(self) -> str:
        return self._select(f'model="{self.model}"')

    def _select(self, model: str) -> str:
        if self.namespace is None:
            return model
        # the operator's monitors label each series with the CompressedModel whose pod served
        # it (leanserve_model); series without the label (another scrape config) still count
        return (f'{model},namespace=~"{self.namespace}|",'
                f'{MODEL_LABEL}=~"{self.model}|"')

    @property
    def _sel_served(self) -> str:
        """The model and, for a text model, the ensemble clients call (``<model>-text``: the
        tokenizer, then the model), whose latency is what a client of it sees."""
        return self._select(f'model=~"{self.model}|{self.model}{TEXT_SUFFIX}"')

    @property
    def request_rate(self) -> str:
        # failures are load too; absent failure series (none yet) add nothing, but the success
        # series must exist or the whole answer is empty (= no data, never zero)
        return (f"sum(rate(nv_inference_request_success{{{self._sel}}}[{self.window}])) + "
                f"(sum(rate(nv_inference_request_failure{{{self._sel}}}[{self.window}])) "
                "or vector(0))")

    @property
    def arrival_rate(self) -> str:
        # requests ARRIVING: completions (success and failure) plus the growth of Triton's
        # pending requests over the window. Unlike completions it keeps rising under overload.
        # No pending series (a Triton without the gauge) makes the answer empty: no data, and
        # the policy falls back to the served rate, knowing it is a lower bound.
        return (f"{self.request_rate} + "
                f"sum(delta(nv_inference_pending_request_count{{{self._sel}}}[{self.window}])) "
                f"/ {_seconds(self.window):g}")

    @property
    def replicas_scraped(self) -> str:
        """Replicas whose latest scrape is live now (a stopped one's series is stale)."""
        return f"count(nv_inference_request_success{{{self._sel}}})"

    @property
    def replicas_in_rate(self) -> str:
        """How many of those the request rate sums: a pod scraped once within the window has no
        rate() yet, though it already takes its share of the requests."""
        return (f"count(rate(nv_inference_request_success{{{self._sel}}}[{self.window}]) "
                f"and nv_inference_request_success{{{self._sel}}})")

    @property
    def pending(self) -> str:
        """Requests queued or executing in Triton now, over every replica."""
        return f"sum(nv_inference_pending_request_count{{{self._sel}}})"

    @property
    def p95_ms(self) -> str:
        # the slowest replica's p95: the SLO holds only if it holds on every replica. Triton's
        # summary keeps its last quantiles while a replica is idle, so only replicas that served
        # requests within the window count: an idle model has no p95 (unknown, not stale).
        # The text ensemble counts too: its latency includes the tokenizer's, which the model's
        # does not, and a saturated tokenizer shows there only.
        return (f'max(nv_inference_request_summary_us{{{self._sel_served},quantile="0.95"}} '
                f"and on(instance, model, version) "
                f"(rate(nv_inference_request_success{{{self._sel_served}}}[{self.window}]) > 0))"
                " / 1000")

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
    error_kinds: list[str] = field(default_factory=list)
    """One of ERROR_KINDS per problem (counted in leanserve_metrics_errors_total)."""
    arrival_rate: float | None = None
    """Requests/s arriving (the load signal); None: no data."""
    pending: float | None = None
    """Requests pending in Triton now; None: no data."""
    replicas_in_rate: int | None = None
    """How many of the replicas scraped now the rates sum over; None: not known."""
    replicas_scraped: int | None = None
    """How many replicas were scraped at their latest scrape; None: not known."""


@dataclass
class PrometheusSource:
    """Reads Triton's metrics through Prometheus's /api/v1/query; clock and HTTP injected."""

    url: str
    queries: Queries
    clock: Callable[[], float]
    http: HttpGet = requests_get
    timeout: float = 5.0

    @property
    def window_seconds(self) -> float:
        """The range the rates are averaged over (Observation.window_seconds)."""
        return _seconds(self.queries.window)

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """Instant vector as (labels, value) pairs; MetricsError (with its ``kind``) when
        Prometheus cannot answer or answers in a shape other than its documented one. Nothing
        else escapes: a reply of any shape is either samples or a MetricsError."""
        endpoint = self.url.rstrip("/") + "/api/v1/query"
        try:
            status, body = self.http(endpoint, {"query": expr, "time": f"{self.clock():.3f}"},
                                     self.timeout)
        except MetricsError:
            raise
        except Exception as exc:  # any failure of the transport is "no data", never a crash
            raise _kind(MetricsError(f"Prometheus unreachable at {self.url}: "
                                     f"{exc.__class__.__name__}: {_short(exc)}"),
                        "unreachable") from None
        if status != 200:
            raise _kind(MetricsError(f"Prometheus {self.url} answered HTTP {status} to "
                                     f"{expr!r}"), "http")
        try:
            doc = json.loads(body)
        except (ValueError, TypeError, RecursionError):
            raise _kind(MetricsError(f"Prometheus {self.url} answered non-JSON to {expr!r}"),
                        "malformed") from None
        return parse_answer(doc, expr)

    def scalar(self, expr: str, problems: list[str], what: str,
               kinds: list[str] | None = None) -> float | None:
        """One number or None (empty, several series, NaN/Inf, or an error), noting why (and
        the kind of each problem in ``kinds``)."""
        kinds = kinds if kinds is not None else []
        try:
            rows = self.query(expr)
        except MetricsError as exc:
            problems.append(f"{what}: {exc}")
            kinds.append(exc.kind)
            return None
        if not rows:
            problems.append(f"{what}: no data (empty result)")
            kinds.append("empty")
            return None
        if len(rows) > 1:
            problems.append(f"{what}: {len(rows)} series where one was expected (ambiguous)")
            kinds.append("ambiguous")
            return None
        v = rows[0][1]
        if not math.isfinite(v):
            problems.append(f"{what}: {v} (not a number)")
            kinds.append("not_finite")
            return None
        return v

    def read(self) -> Reading:
        problems: list[str] = []
        kinds: list[str] = []
        rate = self.scalar(self.queries.request_rate, problems, "request rate", kinds)
        if kinds[-1:] == ["empty"]:
            w = _seconds(self.queries.window)
            problems[-1] += (f": is Triton scraped, and at least every {w / 4:g}s? rate() over "
                             f"{self.queries.window} needs two samples within it")
        if kinds[-1:] == ["unreachable"]:
            # the other queries would each wait out the same timeout (an operator steps its
            # models one after another: a Prometheus that drops packets would stall them all)
            return Reading(None, None, None, {}, problems, kinds)
        p95 = self.scalar(self.queries.p95_ms, problems, "p95", kinds)
        queue = self.scalar(self.queries.queue_ms, problems, "queue time", kinds)
        arrival = self.scalar(self.queries.arrival_rate, problems, "arrival rate", kinds)
        pending = self.scalar(self.queries.pending, problems, "pending requests", kinds)
        counted = self._count(self.queries.replicas_in_rate) if rate is not None else None
        scraped = self._count(self.queries.replicas_scraped) if rate is not None else None
        by_pool: dict[str, float] = {}
        if rate is not None:
            try:
                for labels, v in self.query(self.queries.rate_by_pool):
                    if math.isfinite(v):
                        by_pool[labels.get("pool", "")] = v
            except MetricsError as exc:
                problems.append(f"rate by pool: {exc}")
                kinds.append(exc.kind)
        return Reading(rate, p95, queue, by_pool, problems, kinds, arrival, pending, counted,
                       scraped)

    def _count(self, expr: str) -> int | None:
        """None when not known: the rates then stand as read (a correction of them, not a
        figure of its own, so no problem is reported for it)."""
        try:
            rows = self.query(expr)
        except MetricsError:
            return None
        if len(rows) != 1 or not math.isfinite(rows[0][1]):
            return None
        return round(rows[0][1])


ERROR_KINDS = ("unreachable", "http", "malformed", "query", "empty", "ambiguous", "not_finite")
"""Why a query gave no usable number (the ``kind`` label of leanserve_metrics_errors_total)."""


def parse_answer(doc: object, expr: str) -> list[tuple[dict[str, str], float]]:
    """Samples from a decoded /api/v1/query reply; MetricsError for any other shape.

    The documented shape: {"status": "success", "data": {"resultType": "vector", "result":
    [{"metric": {str: str}, "value": [time, "1.5"]}, ...]}} or resultType "scalar" with
    "result": [time, "1.5"]. Values are strings ("NaN" and "+Inf" included); a number is
    accepted too. Anything else (a list where an object belongs, missing keys, a value "abc",
    labels that are not strings) is malformed.
    """
    if not isinstance(doc, dict):
        raise _malformed(expr, f"the reply is a {type(doc).__name__}, not an object")
    if doc.get("status") != "success":
        err = doc.get("error")
        if doc.get("status") == "error":
            raise _kind(MetricsError(f"Prometheus query {expr!r} failed: "
                                     f"{_short(err) if err else 'no error given'}"), "query")
        raise _malformed(expr, f"status is {_short(doc.get('status'))}")
    data = doc.get("data")
    if not isinstance(data, dict):
        raise _malformed(expr, "'data' is missing or not an object")
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        return [({}, _sample_value(result, expr))]
    if kind != "vector":
        raise _malformed(expr, f"expected a vector, got {_short(kind)}")
    if not isinstance(result, list):
        raise _malformed(expr, "'result' is not a list")
    out = []
    for item in result:
        if not isinstance(item, dict):
            raise _malformed(expr, "a sample is not an object")
        labels = item.get("metric", {})
        if labels is None:
            labels = {}
        if not isinstance(labels, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise _malformed(expr, "a sample's 'metric' is not an object of strings")
        out.append((dict(labels), _sample_value(item.get("value"), expr)))
    return out


def _sample_value(pair: object, expr: str) -> float:
    if not isinstance(pair, list) or len(pair) != 2:
        raise _malformed(expr, "a sample's value is not a [time, value] pair")
    raw = pair[1]
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise _malformed(expr, f"sample value {_short(raw)} is not a number")
    try:
        return float(raw)
    except (ValueError, OverflowError):
        raise _malformed(expr, f"sample value {_short(raw)} is not a number") from None


def _kind(exc: MetricsError, kind: str) -> MetricsError:
    exc.kind = kind
    return exc


def _malformed(expr: str, why: str) -> MetricsError:
    return _kind(MetricsError(f"Prometheus query {expr!r}: malformed answer ({why})"),
                 "malformed")


def _short(x: object, limit: int = 80) -> str:
    text = repr(x) if not isinstance(x, str) else x
    return text if len(text) <= limit else text[:limit] + "..."


def observe(source: PrometheusSource, platform: Platform, model: str, *,
            ready_are_scraped: bool = False) -> tuple[Observation, Reading]:
    """An Observation for policy.decide: metrics from Prometheus, replicas from the platform.

    A replica that became ready within the window takes its share of the requests (the Service
    and the load generator spread them evenly) before rate() has two samples of it: target
    discovery (up to 5 s in Prometheus) and the first scrapes take an interval or more. The
    rates are scaled by the replicas serving over those in the rate: the serving ones counted
    by Prometheus (scraped now), or by the platform (ready) when ``ready_are_scraped`` says
    each ready replica is a target of its own (the operator's monitors, `leanserve run`'s
    Prometheus; a scrape through a Service would see one series for all pods). Without this,
    every scale-up read as a drop in load."""
    reading = source.read()
    ready = platform.ready_replicas(model)
    n, counted = reading.replicas_scraped, reading.replicas_in_rate
    if ready_are_scraped and counted is not None:
        n = max(n or 0, sum(ready.values()))
    scale, note = 1.0, ""
    if n is not None and counted is not None and 0 < counted < n:
        scale = n / counted
        note = f"x{n}/{counted}: {n - counted} serving replica(s) not in the rate yet"
    obs = Observation(
        time=source.clock(),
        request_rate=_scaled(reading.request_rate, scale),
        p95_ms=reading.p95_ms,
        queue_ms=reading.queue_ms,
        ready=ready,
        current=platform.current_replicas(model),
        arrival_rate=_scaled(reading.arrival_rate, scale),
        pending=reading.pending,
        # a source that knows the range its rates average over says so (PrometheusSource)
        window_seconds=getattr(source, "window_seconds", None),
        rate_note=note,
    )
    return obs, reading


def _scaled(rate: float | None, scale: float) -> float | None:
    return None if rate is None else rate * scale
