"""The operator's lifecycle on the real control plane with a model small enough to run often.

examples/digits-cnn.yaml's CNN (trained by examples/digits/train.py into a claim, seconds) with
its power-of-two candidate: each compression Job really runs ``leanserve compress`` through the
kubelet runner in a few seconds. Covered: a Job whose pod fails (the real Job controller's
backoff, then Failed with the pod's last log lines in status, and no re-run), an operator killed
with SIGKILL at each step and restarted (no duplicate child, same objects), and spec edits of
two kinds (a compression change runs a new Job; a pool change only updates the Deployment).
Every operator runs with its ServiceAccount's token; any 403 fails the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from clusterlib import (
    ROOT,
    OperatorProcess,
    get_json,
    install_crd,
    install_operator,
    pv_and_claim,
    python_env,
    service_account_kubeconfig,
    wait_for,
)
from kubeapi import Api
from kubelet_runner import KubeletRunner

MODEL = "leanserve.io/model"


#: Training epochs of the digits CNN here (train.py's default is 30): these tests need a
#: model the operator compresses, not its best accuracy. Deterministic: 0.970 held-out
#: accuracy at 8 epochs and the power-of-two candidate keeps all of it (at 5 it drops 4 points).
DIGITS_EPOCHS = 10


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model.pt and data.npz of examples/digits, made by its train.py (deterministic)."""
    out = tmp_path_factory.mktemp("digits")
    subprocess.run([sys.executable, str(ROOT / "examples" / "digits" / "train.py"), "--out",
                    str(out), "--epochs", str(DIGITS_EPOCHS)], check=True, env=python_env(),
                   capture_output=True)
    return out


@pytest.fixture(scope="module")
def sa_kubeconfig(control_plane: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    install_crd(control_plane)
    install_operator(control_plane)
    return service_account_kubeconfig(
        control_plane, tmp_path_factory.mktemp("sa") / "kubeconfig")


@pytest.fixture
def ns(control_plane: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    name = "lc-" + request.node.name.removeprefix("test_").replace("_", "-")[:40].strip("-")
    control_plane.kubectl("create", "namespace", name)
    wait_for(lambda: control_plane.kubectl("get", "sa", "default", "-n", name,
                                           check=False).returncode == 0, 30, "default SA")
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def models(control_plane: Any, ns: str, digits_files: Path, tmp_path: Path) -> Path:
    """Claim "models" of the test's namespace, holding digits/model.pt and digits/data.npz."""
    root = tmp_path / "models"
    (root / "digits").mkdir(parents=True)
    for f in ("model.pt", "data.npz"):
        (root / "digits" / f).write_bytes((digits_files / f).read_bytes())
    pv_and_claim(control_plane, ns, "models", root)
    return root


@pytest.fixture
def runner(control_plane: Any, ns: str, models: Path, tmp_path: Path
           ) -> Iterator[KubeletRunner]:
    api = Api(control_plane.server, control_plane.dir / "pki")
    with KubeletRunner(api, {"models": models}, tmp_path / "pods",
                       namespaces=frozenset({ns})) as r:
        yield r


class Operators:
    """Operators started one after another (each killed or stopped); all logs checked."""

    def __init__(self, kubeconfig: Path, logs: Path) -> None:
        self.kubeconfig, self.logs, self.all = kubeconfig, logs, []  # type: ignore[var-annotated]

    def start(self) -> OperatorProcess:
        # Restarts and edits: the Jobs need not profile (test_operator_e2e.py's does).
        op = OperatorProcess(self.kubeconfig, self.logs / f"operator-{len(self.all)}.log",
                             LEANSERVE_OPERATOR_JOB_PROFILE="false")
        self.all.append(op)
        return op

    def kill(self, op: OperatorProcess) -> None:
        """SIGKILL: no cleanup, no last status write (what a node failure does)."""
        os.killpg(op.proc.pid, signal.SIGKILL)
        op.proc.wait(timeout=10)

    def check(self) -> None:
        for op in self.all:
            forbidden = op.forbidden()
            assert not forbidden, f"{op.log.name}: the API server refused the operator:\n" + \
                "\n".join(forbidden)

    def stop(self) -> None:
        for op in self.all:
            op.stop()


@pytest.fixture
def operators(sa_kubeconfig: Path, tmp_path: Path) -> Iterator[Operators]:
    ops = Operators(sa_kubeconfig, tmp_path)
    try:
        yield ops
    finally:
        ops.stop()
        for op in ops.all:
            print(f"--- {op.log.name}\n{op.text()[-3000:]}")


def digits(ns: str, *, data: str = "pvc://models/digits/data.npz", candidate: str = "pow2",
           cpu: str = "1") -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "examples" / "digits-cnn.yaml").read_text())
    doc["metadata"] = {"name": "digits", "namespace": ns}
    spec = doc["spec"]
    spec["model"]["uri"] = "pvc://models/digits/model.pt"
    spec["data"]["uri"] = data
    spec["compression"]["candidates"] = [{"name": candidate, "steps": [
        {"quantize": {"method": "power-of-two"}}]}]
    spec["nodePools"] = [{"name": "cpu-small", "nodeSelector": {"leanserve.io/pool": "cpu-small"},
                          "resources": {"requests": {"cpu": cpu, "memory": "1Gi"}},
                          "hourlyPrice": 0.05}]
    return doc


