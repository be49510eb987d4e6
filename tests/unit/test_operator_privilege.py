"""Least privilege: what a spec may make the operator do (leanserve.operator.privilege).

Each refusal is a condition Ready=False, reason Forbidden, naming the field, and the plan makes
nothing; job and serving pods carry no ServiceAccount token; the namespaced overlay renders with
no cluster-scoped RBAC.
"""

from __future__ import annotations

import http.server
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from leanserve.api.spec import Toleration
from leanserve.operator import access, builders, planner, privilege
from leanserve.operator.autoscale import step
from leanserve.operator.constants import MonitorKind
from leanserve.operator.errors import OperatorError
from leanserve.operator.planner import Observed, Resource
from leanserve.operator.settings import (
    DEFAULT_PROMETHEUS_URL,
    OperatorSettings,
    PolicySettings,
    load_settings,
)
from tests.unit.test_operator_builders import OWNER, spec_of
from tests.unit.test_operator_planner import NOW, PROFILE, compressed_status, conds

ROOT = Path(__file__).resolve().parents[2]
S = OperatorSettings()
LABEL = {"leanserve.io/allow-reference": "true"}
CPU_POOL = {"name": "cpu", "nodeSelector": {"pool": "cpu"}, "hourlyPrice": 0.1}


def plan(spec: Any, observed: Observed = Observed(), settings: OperatorSettings = S,
         status: dict[str, Any] | None = None) -> planner.Desired:
    return planner.plan(Resource(OWNER, 2, spec, (), status or {}), observed, NOW, settings)


def forbidden(d: planner.Desired) -> str:
    """Ready's message when the plan is refused; asserts nothing is made."""
    assert conds(d)["Ready"] == ("False", "Forbidden")
    assert d.status["phase"] == "Failed"
    assert d.job is None and d.job_owned == [] and d.apply == [] and d.delete == []
    return next(c["message"] for c in d.status["conditions"] if c["type"] == "Ready")


def allowed(d: planner.Desired) -> None:
    assert conds(d)["Ready"][1] != "Forbidden"
    assert d.job is not None or d.apply


# ------------------------------------------------------------------------------ images


def test_the_operators_own_images_and_the_stock_default_are_allowed() -> None:
    allowed(plan(spec_of()))  # the schema's default runs as the operator's serving.image
    allowed(plan(spec_of(serving={"image": S.serving.image})))
    allowed(plan(spec_of(serving={"image": S.job.image})))


def test_an_image_outside_the_allowed_list_is_refused_and_named() -> None:
    message = forbidden(plan(spec_of(serving={"image": "evil/img:1"})))
    assert message.startswith("spec.serving.image: 'evil/img:1' is not in the operator's "
                              "allowed images/registries (")
    assert S.serving.image in message
    # After a recorded artifact too: no Deployment for the refused image.
    d = plan(spec_of(serving={"image": "evil/img:1"}), status=compressed_status())
    forbidden(d)


def test_a_registry_prefix_allows_everything_under_it_and_nothing_beside() -> None:
    s = replace(S, policy=PolicySettings(images=("ghcr.io/leanserve/", "nvcr.io/x/y:1")))
    allowed(plan(spec_of(serving={"image": "ghcr.io/leanserve/other:2"}), settings=s))
    allowed(plan(spec_of(serving={"image": "nvcr.io/x/y:1"}), settings=s))
    for image in ("ghcr.io/leanserve-evil/x:1", "ghcr.io/other/x:1", "nvcr.io/x/y:2"):
        assert "spec.serving.image" in forbidden(plan(spec_of(serving={"image": image}),
                                                      settings=s))


# ------------------------------------------------------------------------- tolerations


def pools_with(*tolerations: dict[str, Any]) -> list[dict[str, Any]]:
    return [{**CPU_POOL, "tolerations": list(tolerations)}]


@pytest.mark.parametrize("toleration", [
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"},
    {"key": "nvidia.com/gpu", "effect": "NoSchedule", "tolerationSeconds": 30},
])
def test_the_gpu_taint_is_allowed_by_default(toleration: dict[str, Any]) -> None:
    allowed(plan(spec_of(nodePools=pools_with(toleration))))


