"""Least privilege on the real control plane (issue 17): what a spec may make the operator do.

The operator runs with its ServiceAccount's own token and deploy/operator's RBAC (any RBAC 403
fails). One model asks for a disallowed image, a toleration of every taint, a Secret without
the opt-in label and a Prometheus URL not in the operator's list: the status names each field
(Ready=False, reason Forbidden), a Warning Event says so, and no Job or Deployment is made. Then
the same model with the Secret labelled and allowed values compresses, serves, and its
autoscaler queries the allowed Prometheus URL; edited to another URL, it is refused again and
that URL never receives a request. Two loopback HTTP servers stand in for the two Prometheus
URLs and record what reaches them.

deploy/operator-namespaced's RBAC (a Role, no ClusterRole) is applied in a fresh namespace and
the operator runs there with `--namespace` and that ServiceAccount's token: it compresses a
model of its namespace with no 403, and leaves a model of another namespace alone.
"""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from clusterlib import (
    OperatorProcess,
    finish_job_pod,
    service_account_kubeconfig,
    wait_for,
)
from kubeapi import Api

from leanserve.operator import handback

ROOT = Path(__file__).resolve().parents[2]
GROUP_PATH = "/apis/leanserve.io/v1alpha1"
ALLOW = "leanserve.io/allow-reference"