def status(cp: Any, ns: str) -> dict[str, Any]:
    return (get_json(cp, "cmod", "digits", "-n", ns) or {}).get("status") or {}


def children(cp: Any, ns: str) -> dict[str, list[str]]:
    """kind -> uids of the model's children (sorted)."""
    out = {}
    for kind in ("jobs", "configmaps", "deployments", "services", "pdb"):
        items = get_json(cp, kind, "-n", ns, "-l", f"{MODEL}=digits")["items"]
        out[kind] = sorted(i["metadata"]["uid"] for i in items)
    return out


def wait_phase(cp: Any, ns: str, phase: str, timeout: float = 120,
               operators: Operators | None = None) -> dict[str, Any]:
    def probe() -> Any:
        if operators is not None:
            operators.check()  # a refused operator never gets there: fail now, say why
        s = status(cp, ns)
        return s.get("phase") == phase and s

    return wait_for(probe, timeout, f"phase {phase}")


def test_failed_job_reports_the_pods_last_lines_and_is_not_rerun(
        control_plane: Any, ns: str, runner: KubeletRunner, operators: Operators) -> None:
    cp = control_plane
    operators.start()
    cp.kubectl("apply", "-f", "-",
               input=json.dumps(digits(ns, data="pvc://models/digits/missing.npz")))
    st = wait_phase(cp, ns, "Failed", timeout=180, operators=operators)
    (job,) = get_json(cp, "jobs", "-n", ns, "-l", f"{MODEL}=digits")["items"]
    failed = [c for c in job["status"]["conditions"] if c["type"] == "Failed"]
    assert failed and failed[0]["status"] == "True"
    # The real Job controller retried backoffLimit (1) times: two pods ran and failed.
    codes = [c for k, c in runner.finished.items() if k.startswith(f"{ns}/")]
    assert len(codes) == 2 and all(c != 0 for c in codes), runner.finished
    compressed = next(c for c in st["conditions"] if c["type"] == "Compressed")
    assert (compressed["status"], compressed["reason"]) == ("False", "JobFailed")
    assert "missing.npz" in compressed["message"], compressed["message"]
    time.sleep(8)  # four resyncs: the failed recipe is not run again
    assert len(get_json(cp, "jobs", "-n", ns, "-l", f"{MODEL}=digits")["items"]) == 1
    assert len(runner.finished) == len(codes) + sum(
        1 for k in runner.finished if not k.startswith(f"{ns}/"))
    assert status(cp, ns)["phase"] == "Failed"
    assert not runner.errors, runner.errors
    operators.check()


