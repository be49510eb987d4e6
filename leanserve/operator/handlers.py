"""kopf handlers: observe the cluster, call the pure planner, apply what it says.

Handlers stay thin (STYLE.md 1): parsing and planning live in ``planner``/``builders``, I/O in
``kube``. Every reconcile derives its state from the cluster — the Job found by its name, the
status stored on the object — so a restarted operator plans exactly what the previous one did.
LeanserveErrors become kopf's TemporaryError (retry) or PermanentError only here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import aiohttp
import kopf

from leanserve.api.load import SpecError, parse
from leanserve.api.spec import GROUP, PLURAL, VERSION, CompressedModelSpec, Phase
from leanserve.operator import builders, planner, stores
from leanserve.operator.builders import Owner
from leanserve.operator.constants import Annotation, Component, JobState, Label, MonitorKind
from leanserve.operator.errors import ApiError, OperatorError
from leanserve.operator.kube import Kinds, KubeClient, contains
from leanserve.operator.metrics import OperatorMetrics
from leanserve.operator.settings import OperatorSettings

MONITOR_TTL_SECONDS = 60.0
CHILD_KINDS = (Kinds.DEPLOYMENT, Kinds.SERVICE, Kinds.PDB, Kinds.JOB, Kinds.CONFIGMAP)


@dataclass
class Runtime:
    """What the handlers share: injected clients, settings, clock and metrics."""

    settings: OperatorSettings
    metrics: OperatorMetrics
    login: Callable[[], kopf.ConnectionInfo]
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    kube: KubeClient | None = None
    autoscale: Callable[..., Any] | None = None  # leanserve.operator.autoscale.step when wired
    _monitor: tuple[float, MonitorKind] | None = field(default=None, repr=False)
    # kopf runs the change handlers and the resync timer of one object in separate tasks: one
    # lock per object serializes its reconciles. The status this process last wrote stands in
    # for a body the watch has not caught up with yet (a cache only: a restarted operator
    # starts from the cluster's status).
    _locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict, repr=False)
    _written: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict, repr=False)

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    def forget(self, namespace: str, name: str) -> None:
        self._locks.pop((namespace, name), None)
        self._written.pop((namespace, name), None)

    @property
    def client(self) -> KubeClient:
        if self.kube is None:
            raise OperatorError("the operator's API client is not started")
        return self.kube

    async def monitor_kind(self) -> MonitorKind:
        """Which Prometheus Operator CRD the cluster serves (discovery, cached a minute)."""
        now = time.monotonic()
        if self._monitor is not None and now - self._monitor[0] < MONITOR_TTL_SECONDS:
            return self._monitor[1]
        served = await self.client.served("monitoring.coreos.com/v1")
        kind = (MonitorKind.SERVICE_MONITOR if "servicemonitors" in served else
                MonitorKind.POD_MONITOR if "podmonitors" in served else MonitorKind.NONE)
        self._monitor = (now, kind)
        return kind


# ------------------------------------------------------------------------------- parsing


def to_resource(body: kopf.Body | dict[str, Any]) -> planner.Resource:
    """The planner's view of a CompressedModel: a parsed spec, or the lines saying why not."""
    meta = dict(body.get("metadata") or {})
    owner = Owner(meta.get("name", ""), meta.get("namespace") or "default", meta.get("uid", ""))
    doc = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
           "metadata": {"name": owner.name, "namespace": owner.namespace},
           "spec": dict(body.get("spec") or {})}
    spec: CompressedModelSpec | None = None
    errors: list[str] = []
    try:
        spec = parse(_plain(doc)).spec
    except SpecError as exc:
        errors = list(exc.errors)
    if spec is not None:
        errors = stores.cluster_errors(spec)
    return planner.Resource(owner, int(meta.get("generation") or 0), None if errors else spec,
                            tuple(errors), _plain(dict(body.get("status") or {})))


def _plain(value: Any) -> Any:
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------- observing


def job_observation(job: dict[str, Any], pods: list[dict[str, Any]]) -> planner.JobObservation:
    """A Job's state from its conditions, and the report from its pods' termination message."""
    st = job.get("status") or {}
    conds = {c.get("type"): c for c in st.get("conditions") or [] if c.get("status") == "True"}
    name = job["metadata"]["name"]
    if "Failed" in conds:
        state, cond = JobState.FAILED, conds["Failed"]
    elif "Complete" in conds or "SuccessCriteriaMet" in conds:
        state, cond = JobState.SUCCEEDED, conds.get("Complete") or conds["SuccessCriteriaMet"]
    else:
        return planner.JobObservation(name, JobState.RUNNING)
    return planner.JobObservation(name, state, str(cond.get("reason") or ""),
                                  str(cond.get("message") or ""), _termination(pods))


def _termination(pods: list[dict[str, Any]]) -> str:
    """The termination message of the leading pod (index 0 of an Indexed Job), newest first."""
    def key(p: dict[str, Any]) -> tuple[int, str]:
        ann = (p.get("metadata") or {}).get("annotations") or {}
        index = ann.get(Annotation.COMPLETION_INDEX.value, "0")
        return (0 if index == "0" else 1, str((p.get("metadata") or {}).get(
            "creationTimestamp") or ""))
    messages = []
    for pod in sorted(pods, key=key):
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            for state in (cs.get("state") or {}, cs.get("lastState") or {}):
                msg = (state.get("terminated") or {}).get("message")
                if msg:
                    messages.append(msg)
    return messages[0] if messages else ""


