"""A local Prometheus (Debian's binary) that scrapes the local Triton replicas and leanserve.

Targets change while the autoscaler starts and stops replicas, so they live in a file_sd JSON
file that Prometheus re-reads; the process gets a generated config, a private storage directory
and a free port, and is always stopped and reaped.

Every path in the generated config is absolute: Prometheus resolves a relative file_sd path
against the config file's own folder, not the working directory, so a relative workdir
(`leanserve run`'s default) would point it at a file that does not exist and it would scrape
nothing, silently.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from leanserve.errors import LeanserveError
from leanserve.serving.server import free_port


class PrometheusError(LeanserveError):
    """The local Prometheus could not be started or answered wrongly."""


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


class LocalPrometheus:
    """``with LocalPrometheus(workdir) as prom: prom.set_targets(...)``; ``prom.url``."""

    def __init__(self, workdir: Path, *, scrape_interval_s: float = 1.0, port: int = 0,
                 startup_timeout_s: float = 30.0) -> None:
        self.workdir = workdir.absolute()
        self.scrape_interval_s = scrape_interval_s
        self.port = port or free_port()
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "prometheus.log"
        self._targets_file = self.workdir / "targets.json"
        self._write_lock = threading.Lock()

    @property
    def scrape_seconds(self) -> int:
        """The scrape interval Prometheus is given: whole seconds, at least one."""
        return max(1, round(self.scrape_interval_s))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_targets(self, groups: list[tuple[list[str], dict[str, str]]]) -> None:
        """Scrape targets as (host:port list, labels) groups; written atomically."""
        body = [{"targets": t, "labels": labels} for t, labels in groups]
        # one writer at a time: replicas' boot threads and the main thread both retarget, and
        # through the shared temporary name unserialised writes raced (FileNotFoundError)
        with self._write_lock:
            tmp = self._targets_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(body))
            tmp.replace(self._targets_file)

    def active_targets(self) -> list[dict[str, Any]]:
        """Prometheus's own view of its scrape targets (labels, health, last error)."""
        try:
            r = requests.get(f"{self.url}/api/v1/targets", params={"state": "active"}, timeout=2)
            return list(r.json().get("data", {}).get("activeTargets", []))
        except (requests.RequestException, ValueError):
            return []

    def wait_scraped(self, addresses: list[str], timeout_s: float,
                     clock: Callable[[], float] = time.monotonic) -> list[str]:
        """Wait until every address was scraped healthily; returns those that were not."""
        deadline = clock() + timeout_s
        missing = list(addresses)
        while True:
            up = {t.get("labels", {}).get("instance") for t in self.active_targets()
                  if t.get("health") == "up"}
            missing = [a for a in addresses if a not in up]
            if not missing or clock() >= deadline:
                return missing
            time.sleep(0.25)

    def start(self) -> LocalPrometheus:
        binary = prometheus_binary()
        if binary is None:
            raise PrometheusError("prometheus is not installed (apt-get install -y prometheus)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self._targets_file.exists():
            self.set_targets([])
        interval = f"{self.scrape_seconds}s"
        config = self.workdir / "prometheus.yml"
        config.write_text(json.dumps({
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [{
                "job_name": "leanserve-local",
                "file_sd_configs": [{"files": [str(self._targets_file)],
                                     "refresh_interval": interval}],
            }],
        }))
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        try:
            self._wait_ready()
        except BaseException:
            # not ready, or interrupted while waiting (Ctrl-C, SIGTERM): the caller never gets
            # the object to stop, so stop it here (it runs in its own session)
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self._log_tail()
                raise PrometheusError(f"prometheus exited at start (log {self.log_path}):\n{tail}")
            try:
                if requests.get(f"{self.url}/-/ready", timeout=1).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise PrometheusError(f"prometheus not ready after {self.startup_timeout_s:.0f}s "
                              f"(log {self.log_path})")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> LocalPrometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
