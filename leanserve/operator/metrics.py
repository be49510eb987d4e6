"""The operator's own Prometheus metrics, on a private CollectorRegistry (STYLE.md 2).

A private registry keeps tests and several in-process operators from colliding on the global one,
and keeps the exposition limited to what the dashboards and alerts read.

Besides its own (leanserve_operator_*), the operator exports leanserve's autoscaling metrics
(leanserve.autoscaling.exporter, the names `leanserve run` exports) for every model it autoscales,
labelled ``namespace`` and ``model``: ``record_decision`` after each autoscaling step, and a
deleted CompressedModel's series go with it (``observe_phase(..., None)``). Scrape the operator
with honor_labels (the ServiceMonitor in deploy/operator-with-servicemonitor sets honorLabels), so
the model's ``namespace`` is kept rather than renamed ``exported_namespace`` beside the target's.
deploy/grafana/leanserve.json and deploy/prometheus/rules.yaml read exactly these series
(tests/integration/test_autoscaling_live.py runs them on a real Prometheus scraping this exporter).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from leanserve.api.spec import Phase
from leanserve.autoscaling.exporter import LeanserveMetrics
from leanserve.autoscaling.policy import Decision, Observation, PoolCapacity, Target

AUTOSCALED = (Phase.SERVING.value, Phase.DEGRADED.value)
"""The phases in which the operator autoscales a model (handlers.autoscale_once)."""

if TYPE_CHECKING:
    from leanserve.autoscaling.metrics import Reading


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.reconciles = Counter("leanserve_operator_reconciles", "Reconciles by outcome.",
                                  ["outcome"], registry=self.registry)
        self.errors = Counter("leanserve_operator_errors", "Reconcile errors by kind.",
                              ["kind"], registry=self.registry)
        self.jobs_created = Counter("leanserve_operator_jobs_created",
                                    "Compression Jobs created.", registry=self.registry)
        self.models = Gauge("leanserve_operator_models", "CompressedModels per phase.",
                            ["phase"], registry=self.registry)
        self.api_requests = Gauge("leanserve_operator_api_requests",
                                  "Requests the operator made to the Kubernetes API.",
                                  registry=self.registry)
        self.api_writes = Gauge("leanserve_operator_api_writes",
                                "Writing requests the operator made, by HTTP method (PATCH: "
                                "applies and status; POST: Events; PUT: the leader Lease).",
                                ["method"], registry=self.registry)
        self.autoscaling = LeanserveMetrics(registry=self.registry, namespaced=True)
        self._phases: dict[tuple[str, str], str] = {}

    def observe_phase(self, namespace: str, name: str, phase: str | None) -> None:
        """Record a model's phase (None: it is gone) and refresh the per-phase gauge."""
        key = (namespace, name)
        if phase is None:
            self._phases.pop(key, None)
            self.autoscaling.forget(name, namespace=namespace)
        else:
            self._phases[key] = phase
            if phase not in AUTOSCALED:
                # no longer autoscaled (compressing a new recipe, failed): its last decision's
                # series would stay exported as they were, and an alert on them keep firing
                self.autoscaling.forget(name, namespace=namespace)
        counts: Mapping[str, int] = {p.value: 0 for p in Phase}
        counts = dict(counts)
        for value in self._phases.values():
            counts[value] = counts.get(value, 0) + 1
        for p, n in counts.items():
            self.models.labels(phase=p).set(n)

    def record_decision(self, namespace: str, model: str, decision: Decision, spec: Any,
                        pools: Sequence[PoolCapacity] = (),
                        observed: Observation | None = None,
                        reading: Reading | None = None) -> None:
        """Export one autoscaling decision of ``namespace/model``: desired replicas per pool,
        the replicas set and ready as ``observed`` at the decision (None: the decision's), the
        hourly cost of the replicas set (priced by ``pools``), the observed rate and p95, SLO
        attainment, the decision's reason and ``reading``'s metric errors. Makes no request."""
        current = dict(observed.current) if observed and observed.current is not None else None
        ready = dict(observed.ready) if observed and observed.ready is not None else None
        price = {p.name: p.hourly_price for p in pools}
        running = None if current is None or not price else \
            sum(n * price.get(pool, 0.0) for pool, n in current.items())
        self.autoscaling.record(
            model, decision, Target.from_spec(spec), actual=current, ready=ready,
            observed_rate=None if reading is None else reading.request_rate,
            observed_p95_ms=None if reading is None else reading.p95_ms,
            hourly_cost=running, reading=reading, namespace=namespace)

    def serve(self, port: int, addr: str = "0.0.0.0") -> Any:
        """Expose /metrics on a port; returns the server (call .shutdown() to stop)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server