def deployment_observation(pool: str, d: dict[str, Any]) -> planner.DeploymentObservation:
    st = d.get("status") or {}
    available = any(c.get("type") == "Available" and c.get("status") == "True"
                    for c in st.get("conditions") or [])
    tmpl = ((d.get("spec") or {}).get("template") or {}).get("metadata") or {}
    return planner.DeploymentObservation(
        pool=pool, replicas=int((d.get("spec") or {}).get("replicas") or 0),
        ready=int(st.get("readyReplicas") or 0), updated=int(st.get("updatedReplicas") or 0),
        available=available,
        artifact_sha=str((tmpl.get("annotations") or {}).get(Annotation.ARTIFACT_SHA.value, "")))


async def observe(rt: Runtime, res: planner.Resource) -> planner.Observed:
    """Read what the plan depends on, and nothing more (each call is one API request)."""
    kube, owner = rt.client, res.owner
    if res.spec is None:
        return planner.Observed()
    jp = builders.job_plan(owner, res.spec)
    job_obs = None
    done = (res.status.get("compression") or {}).get("recipeHash") == jp.recipe
    if not done:
        job = await kube.get(Kinds.JOB, owner.namespace, jp.name)
        if job is not None:
            pods = []
            if any((c.get("status") == "True") for c in (job.get("status") or {}).get(
                    "conditions") or []):
                pods = await kube.list(Kinds.POD, owner.namespace, {Label.JOB_NAME.value: jp.name})
            job_obs = job_observation(job, pods)
    # Serving children matter once there is an artifact to serve (from an earlier recipe, or
    # the Job that just succeeded); a model still compressing its first recipe has none.
    serving = bool((res.status.get("artifact") or {}).get("uri")) or (
        job_obs is not None and job_obs.state is JobState.SUCCEEDED)
    if not serving:
        return planner.Observed(job=job_obs)
    deployments = await kube.list(Kinds.DEPLOYMENT, owner.namespace, {
        Label.MODEL.value: owner.name, Label.COMPONENT.value: Component.SERVING.value})
    by_pool = {}
    for d in deployments:
        pool = ((d.get("metadata") or {}).get("labels") or {}).get(Label.POOL.value)
        if pool:
            by_pool[pool] = deployment_observation(pool, d)
    return planner.Observed(job=job_obs, deployments=by_pool, monitor=await rt.monitor_kind())


# ------------------------------------------------------------------------------ applying


def transition_key(status: dict[str, Any]) -> str:
    """A digest of the status a transition starts from: the Events' names derive from it."""
    seen = {"phase": status.get("phase"), "conditions": status.get("conditions"),
            "generation": status.get("observedGeneration")}
    return hashlib.sha256(json.dumps(seen, sort_keys=True, default=str).encode()).hexdigest()


async def apply(rt: Runtime, res: planner.Resource, desired: planner.Desired,
                current_status: dict[str, Any]) -> None:
    """Children first, then the transition's Events, then the status that records it.

    Events go before the status: if the status write fails, the retry plans the same
    transition from the same status, its Events get the same names and the API answers 409 for
    those already posted, so an Event is neither lost nor doubled.
    """
    kube, owner = rt.client, res.owner
    for obj in desired.ensure:
        if await kube.ensure(obj) and obj["kind"] == "Job":
            rt.metrics.jobs_created.inc()
    for obj in desired.apply:
        await kube.apply(obj)
    for kind, name in desired.delete:
        await kube.delete(Kinds.named(kind), owner.namespace, name)
    now, key = rt.clock(), transition_key(dict(res.status))
    for i, ev in enumerate(desired.events):
        await kube.ensure(builders.build_event(owner, reason=ev.reason, message=ev.message,
                                               warning=ev.warning, now=now, seq=i, key=key))
    if not contains(current_status, desired.status):
        await kube.patch(Kinds.COMPRESSED_MODEL, owner.namespace, owner.name,
                         {"status": desired.status}, sub="status")
    rt._written[(owner.namespace, owner.name)] = desired.status


def _progress(status: dict[str, Any]) -> tuple[Any, Any]:
    """What only the operator writes and every transition changes: phase and conditions."""
    return status.get("phase"), status.get("conditions")


async def reconcile(rt: Runtime, body: kopf.Body | dict[str, Any], logger: Any) -> None:
    """One level-triggered pass: parse, observe, plan, apply. Safe to repeat at any time."""
    meta = body.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return
    async with rt.lock(meta.get("namespace") or "default", meta.get("name", "")):
        await _reconcile(rt, body, logger)


