"""The pure heart of the operator: ``plan(resource, observed, now) -> Desired``.

Everything the operator decides — which children should exist, which phase and conditions the
status shows, which Events to post — is computed here from the spec, the previous status and what
the handler observed in the cluster. No I/O and no clock: tests feed it matrices of situations.
State is always derived from the cluster (the Job by its name, the status the API stores), so an
operator restarted at any point plans the same thing again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from leanserve.api.spec import CompressedModelSpec, ConditionStatus, ConditionType, NodePool, Phase
from leanserve.operator import builders, handback, privilege
from leanserve.operator.builders import Owner
from leanserve.operator.constants import (
    PROBLEM_REASONS,
    SHARED_ACCESS_MODES,
    TERMINAL_OUTCOMES,
    Annotation,
    JobState,
    MonitorKind,
    Port,
    Reason,
)
from leanserve.operator.settings import OperatorSettings


@dataclass(frozen=True)
class JobObservation:
    name: str
    state: JobState
    reason: str = ""  # the Job's Failed condition reason (BackoffLimitExceeded, DeadlineExceeded)
    message: str = ""
    termination: str = ""  # the newest pod's termination message: a summary, or log lines
    uid: str = ""
    created: datetime | None = None
    started: bool = True  # a pod of the Job runs or ran (handlers.job_started)
    waiting: str = ""  # why no pod runs yet (the server's words), when the handler looked


@dataclass(frozen=True)
class DeploymentObservation:
    pool: str
    replicas: int = 0
    ready: int = 0
    updated: int = 0
    available: bool = False
    artifact_sha: str = ""  # the pod template's artifact annotation
    generation: int = 0
    observed_generation: int = 0  # the Deployment controller has seen the current spec

    @property
    def current(self) -> bool:
        """status describes the current spec (else replicas and Available are stale)."""
        return self.observed_generation >= self.generation


@dataclass(frozen=True)
class Observed:
    job: JobObservation | None = None  # the Job for the current recipe hash, if it exists
    deployments: Mapping[str, DeploymentObservation] = field(default_factory=dict)
    monitor: MonitorKind = MonitorKind.NONE
    # Access modes of the claims the spec names (None: no such claim), read before a Job is made.
    claims: Mapping[str, tuple[str, ...] | None] = field(default_factory=dict)
    # Labels of the Secrets the spec names (None: no such Secret), read before anything else.
    secrets: Mapping[str, privilege.SecretLabels] = field(default_factory=dict)


@dataclass(frozen=True)
class Resource:
    """The CompressedModel as the planner needs it: a parsed spec or the reasons it is invalid."""

    owner: Owner
    generation: int
    spec: CompressedModelSpec | None
    errors: tuple[str, ...] = ()
    status: Mapping[str, Any] = field(default_factory=dict)
    retry: str = ""  # the leanserve.io/retry annotation ("" = none)


@dataclass(frozen=True)
class EventIntent:
    reason: str
    message: str
    warning: bool = False


@dataclass(frozen=True)
class PoolChoice:
    pool: NodePool
    per_million: float
    meets_slo: bool | None  # None: no profile to tell
    message: str


@dataclass
class Desired:
    job: dict[str, Any] | None = None  # the compression Job, when it does not exist yet
    job_owned: list[dict[str, Any]] = field(default_factory=list)  # owned by that Job
    apply: list[dict[str, Any]] = field(default_factory=list)  # created or updated to match
    delete: list[tuple[str, str]] = field(default_factory=list)  # (kind, name)
    status: dict[str, Any] = field(default_factory=dict)
    events: list[EventIntent] = field(default_factory=list)


# ----------------------------------------------------------------------------- conditions


# Conditions whose first appearance as False is news (an Event): no earlier state announces it.
ANNOUNCED_WHEN_NEW = frozenset({ConditionType.AUTOSCALING})


class Conditions:
    """kstatus conditions; lastTransitionTime changes only when a status changes."""

    def __init__(self, previous: list[Mapping[str, Any]], now: datetime, generation: int) -> None:
        self._prev = {c.get("type"): dict(c) for c in previous if isinstance(c, Mapping)}
        self._now = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        self._generation = generation
        self._out: dict[str, dict[str, Any]] = {}
        self.changed: list[dict[str, Any]] = []  # status changed (lastTransitionTime moves)
        self.news: list[dict[str, Any]] = []  # an existing condition changed status or reason

    def set(self, ctype: ConditionType, status: ConditionStatus, reason: Reason | str,
            message: str) -> None:
        prev = self._prev.get(ctype.value)
        same = prev is not None and prev.get("status") == status.value
        cond = {"type": ctype.value, "status": status.value, "reason": str(getattr(
            reason, "value", reason)), "message": message[:2048],
                "lastTransitionTime": prev.get("lastTransitionTime", self._now) if same and prev
                else self._now, "observedGeneration": self._generation}
        if not same:
            self.changed.append(cond)
        if prev is not None and (not same or prev.get("reason") != cond["reason"]):
            self.news.append(cond)  # an existing condition moved: status or reason
        elif prev is None and ctype in ANNOUNCED_WHEN_NEW and status is ConditionStatus.FALSE:
            self.news.append(cond)  # e.g. autoscaling that cannot act from the start
        self._out[ctype.value] = cond

    def keep(self, ctype: ConditionType, default: tuple[ConditionStatus, Reason, str]) -> None:
        """Carry a condition over unchanged, or set the default when it never existed."""
        prev = self._prev.get(ctype.value)
        if prev is not None:
            self._out[ctype.value] = {**prev, "observedGeneration": self._generation}
        else:
            self.set(ctype, *default)

    def as_list(self) -> list[dict[str, Any]]:
        order = [c.value for c in ConditionType]
        return sorted(self._out.values(), key=lambda c: order.index(c["type"])
                      if c["type"] in order else len(order))


T, F, U = ConditionStatus.TRUE, ConditionStatus.FALSE, ConditionStatus.UNKNOWN

# kstatus' abnormal-true conditions: they repeat Ready's reason and message, and the phase Event
# already announces every change of theirs.
KSTATUS_CONDITIONS = frozenset({ConditionType.RECONCILING.value, ConditionType.STALLED.value})
# Phases in which the operator (or a controller under it) works towards the spec.
PROGRESSING_PHASES = frozenset({Phase.COMPRESSING, Phase.DEPLOYING, Phase.DEGRADED})
# Ready reasons outside phase Failed that wait for a person: a Job whose pod the cluster does
# not start (quota, admission), a child the API server refuses.
STALLED_REASONS = frozenset({Reason.JOB_NOT_STARTING.value, Reason.API_REFUSED.value})


def set_progress(conds: Conditions, phase: Phase, rolling: str = "") -> None:
    """Reconciling=True while the operator works towards the spec (compressing, rolling out,
    replacing unavailable replicas, a pool joining while others serve: ``rolling``), Stalled=True
    when it has stopped and needs a person (phase Failed, a Job that starts no pod, a refusal);
    neither otherwise: kstatus reads their absence as normal. Call after Ready is set."""
    ready = conds._out[ConditionType.READY.value]
    compressed = conds._out.get(ConditionType.COMPRESSED.value) or {}
    for ctype in KSTATUS_CONDITIONS:
        conds._out.pop(ctype, None)
    # phase Compressing keeps Ready's reason Compressing; Compressed says JobNotStarting
    stuck = next((c["reason"] for c in (ready, compressed) if c.get("reason") in STALLED_REASONS),
                 None)
    if phase is Phase.FAILED or stuck:
        conds.set(ConditionType.STALLED, T, stuck or ready["reason"], ready["message"])
    elif phase in PROGRESSING_PHASES:
        conds.set(ConditionType.RECONCILING, T, ready["reason"], ready["message"])
    elif rolling:
        conds.set(ConditionType.RECONCILING, T, Reason.ROLLING_OUT, rolling)


# ---------------------------------------------------------------------------- pool choice


def outcome_of(res: Resource, jp: builders.JobPlan) -> str | None:
    """The outcome recorded in status for this recipe and retry (a Compressed reason), if any.

    A recorded outcome is final: the Job is not looked at again (the TTL controller may have
    deleted it), and only a new recipe or a new retry annotation (a new Job name) runs again.
    """
    prev = dict(res.status or {})
    recipe = dict(prev.get("recipe") or {})
    if recipe.get("job") == jp.name and recipe.get("outcome") in TERMINAL_OUTCOMES:
        return str(recipe["outcome"])
    compression = dict(prev.get("compression") or {})
    if "outcome" not in recipe and not jp.retry and compression.get("recipeHash") == jp.recipe \
            and compression.get("selected"):
        return Reason.COMPRESSED.value  # recorded before outcomes were (status.compression)
    return None


def claim_problem(observed: Observed) -> tuple[Reason, str] | None:
    """A claim the Job and the serving replicas cannot all mount, as (reason, message)."""
    for claim, modes in sorted(observed.claims.items()):
        if modes is None:
            return Reason.CLAIM_MISSING, f"PersistentVolumeClaim {claim} does not exist in " \
                                         "this namespace"
        if not set(modes) & set(SHARED_ACCESS_MODES):
            return Reason.CLAIM_NOT_SHARED, (
                f"PersistentVolumeClaim {claim} has accessModes {list(modes)}: the compression "
                "Job and every serving replica mount it, on any node (allowed: "
                f"{', '.join(SHARED_ACCESS_MODES)})")
    return None


def job_to_observe(res: Resource) -> str | None:
    """The Job whose state the plan needs, or None when the outcome is already recorded."""
    if res.spec is None or res.errors:
        return None
    jp = builders.job_plan(res.owner, res.spec, res.retry)
    return None if outcome_of(res, jp) else jp.name


def choose_pool(spec: CompressedModelSpec, pools: Mapping[str, Any] | None) -> PoolChoice:
    """The cheapest pool per million requests that meets the SLO, from the serving profile.

    A pool meets the SLO when the profile gives it a positive capacity at the SLO. Without a
    profile the cheapest hourlyPrice wins, and the message says so.
    """
    by_price = sorted(spec.node_pools, key=lambda p: (p.hourly_price, p.name))
    if not pools:
        return PoolChoice(by_price[0], 0.0, None,
                          "no serving profile from the compression Job; chose the lowest "
                          f"hourlyPrice ({by_price[0].name}, ${by_price[0].hourly_price:g}/h)")
    scored = []
    for p in spec.node_pools:
        entry = pools.get(p.name) or {}
        cap = float(entry.get("capacity_rps") or 0.0)
        cost = entry.get("cost_per_million_requests")
        if cap > 0 and cost is not None:
            scored.append((float(cost), p.hourly_price, p.name, p))
    if not scored:
        return PoolChoice(by_price[0], 0.0, False,
                          f"no pool meets p95 <= {spec.slo.latency_p95_ms:g} ms in the profile; "
                          f"chose the lowest hourlyPrice ({by_price[0].name})")
    cost, _, _, pool = min(scored)
    measured = (pools.get(pool.name) or {}).get("measured")
    how = "measured" if measured else "derived"
    return PoolChoice(pool, cost, True,
                      f"{pool.name} meets p95 <= {spec.slo.latency_p95_ms:g} ms at "
                      f"${cost:.4g} per million requests ({how})")


# ---------------------------------------------------------------------------------- plan


def plan(res: Resource, observed: Observed, now: datetime,
         settings: OperatorSettings) -> Desired:
    """What should exist and what the status should say, given what is there now."""
    prev = dict(res.status or {})
    conds = Conditions(list(prev.get("conditions") or []), now, res.generation)
    out = Desired()
    status: dict[str, Any] = {"observedGeneration": res.generation}

    if res.spec is None or res.errors:
        message = "; ".join(res.errors) or "invalid spec"
        conds.set(ConditionType.READY, F, Reason.INVALID_SPEC, message)
        conds.keep(ConditionType.COMPRESSED, (U, Reason.INVALID_SPEC, "spec is invalid"))
        conds.keep(ConditionType.DEPLOYED, (U, Reason.INVALID_SPEC, "spec is invalid"))
        return _finish(out, prev, status, conds, Phase.FAILED, message)

    forbidden = privilege.refusals(res.spec, settings, observed.secrets)
    if forbidden:
        # Nothing is made for a spec that asks for more than the operator's settings allow.
        message = "; ".join(forbidden)
        conds.set(ConditionType.READY, F, Reason.FORBIDDEN, message)
        conds.keep(ConditionType.COMPRESSED, (U, Reason.FORBIDDEN, "spec is refused"))
        conds.keep(ConditionType.DEPLOYED, (U, Reason.FORBIDDEN, "spec is refused"))
        url = privilege.prometheus_problem(res.spec.autoscaling.prometheus_url, settings)
        if url:  # the autoscaler sends no request there: it cannot act
            conds.set(ConditionType.AUTOSCALING, F, Reason.FORBIDDEN, url)
        else:
            conds.keep(ConditionType.AUTOSCALING, (U, Reason.FORBIDDEN, "spec is refused"))
        return _finish(out, prev, status, conds, Phase.FAILED, message)

    spec, owner = res.spec, res.owner
    jp = builders.job_plan(owner, spec, res.retry)
    # Every key, None included: the status is written as a JSON merge patch, and None removes
    # what an earlier recipe recorded.
    recipe: dict[str, Any] = {"hash": jp.recipe, "job": jp.name, "retry": jp.retry or None,
                              "outcome": None, "message": None}
    status["recipe"] = recipe
    compression = dict(prev.get("compression") or {})
    artifact = dict(prev.get("artifact") or {})
    outcome = outcome_of(res, jp)
    done = outcome == Reason.COMPRESSED.value
    phase: Phase | None = None
    message = ""
    retry_hint = f"; a spec change, or a new value of annotation {Annotation.RETRY.value}, " \
                 "runs the recipe again"

    if outcome is not None and not done:
        # Settled: the remembered outcome stands, whatever happened to the Job since.
        message = str((prev.get("recipe") or {}).get("message") or outcome)
        recipe.update(outcome=outcome, message=message)
        conds.set(ConditionType.COMPRESSED, F, outcome, message)
        phase = Phase.FAILED
    elif outcome is None and observed.job is None and (refusal := claim_problem(observed)):
        # Checked before anything is made; not an outcome: fixing the claim lets it proceed.
        reason, message = refusal
        conds.set(ConditionType.COMPRESSED, F, reason, message)
        phase = Phase.FAILED
    elif outcome is None:
        job = observed.job
        if job is None or job.state is JobState.RUNNING:
            if job is None:
                out.job = builders.build_job(owner, spec, jp, settings)
            out.job_owned.append(builders.build_spec_configmap(owner, spec, jp))
            if jp.workers > 1:
                out.job_owned.append(builders.build_rendezvous_service(owner, jp))
            message = f"Job {jp.name} is compressing {len(spec.compression.candidates)} " \
                      "candidate(s)" + (f" with {jp.workers} workers" if jp.workers > 1 else "")
            reason = Reason.COMPRESSING
            waited = (now - job.created).total_seconds() if job is not None and \
                job.created is not None else 0.0
            if job is not None and not job.started and \
                    waited >= settings.job.start_timeout_seconds:
                reason = Reason.JOB_NOT_STARTING
                message = f"Job {jp.name} has started no pod in {waited:.0f} s: " + \
                          (job.waiting or "no reason given by the cluster")
            conds.set(ConditionType.COMPRESSED, F, reason, message)
            phase = Phase.COMPRESSING
        elif job.state is JobState.FAILED:
            logs = job.termination.strip() or "(no log lines in the pod's termination message)"
            message = f"Job {job.name} failed: {job.reason or 'Failed'}" + \
                      (f" ({job.message})" if job.message else "") + \
                      f"; last log lines: {logs}{retry_hint}"
            recipe.update(outcome=Reason.JOB_FAILED.value, message=message)
            conds.set(ConditionType.COMPRESSED, F, Reason.JOB_FAILED, message)
            phase = Phase.FAILED
        else:
            summary = handback.decode(job.termination)
            if summary is None:
                message = f"Job {job.name} succeeded but its pod left no report summary in its " \
                          f"termination message{retry_hint}"
                recipe.update(outcome=Reason.REPORT_MISSING.value, message=message)
                conds.set(ConditionType.COMPRESSED, F, Reason.REPORT_MISSING, message)
                phase = Phase.FAILED
            else:
                compression = {**summary, "recipeHash": jp.recipe, "job": jp.name}
                status["compression"] = compression
                if not summary.get("selected"):
                    message = f"no candidate passed the quality gate ({spec.quality.metric.value}" \
                              f" drop <= {spec.quality.max_drop:g}); the report is in " \
                              f"status.compression{retry_hint}"
                    recipe.update(outcome=Reason.NO_CANDIDATE_PASSED.value, message=message)
                    conds.set(ConditionType.COMPRESSED, F, Reason.NO_CANDIDATE_PASSED, message)
                    phase = Phase.FAILED
                else:
                    artifact = dict(summary.get("artifact") or {})
                    status["artifact"] = {"uri": artifact.get("uri", ""),
                                          "sha256": artifact.get("sha256", "")}
                    done = True

    if done:
        message = f"selected {compression.get('selected')} from Job {compression.get('job')}"
        recipe.update(outcome=Reason.COMPRESSED.value, message=message)
        conds.set(ConditionType.COMPRESSED, T, Reason.COMPRESSED, message)

    rolling = ""
    if artifact.get("uri"):
        serving_phase, serving_message, rolling = _plan_serving(
            res, observed, compression, artifact, conds, out, status, settings)
        if phase is None:
            phase, message = serving_phase, serving_message
    else:
        conds.set(ConditionType.DEPLOYED, F, Reason.AWAITING_COMPRESSION,
                  "nothing to serve until a candidate passes the quality gate")
        conds.keep(ConditionType.SLO_MET, (U, Reason.NO_PROFILE, "not serving yet"))
        conds.keep(ConditionType.BUDGET_MET, (U, Reason.NO_BUDGET, "not serving yet"))
        conds.keep(ConditionType.AUTOSCALING, (U, Reason.AUTOSCALING_PENDING, "not serving yet"))

    assert phase is not None
    if phase is Phase.SERVING:
        conds.set(ConditionType.READY, T, Reason.SERVING, message)
    else:
        reason = {Phase.COMPRESSING: Reason.COMPRESSING, Phase.DEPLOYING: Reason.ROLLING_OUT,
                  Phase.DEGRADED: Reason.REPLICAS_UNAVAILABLE}.get(phase)
        if reason is None:  # Failed: the Compressed condition says why
            failed = next(c for c in conds.as_list() if c["type"] == ConditionType.COMPRESSED.value)
            reason = Reason(failed["reason"])
        conds.set(ConditionType.READY, F, reason, message)
    return _finish(out, prev, status, conds, phase, message, rolling)


def decided_replicas(spec: CompressedModelSpec, status: Mapping[str, Any]) -> dict[str, int]:
    """Replicas per pool of the autoscaler's last decision (status.autoscaling.last), limited to
    the spec's pools; empty when there is no readable decision."""
    last = (status.get("autoscaling") or {}).get("last") if isinstance(
        status.get("autoscaling"), Mapping) else None
    raw = last.get("replicas") if isinstance(last, Mapping) else None
    if not isinstance(raw, Mapping):
        return {}
    names = {p.name for p in spec.node_pools}
    out: dict[str, int] = {}
    for pool, n in raw.items():
        if pool in names and isinstance(n, int | float) and not isinstance(n, bool):
            out[str(pool)] = max(0, int(n))
    return out


