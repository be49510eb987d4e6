"""A real tritonserver on this machine: the binary shipped in the nvidia-pytriton wheel.

That build carries only the python backend, so ``LocalTriton`` first converts the repository to
its local form (``repository.to_local_repository``) in a work directory, lays out a backend
directory with the python backend stub for the running Python (as pytriton does), points the stub
at this interpreter's libpython and site-packages, and starts the server on free ports. It waits
for ``/v2/health/ready`` and, whatever happens, stops the server (SIGINT, then SIGKILL to the whole
process group so the per-instance stub processes go too) and removes its shared-memory regions.
Several servers may run at once: each has its own ports, work directory and shm prefix.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from leanserve.serving.errors import PortInUseError, ServerStartError, ServingError
from leanserve.serving.repository import list_models, to_local_repository

#: Quantiles of the latency summaries Triton exports (``nv_inference_request_summary_us``).
SUMMARY_QUANTILES = "0.5:0.05,0.9:0.01,0.95:0.001,0.99:0.001"
#: The metrics flags every tritonserver leanserve runs needs (local and in the cluster): p95 for
#: the autoscaler comes from ``nv_inference_request_summary_us{quantile="0.95"}``.
TRITON_METRICS_ARGS: tuple[str, ...] = (
    "--allow-metrics=true",
    "--metrics-config=summary_latencies=true",
    f"--metrics-config=summary_quantiles={SUMMARY_QUANTILES}",
)
LOG_TAIL_LINES = 30
_START_RETRIES = 3


@dataclass(frozen=True)
class TritonDist:
    """Where the wheel keeps the server, its python backend, the stubs and shared libraries."""

    binary: Path
    python_backend: Path
    stub: Path
    libs: Path


def find_tritonserver(python_version: str | None = None) -> TritonDist:
    """Locate tritonserver in the installed nvidia-pytriton wheel."""
    try:
        import pytriton
    except ImportError:
        raise ServingError("nvidia-pytriton is not installed (pip install nvidia-pytriton); "
                           "it ships the tritonserver binary leanserve runs locally") from None
    root = Path(pytriton.__file__).parent
    version = python_version or f"{sys.version_info[0]}.{sys.version_info[1]}"
    dist = TritonDist(
        binary=root / "tritonserver" / "bin" / "tritonserver",
        python_backend=root / "tritonserver" / "backends" / "python",
        stub=root / "tritonserver" / "python_backend_stubs" / version /
        "triton_python_backend_stub",
        libs=root.parent / "nvidia_pytriton.libs",
    )
    if not dist.binary.is_file():
        raise ServingError(f"{dist.binary}: tritonserver missing from the nvidia-pytriton wheel "
                           "(reinstall nvidia-pytriton)")
    if not dist.stub.is_file():
        raise ServingError(f"{dist.stub}: no python backend stub for Python {version} "
                           "(use a Python the wheel supports: 3.8 to 3.13)")
    return dist


# --------------------------------------------------------------------------------------------
# ports

_reserved: set[int] = set()
_reserved_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, not handed out before by this process."""
    for _ in range(64):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        with _reserved_lock:
            if port not in _reserved:
                _reserved.add(port)
                return port
    raise ServingError("no free TCP port found after 64 tries")


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when binding ``host:port`` fails (someone listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def choose_ports(asked: dict[str, int], *, host: str, strict: bool,
                 in_use: Callable[[int, str], bool] = port_in_use,
                 pick: Callable[[str], int] = free_port) -> dict[str, int]:
    """Ports per endpoint: 0 -> a free one; a taken one -> error when strict, else a free one."""
    chosen: dict[str, int] = {}
    for endpoint, port in asked.items():
        if port and not in_use(port, host) and port not in chosen.values():
            chosen[endpoint] = port
        elif port and strict:
            raise PortInUseError(f"port {port} ({endpoint}) is already in use; pick another "
                                 f"with --{endpoint}-port or stop what listens there")
        else:
            chosen[endpoint] = pick(host)
    return chosen


# --------------------------------------------------------------------------------------------
# the server

_running: weakref.WeakSet[LocalTriton] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """No tritonserver outlives the Python process that started it."""
    for server in list(_running):
        with contextlib.suppress(Exception):
            server.stop()


class LocalTriton:
    """A tritonserver process serving ``repo``; a context manager.

    Ports 0 mean "any free port"; an asked port that is taken moves to a free one unless
    ``strict_ports``. ``http_url`` and ``grpc_url`` are ``host:port`` as tritonclient takes them;
    ``metrics_url`` is the full URL of the Prometheus endpoint.
    """

    def __init__(self, repo: Path, *, http_port: int = 0, grpc_port: int = 0,
                 metrics_port: int = 0, log_dir: Path | None = None,
                 startup_timeout: float = 120.0, host: str = "127.0.0.1",
                 strict_ports: bool = False, stop_timeout: float = 15.0,
                 extra_args: Sequence[str] = ()) -> None:
        self.repo = Path(repo).resolve()
        self.host = host
        self.asked_ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.ports: dict[str, int] = {}
        self.log_dir = Path(log_dir).resolve() if log_dir is not None else None
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.strict_ports = strict_ports
        self.extra_args = tuple(extra_args)
        self.shm_prefix = f"leanserve-{os.getpid()}-{uuid.uuid4().hex[:8]}-"
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._own_workdir = False
        self.log_path: Path | None = None

    # ---- endpoints

    @property
    def http_port(self) -> int:
        return self._port("http")

    @property
    def grpc_port(self) -> int:
        return self._port("grpc")

    @property
    def metrics_port(self) -> int:
        return self._port("metrics")

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit code once the server process has exited by itself, else None."""
        return self._proc.poll() if self._proc is not None else None

    def _port(self, endpoint: str) -> int:
        if endpoint not in self.ports:
            raise ServingError("the server is not started; call start() first")
        return self.ports[endpoint]

    # ---- lifecycle

    def __enter__(self) -> LocalTriton:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> LocalTriton:
        """Start and wait until ready; ServerStartError (with the log tail) when it fails."""
        if self.running:
            return self
        models = list_models(self.repo)  # bad repositories fail here, before any process
        dist = find_tritonserver()
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._workdir = Path(tempfile.mkdtemp(prefix="triton-", dir=self.log_dir))
        else:
            self._workdir = Path(tempfile.mkdtemp(prefix="leanserve-triton-"))
            self._own_workdir = True
        try:
            local_repo = to_local_repository(self.repo, self._workdir / "repository")
            backends = _backend_dir(dist, self._workdir / "backends")
            for attempt in range(_START_RETRIES):
                self.ports = choose_ports(self.asked_ports, host=self.host,
                                          strict=self.strict_ports)
                self.log_path = self._workdir / f"tritonserver-{attempt}.log"
                try:
                    self._launch(dist, local_repo, backends)
                    # stopped at exit from now on, not only once ready: a replica still starting
                    # in another thread (LocalPlatform's boot threads) when a second Ctrl-C cuts
                    # the clean-up short runs in its own session and would outlive us
                    _running.add(self)
                    self._wait_ready(len(models))
                    break
                except ServerStartError as exc:
                    self._kill()
                    busy = _port_clash(self.log_tail())
                    if busy and not self.strict_ports and attempt + 1 < _START_RETRIES:
                        continue  # another process took a port between our check and bind
                    if busy and self.strict_ports:
                        raise PortInUseError(f"{exc}") from None
                    raise
        except BaseException:
            self._kill()  # not ready yet: a loading server may ignore SIGINT, don't wait long
            self.stop()
            raise
        _running.add(self)
        return self

    def _launch(self, dist: TritonDist, local_repo: Path, backends: Path) -> None:
        cmd = [
            str(dist.binary),
            f"--model-repository={local_repo}",
            f"--backend-directory={backends}",
            f"--http-address={self.host}", f"--http-port={self.ports['http']}",
            f"--grpc-address={self.host}", f"--grpc-port={self.ports['grpc']}",
            f"--metrics-address={self.host}", f"--metrics-port={self.ports['metrics']}",
            *TRITON_METRICS_ARGS,
            "--allow-gpu-metrics=false", "--allow-cpu-metrics=true",
            "--metrics-interval-ms=1000",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--backend-config=python,shm-default-byte-size=4194304",
            "--disable-auto-complete-config",
            "--exit-timeout-secs=5",
            "--log-verbose=0",
            *self.extra_args,
        ]
        assert self.log_path is not None
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=_server_env(dist),
                                          cwd=self._workdir, start_new_session=True)

    def _wait_ready(self, n_models: int) -> None:
        deadline = time.monotonic() + self.startup_timeout
        url = f"http://{self.host}:{self.ports['http']}/v2/health/ready"
        while time.monotonic() < deadline:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                raise ServerStartError(self._failure(f"tritonserver exited with code {code} "
                                                     "while starting"))
            failed = _load_failure(self.log_path)
            if failed:
                raise ServerStartError(self._failure(f"a model failed to load ({failed})"))
            try:
                with urllib.request.urlopen(url, timeout=1.0) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise ServerStartError(self._failure(
            f"tritonserver not ready after {self.startup_timeout:g} s ({n_models} models); "
            "raise startup_timeout for large models"))

    def _failure(self, what: str) -> str:
        tail = self.log_tail()
        return f"{what}; repository {self.repo}; log {self.log_path}:\n{tail}"

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the server log, without Triton's wide status tables."""
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        kept = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("+", "|"))]
        return "\n".join(kept[-lines:])

    def stop(self) -> None:
        """Stop the server and every process it started; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate(proc, self.stop_timeout)
        _running.discard(self)
        for shm in Path("/dev/shm").glob(self.shm_prefix + "*"):  # left by a killed stub
            with contextlib.suppress(OSError):
                shm.unlink()
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate(proc, 2.0)

    def wait(self, poll: float = 0.5) -> int:
        """Block until the server exits by itself (used by ``leanserve serve``)."""
        while self._proc is not None:
            code = self._proc.poll()
            if code is not None:
                return code
            time.sleep(poll)
        return 0


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGINT (Triton drains and unloads), then SIGKILL the group; always reap."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the stubs, even when the server is gone
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)


def _load_failure(log_path: Path | None) -> str:
    """The first model-load failure in the log: the python backend may hang instead of exit."""
    if log_path is None or not log_path.exists():
        return ""
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        if "failed to load '" in line or "Failed to preinitialize" in line:
            return line.split("]", 1)[-1].strip().strip('"')[:300]
    return ""


def _port_clash(log: str) -> bool:
    lowered = log.lower()
    return "already in use" in lowered or "address in use" in lowered


def _backend_dir(dist: TritonDist, dest: Path) -> Path:
    """backends/python with the wheel's backend and the stub for this Python (as pytriton)."""
    python = dest / "python"
    python.mkdir(parents=True, exist_ok=True)
    for item in dist.python_backend.iterdir():
        if item.is_file():
            target = python / item.name
            if item.suffix == ".so":
                target.symlink_to(item)
            else:
                shutil.copyfile(item, target)
    shutil.copy2(dist.stub, python / "triton_python_backend_stub")
    return dest


def _server_env(dist: TritonDist) -> dict[str, str]:
    """The stub embeds libpython: make it this interpreter's, with this interpreter's packages."""
    env = os.environ.copy()
    libs = [str(dist.libs)]
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    soname = sysconfig.get_config_var("INSTSONAME") or ""
    if libdir and soname and (Path(libdir) / soname).exists():
        libs.insert(0, libdir)
        env["PYTHONHOME"] = sys.base_prefix
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(libs)
    paths = [p for p in sys.path if p and os.path.isabs(p) and os.path.isdir(p)]
    env["PYTHONPATH"] = ":".join(paths)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
