"""Every API access the operator makes, as RBAC rules: the single source of deploy/operator's RBAC.

Each rule names the code that needs it. tests/unit/test_operator_access.py checks that
deploy/operator/rbac.yaml grants exactly these (nothing more), and the operator tests check that
every request the running operator makes is covered; on the real control plane the operator
runs with its ServiceAccount's own token, so a missing verb is a 403 there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    group: str
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    why: str


CLUSTER_RULES: tuple[Rule, ...] = (
    Rule("leanserve.io", ("compressedmodels",), ("list", "watch"),
         "kopf watches the models (handlers.model_event); nothing writes their spec or metadata"),
    Rule("leanserve.io", ("compressedmodels/status",), ("patch",),
         "handlers.write_status and the autoscaler's decisions (platform.patch_status)"),
    Rule("leanserve.io", ("compressedmodels/finalizers",), ("update",),
         "children's ownerReferences set blockOwnerDeletion (admission checks this verb)"),
    Rule("apiextensions.k8s.io", ("customresourcedefinitions",), ("list", "watch"),
         "kopf discovers the CRD, and notices it going and coming back"),
    Rule("", ("events",), ("create", "list"),
         "one Event per transition (post_events); why a Job starts no pod (observe)"),
    Rule("", ("pods",), ("list",),
         "the compression Job's report is its newest pod's termination message"),
    Rule("", ("secrets",), ("get",),
         "a Secret a spec names must carry the opt-in label (handlers.observe_secrets, "
         "metadata only)"),
    Rule("", ("persistentvolumeclaims",), ("get",),
         "a claim's access modes, checked before a Job is made (observe_claims)"),
    # Server-side apply is a PATCH, authorized as `patch`, and also as `create` when the object
    # does not exist yet (kube-apiserver checks both): every applied kind needs the two.
    Rule("batch", ("jobs",), ("get", "list", "watch", "create", "patch"),
         "the Job by name (observe), watched for reconciles, created by server-side apply"),
    Rule("", ("configmaps", "services"), ("create", "patch"),
         "server-side apply: the Job's spec ConfigMap and headless Service, Service X"),
    Rule("apps", ("deployments",), ("list", "watch", "create", "patch", "delete"),
         "serving Deployments: observed, watched, applied; a pool's goes when another serves"),
    Rule("apps", ("deployments/scale",), ("patch",),
         "the autoscaler sets replicas through the scale subresource"),
    Rule("policy", ("poddisruptionbudgets",), ("create", "patch"),
         "server-side apply of the PDB"),
    Rule("monitoring.coreos.com", ("servicemonitors", "podmonitors"), ("create", "patch"),
         "server-side apply of the monitor, when the Prometheus Operator's CRDs exist"),
)

# Cluster-scoped resources: in a ClusterRole only, and not needed when the operator watches
# one namespace (kopf's CRD scanning is off there: runner.kopf_settings).
CLUSTER_SCOPED = frozenset({("apiextensions.k8s.io", "customresourcedefinitions")})

# The operator started with --namespace NS (deploy/operator-namespaced): a Role in NS.
NAMESPACED_RULES: tuple[Rule, ...] = tuple(
    r for r in CLUSTER_RULES if not any((r.group, res) in CLUSTER_SCOPED for res in r.resources))

# In the operator's own namespace only.
NAMESPACE_RULES: tuple[Rule, ...] = (
    Rule("coordination.k8s.io", ("leases",), ("get", "create", "update"),
         "leader election (lease.LeaderElector)"),
)


def triples(rules: tuple[Rule, ...]) -> set[tuple[str, str, str]]:
    """(group, resource, verb) for each grant."""
    return {(r.group, res, verb) for r in rules for res in r.resources for verb in r.verbs}


def verb_of(method: str, named: bool, watch: bool) -> str:
    """The RBAC verb of an HTTP request (as kube-apiserver's RequestInfo derives it)."""
    if method == "GET":
        return "watch" if watch else ("get" if named else "list")
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]
