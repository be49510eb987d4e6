"""kopf handlers: observe the cluster, call the pure planner, apply what it says.

Handlers stay thin (STYLE.md 1): parsing and planning live in ``planner``/``builders``, I/O in
``kube``. Every reconcile derives its state from the cluster — the Job found by its name, the
status stored on the object — so a restarted operator plans exactly what the previous one did.

Only watch-event handlers are registered: they need no finalizer and kopf writes nothing to the
CompressedModel, so deleting a model, the operator or the CRD never leaves an object stuck. The
children carry ownerReferences and the garbage collector removes them. A model is reconciled when
it, its Job or one of its Deployments changes (watched, not LISTed), and otherwise once per
``resync_seconds``; the autoscaler steps in the same loop. The API's refusals (422, a quota's or
a webhook's 403) go to status as condition Ready=False, reason APIRefused, with the server's
message, and are tried again after ``retry_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import aiohttp
import kopf

from leanserve.api.load import SpecError, parse
from leanserve.api.spec import GROUP, PLURAL, VERSION, CompressedModelSpec
from leanserve.operator import builders, planner, privilege, stores
from leanserve.operator.bridge import STOP_GRACE_SECONDS, Bridge, Stopped
from leanserve.operator.builders import Owner
from leanserve.operator.constants import (
    MANAGER,
    Annotation,
    Component,
    JobState,
    Label,
    MonitorKind,
)
from leanserve.operator.errors import ApiError, OperatorError
from leanserve.operator.kube import Kinds, KubeClient
from leanserve.operator.metrics import AUTOSCALED, OperatorMetrics
from leanserve.operator.settings import OperatorSettings

MONITOR_TTL_SECONDS = 60.0
LOOP_TICK_SECONDS = 1.0
SERVING_INDEX = "serving_deployments"
"""kopf's index of the serving Deployments: (namespace, model) -> their observations."""
Key = tuple[str, str]


