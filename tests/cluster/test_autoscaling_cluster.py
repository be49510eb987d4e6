"""What the autoscaling policy decides, the cluster does (issue 15), on the real control plane.

Real parts end to end: a real Prometheus (Debian's binary, leanserve.local.prometheus) scrapes
a stand-in for Triton's /metrics endpoint (the counters and summary tritonserver exports, for
the model's name) at a load the test sets; the operator (its ServiceAccount token, RBAC as
shipped) reads it through its PromQL, the policy decides, the Deployments are scaled through
the scale subresource and created or removed by the planner from the decision in status; kwok
makes the serving pods Ready. Only the load is synthetic: no tritonserver runs in the cluster.

The model serves on cpu-small (cheapest per request, from the profile the Job left). At 150
req/s, two cpu-small replicas (50 req/s each, maxReplicas 2) cannot carry it and the policy
moves to cpu-large (200 req/s): the decision names both pools while cpu-large starts, cpu-small
keeps its replica until cpu-large's is Ready, then goes to 0 and its Deployment is removed. A
watch on the Deployments records every change in order; the test checks that order. Then
Prometheus stops: condition Autoscaling=False, reason MetricsUnavailable, with a Warning Event.
"""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clusterlib import OperatorProcess, finish_job_pod, wait_for
from kubeapi import Api

from leanserve.autoscaling.metrics import PrometheusSource, Queries
from leanserve.local.prometheus import LocalPrometheus, prometheus_binary
from leanserve.operator import handback

GROUP_PATH = "/apis/leanserve.io/v1alpha1"
NAME = "switch"
SMALL, LARGE = "cpu-small", "cpu-large"
PROFILE = {"pools": {SMALL: {"capacity_rps": 50.0, "cost_per_million_requests": 0.556,
                             "measured": True},
                     LARGE: {"capacity_rps": 200.0, "cost_per_million_requests": 0.694,
                             "measured": False}}}


class TritonMetrics:
    """Triton's metrics endpoint for one model at a set request rate (counters integrate it).

    The load has been running for ``HISTORY_SECONDS`` already: ``history`` writes those
    samples as Prometheus would have scraped them (every second), for ``promtool tsdb
    create-blocks-from`` to load before Prometheus starts. A rate() over the operator's
    window is then the load from the first query, as on a server that ran for a while, not a
    ramp from a series that has just appeared.
    """

    HISTORY_SECONDS = 120

    def __init__(self, model: str, rate: float, p95_ms: float = 20.0) -> None:
        self.model, self.rate, self.p95_ms = model, rate, p95_ms
        self.started = time.time()
        self._count, self._since = rate * self.HISTORY_SECONDS, time.monotonic()
        self._lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = outer.exposition().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def exposition(self) -> str:
        with self._lock:
            now = time.monotonic()
            self._count += self.rate * (now - self._since)
            self._since = now
            n = self._count
        labels = f'model="{self.model}",version="1"'
        return (f"nv_inference_request_success{{{labels}}} {n:.0f}\n"
                f'nv_inference_request_failure{{{labels},reason="REJECTED"}} 0\n'
                f"nv_inference_count{{{labels}}} {n:.0f}\n"
                f"nv_inference_queue_duration_us{{{labels}}} {n * 150:.0f}\n"
                f"nv_inference_pending_request_count{{{labels}}} 0\n"
                f"nv_inference_request_duration_us{{{labels}}} {n * self.p95_ms * 600:.0f}\n"
                f'nv_inference_request_summary_us{{{labels},quantile="0.95"}} '
                f"{self.p95_ms * 1000:.0f}\n")

    def history(self, labels: dict[str, str]) -> str:
        """OpenMetrics text of the request counter's past, with the scrape's target labels."""
        sel = ",".join(f'{k}="{v}"' for k, v in
                       {"model": self.model, "version": "1", **labels}.items())
        # Typed gauge: OpenMetrics would want a counter named ..._total; rate() reads either.
        lines = ["# TYPE nv_inference_request_success gauge"]
        for k in range(self.HISTORY_SECONDS):
            t = self.started - self.HISTORY_SECONDS + k
            lines.append(f"nv_inference_request_success{{{sel}}} {self.rate * k:.0f} {t:.3f}")
        return "\n".join([*lines, "# EOF", ""])

    def __enter__(self) -> TritonMetrics:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class DeploymentWatch:
    """Every change of the namespace's Deployments, in the API server's order.

    Short watch requests resumed from the last resourceVersion (no event lost between them),
    so that ``close`` stops it within one request's timeout.
    """

    def __init__(self, api: Api, ns: str) -> None:
        self.events: list[tuple[str, str, int, int]] = []  # (type, pool, replicas, ready)
        self._api, self._path = api, f"/apis/apps/v1/namespaces/{ns}/deployments"
        self._rv = api.get(self._path)["metadata"]["resourceVersion"]
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            query = urllib.parse.urlencode({"watch": "1", "resourceVersion": self._rv,
                                            "timeoutSeconds": "2",
                                            "allowWatchBookmarks": "false"})
            with urllib.request.urlopen(f"{self._api.server}{self._path}?{query}",
                                        context=self._api.ctx, timeout=30) as resp:
                for line in resp:
                    ev = json.loads(line)
                    d = ev["object"]
                    self._rv = d["metadata"]["resourceVersion"]
                    self.events.append((ev["type"], d["metadata"]["labels"]["leanserve.io/pool"],
                                        int(d["spec"].get("replicas") or 0),
                                        int((d.get("status") or {}).get("readyReplicas") or 0)))

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=40)


