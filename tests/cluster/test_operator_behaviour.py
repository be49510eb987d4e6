"""The operator's behaviour against the real API server and controllers (issue 14).

What only a real kube-apiserver and kube-controller-manager can show: server-side apply's field
ownership and removal, RBAC with the operator ServiceAccount's own token (any 403 fails), the
garbage collector and ownerReferences, quota refusals, the CRD's list-map, the Lease. The test
plays the kubelet for the compression Job's pod (kwok leaves Job pods alone): it reports the pod
terminated with the termination message the Job's container would leave, exactly as the kubelet
runner does for real runs (test_operator_e2e.py runs `leanserve compress` itself).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from clusterlib import (
    OperatorProcess,
    delete_namespace,
    install_crd,
    install_operator,
    kstatus,
    pv_and_claim,
    service_account_kubeconfig,
    wait_for,
)
from kubeapi import Api, ApiError

from leanserve.operator import handback

GROUP_PATH = "/apis/leanserve.io/v1alpha1"
FAST = {"LEANSERVE_OPERATOR_RETRY_SECONDS": "2", "LEANSERVE_OPERATOR_LEASE_SECONDS": "6",
        # The models here tolerate a dedicated-node taint, which the operator allows only when
        # told (its default: the GPU taint alone).
        "LEANSERVE_OPERATOR_ALLOWED_TOLERATIONS":
            '[{"key": "example.com/dedicated", "effect": "NoSchedule"}]'}


@pytest.fixture(scope="module")
def installed(control_plane: Any) -> Any:
    install_crd(control_plane)
    proc = install_operator(control_plane)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def operator_kubeconfig(control_plane: Any, installed: Any,
                        tmp_path_factory: pytest.TempPathFactory) -> Path:
    return service_account_kubeconfig(
        control_plane, tmp_path_factory.mktemp("operator") / "kubeconfig")


@pytest.fixture
def api(control_plane: Any) -> Api:
    return Api(control_plane.server, control_plane.dir / "pki")


@pytest.fixture
def ns(control_plane: Any, installed: Any, tmp_path: Path) -> Iterator[str]:
    """A namespace with the claim `models` bound (the Job and serving pods mount it)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", name)
    store = tmp_path / "store"
    store.mkdir()
    pv_and_claim(control_plane, name, "models", store)
    yield name
    delete_namespace(control_plane, name)


@pytest.fixture
def operator(operator_kubeconfig: Path, tmp_path: Path) -> Iterator[OperatorProcess]:
    with OperatorProcess(operator_kubeconfig, tmp_path / "operator.log", **FAST) as op:
        yield op
    print(op.text()[-3000:])
    assert rbac_refusals(op) == [], "the operator was refused by its own RBAC"


def rbac_refusals(op: OperatorProcess) -> list[str]:
    """403s from RBAC (the authorizer's 'User ... cannot VERB resource'), not admission's."""
    return [ln for ln in op.forbidden() if " cannot " in ln and "resource" in ln]


def model(name: str, ns: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": {"uri": "pvc://models/minilm", "format": "huggingface",
                  "task": "feature-extraction"},
        "data": {"uri": "pvc://models/data/sentences.jsonl"},
        "compression": {"candidates": [
            {"name": "int8", "steps": [{"quantize": {"method": "int8-dynamic"}}]}]},
        "quality": {"metric": "cosine", "maxDrop": 0.02},
        "nodePools": [{"name": "cpu-small", "nodeSelector": {"leanserve.io/pool": "cpu-small"},
                       "tolerations": [{"key": "example.com/dedicated", "operator": "Exists",
                                        "effect": "NoSchedule"}],
                       "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
                       "hourlyPrice": 0.1}],
        "slo": {"latencyP95Ms": 50},
        "autoscaling": {"minReplicas": 1, "maxReplicas": 2},
    }
    body.update(spec)
    return {"apiVersion": "leanserve.io/v1alpha1", "kind": "CompressedModel",
            "metadata": {"name": name, "namespace": ns}, "spec": body}


def apply(cp: Any, obj: dict[str, Any]) -> None:
    cp.kubectl("apply", "-f", "-", input=json.dumps(obj))


