"""A real Kubernetes control plane for the end-to-end tests in this directory (DESIGN.md 7).

``control_plane`` (session scope) runs exactly ``scripts/control-plane.sh up DIR`` in a temporary
directory and ``down DIR`` at the end of the session, on failure, on SIGINT (pytest's own
teardown) and on SIGTERM or interpreter exit (handlers below). Binaries are built once by
``scripts/control-plane.sh build`` at collection time (before any test's timeout starts); tests
skip only where Go is absent and nothing was built. See tests/cluster/README.md.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "control-plane.sh"
HERE = Path(__file__).resolve().parent
NO_GO = ("go is not installed: the control plane (etcd, kube-apiserver, kube-controller-manager, "
         "kube-scheduler, kubectl, kwok) builds from Go source modules "
         "(scripts/control-plane.sh build)")


def binaries_dir() -> Path:
    out = subprocess.run(["bash", str(SCRIPT), "bin"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def kstatus_binary() -> Path:
    """kstatus (cli-utils' status rules: Flux, kpt, Config Sync), built with the binaries."""
    out = subprocess.run(["bash", str(SCRIPT), "kstatus"], capture_output=True, text=True,
                         check=True)
    return Path(out.stdout.strip())


def binaries_built() -> bool:
    b = binaries_dir()
    return all((b / n).is_file() for n in ("etcd", "kube-apiserver", "kube-controller-manager",
                                           "kube-scheduler", "kubectl", "kwok")) and \
        kstatus_binary().is_file()


@dataclass
class ControlPlane:
    """A running control plane: its directory, admin kubeconfig and binaries."""

    dir: Path
    kubeconfig: Path
    bin: Path
    startup_seconds: float = 0.0
    _down: bool = field(default=False, repr=False)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{(self.dir / 'port').read_text().strip()}"

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout: float = 120, kubeconfig: Path | None = None
                ) -> subprocess.CompletedProcess[str]:
        """Run kubectl with the admin kubeconfig (or ``kubeconfig``); raises on failure when
        ``check`` (the error carries kubectl's stderr)."""
        argv = [str(self.bin / "kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}",
                *args]
        proc = subprocess.run(argv, capture_output=True, text=True, input=input,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stderr}{proc.stdout}")
        return proc

    def down(self) -> None:
        """``control-plane.sh down`` in its own session, Ctrl-C held off until it is done (an
        interrupted down would leave processes behind); repeated calls do nothing."""
        if self._down:
            return
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            subprocess.run(["bash", str(SCRIPT), "down", str(self.dir)], timeout=120,
                           check=False, start_new_session=True)
            self._down = True
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark this directory's tests ``cluster``; build the binaries before any test runs."""
    mine = [i for i in items if HERE in Path(str(i.path)).resolve().parents]
    for item in mine:
        item.add_marker(pytest.mark.cluster)
    if not mine or config.option.collectonly or binaries_built():
        return
    if shutil.which("go") is None:
        return  # the fixture skips with NO_GO
    print(f"\n{SCRIPT.name}: building the control plane (cold: tens of minutes)",
          file=sys.stderr)
    subprocess.run(["bash", str(SCRIPT), "build"], check=True)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    if not binaries_built():
        if shutil.which("go") is None:
            pytest.skip(NO_GO)
        subprocess.run(["bash", str(SCRIPT), "build"], check=True)
    d = tmp_path_factory.mktemp("control-plane")
    cp = ControlPlane(dir=d, kubeconfig=d / "kubeconfig", bin=binaries_dir())

    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: FrameType | None) -> Any:
        cp.down()
        signal.signal(signal.SIGTERM, previous if callable(previous) else signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    atexit.register(cp.down)
    try:
        t0 = time.monotonic()
        up = subprocess.run(["bash", str(SCRIPT), "up", str(d)], capture_output=True, text=True,
                            timeout=180)
        cp.startup_seconds = time.monotonic() - t0
        if up.returncode != 0:
            raise RuntimeError(f"control-plane.sh up failed:\n{up.stderr}{up.stdout}")
        yield cp
    finally:
        cp.down()
        signal.signal(signal.SIGTERM, previous)
        atexit.unregister(cp.down)


@pytest.fixture(scope="module")
def operator_kubeconfig(control_plane: ControlPlane,
                        tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CRD and deploy/operator installed; a kubeconfig with the operator's own token."""
    from clusterlib import install_crd, install_operator, service_account_kubeconfig

    install_crd(control_plane)
    proc = install_operator(control_plane)
    assert proc.returncode == 0, proc.stderr
    return service_account_kubeconfig(
        control_plane, tmp_path_factory.mktemp("operator") / "kubeconfig")


@pytest.fixture
def ns(control_plane: ControlPlane, operator_kubeconfig: Path, tmp_path: Path) -> Iterator[str]:
    """A fresh namespace with a bound ReadWriteMany claim ``models``; deleted afterwards.
    (Modules with other needs define their own ``ns``.)"""
    import uuid

    from clusterlib import delete_namespace, pv_and_claim

    name = f"m-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", name)
    store = tmp_path / "store"
    store.mkdir()
    pv_and_claim(control_plane, name, "models", store)
    yield name
    delete_namespace(control_plane, name)
