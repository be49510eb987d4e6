"""deploy/operator's RBAC grants exactly what the operator uses (leanserve/operator/access.py).

The rules in access.py name the code behind each grant; the emulator test checks every request
the running operator makes against them, and the real-cluster test runs the operator with its
ServiceAccount's token (tests/cluster). This test ties the deployed YAML to the rules: a grant
nobody uses, or a use nobody granted, fails here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from leanserve.operator import access

RBAC = Path(__file__).resolve().parents[2] / "deploy" / "operator" / "rbac.yaml"


def grants(kind: str) -> set[tuple[str, str, str]]:
    docs = [d for d in yaml.safe_load_all(RBAC.read_text()) if d and d["kind"] == kind]
    assert len(docs) == 1, kind
    out: set[tuple[str, str, str]] = set()
    for rule in docs[0]["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no wildcards or names
        out |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"]
                for v in rule["verbs"]}
    return out


def test_the_cluster_role_is_exactly_the_operators_access() -> None:
    assert grants("ClusterRole") == access.triples(access.CLUSTER_RULES)


def test_the_leader_lease_is_granted_in_the_operators_namespace_only() -> None:
    assert grants("Role") == access.triples(access.NAMESPACE_RULES)
    assert not any(r == "leases" for _, r, _ in grants("ClusterRole"))


def test_no_wildcards_and_children_are_written_by_apply_only() -> None:
    """Apply is a PATCH; where it creates, kube-apiserver also authorizes it as `create`
    (seen on the real control plane: a 403 "cannot create resource" for the first apply).
    No child is ever updated with PUT."""
    every = grants("ClusterRole")
    assert not any("*" in t for triple in every for t in triple)
    children = {"jobs", "configmaps", "services", "deployments", "poddisruptionbudgets",
                "servicemonitors", "podmonitors"}
    for child in children:
        verbs = {v for _, r, v in every if r == child}
        assert {"create", "patch"} <= verbs and "update" not in verbs, child


def test_owner_references_blocking_deletion_have_the_finalizers_grant() -> None:
    """blockOwnerDeletion on an ownerReference needs update on the owner's finalizers
    subresource (the OwnerReferencesPermissionEnforcement admission plugin)."""
    from leanserve.operator import builders
    owner = builders.Owner("m", "ns", "uid")
    assert builders.owner_reference(owner)["blockOwnerDeletion"] is True
    assert ("leanserve.io", "compressedmodels/finalizers", "update") in grants("ClusterRole")
    # The Job-owned children do not block, so no jobs/finalizers grant is needed.
    assert builders.job_owner_reference("j", "u")["blockOwnerDeletion"] is False
    assert not any(r == "jobs/finalizers" for _, r, _ in grants("ClusterRole"))


def test_verbs_follow_the_api_servers_request_info() -> None:
    cases: list[tuple[Any, ...]] = [("GET", True, False, "get"), ("GET", False, False, "list"),
                                    ("GET", False, True, "watch"), ("POST", False, False, "create"),
                                    ("PUT", True, False, "update"), ("PATCH", True, False, "patch"),
                                    ("DELETE", True, False, "delete")]
    for method, named, watch, verb in cases:
        assert access.verb_of(method, named, watch) == verb
