"""One autoscaling step for one CompressedModel in the cluster.

Glue only: Prometheus (leanserve.autoscaling.metrics) and the Deployments (``platform``) are
observed, ``leanserve.autoscaling.policy.decide`` decides, the Kubernetes platform scales, and the
decision (with the history the policy needs for its stabilization window) goes into
``status.autoscaling``: the policy's memory lives in the cluster, never only in this process.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from leanserve.autoscaling.errors import AutoscalingError
from leanserve.autoscaling.metrics import PrometheusSource, Queries, observe
from leanserve.autoscaling.policy import Decision, decide, pools_from_profile
from leanserve.operator import privilege
from leanserve.operator.errors import OperatorError
from leanserve.operator.platform import KubernetesPlatform


def decision_from_status(saved: dict[str, Any] | None) -> Decision | None:
    """The previous Decision as stored in status.autoscaling (None when there is none or it is
    unreadable): policy.Decision.from_status, the policy's own lossless round trip."""
    return Decision.from_status(saved)


def decision_to_status(decision: Decision) -> dict[str, Any]:
    """status.autoscaling for a Decision: policy.Decision.to_status (JSON-safe, bounded)."""
    return decision.to_status()


def step(body: dict[str, Any], rt: Any, logger: Any,
         loop: asyncio.AbstractEventLoop) -> Decision | None:
    """Observe, decide, scale, record. Returns the decision (None when there is nothing to do).

    Runs in a worker thread; ``loop`` is the operator's event loop, where its client lives.
    """
    from leanserve.operator.handlers import to_resource

    res = to_resource(body)
    spec, status = res.spec, dict(body.get("status") or {})
    profile = {"pools": (status.get("compression") or {}).get("pools")}
    if spec is None or not profile["pools"]:
        return None  # no serving profile: replicas stay at minReplicas until one exists
    problem = privilege.prometheus_problem(spec.autoscaling.prometheus_url, rt.settings)
    if problem:
        raise OperatorError(problem)  # checked before any request is made
    try:
        pools = [p for p in pools_from_profile(profile, spec)]
        platform = KubernetesPlatform(rt.client, loop, res.owner.namespace)
        source = PrometheusSource(url=spec.autoscaling.prometheus_url,
                                  queries=Queries(model=res.owner.name), clock=time.time)
        obs, reading = observe(source, platform, res.owner.name)
        now = time.time()
        decision = decide(obs, pools, spec, decision_from_status(status.get("autoscaling")), now)
        platform.scale(res.owner.name, decision.replicas)
        platform.patch_status(res.owner.name, {"autoscaling": decision_to_status(decision)})
    except AutoscalingError as exc:
        raise OperatorError(str(exc)) from None
    rt.metrics.record_decision(res.owner.namespace, res.owner.name, decision, spec, pools, obs,
                               reading)
    if reading.problems:
        logger.info(f"autoscaling: {'; '.join(reading.problems)}")
    return decision