def serving_pools(spec: CompressedModelSpec, status: Mapping[str, Any], choice: PoolChoice,
                  observed: Observed) -> dict[str, int]:
    """The pools that get a Deployment, with the replicas a new one starts with.

    The autoscaler's last decision rules: every pool it gives replicas gets a Deployment (during
    a pool switch the old and the new pool both). Without a decision naming any replicas the
    pool choice from the profile stands. The replicas are the decision's (the autoscaler set
    them through the scale subresource already where the Deployment exists); without one, a
    Deployment keeps the replicas it has and a new one starts at minReplicas (at least 1).
    """
    decided = {p: n for p, n in decided_replicas(spec, status).items() if n > 0}
    floor = max(1, spec.autoscaling.min_replicas)
    order = [p.name for p in spec.node_pools]
    if decided:
        wanted = decided
    else:
        obs = observed.deployments.get(choice.pool.name)
        wanted = {choice.pool.name: obs.replicas if obs is not None else floor}
    return dict(sorted(wanted.items(), key=lambda kv: order.index(kv[0])))


def _deployed(obs: DeploymentObservation | None, sha: str) -> bool:
    """Available, at the current spec and artifact, every replica updated."""
    return obs is not None and obs.available and obs.current and obs.artifact_sha == sha and \
        obs.updated >= obs.replicas


