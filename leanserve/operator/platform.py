"""The Kubernetes adapter of the autoscaler's ``Platform`` port.

Replicas per pool are Deployment ``X-<pool>`` replicas, read from the Deployments and set through
their scale subresource under the operator's own field manager (the operator's apply carries the
replicas it observed, so the two never fight over ``spec.replicas``, and a model's reconcile and
autoscaling step hold the same lock). The port is synchronous
(leanserve.autoscaling.platform.Platform) and runs in a worker thread; every request goes
through the operator's one async client on the operator's event loop — one HTTP session, the
credentials kopf logged in with, no second TLS setup or CA file.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

from leanserve.operator.builders import deployment_name
from leanserve.operator.constants import FIELD_MANAGER, Component, Label
from leanserve.operator.kube import Kinds, KubeClient

T = TypeVar("T")


class KubernetesPlatform:
    """Platform over Deployments labelled leanserve.io/model=<model> in one namespace.

    One instance serves one autoscaling step: the Deployments are listed once per step (the
    replicas read and the scale decision see the same list).
    """

    def __init__(self, kube: KubeClient, loop: asyncio.AbstractEventLoop, namespace: str,
                 timeout: float = 30.0) -> None:
        self._kube = kube
        self._loop = loop
        self._ns = namespace
        self._timeout = timeout
        self._listed: dict[str, dict[str, Mapping[str, Any]]] = {}

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self._timeout)

    def _deployments(self, model: str) -> dict[str, Mapping[str, Any]]:
        if model not in self._listed:
            found = self._run(self._kube.list(Kinds.DEPLOYMENT, self._ns, {
                Label.MODEL.value: model, Label.COMPONENT.value: Component.SERVING.value}))
            self._listed[model] = {
                d["metadata"]["labels"][Label.POOL.value]: d for d in found
                if Label.POOL.value in ((d.get("metadata") or {}).get("labels") or {})}
        return self._listed[model]

    def current_replicas(self, model: str) -> dict[str, int]:
        return {p: int((d.get("spec") or {}).get("replicas") or 0)
                for p, d in self._deployments(model).items()}

    def ready_replicas(self, model: str) -> dict[str, int]:
        return {p: int((d.get("status") or {}).get("readyReplicas") or 0)
                for p, d in self._deployments(model).items()}

    def scale(self, model: str, replicas: dict[str, int]) -> None:
        """Set each deployed pool's replicas; unchanged pools cost no request."""
        current = self.current_replicas(model)
        for pool, n in replicas.items():
            if pool not in current or current[pool] == int(n):
                continue  # not deployed by the operator (yet), or already there
            self._run(self._kube.patch(
                Kinds.DEPLOYMENT, self._ns, deployment_name(model, pool),
                {"spec": {"replicas": int(n)}}, sub="scale",
                params={"fieldManager": FIELD_MANAGER}))
        self._listed.pop(model, None)

    def patch_status(self, model: str, status: dict[str, Any]) -> None:
        """Merge-patch the CompressedModel's status (the autoscaler's record of its decisions)."""
        self._run(self._kube.patch(Kinds.COMPRESSED_MODEL, self._ns, model, {"status": status},
                                   sub="status"))