class Recorder:
    """A loopback HTTP server that answers 503 and records the path of every request."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        seen = self.paths

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append(self.path)
                self.send_response(503)
                self.end_headers()

            do_POST = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Recorder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def model(ns: str, *, image: str | None, toleration: dict[str, Any], url: str) -> dict[str, Any]:
    serving = {"image": image} if image else {}
    return {
        "apiVersion": "leanserve.io/v1alpha1", "kind": "CompressedModel",
        "metadata": {"name": "priv", "namespace": ns},
        "spec": {
            "model": {"uri": "pvc://models/minilm", "format": "huggingface",
                      "task": "feature-extraction"},
            "data": {"uri": "pvc://models/data/sentences.jsonl"},
            "artifacts": {"secretName": "creds"},
            "compression": {"candidates": [
                {"name": "int8", "steps": [{"quantize": {"method": "int8-dynamic"}}]}]},
            "serving": serving,
            "nodePools": [{"name": "cpu-small",
                           "nodeSelector": {"leanserve.io/pool": "cpu-small"},
                           "tolerations": [toleration],
                           "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
                           "hourlyPrice": 0.1}],
            "slo": {"latencyP95Ms": 50},
            "autoscaling": {"minReplicas": 1, "maxReplicas": 2, "intervalSeconds": 1,
                            "prometheusUrl": url},
        },
    }


def cmod(api: Api, ns: str) -> dict[str, Any] | None:
    return api.get_or_none(f"{GROUP_PATH}/namespaces/{ns}/compressedmodels/priv")


def ready(obj: dict[str, Any] | None) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == "Ready":
            return dict(c)
    return {}


def children(api: Api, ns: str) -> dict[str, list[str]]:
    return {kind: [o["metadata"]["name"] for o in api.get(path)["items"]]
            for kind, path in (("Job", f"/apis/batch/v1/namespaces/{ns}/jobs"),
                               ("Deployment", f"/apis/apps/v1/namespaces/{ns}/deployments"),
                               ("ConfigMap", f"/api/v1/namespaces/{ns}/configmaps"))}


def exported(op: OperatorProcess, name: str, **labels: str) -> float | None:
    """One sample of the operator's /metrics (None: not exported)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{op.metrics_port}/metrics",
                                  timeout=5).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def test_refused_fields_are_named_nothing_is_made_and_allowed_values_work(
        control_plane: Any, operator_kubeconfig: Path, ns: str, tmp_path: Path) -> None:
    api = Api(control_plane.server, control_plane.dir / "pki")
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds",
                                                                 "namespace": ns},
              "stringData": {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}}
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(secret))
    with Recorder() as allowed, Recorder() as other, OperatorProcess(
            operator_kubeconfig, tmp_path / "operator.log",
            LEANSERVE_OPERATOR_RETRY_SECONDS="2",
            LEANSERVE_OPERATOR_ALLOWED_PROMETHEUS_URLS=allowed.url) as op:
        try:
            # Everything refused at once: each field named, nothing made.
            control_plane.kubectl("apply", "-f", "-", input=json.dumps(model(
                ns, image="evil.example/img:1", toleration={"operator": "Exists"},
                url=other.url)))
            refused = wait_for(lambda: ready(cmod(api, ns)).get("reason") == "Forbidden" and
                               cmod(api, ns), 60, "Ready=False reason Forbidden")
            message = ready(refused)["message"]
            assert ready(refused)["status"] == "False"
            assert refused["status"]["phase"] == "Failed"
            for field in ("spec.serving.image: 'evil.example/img:1' is not in the operator's "
                          "allowed images/registries",
                          "spec.nodePools[0].tolerations[0]: {operator: Exists} is not an "
                          "allowed toleration",
                          "spec.artifacts.secretName: Secret 'creds' does not carry label "
                          f'{ALLOW}: "true"',
                          f"spec.autoscaling.prometheusUrl: '{other.url}' is not in the "
                          "operator's allowed Prometheus URLs"):
                assert field in message, (field, message)
            events = api.get(f"/api/v1/namespaces/{ns}/events")["items"]
            assert any(e["reason"] == "Forbidden" and e["type"] == "Warning" for e in events)
            time.sleep(6)  # three resyncs: still nothing
            assert children(api, ns) == {"Job": [], "Deployment": [],
                                         "ConfigMap": ["kube-root-ca.crt"]}

            # The Secret alone opted in: the other three are still refused.
            control_plane.kubectl("label", "secret", "creds", "-n", ns, f"{ALLOW}=true")
            wait_for(lambda: "secretName" not in ready(cmod(api, ns)).get("message", "x"),
                     60, "the labelled Secret to be accepted")
            assert ready(cmod(api, ns))["reason"] == "Forbidden"
            assert children(api, ns)["Job"] == []

            # Allowed values: the default image (served as the operator's serving image), the
            # GPU taint, the allowed Prometheus URL.
            control_plane.kubectl("apply", "-f", "-", input=json.dumps(model(
                ns, image=None, url=allowed.url,
                toleration={"key": "nvidia.com/gpu", "operator": "Exists",
                            "effect": "NoSchedule"})))
            job = wait_for(lambda: children(api, ns)["Job"], 60, "the compression Job")[0]
            report = {"metric": "cosine", "selected": "int8", "baseline": {"quality": 1.0},
                      "candidates": [{"name": "int8", "passed": True, "quality": 0.995}]}
            uri = f"pvc://models/leanserve/priv/{job.rsplit('-', 1)[1]}/model_repository"
            pod = finish_job_pod(api, ns, job, handback.encode(handback.summarize(
                report, uri, "c" * 64, {"pools": {"cpu-small": {
                    "capacity_rps": 50.0, "cost_per_million_requests": 0.6,
                    "measured": True}}})))
            pod_spec = api.get(f"/api/v1/namespaces/{ns}/pods/{pod}")["spec"]
            assert pod_spec["automountServiceAccountToken"] is False
            assert not any(v.get("projected") for v in pod_spec.get("volumes") or [])  # no token
            serving = wait_for(lambda: (m := cmod(api, ns)) and
                               m["status"].get("phase") == "Serving" and m, 120,
                               "phase Serving")
            assert ready(serving)["reason"] == "Serving"
            pod = api.get(f"/apis/apps/v1/namespaces/{ns}/deployments/priv-cpu-small")[
                "spec"]["template"]["spec"]
            assert pod["automountServiceAccountToken"] is False
            assert pod["containers"][0]["image"] == "ghcr.io/leanserve/serving:24.08-py3"
            assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
            wait_for(lambda: allowed.paths, 30, "the autoscaler's query of the allowed URL")
            assert all(p.startswith("/api/v1/") for p in allowed.paths), allowed.paths
            # the operator exports its step's decision (Prometheus answered 503: held, no
            # metrics) under the model's namespace and name (issue 15)
            held = wait_for(lambda: exported(op, "leanserve_decisions_total", namespace=ns,
                                             model="priv", code="MetricsUnavailable"), 30,
                            "the decision in the operator's metrics")
            assert held >= 1
            assert exported(op, "leanserve_metrics_available", namespace=ns,
                            model="priv") == 0.0
            assert exported(op, "leanserve_desired_replicas", namespace=ns, model="priv",
                            pool="cpu-small") == 1.0

            # Another URL: refused before any request; serving children are left as they were.
            control_plane.kubectl("patch", "cmod", "priv", "-n", ns, "--type=merge", "-p",
                                  json.dumps({"spec": {"autoscaling": {
                                      "prometheusUrl": other.url}}}))
            wait_for(lambda: ready(cmod(api, ns)).get("reason") == "Forbidden", 60,
                     "Forbidden for the new URL")
            assert "spec.autoscaling.prometheusUrl" in ready(cmod(api, ns))["message"]
            time.sleep(4)  # four autoscaling intervals
            assert other.paths == []
            assert children(api, ns)["Job"] == [job]  # no second Job
        finally:
            print(op.text()[-3000:])
        assert [ln for ln in op.forbidden() if " cannot " in ln] == [], \
            "the operator was refused by its own RBAC"


