"""The real kopf operator against kmock's KubernetesEmulator, in-process.

The tests play the API server's missing parts (uid, generation) and the cluster's controllers:
they mark Jobs complete (with the pod's termination message the Job's container would leave) and
Deployments available. Each test starts a fresh emulator and operator and always stops both.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import kopf
import pytest

from leanserve.autoscaling.metrics import PrometheusSource
from leanserve.operator import access, handback
from leanserve.operator.constants import Label
from leanserve.operator.handlers import Runtime
from leanserve.operator.kube import Kinds, KubeClient
from leanserve.operator.metrics import OperatorMetrics
from leanserve.operator.runner import KopfTuning, make_runtime, run_operator
from leanserve.operator.settings import OperatorSettings, PolicySettings
from tests.unit.test_operator_bridge import Silent

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

NS = "ml"
TEST_CLIENT = "leanserve-tests"  # the User-Agent of the test's own requests
CM = "leanserve.io/v1alpha1/compressedmodels"
FAST = KopfTuning(watch_server_timeout=30, error_backoffs=(0.2, 0.5, 1), batch_window=0.05)

RESOURCES: dict[str, dict[str, Any]] = {
    CM: {"kind": "CompressedModel", "subresources": {"status"}},
    "v1/namespaces": {"kind": "Namespace", "namespaced": False},
    "v1/events": {"kind": "Event"},
    "v1/configmaps": {"kind": "ConfigMap"},
    "v1/services": {"kind": "Service"},
    "v1/pods": {"kind": "Pod", "subresources": {"status"}},
    "batch/v1/jobs": {"kind": "Job", "subresources": {"status"}},
    "apps/v1/deployments": {"kind": "Deployment", "subresources": {"status", "scale"}},
    "policy/v1/poddisruptionbudgets": {"kind": "PodDisruptionBudget"},
    "coordination.k8s.io/v1/leases": {"kind": "Lease"},
    "v1/persistentvolumeclaims": {"kind": "PersistentVolumeClaim"},
}
MONITORING = {"monitoring.coreos.com/v1/servicemonitors": {"kind": "ServiceMonitor"},
              "monitoring.coreos.com/v1/podmonitors": {"kind": "PodMonitor"}}


def model_body(name: str = "minilm", workers: int = 1, **spec_overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"uri": "pvc://models/minilm", "format": "huggingface",
                  "task": "feature-extraction"},
        "data": {"uri": "pvc://models/data/sentences.jsonl"},
        "compression": {"candidates": [
            {"name": "int8", "steps": [{"quantize": {"method": "int8-dynamic"}}]},
            {"name": "distilled", "steps": [{"distill": {"studentLayers": 3,
                                                         "workers": workers}}]},
        ]},
        "quality": {"metric": "cosine", "maxDrop": 0.02},
        "nodePools": [
            {"name": "cpu-small", "nodeSelector": {"leanserve.io/pool": "cpu-small"},
             "resources": {"requests": {"cpu": "2", "memory": "4Gi"}}, "hourlyPrice": 0.10},
            {"name": "cpu-large", "nodeSelector": {"leanserve.io/pool": "cpu-large"},
             "resources": {"requests": {"cpu": "8", "memory": "16Gi"}}, "hourlyPrice": 0.38},
            {"name": "gpu-t4", "nodeSelector": {"cloud.google.com/gke-accelerator": "t4"},
             "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                              "effect": "NoSchedule"}],
             "hourlyPrice": 0.53, "accelerator": "nvidia-gpu"},
        ],
        "slo": {"latencyP95Ms": 50},
        "autoscaling": {"minReplicas": 1, "maxReplicas": 4, "maxHourlyCost": 2.0},
    }
    spec.update(spec_overrides)
    return {"apiVersion": "leanserve.io/v1alpha1", "kind": "CompressedModel",
            "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 1,
                         "resourceVersion": "1"},
            "spec": spec}


def summary(selected: str | None, sha: str, uri: str, pools: dict[str, Any] | None) -> str:
    report = {"metric": "cosine", "selected": selected,
              "baseline": {"quality": 1.0, "latency_ms": {"p50": 9.0, "p95": 12.0}},
              "candidates": [
                  {"name": "distilled", "passed": False, "quality": 0.95, "quality_drop": 0.05,
                   "speedup": 2.1, "size_bytes": 30_000_000},
                  {"name": "int8", "passed": selected == "int8", "quality": 0.995,
                   "quality_drop": 0.005, "speedup": 1.9, "size_bytes": 23_000_000}]}
    return handback.encode(handback.summarize(report, uri, sha, {"pools": pools} if pools
                                              else None))


PROFILE = {"cpu-small": {"capacity_rps": 40, "cost_per_million_requests": 0.69, "measured": True},
           "cpu-large": {"capacity_rps": 200, "cost_per_million_requests": 0.53,
                         "measured": False},
           "gpu-t4": {"capacity_rps": 0, "cost_per_million_requests": 9.9, "measured": False}}


@dataclass
class Cluster:
    """The emulator plus the test's own client, playing kubectl, the kubelet and controllers."""

    emulator: kmock.KubernetesEmulator
    kube: KubeClient
    url: str

    async def get(self, kind: Kinds, name: str) -> dict[str, Any] | None:
        return await self.kube.get(kind, NS, name)

    async def cm(self, name: str = "minilm") -> dict[str, Any] | None:
        return await self.kube.get(Kinds.COMPRESSED_MODEL, NS, name)

    async def children(self, kind: Kinds, name: str = "minilm") -> list[dict[str, Any]]:
        return await self.kube.list(kind, NS, {Label.MODEL.value: name})

    async def wait(self, what: str, probe: Callable[[], Any], timeout: float = 45.0) -> Any:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = await probe()
            if last:
                return last
            await asyncio.sleep(0.05)
        cm = await self.cm()
        raise AssertionError(f"timed out waiting for {what}; last={last!r}; "
                             f"status={json.dumps((cm or {}).get('status'), indent=1)}")

    async def wait_phase(self, phase: str, name: str = "minilm") -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            cm = await self.cm(name)
            return cm if cm and (cm.get("status") or {}).get("phase") == phase else None
        return await self.wait(f"phase {phase}", probe)

    async def edit_spec(self, name: str, change: Callable[[dict[str, Any]], None]) -> None:
        cm = await self.cm(name)
        assert cm is not None
        spec = copy.deepcopy(cm["spec"])
        change(spec)
        gen = int(cm["metadata"]["generation"]) + 1  # a real API server bumps it
        await self.kube.patch(Kinds.COMPRESSED_MODEL, NS, name,
                              {"metadata": {"generation": gen}, "spec": spec})

    async def finish_job(self, job: dict[str, Any], message: str, failed: bool = False,
                         reason: str = "BackoffLimitExceeded") -> None:
        """Play the Job controller and kubelet: a terminated pod, then the Job's condition."""
        name = job["metadata"]["name"]
        await self.kube.create({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{name}-0-abcde", "namespace": NS,
                         "labels": {"job-name": name, "batch.kubernetes.io/job-name": name}},
            "spec": job["spec"]["template"]["spec"],
            "status": {"phase": "Failed" if failed else "Succeeded", "containerStatuses": [{
                "name": "compress", "ready": False, "restartCount": 0, "image": "x",
                "imageID": "", "state": {"terminated": {"exitCode": 1 if failed else 0,
                                                        "message": message}}}]}})
        cond = {"type": "Failed", "status": "True", "reason": reason,
                "message": "Job has reached the specified backoff limit"} if failed else \
            {"type": "Complete", "status": "True"}
        await self.kube.patch(Kinds.JOB, NS, name, {"status": {
            "conditions": [cond], "succeeded": 0 if failed else 1,
            "failed": 1 if failed else 0}}, sub="status")

    async def wait_reconciles(self, op: Operator, n: int = 2) -> None:
        """Wait until the operator has finished n more reconciles (resyncs included)."""
        def done() -> float:
            return metric(op, "leanserve_operator_reconciles_total", outcome="ok")
        target = done() + n

        async def probe() -> bool:
            return done() >= target
        await self.wait(f"{n} more reconciles", probe)

    async def make_available(self, name: str) -> None:
        """Play the Deployment controller: every replica updated, ready and available."""
        d = await self.get(Kinds.DEPLOYMENT, name)
        assert d is not None
        n = d["spec"]["replicas"]
        await self.kube.patch(Kinds.DEPLOYMENT, NS, name, {"status": {
            "observedGeneration": 1, "replicas": n, "readyReplicas": n, "updatedReplicas": n,
            "availableReplicas": n,
            "conditions": [{"type": "Available", "status": "True"}]}}, sub="status")


