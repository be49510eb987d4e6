"""The Kubernetes adapter of the autoscaler's ``Platform`` port.

Replicas per pool are Deployment ``X-<pool>`` replicas, read from the operator's watch of its
Deployments (a snapshot the step is given: no LIST per step) and set through their scale
subresource under the operator's own field manager (the planner's apply carries the replicas of
the autoscaler's last decision, so the two never fight over ``spec.replicas``, and a model's
reconcile and autoscaling step hold the same lock). A pool the decision names that has no
Deployment yet is not scaled here: the planner creates it from the decision in status. The port
is synchronous (leanserve.autoscaling.platform.Platform) and runs in a worker thread; every
request goes through the operator's one async client on the operator's event loop (through
``bridge.Bridge``, so a stopping operator never waits on it) — one HTTP session, the credentials
kopf logged in with, no second TLS setup or CA file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

from leanserve.operator.bridge import Bridge, Request
from leanserve.operator.builders import deployment_name
from leanserve.operator.constants import FIELD_MANAGER
from leanserve.operator.kube import Kinds, KubeClient
from leanserve.operator.planner import DeploymentObservation

T = TypeVar("T")


class KubernetesPlatform:
    """Platform over one model's serving Deployments, as the watch last saw them.

    One instance serves one autoscaling step; ``scale`` updates its snapshot, so a second read
    in the same step sees what was set. Its first write starts only while the operator is not
    stopping; the writes after it finish the same decision (bridge.Request).
    """

    def __init__(self, kube: KubeClient, bridge: Bridge, namespace: str,
                 deployments: Mapping[str, DeploymentObservation], timeout: float = 30.0) -> None:
        self._kube = kube
        self._bridge = bridge
        self._ns = namespace
        self._timeout = timeout
        self._deployments = dict(deployments)
        self._writing = False

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        kind = Request.FINISH if self._writing else Request.WRITE
        self._writing = True
        return self._bridge.call(coro, self._timeout, kind)

    def current_replicas(self, model: str) -> dict[str, int]:
        return {p: d.replicas for p, d in self._deployments.items()}

    def ready_replicas(self, model: str) -> dict[str, int]:
        return {p: d.ready for p, d in self._deployments.items()}

    def scale(self, model: str, replicas: dict[str, int]) -> None:
        """Set each deployed pool's replicas; unchanged pools cost no request."""
        for pool, n in replicas.items():
            d = self._deployments.get(pool)
            if d is None or d.replicas == int(n):
                continue  # not deployed yet (the planner makes it), or already there
            self._run(self._kube.patch(
                Kinds.DEPLOYMENT, self._ns, deployment_name(model, pool),
                {"spec": {"replicas": int(n)}}, sub="scale",
                params={"fieldManager": FIELD_MANAGER}))
            self._deployments[pool] = dataclasses.replace(d, replicas=int(n))

    def patch_status(self, model: str, status: dict[str, Any]) -> None:
        """Merge-patch the CompressedModel's status (the autoscaler's record of its decisions)."""
        self._run(self._kube.patch(Kinds.COMPRESSED_MODEL, self._ns, model, {"status": status},
                                   sub="status"))