@dataclass
class Runtime:
    """What the handlers share: injected clients, settings, clocks and metrics."""

    settings: OperatorSettings
    metrics: OperatorMetrics
    login: Callable[[], kopf.ConnectionInfo]
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    mono: Callable[[], float] = time.monotonic
    kube: KubeClient | None = None
    autoscale: Callable[..., Any] | None = None  # leanserve.operator.autoscale.step when wired
    # The autoscaling step's way to this loop (its requests), stopped with the operator.
    bridge: Bridge | None = field(default=None, repr=False)
    _monitor: tuple[float, MonitorKind] | None = field(default=None, repr=False)
    # Events of one model arrive from several watches and the loop: one lock per model
    # serializes its reconciles and autoscaling steps. The status this process last wrote
    # stands in for a body the watch has not caught up with yet (a cache only: a restarted
    # operator starts from the cluster's status).
    _locks: dict[Key, asyncio.Lock] = field(default_factory=dict, repr=False)
    _written: dict[Key, dict[str, Any]] = field(default_factory=dict, repr=False)
    # The latest body of every model, from the watch (never LISTed by the operator).
    models: dict[Key, dict[str, Any]] = field(default_factory=dict, repr=False)
    # The serving Deployments of every model, by pool: kopf's index over the Deployment watch
    # (SERVING_INDEX), bound at start-up. kopf starts no handler before its initial listing is
    # indexed, so a model is never planned from a half-filled cache.
    serving_index: Mapping[Key, Iterable[planner.DeploymentObservation]] | None = field(
        default=None, repr=False)
    # The autoscaler's last decision per model (leanserve.autoscaling.policy.Decision), with
    # the history the policy needs; status.autoscaling holds it for a restart, written when the
    # decision changes and at least every autoscale.HISTORY_SECONDS.
    decisions: dict[Key, Any] = field(default_factory=dict, repr=False)
    next_sync: dict[Key, float] = field(default_factory=dict, repr=False)
    next_scale: dict[Key, float] = field(default_factory=dict, repr=False)
    # What this process last applied per child: (digest, when). An unchanged desired child is
    # not sent again until reapply_seconds pass, so the steady state makes no PATCH.
    _applied: dict[tuple[str, str, str], tuple[str, float]] = field(default_factory=dict,
                                                                    repr=False)

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    def forget(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        for table in (self._locks, self._written, self.models, self.next_sync, self.next_scale,
                      self.decisions):
            table.pop(key, None)  # type: ignore[attr-defined]
        for child in [c for c in self._applied if c[1] == namespace and
                      c[2].startswith(name)]:
            self._applied.pop(child, None)

    def deployments(self, namespace: str, name: str
                    ) -> dict[str, planner.DeploymentObservation] | None:
        """A model's serving Deployments by pool, from the watch (None: no index bound)."""
        if self.serving_index is None:
            return None
        return {d.pool: d for d in self.serving_index.get((namespace, name), ())}

    def bridge_for(self, loop: asyncio.AbstractEventLoop) -> Bridge:
        """The bridge to ``loop``: the one the startup handler made, or a new one where none
        was made for this loop (a Runtime driven without kopf). A stopped one stays stopped."""
        if self.bridge is None or self.bridge.loop is not loop:
            self.bridge = Bridge(loop)
        return self.bridge

    @property
    def client(self) -> KubeClient:
        if self.kube is None:
            raise OperatorError("the operator's API client is not started")
        return self.kube

    @property
    def pods_scraped_one_by_one(self) -> bool:
        """Whether the planner makes a ServiceMonitor/PodMonitor (as last discovered): then
        Prometheus scrapes every serving pod, and every ready pod is one series of its model."""
        return self._monitor is not None and self._monitor[1] is not MonitorKind.NONE

    async def monitor_kind(self) -> MonitorKind:
        """Which Prometheus Operator CRD the cluster serves (discovery, cached a minute)."""
        now = self.mono()
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
    retry = str((meta.get("annotations") or {}).get(Annotation.RETRY.value) or "")
    return planner.Resource(owner, int(meta.get("generation") or 0), None if errors else spec,
                            tuple(errors), _plain(dict(body.get("status") or {})), retry)


def _plain(value: Any) -> Any:
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------- observing


def _time(raw: Any) -> datetime | None:
    if not raw:
        return None
    try:
        return datetime.strptime(str(raw), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def job_started(job: dict[str, Any]) -> bool:
    """A pod of the Job runs or ran (ready, succeeded or failed pods, or the Job finished).

    Not ``startTime``: the Job controller sets it when it first syncs the Job, before any pod
    exists (a Job whose pods a quota refuses has one); not ``active``: pending pods count there.
    """
    st = job.get("status") or {}
    return bool(st.get("ready") or st.get("succeeded") or st.get("failed") or
                st.get("completionTime") or any(
                    c.get("status") == "True" for c in st.get("conditions") or []))


def job_observation(job: dict[str, Any], pods: list[dict[str, Any]],
                    waiting: str = "") -> planner.JobObservation:
    """A Job's state from its conditions, and the report from its newest pod."""
    st = job.get("status") or {}
    meta = job.get("metadata") or {}
    conds = {c.get("type"): c for c in st.get("conditions") or [] if c.get("status") == "True"}
    common: dict[str, Any] = {"uid": str(meta.get("uid") or ""),
                              "created": _time(meta.get("creationTimestamp")),
                              "started": job_started(job), "waiting": waiting}
    name = meta["name"]
    if "Failed" in conds:
        state, cond = JobState.FAILED, conds["Failed"]
    elif "Complete" in conds or "SuccessCriteriaMet" in conds:
        state, cond = JobState.SUCCEEDED, conds.get("Complete") or conds["SuccessCriteriaMet"]
    else:
        return planner.JobObservation(name, JobState.RUNNING, **common)
    return planner.JobObservation(name, state, str(cond.get("reason") or ""),
                                  str(cond.get("message") or ""), termination(pods), **common)


def termination(pods: list[dict[str, Any]]) -> str:
    """The termination message of the newest attempt of the leading pod (index 0).

    A retried pod (backoffLimit) leaves older pods behind; the newest one's message is the
    outcome. Among pods of one Indexed Job, index 0 writes the report.
    """
    def key(p: dict[str, Any]) -> tuple[int, str, str]:
        meta = p.get("metadata") or {}
        index = (meta.get("annotations") or {}).get(Annotation.COMPLETION_INDEX.value, "0")
        return (0 if index == "0" else 1, _negate(str(meta.get("creationTimestamp") or "")),
                str(meta.get("name") or ""))
    for pod in sorted(pods, key=key):
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            for state in (cs.get("state") or {}, cs.get("lastState") or {}):
                msg = (state.get("terminated") or {}).get("message")
                if msg:
                    return str(msg)
    return ""


def _negate(stamp: str) -> str:
    """A sort key that orders RFC 3339 stamps newest first."""
    return "".join(chr(0x10FFFF - ord(c)) for c in stamp)


def waiting_reason(pods: list[dict[str, Any]], events: list[dict[str, Any]]) -> str:
    """Why a Job has no running pod, in the cluster's words (scheduler, Job controller)."""
    for pod in pods:
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                return f"pod {pod['metadata']['name']}: {cond.get('reason')}: " \
                       f"{cond.get('message', '')}"
    for ev in sorted(events, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime")
                                               or ""), reverse=True):
        if ev.get("type") == "Warning":
            return f"{ev.get('reason')}: {ev.get('message', '')}"
    return ""


def deployment_observation(pool: str, d: dict[str, Any]) -> planner.DeploymentObservation:
    st = d.get("status") or {}
    available = any(c.get("type") == "Available" and c.get("status") == "True"
                    for c in st.get("conditions") or [])
    tmpl = ((d.get("spec") or {}).get("template") or {}).get("metadata") or {}
    return planner.DeploymentObservation(
        pool=pool, replicas=int((d.get("spec") or {}).get("replicas") or 0),
        ready=int(st.get("readyReplicas") or 0), updated=int(st.get("updatedReplicas") or 0),
        available=available,
        artifact_sha=str((tmpl.get("annotations") or {}).get(Annotation.ARTIFACT_SHA.value, "")),
        generation=int((d.get("metadata") or {}).get("generation") or 0),
        observed_generation=int(st.get("observedGeneration") or 0))


async def observe(rt: Runtime, res: planner.Resource, now: datetime) -> planner.Observed:
    """Read what the plan depends on, and nothing more (each call is one API request)."""
    kube, owner = rt.client, res.owner
    if res.spec is None:
        return planner.Observed()
    secrets = await observe_secrets(rt, res)
    if privilege.refusals(res.spec, rt.settings, secrets):
        return planner.Observed(secrets=secrets)  # refused: nothing else matters
    job_obs = None
    claims: dict[str, tuple[str, ...] | None] = {}
    name = planner.job_to_observe(res)
    if name is not None:
        job = await kube.get(Kinds.JOB, owner.namespace, name)
        if job is not None:
            pods: list[dict[str, Any]] = []
            waiting = ""
            finished = any(c.get("status") == "True" for c in (job.get("status") or {}).get(
                "conditions") or [])
            created = _time((job.get("metadata") or {}).get("creationTimestamp"))
            stuck = not finished and not job_started(job) and created is not None and \
                (now - created).total_seconds() >= rt.settings.job.start_timeout_seconds
            if finished or stuck:
                pods = await kube.list(Kinds.POD, owner.namespace, {Label.JOB_NAME.value: name})
            if stuck:
                events = [] if pods else await kube.list(
                    Kinds.EVENT, owner.namespace, {},
                    {"involvedObject.kind": "Job", "involvedObject.name": name})
                waiting = waiting_reason(pods, events)
            job_obs = job_observation(job, pods, waiting)
        else:
            claims = await observe_claims(rt, res)
    # Serving children matter once there is an artifact to serve (from an earlier recipe, or
    # the Job that just succeeded); a model still compressing its first recipe has none.
    serving = bool((res.status.get("artifact") or {}).get("uri")) or (
        job_obs is not None and job_obs.state is JobState.SUCCEEDED)
    if not serving:
        return planner.Observed(job=job_obs, claims=claims, secrets=secrets)
    by_pool = await serving_deployments(rt, owner.namespace, owner.name)
    return planner.Observed(job=job_obs, deployments=by_pool, monitor=await rt.monitor_kind(),
                            claims=claims, secrets=secrets)


async def serving_deployments(rt: Runtime, namespace: str, name: str
                              ) -> dict[str, planner.DeploymentObservation]:
    """A model's serving Deployments by pool: from the watch's index; LISTed only where no
    index is bound (a Runtime driven without kopf)."""
    cached = rt.deployments(namespace, name)
    if cached is not None:
        return cached
    found = await rt.client.list(Kinds.DEPLOYMENT, namespace, {
        Label.MODEL.value: name, Label.COMPONENT.value: Component.SERVING.value})
    return {o.pool: o for d in found if (o := index_deployment(d)) is not None}


def index_deployment(d: Mapping[str, Any]) -> planner.DeploymentObservation | None:
    """What the planner and the autoscaler read of a serving Deployment (None: not one)."""
    pool = ((d.get("metadata") or {}).get("labels") or {}).get(Label.POOL.value)
    return deployment_observation(str(pool), _plain(dict(d))) if pool else None


async def observe_secrets(rt: Runtime, res: planner.Resource) -> dict[str, privilege.SecretLabels]:
    """The labels of each Secret the spec names (None: no such Secret), metadata only."""
    assert res.spec is not None
    out: dict[str, privilege.SecretLabels] = {}
    for _, name in privilege.secret_refs(res.spec):
        meta = await rt.client.get_metadata(Kinds.SECRET, res.owner.namespace, name)
        out[name] = None if meta is None else dict(meta.get("labels") or {})
    return out


async def observe_claims(rt: Runtime, res: planner.Resource
                         ) -> dict[str, tuple[str, ...] | None]:
    """Access modes of the claims a new Job would mount (one GET each, only before creating)."""
    assert res.spec is not None
    jp = builders.job_plan(res.owner, res.spec, res.retry)
    out: dict[str, tuple[str, ...] | None] = {}
    for claim in stores.claims_of(res.spec.model.uri, res.spec.data.uri, jp.out_uri):
        pvc = await rt.client.get(Kinds.CLAIM, res.owner.namespace, claim)
        out[claim] = None if pvc is None else tuple(
            (pvc.get("status") or {}).get("accessModes") or
            (pvc.get("spec") or {}).get("accessModes") or ())
    return out if planner.claim_problem(planner.Observed(claims=out)) else {}


# ------------------------------------------------------------------------------ applying


def transition_key(status: dict[str, Any]) -> str:
    """A digest of the status a transition starts from: the Events' names derive from it."""
    seen = {"phase": status.get("phase"), "conditions": status.get("conditions"),
            "generation": status.get("observedGeneration")}
    return hashlib.sha256(json.dumps(seen, sort_keys=True, default=str).encode()).hexdigest()


def digest(obj: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the API server applies it to the status (pure)."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def status_changed(stored: dict[str, Any], desired: dict[str, Any]) -> bool:
    """Whether writing ``desired`` as a merge patch would change the stored status.

    Both sides are the operator's own JSON (the status schema keeps what it is given), so the
    comparison is exact; keys the operator does not write (the autoscaler's) are not touched.
    """
    def norm(v: Any) -> Any:
        return json.loads(json.dumps(v, sort_keys=True, default=str))
    return norm(merge_patch(stored, desired)) != norm(stored)


async def apply_child(rt: Runtime, obj: dict[str, Any], force: bool = False) -> dict[str, Any]:
    """One server-side apply PATCH, skipped while this process applied the same object lately."""
    meta = obj["metadata"]
    key = (f"{obj['apiVersion']}/{obj['kind']}", meta["namespace"], meta["name"])
    d, now = digest(obj), rt.mono()
    seen = rt._applied.get(key)
    if not force and seen is not None and seen[0] == d and \
            now - seen[1] < rt.settings.reapply_seconds:
        return {}
    rt._applied.pop(key, None)  # a failed apply must be retried, not trusted
    applied = await rt.client.apply(obj)
    rt._applied[key] = (d, now)
    return applied


async def apply(rt: Runtime, res: planner.Resource, desired: planner.Desired,
                observed: planner.Observed, current_status: dict[str, Any]) -> None:
    """Children first, then the transition's Events, then the status that records it.

    Events go before the status: if the status write fails, the retry plans the same
    transition from the same status, its Events get the same names and the API answers 409 for
    those already posted, so an Event is neither lost nor doubled.
    """
    kube, owner = rt.client, res.owner
    job_uid = observed.job.uid if observed.job is not None else ""
    if desired.job is not None:
        created = await apply_child(rt, desired.job, force=True)
        job_uid = str((created.get("metadata") or {}).get("uid") or "")
        rt.metrics.jobs_created.inc()
    if job_uid:
        job_name = desired.job["metadata"]["name"] if desired.job is not None else \
            observed.job.name  # type: ignore[union-attr]
        ref = builders.job_owner_reference(job_name, job_uid)
        for obj in desired.job_owned:
            await apply_child(rt, builders.owned_by(obj, ref))
    for obj in desired.apply:
        unseen = obj["kind"] == "Deployment" and \
            obj["metadata"]["labels"].get(Label.POOL.value) not in observed.deployments
        await apply_child(rt, obj, force=unseen)
    for kind, name in desired.delete:
        await kube.delete(Kinds.named(kind), owner.namespace, name)
        rt._applied = {k: v for k, v in rt._applied.items()
                       if not (k[0].endswith("/" + kind) and k[2] == name)}
    await post_events(rt, res, desired.events)
    await write_status(rt, res, desired.status, current_status)


async def post_events(rt: Runtime, res: planner.Resource,
                      events: list[planner.EventIntent]) -> None:
    now, key = rt.clock(), transition_key(dict(res.status))
    for i, ev in enumerate(events):
        await rt.client.post_once(builders.build_event(
            res.owner, reason=ev.reason, message=ev.message, warning=ev.warning, now=now, seq=i,
            key=key))


async def write_status(rt: Runtime, res: planner.Resource, status: dict[str, Any],
                       current: dict[str, Any]) -> None:
    owner = res.owner
    if status_changed(current, status):
        await rt.client.patch(Kinds.COMPRESSED_MODEL, owner.namespace, owner.name,
                              {"status": status}, sub="status")
    # The whole status as the server now holds it, not only this patch: a later patch omits
    # what it does not change (the artifact, once recorded), and a body the watch has not
    # caught up with must not lose it (api server restarts make the watch lag two writes).
    rt._written[(owner.namespace, owner.name)] = merge_patch(current, status)


def _progress(status: dict[str, Any]) -> tuple[Any, Any]:
    """What only the operator writes and every transition changes: phase and conditions."""
    return status.get("phase"), status.get("conditions")


async def reconcile(rt: Runtime, body: kopf.Body | dict[str, Any], logger: Any) -> None:
    """One level-triggered pass: parse, observe, plan, apply. Safe to repeat at any time.

    Never raises: a failure is counted, logged, written to status where the API refused, and
    the model is tried again after a delay (kopf does not retry watch-event handlers).
    """
    meta = body.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return
    ns, name = meta.get("namespace") or "default", meta.get("name", "")
    async with rt.lock(ns, name):
        # the latest view, read under the lock: a body taken before it (a child's event, the
        # resync loop) may predate an autoscaling step that held the lock, and planned from it
        # the Deployments would get the replicas that step had just replaced
        body = rt.models.get((ns, name), body)
        delay = await _reconcile(rt, body, logger)
    rt.next_sync[(ns, name)] = rt.mono() + (delay if delay is not None
                                            else rt.settings.resync_seconds)


async def _reconcile(rt: Runtime, body: kopf.Body | dict[str, Any],
                     logger: Any) -> float | None:
    res = to_resource(body)
    key = (res.owner.namespace, res.owner.name)
    written = rt._written.get(key)
    if written is not None:
        if _progress(dict(res.status)) == _progress(written):
            rt._written.pop(key, None)  # the watch has caught up with the last write
        else:
            # The body predates this process's last status write (the watch lags): plan from
            # the status as that write left it, so a transition is neither planned, announced
            # nor written twice. The whole status, not the body's merged with it: a patch's
            # removals (a new recipe's null outcome) are gone from the whole status, and a
            # body merged with it would bring the old values back.
            res = replace(res, status=dict(written))
    stored = dict(res.status)
    desired: planner.Desired | None = None
    try:
        now = rt.clock()
        observed = await observe(rt, res, now)
        desired = planner.plan(res, observed, now, rt.settings)
        await apply(rt, res, desired, observed, stored)
    except ApiError as exc:
        rt.metrics.errors.labels(kind=f"api{exc.status}").inc()
        rt.metrics.reconciles.labels(outcome="error").inc()
        logger.warning(f"reconcile of {key[1]}: {exc}")
        if desired is not None and exc.status in (400, 403, 404, 422):
            await _report_refusal(rt, res, desired, stored, exc, logger)
            return rt.settings.retry_seconds
        return 5.0  # a conflict or a server error: soon
    except (aiohttp.ClientError, TimeoutError) as exc:
        # A slow or restarting API server: retry soon.
        rt.metrics.errors.labels(kind="network").inc()
        rt.metrics.reconciles.labels(outcome="error").inc()
        logger.warning(f"reconcile of {key[1]}: API request failed: {exc!r}")
        return 2.0
    except OperatorError as exc:
        rt.metrics.errors.labels(kind=type(exc).__name__).inc()
        rt.metrics.reconciles.labels(outcome="error").inc()
        logger.warning(f"reconcile of {key[1]}: {exc}")
        return 10.0
    finally:
        count_requests(rt)
    rt.metrics.reconciles.labels(outcome="ok").inc()
    rt.metrics.observe_phase(res.owner.namespace, res.owner.name, desired.status.get("phase"))
    for ev in desired.events:
        logger.info(f"{ev.reason}: {ev.message}")
    return None


def count_requests(rt: Runtime) -> None:
    """Refresh the gauges of the API requests this process made (reconciles and autoscaler)."""
    if rt.kube is not None:
        rt.metrics.api_requests.set(rt.kube.requests)
        for method in ("PATCH", "POST", "PUT", "DELETE"):
            rt.metrics.api_writes.labels(method=method).set(rt.kube.by_method[method])


async def _report_refusal(rt: Runtime, res: planner.Resource, desired: planner.Desired,
                          stored: dict[str, Any], exc: ApiError, logger: Any) -> None:
    """The API refused a write: say so in status (Ready=False, APIRefused) and as an Event."""
    refused = planner.refused(res, desired, str(exc), rt.clock())
    try:
        await post_events(rt, res, refused.events)
        await write_status(rt, res, refused.status, stored)
    except (ApiError, aiohttp.ClientError, TimeoutError) as again:
        logger.warning(f"could not record the refusal in the status of {res.owner.name}: "
                       f"{again}")


# ---------------------------------------------------------------------------------- loop


async def autoscale_once(rt: Runtime, key: Key, body: dict[str, Any], logger: Any) -> None:
    """One autoscaling step when it is due (spec.autoscaling.intervalSeconds per model)."""
    now = rt.mono()
    if rt.autoscale is None or rt.next_scale.get(key, 0.0) > now:
        return
    spec = body.get("spec") or {}
    rt.next_scale[key] = now + float((spec.get("autoscaling") or {}).get("intervalSeconds") or 30)
    if (body.get("status") or {}).get("phase") not in AUTOSCALED:
        return
    # The policy and its metric source are synchronous (leanserve.autoscaling): each step runs
    # in a worker thread, under the model's lock so a reconcile never interleaves with it, and
    # makes its requests on this loop through rt.bridge. It reads the Deployments from the watch
    # (a snapshot taken here, on the loop) and writes the status only when the decision changes;
    # what it wrote is folded into the cached body so the next plan sees the decision before
    # the watch brings it.
    async with rt.lock(*key):
        deployments = await serving_deployments(rt, *key)
        bridge = rt.bridge_for(asyncio.get_running_loop())
        running = asyncio.ensure_future(asyncio.to_thread(rt.autoscale, body, rt, logger, bridge,
                                                          deployments))
        try:
            written = await asyncio.shield(running)
        except asyncio.CancelledError:
            await _stop_step(bridge, running)
            raise
        except Stopped:
            return  # the operator is stopping (the bridge was stopped from elsewhere)
        except (OperatorError, aiohttp.ClientError, TimeoutError) as exc:
            rt.metrics.errors.labels(kind="autoscale").inc()
            logger.warning(f"autoscaling skipped: {exc!s}")
            return
        finally:
            count_requests(rt)
        if written:
            remember_status(rt, key, written)


async def _stop_step(bridge: Bridge, running: asyncio.Future[Any]) -> None:
    """The operator is stopping (this loop's task is cancelled) during a step: its queries end
    now; a decision it is writing gets STOP_GRACE_SECONDS to be written whole; then every
    request is cancelled and the thread, which waits on nothing but them, ends at once. So the
    thread never outlives the operator and asyncio.run's executor shutdown does not wait."""
    try:
        bridge.stop()
        await asyncio.wait({running}, timeout=STOP_GRACE_SECONDS)
    finally:
        bridge.abort()
        await asyncio.wait({running})
        if not running.cancelled():
            running.exception()  # retrieved: Stopped, or what the step raised; stopping anyway


def remember_status(rt: Runtime, key: Key, patch: dict[str, Any]) -> None:
    """Fold a status merge patch this process wrote into its view of the model."""
    current = rt.models.get(key)
    if current is not None:
        rt.models[key] = {**current, "status": merge_patch(current.get("status") or {}, patch)}
    if key in rt._written:
        rt._written[key] = merge_patch(rt._written[key], patch)


async def run_loop(rt: Runtime, logger: Any, tick: float = LOOP_TICK_SECONDS) -> None:
    """Resync each model when due (or when a refusal's retry is due) and autoscale it."""
    while True:
        for key in list(rt.models):
            body = rt.models.get(key)
            if body is None:
                continue
            if rt.next_sync.get(key, 0.0) <= rt.mono():
                await reconcile(rt, body, logger)
            await autoscale_once(rt, key, rt.models.get(key) or body, logger)
        await asyncio.sleep(tick)


# ------------------------------------------------------------------------------ registry


def build_registry(rt: Runtime) -> kopf.OperatorRegistry:
    """All handlers on a private registry (several operators can run in one process)."""
    registry = kopf.OperatorRegistry()
    resource = (GROUP, VERSION, PLURAL)
    tasks: list[asyncio.Task[None]] = []
    own: list[KubeClient] = []

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return rt.login()

    managed = {Label.MANAGED_BY.value: MANAGER}

    @kopf.index("apps", "v1", "deployments", registry=registry, id=SERVING_INDEX,
                labels={**managed, Label.COMPONENT.value: Component.SERVING.value})
    def serving_deployments_index(body: kopf.Body, **_: Any
                                  ) -> dict[Key, planner.DeploymentObservation]:
        meta = body.get("metadata") or {}
        model = (meta.get("labels") or {}).get(Label.MODEL.value)
        found = index_deployment(body)
        if not model or found is None:
            return {}
        return {(meta.get("namespace") or "default", model): found}

    @kopf.on.startup(registry=registry)
    async def startup(logger: Any, **kwargs: Any) -> None:
        rt.serving_index = kwargs[SERVING_INDEX]
        rt.bridge = Bridge(asyncio.get_running_loop())  # a stop from now on reaches the steps
        if rt.kube is None:  # run_operator made one already; a bare registry makes its own
            rt.kube = KubeClient.from_connection(rt.login(), relogin=rt.login)
            own.append(rt.kube)
        if rt.settings.metrics_port:
            rt.metrics.serve(rt.settings.metrics_port)
        tasks.append(asyncio.create_task(run_loop(rt, logger), name="leanserve-loop"))

    @kopf.on.cleanup(registry=registry)
    async def shutdown(**_: Any) -> None:
        for task in tasks:
            task.cancel()  # a step in flight is stopped (_stop_step)
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if rt.bridge is not None:
            await rt.bridge.close()
        for kube in own:
            await kube.close()
            rt.kube = None

    @kopf.on.event(*resource, registry=registry)
    async def model_event(event: kopf.RawEvent, body: kopf.Body, logger: Any,
                          **_: Any) -> None:
        meta = body.get("metadata") or {}
        ns, name = meta.get("namespace") or "default", meta.get("name", "")
        if event.get("type") == "DELETED":
            # The garbage collector removes the children (ownerReferences): nothing to do.
            rt.metrics.observe_phase(ns, name, None)
            rt.forget(ns, name)
            return
        rt.models[(ns, name)] = _plain(dict(body))
        await reconcile(rt, rt.models[(ns, name)], logger)

    async def child_event(body: kopf.Body, logger: Any) -> None:
        meta = body.get("metadata") or {}
        model = (meta.get("labels") or {}).get(Label.MODEL.value)
        found = rt.models.get((meta.get("namespace") or "default", model or ""))
        if found is not None:
            await reconcile(rt, found, logger)

    @kopf.on.event("batch", "v1", "jobs", labels=managed, registry=registry)
    async def job_event(body: kopf.Body, logger: Any, **_: Any) -> None:
        await child_event(body, logger)

    @kopf.on.event("apps", "v1", "deployments", labels=managed, registry=registry)
    async def deployment_event(body: kopf.Body, logger: Any, **_: Any) -> None:
        await child_event(body, logger)

    return registry