class ForgetfulEmulator(kmock.KubernetesEmulator):
    """kmock's emulator without its ever-growing request log, with server-side apply's create.

    kmock routes each request by testing ``request in reaction``, which walks the log of every
    request served so far through the reaction's filters: each request costs time proportional
    to all earlier ones (about 50 ms per request after 400 requests; bench/operator.py prints
    the measurement). The tests and the benchmark never read that log, so a finished request is
    dropped from it; the objects, the watch streams and every response stay kmock's own.

    kmock answers an apply PATCH of a missing object with 404; a real API server creates it
    (with a uid). The emulator plays that part; an apply to an existing object stays kmock's
    merge. What apply really does (field ownership, removal) is shown on the real control plane.
    Every request is noted as (HTTP method, resource, subresource) for the RBAC check.
    """

    seen: set[tuple[str, str, str]]

    async def _handle(self, request: Any) -> Any:
        if not hasattr(self, "seen"):
            self.seen = set()
        if request.resource is not None and request.resource.plural and \
                request.headers.get("User-Agent", "") != TEST_CLIENT:  # the test's own client
            res, method = request.resource, str(getattr(request.method, "value",
                                                        request.method)).upper()
            resource = res.plural + (f"/{request.subresource}" if request.subresource else "")
            watch = str(request.params.get("watch", "")).lower() in ("true", "1")
            self.seen.add((res.group or "", resource,
                           access.verb_of(method, bool(request.name), watch)))
        apply = str(request.headers.get("Content-Type", "")).startswith(
            "application/apply-patch")
        if apply and request.resource is not None and not request.subresource:
            key = (request.resource, request.namespace, request.name)
            # kmock matches reactions by the request's identity: changed in place.
            if key not in self._objects or self._objects[key].deleted:
                data = copy.deepcopy(request.data)
                data["metadata"].setdefault("uid", f"uid-{uuid.uuid4()}")
                object.__setattr__(request, "data", data)
                object.__setattr__(request, "action", kmock.action.CREATE)
            else:
                object.__setattr__(request, "action", kmock.action.UPDATE)
        try:
            return await super()._handle(request)
        finally:
            _drop(self._requests, request)
            for reaction in self._payloads:
                _drop(reaction._requests, request)


