"""One autoscaling step for one CompressedModel in the cluster.

Glue only: Prometheus (leanserve.autoscaling.metrics) and the Deployments (``platform``, from
the operator's watch) are observed, ``leanserve.autoscaling.policy.decide`` decides, the
Kubernetes platform scales the pools that have a Deployment, and the decision goes into
``status.autoscaling``, from where the planner creates the Deployments of pools the decision
adds (a pool switch) and removes those it sets to 0 once the others serve.

Cost per step in the steady state: no Kubernetes request. The last decision (with the history
the policy needs for its stabilization window and trend) stays in the operator's memory and is
written to status when the replicas or what stops the autoscaler change, and at least every
``HISTORY_SECONDS`` otherwise, so a restarted operator resumes with a history at most that old.
What stops the autoscaler (no metrics, a refusal, a profile without a pool, the limits) is
``status.autoscaling.state``; the planner turns it into condition Autoscaling=False and an Event.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from leanserve.autoscaling.errors import AutoscalingError, PolicyError
from leanserve.autoscaling.metrics import PrometheusSource, Queries, Reading, observe
from leanserve.autoscaling.policy import Decision, PoolCapacity, decide, pools_from_profile
from leanserve.autoscaling.policy import Reason as PolicyReason
from leanserve.operator import privilege
from leanserve.operator.bridge import Bridge
from leanserve.operator.constants import Reason
from leanserve.operator.errors import ApiError, OperatorError
from leanserve.operator.planner import DeploymentObservation
from leanserve.operator.platform import KubernetesPlatform

HISTORY_SECONDS = 300.0
"""An unchanged decision is still written this often: the history a restart resumes from."""


def decision_from_status(saved: dict[str, Any] | None) -> Decision | None:
    """The previous Decision as stored in status.autoscaling (None when there is none or it is
    unreadable): policy.Decision.from_status, the policy's own lossless round trip."""
    return Decision.from_status(saved)


def decision_to_status(decision: Decision) -> dict[str, Any]:
    """status.autoscaling for a Decision: policy.Decision.to_status (JSON-safe, bounded)."""
    return decision.to_status()


def pools_from_status(compression: Mapping[str, Any], spec: Any) -> list[PoolCapacity]:
    """The pools the policy plans with, from status.compression: each pool's capacity from the
    Job's profile and the latency curve fitted to its trials (``curve``; the default shape when
    the Job left none). PolicyError when the profile lacks a pool of the spec."""
    return pools_from_profile({"pools": compression.get("pools"),
                               "curve": compression.get("curve")}, spec)


def state_of(decision: Decision, reading: Reading) -> dict[str, str] | None:
    """What keeps this decision from being the policy's own (None: nothing)."""
    if decision.code is PolicyReason.METRICS_UNAVAILABLE:
        return {"reason": Reason.METRICS_UNAVAILABLE.value,
                "message": "; ".join(reading.problems) or decision.reason}
    if decision.code is PolicyReason.LIMITED:
        return {"reason": Reason.LIMITED.value, "message": decision.reason}
    return None


def status_patch(saved: Mapping[str, Any], decision: Decision | None,
                 state: dict[str, str] | None, now: float) -> dict[str, Any] | None:
    """The status.autoscaling merge patch to write, or None when the stored one still holds.

    Written when the replicas change, when the state's reason changes, and when the stored
    decision is older than HISTORY_SECONDS; never for a new load figure alone.
    """
    old_state = saved.get("state") if isinstance(saved.get("state"), Mapping) else None
    state_moved = (old_state or {}).get("reason") != (state or {}).get("reason")
    if decision is None:
        return {"state": state} if state_moved else None
    stored = decision_from_status(dict(saved))
    stale = stored is None or stored.replicas != decision.replicas or \
        now - stored.time >= HISTORY_SECONDS
    if not (stale or state_moved):
        return None
    patch = {**decision_to_status(decision), "state": state}
    # a merge patch keeps every key it leaves out: a pool no longer in the spec must be deleted
    # (null), or the stored replicas never equal a decision again and every interval rewrites
    last = saved.get("last")
    old = last.get("replicas") if isinstance(last, Mapping) else None
    if isinstance(old, Mapping):
        gone = {k: None for k in old if k not in decision.replicas}
        if gone:
            last = patch["last"]
            patch["last"] = {**last, "replicas": {**last["replicas"], **gone}}
    return patch


def step(body: dict[str, Any], rt: Any, logger: Any, bridge: Bridge,
         deployments: Mapping[str, DeploymentObservation] | None = None
         ) -> dict[str, Any] | None:
    """Observe, decide, scale, record. Returns the status patch it wrote (None: none).

    Runs in a worker thread; every request goes through ``bridge`` to the operator's event
    loop, where its clients live, and raises bridge.Stopped once the operator stops (before
    anything is written, or after the whole decision is); ``deployments`` are the model's
    serving Deployments by pool, from the watch.
    """
    from leanserve.operator.handlers import to_resource

    res = to_resource(body)
    spec, status = res.spec, dict(body.get("status") or {})
    saved = dict(status.get("autoscaling") or {})
    compression = status.get("compression") or {}
    pools_profile = compression.get("pools")
    if spec is None or not pools_profile:
        return None  # no serving profile: the planner's condition Autoscaling says so
    problem = privilege.prometheus_problem(spec.autoscaling.prometheus_url, rt.settings)
    if problem:
        # Checked before any request is made; the planner refuses the spec (Ready=False,
        # Forbidden) and stops the autoscaler, this only closes the window before it does.
        raise OperatorError(problem)
    key = (res.owner.namespace, res.owner.name)
    platform = KubernetesPlatform(rt.client, bridge, res.owner.namespace, deployments or {})
    now = time.time()
    try:
        pools = pools_from_status(compression, spec)
    except PolicyError as exc:
        return _write(platform, res.owner.name, status_patch(
            saved, None, {"reason": Reason.PROFILE_INVALID.value, "message": str(exc)}, now))
    previous = rt.decisions.get(key) or decision_from_status(saved)
    try:
        source = PrometheusSource(url=spec.autoscaling.prometheus_url,
                                  queries=Queries(model=res.owner.name,
                                                  namespace=res.owner.namespace),
                                  clock=time.time,
                                  http=bridge.http_get)
        obs, reading = observe(source, platform, res.owner.name,
                               ready_are_scraped=rt.pods_scraped_one_by_one)
        now = time.time()
        decision = decide(obs, pools, spec, previous, now)
    except AutoscalingError as exc:
        raise OperatorError(str(exc)) from None
    rt.metrics.record_decision(res.owner.namespace, res.owner.name, decision, spec, pools, obs,
                               reading)
    state = state_of(decision, reading)
    try:
        platform.scale(res.owner.name, decision.replicas)
    except ApiError as exc:
        if exc.status not in (400, 403, 422):
            raise  # a conflict or a server error: the next interval tries again
        reason = Reason.FORBIDDEN if exc.status == 403 else Reason.API_REFUSED
        state = {"reason": reason.value, "message": f"scaling refused: {exc}"}
    rt.decisions[key] = decision
    if reading.problems:
        logger.info(f"autoscaling: {'; '.join(reading.problems)}")
    return _write(platform, res.owner.name, status_patch(saved, decision, state, now))


def _write(platform: KubernetesPlatform, model: str,
           patch: dict[str, Any] | None) -> dict[str, Any] | None:
    if patch is None:
        return None
    written = {"autoscaling": patch}
    platform.patch_status(model, written)
    return written