def _still_serving(obs: DeploymentObservation | None, sha: str, steady: bool) -> bool:
    """A pool that served this artifact and still has Ready replicas keeps serving while its
    Deployment changes under it (the autoscaler's scale bumps its generation; a scale-up is
    not Available until the new pods are Ready): a change of replicas is no rollout."""
    return steady and obs is not None and obs.artifact_sha == sha and obs.ready > 0


def autoscaling_condition(spec: CompressedModelSpec, status: Mapping[str, Any],
                          compression: Mapping[str, Any]) -> tuple[ConditionStatus, str, str]:
    """Whether the autoscaler acts, from the profile and what it recorded in status.autoscaling.

    False with a reason where it cannot (no profile, no metrics, refused, held by the limits);
    its ``state`` is what the autoscaler last met, written only when it changes.
    """
    if not compression.get("pools"):
        return F, Reason.NO_PROFILE.value, (
            "no serving profile in status.compression.pools (the compression Job profiles the "
            "selected model unless the operator runs with LEANSERVE_OPERATOR_JOB_PROFILE=false)"
            ": replicas stay as deployed, the autoscaler does not act")
    record = status.get("autoscaling") if isinstance(status.get("autoscaling"), Mapping) else {}
    state = record.get("state") if isinstance(record, Mapping) else None
    if isinstance(state, Mapping) and state.get("reason"):
        return F, str(state["reason"]), str(state.get("message") or state["reason"])
    if not isinstance((record or {}).get("last"), Mapping):
        return U, Reason.AUTOSCALING_PENDING.value, "no autoscaling step yet"
    return T, Reason.AUTOSCALING_ACTIVE.value, (
        f"scaling {', '.join(p.name for p in spec.node_pools)} every "
        f"{spec.autoscaling.interval_seconds:g} s from {spec.autoscaling.prometheus_url}")


