"""What GitOps tools read from real CompressedModels: kstatus (Flux's health checks, kpt,
Config Sync: sigs.k8s.io/cli-utils' status.Compute, built by scripts/control-plane.sh) and
Argo CD's health Lua (deploy/argocd/health.lua), on objects read back from the API server.

One namespace, one operator, four models at once; the test plays the kubelet for the Job pods
(as test_operator_behaviour.py does), so every state is reached in seconds:

- applied before any operator ran: the CRD's status default, InProgress (generation 1 not
  observed), Argo CD Progressing;
- compressing: InProgress (Reconciling=True, Compressing), Progressing;
- serving: Current, Healthy; and `kubectl wait --for=condition=Ready` returns;
- an invalid spec (s3://, which the schema accepts and the operator refuses) and a failed Job:
  Failed (Stalled=True) as soon as the operator writes the phase, Argo CD Degraded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from clusterlib import OperatorProcess, kstatus, wait_for
from kubeapi import Api
from test_operator_behaviour import (  # noqa: F401 (fixtures)
    FAST,
    api,
    apply,
    cmod,
    condition,
    finish_pod,
    installed,
    jobs,
    model,
    ns,
    operator_kubeconfig,
    rbac_refusals,
    summary,
)

from tests.integration.test_operator_deploy import argocd_health


@pytest.fixture
def operator_no_retries(operator_kubeconfig: Path,  # noqa: F811
                        tmp_path: Path) -> Iterator[Callable[[], OperatorProcess]]:
    """The operator, not started yet (the test starts it), with backoffLimit 0: one failed
    pod fails the Job."""
    op: OperatorProcess | None = None

    def start() -> OperatorProcess:
        nonlocal op
        op = OperatorProcess(operator_kubeconfig, tmp_path / "operator.log",
                             LEANSERVE_OPERATOR_JOB_BACKOFF_LIMIT="0", **FAST)
        return op
    yield start
    if op is not None:
        op.stop()
        print(op.text()[-3000:])
        assert rbac_refusals(op) == [], "the operator was refused by its own RBAC"


def verdicts(client: Api, namespace: str, name: str
             ) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(the object as the API server serves it, kstatus' verdict, Argo CD's health)."""
    obj = cmod(client, namespace, name)
    assert obj is not None
    return obj, kstatus(obj), argocd_health(obj)[0]


def job_of(client: Api, namespace: str, name: str) -> str | None:
    return next((j["metadata"]["name"] for j in jobs(client, namespace)
                 if j["metadata"]["name"].startswith(f"{name}-compress-")), None)


def test_kstatus_and_argocd_read_each_phase(control_plane: Any,
                                            api: Api,  # noqa: F811
                                            ns: str,  # noqa: F811
                                            operator_no_retries: Callable[[], OperatorProcess]
                                            ) -> None:
    seen: dict[str, tuple[str, str]] = {}  # state -> (kstatus, Argo CD), printed at the end

    def check(state: str, name: str, want: str, health: str) -> dict[str, Any]:
        obj, ks, argo = verdicts(api, ns, name)
        seen[state] = (f"{ks['status']} ({ks['message'][:70]})", argo)
        assert (ks["status"], argo) == (want, health), (state, ks, argo, obj.get("status"))
        return ks

    # Before any operator: the status the CRD defaults (no status at all reads as Current).
    apply(control_plane, model("fresh", ns))
    apply(control_plane, model("broken", ns))
    invalid = model("invalid", ns)
    invalid["spec"]["model"]["uri"] = "s3://models/minilm"  # the schema's grammar; refused later
    apply(control_plane, invalid)
    ks = check("applied, no operator yet", "fresh", "InProgress", "Progressing")
    assert ks["conditions"] == ["Reconciling=True/LatestGenerationNotObserved"]
    assert cmod(api, ns, "fresh")["status"] == {"phase": "Pending",  # type: ignore[index]
                                                 "observedGeneration": 0}

    started = time.monotonic()
    op = operator_no_retries()
    stalled = wait_for(lambda: condition(cmod(api, ns, "invalid"), "Stalled"), 60,
                       "Stalled on the invalid spec")
    invalid_after = time.monotonic() - started
    assert (stalled["status"], stalled["reason"]) == ("True", "InvalidSpec")
    ks = check("invalid spec", "invalid", "Failed", "Degraded")
    assert "s3:// is not supported" in ks["message"]

    fresh_job = wait_for(lambda: job_of(api, ns, "fresh"), 60, "fresh's Job")
    broken_job = wait_for(lambda: job_of(api, ns, "broken"), 60, "broken's Job")
    wait_for(lambda: condition(cmod(api, ns, "fresh"), "Reconciling"), 30, "Reconciling")
    ks = check("compressing", "fresh", "InProgress", "Progressing")
    assert ks["conditions"] == ["Reconciling=True/Compressing"]
    assert "is compressing 1 candidate" in ks["message"]

    # A failed Job: Failed as soon as the operator writes it, not after any timeout.
    failed_at = time.monotonic()
    finish_pod(api, ns, broken_job, "Traceback\nValueError: broken data", code=1)
    wait_for(lambda: (m := cmod(api, ns, "broken")) and m["status"].get("phase") == "Failed",
             60, "broken Failed")
    failed_after = time.monotonic() - failed_at
    ks = check("failed Job", "broken", "Failed", "Degraded")
    assert ks["conditions"] == ["Stalled=True/JobFailed"]
    assert "ValueError: broken data" in ks["message"]

    uri = f"pvc://models/leanserve/fresh/{fresh_job.rsplit('-', 1)[1]}/model_repository"
    finish_pod(api, ns, fresh_job, summary("int8", uri))
    control_plane.kubectl("wait", "--for=condition=Ready", "compressedmodel/fresh", "-n", ns,
                          "--timeout=90s", timeout=120)
    check("serving", "fresh", "Current", "Healthy")
    fresh = cmod(api, ns, "fresh")
    assert fresh is not None and fresh["status"]["phase"] == "Serving"
    assert not condition(fresh, "Reconciling") and not condition(fresh, "Stalled")

    print(f"invalid spec Stalled {invalid_after:.1f} s after the operator started; failed "
          f"Job Stalled {failed_after:.1f} s after its pod failed")
    for state, (k, a) in seen.items():
        print(f"{state}: kstatus {k}; Argo CD {a}")
    assert op.alive()
