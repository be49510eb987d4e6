"""Starting the operator: kopf's settings, credentials and the handlers' runtime in one place.

Used by `leanserve operator` (its own event loop) and by the tests (a thread with its own loop,
against kmock's emulator); both go through ``run_operator`` so they run the same configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf

from leanserve.operator.errors import KubeconfigError, OperatorError
from leanserve.operator.handlers import Runtime, build_registry
from leanserve.operator.kube import KubeClient
from leanserve.operator.lease import LeaderElector, identity
from leanserve.operator.metrics import OperatorMetrics
from leanserve.operator.settings import OperatorSettings

logger = logging.getLogger(__name__)

STOP_FLAG_POLL_SECONDS = 0.05
"""How often a caller's threading.Event stop flag is looked at (a thread blocked on it would
hold asyncio.run's executor shutdown)."""

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
SERVICE_ACCOUNT_DIR_ENV = "LEANSERVE_OPERATOR_SERVICE_ACCOUNT_DIR"
"""Where the ServiceAccount's token, ca.crt and namespace are (default: the kubelet's mount)."""


def kubeconfig_path(env: dict[str, str] | None = None) -> Path | None:
    env = dict(os.environ) if env is None else env
    raw = env.get("KUBECONFIG")
    candidates = [Path(p) for p in raw.split(os.pathsep) if p] if raw else \
        [Path(env.get("HOME", "~")).expanduser() / ".kube" / "config"]
    return next((p for p in candidates if p.is_file()), None)


def service_account_login(env: Mapping[str, str] | None = None) -> kopf.ConnectionInfo | None:
    """In-cluster credentials as client-go reads them: the API server from
    KUBERNETES_SERVICE_HOST/PORT, the token and CA from the ServiceAccount mount. The token is
    read at every call: kubelet rewrites a projected token before it expires (about hourly),
    and the operator logs in again on a 401 (kopf's watches and leanserve's client alike).
    None outside a cluster."""
    env = dict(os.environ) if env is None else dict(env)
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
    base = Path(env.get(SERVICE_ACCOUNT_DIR_ENV) or SERVICE_ACCOUNT_DIR)
    token_file = base / "token"
    if not host or not token_file.is_file():
        return None
    token = token_file.read_text().strip()
    if not token:
        raise KubeconfigError(f"the ServiceAccount token {token_file} is empty")
    host = f"[{host}]" if ":" in host else host  # an IPv6 address
    ns_file, ca_file = base / "namespace", base / "ca.crt"
    return kopf.ConnectionInfo(
        server=f"https://{host}:{port}", token=token,
        ca_path=str(ca_file) if ca_file.is_file() else None,
        default_namespace=ns_file.read_text().strip() if ns_file.is_file() else None,
        priority=30)


def login() -> kopf.ConnectionInfo:
    """In-cluster service account first, then the current kubeconfig; one clear error if none."""
    info = service_account_login()
    if info is not None:
        return info
    if kubeconfig_path() is None:
        raise KubeconfigError("no kubeconfig found: set KUBECONFIG or create ~/.kube/config "
                              "(or run the operator inside a cluster with a ServiceAccount)")
    info = kopf.login_with_kubeconfig(settings=kopf.OperatorSettings())
    if info is None:
        raise KubeconfigError("the kubeconfig has no usable current context: run "
                              "`kubectl config use-context NAME`")
    return info


@dataclass(frozen=True)
class KopfTuning:
    """kopf timings; the defaults suit a real cluster, tests shorten them."""

    watch_server_timeout: int = 300
    error_backoffs: tuple[float, ...] = (1, 2, 5, 10, 30)
    max_workers: int = 8
    batch_window: float = 0.1


def kopf_settings(tuning: KopfTuning, namespaced: bool = False) -> kopf.OperatorSettings:
    # Only watch-event handlers are registered: kopf stores no progress, adds no finalizer
    # and never writes to a CompressedModel.
    ks = kopf.OperatorSettings()
    # Watching one namespace, the operator needs no cluster-scoped access (namespaced RBAC,
    # deploy/operator-namespaced): kopf discovers the resources once at start-up and does not
    # watch CRDs or namespaces (a CRD installed later needs a restart).
    ks.scanning.disabled = namespaced
    ks.posting.enabled = False  # Events are posted by the handlers, one per transition
    ks.watching.server_timeout = tuning.watch_server_timeout
    ks.watching.client_timeout = tuning.watch_server_timeout + 10
    ks.networking.error_backoffs = list(tuning.error_backoffs)
    ks.execution.max_workers = tuning.max_workers
    ks.batching.batch_window = tuning.batch_window
    return ks


def make_runtime(settings: OperatorSettings, metrics: OperatorMetrics | None = None,
                 login_fn: Callable[[], kopf.ConnectionInfo] = login) -> Runtime:
    from leanserve.operator.autoscale import step

    return Runtime(settings=settings, metrics=metrics or OperatorMetrics(), login=login_fn,
                   autoscale=step)