def cmod(api: Api, ns: str, name: str) -> dict[str, Any] | None:
    return api.get_or_none(f"{GROUP_PATH}/namespaces/{ns}/compressedmodels/{name}")


def condition(obj: dict[str, Any] | None, ctype: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == ctype:
            return dict(c)
    return {}


def jobs(api: Api, ns: str) -> list[dict[str, Any]]:
    return list(api.get(f"/apis/batch/v1/namespaces/{ns}/jobs")["items"])


def summary(selected: str | None, uri: str) -> str:
    report = {"metric": "cosine", "selected": selected, "baseline": {"quality": 1.0},
              "candidates": [{"name": "int8", "passed": selected is not None,
                              "quality": 0.9 if selected is None else 0.995,
                              "quality_drop": 0.1 if selected is None else 0.005}]}
    return handback.encode(handback.summarize(report, uri, "c" * 64 if selected else ""))


def finish_pod(api: Api, ns: str, job: str, message: str, code: int = 0) -> str:
    """Play the kubelet: the Job's pod ran and terminated with ``message``."""
    def scheduled() -> dict[str, Any] | None:
        pods = api.get(f"/api/v1/namespaces/{ns}/pods", labelSelector=f"job-name={job}")
        fresh = [p for p in pods["items"] if (p.get("spec") or {}).get("nodeName")
                 and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
        return fresh[0] if fresh else None
    pod = wait_for(scheduled, 60, f"a scheduled pod of Job {job}")
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    name = pod["metadata"]["name"]
    api.merge_patch(f"/api/v1/namespaces/{ns}/pods/{name}/status", {"status": {
        "phase": "Succeeded" if code == 0 else "Failed", "startTime": now,
        "containerStatuses": [{
            "name": "compress", "ready": False, "restartCount": 0, "started": False,
            "image": pod["spec"]["containers"][0]["image"], "imageID": "",
            "state": {"terminated": {"exitCode": code, "reason": "Completed" if code == 0
                                     else "Error", "message": message, "startedAt": now,
                                     "finishedAt": now}}}]}})
    return name


def scrape(op: OperatorProcess, metric: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{op.metrics_port}/metrics",
                                  timeout=5).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(metric) + (r"\{" + re.escape(want) + r"\}" if want else "") + \
        r" ([0-9.e+]+)"
    found = re.search(pattern, text)
    return float(found[1]) if found else 0.0


# -------------------------------------------------------------------------------- tests


def test_no_candidate_stays_failed_with_the_report_even_after_the_job_is_gone(
        control_plane: Any, api: Api, ns: str, operator: OperatorProcess) -> None:
    """Items 3, 4, 12, 15: NoCandidatePassed is final for the recipe; deleting the Job (as the
    TTL controller does after a week) makes no new one; the garbage collector takes the Job's
    ConfigMap with it; only the retry annotation runs the recipe again. Conditions are a
    list-map (the server refuses two of one type) and the printer columns show the status."""
    apply(control_plane, model("nocand", ns))
    job = wait_for(lambda: jobs(api, ns), 60, "the compression Job")[0]
    name = job["metadata"]["name"]
    spec_cm = wait_for(lambda: api.get_or_none(f"/api/v1/namespaces/{ns}/configmaps/{name}"),
                       30, "the Job's spec ConfigMap")
    assert spec_cm["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    finish_pod(api, ns, name, summary(None, ""))
    failed = wait_for(lambda: (m := cmod(api, ns, "nocand")) and
                      m["status"].get("phase") == "Failed" and m, 60, "phase Failed")
    assert condition(failed, "Ready")["reason"] == "NoCandidatePassed"
    assert failed["status"]["recipe"]["outcome"] == "NoCandidatePassed"
    assert failed["status"]["compression"]["candidates"][0]["name"] == "int8"
    assert failed["status"]["compression"].get("selected") is None  # null: absent
    assert kstatus(failed)["conditions"] == ["Stalled=True/NoCandidatePassed"]  # kstatus Failed

    # The TTL controller's deletion, done now: background propagation, as it does.
    api.request("DELETE", f"/apis/batch/v1/namespaces/{ns}/jobs/{name}",
                {"kind": "DeleteOptions", "apiVersion": "v1",
                 "propagationPolicy": "Background"})
    wait_for(lambda: api.get_or_none(f"/api/v1/namespaces/{ns}/configmaps/{name}") is None,
             60, "the garbage collector to delete the Job's ConfigMap")
    time.sleep(6)  # three resyncs (2 s each)
    assert jobs(api, ns) == []
    after = cmod(api, ns, "nocand")
    assert after is not None and after["status"]["phase"] == "Failed"
    assert condition(after, "Compressed")["reason"] == "NoCandidatePassed"

    cols = control_plane.kubectl("get", "cmod", "nocand", "-n", ns, "--no-headers").stdout
    assert cols.split()[:2] == ["nocand", "Failed"]

    with pytest.raises(ApiError) as refused:  # the list-map: one condition per type
        api.merge_patch(f"{GROUP_PATH}/namespaces/{ns}/compressedmodels/nocand/status",
                        {"status": {"conditions": [
                            {"type": "Ready", "status": "True"},
                            {"type": "Ready", "status": "False"}]}})
    assert refused.value.status == 422 and "Duplicate" in refused.value.body

    control_plane.kubectl("annotate", "cmod", "nocand", "-n", ns, "leanserve.io/retry=1")
    retried = wait_for(lambda: jobs(api, ns), 60, "the retried Job")
    assert retried[0]["metadata"]["name"].startswith(name + "-")


def test_children_by_server_side_apply_one_manager_no_steady_state_writes(
        control_plane: Any, api: Api, ns: str, operator: OperatorProcess) -> None:
    """Item 5: every child is created by one apply PATCH of manager `leanserve` (no POST, so
    no second manager owns what a create set); a field the operator stops setting is removed
    by the server; in the steady state the operator writes nothing. Item 12: a Deployment's
    readiness is read only when its controller has observed the current generation."""
    apply(control_plane, model("ssa", ns))
    job = wait_for(lambda: jobs(api, ns), 60, "the compression Job")[0]
    name = job["metadata"]["name"]
    uri = f"pvc://models/leanserve/ssa/{name.rsplit('-', 1)[1]}/model_repository"
    finish_pod(api, ns, name, summary("int8", uri))
    wait_for(lambda: (m := cmod(api, ns, "ssa")) and m["status"].get("phase") == "Serving",
             120, "phase Serving")

    path = f"/apis/apps/v1/namespaces/{ns}/deployments/ssa-cpu-small"
    for obj in (api.get(path), api.get(f"/api/v1/namespaces/{ns}/services/ssa"),
                api.get(f"/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets/ssa"),
                api.get(f"/apis/batch/v1/namespaces/{ns}/jobs/{name}")):
        spec_managers = {(m["manager"], m["operation"]) for m in obj["metadata"]["managedFields"]
                         if not m.get("subresource")}
        assert spec_managers == {("leanserve", "Apply")}, (obj["kind"], spec_managers)

    time.sleep(2)  # the reconciles the last transition's own events start
    writes = {m: scrape(operator, "leanserve_operator_api_writes", method=m)
              for m in ("PATCH", "POST")}
    assert writes["PATCH"] > 0
    time.sleep(10)  # five resyncs
    assert {m: scrape(operator, "leanserve_operator_api_writes", method=m)
            for m in ("PATCH", "POST")} == writes, "the steady state wrote"

    # The pool's tolerations leave the spec: the server removes them from the Deployment.
    assert api.get(path)["spec"]["template"]["spec"]["tolerations"]
    cm = cmod(api, ns, "ssa")
    assert cm is not None
    pools = cm["spec"]["nodePools"]
    pools[0].pop("tolerations")
    api.merge_patch(f"{GROUP_PATH}/namespaces/{ns}/compressedmodels/ssa",
                    {"spec": {"nodePools": pools}})
    wait_for(lambda: not api.get(path)["spec"]["template"]["spec"].get("tolerations"), 60,
             "the tolerations to be removed from the Deployment")
    d = api.get(path)
    assert d["metadata"]["generation"] >= 2
    wait_for(lambda: (m := cmod(api, ns, "ssa")) and m["status"].get("phase") == "Serving"
             and m["status"]["observedGeneration"] == m["metadata"]["generation"], 120,
             "Serving again after the rollout")


def test_deletion_needs_no_operator_and_the_garbage_collector_takes_the_children(
        control_plane: Any, api: Api, ns: str, operator: OperatorProcess) -> None:
    """Item 7: no finalizer on the CompressedModel; with the operator stopped, deleting it
    completes at once and the garbage collector removes every child through ownerReferences."""
    apply(control_plane, model("gone", ns))
    job = wait_for(lambda: jobs(api, ns), 60, "the compression Job")[0]
    wait_for(lambda: api.get_or_none(
        f"/api/v1/namespaces/{ns}/configmaps/{job['metadata']['name']}"), 30, "the ConfigMap")
    cm = cmod(api, ns, "gone")
    assert cm is not None and not cm["metadata"].get("finalizers")
    operator.stop()
    control_plane.kubectl("delete", "cmod", "gone", "-n", ns, "--timeout=20s")
    wait_for(lambda: jobs(api, ns) == [], 60, "the garbage collector to delete the Job")
    wait_for(lambda: not [c for c in api.get(f"/api/v1/namespaces/{ns}/configmaps")["items"]
                          if c["metadata"]["name"].startswith("gone-")], 60,
             "the garbage collector to delete the Job's ConfigMap")


def test_an_admission_refusal_reaches_status_with_the_servers_message(
        control_plane: Any, api: Api, ns: str, operator: OperatorProcess) -> None:
    """Item 8: admission refuses the Job (a ValidatingAdmissionPolicy, the in-process kind of
    a webhook's denial); the model's Ready condition says APIRefused with the server's words
    and an Event says it once; when the policy goes, the retry (every 2 s here) passes."""
    policy = f"no-jobs-{ns}"
    apply(control_plane, {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": policy},
        "spec": {"failurePolicy": "Fail",
                 "matchConstraints": {"resourceRules": [{
                     "apiGroups": ["batch"], "apiVersions": ["v1"],
                     "operations": ["CREATE", "UPDATE"], "resources": ["jobs"]}]},
                 "validations": [{"expression": "false",
                                  "message": "compression is paused here (policy no-jobs)"}]}})
    apply(control_plane, {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding", "metadata": {"name": policy},
        "spec": {"policyName": policy, "validationActions": ["Deny"],
                 "matchResources": {"namespaceSelector": {"matchLabels": {
                     "kubernetes.io/metadata.name": ns}}}}})
    try:
        time.sleep(3)  # the API server loads the policy
        apply(control_plane, model("refused", ns))
        refused = wait_for(lambda: condition(cmod(api, ns, "refused"), "Ready").get("reason")
                           == "APIRefused" and cmod(api, ns, "refused"), 60,
                           "Ready=APIRefused")
        message = condition(refused, "Ready")["message"]
        assert "compression is paused here (policy no-jobs)" in message, message
        assert jobs(api, ns) == []
        events = [e for e in api.get(f"/api/v1/namespaces/{ns}/events")["items"]
                  if e["reason"] == "APIRefused"]
        assert len(events) == 1 and "policy no-jobs" in events[0]["message"]
        verdict = kstatus(refused)  # Stalled: Flux's health check fails without a timeout
        assert verdict["status"] == "Failed" and "policy no-jobs" in verdict["message"]
    finally:
        control_plane.kubectl("delete", "validatingadmissionpolicybinding", policy,
                              check=False)
        control_plane.kubectl("delete", "validatingadmissionpolicy", policy, check=False)
    wait_for(lambda: jobs(api, ns), 60, "the Job once the policy is gone")
    wait_for(lambda: condition(cmod(api, ns, "refused"), "Ready").get("reason")
             == "Compressing", 30, "Ready back to Compressing")
    assert kstatus(cmod(api, ns, "refused"))["conditions"] == [  # type: ignore[arg-type]
        "Reconciling=True/Compressing"]  # Stalled gone with the refusal


def test_a_quota_refusal_reaches_status_with_the_servers_message(
        control_plane: Any, api: Api, ns: str, operator_kubeconfig: Path,
        tmp_path: Path) -> None:
    """Item 8: a ResourceQuota (usage computed by the resourcequota controller) leaves room for
    one Job and 1 CPU of requests; the compression pod asks for 2. The first model's Job is
    made but its pod is refused: after the start bound (3 s here) the Compressed condition says
    JobNotStarting with the Job controller's Event, carrying the API server's "exceeded quota".
    The second model's Job itself is refused: Ready=False APIRefused with the server's message.
    """
    control_plane.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "small",
                                                                    "namespace": ns},
        "spec": {"hard": {"count/jobs.batch": "1", "requests.cpu": "1"}}}))
    wait_for(lambda: ((api.get(f"/api/v1/namespaces/{ns}/resourcequotas/small").get("status")
                       or {}).get("used") or {}).get("count/jobs.batch") == "0", 30,
             "the quota's usage, computed by the resourcequota controller")
    with OperatorProcess(operator_kubeconfig, tmp_path / "quota.log",
                         LEANSERVE_OPERATOR_JOB_START_TIMEOUT_SECONDS="3", **FAST) as op:
        apply(control_plane, model("first", ns))
        wait_for(lambda: jobs(api, ns), 60, "the first model's Job")
        stuck = wait_for(lambda: condition(cmod(api, ns, "first"), "Compressed").get("reason")
                         == "JobNotStarting" and cmod(api, ns, "first"), 60,
                         "Compressed=JobNotStarting")
        message = condition(stuck, "Compressed")["message"]
        print(f"Compressed: JobNotStarting: {message}")
        assert "exceeded quota: small" in message and "requests.cpu" in message, message
        assert kstatus(stuck)["conditions"] == ["Stalled=True/JobNotStarting"]
        apply(control_plane, model("second", ns))
        refused = wait_for(lambda: condition(cmod(api, ns, "second"), "Ready").get("reason")
                           == "APIRefused" and cmod(api, ns, "second"), 60, "Ready=APIRefused")
        message = condition(refused, "Ready")["message"]
        print(f"Ready: APIRefused: {message}")
        assert "exceeded quota: small" in message and "count/jobs.batch" in message, message
        assert kstatus(refused)["conditions"] == ["Stalled=True/APIRefused"]
        assert len(jobs(api, ns)) == 1
        assert rbac_refusals(op) == []