def test_operator_killed_at_each_step_makes_no_duplicate(
        control_plane: Any, ns: str, models: Path, sa_kubeconfig: Path, tmp_path: Path,
        operators: Operators) -> None:
    cp = control_plane
    api = Api(cp.server, cp.dir / "pki")
    op = operators.start()
    cp.kubectl("apply", "-f", "-", input=json.dumps(digits(ns)))
    # Step 1: killed once the Job exists, before its pod ran (no kubelet runner yet).
    wait_for(lambda: children(cp, ns)["jobs"], 60, "the Job")
    wait_phase(cp, ns, "Compressing", operators=operators)
    operators.kill(op)
    first = children(cp, ns)
    op = operators.start()
    time.sleep(6)
    assert children(cp, ns) == first, "a restarted operator re-created a child"
    # Step 2: the Job completes while no operator runs; the next one picks it up.
    operators.kill(op)
    with KubeletRunner(api, {"models": models}, tmp_path / "pods",
                       namespaces=frozenset({ns})) as runner:
        cp.kubectl("wait", f"job/{get_json(cp, 'jobs', '-n', ns)['items'][0]['metadata']['name']}",
                   "-n", ns, "--for=condition=Complete", "--timeout=120s")
        assert not runner.errors, runner.errors
    op = operators.start()
    st = wait_phase(cp, ns, "Serving", operators=operators)
    serving = children(cp, ns)
    assert len(serving["jobs"]) == 1 and serving["jobs"] == first["jobs"]
    assert len(serving["deployments"]) == 1 and len(serving["services"]) == 1
    assert len(serving["pdb"]) == 1
    # Step 3: killed while Serving; the next one changes nothing.
    operators.kill(op)
    operators.start()
    time.sleep(6)
    assert children(cp, ns) == serving
    assert status(cp, ns)["phase"] == "Serving"
    assert status(cp, ns)["artifact"] == st["artifact"]
    operators.check()


def test_spec_edits_compression_runs_a_new_job_pool_change_updates_the_deployment(
        control_plane: Any, ns: str, runner: KubeletRunner, operators: Operators) -> None:
    cp = control_plane
    operators.start()
    cp.kubectl("apply", "-f", "-", input=json.dumps(digits(ns)))
    first = wait_phase(cp, ns, "Serving", timeout=180, operators=operators)
    jobs = children(cp, ns)["jobs"]
    (dep,) = get_json(cp, "deployments", "-n", ns, "-l", f"{MODEL}=digits")["items"]

    # A pool edit: the Deployment's pods ask for 2 CPUs; no new compression.
    cp.kubectl("apply", "-f", "-", input=json.dumps(digits(ns, cpu="2")))

    def resized() -> bool:
        d = get_json(cp, "deployment", dep["metadata"]["name"], "-n", ns)
        ctr = d["spec"]["template"]["spec"]["containers"][0]
        return ctr["resources"]["requests"]["cpu"] == "2"

    wait_for(resized, 60, "the Deployment's new CPU request")
    assert children(cp, ns)["jobs"] == jobs
    wait_phase(cp, ns, "Serving", operators=operators)

    # A compression edit (the candidate's name is part of the recipe): a new Job runs.
    cp.kubectl("apply", "-f", "-", input=json.dumps(digits(ns, cpu="2", candidate="pow2-b")))
    st = wait_for(lambda: (s := status(cp, ns)).get("phase") == "Serving"
                  and (s.get("compression") or {}).get("selected") == "pow2-b" and s,
                  180, "pow2-b selected and Serving")
    assert st["recipe"]["hash"] != first["recipe"]["hash"]
    new_jobs = get_json(cp, "jobs", "-n", ns, "-l", f"{MODEL}=digits")["items"]
    assert any(j["metadata"]["labels"]["leanserve.io/recipe-hash"] == st["recipe"]["hash"]
               for j in new_jobs)
    assert len(children(cp, ns)["deployments"]) == 1
    assert not runner.errors, runner.errors
    operators.check()