@dataclass
class Stopper:
    """kopf's stop flag, raised by SIGTERM or SIGINT or by the caller's stop flag.

    It stops the autoscaler's requests (``Bridge.stop``) *before* kopf begins to stop: kopf
    first lets the handlers in flight finish (``settings.queueing.exit_timeout``, 2 s), and a
    reconcile waiting for its model's lock behind an autoscaling step would otherwise hold the
    exit for that long before the cleanup handler stopped the step.
    """

    rt: Runtime
    flag: asyncio.Event = field(default_factory=asyncio.Event)

    def stop(self, why: str) -> None:
        if not self.flag.is_set():
            logger.info(f"{why}: the operator is stopping")
        if self.rt.bridge is not None:
            self.rt.bridge.stop()
        self.flag.set()

    async def take_signals(self, ready: asyncio.Event) -> list[signal.Signals]:
        """Once kopf is ready, handle SIGINT and SIGTERM here (main thread only); returns the
        signals taken. kopf installs its own handlers when it spawns its tasks, before its
        startup handlers run and readiness is raised, so these replace them (both stop kopf)."""
        await ready.wait()
        await asyncio.sleep(0)
        if threading.current_thread() is not threading.main_thread():
            return []
        loop = asyncio.get_running_loop()
        taken = [signal.SIGINT, signal.SIGTERM]
        for sig in taken:
            loop.add_signal_handler(sig, self.stop, f"Signal {sig.name} received")
        return taken

    async def relay(self, stop_flag: threading.Event) -> None:
        while not stop_flag.is_set():
            await asyncio.sleep(STOP_FLAG_POLL_SECONDS)
        self.stop("The stop flag is raised")


async def _relay_ready(ready: asyncio.Event, ready_flag: threading.Event) -> None:
    await ready.wait()
    ready_flag.set()


async def run_operator(rt: Runtime, *, namespace: str | None = None,
                       tuning: KopfTuning = KopfTuning(),
                       stop_flag: threading.Event | None = None,
                       ready_flag: threading.Event | None = None) -> None:
    """Run the operator until ``stop_flag``, SIGTERM or SIGINT (see Stopper); with leader
    election, only while holding the Lease, which it gives up on a clean stop.

    One API client (one HTTP session) serves the Lease, the handlers and the autoscaler's
    writes; kopf's watches use kopf's own, from the same credentials.
    """
    port = rt.settings.liveness_port
    kwargs: dict[str, Any] = {}
    if namespace:
        kwargs["namespaces"] = [namespace]
    else:
        kwargs["clusterwide"] = True
    rt.kube = KubeClient.from_connection(rt.login(), relogin=rt.login)
    elector: LeaderElector | None = None
    stopper, ready = Stopper(rt), asyncio.Event()
    helpers: list[asyncio.Task[Any]] = []
    signals = asyncio.ensure_future(stopper.take_signals(ready))
    try:
        if rt.settings.leader_election:
            s = rt.settings
            elector = LeaderElector(rt.kube, s.lease_namespace, s.lease_name, identity(),
                                    s.lease_seconds)
            if not await elector.acquire(lambda: bool(stop_flag and stop_flag.is_set())):
                return
        if stop_flag is not None:
            helpers.append(asyncio.create_task(stopper.relay(stop_flag)))
        if ready_flag is not None:
            helpers.append(asyncio.create_task(_relay_ready(ready, ready_flag)))
        operator = asyncio.ensure_future(kopf.operator(
            registry=build_registry(rt),
            settings=kopf_settings(tuning, namespaced=bool(namespace)),
            standalone=True,
            liveness_endpoint=f"http://0.0.0.0:{port}/healthz" if port else None,
            stop_flag=stopper.flag,
            ready_flag=ready,
            **kwargs,
        ))
        if elector is None:
            await operator
            return
        holding = asyncio.ensure_future(elector.hold())
        done, _ = await asyncio.wait({operator, holding}, return_when=asyncio.FIRST_COMPLETED)
        if holding in done:
            if rt.bridge is not None:
                rt.bridge.stop()  # stop acting now: no query outlives the Lease
            operator.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await operator
            raise OperatorError("lost the leader Lease: stopped acting (the Deployment "
                                "restarts this replica as a candidate)")
        holding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await holding
        operator.result()
        await elector.release()
    finally:
        for task in (signals, *helpers):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if signals.done() and not signals.cancelled():
            loop = asyncio.get_running_loop()
            for sig in signals.result():
                loop.remove_signal_handler(sig)
        if rt.bridge is not None:  # the cleanup handler closed it, unless kopf was cancelled
            await rt.bridge.close()
            rt.bridge = None  # it belongs to this loop
        await rt.kube.close()
        rt.kube = None