def _drop(log: list[Any], request: Any) -> None:
    for i in range(len(log) - 1, -1, -1):
        if log[i] is request:
            del log[i]
            return


@asynccontextmanager
async def emulator(monitoring: bool = False, *, stock: bool = False) -> AsyncIterator[Cluster]:
    """A fresh emulator with the operator's resources declared (``stock``: kmock's own class)."""
    cls = type("StockEmulator", (kmock.KubernetesEmulator,), {}) if stock else ForgetfulEmulator
    async with cls() as k, kmock.Server(k) as srv:
        for res, info in {**RESOURCES, **(MONITORING if monitoring else {})}.items():
            k.resources[res] = kmock.ResourceInfo(
                kind=info["kind"], namespaced=info.get("namespaced", True),
                verbs={"get", "list", "watch", "create", "patch", "delete"},
                subresources=info.get("subresources", set()))
        url = str(srv.url).rstrip("/")
        session = aiohttp.ClientSession(headers={"User-Agent": TEST_CLIENT})
        try:
            cluster = Cluster(k, KubeClient(session, url), url)
            # The claim the models live on, shareable as the operator requires (bound).
            await cluster.kube.create({
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": "models", "namespace": NS},
                "spec": {"accessModes": ["ReadWriteMany"],
                         "resources": {"requests": {"storage": "1Gi"}}},
                "status": {"phase": "Bound", "accessModes": ["ReadWriteMany"]}})
            yield cluster
        finally:
            await session.close()


@dataclass
class Operator:
    thread: threading.Thread
    stop: threading.Event
    metrics: OperatorMetrics
    errors: list[BaseException]
    rt: Runtime

    def writes(self) -> int:
        """PATCH and POST requests the operator's client has made so far (PUT is the leader
        Lease's renewal, every lease_seconds / 3, and nothing else)."""
        kube = self.rt.kube
        assert kube is not None
        return kube.by_method["PATCH"] + kube.by_method["POST"]

    def halt(self) -> None:
        self.stop.set()
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "the operator did not stop"