def _plan_serving(res: Resource, observed: Observed, compression: Mapping[str, Any],
                  artifact: Mapping[str, Any], conds: Conditions, out: Desired,
                  status: dict[str, Any], settings: OperatorSettings) -> tuple[Phase, str, str]:
    """The serving children, conditions and status; returns the phase, its message and, when a
    pool rolls out while others serve, a message that says so ("" otherwise)."""
    spec, owner = res.spec, res.owner
    assert spec is not None
    choice = choose_pool(spec, compression.get("pools"))
    wanted = serving_pools(spec, res.status, choice, observed)
    by_name = {p.name: p for p in spec.node_pools}
    sha = str(artifact.get("sha256", ""))
    for name, replicas in wanted.items():
        out.apply.append(builders.build_deployment(
            owner, spec, by_name[name], artifact_uri=str(artifact["uri"]), artifact_sha=sha,
            replicas=replicas, monitor=observed.monitor, settings=settings,
            # status.compression keeps the Job's artifact record, with its KIND_GPU sibling flag
            gpu_repository=bool((compression.get("artifact") or {}).get("gpu"))))
    out.apply.append(builders.build_service(owner))
    out.apply.append(builders.build_pdb(owner, settings))
    monitor = builders.build_monitor(owner, observed.monitor)
    if monitor is not None:
        out.apply.append(monitor)

    ready = {p: observed.deployments[p].ready if p in observed.deployments else 0
             for p in wanted}
    # Served this artifact before (status.servedArtifact): replicas changing is no rollout.
    prev = res.status
    steady = prev.get("phase") in (Phase.SERVING.value, Phase.DEGRADED.value) and \
        prev.get("servedArtifact") == sha
    lost = sum(ready.values()) < int((prev.get("serving") or {}).get("readyReplicas") or 0)
    serving = [p for p in wanted if _deployed(observed.deployments.get(p), sha) or
               _still_serving(observed.deployments.get(p), sha, steady)]
    # Degraded: Ready replicas but not Available, from a rollout, or from replicas lost
    # (not a scale-up still starting its pods).
    degraded = [p for p in wanted if (o := observed.deployments.get(p)) is not None and
                o.current and o.ready > 0 and not o.available and (not steady or lost)]
    where = ", ".join(f"{p} ({ready[p]}/{n} ready)" for p, n in wanted.items())
    rolling: list[str] = []
    if serving and not (steady and degraded):
        # A pool that joins (an autoscaler's pool switch) rolls out while the others serve.
        rolling = [p for p in wanted if p not in serving]
        phase, message = Phase.SERVING, f"serving {compression.get('selected')} on " + \
            ", ".join(f"{p} ({ready[p]}/{wanted[p]} ready)" for p in serving) + \
            (f"; rolling out {', '.join(rolling)}" if rolling else "")
        conds.set(ConditionType.DEPLOYED, T, Reason.DEPLOYED, message)
    elif degraded:
        phase, message = Phase.DEGRADED, f"{where}; not Available: {', '.join(degraded)}"
        conds.set(ConditionType.DEPLOYED, F, Reason.REPLICAS_UNAVAILABLE, message)
    else:
        phase, message = Phase.DEPLOYING, f"rolling out {compression.get('selected')} to " + \
            ", ".join(f"{builders.deployment_name(owner.name, p)} ({ready[p]}/{n} ready)"
                      for p, n in wanted.items())
        conds.set(ConditionType.DEPLOYED, F, Reason.ROLLING_OUT, message)

    # A pool the plan no longer wants (at 0 in the autoscaler's decision, or another choice)
    # loses its Deployment only once every wanted pool serves: no switch drops capacity.
    if len(serving) == len(wanted):
        for other in observed.deployments:
            if other not in wanted:
                out.delete.append(("Deployment", builders.deployment_name(owner.name, other)))

    if choice.meets_slo is None:
        conds.set(ConditionType.SLO_MET, U, Reason.NO_PROFILE, choice.message)
    elif choice.meets_slo:
        conds.set(ConditionType.SLO_MET, T, Reason.PROFILE_MEETS_SLO, choice.message)
    else:
        conds.set(ConditionType.SLO_MET, F, Reason.NO_POOL_MEETS_SLO, choice.message)

    hourly = round(sum(n * by_name[p].hourly_price for p, n in wanted.items()), 6)
    budget = spec.autoscaling.max_hourly_cost
    if budget is None:
        conds.set(ConditionType.BUDGET_MET, T, Reason.NO_BUDGET, "no maxHourlyCost set")
    elif hourly <= budget:
        conds.set(ConditionType.BUDGET_MET, T, Reason.WITHIN_BUDGET,
                  f"${hourly:g}/h <= maxHourlyCost ${budget:g}/h")
    else:
        conds.set(ConditionType.BUDGET_MET, F, Reason.OVER_BUDGET,
                  f"${hourly:g}/h > maxHourlyCost ${budget:g}/h")
    conds.set(ConditionType.AUTOSCALING, *autoscaling_condition(spec, res.status, compression))
    replicas = sum(wanted.values())
    if phase is Phase.SERVING:
        status["servedArtifact"] = sha
    status["serving"] = {"pool": ",".join(wanted), "replicas": replicas,
                         "readyReplicas": sum(ready.values()),
                         "endpoint": f"{owner.name}.{owner.namespace}.svc:{Port.HTTP.value}"}
    status["cost"] = {"hourly": hourly,
                      "perMillionRequests": round(_per_million(wanted, by_name, compression,
                                                               choice), 6)}
    joining = f"rolling out {compression.get('selected')} to " + ", ".join(
        f"{builders.deployment_name(owner.name, p)} ({ready[p]}/{wanted[p]} ready)"
        for p in rolling) + " while " + ", ".join(serving) + " serve" if rolling else ""
    return phase, message, joining


