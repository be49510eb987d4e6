"""Leader election on a coordination.k8s.io Lease, so two operator replicas never both act.

The replica holding the Lease runs the handlers; the others wait until it stops renewing. As in
client-go's leaderelection, a candidate judges expiry by how long *it* has seen the same record
unchanged (its own monotonic clock), never by comparing its clock with the holder's renewTime,
so clock skew between nodes cannot elect two leaders. Writes use the Lease's resourceVersion: of
two candidates taking an expired Lease, one gets 409 and keeps waiting. A leader that cannot
renew within the lease duration stops acting (``hold`` returns) before anyone else may take over.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp

from leanserve.operator.errors import ApiError, ConflictError
from leanserve.operator.kube import Kinds, KubeClient


class Action(str, enum.Enum):
    CREATE = "create"  # no Lease yet
    TAKE = "take"  # free, or its holder stopped renewing
    RENEW = "renew"  # ours
    WAIT = "wait"  # held by a live candidate


def identity() -> str:
    """This replica's name: the pod's (downward API POD_NAME) or host and pid."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


def record(lease: dict[str, Any] | None) -> tuple[str, str, str]:
    """What must change for a holder to count as alive: holder, renewTime, resourceVersion."""
    if lease is None:
        return ("", "", "")
    spec = lease.get("spec") or {}
    return (str(spec.get("holderIdentity") or ""), str(spec.get("renewTime") or ""),
            str((lease.get("metadata") or {}).get("resourceVersion") or ""))


def decide(lease: dict[str, Any] | None, me: str, unchanged_for: float,
           default_seconds: float) -> Action:
    """What a candidate does with the Lease it read (pure).

    ``unchanged_for``: seconds this candidate has seen the same ``record`` (0 on first sight).
    """
    if lease is None:
        return Action.CREATE
    spec = lease.get("spec") or {}
    holder = str(spec.get("holderIdentity") or "")
    if holder == me:
        return Action.RENEW
    duration = float(spec.get("leaseDurationSeconds") or default_seconds)
    if not holder or unchanged_for > duration:
        return Action.TAKE
    return Action.WAIT


def _micro(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_body(namespace: str, name: str, me: str, now: datetime, seconds: float,
               current: dict[str, Any] | None) -> dict[str, Any]:
    """The Lease as ``me`` writes it when creating, taking or renewing it (pure)."""
    spec = dict((current or {}).get("spec") or {})
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    version = ((current or {}).get("metadata") or {}).get("resourceVersion")
    if version:  # optimistic concurrency: of two writers of one version, one gets 409
        meta["resourceVersion"] = version
    taking = spec.get("holderIdentity") != me
    if taking:
        spec["acquireTime"] = _micro(now)
        spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (
            1 if current is not None else 0)
    spec.update(holderIdentity=me, leaseDurationSeconds=int(seconds), renewTime=_micro(now))
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta,
            "spec": spec}


@dataclass
class LeaderElector:
    kube: KubeClient
    namespace: str
    name: str
    me: str
    seconds: float = 15.0
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    mono: Callable[[], float] = time.monotonic
    _seen: tuple[tuple[str, str, str], float] | None = field(default=None, init=False)

    async def try_once(self) -> bool:
        """One round: read the Lease and create, take or renew it when allowed. True: leader."""
        lease = await self.kube.get(Kinds.LEASE, self.namespace, self.name)
        rec, now = record(lease), self.mono()
        if self._seen is None or self._seen[0] != rec:
            self._seen = (rec, now)
        action = decide(lease, self.me, now - self._seen[1], self.seconds)
        if action is Action.WAIT:
            return False
        body = lease_body(self.namespace, self.name, self.me, self.clock(), self.seconds, lease)
        try:
            if action is Action.CREATE:
                await self.kube.create(body)
            else:
                await self.kube.replace(body)
        except ConflictError:
            return False  # another candidate wrote first
        return True

    async def acquire(self, stopped: Callable[[], bool] = lambda: False) -> bool:
        """Wait until this replica holds the Lease (False when ``stopped`` first)."""
        while not stopped():
            try:
                if await self.try_once():
                    return True
            except (ApiError, aiohttp.ClientError, TimeoutError):
                pass  # the API server is away: keep trying
            await asyncio.sleep(self.seconds / 5)
        return False

    async def hold(self) -> None:
        """Renew every third of the duration; return once renewal failed for a whole duration.

        Returning means: stop acting now. Another candidate waits a full duration after the
        last renewal it saw, so it never acts while this one still does.
        """
        last = self.mono()
        while True:
            await asyncio.sleep(self.seconds / 3)
            try:
                if await self.try_once():
                    last = self.mono()
                    continue
            except (ApiError, aiohttp.ClientError, TimeoutError):
                pass
            if self.mono() - last >= self.seconds * 2 / 3:
                return  # leave a third of the duration as margin before others may take it

    async def release(self) -> None:
        """Give the Lease up on a clean stop, so a successor need not wait for it to expire."""
        lease = await self.kube.get(Kinds.LEASE, self.namespace, self.name)
        if lease is None or record(lease)[0] != self.me:
            return
        body = lease_body(self.namespace, self.name, self.me, self.clock(), self.seconds, lease)
        body["spec"]["holderIdentity"] = ""
        with contextlib.suppress(ApiError):
            await self.kube.replace(body)