def model(ns: str, url: str) -> dict[str, Any]:
    pools = [{"name": pool, "nodeSelector": {"leanserve.io/pool": pool},
              "resources": {"requests": {"cpu": cpu, "memory": "1Gi"}}, "hourlyPrice": price}
             for pool, cpu, price in ((SMALL, "1", 0.1), (LARGE, "4", 0.5))]
    return {"apiVersion": "leanserve.io/v1alpha1", "kind": "CompressedModel",
            "metadata": {"name": NAME, "namespace": ns},
            "spec": {"model": {"uri": "pvc://models/minilm", "format": "huggingface",
                               "task": "feature-extraction"},
                     "data": {"uri": "pvc://models/data/sentences.jsonl"},
                     "compression": {"candidates": [
                         {"name": "int8", "steps": [{"quantize": {"method": "int8-dynamic"}}]}]},
                     "nodePools": pools, "slo": {"latencyP95Ms": 50},
                     "autoscaling": {"minReplicas": 1, "maxReplicas": 2, "intervalSeconds": 1,
                                     "scaleDownStabilizationSeconds": 0,
                                     "prometheusUrl": url}}}


def cmod(api: Api, ns: str) -> dict[str, Any]:
    return dict(api.get(f"{GROUP_PATH}/namespaces/{ns}/compressedmodels/{NAME}"))


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next((dict(c) for c in (obj.get("status") or {}).get("conditions") or []
                 if c["type"] == ctype), {})


def deployments(api: Api, ns: str) -> dict[str, tuple[int, int]]:
    return {d["metadata"]["labels"]["leanserve.io/pool"]: (
        int(d["spec"]["replicas"]), int((d.get("status") or {}).get("readyReplicas") or 0))
        for d in api.get(f"/apis/apps/v1/namespaces/{ns}/deployments")["items"]}


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[LocalPrometheus, TritonMetrics]]:
    if prometheus_binary() is None:
        pytest.skip("prometheus is not installed (apt-get install -y prometheus)")
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian's prometheus package ships it)")
    with TritonMetrics(NAME, rate=150.0) as triton:
        target = {"job": "leanserve-local", "instance": triton.address, "pool": SMALL}
        (tmp_path / "prometheus").mkdir()
        (tmp_path / "history.om").write_text(triton.history(target))
        subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics", "-q",
                        str(tmp_path / "history.om"), str(tmp_path / "prometheus" / "data")],
                       check=True, capture_output=True, timeout=60)
        with LocalPrometheus(tmp_path / "prometheus", scrape_interval_s=1.0) as prom:
            prom.set_targets([([triton.address], {"pool": SMALL})])
            # The first decision sees 150 req/s and a p95 (a live scrape) through the
            # operator's own queries.
            source = PrometheusSource(url=prom.url, queries=Queries(model=NAME),
                                      clock=time.time)
            wait_for(lambda: (r := source.read()).p95_ms is not None and
                     (r.request_rate or 0.0) > 140.0, 60, "Prometheus to see the load")
            yield prom, triton


