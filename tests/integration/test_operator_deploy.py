"""deploy/operator renders with kubectl kustomize and validates; the Argo CD Lua runs in lua5.4."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LUA = ROOT / "deploy" / "argocd" / "health.lua"


def test_kustomize_renders_and_every_object_validates() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    def render(path: Path) -> list[dict[str, Any]]:
        out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        return [d for d in yaml.safe_load_all(out) if d]
    base = ["Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole",
            "ClusterRoleBinding", "Role", "RoleBinding", "Deployment", "Service"]
    # The base applies on any cluster; the ServiceMonitor (a Prometheus Operator CRD kind,
    # which `kubectl apply` refuses where that CRD is missing) is its own overlay.
    assert sorted(d["kind"] for d in render(ROOT / "deploy" / "operator")) == sorted(base)
    docs = render(ROOT / "deploy" / "operator-with-servicemonitor")
    assert sorted(d["kind"] for d in docs) == sorted([*base, "ServiceMonitor"])
    for d in docs:
        if d["kind"] == "ServiceMonitor":  # a CRD kind: structural checks only
            assert d["apiVersion"] == "monitoring.coreos.com/v1"
            assert d["spec"]["endpoints"][0]["port"] == "metrics"
            continue
        kubernetes_validate.validate(d, "1.30.0", strict=True)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    ctr = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert ctr["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(v.get("emptyDir") is not None for v in pod["volumes"])
    assert ctr["livenessProbe"]["httpGet"]["path"] == "/healthz"
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    verbs = {(r["apiGroups"][0], res): set(r["verbs"]) for r in role["rules"]
             for res in r["resources"]}
    # Jobs are made by server-side apply and never deleted by the operator (the TTL
    # controller and the garbage collector do); exactness is test_operator_access.py's.
    assert verbs[("batch", "jobs")] == {"get", "list", "watch", "create", "patch"}
    assert verbs[("apps", "deployments/scale")] == {"patch"}
    assert all("*" not in v for v in verbs.values())
    leader = next(d for d in docs if d["kind"] == "Role")
    assert leader["metadata"]["namespace"] == "leanserve-system"
    assert leader["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                                "verbs": ["get", "create", "update"]}]
    env = {e["name"]: e for e in ctr["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert dep["spec"]["replicas"] == 2  # safe: only the Lease holder acts
    crd = next(d for d in docs if d["kind"] == "CustomResourceDefinition")
    conditions = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][
        "status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "type" in conditions["items"]["required"]


def test_argocd_configmap_embeds_the_tested_lua() -> None:
    cm = yaml.safe_load((ROOT / "deploy" / "argocd" / "argocd-cm.yaml").read_text())
    embedded = cm["data"]["resource.customizations.health.leanserve.io_CompressedModel"]
    assert embedded.strip() == LUA.read_text().strip()


def lua_literal(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"[{lua_literal(k)}] = {lua_literal(x)}" for k, x in v.items()) \
            + "}"
    if isinstance(v, list):
        return "{" + ", ".join(lua_literal(x) for x in v) + "}"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if v is None:
        return "nil"
    escaped = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") \
        .replace("\r", "\\r")
    return '"' + escaped + '"'


def argocd_health(obj: dict[str, Any]) -> tuple[str, str]:
    """(status, message) of deploy/argocd/health.lua for ``obj``, run by lua5.4 as Argo CD runs
    it (skips the test without a Lua interpreter)."""
    lua = shutil.which("lua5.4") or shutil.which("lua")
    if lua is None:
        pytest.skip("no Lua interpreter (scripts/setup.sh installs lua5.4)")
    script = f"local function health(obj)\n{LUA.read_text()}\nend\n" \
             f"local hs = health({lua_literal(obj)})\nio.write(hs.status, '|', hs.message)\n"
    out = subprocess.run([lua, "-"], input=script, capture_output=True, text=True, timeout=10,
                         check=True).stdout
    status, message = out.split("|", 1)
    return status, message


def cm(phase: str | None, ready: tuple[str, str] | None, gen: int = 1,
       observed: int = 1, kstatus: str = "") -> dict[str, Any]:
    """kstatus: "Reconciling" or "Stalled", True, with Ready's reason and message."""
    obj: dict[str, Any] = {"metadata": {"name": "m", "generation": gen}}
    if phase is not None:
        obj["status"] = {"phase": phase, "observedGeneration": observed, "conditions": [
            {"type": "Compressed", "status": "True", "reason": "Compressed", "message": "ok"}]}
        if kstatus and ready:
            obj["status"]["conditions"].append({"type": kstatus, "status": "True",
                                                "reason": ready[1], "message": "msg " + ready[1]})
        if ready:
            obj["status"]["conditions"].append({"type": "Ready", "status": ready[0],
                                                "reason": ready[1], "message": "msg " + ready[1]})
    return obj


@pytest.mark.parametrize(("obj", "health"), [
    (cm(None, None), "Progressing"),
    (cm("Pending", None), "Progressing"),
    (cm("Compressing", ("False", "Compressing")), "Progressing"),
    (cm("Deploying", ("False", "RollingOut")), "Progressing"),
    (cm("Serving", ("True", "Serving")), "Healthy"),
    (cm("Serving", ("True", "Serving"), gen=2, observed=1), "Progressing"),
    (cm("Degraded", ("False", "ReplicasUnavailable")), "Degraded"),
    (cm("Failed", ("False", "JobFailed")), "Degraded"),
    (cm("Failed", ("False", "InvalidSpec")), "Degraded"),
    # with the kstatus conditions the operator writes (tests/unit/test_operator_planner.py)
    (cm("Compressing", ("False", "Compressing"), kstatus="Reconciling"), "Progressing"),
    (cm("Compressing", ("False", "JobNotStarting"), kstatus="Stalled"), "Degraded"),
    (cm("Serving", ("False", "APIRefused"), kstatus="Stalled"), "Degraded"),
    (cm("Failed", ("False", "NoCandidatePassed"), kstatus="Stalled"), "Degraded"),
    (cm("Degraded", ("False", "ReplicasUnavailable"), kstatus="Reconciling"), "Degraded"),
    (cm("Serving", ("True", "Serving"), kstatus="Reconciling"), "Healthy"),
    (cm("Pending", None, gen=1, observed=0), "Progressing"),  # the CRD's status default
])
def test_argocd_health_lua(obj: dict[str, Any], health: str) -> None:
    status, message = argocd_health(obj)
    assert status == health
    assert message  # Argo CD shows it; never empty
    if obj.get("status", {}).get("conditions", [{}])[-1].get("type") == "Ready" and \
            obj["metadata"]["generation"] == obj["status"]["observedGeneration"]:
        assert message.startswith("msg ")
