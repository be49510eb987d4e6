"""The Platform port: where replica counts are read and set.

One port, several adapters, so the same autoscale loop drives a cluster (the operator's
Kubernetes adapter: Deployment ``X-<pool>`` through the scale subresource), one machine (the local
platform: tritonserver processes) and the simulator (``InMemoryPlatform`` with a start-up delay).
Adapters do I/O only; the decisions come from ``policy.decide``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from leanserve.autoscaling.errors import AutoscalingError


@runtime_checkable
class Platform(Protocol):
    """What the autoscaler needs from wherever replicas run."""

    def current_replicas(self, model: str) -> dict[str, int]:
        """Replicas per pool as set (ready or still starting)."""
        ...

    def ready_replicas(self, model: str) -> dict[str, int]:
        """Replicas per pool that serve traffic now."""
        ...

    def scale(self, model: str, replicas: dict[str, int]) -> None:
        """Set replicas per pool; pools not named keep their count."""
        ...


@dataclass
class _Replica:
    started: float
    ready_at: float


@dataclass
class InMemoryPlatform:
    """Replicas as records with a start-up delay; for tests and the simulator.

    A new replica is ready ``startup_seconds`` after it was asked for. Scale-down removes the
    replicas still starting first (the newest), then ready ones: what a ReplicaSet does too.
    """

    pools: list[str]
    clock: Callable[[], float]
    startup_seconds: float = 30.0
    _replicas: dict[tuple[str, str], list[_Replica]] = field(default_factory=dict)

    def _list(self, model: str, pool: str) -> list[_Replica]:
        if pool not in self.pools:
            raise AutoscalingError(f"unknown node pool {pool!r} (pools: {', '.join(self.pools)})")
        return self._replicas.setdefault((model, pool), [])

    def current_replicas(self, model: str) -> dict[str, int]:
        return {p: len(self._list(model, p)) for p in self.pools}

    def ready_replicas(self, model: str) -> dict[str, int]:
        now = self.clock()
        return {p: sum(1 for r in self._list(model, p) if r.ready_at <= now) for p in self.pools}

    def scale(self, model: str, replicas: dict[str, int]) -> None:
        now = self.clock()
        for pool, n in replicas.items():
            if n < 0:
                raise AutoscalingError(f"replicas for pool {pool!r} must be >= 0, got {n}")
            items = self._list(model, pool)
            while len(items) < n:
                items.append(_Replica(now, now + self.startup_seconds))
            if len(items) > n:
                items.sort(key=lambda r: r.ready_at)
                del items[n:]

    def set_ready(self, model: str, replicas: dict[str, int]) -> None:
        """Start with these replicas already ready (a warm deployment)."""
        now = self.clock()
        for pool, n in replicas.items():
            self._list(model, pool)[:] = [_Replica(now, now) for _ in range(n)]
