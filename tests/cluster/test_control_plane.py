"""The control plane itself: fake nodes and pools, kwok's pod lifecycle, the kubelet runner.

These pin what the operator's end-to-end tests stand on: kwok makes serving pods Ready but
never touches a Job's pods, and the kubelet runner really runs a Job pod's command and reports
its exit code and termination message so the real Job controller completes or fails the Job.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from clusterlib import get_json, pv_and_claim, wait_for
from kubeapi import Api
from kubelet_runner import KubeletRunner

POOL = "leanserve.io/pool"


def test_nodes_are_ready_with_the_example_pools(control_plane: Any) -> None:
    nodes = get_json(control_plane, "nodes")["items"]
    by_name = {n["metadata"]["name"]: n for n in nodes}
    assert set(by_name) == {"cpu-small", "cpu-large", "gpu"}
    for name, node in by_name.items():
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True", name
        assert node["metadata"]["labels"][POOL] == name
        assert not node["spec"].get("taints"), f"{name} is tainted: {node['spec']['taints']}"
    assert by_name["gpu"]["status"]["allocatable"]["nvidia.com/gpu"] == "1"
    # Each node fits its example pool's maxReplicas (examples/minilm-cpu.yaml: 4 x 2 / 8 CPU).
    assert int(by_name["cpu-small"]["status"]["allocatable"]["cpu"]) >= 4 * 2
    assert int(by_name["cpu-large"]["status"]["allocatable"]["cpu"]) >= 4 * 8
    assert control_plane.startup_seconds < 60, control_plane.startup_seconds


def _deployment(name: str, ns: str) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}}, "spec": {
                         "nodeSelector": {POOL: "cpu-small"},
                         "containers": [{"name": "c", "image": "example.invalid/none:1",
                                         "resources": {"requests": {"cpu": "1"}}}]}}}}


def _job(name: str, ns: str, script: str, labels: dict[str, str],
         volumes: list[dict[str, Any]] | None = None,
         mounts: list[dict[str, Any]] | None = None, env: list[dict[str, Any]] | None = None
         ) -> dict[str, Any]:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": ns},
            "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": labels}, "spec": {
                "restartPolicy": "Never", "volumes": volumes or [],
                "containers": [{"name": "main", "image": "example.invalid/none:1",
                                "command": ["python", "-c", script], "env": env or [],
                                "volumeMounts": mounts or [],
                                "terminationMessagePath": "/dev/termination-log",
                                "terminationMessagePolicy": "FallbackToLogsOnError"}]}}}}


@pytest.fixture
def namespace(control_plane: Any, request: pytest.FixtureRequest) -> Any:
    ns = request.node.name.replace("_", "-")[:50].strip("-")
    control_plane.kubectl("create", "namespace", ns)
    wait_for(lambda: control_plane.kubectl("get", "sa", "default", "-n", ns,
                                           check=False).returncode == 0, 30, "default SA")
    yield ns
    control_plane.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_kwok_makes_serving_pods_ready_and_leaves_job_pods_alone(control_plane: Any,
                                                                 namespace: str) -> None:
    cp = control_plane
    cp.kubectl("apply", "-f", "-", input=json.dumps(_deployment("web", namespace)))
    cp.kubectl("apply", "-f", "-", input=json.dumps(_job("plain", namespace, "pass", {})))
    cp.kubectl("rollout", "status", "deployment/web", "-n", namespace, "--timeout=60s")
    pods = get_json(cp, "pods", "-n", namespace, "-l", "app=web")["items"]
    assert len(pods) == 2
    assert all(p["spec"]["nodeName"] == "cpu-small" and p["status"]["phase"] == "Running"
               for p in pods)
    job_pod = wait_for(lambda: [p for p in get_json(cp, "pods", "-n", namespace, "-l",
                                                    "job-name=plain")["items"]
                                if p["spec"].get("nodeName")], 30, "the Job's pod bound")[0]
    time.sleep(3)  # kwok would have made it Running by now
    job_pod = get_json(cp, "pod", "-n", namespace, job_pod["metadata"]["name"])
    assert job_pod["status"]["phase"] == "Pending"
    assert not job_pod["status"].get("containerStatuses")


def test_kubelet_runner_runs_job_pods_and_reports_like_a_kubelet(
        control_plane: Any, namespace: str, tmp_path: Path) -> None:
    cp = control_plane
    store = tmp_path / "store"
    store.mkdir()
    (store / "in.txt").write_text("hello")
    labels = {"app.kubernetes.io/managed-by": "leanserve",
              "app.kubernetes.io/component": "compression"}
    pv_and_claim(cp, namespace, "data", store)
    ok = ("import os,pathlib,yaml\n"
          "uri = yaml.safe_load(open('/spec/spec.yaml'))['uri'].removeprefix('file://')\n"
          "text = pathlib.Path(uri).read_text()\n"
          "pathlib.Path(os.environ['OUT']).write_text(text + os.environ['GREETING'])\n"
          "open('/dev/termination-log', 'w').write('done:' + os.environ['POD'])\n")
    volumes = [{"name": "s", "persistentVolumeClaim": {"claimName": "data"}},
               {"name": "spec", "configMap": {"name": "conf"}}]
    mounts = [{"name": "s", "mountPath": "/stores/data"},
              {"name": "spec", "mountPath": "/spec"}]
    env = [{"name": "OUT", "value": "/stores/data/out.txt"},
           {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "conf",
                                                                  "key": "GREETING"}}}]
    fail = "import sys\nprint('line one')\nprint('the last line')\nsys.exit(3)\n"
    api = Api(cp.server, cp.dir / "pki")
    with KubeletRunner(api, {"data": store}, tmp_path / "pods") as runner:
        cp.kubectl("apply", "-f", "-", input=json.dumps(
            _job("ok", namespace, ok, labels, volumes, mounts, env)))
        cp.kubectl("apply", "-f", "-", input=json.dumps(_job("bad", namespace, fail, labels)))
        # the ConfigMap "ok" reads comes after its pod is bound (the operator applies a Job's
        # ConfigMap just after the Job): the pod waits for it, as with a kubelet
        wait_for(lambda: runner.waiting, 60, "the ok pod waiting for its ConfigMap")
        cp.kubectl("create", "configmap", "conf", "-n", namespace,
                   "--from-literal=spec.yaml=uri: file:///stores/data/in.txt\n",
                   "--from-literal=GREETING=hi")
        cp.kubectl("wait", "job/ok", "-n", namespace, "--for=condition=Complete",
                   "--timeout=60s")
        cp.kubectl("wait", "job/bad", "-n", namespace, "--for=condition=Failed",
                   "--timeout=60s")
        assert not runner.errors, runner.errors
        assert not runner.waiting, runner.waiting
    assert (store / "out.txt").read_text() == "hellohi"
    (ok_pod,) = get_json(cp, "pods", "-n", namespace, "-l", "job-name=ok")["items"]
    term = ok_pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (ok_pod["status"]["phase"], term["exitCode"], term["reason"]) == (
        "Succeeded", 0, "Completed")
    assert term["message"] == f"done:{ok_pod['metadata']['name']}"
    (bad_pod,) = get_json(cp, "pods", "-n", namespace, "-l", "job-name=bad")["items"]
    term = bad_pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (bad_pod["status"]["phase"], term["exitCode"]) == ("Failed", 3)
    assert term["message"].splitlines()[-1] == "the last line"  # FallbackToLogsOnError


def test_a_job_pod_runs_the_leanserve_of_the_tree_under_test(tmp_path: Path) -> None:
    """The venv's editable install may point at another clone (the last one set up): the
    image's leanserve must be this tree's, as the operator under test is."""
    import os
    import subprocess
    import sys

    runner = KubeletRunner(None, {}, tmp_path)  # type: ignore[arg-type]  # no API call here
    pod = {"metadata": {"name": "p", "namespace": "ns"}, "spec": {}}
    env = runner._env("ns", pod, {"env": [{"name": "X", "value": "1"}]}, lambda v: v)
    root = Path(__file__).resolve().parents[2]
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(root) and env["X"] == "1"
    found = subprocess.run([sys.executable, "-c", "import leanserve; print(leanserve.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert Path(found.stdout.strip()).parent == root / "leanserve", found.stdout
