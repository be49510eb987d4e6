"""A small async Kubernetes API client for the operator's children.

kopf patches the CompressedModel itself; Jobs, Deployments and the rest go through this client,
which is built from the same credentials kopf logs in with (``kopf.ConnectionInfo``), so there is
one async stack and no second Kubernetes library at run time. Everything it does is plain REST:
GET, LIST, POST (Events, the Lease), PUT (the Lease), DELETE, JSON merge patch (status) and
server-side apply: every child is created and updated by one apply PATCH with one field manager,
so the API server owns the diff (a field the operator stops setting is removed) and the operator
never GETs a child to compare it.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf

from leanserve.operator.constants import FIELD_MANAGER
from leanserve.operator.errors import ApiError, ConflictError

# Content negotiation for an object's metadata only (PartialObjectMetadata); a server that
# ignores it sends the whole object, of which only the metadata is kept.
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"


@dataclass(frozen=True)
class Kind:
    api_version: str
    plural: str
    namespaced: bool = True

    @property
    def base(self) -> str:
        return f"/api/{self.api_version}" if "/" not in self.api_version \
            else f"/apis/{self.api_version}"


class Kinds(enum.Enum):
    JOB = Kind("batch/v1", "jobs")
    CONFIGMAP = Kind("v1", "configmaps")
    SERVICE = Kind("v1", "services")
    POD = Kind("v1", "pods")
    CLAIM = Kind("v1", "persistentvolumeclaims")
    SECRET = Kind("v1", "secrets")
    EVENT = Kind("v1", "events")
    DEPLOYMENT = Kind("apps/v1", "deployments")
    PDB = Kind("policy/v1", "poddisruptionbudgets")
    SERVICE_MONITOR = Kind("monitoring.coreos.com/v1", "servicemonitors")
    POD_MONITOR = Kind("monitoring.coreos.com/v1", "podmonitors")
    COMPRESSED_MODEL = Kind("leanserve.io/v1alpha1", "compressedmodels")
    LEASE = Kind("coordination.k8s.io/v1", "leases")

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> Kinds:
        by_kind = {"Job": cls.JOB, "ConfigMap": cls.CONFIGMAP, "Service": cls.SERVICE,
                   "Pod": cls.POD, "PersistentVolumeClaim": cls.CLAIM,
                   "Secret": cls.SECRET, "Event": cls.EVENT,
                   "Deployment": cls.DEPLOYMENT,
                   "PodDisruptionBudget": cls.PDB, "ServiceMonitor": cls.SERVICE_MONITOR,
                   "PodMonitor": cls.POD_MONITOR, "CompressedModel": cls.COMPRESSED_MODEL,
                   "Lease": cls.LEASE}
        return by_kind[obj["kind"]]

    @classmethod
    def named(cls, kind: str) -> Kinds:
        return cls.of({"kind": kind})


def _path(kind: Kinds, namespace: str | None, name: str | None = None,
          sub: str | None = None) -> str:
    k = kind.value
    path = k.base + (f"/namespaces/{namespace}" if k.namespaced and namespace else "") + \
        f"/{k.plural}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


class KubeClient:
    """REST calls the operator needs; 404 on reads is None, 409 on create is ConflictError."""

    def __init__(self, session: aiohttp.ClientSession, server: str,
                 relogin: Callable[[], kopf.ConnectionInfo] | None = None) -> None:
        self._session = session
        self._server = server.rstrip("/")
        # A 401 means the bearer token expired (a projected ServiceAccount token rotates):
        # log in again (the token file is re-read) and repeat the request once.
        self._relogin = relogin
        self._auth: dict[str, str] = {}
        self.requests = 0  # for the operator's metrics and the benchmark
        self.by_method: collections.Counter[str] = collections.Counter()

    @classmethod
    def from_connection(cls, info: kopf.ConnectionInfo,
                        relogin: Callable[[], kopf.ConnectionInfo] | None = None) -> KubeClient:
        """One session for every request: kopf's credentials (token, or the kubeconfig's
        client certificate and key inside the SSL context), its CA in memory."""
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=32, ssl=info.as_ssl_context()),
            timeout=aiohttp.ClientTimeout(total=30),
        )
        client = cls(session, info.server, relogin)
        client._auth = dict(info.as_http_headers())
        return client

    async def close(self) -> None:
        await self._session.close()

    async def _call(self, method: str, path: str, *, body: Any = None,
                    params: Mapping[str, str] | None = None,
                    content_type: str = "application/json",
                    accept: str | None = None) -> dict[str, Any] | None:
        data = None if body is None else json.dumps(body)
        for attempt in (1, 2):
            self.requests += 1
            self.by_method[method] += 1
            headers = {**self._auth, **({"Content-Type": content_type} if body is not None
                                        else {}), **({"Accept": accept} if accept else {})}
            async with self._session.request(method, self._server + path, data=data,
                                             params=params or {}, headers=headers) as rsp:
                if rsp.status == 401 and attempt == 1 and self._relogin is not None:
                    info = await asyncio.to_thread(self._relogin)
                    self._auth = dict(info.as_http_headers())
                    continue
                return await self._answer(method, path, rsp)
        raise AssertionError("unreachable")

    @staticmethod
    async def _answer(method: str, path: str,
                      rsp: aiohttp.ClientResponse) -> dict[str, Any] | None:
        if rsp.status == 404:
            return None
        text = await rsp.text()
        if rsp.status == 409:
            raise ConflictError(409, _message(text))
        if rsp.status >= 400:
            raise ApiError(rsp.status, f"{method} {path}: {_message(text)}")
        return json.loads(text) if text else {}

    async def get(self, kind: Kinds, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._call("GET", _path(kind, namespace, name))

    async def get_metadata(self, kind: Kinds, namespace: str, name: str
                           ) -> dict[str, Any] | None:
        """An object's metadata only (PartialObjectMetadata): a Secret's labels without its data.

        The API authorizes it as ``get`` like a full GET; the data never leaves the server.
        """
        found = await self._call("GET", _path(kind, namespace, name), accept=METADATA_ONLY)
        return None if found is None else dict(found.get("metadata") or {})

    async def list(self, kind: Kinds, namespace: str, labels: Mapping[str, str],
                   fields: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        params = {"labelSelector": selector} if selector else {}
        if fields:
            params["fieldSelector"] = ",".join(f"{k}={v}" for k, v in sorted(fields.items()))
        found = await self._call("GET", _path(kind, namespace), params=params or None)
        items = (found or {}).get("items") or []
        # Filtered here too: correct on any server, needed where selectors are ignored.
        return [i for i in items if all(
            ((i.get("metadata") or {}).get("labels") or {}).get(k) == v
            for k, v in labels.items())]

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        created = await self._call("POST", _path(Kinds.of(obj), meta.get("namespace")),
                                   body=obj, params={"fieldManager": FIELD_MANAGER})
        return created or {}

    async def post_once(self, obj: Mapping[str, Any]) -> bool:
        """Create an object whose name says what it is (an Event); 409 means it is there.

        True when this call created it.
        """
        try:
            await self.create(obj)
        except ConflictError:
            return False
        return True

    async def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply: one PATCH creates the object or updates it to ``obj``.

        One field manager, forced: the operator is the only writer of what it sets (the
        autoscaler writes spec.replicas under the same manager).
        """
        meta = obj["metadata"]
        path = _path(Kinds.of(obj), meta["namespace"], meta["name"])
        applied = await self._call("PATCH", path, body=obj,
                                   params={"fieldManager": FIELD_MANAGER, "force": "true"},
                                   content_type="application/apply-patch+yaml")
        if applied is None:  # apply creates; 404 means the namespace or the kind is missing
            raise ApiError(404, f"PATCH {path}: not found (the namespace or the resource "
                                "type does not exist)")
        return applied

    async def replace(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """PUT with the object's resourceVersion (409 ConflictError when someone wrote first)."""
        meta = obj["metadata"]
        done = await self._call("PUT", _path(Kinds.of(obj), meta["namespace"], meta["name"]),
                                body=obj, params={"fieldManager": FIELD_MANAGER})
        return done or {}

    async def patch(self, kind: Kinds, namespace: str, name: str, body: Mapping[str, Any],
                    sub: str | None = None,
                    params: Mapping[str, str] | None = None) -> dict[str, Any] | None:
        return await self._call("PATCH", _path(kind, namespace, name, sub), body=body,
                                params=params, content_type="application/merge-patch+json")

    async def delete(self, kind: Kinds, namespace: str, name: str) -> bool:
        gone = await self._call("DELETE", _path(kind, namespace, name),
                                body={"kind": "DeleteOptions", "apiVersion": "v1",
                                      "propagationPolicy": "Background"})
        return gone is not None

    async def served(self, api_version: str) -> set[str]:
        """Plural names an API group version serves (empty when the group does not exist)."""
        base = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
        found = await self._call("GET", base)
        return {r.get("name", "") for r in (found or {}).get("resources") or []}


def _message(text: str) -> str:
    """The server's own message (a Status object's), kept whole enough to name the cause."""
    try:
        return str(json.loads(text).get("message") or text)[:1024]
    except (ValueError, AttributeError):
        return text[:1024]
