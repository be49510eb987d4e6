"""The Platform port on one machine: a replica is a local tritonserver process.

The autoscaler asks for replicas per pool; this adapter starts new tritonserver processes in
the background (a replica counts as ready only once Triton says so, as a Pod would) and stops
surplus ones newest first. All pools share this machine, so a pool here is a label on the
replica (its metrics carry ``pool``), not different hardware: the report says so.

Health: ``check_health`` does what a kubelet's liveness probe and a ReplicaSet do together. A
replica whose process has exited, or whose ``/v2/health/live`` failed ``LIVENESS_FAILURES``
times in a row, is reaped: no longer ready nor routed to, while the replicas as set
(``current_replicas``) keep counting it, so the next ``scale`` starts a replacement whatever the
decision (a hold included); ``replaced`` lists each one for the report.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

from leanserve.errors import LeanserveError
from leanserve.serving.server import LocalTriton

LIVENESS_FAILURES = 3
"""Consecutive failed liveness probes before a running replica is declared dead (a loaded
machine can miss one probe's timeout; a process that exited is dead at once)."""
LIVENESS_TIMEOUT_S = 2.0


@dataclass
class Replica:
    pool: str
    index: int
    server: LocalTriton
    ready: bool = False
    failed: str | None = None
    thread: threading.Thread | None = field(default=None, repr=False)
    missed_probes: int = 0

    @property
    def name(self) -> str:
        return f"{self.pool}-{self.index}"


class LocalPlatform:
    """Starts and stops tritonserver replicas of one model repository."""

    def __init__(self, repo: Path, log_dir: Path, *,
                 on_change: Callable[[], None] | None = None,
                 on_stop: Callable[[str, str], None] | None = None,
                 server_factory: Callable[..., LocalTriton] = LocalTriton) -> None:
        self.repo = repo
        self.log_dir = log_dir
        self.on_change = on_change
        self.on_stop = on_stop
        """Called with (pool, metrics host:port) of a ready replica just before its process
        stops, out of every count already (a direct metric source reads its last counters)."""
        self._factory = server_factory
        self._replicas: list[Replica] = []
        self._lock = threading.Lock()
        self._boot_lock = threading.Lock()
        self._counter = 0
        self._set: dict[str, int] = {}
        """Replicas per pool as last set by ``scale`` (a Deployment's spec.replicas)."""
        self.drain_s = 0.0
        """Seconds a ready replica that ``scale`` removes keeps serving after it left
        ``endpoints()``, before its process stops (a pod's preStop grace): a client that picked
        it just before finishes instead of failing on a closed port."""
        self.errors: list[str] = []
        self.replaced: list[str] = []
        """Replicas found dead by ``check_health``, with why ("cpu-small-2: exited with ...")."""

    # Platform port --------------------------------------------------------------------------

    def current_replicas(self, model: str) -> dict[str, int]:
        """Replicas per pool as set, as the Platform port says (ready, starting, or reaped and
        not yet replaced), like a Deployment's replicas: a replica that died or failed to start
        does not lower it. Counting only live ones, a decision that holds (MetricsUnavailable:
        the dead replica was the one scraped) held at the survivors and never replaced it."""
        with self._lock:
            return {pool: n for pool, n in self._set.items() if n > 0}

    def ready_replicas(self, model: str) -> dict[str, int]:
        with self._lock:
            return self._count(lambda r: r.ready)

    def scale(self, model: str, replicas: dict[str, int]) -> None:
        for pool, want in replicas.items():
            with self._lock:
                self._set[pool] = want
                mine = sorted((r for r in self._replicas if r.pool == pool and r.failed is None),
                              key=lambda r: r.index)
            for _ in range(want - len(mine)):
                self._start(pool)
            for replica in reversed(mine[want:]):
                self._stop(replica, drain=True)

    # what the load generator and Prometheus need ---------------------------------------------

    def endpoints(self) -> list[tuple[str, str]]:
        """(pool, HTTP URL) of every ready replica."""
        with self._lock:
            return [(r.pool, r.server.http_url) for r in self._replicas if r.ready]

    def metrics_targets(self) -> list[tuple[str, str]]:
        """(pool, host:port of the metrics endpoint) of every ready replica."""
        with self._lock:
            return [(r.pool, _metrics_address(r)) for r in self._replicas if r.ready]

    def check_health(self, probe: Callable[[Replica], bool] | None = None) -> list[str]:
        """Reap every ready replica that died; returns what was found (also in ``replaced``).
        The autoscaler's next ``scale`` starts their replacements."""
        probe = probe or _live
        with self._lock:
            ready = [r for r in self._replicas if r.ready]
        dead: list[tuple[Replica, str]] = []
        for r in ready:
            if not r.server.running:
                code = r.server.returncode
                dead.append((r, f"exited with code {code}" if code is not None else "exited"))
                continue
            r.missed_probes = 0 if probe(r) else r.missed_probes + 1
            if r.missed_probes >= LIVENESS_FAILURES:
                dead.append((r, f"failed {r.missed_probes} liveness probes in a row"))
        found = []
        for r, why in dead:
            r.failed = why
            self._stop(r)
            found.append(f"{r.name}: {why}")
        self.replaced.extend(found)
        return found

    def wait_ready(self, timeout_s: float) -> None:
        with self._lock:
            threads = [r.thread for r in self._replicas if r.thread is not None]
        for t in threads:
            t.join(timeout_s)

    def stop_all(self) -> None:
        with self._lock:
            replicas = list(self._replicas)
            self._set = {}
        for r in replicas:
            self._stop(r)

    # ----------------------------------------------------------------------------------------

    def _count(self, keep: Callable[[Replica], bool]) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self._replicas:
            if keep(r):
                out[r.pool] = out.get(r.pool, 0) + 1
        return out

    def _start(self, pool: str) -> None:
        self._counter += 1
        index = self._counter
        server = self._factory(self.repo, log_dir=self.log_dir / f"{pool}-{index}")
        replica = Replica(pool, index, server)

        def boot() -> None:
            try:
                with self._boot_lock:  # one start at a time: starts compete for the same cores
                    server.start()
            except (LeanserveError, OSError) as exc:  # recorded, reported, replica reaped
                replica.failed = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                self.errors.append(f"replica {pool}-{index}: {replica.failed}")
                server.stop()
                return
            replica.ready = True
            if self.on_change:
                self.on_change()

        replica.thread = threading.Thread(target=boot, name=f"triton-{pool}-{index}", daemon=True)
        with self._lock:
            self._replicas.append(replica)
        replica.thread.start()

    def _stop(self, replica: Replica, drain: bool = False) -> None:
        """Remove ``replica`` from every count first (no request is routed to it any more), wait
        ``drain_s`` if ``drain`` and it was serving, then stop its process."""
        if replica.thread is not None and replica.thread is not threading.current_thread():
            replica.thread.join(180)  # never kill a server halfway through its start
        with self._lock:
            if replica in self._replicas:
                self._replicas.remove(replica)
        was_ready, replica.ready = replica.ready, False
        if self.on_change:
            self.on_change()
        if drain and was_ready and self.drain_s > 0:
            time.sleep(self.drain_s)
        if was_ready and self.on_stop:
            self.on_stop(replica.pool, _metrics_address(replica))
        replica.server.stop()


def _metrics_address(replica: Replica) -> str:
    return replica.server.metrics_url.split("//", 1)[-1].split("/", 1)[0]


def _live(replica: Replica) -> bool:
    try:
        # http_url is host:port (as tritonclient takes it), not a URL
        return requests.get(f"http://{replica.server.http_url}/v2/health/live",
                            timeout=LIVENESS_TIMEOUT_S).status_code == 200
    except requests.RequestException:
        return False