def test_two_replicas_never_both_act(control_plane: Any, api: Api, ns: str,
                                     operator_kubeconfig: Path, tmp_path: Path) -> None:
    """Item 13: two operators with the Lease; one acts, the other waits and takes over only
    after the first stops; the Lease names the holder."""
    lease_path = "/apis/coordination.k8s.io/v1/namespaces/leanserve-system/leases/" \
                 "leanserve-operator"
    with OperatorProcess(operator_kubeconfig, tmp_path / "a.log", POD_NAME="op-a",
                         **FAST) as a:
        wait_for(lambda: ((api.get_or_none(lease_path) or {}).get("spec") or {}).get(
            "holderIdentity") == "op-a", 60, "op-a to hold the Lease")
        with OperatorProcess(operator_kubeconfig, tmp_path / "b.log", POD_NAME="op-b",
                             **FAST) as b:
            apply(control_plane, model("leader", ns))
            wait_for(lambda: jobs(api, ns), 60, "the Job")
            time.sleep(6)
            assert api.get(lease_path)["spec"]["holderIdentity"] == "op-a"
            assert scrape(a, "leanserve_operator_jobs_created_total") == 1
            with pytest.raises(OSError):  # b has not started acting: no metrics served yet
                scrape(b, "leanserve_operator_jobs_created_total")
            a.stop()
            # op-a gave the Lease up on SIGTERM (else op-b waits a whole lease duration)
            assert a.proc.returncode == 0
            assert api.get(lease_path)["spec"]["holderIdentity"] in ("", "op-b")
            wait_for(lambda: api.get(lease_path)["spec"]["holderIdentity"] == "op-b", 30,
                     "op-b to take the Lease once op-a stopped")
            apply(control_plane, model("leader2", ns))
            wait_for(lambda: len(jobs(api, ns)) == 2, 60, "op-b acting")
            assert rbac_refusals(a) == [] and rbac_refusals(b) == []


