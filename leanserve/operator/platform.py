"""The Kubernetes adapter of the autoscaler's ``Platform`` port.

Replicas per pool are Deployment ``X-<pool>`` replicas, read from the Deployments and set through
their scale subresource (so the operator's own server-side apply never fights the autoscaler over
``spec.replicas``). The port is synchronous (leanserve.autoscaling.platform.Platform): the
operator calls it from a synchronous kopf timer, which kopf runs in a worker thread, so these
blocking calls never stall the operator's event loop.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

import kopf
import requests

from leanserve.operator.builders import deployment_name
from leanserve.operator.constants import Component, Label
from leanserve.operator.errors import ApiError


class KubernetesPlatform:
    """Platform over Deployments labelled leanserve.io/model=<model> in one namespace."""

    def __init__(self, session: requests.Session, server: str, namespace: str,
                 timeout: float = 10.0) -> None:
        self._s = session
        self._server = server.rstrip("/")
        self._ns = namespace
        self._timeout = timeout

    @classmethod
    def from_connection(cls, info: kopf.ConnectionInfo, namespace: str) -> KubernetesPlatform:
        s = requests.Session()
        s.headers.update(info.as_http_headers())
        if info.insecure:
            s.verify = False
        elif info.ca_path:
            s.verify = str(info.ca_path)
        elif info.ca_data:
            data = info.ca_data if isinstance(info.ca_data, str) else info.ca_data.decode()
            fd, path = tempfile.mkstemp(suffix=".crt")
            with os.fdopen(fd, "w") as f:
                f.write(data)
            s.verify = path
        return cls(s, info.server, namespace)

    def _deployments(self, model: str) -> dict[str, Mapping[str, Any]]:
        selector = f"{Label.MODEL.value}={model},{Label.COMPONENT.value}={Component.SERVING.value}"
        r = self._s.get(f"{self._server}/apis/apps/v1/namespaces/{self._ns}/deployments",
                        params={"labelSelector": selector}, timeout=self._timeout)
        if r.status_code >= 400:
            raise ApiError(r.status_code, f"listing Deployments of {model}: {r.text[:200]}")
        out: dict[str, Mapping[str, Any]] = {}
        for d in r.json().get("items") or []:
            lab = (d.get("metadata") or {}).get("labels") or {}
            if lab.get(Label.MODEL.value) == model and Label.POOL.value in lab:
                out[lab[Label.POOL.value]] = d
        return out

    def current_replicas(self, model: str) -> dict[str, int]:
        return {p: int((d.get("spec") or {}).get("replicas") or 0)
                for p, d in self._deployments(model).items()}

    def ready_replicas(self, model: str) -> dict[str, int]:
        return {p: int((d.get("status") or {}).get("readyReplicas") or 0)
                for p, d in self._deployments(model).items()}

    def scale(self, model: str, replicas: dict[str, int]) -> None:
        existing = self._deployments(model)
        for pool, n in replicas.items():
            if pool not in existing:
                continue  # the operator has not deployed this pool; nothing to scale
            url = (f"{self._server}/apis/apps/v1/namespaces/{self._ns}/deployments/"
                   f"{deployment_name(model, pool)}/scale")
            r = self._s.patch(url, json={"spec": {"replicas": int(n)}}, timeout=self._timeout,
                              headers={"Content-Type": "application/merge-patch+json"})
            if r.status_code >= 400:
                raise ApiError(r.status_code, f"scaling {model}/{pool} to {n}: {r.text[:200]}")

    def patch_status(self, model: str, status: dict[str, Any]) -> None:
        """Merge-patch the CompressedModel's status (the autoscaler's record of its decisions)."""
        url = (f"{self._server}/apis/leanserve.io/v1alpha1/namespaces/{self._ns}/"
               f"compressedmodels/{model}/status")
        r = self._s.patch(url, json={"status": status}, timeout=self._timeout,
                          headers={"Content-Type": "application/merge-patch+json"})
        if r.status_code >= 400:
            raise ApiError(r.status_code, f"patching the status of {model}: {r.text[:200]}")