def start_operator(url: str, settings: OperatorSettings | None = None) -> Operator:
    settings = settings or replace(OperatorSettings(), resync_seconds=0.5, metrics_port=0,
                                   leader_election=False,
                                   liveness_port=0)
    rt = make_runtime(settings, login_fn=lambda: kopf.ConnectionInfo(server=url))
    stop, ready, errors = threading.Event(), threading.Event(), []

    def main() -> None:
        try:
            asyncio.run(run_operator(rt, tuning=FAST, stop_flag=stop, ready_flag=ready))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=main, name="operator", daemon=True)
    thread.start()
    assert ready.wait(20), f"the operator did not start: {errors}"
    return Operator(thread, stop, rt.metrics, errors, rt)


@asynccontextmanager
async def running(url: str, settings: OperatorSettings | None = None) -> AsyncIterator[Operator]:
    op = await asyncio.to_thread(start_operator, url, settings)
    try:
        yield op
    finally:
        await asyncio.to_thread(op.halt)


async def create(cluster: Cluster, body: dict[str, Any]) -> None:
    await cluster.kube.create(body)


def metric(op: Operator, name: str, **labels: str) -> float:
    return op.metrics.registry.get_sample_value(name, labels) or 0.0


# --------------------------------------------------------------------------------- tests