def test_the_namespaced_overlay_is_all_the_operator_needs_in_its_namespace(
        control_plane: Any, operator_kubeconfig: Path, ns: str, tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl") or str(control_plane.bin / "kubectl")
    rendered = subprocess.run([kubectl, "kustomize", str(ROOT / "deploy" / "operator-namespaced")],
                              capture_output=True, text=True, timeout=60, check=True).stdout
    # The overlay's RBAC, moved into this test's namespace (its ServiceAccount then has no
    # grant anywhere else: the base's ClusterRoleBinding names leanserve-system's).
    text = rendered.replace("leanserve-system", ns)
    objs = [d for d in yaml.safe_load_all(text) if d and d["kind"] in (
        "ServiceAccount", "Role", "RoleBinding")]
    assert sorted(d["kind"] for d in objs) == ["Role", "Role", "RoleBinding", "RoleBinding",
                                               "ServiceAccount"]
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "List", "items": objs}))
    other = f"{ns}-other"
    control_plane.kubectl("create", "namespace", other)
    try:
        kubeconfig = service_account_kubeconfig(control_plane, tmp_path / "kubeconfig",
                                                namespace=ns)
        api = Api(control_plane.server, control_plane.dir / "pki")
        allowed = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        good = model(ns, image=None, toleration=allowed,
                     url="http://prometheus-operated.monitoring:9090")
        good["spec"].pop("artifacts")
        elsewhere = json.loads(json.dumps(good).replace(f'"{ns}"', f'"{other}"'))
        with OperatorProcess(kubeconfig, tmp_path / "operator.log", args=("--namespace", ns),
                             LEANSERVE_OPERATOR_LEASE_NAMESPACE=ns) as op:
            try:
                for obj in (good, elsewhere):
                    control_plane.kubectl("apply", "-f", "-", input=json.dumps(obj))
                wait_for(lambda: children(api, ns)["Job"], 60, "the Job in the namespace")
                compressing = wait_for(lambda: (m := cmod(api, ns)) and
                                       ready(m).get("reason") == "Compressing" and m, 60,
                                       "Ready reason Compressing")
                assert compressing["status"]["phase"] == "Compressing"
                time.sleep(4)  # two resyncs
                assert children(api, other)["Job"] == []
                # only the CRD's default status: the operator wrote nothing there
                assert (api.get(f"{GROUP_PATH}/namespaces/{other}/compressedmodels/priv")
                        .get("status")) == {"phase": "Pending", "observedGeneration": 0}
                assert op.alive()
            finally:
                print(op.text()[-3000:])
            assert op.forbidden() == [], "the namespaced operator was refused"
    finally:
        control_plane.kubectl("delete", "namespace", other, "--timeout=120s", check=False,
                              timeout=150)
