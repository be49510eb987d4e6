"""The operator's own Prometheus metrics, on a private CollectorRegistry (STYLE.md 2).

A private registry keeps tests and several in-process operators from colliding on the global one,
and keeps the exposition limited to what the dashboards and alerts read.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from leanserve.api.spec import Phase


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
        self._phases: dict[tuple[str, str], str] = {}

    def observe_phase(self, namespace: str, name: str, phase: str | None) -> None:
        """Record a model's phase (None: it is gone) and refresh the per-phase gauge."""
        key = (namespace, name)
        if phase is None:
            self._phases.pop(key, None)
        else:
            self._phases[key] = phase
        counts: Mapping[str, int] = {p.value: 0 for p in Phase}
        counts = dict(counts)
        for value in self._phases.values():
            counts[value] = counts.get(value, 0) + 1
        for p, n in counts.items():
            self.models.labels(phase=p).set(n)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
