"""leanserve's own metrics, for Grafana (deploy/grafana/leanserve.json) and the alerts
(deploy/prometheus/rules.yaml).

Why a private CollectorRegistry: the operator and `leanserve run` may host several models and
tests create many exporters in one process; the global registry would collide and leak between
them. Names (all labelled ``model``; per-pool ones also ``pool``):

- leanserve_desired_replicas, leanserve_replicas, leanserve_ready_replicas  (per pool)
- leanserve_hourly_cost_usd, leanserve_max_hourly_cost_usd, leanserve_cost_per_million_requests_usd
- leanserve_request_rate, leanserve_observed_p95_ms, leanserve_slo_p95_ms
- leanserve_slo_met (1 or 0; absent while unknown), leanserve_slo_attainment_ratio (share of
  decisions with known latency that met the SLO since this exporter started),
  leanserve_slo_checks_total{met="true"|"false"} (the same decisions as a counter: the
  dashboard's attainment is its increase over a window, which a restart does not reset),
  leanserve_metrics_available (0 or 1)
- leanserve_decisions_total{code}, leanserve_last_decision_info{code} (the reason's text is in
  the status, the Events and report.json: as a label it made a new series every decision)
- leanserve_metrics_errors_total{kind}: Prometheus answers that gave no usable number (unreachable,
  http, malformed, query, empty, ambiguous, not_finite); pass ``reading`` to ``record``

A figure that is unknown (no request rate, no p95, no latency judged yet) is not exported rather
than exported as NaN: Prometheus stores a NaN as a sample, and one NaN in a range makes
avg_over_time NaN, which silenced the SLO burn alerts for their whole window.

``namespaced=True`` (the operator, leanserve.operator.metrics) adds a ``namespace`` label to every
series, so models of one name in several namespaces stay apart; ``forget`` drops every series of
one model (a deleted CompressedModel's). `leanserve run` exports without it; the dashboard's and
the alerts' selectors and joins (``on (namespace, model)``) work for both.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, start_http_server

from leanserve.autoscaling.policy import Decision, Reason, Target

if TYPE_CHECKING:
    from leanserve.autoscaling.metrics import Reading


@dataclass
class _Attainment:
    met: int = 0
    known: int = 0


@dataclass
class LeanserveMetrics:
    """Gauges on a private registry; ``record`` after every decision."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    namespaced: bool = False
    """Label every series with ``namespace`` too (the operator's models)."""

    def __post_init__(self) -> None:
        r = self.registry
        key = ["namespace", "model"] if self.namespaced else ["model"]
        pool = [*key, "pool"]
        self.desired = Gauge("leanserve_desired_replicas", "Replicas the policy wants, per pool",
                             pool, registry=r)
        self.actual = Gauge("leanserve_replicas", "Replicas set on the platform, per pool",
                            pool, registry=r)
        self.ready = Gauge("leanserve_ready_replicas", "Replicas serving, per pool", pool,
                           registry=r)
        self.hourly = Gauge("leanserve_hourly_cost_usd", "USD per hour of the running replicas",
                            key, registry=r)
        self.budget = Gauge("leanserve_max_hourly_cost_usd", "spec.autoscaling.maxHourlyCost",
                            key, registry=r)
        self.per_million = Gauge("leanserve_cost_per_million_requests_usd",
                                 "USD per million requests at the observed rate", key,
                                 registry=r)
        self.rate = Gauge("leanserve_request_rate", "Requests/s the policy observed", key,
                          registry=r)
        self.p95 = Gauge("leanserve_observed_p95_ms", "p95 latency the policy observed",
                         key, registry=r)
        self.slo = Gauge("leanserve_slo_p95_ms", "spec.slo.latencyP95Ms", key, registry=r)
        self.slo_met = Gauge("leanserve_slo_met",
                             "1 when p95 <= SLO, 0 when not; absent when unknown", key,
                             registry=r)
        self.attainment = Gauge("leanserve_slo_attainment_ratio",
                                "Share of decisions with known latency that met the SLO",
                                key, registry=r)
        self.checks = Counter("leanserve_slo_checks",
                              "Decisions with known latency, by whether p95 met the SLO",
                              [*key, "met"], registry=r)
        self.available = Gauge("leanserve_metrics_available",
                               "1 when Prometheus gave usable metrics at the last decision",
                               key, registry=r)
        self.decisions = Counter("leanserve_decisions", "Autoscaling decisions by reason code",
                                 [*key, "code"], registry=r)
        self.metrics_errors = Counter("leanserve_metrics_errors",
                                      "Prometheus answers that gave no usable number, by kind",
                                      [*key, "kind"], registry=r)
        self.last = Info("leanserve_last_decision", "The last decision's code",
                         key, registry=r)
        self._att: dict[tuple[str, ...], _Attainment] = {}
        # every label set written per model, so that ``forget`` (and a pool leaving a model's
        # decisions) removes exactly its series
        self._series: dict[tuple[str, ...], set[tuple[Any, tuple[str, ...]]]] = {}

    def _key(self, model: str, namespace: str | None) -> tuple[str, ...]:
        if self.namespaced != (namespace is not None):
            raise ValueError("namespace is required by (and only by) a namespaced exporter")
        return (model,) if namespace is None else (namespace, model)

    def _at(self, metric: Any, key: tuple[str, ...], *extra: str) -> Any:
        self._series.setdefault(key, set()).add((metric, tuple(extra)))
        return metric.labels(*key, *extra)

    def record(self, model: str, decision: Decision, target: Target,
               actual: Mapping[str, int] | None = None,
               ready: Mapping[str, int] | None = None,
               observed_rate: float | None = None,
               observed_p95_ms: float | None = None,
               hourly_cost: float | None = None,
               reading: Reading | None = None,
               namespace: str | None = None) -> None:
        """Export one decision and what the platform runs (defaults: the decision itself);
        ``reading`` (the poll the decision was made on) counts its metric errors. ``namespace``
        is required by a namespaced exporter."""
        key = self._key(model, namespace)
        if reading is not None:
            self.count_metrics_errors(model, reading.error_kinds, namespace=namespace)
        actual = dict(actual if actual is not None else decision.replicas)
        ready = dict(ready if ready is not None else actual)
        for metric, extra in list(self._series.get(key, ())):
            if metric in (self.desired, self.actual, self.ready) and \
                    extra[0] not in decision.replicas:  # a pool the model no longer has
                metric.remove(*key, *extra)
                self._series[key].discard((metric, extra))
        for pool, n in decision.replicas.items():
            self._at(self.desired, key, pool).set(n)
            self._at(self.actual, key, pool).set(actual.get(pool, 0))
            self._at(self.ready, key, pool).set(ready.get(pool, 0))
        cost = decision.hourly_cost if hourly_cost is None else hourly_cost
        self._at(self.hourly, key).set(cost)
        self._at(self.budget, key).set(target.budget)
        self._at(self.slo, key).set(target.latency_p95_ms)
        ok = decision.code is not Reason.METRICS_UNAVAILABLE
        self._at(self.available, key).set(1 if ok else 0)
        rate = observed_rate if observed_rate is not None else decision.desired_rps
        self._known(self.rate, key, rate if ok else None)
        self._known(self.p95, key, observed_p95_ms)
        self._known(self.per_million, key, cost / (rate * 3600) * 1e6 if ok and rate else None)
        self._known(self.slo_met, key, None if decision.slo_met is None
                    else float(decision.slo_met))
        att = self._att.setdefault(key, _Attainment())
        if decision.slo_met is not None:
            att.known += 1
            att.met += int(decision.slo_met)
            for met in ("true", "false"):  # both series exist, so a ratio of increases has data
                self._at(self.checks, key, met)
            self._at(self.checks, key, "true" if decision.slo_met else "false").inc()
        self._known(self.attainment, key, att.met / att.known if att.known else None)
        self._at(self.decisions, key, decision.code.value).inc()
        self._at(self.last, key).info({"code": decision.code.value})

    def _known(self, metric: Any, key: tuple[str, ...], value: float | None) -> None:
        """Set the series, or remove it while the value is unknown (None or NaN)."""
        if value is not None and math.isfinite(value):
            self._at(metric, key).set(value)
        elif (metric, ()) in self._series.get(key, set()):
            metric.remove(*key)
            self._series[key].discard((metric, ()))

    def count_metrics_errors(self, model: str, kinds: Iterable[str],
                             namespace: str | None = None) -> None:
        key = self._key(model, namespace)
        for kind in kinds:
            self._at(self.metrics_errors, key, kind).inc()

    def forget(self, model: str, namespace: str | None = None) -> None:
        """Remove every series of one model (it was deleted): nothing stale stays exported."""
        key = self._key(model, namespace)
        for metric, extra in self._series.pop(key, set()):
            metric.remove(*key, *extra)
        self._att.pop(key, None)

    def serve(self, port: int, addr: str = "0.0.0.0") -> Any:
        """Expose /metrics on a port; returns the server (call .shutdown() to stop)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server