def _per_million(wanted: Mapping[str, int], pools: Mapping[str, NodePool],
                 compression: Mapping[str, Any], choice: PoolChoice) -> float:
    """USD per million requests of the wanted replicas at their profiled capacity."""
    profile = compression.get("pools") or {}
    if set(wanted) == {choice.pool.name}:
        return choice.per_million
    cap = sum(n * float((profile.get(p) or {}).get("capacity_rps") or 0.0)
              for p, n in wanted.items())
    if cap <= 0:
        return 0.0
    return sum(n * pools[p].hourly_price for p, n in wanted.items()) / (cap * 3600.0) * 1e6


def _finish(out: Desired, prev: Mapping[str, Any], status: dict[str, Any], conds: Conditions,
            phase: Phase, message: str, rolling: str = "") -> Desired:
    """Seal the status (with kstatus' Reconciling/Stalled: set_progress) and announce what
    changed.

    Every phase transition is one Event whose reason is the new Ready reason (Compressing,
    JobFailed, InvalidSpec, RollingOut, Serving, ...), type Warning for Failed and Degraded. An
    existing condition that changes status or reason is an Event too, unless the phase Event
    already says it (Compressed -> JobFailed repeats Compressing -> Failed); conditions that
    merely appear, Ready itself and Unknown states are no news.
    """
    set_progress(conds, phase, rolling)
    status["phase"] = phase.value
    status["conditions"] = conds.as_list()
    old_phase = prev.get("phase") or Phase.PENDING.value
    ready = next(c for c in status["conditions"] if c["type"] == ConditionType.READY.value)
    announced = ""
    if old_phase != phase.value:
        announced = ready["reason"]
        out.events.append(EventIntent(announced, f"{old_phase} -> {phase.value}: {message}",
                                      warning=phase in (Phase.FAILED, Phase.DEGRADED)))
    for c in conds.news:
        if c["type"] == ConditionType.READY.value or c["type"] in KSTATUS_CONDITIONS or \
                c["status"] == U.value or c["reason"] == announced:
            continue
        out.events.append(EventIntent(c["reason"], f"{c['type']}={c['status']}: {c['message']}",
                                      warning=c["status"] == F.value and
                                      c["reason"] in PROBLEM_REASONS))
    out.status = status
    return out


def refused(res: Resource, desired: Desired, message: str, now: datetime) -> Desired:
    """The status and Event for a plan the API refused to carry out (quota, webhook, 422).

    The planned status stands, except Ready: False with reason APIRefused and the server's
    message, so `kubectl get`/`describe` says why nothing happens, and Stalled=True with the
    same (kstatus: Failed). One Warning Event when the refusal is new.
    """
    prev = {c.get("type"): c for c in (res.status or {}).get("conditions") or []
            if isinstance(c, Mapping)}
    conds = Conditions(list(prev.values()), now, res.generation)
    for c in desired.status.get("conditions") or []:
        if c["type"] != ConditionType.READY.value:
            conds._out[c["type"]] = dict(c)
    conds.set(ConditionType.READY, F, Reason.API_REFUSED, message)
    set_progress(conds, Phase(desired.status.get("phase") or Phase.PENDING.value))
    out = Desired(status={**desired.status, "conditions": conds.as_list()})
    if (prev.get(ConditionType.READY.value) or {}).get("reason") != Reason.API_REFUSED.value or \
            (prev.get(ConditionType.READY.value) or {}).get("message") != message[:2048]:
        out.events.append(EventIntent(Reason.API_REFUSED.value, message, warning=True))
    return out