async def test_lifecycle_from_apply_to_serving_edits_and_deletion() -> None:
    # With leader election, as deployed; the serving edit below names a Triton image, which
    # the operator runs only from an allowed registry.
    settings = replace(OperatorSettings(), resync_seconds=0.5, metrics_port=0, liveness_port=0,
                       lease_namespace=NS, policy=PolicySettings(images=("nvcr.io/nvidia/",)))
    async with emulator(monitoring=True) as c, running(c.url, settings) as op:
        await create(c, model_body())
        jobs = await c.wait("the compression Job", lambda: c.children(Kinds.JOB))
        assert len(jobs) == 1
        job = jobs[0]
        name = job["metadata"]["name"]
        assert name.startswith("minilm-compress-")
        ctr = job["spec"]["template"]["spec"]["containers"][0]
        assert ctr["args"][ctr["args"].index("--") + 1:][:3] == ["leanserve", "compress",
                                                                  "/spec/spec.yaml"]
        assert job["spec"]["backoffLimit"] >= 0 and job["spec"]["activeDeadlineSeconds"] > 0
        assert "completionMode" not in job["spec"]  # workers: 1
        claims = [v["persistentVolumeClaim"]["claimName"]
                  for v in job["spec"]["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v]
        assert claims == ["models"]
        assert job["metadata"]["ownerReferences"][0] | {"uid": "uid-minilm"} == \
            job["metadata"]["ownerReferences"][0]
        assert job["metadata"]["ownerReferences"][0]["controller"] is True
        # The spec ConfigMap is applied right after the Job, owned by it (its uid).
        spec_cm = await c.wait("the Job's ConfigMap", lambda: c.get(Kinds.CONFIGMAP, name))
        assert spec_cm["metadata"]["ownerReferences"][0]["kind"] == "Job"
        assert spec_cm["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
        cm = await c.wait_phase("Compressing")
        assert cm["status"]["observedGeneration"] == 1

        uri = f"pvc://models/leanserve/minilm/{name.rsplit('-', 1)[1]}/model_repository"
        await c.finish_job(job, summary("int8", "a" * 64, uri, PROFILE))
        deployment = await c.wait("Deployment minilm-cpu-large",
                                  lambda: c.get(Kinds.DEPLOYMENT, "minilm-cpu-large"))
        pod = deployment["spec"]["template"]["spec"]
        triton = pod["containers"][0]
        assert "--model-repository=/models/leanserve/minilm/" in " ".join(triton["args"])
        assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert pod["nodeSelector"] == {"leanserve.io/pool": "cpu-large"}
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert deployment["metadata"]["labels"][Label.POOL.value] == "cpu-large"
        # The ServiceMonitor CRD exists here, so no scrape annotations on the pods.
        assert "prometheus.io/scrape" not in deployment["spec"]["template"]["metadata"][
            "annotations"]
        svc = await c.wait("Service minilm", lambda: c.get(Kinds.SERVICE, "minilm"))
        assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == \
            {"http": 8000, "grpc": 8001, "metrics": 8002}
        pdb = await c.wait("the PodDisruptionBudget", lambda: c.get(Kinds.PDB, "minilm"))
        assert pdb["spec"]["selector"] == {"matchLabels": svc["spec"]["selector"]}
        assert await c.wait("ServiceMonitor", lambda: c.kube.get(Kinds.SERVICE_MONITOR, NS,
                                                                 "minilm"))
        cm = await c.wait_phase("Deploying")
        assert cm["status"]["compression"]["selected"] == "int8"
        assert cm["status"]["artifact"] == {"uri": uri, "sha256": "a" * 64}

        await c.make_available("minilm-cpu-large")
        cm = await c.wait_phase("Serving")
        # The steady state writes nothing: every child was applied once, each resync (every
        # 0.5 s here) observes and plans the same objects and sends no PATCH (issue 14 item 5).
        await c.wait_reconciles(op, 2)
        before = op.writes()
        await c.wait_reconciles(op, 8)
        assert op.writes() == before
        conds = {x["type"]: x for x in cm["status"]["conditions"]}
        # No Prometheus here: the autoscaler has not stepped yet, or found no metrics.
        assert (conds.pop("Autoscaling")["reason"]) in ("Pending", "MetricsUnavailable")
        assert {t: conds[t]["status"] for t in conds} == {
            "Ready": "True", "Compressed": "True", "Deployed": "True", "SLOMet": "True",
            "BudgetMet": "True"}
        assert cm["status"]["serving"]["pool"] == "cpu-large"
        assert cm["status"]["serving"]["replicas"] == 1
        assert cm["status"]["cost"]["hourly"] == pytest.approx(0.38)
        ready_since = conds["Ready"]["lastTransitionTime"]
        # One Event per phase transition, named by the new Ready reason, each posted once.
        events = await c.kube.list(Kinds.EVENT, NS, {})
        phases = sorted((e["message"].split(":")[0], e["reason"], e["type"])
                        for e in events if " -> " in e["message"].split(":")[0])
        assert phases == sorted([("Pending -> Compressing", "Compressing", "Normal"),
                                 ("Compressing -> Deploying", "RollingOut", "Normal"),
                                 ("Deploying -> Serving", "Serving", "Normal")])
        assert all(e["involvedObject"]["uid"] == "uid-minilm" for e in events)

        # A serving edit (image, autoscaling) updates serving only: no second Job.
        await c.edit_spec("minilm", lambda s: s.update(
            serving={"image": "nvcr.io/nvidia/tritonserver:24.09-py3"},
            autoscaling={"minReplicas": 1, "maxReplicas": 8, "maxHourlyCost": 0.2}))

        async def image_rolled() -> bool:
            d = await c.get(Kinds.DEPLOYMENT, "minilm-cpu-large")
            return bool(d) and d["spec"]["template"]["spec"]["containers"][0]["image"] \
                .endswith("24.09-py3")
        await c.wait("the new image", image_rolled)
        cm = await c.wait("BudgetMet=False", lambda: _cond(c, "BudgetMet", "False"))
        assert len(await c.children(Kinds.JOB)) == 1
        assert cm["status"]["observedGeneration"] == 2
        ready = next(x for x in cm["status"]["conditions"] if x["type"] == "Ready")
        assert ready["status"] == "True" and ready["lastTransitionTime"] == ready_since

        # A recipe edit makes a new Job; the Deployment keeps the old artifact until it succeeds.
        await c.edit_spec("minilm", lambda s: s["compression"]["candidates"].pop())
        jobs = await c.wait("a second Job", lambda: _jobs(c, 2))
        new = next(j for j in jobs if j["metadata"]["name"] != name)
        d = await c.get(Kinds.DEPLOYMENT, "minilm-cpu-large")
        assert d["spec"]["template"]["metadata"]["annotations"][
            "leanserve.io/artifact-sha256"] == "a" * 64
        await c.wait_phase("Compressing")
        new_uri = uri.replace(name.rsplit("-", 1)[1], new["metadata"]["name"].rsplit("-", 1)[1])
        await c.finish_job(new, summary("int8", "b" * 64, new_uri, PROFILE))

        async def rolled() -> bool:
            d = await c.get(Kinds.DEPLOYMENT, "minilm-cpu-large")
            return d["spec"]["template"]["metadata"]["annotations"][
                "leanserve.io/artifact-sha256"] == "b" * 64
        await c.wait("the Deployment rolled to the new artifact", rolled)
        await c.make_available("minilm-cpu-large")
        await c.wait_phase("Serving")

        # A pool edit: cpu-large leaves the spec; cpu-small takes over, then cpu-large goes.
        await c.edit_spec("minilm", lambda s: s.update(nodePools=[
            p for p in s["nodePools"] if p["name"] != "cpu-large"]))
        await c.wait("Deployment minilm-cpu-small",
                     lambda: c.get(Kinds.DEPLOYMENT, "minilm-cpu-small"))
        assert await c.get(Kinds.DEPLOYMENT, "minilm-cpu-large") is not None
        await c.make_available("minilm-cpu-small")
        await c.wait("the old pool's Deployment to go",
                     lambda: _absent(c, Kinds.DEPLOYMENT, "minilm-cpu-large"))
        assert len(await c.children(Kinds.JOB)) == 2

        # Deletion: no finalizer (nothing outside the cluster to clean), so the object goes at
        # once, with or without an operator; its children carry ownerReferences and the garbage
        # collector removes them (shown on the real control plane: the emulator has none).
        cm = await c.cm()
        assert not cm["metadata"].get("finalizers")
        assert not any(k.startswith("kopf.") for k in cm["metadata"].get("annotations") or {})
        uid = cm["metadata"]["uid"]
        jobs = {j["metadata"]["name"]: j["metadata"]["uid"] for j in await c.children(Kinds.JOB)}
        for kind in (Kinds.JOB, Kinds.DEPLOYMENT, Kinds.SERVICE, Kinds.PDB, Kinds.CONFIGMAP):
            for child in await c.children(kind):
                ref = child["metadata"]["ownerReferences"][0]
                owned_by_job = child["metadata"]["name"] in jobs and kind is not Kinds.JOB
                assert ref["uid"] == (jobs[child["metadata"]["name"]] if owned_by_job else uid)
                assert ref["controller"] is True
        await c.kube.delete(Kinds.COMPRESSED_MODEL, NS, "minilm")
        assert await c.cm() is None
        assert metric(op, "leanserve_operator_jobs_created_total") == 2
        assert metric(op, "leanserve_operator_reconciles_total", outcome="ok") > 0
        assert op.errors == []
        # Every request the operator (kopf included) made is granted by deploy/operator's RBAC
        # (access.py; test_operator_access.py ties the two), and it used nearly all of it.
        granted = access.triples(access.CLUSTER_RULES) | access.triples(access.NAMESPACE_RULES)
        assert c.emulator.seen - granted == set()
        unused = granted - c.emulator.seen
        # kube-apiserver authorizes an apply that creates as `create` too; the emulator only
        # sees the PATCH (the real control plane's RBAC test covers `create`).
        unused -= {t for t in granted if t[2] == "create" and (t[0], t[1], "patch") in granted}
        assert unused <= {("apps", "deployments/scale", "patch"),  # no profile to scale by
                          ("", "events", "list"),  # no Job stuck unstarted here
                          ("", "secrets", "get"),  # no spec here names a Secret
                          ("leanserve.io", "compressedmodels/finalizers", "update"),  # admission
                          ("monitoring.coreos.com", "podmonitors", "patch"),
                          ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
                          ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
                          ("coordination.k8s.io", "leases", "update")}, unused


async def test_invalid_spec_reports_the_field_and_creates_nothing() -> None:
    async with emulator() as c, running(c.url) as op:
        body = model_body()
        body["spec"]["compression"]["candidates"][0]["steps"][0]["quantize"]["method"] = "int3"
        body["spec"]["data"]["uri"] = "data/sentences.jsonl"
        await create(c, body)
        cm = await c.wait_phase("Failed")
        ready = next(x for x in cm["status"]["conditions"] if x["type"] == "Ready")
        assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
        assert "spec.compression.candidates[0].steps[0].quantize.method" in ready["message"] \
            or "spec.compression.candidates.0.steps.0.quantize.method" in ready["message"]
        assert "int8-dynamic" in ready["message"]  # the allowed values are named
        await c.wait_reconciles(op, 2)  # two resyncs: still nothing
        for kind in (Kinds.JOB, Kinds.CONFIGMAP, Kinds.DEPLOYMENT, Kinds.SERVICE):
            assert await c.children(kind) == []

        # The method fixed, the relative data path is still refused, naming the field.
        await c.edit_spec("minilm", lambda s: s["compression"]["candidates"][0]["steps"][0][
            "quantize"].update(method="int8-dynamic"))
        cm = await c.wait("the cluster-only error", lambda: _reason_message(c, "spec.data.uri"))
        assert await c.children(Kinds.JOB) == []
        await c.edit_spec("minilm", lambda s: s["data"].update(uri="pvc://models/data/s.jsonl"))
        assert await c.wait("the Job", lambda: c.children(Kinds.JOB))


async def test_failed_job_reports_reason_and_last_log_lines() -> None:
    async with emulator() as c, running(c.url) as op:
        await create(c, model_body())
        job = (await c.wait("the Job", lambda: c.children(Kinds.JOB)))[0]
        await c.finish_job(job, "loading model\nRuntimeError: CUDA out of memory", failed=True)
        cm = await c.wait_phase("Failed")
        ready = next(x for x in cm["status"]["conditions"] if x["type"] == "Ready")
        comp = next(x for x in cm["status"]["conditions"] if x["type"] == "Compressed")
        assert ready["reason"] == comp["reason"] == "JobFailed"
        assert "BackoffLimitExceeded" in comp["message"]
        assert "RuntimeError: CUDA out of memory" in comp["message"]
        await c.wait_reconciles(op, 2)  # two resyncs after Failed: still one Job, no Deployment
        assert len(await c.children(Kinds.JOB)) == 1  # a failed recipe is not retried blindly
        assert await c.children(Kinds.DEPLOYMENT) == []
        # The Event is posted before the status that records the transition: already there.
        events = [(e["type"], e["reason"], e["message"].split(":")[0])
                  for e in await c.kube.list(Kinds.EVENT, NS, {})]
        assert events.count(("Warning", "JobFailed", "Compressing -> Failed")) == 1
        assert events.count(("Normal", "Compressing", "Pending -> Compressing")) == 1
        failed = next(e for e in await c.kube.list(Kinds.EVENT, NS, {})
                      if e["reason"] == "JobFailed")
        assert "RuntimeError: CUDA out of memory" in failed["message"]


async def test_restart_mid_flight_makes_no_duplicate_and_keeps_status() -> None:
    async with emulator() as c:
        async with running(c.url):
            await create(c, model_body(workers=2))
            jobs = await c.wait("the Job", lambda: c.children(Kinds.JOB))
            await c.wait_phase("Compressing")
        job = jobs[0]
        name = job["metadata"]["name"]
        assert job["spec"]["completionMode"] == "Indexed"
        assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
        env = {e["name"]: e.get("value") for e in
               job["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["MASTER_ADDR"] == f"{name}-0.{name}" and env["WORLD_SIZE"] == "2"
        headless = await c.wait("the headless Service", lambda: c.get(Kinds.SERVICE, name))
        assert headless is not None and headless["spec"]["clusterIP"] == "None"

        # The Job finishes while no operator runs; a new operator picks up from the cluster.
        uri = f"pvc://models/leanserve/minilm/{name.rsplit('-', 1)[1]}/model_repository"
        await c.finish_job(job, summary("int8", "c" * 64, uri, None))
        async with running(c.url):
            d = await c.wait("the Deployment", lambda: c.get(Kinds.DEPLOYMENT,
                                                             "minilm-cpu-small"))
            await c.make_available(d["metadata"]["name"])
            cm = await c.wait_phase("Serving")
        assert [j["metadata"]["name"] for j in await c.children(Kinds.JOB)] == [name]
        slo = next(x for x in cm["status"]["conditions"] if x["type"] == "SLOMet")
        assert slo["status"] == "Unknown" and "hourlyPrice" in slo["message"]
        # A third start finds everything in place and changes nothing.
        before = cm["status"]
        async with running(c.url) as op:
            await c.wait_reconciles(op, 2)
        after = (await c.cm())["status"]
        assert after["phase"] == "Serving" and after["conditions"] == before["conditions"]
        assert len(await c.children(Kinds.JOB)) == 1
        # No monitoring CRDs here: the pods carry Prometheus's scrape annotations instead.
        ann = d["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "8002"


async def test_sigterm_stops_the_operator_at_once_while_a_prometheus_query_hangs(
        tmp_path: Path, serving_group_members: Callable[[int], list[int]]) -> None:
    """`leanserve operator` exits cleanly on SIGTERM (every rollout of its Deployment) while its
    autoscaler waits on a Prometheus that never answers, before that query's own timeout and
    with no query after the signal. Before, asyncio.run joined the worker thread blocked in the
    query, and the exit waited for each query of the step to time out (5 x 5 s). A reconcile
    waiting for the model's lock behind the step is not cut off by kopf's drain timeout either:
    the step stops at the signal, not at the cleanup after the drain."""
    prom = Silent()  # a Prometheus that accepts every query and never answers
    profile = {**PROFILE, "gpu-t4": {"capacity_rps": 400, "cost_per_million_requests": 9.9,
                                     "measured": False}}
    async with emulator() as c:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": c.url}}],
            "users": [{"name": "operator", "user": {"token": "t"}}],
            "contexts": [{"name": "emulator",
                          "context": {"cluster": "emulator", "user": "operator"}}]}))
        env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
        env.update(PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH")))),
                   KUBECONFIG=str(kubeconfig), LEANSERVE_OPERATOR_ALLOWED_PROMETHEUS_URLS=prom.url,
                   LEANSERVE_OPERATOR_METRICS_PORT="0", LEANSERVE_OPERATOR_LIVENESS_PORT="0",
                   LEANSERVE_OPERATOR_LEASE_NAMESPACE=NS)
        log = tmp_path / "operator.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "leanserve", "operator", "--namespace",
                                     NS], env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)
        try:
            await create(c, model_body(autoscaling={
                "minReplicas": 1, "maxReplicas": 4, "maxHourlyCost": 2.0,
                "prometheusUrl": prom.url, "intervalSeconds": 1}))
            job = (await c.wait("the Job", lambda: c.children(Kinds.JOB), timeout=60))[0]
            uri = f"pvc://models/leanserve/minilm/{job['metadata']['name'].rsplit('-', 1)[1]}" \
                  "/model_repository"
            await c.finish_job(job, summary("int8", "a" * 64, uri, profile))
            await c.wait("the Deployment", lambda: c.get(Kinds.DEPLOYMENT, "minilm-cpu-large"))
            await c.make_available("minilm-cpu-large")
            await c.wait_phase("Serving")

            async def waiting() -> bool:
                return prom.count > 0
            await c.wait("an autoscaling query", waiting)
            # a watch event: its reconcile waits for the model's lock, held by the step
            await c.kube.patch(Kinds.COMPRESSED_MODEL, NS, "minilm",
                               {"metadata": {"labels": {"poke": "1"}}})
            await asyncio.sleep(0.5)
            queries = prom.count
            os.killpg(proc.pid, signal.SIGTERM)
            # the emulator keeps answering (the Lease's release) while this thread waits
            code = await asyncio.to_thread(proc.wait, PrometheusSource.timeout)
            assert code == 0, log.read_text()
            assert prom.count == queries  # no query after the signal
            assert serving_group_members(proc.pid) == []
            text = log.read_text()
            assert "Signal SIGTERM received" in text and "Traceback" not in text, text
            # kopf's drain found no handler still running: none was cancelled
            assert "Unprocessed streams" not in text and "is cancelled" not in text, text
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            prom.close()


async def _cond(c: Cluster, ctype: str, status: str) -> dict[str, Any] | None:
    cm = await c.cm()
    for x in (cm or {}).get("status", {}).get("conditions", []):
        if x["type"] == ctype and x["status"] == status:
            return cm
    return None


async def _jobs(c: Cluster, n: int) -> list[dict[str, Any]] | None:
    jobs = await c.children(Kinds.JOB)
    return jobs if len(jobs) == n else None


async def _absent(c: Cluster, kind: Kinds, name: str) -> bool:
    return await c.kube.get(kind, NS, name) is None


async def _reason_message(c: Cluster, needle: str) -> dict[str, Any] | None:
    cm = await c.cm()
    for x in (cm or {}).get("status", {}).get("conditions", []):
        if x["type"] == "Ready" and x["reason"] == "InvalidSpec" and needle in x["message"]:
            return cm
    return None
