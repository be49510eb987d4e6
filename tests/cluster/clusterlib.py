"""Helpers for end-to-end tests on the control plane: install leanserve, run its operator.

``install_operator`` applies the CRD (``leanserve crd``) and ``deploy/operator``;
``service_account_kubeconfig`` writes a kubeconfig holding the operator ServiceAccount's token
(``kubectl create token``), so deploy/operator's RBAC is all the operator may do;
``OperatorProcess`` runs ``leanserve operator`` as a subprocess with it and always stops it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_NS = "leanserve-system"
OPERATOR_SA = "leanserve-operator"
# An HTTP 403 or the API's "forbidden" wording; not the milliseconds of a log timestamp (",403").
FORBIDDEN = re.compile(r"(?<![\d,.:])403(?![\d])|[Ff]orbidden")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def leanserve_crd() -> str:
    out = subprocess.run([sys.executable, "-m", "leanserve", "crd"], capture_output=True,
                         text=True, check=True, cwd=ROOT, env=python_env())
    return out.stdout


def python_env(**extra: str) -> dict[str, str]:
    """The test environment, with this tree's code first and the interpreter's bin on PATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    env.update(extra)
    return env


def install_crd(cp: Any) -> None:
    cp.kubectl("apply", "-f", "-", input=leanserve_crd())
    cp.kubectl("wait", "--for=condition=Established", "--timeout=60s",
               "crd/compressedmodels.leanserve.io")


def install_operator(cp: Any) -> subprocess.CompletedProcess[str]:
    """``kubectl apply -k deploy/operator`` (CRD included); returns kubectl's result."""
    proc = cp.kubectl("apply", "-k", str(ROOT / "deploy" / "operator"), check=False)
    cp.kubectl("wait", "--for=condition=Established", "--timeout=60s",
               "crd/compressedmodels.leanserve.io", check=False)
    return proc


def service_account_kubeconfig(cp: Any, path: Path, namespace: str = OPERATOR_NS,
                               account: str = OPERATOR_SA) -> Path:
    token = cp.kubectl("create", "token", account, "-n", namespace,
                       "--duration=2h").stdout.strip()
    admin = yaml.safe_load(cp.kubeconfig.read_text())
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": account, "context": {"cluster": admin["clusters"][0]["name"],
                                                   "user": account}}],
        "current-context": account,
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


class OperatorProcess:
    """``leanserve operator`` in its own process group; stopped (and reaped) on exit."""

    def __init__(self, kubeconfig: Path, log: Path, args: tuple[str, ...] = (),
                 **env: str) -> None:
        self.log = log
        self.stop_seconds: float | None = None  # from SIGTERM to exit, once stopped
        self.metrics_port = free_port()
        e = python_env(KUBECONFIG=str(kubeconfig),
                       LEANSERVE_OPERATOR_METRICS_PORT=str(self.metrics_port),
                       LEANSERVE_OPERATOR_LIVENESS_PORT=str(free_port()),
                       LEANSERVE_OPERATOR_RESYNC_SECONDS="2", **env)
        if "KUBERNETES_SERVICE_HOST" not in env:  # in-cluster credentials only when asked
            e.pop("KUBERNETES_SERVICE_HOST", None)
        self._out = log.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "leanserve", "operator", *args], env=e,
                                     stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def forbidden(self) -> list[str]:
        """Log lines where the API server refused the operator (RBAC)."""
        return [ln for ln in self.text().splitlines() if FORBIDDEN.search(ln)]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            t0 = time.monotonic()
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            self.stop_seconds = time.monotonic() - t0
            print(f"operator {self.proc.pid} exited {self.stop_seconds:.2f} s after SIGTERM "
                  f"(code {self.proc.returncode})")
        self._out.close()

    def __enter__(self) -> OperatorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def pv_and_claim(cp: Any, ns: str, claim: str, path: Path) -> None:
    """A hostPath volume at ``path`` bound to claim ``claim`` (the binder controller binds).

    The kubelet runner maps the claim to the same directory (its ``claims`` argument)."""
    pv = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{ns}-{claim}"},
          "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"],
                   "storageClassName": "", "hostPath": {"path": str(path)},
                   "claimRef": {"namespace": ns, "name": claim}}}
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
           "metadata": {"name": claim, "namespace": ns},
           "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "",
                    "volumeName": f"{ns}-{claim}", "resources": {"requests": {"storage": "1Gi"}}}}
    cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                     "items": [pv, pvc]}))
    cp.kubectl("wait", f"pvc/{claim}", "-n", ns, "--for=jsonpath={.status.phase}=Bound",
               "--timeout=60s")


def kstatus(obj: dict[str, Any]) -> dict[str, Any]:
    """kstatus' verdict on ``obj`` (sigs.k8s.io/cli-utils' status.Compute, as Flux's health
    checks, kpt and Config Sync compute it): ``{"status": "InProgress|Current|Failed|...",
    "message": ..., "conditions": ["Reconciling=True/Reason", ...]}``."""
    binary = subprocess.run(["bash", str(ROOT / "scripts" / "control-plane.sh"), "kstatus"],
                            capture_output=True, text=True, check=True).stdout.strip()
    out = subprocess.run([binary], input=json.dumps(obj), capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def get_json(cp: Any, *args: str) -> Any:
    out = cp.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def wait_for(probe: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def finish_job_pod(api: Any, ns: str, job: str, message: str, timeout: float = 60) -> str:
    """Play the kubelet for a compression Job: its scheduled pod ran and succeeded, leaving
    ``message`` (what `leanserve.operator.jobrunner` writes) as its termination message."""
    def scheduled() -> dict[str, Any] | None:
        pods = api.get(f"/api/v1/namespaces/{ns}/pods", labelSelector=f"job-name={job}")
        return next((p for p in pods["items"] if (p.get("spec") or {}).get("nodeName") and
                     (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")), None)
    pod = wait_for(scheduled, timeout, f"a scheduled pod of Job {job}")
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    api.merge_patch(f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}/status", {
        "status": {"phase": "Succeeded", "startTime": now, "containerStatuses": [{
            "name": "compress", "ready": False, "restartCount": 0, "started": False,
            "image": pod["spec"]["containers"][0]["image"], "imageID": "",
            "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": message,
                                     "startedAt": now, "finishedAt": now}}}]}})
    return str(pod["metadata"]["name"])


def delete_namespace(cp: Any, name: str) -> None:
    """Remove a test's namespace without waiting for the namespace controller (seconds per
    test): its CompressedModels are deleted first, and waited for (they carry no finalizer),
    so no later test's operator meets them; Job pods that never ran (no kubelet for them) are
    forced out so the namespace does not stay Terminating."""
    cp.kubectl("delete", "compressedmodels", "--all", "-n", name, "--timeout=60s",
               check=False, timeout=90)
    # no controller recreates pods once their Jobs, Deployments and ReplicaSets are gone
    cp.kubectl("delete", "jobs,deployments,replicasets", "--all", "-n", name,
               "--cascade=orphan", check=False)
    cp.kubectl("delete", "pods", "--all", "-n", name, "--force", "--grace-period=0",
               check=False)
    cp.kubectl("delete", "namespace", name, "--wait=false", check=False)