def client_certificate(cp: Any, user: str, out: Path) -> tuple[bytes, bytes]:
    """A client certificate for ``user`` (no group) signed by the control plane's CA, as kind
    and k3d issue their users'; returns (certificate PEM, key PEM)."""
    pki = cp.dir / "pki"
    key, csr, crt, ext = (out / f"{user}.{x}" for x in ("key", "csr", "crt", "ext"))
    ext.write_text("extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n")
    for argv in (["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                  "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={user}"],
                 ["x509", "-req", "-in", str(csr), "-CA", str(pki / "ca.crt"), "-CAkey",
                  str(pki / "ca.key"), "-CAcreateserial", "-days", "1", "-extfile", str(ext),
                  "-out", str(crt)]):
        subprocess.run(["openssl", *argv], check=True, capture_output=True, timeout=30)
    return crt.read_bytes(), key.read_bytes()


def test_client_certificates_from_a_kubeconfig_work(control_plane: Any, api: Api, ns: str,
                                                    tmp_path: Path) -> None:
    """Item 9: a kubeconfig whose user is a client certificate (inline data, as kind's and
    k3d's are) signed by the cluster's CA, for a user bound to the operator's ClusterRole only
    (not system:masters): the operator authenticates with it, kopf's watches and its own client
    (one session) alike, and RBAC holds it to that role (any 403 fails)."""
    user = f"cert-operator-{ns}"
    crt, key = client_certificate(control_plane, user, tmp_path)
    admin = yaml.safe_load(control_plane.kubeconfig.read_text())
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "clusters": admin["clusters"],
        "users": [{"name": user, "user": {
            "client-certificate-data": base64.b64encode(crt).decode(),
            "client-key-data": base64.b64encode(key).decode()}}],
        "contexts": [{"name": "c", "context": {"cluster": admin["clusters"][0]["name"],
                                               "user": user}}],
        "current-context": "c"}))
    control_plane.kubectl("create", "clusterrolebinding", user,
                          "--clusterrole=leanserve-operator", f"--user={user}")
    try:
        whoami = control_plane.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig)
        assert json.loads(whoami.stdout)["status"]["userInfo"]["username"] == user
        with OperatorProcess(kubeconfig, tmp_path / "cert.log",
                             LEANSERVE_OPERATOR_LEADER_ELECTION="false", **FAST) as op:
            apply(control_plane, model("cert", ns))
            wait_for(lambda: jobs(api, ns), 60, "the Job, created with the client certificate")
            wait_for(lambda: (cmod(api, ns, "cert") or {}).get("status", {}).get("phase")
                     == "Compressing", 30, "phase Compressing")
            assert op.forbidden() == [] and "401" not in op.text()
    finally:
        control_plane.kubectl("delete", "clusterrolebinding", user, check=False)