async def _reconcile(rt: Runtime, body: kopf.Body | dict[str, Any], logger: Any) -> None:
    res = to_resource(body)
    key = (res.owner.namespace, res.owner.name)
    stored = dict(res.status)
    written = rt._written.pop(key, None)
    if written is not None and _progress(stored) != _progress(written):
        # The body predates this process's last status write (the watch lags): plan from what
        # was written, so a transition is not planned and announced twice.
        res = replace(res, status={**stored, **written})
    try:
        observed = await observe(rt, res)
        desired = planner.plan(res, observed, rt.clock(), rt.settings)
        await apply(rt, res, desired, stored)
    except ApiError as exc:
        rt.metrics.errors.labels(kind=f"api{exc.status}").inc()
        rt.metrics.reconciles.labels(outcome="error").inc()
        if exc.status in (400, 403, 422):
            raise kopf.PermanentError(str(exc)) from None
        raise kopf.TemporaryError(str(exc), delay=5) from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        # A slow or restarting API server: retry soon, not after kopf's default minute.
        rt.metrics.errors.labels(kind="network").inc()
        rt.metrics.reconciles.labels(outcome="error").inc()
        raise kopf.TemporaryError(f"API request failed: {exc!r}", delay=2) from None
    except OperatorError as exc:
        rt.metrics.errors.labels(kind=type(exc).__name__).inc()
        rt.metrics.reconciles.labels(outcome="error").inc()
        raise kopf.TemporaryError(str(exc), delay=10) from None
    finally:
        rt.metrics.api_requests.set(rt.client.requests)
    rt.metrics.reconciles.labels(outcome="ok").inc()
    rt.metrics.observe_phase(res.owner.namespace, res.owner.name, desired.status.get("phase"))
    for ev in desired.events:
        logger.info(f"{ev.reason}: {ev.message}")


async def cleanup(rt: Runtime, body: kopf.Body | dict[str, Any], logger: Any) -> None:
    """On deletion: stop the compression Job now and remove every child the model owns.

    ownerReferences would let the garbage collector do this too; deleting explicitly stops a
    running compression at once and leaves nothing behind where no collector runs.
    """
    meta = body.get("metadata") or {}
    ns, name = meta.get("namespace") or "default", meta.get("name", "")
    kinds = list(CHILD_KINDS)
    monitor = await rt.monitor_kind()
    if monitor is MonitorKind.SERVICE_MONITOR:
        kinds.append(Kinds.SERVICE_MONITOR)
    elif monitor is MonitorKind.POD_MONITOR:
        kinds.append(Kinds.POD_MONITOR)
    removed = 0
    for kind in kinds:
        for obj in await rt.client.list(kind, ns, {Label.MODEL.value: name}):
            removed += await rt.client.delete(kind, ns, obj["metadata"]["name"])
    rt.metrics.observe_phase(ns, name, None)
    rt.forget(ns, name)
    logger.info(f"deleted {removed} child object(s) of {name}")


# ------------------------------------------------------------------------------ registry


def build_registry(rt: Runtime) -> kopf.OperatorRegistry:
    """All handlers on a private registry (several operators can run in one process)."""
    registry = kopf.OperatorRegistry()
    resource = (GROUP, VERSION, PLURAL)

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return rt.login()

    @kopf.on.startup(registry=registry)
    async def startup(**_: Any) -> None:
        rt.kube = KubeClient.from_connection(rt.login())
        if rt.settings.metrics_port:
            rt.metrics.serve(rt.settings.metrics_port)

    @kopf.on.cleanup(registry=registry)
    async def shutdown(**_: Any) -> None:
        if rt.kube is not None:
            await rt.kube.close()

    @kopf.on.resume(*resource, registry=registry)
    @kopf.on.create(*resource, registry=registry)
    @kopf.on.update(*resource, registry=registry)
    async def changed(body: kopf.Body, logger: Any, **_: Any) -> None:
        await reconcile(rt, body, logger)

    @kopf.timer(*resource, registry=registry, interval=rt.settings.resync_seconds,
                initial_delay=rt.settings.resync_seconds)
    async def resync(body: kopf.Body, logger: Any, **_: Any) -> None:
        await reconcile(rt, body, logger)

    @kopf.on.delete(*resource, registry=registry)
    async def deleted(body: kopf.Body, logger: Any, **_: Any) -> None:
        await cleanup(rt, body, logger)

    @kopf.daemon(*resource, registry=registry, cancellation_timeout=5)
    async def autoscaler(body: kopf.Body, stopped: kopf.DaemonStopped, logger: Any,
                         **_: Any) -> None:
        # The policy and its metric source are synchronous (leanserve.autoscaling); each step
        # runs in a worker thread so a slow Prometheus never stalls the event loop.
        while not stopped:
            spec = body.get("spec") or {}
            interval = float((spec.get("autoscaling") or {}).get("intervalSeconds") or 30)
            phase = (body.get("status") or {}).get("phase")
            if rt.autoscale is not None and phase in (Phase.SERVING.value, Phase.DEGRADED.value):
                try:
                    await asyncio.to_thread(rt.autoscale, _plain(dict(body)), rt, logger)
                except OperatorError as exc:
                    rt.metrics.errors.labels(kind="autoscale").inc()
                    logger.warning(f"autoscaling skipped: {exc}")
            await stopped.wait(interval)

    return registry
