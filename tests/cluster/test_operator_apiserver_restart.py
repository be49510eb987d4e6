"""The API server restarted mid-reconcile (issue 17): no duplicate child, no lost status.

kube-apiserver is SIGKILLed (a crash: no graceful shutdown, requests in flight cut) while the
operator is creating the compression Jobs of several models, and again while it creates their
serving children, then started again with its own command line (etcd keeps the data). The
operator, with its ServiceAccount token, must come back by itself: one Job and one Deployment
per model, every model Serving with its whole status, each phase transition announced once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from clusterlib import (
    OperatorProcess,
    finish_job_pod,
    wait_for,
)
from kubeapi import Api

from leanserve.operator import handback

GROUP_PATH = "/apis/leanserve.io/v1alpha1"
MODELS = ("r0", "r1", "r2", "r3")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state == "Z"


def restart_apiserver(cp: Any, delay: float = 0.0) -> float:
    """SIGKILL kube-apiserver, start it again as `control-plane.sh up` did; seconds it was away.

    The new process is recorded in DIR/pids in place of the old one, so `down` stops it; it is
    started detached (as `up` starts it), so init reaps it.
    """
    pids = cp.dir / "pids"
    lines = pids.read_text().splitlines()
    index, pid = next((i, int(ln.split()[0])) for i, ln in enumerate(lines)
                      if ln.split()[1:] == ["kube-apiserver"])
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    assert any(str(cp.dir).encode() in a for a in argv), "not this control plane's API server"
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: _gone(pid), 20, "kube-apiserver to exit", interval=0.05)
    time.sleep(delay)
    log = cp.dir / "kube-apiserver.log"
    for _ in range(20):
        out = subprocess.run(
            ["bash", "-c", 'log="$1"; shift; setsid "$@" >> "$log" 2>&1 < /dev/null & echo $!',
             "restart", str(log), *[a.decode() for a in argv]],
            capture_output=True, text=True, check=True, timeout=10)
        new = int(out.stdout.strip())
        lines[index] = f"{new} kube-apiserver"
        pids.write_text("\n".join(lines) + "\n")
        # The port may be taken for a moment: the clients of the dead server retry connecting
        # to it from ephemeral ports, and a loopback connect can meet itself (TCP
        # simultaneous open) on exactly that port. Then the new server exits; start it again.
        if wait_for(lambda: _gone(new) or cp.kubectl(  # noqa: B023 (called in the loop)
                "get", "--raw=/readyz", check=False, timeout=10).returncode == 0,
                60, "kube-apiserver /readyz after the restart", interval=0.2) and \
                not _gone(new):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"kube-apiserver did not start again; see {log}")
    away = time.monotonic() - t0
    # Ready, yet each resource's storage may still be (re)initializing (429) for a moment.
    wait_for(lambda: cp.kubectl("get", "-A", "compressedmodels,jobs,pods,deployments,events",
                                check=False, timeout=10).returncode == 0, 60,
             "the API server's storage after the restart", interval=0.2)
    return away


def model(name: str, ns: str) -> dict[str, Any]:
    return {
        "apiVersion": "leanserve.io/v1alpha1", "kind": "CompressedModel",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "model": {"uri": "pvc://models/minilm", "format": "huggingface",
                      "task": "feature-extraction"},
            "data": {"uri": "pvc://models/data/sentences.jsonl"},
            "compression": {"candidates": [
                {"name": "int8", "steps": [{"quantize": {"method": "int8-dynamic"}}]}]},
            "nodePools": [{"name": "cpu-small",
                           "nodeSelector": {"leanserve.io/pool": "cpu-small"},
                           "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
                           "hourlyPrice": 0.1}],
            "slo": {"latencyP95Ms": 50},
            "autoscaling": {"minReplicas": 1, "maxReplicas": 2},
        },
    }


def items(api: Api, path: str) -> list[dict[str, Any]]:
    return list(api.get(path)["items"])


def test_operator_recovers_from_api_server_restarts_mid_reconcile(
        control_plane: Any, operator_kubeconfig: Path, ns: str, tmp_path: Path) -> None:
    api = Api(control_plane.server, control_plane.dir / "pki")
    with OperatorProcess(operator_kubeconfig, tmp_path / "operator.log",
                         LEANSERVE_OPERATOR_RETRY_SECONDS="2") as op:
        try:
            # kopf logs in once this process holds the leader Lease (one an operator killed
            # by an earlier test holds expires within its duration).
            wait_for(lambda: "Initial authentication has finished" in op.text() or
                     not op.alive(), 60, "the operator to start")
            assert op.alive()
            time.sleep(1)
            # Crash 1: while the Jobs (and their ConfigMaps, Events, status) are being made.
            control_plane.kubectl("apply", "-f", "-", input=json.dumps(
                {"apiVersion": "v1", "kind": "List", "items": [model(m, ns) for m in MODELS]}))
            time.sleep(0.3)
            away = restart_apiserver(control_plane)
            assert away < 30
            job_path = f"/apis/batch/v1/namespaces/{ns}/jobs"
            jobs = wait_for(lambda: len(j := items(api, job_path)) >= len(MODELS) and j, 120,
                            "a Job per model after the restart")
            by_model = {j["metadata"]["labels"]["leanserve.io/model"]: j["metadata"]["name"]
                        for j in jobs}
            assert sorted(by_model) == sorted(MODELS) and len(jobs) == len(MODELS)

            # Crash 2: while the serving children and the Deploying status are being made.
            report = {"metric": "cosine", "selected": "int8", "baseline": {"quality": 1.0},
                      "candidates": [{"name": "int8", "passed": True, "quality": 0.995}]}
            for name, job in by_model.items():
                uri = f"pvc://models/leanserve/{name}/{job.rsplit('-', 1)[1]}/model_repository"
                finish_job_pod(api, ns, job, handback.encode(handback.summarize(
                    report, uri, "c" * 64)), timeout=90)
            time.sleep(0.2)
            restart_apiserver(control_plane, delay=1.0)

            def all_serving() -> bool:
                got = items(api, f"{GROUP_PATH}/namespaces/{ns}/compressedmodels")
                return len(got) == len(MODELS) and all(
                    (m.get("status") or {}).get("phase") == "Serving" for m in got)
            wait_for(all_serving, 180, "every model Serving after the restarts")
            time.sleep(6)  # three resyncs: nothing more appears
            assert op.alive(), "the operator exited"

            assert sorted(j["metadata"]["name"] for j in items(api, job_path)) == \
                sorted(by_model.values())  # no second Job
            deployments = items(api, f"/apis/apps/v1/namespaces/{ns}/deployments")
            assert sorted(d["metadata"]["name"] for d in deployments) == \
                sorted(f"{m}-cpu-small" for m in MODELS)
            assert all(d["spec"]["replicas"] == 1 for d in deployments)
            events = items(api, f"/api/v1/namespaces/{ns}/events")
            for m in items(api, f"{GROUP_PATH}/namespaces/{ns}/compressedmodels"):
                name, st = m["metadata"]["name"], m["status"]
                assert st["observedGeneration"] == m["metadata"]["generation"]
                assert st["recipe"]["job"] == by_model[name]
                assert st["recipe"]["outcome"] == "Compressed"
                assert st["compression"]["selected"] == "int8"
                assert st["artifact"]["sha256"] == "c" * 64
                assert st["serving"]["pool"] == "cpu-small"
                assert {c["type"]: c["status"] for c in st["conditions"]} == {
                    "Ready": "True", "Compressed": "True", "Deployed": "True",
                    "SLOMet": "Unknown", "BudgetMet": "True",
                    "Autoscaling": "False"}  # no profile in these reports: NoProfile
                transitions = sorted(e["message"].split(":")[0] for e in events
                                     if e["involvedObject"]["name"] == name and
                                     " -> " in e["message"].split(":")[0])
                assert transitions == sorted(["Pending -> Compressing",
                                              "Compressing -> Deploying",
                                              "Deploying -> Serving"]), (name, transitions)
        finally:
            print(op.text()[-4000:])
        # No RBAC check here: a restarted kube-apiserver answers /readyz before its RBAC
        # authorizer has caught up, and refuses (403) for a moment; the operator retries.
        assert "Traceback" not in op.text()
