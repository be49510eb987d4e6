"""The stand-in for a container runtime: runs leanserve's compression Job pods as local processes.

No container runtime exists on this machine, and kwok (the fake kubelet of
scripts/control-plane.sh) only pretends. kwok's stages (scripts/control-plane/kwok-stages.yaml)
leave every pod with a ``job-name`` label alone, so the Job pods the real Job controller creates
and the real scheduler binds to a fake node are picked up here instead:

- pods labelled ``app.kubernetes.io/managed-by=leanserve`` and
  ``app.kubernetes.io/component=compression`` (leanserve/operator/builders.py) that are bound to
  a node and still Pending;
- the pod's own container ``command`` + ``args`` run as a local process, with the environment of
  the test process (standing in for the image's, with this tree's code first on PYTHONPATH)
  plus the pod's ``env`` and ``envFrom``
  (values, ConfigMap and Secret keys, field references); a pod whose ConfigMap or Secret does
  not exist yet stays Pending and is tried again on the next poll, as a kubelet retries;
- volumes become local directories: each ``persistentVolumeClaim`` the directory the test maps
  the claim to, ``configMap``/``secret`` volumes their keys written as files, ``emptyDir`` and
  everything else a fresh directory. Without a mount namespace the process sees host paths, so
  every mount path (and the ``terminationMessagePath``) is rewritten to its local directory in
  the command, the arguments, the environment and the text of ConfigMap/Secret files, as a
  kubelet's bind mounts would have made them appear;
- the result is reported as a kubelet would: phase Running with a running container status
  while the process runs, then phase Succeeded or Failed with the container ``terminated``
  (exit code, reason Completed/Error and the termination message: the file at
  ``terminationMessagePath``, or with ``FallbackToLogsOnError`` the log's last lines when that
  file is empty and the process failed). The real Job controller then completes or fails the Job.

A pod that is deleted while it runs has its process group killed. Not supported: DDP workers
needing each other's DNS names (MASTER_ADDR), init containers, more than one container.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubeapi import Api, ApiError

SELECTOR = "app.kubernetes.io/managed-by=leanserve,app.kubernetes.io/component=compression"
ROOT = Path(__file__).resolve().parents[2]
"""The tree under test: its leanserve is the image's (not whichever tree the environment's
editable install points at)."""
MESSAGE_LIMIT = 4096  # the kubelet's limit on a termination message
FALLBACK_LINES = 80


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rewriter(mounts: Mapping[str, Path]) -> Any:
    """A function replacing each mount path (at a path boundary) with its local directory."""
    if not mounts:
        return lambda s: s
    paths = sorted(mounts, key=len, reverse=True)
    pattern = re.compile(r"(?:(?<=file://)|(?<![\w/.\-]))(" + "|".join(map(re.escape, paths))
                         + r")(?=/|$|[^\w.\-])")

    def rewrite(text: str) -> str:
        return pattern.sub(lambda m: str(mounts[m.group(1)]), text)

    return rewrite


@dataclass
class Run:
    pod: str  # namespace/name
    proc: subprocess.Popen[bytes]
    log: Path
    message_file: Path
    policy: str
    container: str
    image: str
    started: str


@dataclass
class KubeletRunner:
    """Runs compression Job pods of the control plane as local processes (see module doc)."""

    api: Api
    claims: Mapping[str, Path]
    """PersistentVolumeClaim name -> the local directory standing in for its volume."""
    workdir: Path
    """Per-pod directories (volumes, logs) go here."""
    extra_env: Mapping[str, str] = field(default_factory=dict)
    poll: float = 0.3
    namespaces: frozenset[str] | None = None
    """Only pods of these namespaces run (None: every namespace). A test that owns its
    namespace names it: another module's Job pod left Pending in a namespace being deleted
    would otherwise run here, against this test's claim directories."""
    runs: dict[str, Run] = field(default_factory=dict)
    finished: dict[str, int] = field(default_factory=dict)
    """namespace/name -> exit code of every pod run to completion."""
    errors: list[str] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)
    """namespace/name -> why a pod has not started yet: a ConfigMap or Secret it reads does not
    exist (yet). The operator applies a Job's spec ConfigMap just after the Job, so its pod can
    be bound before the ConfigMap exists; a kubelet retries the mount, and so does this."""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    # ------------------------------------------------------------------------- lifecycle

    def start(self) -> KubeletRunner:
        self._thread = threading.Thread(target=self._loop, name="kubelet-runner", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
        for run in list(self.runs.values()):
            self._kill(run)
        self.runs.clear()

    def __enter__(self) -> KubeletRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception as exc:  # keep running; tests read .errors
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(self.poll)

    # ---------------------------------------------------------------------------- polling

    def _tick(self) -> None:
        pods = [p for p in self.api.get("/api/v1/pods", labelSelector=SELECTOR)["items"]
                if self.namespaces is None or p["metadata"]["namespace"] in self.namespaces]
        seen = set()
        for pod in pods:
            key = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
            seen.add(key)
            if key in self.runs:
                if pod["metadata"].get("deletionTimestamp"):
                    self._kill(self.runs.pop(key))
                continue
            if (pod["spec"].get("nodeName") and pod.get("status", {}).get("phase") == "Pending"
                    and not pod["metadata"].get("deletionTimestamp")
                    and key not in self.finished):
                self._launch(key, pod)
        for key in [k for k in self.runs if k not in seen]:
            self._kill(self.runs.pop(key))
        for key, run in list(self.runs.items()):
            if run.proc.poll() is not None:
                self.runs.pop(key)
                self._report(key, run)

    # -------------------------------------------------------------------------- launching

    def _launch(self, key: str, pod: dict[str, Any]) -> None:
        ns = pod["metadata"]["namespace"]
        spec = pod["spec"]
        (container,) = spec["containers"]
        base = self.workdir / key.replace("/", "_")
        if base.exists():
            shutil.rmtree(base)
        base.mkdir(parents=True)
        try:
            mounts, texts = self._volumes(ns, spec, container, base)
            message_path = container.get("terminationMessagePath", "/dev/termination-log")
            message_file = base / "termination-log"
            message_file.touch()
            mounts[message_path] = message_file
            rewrite = _rewriter(mounts)
            for src in texts:
                self._rewrite_files(src, rewrite)
            env = self._env(ns, pod, container, rewrite)
            argv = [rewrite(a) for a in
                    (container.get("command") or []) + (container.get("args") or [])]
        except ApiError as exc:
            if exc.status != 404:
                self._fail_to_start(key, pod, container, f"{type(exc).__name__}: {exc}")
            else:  # as a kubelet does: wait (Pending) until the ConfigMap or Secret exists
                self.waiting[key] = str(exc)
            return
        except (KeyError, ValueError) as exc:
            self._fail_to_start(key, pod, container, f"{type(exc).__name__}: {exc}")
            return
        self.waiting.pop(key, None)
        if argv and argv[0] in ("python", "python3"):
            argv[0] = sys.executable  # the image's python is the test environment's
        log = base / "log"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=mounts.get(
                                        container.get("workingDir", ""), base),
                                    start_new_session=True)
        started = now()
        run = Run(key, proc, log, message_file,
                  container.get("terminationMessagePolicy", "File"), container["name"],
                  container.get("image", ""), started)
        self.runs[key] = run
        self._patch_status(key, {
            "phase": "Running", "startTime": started, "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
            "conditions": self._conditions(ready=True),
            "containerStatuses": [{"name": run.container, "image": run.image,
                                   "imageID": "", "ready": True, "started": True,
                                   "restartCount": 0,
                                   "state": {"running": {"startedAt": started}}}],
        })

    def _volumes(self, ns: str, spec: dict[str, Any], container: dict[str, Any],
                 base: Path) -> tuple[dict[str, Path], list[Path]]:
        """mountPath -> local directory (or file, for subPath mounts), and the directories
        holding ConfigMap/Secret keys (whose text gets mount paths rewritten)."""
        local: dict[str, Path] = {}
        texts: list[Path] = []
        for vol in spec.get("volumes", []):
            name = vol["name"]
            if "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                if claim not in self.claims:
                    raise ValueError(f"claim {claim!r} has no local directory in this test")
                local[name] = Path(self.claims[claim])
                continue
            target = base / "volumes" / name
            target.mkdir(parents=True)
            if "configMap" in vol:
                cm = self.api.get(f"/api/v1/namespaces/{ns}/configmaps/"
                                  f"{vol['configMap']['name']}")
                self._write_keys(target, cm.get("data", {}), vol["configMap"].get("items"))
                texts.append(target)
            elif "secret" in vol:
                sec = self.api.get(f"/api/v1/namespaces/{ns}/secrets/"
                                   f"{vol['secret']['secretName']}")
                data = {k: base64.b64decode(v).decode(errors="replace")
                        for k, v in sec.get("data", {}).items()}
                self._write_keys(target, data, vol["secret"].get("items"))
                texts.append(target)
            elif "projected" in vol:
                (target / "namespace").write_text(ns)
            local[name] = target
        mounts: dict[str, Path] = {}
        for m in container.get("volumeMounts", []):
            src = local[m["name"]]
            if m.get("subPath"):
                src = src / m["subPath"]
            mounts[m["mountPath"].rstrip("/") or "/"] = src
        return mounts, texts

    @staticmethod
    def _write_keys(target: Path, data: Mapping[str, str],
                    items: list[dict[str, str]] | None) -> None:
        pairs = [(i["key"], i["path"]) for i in items] if items else [(k, k) for k in data]
        for key, path in pairs:
            f = target / path
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(data[key])

    @staticmethod
    def _rewrite_files(src: Path, rewrite: Any) -> None:
        """Rewrite mount paths inside the text files of a ConfigMap/Secret volume."""
        for f in src.rglob("*"):
            if f.is_file():
                try:
                    text = f.read_text()
                except UnicodeDecodeError:
                    continue
                f.write_text(rewrite(text))

    def _env(self, ns: str, pod: dict[str, Any], container: dict[str, Any],
             rewrite: Any) -> dict[str, str]:
        env = dict(os.environ)
        # The image's PATH: this interpreter's bin first (python, leanserve).
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        # The image's leanserve: this tree's code, as the operator under test runs it.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", ""))
                                            if p)
        env.update(self.extra_env)
        for src in container.get("envFrom", []):
            prefix = src.get("prefix", "")
            if "configMapRef" in src:
                obj = self.api.get(f"/api/v1/namespaces/{ns}/configmaps/"
                                   f"{src['configMapRef']['name']}")
                env.update({prefix + k: v for k, v in obj.get("data", {}).items()})
            elif "secretRef" in src:
                obj = self.api.get(f"/api/v1/namespaces/{ns}/secrets/"
                                   f"{src['secretRef']['name']}")
                env.update({prefix + k: base64.b64decode(v).decode()
                            for k, v in obj.get("data", {}).items()})
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = rewrite(var["value"])
                continue
            ref = var.get("valueFrom", {})
            if "fieldRef" in ref:
                env[var["name"]] = self._field(pod, ref["fieldRef"]["fieldPath"])
            elif "configMapKeyRef" in ref:
                r = ref["configMapKeyRef"]
                obj = self.api.get(f"/api/v1/namespaces/{ns}/configmaps/{r['name']}")
                env[var["name"]] = obj["data"][r["key"]]
            elif "secretKeyRef" in ref:
                r = ref["secretKeyRef"]
                obj = self.api.get(f"/api/v1/namespaces/{ns}/secrets/{r['name']}")
                env[var["name"]] = base64.b64decode(obj["data"][r["key"]]).decode()
        return env

    @staticmethod
    def _field(pod: dict[str, Any], path: str) -> str:
        meta = pod["metadata"]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if m:
            return meta.get(m.group(1), {})[m.group(2)]
        simple = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
                  "metadata.uid": meta["uid"], "spec.nodeName": pod["spec"].get("nodeName", ""),
                  "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
                  "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1"}
        return simple[path]

    # -------------------------------------------------------------------------- reporting

    def _report(self, key: str, run: Run) -> None:
        code = run.proc.returncode
        if code < 0:  # killed by a signal: a container runtime reports 128 + signal
            code = 128 - code
        message = run.message_file.read_text(errors="replace")
        if not message.strip() and code != 0 and run.policy == "FallbackToLogsOnError":
            lines = run.log.read_text(errors="replace").splitlines()[-FALLBACK_LINES:]
            message = "\n".join(lines)
        message = message[-MESSAGE_LIMIT:]
        finished = now()
        terminated: dict[str, Any] = {"exitCode": code, "reason": "Completed" if code == 0
                                      else "Error", "startedAt": run.started,
                                      "finishedAt": finished}
        if message:
            terminated["message"] = message
        self.finished[key] = code
        self._patch_status(key, {
            "phase": "Succeeded" if code == 0 else "Failed",
            "conditions": self._conditions(ready=False),
            "containerStatuses": [{"name": run.container, "image": run.image, "imageID": "",
                                   "ready": False, "started": False, "restartCount": 0,
                                   "state": {"terminated": terminated}}],
        })

    def _fail_to_start(self, key: str, pod: dict[str, Any], container: dict[str, Any],
                       why: str) -> None:
        self.errors.append(f"{key}: {why}")
        self.finished[key] = 128
        t = now()
        self._patch_status(key, {
            "phase": "Failed", "startTime": t, "conditions": self._conditions(ready=False),
            "containerStatuses": [{"name": container["name"], "image": container.get("image", ""),
                                   "imageID": "", "ready": False, "restartCount": 0,
                                   "state": {"terminated": {
                                       "exitCode": 128, "reason": "StartError", "message": why,
                                       "startedAt": t, "finishedAt": t}}}],
        })

    @staticmethod
    def _conditions(ready: bool) -> list[dict[str, Any]]:
        t = now()
        status = "True" if ready else "False"
        return [{"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
                {"type": "Initialized", "status": "True", "lastTransitionTime": t},
                {"type": "ContainersReady", "status": status, "lastTransitionTime": t},
                {"type": "Ready", "status": status, "lastTransitionTime": t}]

    def _patch_status(self, key: str, status: dict[str, Any]) -> None:
        ns, name = key.split("/", 1)
        try:
            self.api.merge_patch(f"/api/v1/namespaces/{ns}/pods/{name}/status",
                                 {"status": status})
        except ApiError as exc:
            if exc.status != 404:  # a pod deleted meanwhile needs no status
                raise

    @staticmethod
    def _kill(run: Run) -> None:
        if run.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.proc.pid, signal.SIGKILL)
        run.proc.wait(timeout=30)