@pytest.mark.parametrize("toleration", [
    {"operator": "Exists"},  # every taint
    {"operator": "Exists", "effect": "NoSchedule"},  # every key
    {"key": "nvidia.com/gpu", "operator": "Exists"},  # every effect of the key
    {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists",
     "effect": "NoSchedule"},
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute"},
])
def test_a_toleration_wider_than_the_allowed_ones_is_refused(toleration: dict[str, Any]) -> None:
    spec = spec_of(nodePools=[CPU_POOL, {**CPU_POOL, "name": "b", "tolerations": [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}, toleration]}])
    message = forbidden(plan(spec))
    assert message.startswith("spec.nodePools[1].tolerations[1]: {")
    assert "is not an allowed toleration (allowed: {key: nvidia.com/gpu, effect: NoSchedule}" \
        in message


def test_an_admin_may_allow_a_wildcard_or_one_value_explicitly() -> None:
    s = load_settings({"LEANSERVE_OPERATOR_ALLOWED_TOLERATIONS":
                       '[{"operator": "Exists"}, {"key": "team", "value": "ml"}]'})
    allowed(plan(spec_of(nodePools=pools_with({"operator": "Exists"})), settings=s))
    allowed(plan(spec_of(nodePools=pools_with({"key": "team", "value": "ml"})), settings=s))
    only_value = load_settings({"LEANSERVE_OPERATOR_ALLOWED_TOLERATIONS":
                                '[{"key": "team", "value": "ml"}]'})
    for t in ({"key": "team", "operator": "Exists"}, {"key": "team", "value": "ops"}):
        forbidden(plan(spec_of(nodePools=pools_with(t)), settings=only_value))
    none = load_settings({"LEANSERVE_OPERATOR_ALLOWED_TOLERATIONS": "[]"})
    assert "(allowed: none;" in forbidden(plan(spec_of(), settings=none))


def test_toleration_matching_is_no_wider_than_the_entry() -> None:
    entry = {"key": "k", "effect": "NoSchedule"}
    assert privilege.toleration_allowed(Toleration(key="k", effect="NoSchedule"), entry)
    assert not privilege.toleration_allowed(Toleration(key="k"), entry)
    assert not privilege.toleration_allowed(Toleration(operator="Exists"), entry)
    assert privilege.toleration_allowed(Toleration(operator="Exists"), {"operator": "Exists"})


# ----------------------------------------------------------------------------- secrets


def test_a_secret_is_referenced_only_with_the_opt_in_label() -> None:
    spec = spec_of(artifacts={"uri": "pvc://store/out", "secretName": "creds"})
    unlabelled = forbidden(plan(spec, Observed(secrets={"creds": {"team": "ml"}})))
    assert unlabelled.startswith("spec.artifacts.secretName: Secret 'creds' does not carry "
                                 'label leanserve.io/allow-reference: "true"')
    assert "does not exist" in forbidden(plan(spec, Observed(secrets={"creds": None})))
    assert "could not be checked" in forbidden(plan(spec))
    wrong = forbidden(plan(spec, Observed(secrets={"creds": {
        "leanserve.io/allow-reference": "yes"}})))
    assert "does not carry label" in wrong
    allowed(plan(spec, Observed(secrets={"creds": LABEL})))


def test_only_named_secrets_are_looked_up() -> None:
    assert privilege.secret_refs(spec_of()) == []
    assert privilege.secret_refs(spec_of(artifacts={"uri": "pvc://s/o", "secretName": "c"})) \
        == [("spec.artifacts.secretName", "c")]


# ------------------------------------------------------------------------- prometheus


def test_only_allowed_prometheus_urls() -> None:
    allowed(plan(spec_of(autoscaling={"prometheusUrl": DEFAULT_PROMETHEUS_URL + "/"})))
    refused = plan(spec_of(autoscaling={"prometheusUrl": "http://10.0.0.1:9090"}))
    message = forbidden(refused)
    assert conds(refused)["Autoscaling"] == ("False", "Forbidden")  # it cannot act either
    assert message == ("spec.autoscaling.prometheusUrl: 'http://10.0.0.1:9090' is not in the "
                       f"operator's allowed Prometheus URLs ({DEFAULT_PROMETHEUS_URL}); the "
                       "operator sends no request to it")
    s = load_settings({"LEANSERVE_OPERATOR_ALLOWED_PROMETHEUS_URLS":
                       "http://prom.a:9090, http://prom.b:9090/"})
    assert s.policy.prometheus_urls == ("http://prom.a:9090", "http://prom.b:9090/")
    allowed(plan(spec_of(autoscaling={"prometheusUrl": "http://prom.b:9090"}), settings=s))