def test_a_pool_switch_decided_by_the_policy_is_carried_out_without_dropping_capacity(
        control_plane: Any, operator_kubeconfig: Path, ns: str, tmp_path: Path,
        prometheus: tuple[LocalPrometheus, TritonMetrics]) -> None:
    prom, _triton = prometheus
    api = Api(control_plane.server, control_plane.dir / "pki")
    with OperatorProcess(operator_kubeconfig, tmp_path / "operator.log",
                         LEANSERVE_OPERATOR_ALLOWED_PROMETHEUS_URLS=prom.url) as op:
        watch: DeploymentWatch | None = None
        try:
            control_plane.kubectl("apply", "-f", "-", input=json.dumps(model(ns, prom.url)))
            job = wait_for(lambda: api.get(f"/apis/batch/v1/namespaces/{ns}/jobs")["items"],
                           60, "the compression Job")[0]["metadata"]["name"]
            watch = DeploymentWatch(api, ns)
            report = {"metric": "cosine", "selected": "int8", "baseline": {"quality": 1.0},
                      "candidates": [{"name": "int8", "passed": True, "quality": 0.995}]}
            uri = f"pvc://models/leanserve/{NAME}/{job.rsplit('-', 1)[1]}/model_repository"
            finish_job_pod(api, ns, job, handback.encode(handback.summarize(
                report, uri, "c" * 64, PROFILE)))

            # The decision carried out: cpu-large alone, cpu-small's Deployment gone.
            def switched() -> dict[str, Any] | None:
                m = cmod(api, ns)
                last = ((m.get("status") or {}).get("autoscaling") or {}).get("last") or {}
                done = {p: n for p, n in (last.get("replicas") or {}).items() if n > 0}
                return m if list(done) == [LARGE] and list(deployments(api, ns)) == [LARGE] \
                    else None
            m = wait_for(switched, 120, "the move to cpu-large, cpu-small removed")
            decided = m["status"]["autoscaling"]["last"]["replicas"]
            wait_for(lambda: deployments(api, ns)[LARGE] == (decided[LARGE], decided[LARGE]),
                     60, "cpu-large at the decided replicas, Ready")
            m = wait_for(lambda: (x := cmod(api, ns))["status"]["serving"]["pool"] == LARGE
                         and x, 30, "status.serving on cpu-large")
            assert m["status"]["phase"] == "Serving"
            assert condition(m, "Autoscaling")["status"] == "True", m["status"]["conditions"]
            large = api.get(f"/apis/apps/v1/namespaces/{ns}/deployments/{NAME}-{LARGE}")
            pod = large["spec"]["template"]["spec"]
            assert pod["nodeSelector"] == {"leanserve.io/pool": LARGE}
            assert pod["containers"][0]["resources"]["requests"]["cpu"] == "4"
            watch.close()

            # The order of what happened: served on cpu-small first; cpu-small lost its
            # replica (scaled to 0 or deleted) only after cpu-large had a Ready replica.
            events = watch.events
            first_small_ready = next(i for i, e in enumerate(events)
                                     if e[1] == SMALL and e[3] >= 1)
            first_large = next(i for i, e in enumerate(events) if e[1] == LARGE)
            assert first_small_ready < first_large, events
            large_ready = next(i for i, e in enumerate(events) if e[1] == LARGE and e[3] >= 1)
            small_gone = next(i for i, e in enumerate(events) if e[1] == SMALL and
                              (e[0] == "DELETED" or e[2] == 0))
            assert large_ready < small_gone, events
            assert any(e[0] == "DELETED" and e[1] == SMALL for e in events), events

            # No metrics: the autoscaler says so in a condition and an Event, and holds.
            prom.stop()
            stuck = wait_for(lambda: (x := cmod(api, ns)) and condition(
                x, "Autoscaling").get("reason") == "MetricsUnavailable" and x, 60,
                "Autoscaling=False, reason MetricsUnavailable")
            assert condition(stuck, "Autoscaling")["status"] == "False"
            assert "Prometheus" in condition(stuck, "Autoscaling")["message"]
            wait_for(lambda: any(e["reason"] == "MetricsUnavailable" and e["type"] == "Warning"
                                 for e in api.get(f"/api/v1/namespaces/{ns}/events")["items"]),
                     30, "a Warning Event MetricsUnavailable")
            assert list(deployments(api, ns)) == [LARGE], cmod(api, ns)["status"]
        finally:
            if watch is not None:
                watch.close()
            print("\n".join(ln for ln in op.text().splitlines()
                            if "Handler 'build_registry" not in ln)[-6000:])
        assert [ln for ln in op.forbidden() if " cannot " in ln] == [], \
            "the operator was refused by its own RBAC"