def token_status(cp: Any, token: str) -> int:
    """The HTTP status the API server gives a request bearing ``token``."""
    ctx = ssl.create_default_context(cafile=str(cp.dir / "pki" / "ca.crt"))
    req = urllib.request.Request(cp.server + "/api", headers={
        "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as rsp:
            return int(rsp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_a_rotated_service_account_token_is_read_again(control_plane: Any, api: Api, ns: str,
                                                       installed: Any, tmp_path: Path) -> None:
    """Item 9: the operator runs as in a pod: the server from KUBERNETES_SERVICE_HOST/PORT, the
    ServiceAccount token and CA from the mount directory. The token (a TokenRequest bound to a
    Secret) is rotated as the kubelet does: a new one written in its place, then the old one
    invalidated (its Secret deleted: the API server answers it 401). The operator keeps
    working: a model applied after the rotation gets its Job and its status (the 401 makes the
    client read the token file again and repeat the request), with no RBAC refusal."""
    sa_ns, sa = "leanserve-system", "leanserve-operator"
    bound = [f"token-{ns}-{i}" for i in (1, 2)]

    def issue(secret: str) -> str:
        control_plane.kubectl("create", "secret", "generic", secret, "-n", sa_ns)
        return control_plane.kubectl(
            "create", "token", sa, "-n", sa_ns, "--bound-object-kind=Secret",
            f"--bound-object-name={secret}", "--duration=1h").stdout.strip()

    mount = tmp_path / "serviceaccount"
    mount.mkdir()
    old = issue(bound[0])
    (mount / "token").write_text(old)
    (mount / "namespace").write_text(sa_ns)
    shutil.copy(control_plane.dir / "pki" / "ca.crt", mount / "ca.crt")
    try:
        with OperatorProcess(tmp_path / "no-kubeconfig", tmp_path / "rotation.log",
                             KUBERNETES_SERVICE_HOST="127.0.0.1",
                             KUBERNETES_SERVICE_PORT=control_plane.server.rsplit(":", 1)[1],
                             LEANSERVE_OPERATOR_SERVICE_ACCOUNT_DIR=str(mount),
                             LEANSERVE_OPERATOR_LEASE_NAME=f"rotation-{ns}", **FAST) as op:
            apply(control_plane, model("before", ns))
            wait_for(lambda: jobs(api, ns), 60, "the Job, made with the first token")
            assert token_status(control_plane, old) == 200
            new = issue(bound[1])
            (mount / "token.tmp").write_text(new)
            os.replace(mount / "token.tmp", mount / "token")
            control_plane.kubectl("delete", "secret", bound[0], "-n", sa_ns)
            wait_for(lambda: token_status(control_plane, old) == 401, 60,
                     "the API server to refuse the first token")
            apply(control_plane, model("after", ns))
            wait_for(lambda: len(jobs(api, ns)) == 2, 60, "the Job, made after the rotation")
            wait_for(lambda: (cmod(api, ns, "after") or {}).get("status", {}).get("phase")
                     == "Compressing", 30, "the status, written after the rotation")
            assert op.alive() and rbac_refusals(op) == []
    finally:
        for secret in bound:
            control_plane.kubectl("delete", "secret", secret, "-n", sa_ns, check=False)


def test_deleting_the_crd_leaves_nothing_stuck(control_plane: Any, api: Api, ns: str,
                                               operator: OperatorProcess) -> None:
    """Item 7: with models present and the operator running, deleting the CRD completes (no
    finalizer holds a model), and so does deleting deploy/operator; reinstalled afterwards for
    any later test."""
    apply(control_plane, model("crd-a", ns))
    wait_for(lambda: jobs(api, ns), 60, "the Job")
    try:
        control_plane.kubectl("delete", "crd", "compressedmodels.leanserve.io", "--timeout=60s",
                              timeout=90)
        assert api.get_or_none("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/"
                               "compressedmodels.leanserve.io") is None
        wait_for(lambda: jobs(api, ns) == [], 60, "the garbage collector to take the Job")
    finally:
        install_crd(control_plane)
    assert operator.alive()


def test_a_read_write_once_claim_is_named_in_a_condition(
        control_plane: Any, api: Api, ns: str, operator: OperatorProcess,
        tmp_path: Path) -> None:
    """Item 11: the model's claim is ReadWriteOnce: no Job, and the Compressed condition names
    the claim, its access modes and what is allowed; the models' RWX claim is fine."""
    pv = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{ns}-rwo"},
          "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                   "storageClassName": "", "hostPath": {"path": str(tmp_path)},
                   "claimRef": {"namespace": ns, "name": "rwo"}}}
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
           "metadata": {"name": "rwo", "namespace": ns},
           "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "",
                    "volumeName": f"{ns}-rwo", "resources": {"requests": {"storage": "1Gi"}}}}
    apply(control_plane, pv)
    apply(control_plane, pvc)
    try:
        apply(control_plane, model("rwo", ns, model={"uri": "pvc://rwo/minilm"}))
        failed = wait_for(lambda: condition(cmod(api, ns, "rwo"), "Compressed").get("reason")
                          == "ClaimNotShared" and cmod(api, ns, "rwo"), 60,
                          "Compressed=ClaimNotShared")
        message = condition(failed, "Compressed")["message"]
        assert "rwo" in message and "ReadWriteOnce" in message and "ReadWriteMany" in message
        assert jobs(api, ns) == []
    finally:
        control_plane.kubectl("delete", "cmod", "rwo", "-n", ns, check=False)
        control_plane.kubectl("delete", "pvc", "rwo", "-n", ns, "--wait=false", check=False)
        control_plane.kubectl("delete", "pv", f"{ns}-rwo", "--wait=false", check=False)