class _Witness(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self) -> None:
        self.seen.append(self.path)
        self.send_response(500)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def witness() -> Iterator[str]:
    """An HTTP server that records every request it gets; its URL."""
    _Witness.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Witness)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_the_autoscaler_sends_nothing_to_a_url_not_allowed(witness: str) -> None:
    wire = spec_of().to_wire()
    wire["autoscaling"] = {**wire.get("autoscaling", {}), "prometheusUrl": witness}
    body = {"apiVersion": "leanserve.io/v1alpha1", "kind": "CompressedModel",
            "metadata": {"name": OWNER.name, "namespace": OWNER.namespace, "uid": OWNER.uid},
            "spec": wire, "status": {"phase": "Serving", "compression": {"pools": PROFILE}}}
    rt = SimpleNamespace(settings=S)  # no API client: the step must stop before any request
    with pytest.raises(OperatorError, match=r"^spec\.autoscaling\.prometheusUrl: 'http://127"):
        step(body, rt, None, None)  # type: ignore[arg-type]
    assert _Witness.seen == []


def test_settings_refuse_malformed_tolerations() -> None:
    with pytest.raises(OperatorError, match="ALLOWED_TOLERATIONS"):
        load_settings({"LEANSERVE_OPERATOR_ALLOWED_TOLERATIONS": '[{"key": "k", "x": "y"}]'})
    with pytest.raises(OperatorError, match="JSON array of objects"):
        load_settings({"LEANSERVE_OPERATOR_ALLOWED_TOLERATIONS": '{"key": "k"}'})
    s = load_settings({"LEANSERVE_OPERATOR_ALLOWED_IMAGES": "ghcr.io/a/, b/c:1"})
    assert s.policy.images == ("ghcr.io/a/", "b/c:1")


def test_the_deployment_sets_every_policy_setting_with_its_default() -> None:
    dep = yaml.safe_load((ROOT / "deploy" / "operator" / "deployment.yaml").read_text())
    env = {e["name"]: e.get("value") for e in
           dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert load_settings({k: v for k, v in env.items() if v is not None}).policy == \
        OperatorSettings().policy
    for name in ("ALLOWED_IMAGES", "ALLOWED_TOLERATIONS", "ALLOWED_PROMETHEUS_URLS"):
        assert "LEANSERVE_OPERATOR_" + name in env


# ------------------------------------------------------------------- pods and RBAC


def test_job_and_serving_pods_mount_no_service_account_token() -> None:
    spec = spec_of()
    jp = builders.job_plan(OWNER, spec)
    job = builders.build_job(OWNER, spec, jp, S)
    assert job["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    for pool in spec.node_pools:
        d = builders.build_deployment(OWNER, spec, pool, artifact_uri="pvc://m/r",
                                      artifact_sha="x", replicas=1, monitor=MonitorKind.NONE,
                                      settings=S)
        assert d["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def render(path: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_the_namespaced_overlay_has_no_cluster_rbac() -> None:
    docs = render(ROOT / "deploy" / "operator-namespaced")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["Namespace", "CustomResourceDefinition", "ServiceAccount", "Role",
                            "RoleBinding", "Role", "RoleBinding", "Deployment", "Service"])
    assert not [k for k in kinds if k.startswith("Cluster")]
    ns = next(d for d in docs if d["kind"] == "Namespace")["metadata"]["name"]
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
    grants = {(g, r, v) for rule in roles["leanserve-operator"]["rules"]
              for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert grants == access.triples(access.NAMESPACED_RULES)
    assert ("apiextensions.k8s.io", "customresourcedefinitions", "list") not in grants
    for d in docs:
        if d["kind"] in ("Role", "RoleBinding", "Deployment", "ServiceAccount", "Service"):
            assert d["metadata"]["namespace"] == ns
    binding = next(d for d in docs if d["kind"] == "RoleBinding" and
                   d["metadata"]["name"] == "leanserve-operator")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "leanserve-operator"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "leanserve-operator",
                                    "namespace": ns}]
    ctr = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"][0]
    assert ctr["command"] == ["leanserve", "operator"]
    assert ctr["args"] == ["--namespace=$(POD_NAMESPACE)"]
    env = {e["name"]: e for e in ctr["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
