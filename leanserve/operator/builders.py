"""Pure builders: a CompressedModel's spec in, Kubernetes objects (plain dicts) out.

Nothing here talks to the API or reads the clock; every output is checked against the
Kubernetes 1.30 OpenAPI schemas by the unit tests. Names and labels follow DESIGN.md section 3.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import yaml

from leanserve.api.spec import (
    API_VERSION,
    KIND,
    LEGACY_SERVING_IMAGES,
    Accelerator,
    CompressedModelSpec,
    NodePool,
    Serving,
)
from leanserve.autoscaling.metrics import MODEL_LABEL
from leanserve.operator import stores
from leanserve.operator.constants import (
    EVENT_COMPONENT,
    MANAGER,
    MODEL_MOUNT,
    RENDEZVOUS_PORT,
    SPEC_FILE,
    SPEC_MOUNT,
    TERMINATION_LOG,
    WORK_DIR,
    Annotation,
    Component,
    Label,
    MonitorKind,
    Port,
)
from leanserve.operator.settings import OperatorSettings
from leanserve.serving.server import TRITON_METRICS_ARGS

HASH_LENGTH = 10
RETRY_HASH_LENGTH = 5
GPU_REPOSITORY_SUFFIX = "-gpu"
MAX_NAME = 63
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class Owner:
    """The CompressedModel that owns a child."""

    name: str
    namespace: str
    uid: str


# ---------------------------------------------------------------------------------- naming


def recipe_hash(spec: CompressedModelSpec) -> str:
    """Short sha256 of the canonical JSON of spec.model, spec.data and spec.compression."""
    recipe = {"model": spec.model.to_wire(), "data": spec.data.to_wire(),
              "compression": spec.compression.to_wire()}
    canonical = json.dumps(recipe, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:HASH_LENGTH]


def _fit(prefix: str, suffix: str, limit: int = MAX_NAME) -> str:
    """prefix+suffix, cutting the prefix (never the suffix) to stay a valid DNS label."""
    return prefix[: max(1, limit - len(suffix))].rstrip("-") + suffix


def job_name(model: str, recipe: str, retry: str = "") -> str:
    """X-compress-<recipe hash>, with a digest of the retry annotation when one is set.

    A retry is a new Job (the failed one stays until its TTL), so its name differs; without
    the annotation the name is the one DESIGN.md section 3 gives.
    """
    suffix = f"-compress-{recipe}"
    if retry:
        suffix += "-" + hashlib.sha256(retry.encode()).hexdigest()[:RETRY_HASH_LENGTH]
    # Indexed Job pods are named <job>-<index>; keep room for "-63".
    return _fit(model, suffix, MAX_NAME - 3)


def deployment_name(model: str, pool: str) -> str:
    return _fit(model, f"-{pool}")


def distill_workers(spec: CompressedModelSpec) -> int:
    """The largest DDP world size any distill step asks for (1 when none)."""
    workers = [s.distill.workers for c in spec.compression.candidates for s in c.steps
               if s.distill is not None]
    return max(workers, default=1)


# ------------------------------------------------------------------------------- metadata


def labels(owner: Owner, component: Component, pool: str | None = None) -> dict[str, str]:
    out = {Label.MANAGED_BY.value: MANAGER, Label.MODEL.value: owner.name,
           Label.NAME.value: "leanserve", Label.COMPONENT.value: component.value}
    if pool:
        out[Label.POOL.value] = pool
    return out


def selector(owner: Owner, component: Component, pool: str | None = None) -> dict[str, str]:
    out = {Label.MODEL.value: owner.name, Label.COMPONENT.value: component.value}
    if pool:
        out[Label.POOL.value] = pool
    return out


def owner_reference(owner: Owner) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": owner.name, "uid": owner.uid,
            "controller": True, "blockOwnerDeletion": True}


def job_owner_reference(name: str, uid: str) -> dict[str, Any]:
    """The compression Job as owner of its ConfigMap and headless Service.

    When the TTL controller deletes a finished Job, the garbage collector takes these with it.
    Not blocking: nothing waits for them, and blocking would need update on jobs/finalizers.
    """
    return {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": uid,
            "controller": True, "blockOwnerDeletion": False}


def owned_by(obj: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``obj`` whose only owner is ``reference``."""
    return {**obj, "metadata": {**obj["metadata"], "ownerReferences": [dict(reference)]}}


def metadata(owner: Owner, name: str, component: Component, *, pool: str | None = None,
             extra_labels: Mapping[str, str] | None = None,
             annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name, "namespace": owner.namespace,
        "labels": {**labels(owner, component, pool), **(extra_labels or {})},
        "ownerReferences": [owner_reference(owner)],
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def _container_security(uid: int) -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": uid,
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}}


def _pod_security(uid: int) -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _claim_volumes(claims: list[str], read_only: bool) -> tuple[list[dict], list[dict]]:
    volumes, mounts = [], []
    for i, claim in enumerate(claims):
        vname = f"store-{i}"
        volumes.append({"name": vname, "persistentVolumeClaim": {"claimName": claim,
                                                                 "readOnly": read_only}})
        mounts.append({"name": vname, "mountPath": stores.claim_mount(claim),
                       "readOnly": read_only})
    return volumes, mounts


# -------------------------------------------------------------------------- compression


@dataclass(frozen=True)
class JobPlan:
    """Everything about one compression run that several objects share."""

    name: str
    recipe: str
    out_uri: str  # where the Job's DIR lands in the store
    out_dir: str  # the same directory as the container sees it
    workers: int
    gpu: bool = False  # some pool has a GPU: the Job also writes the KIND_GPU repository
    retry: str = ""  # the retry annotation this Job answers ("" = the first run)

    @property
    def repository_uri(self) -> str:
        return self.out_uri.rstrip("/") + "/model_repository"


def job_plan(owner: Owner, spec: CompressedModelSpec, retry: str = "") -> JobPlan:
    recipe = recipe_hash(spec)
    out = stores.artifacts_ref(owner.name, spec, recipe)
    out_dir = (stores.in_pod(out.uri).removeprefix("file://") if out.scheme is stores.Scheme.PVC
               else posixpath.join(WORK_DIR, "out"))
    gpu = any(p.accelerator is Accelerator.NVIDIA_GPU for p in spec.node_pools)
    return JobPlan(job_name(owner.name, recipe, retry), recipe, out.uri, out_dir,
                   distill_workers(spec), gpu, retry)


def build_spec_configmap(owner: Owner, spec: CompressedModelSpec, plan: JobPlan) -> dict[str, Any]:
    """The spec the Job reads at /spec/spec.yaml, with pvc:// URIs turned into mount paths.

    Owned by the Job (``owned_by(..., job_owner_reference(...))`` once the Job exists), so it
    goes when the TTL controller deletes the Job.
    """
    wire = spec.to_wire()
    wire["model"]["uri"] = stores.in_pod(spec.model.uri)
    wire["data"]["uri"] = stores.in_pod(spec.data.uri)
    wire.pop("artifacts", None)
    doc = {"apiVersion": API_VERSION, "kind": KIND,
           "metadata": {"name": owner.name, "namespace": owner.namespace}, "spec": wire}
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": _job_child_metadata(owner, plan),
        "data": {SPEC_FILE: yaml.safe_dump(doc, sort_keys=False)},
    }


def _job_child_metadata(owner: Owner, plan: JobPlan) -> dict[str, Any]:
    meta = metadata(owner, plan.name, Component.COMPRESSION,
                    extra_labels={Label.RECIPE.value: plan.recipe})
    meta.pop("ownerReferences")  # the Job's, set once the Job exists
    return meta


def build_job(owner: Owner, spec: CompressedModelSpec, plan: JobPlan,
              settings: OperatorSettings) -> dict[str, Any]:
    """The compression Job: `leanserve compress` in the operator's image (Indexed for DDP)."""
    js = settings.job
    uris = [spec.model.uri, spec.data.uri, plan.out_uri]
    volumes, mounts = _claim_volumes(stores.claims_of(*uris), read_only=False)
    volumes += [{"name": "spec", "configMap": {"name": plan.name}},
                {"name": "tmp", "emptyDir": {}}, {"name": "work", "emptyDir": {}}]
    mounts += [{"name": "spec", "mountPath": SPEC_MOUNT, "readOnly": True},
               {"name": "tmp", "mountPath": "/tmp"}, {"name": "work", "mountPath": WORK_DIR}]
    # The path is stated in the pod spec twice (terminationMessagePath and here), never implied.
    runner = ["--artifact-uri", plan.repository_uri, "--termination-log", TERMINATION_LOG]
    if plan.gpu:
        runner += ["--gpu-repository"]
    if stores.parse_uri(plan.out_uri).scheme is stores.Scheme.S3:
        runner += ["--upload-to", plan.out_uri]
    if js.profile:
        runner += ["--profile"]
    args = [*runner, "--", "leanserve", "compress", posixpath.join(SPEC_MOUNT, SPEC_FILE),
            "--out", plan.out_dir]
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "LEANSERVE_MODEL_NAME", "value": owner.name},
        {"name": "LEANSERVE_RECIPE_HASH", "value": plan.recipe},
        {"name": "OMP_NUM_THREADS", "value": str(_cpu_count(js.resources))},
    ]
    job_spec: dict[str, Any] = {
        "backoffLimit": js.backoff_limit,
        "activeDeadlineSeconds": js.active_deadline_seconds,
        "ttlSecondsAfterFinished": js.ttl_seconds_after_finished,
    }
    pod_extra: dict[str, Any] = {}
    if plan.workers > 1:
        job_spec.update(completionMode="Indexed", completions=plan.workers,
                        parallelism=plan.workers)
        pod_extra["subdomain"] = plan.name
        # NCCL/gloo and DataLoader workers share tensors through /dev/shm; the runtime's
        # default 64 MiB is too small for DDP.
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
        env += [
            {"name": "MASTER_ADDR", "value": f"{plan.name}-0.{plan.name}"},
            {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
            {"name": "WORLD_SIZE", "value": str(plan.workers)},
            {"name": "RANK", "valueFrom": {"fieldRef": {
                "fieldPath": f"metadata.annotations['{Annotation.COMPLETION_INDEX.value}']"}}},
        ]
    container: dict[str, Any] = {
        "name": "compress",
        "image": js.image,
        "command": ["python", "-m", "leanserve.operator.jobrunner"],
        "args": args,
        "env": env,
        "resources": dict(js.resources),
        "volumeMounts": mounts,
        "securityContext": _container_security(js.run_as_user),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if stores.uses_s3(*uris) and spec.artifacts.secret_name:
        container["envFrom"] = [{"secretRef": {"name": spec.artifacts.secret_name}}]
    if plan.workers > 1:
        container["ports"] = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # The pod talks to no API: no ServiceAccount token in it (least privilege).
        "automountServiceAccountToken": False,
        "securityContext": _pod_security(js.run_as_user),
        "containers": [container],
        "volumes": volumes,
        **pod_extra,
    }
    if js.service_account:
        pod_spec["serviceAccountName"] = js.service_account
    job_spec["template"] = {
        "metadata": {"labels": {**labels(owner, Component.COMPRESSION),
                                Label.RECIPE.value: plan.recipe}},
        "spec": pod_spec,
    }
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": metadata(owner, plan.name, Component.COMPRESSION,
                             extra_labels={Label.RECIPE.value: plan.recipe}),
        "spec": job_spec,
    }


def build_rendezvous_service(owner: Owner, plan: JobPlan) -> dict[str, Any]:
    """Headless Service giving Indexed Job pods stable DNS names for torch.distributed.

    Owned by the Job, like the spec ConfigMap.
    """
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _job_child_metadata(owner, plan),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {Label.JOB_NAME.value: plan.name},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT,
                       "targetPort": RENDEZVOUS_PORT}],
        },
    }


def _cpu_count(resources: Mapping[str, Any]) -> int:
    raw = str((resources.get("requests") or {}).get("cpu", "1"))
    try:
        cores = float(raw[:-1]) / 1000 if raw.endswith("m") else float(raw)
    except ValueError:
        return 1
    return max(1, int(cores))


# ------------------------------------------------------------------------------ serving


def gpu_repository_uri(artifact_uri: str) -> str:
    """The KIND_GPU sibling the Job writes beside a model repository (``--gpu-repository``)."""
    return artifact_uri.rstrip("/") + GPU_REPOSITORY_SUFFIX


def model_repository(artifact_uri: str, gpu: bool = False) -> tuple[str, list[str]]:
    """tritonserver's --model-repository for an artifact URI, and the claims to mount.

    A GPU pool serves the KIND_GPU repository; a CPU pool always the KIND_CPU one, which asks
    for no GPU.
    """
    if gpu:
        artifact_uri = gpu_repository_uri(artifact_uri)
    ref = stores.parse_uri(artifact_uri)
    if ref.scheme is stores.Scheme.PVC:
        return posixpath.join(MODEL_MOUNT, ref.path), [ref.root]
    return artifact_uri, []  # s3:// is read by tritonserver itself


DEFAULT_IMAGES = frozenset({Serving.model_fields["image"].default, *LEGACY_SERVING_IMAGES})


def serving_image(image: str, settings: OperatorSettings) -> str:
    """The image tritonserver runs: the schema's default (or an earlier one) is the operator's
    configured serving image."""
    return settings.serving.image if image in DEFAULT_IMAGES else image


def build_deployment(owner: Owner, spec: CompressedModelSpec, pool: NodePool, *,
                     artifact_uri: str, artifact_sha: str, replicas: int,
                     monitor: MonitorKind, settings: OperatorSettings,
                     gpu_repository: bool = False) -> dict[str, Any]:
    """Deployment X-<pool> running tritonserver on the pool's nodes.

    A GPU pool serves the KIND_GPU repository when the Job wrote one (``gpu_repository``); a
    CPU pool always serves the KIND_CPU one.
    """
    gpu = pool.accelerator is Accelerator.NVIDIA_GPU
    repo, claims = model_repository(artifact_uri, gpu and gpu_repository)
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}},
                                     {"name": "shm", "emptyDir": {"medium": "Memory"}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"},
                                    {"name": "shm", "mountPath": "/dev/shm"}]
    for claim in claims:
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": claim,
                                                                    "readOnly": True}})
        mounts.append({"name": "models", "mountPath": MODEL_MOUNT, "readOnly": True})
    resources = pool.resources.to_wire()
    resources = {k: {rk: str(rv) for rk, rv in v.items()} for k, v in resources.items() if v}
    if gpu:
        resources.setdefault("limits", {}).setdefault(GPU_RESOURCE, "1")
    annotations = {Annotation.ARTIFACT_SHA.value: artifact_sha}
    if monitor is MonitorKind.NONE:
        annotations |= {Annotation.PROM_SCRAPE.value: "true",
                        Annotation.PROM_PORT.value: str(Port.METRICS.value),
                        Annotation.PROM_PATH.value: "/metrics"}
    container: dict[str, Any] = {
        "name": "tritonserver",
        "image": serving_image(spec.serving.image, settings),
        "command": ["tritonserver"],
        "args": [f"--model-repository={repo}", f"--http-port={Port.HTTP.value}",
                 f"--grpc-port={Port.GRPC.value}", f"--metrics-port={Port.METRICS.value}",
                 *TRITON_METRICS_ARGS,  # the p95 summaries the autoscaler reads
                 "--strict-readiness=true", "--exit-on-error=true"],
        "ports": [{"name": "http", "containerPort": Port.HTTP.value},
                  {"name": "grpc", "containerPort": Port.GRPC.value},
                  {"name": "metrics", "containerPort": Port.METRICS.value}],
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": "http"},
                           "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": "http"},
                          "periodSeconds": 10, "failureThreshold": 3},
        "startupProbe": {"httpGet": {"path": "/v2/health/live", "port": "http"},
                         "periodSeconds": 5, "failureThreshold": 60},
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": _container_security(settings.serving.run_as_user),
    }
    if stores.parse_uri(artifact_uri).scheme is stores.Scheme.S3 and spec.artifacts.secret_name:
        container["envFrom"] = [{"secretRef": {"name": spec.artifacts.secret_name}}]
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,  # tritonserver talks to no Kubernetes API
        "securityContext": _pod_security(settings.serving.run_as_user),
        "containers": [container],
        "volumes": volumes,
        "nodeSelector": dict(pool.node_selector),
        "tolerations": [t.to_wire() for t in pool.tolerations],
        "terminationGracePeriodSeconds": 30,
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": metadata(owner, deployment_name(owner.name, pool.name), Component.SERVING,
                             pool=pool.name),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector(owner, Component.SERVING, pool.name)},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels(owner, Component.SERVING, pool.name),
                             "annotations": annotations},
                "spec": pod_spec,
            },
        },
    }


def build_service(owner: Owner) -> dict[str, Any]:
    """Service X selecting the serving pods of every pool."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": metadata(owner, owner.name, Component.SERVING),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(owner, Component.SERVING),
            "ports": [{"name": n, "port": p.value, "targetPort": n, "protocol": "TCP"}
                      for n, p in (("http", Port.HTTP), ("grpc", Port.GRPC),
                                   ("metrics", Port.METRICS))],
        },
    }


def build_pdb(owner: Owner, settings: OperatorSettings) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": metadata(owner, owner.name, Component.SERVING),
        "spec": {"minAvailable": settings.serving.min_available,
                 "unhealthyPodEvictionPolicy": "AlwaysAllow",
                 "selector": {"matchLabels": selector(owner, Component.SERVING)}},
    }


def build_monitor(owner: Owner, kind: MonitorKind) -> dict[str, Any] | None:
    """A ServiceMonitor or PodMonitor for Triton's metrics port (None when neither CRD exists)."""
    if kind is MonitorKind.NONE:
        return None
    # Triton's series carry model and version only: the pod's pool label becomes `pool`, which
    # the per-pool panels and the autoscaler's per-pool rate group by.
    pool_label = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", Label.POOL.value)
    # The CompressedModel becomes `leanserve_model`, so that the autoscaler's queries keep to
    # its own pods' series: another CompressedModel called `<name>-text` serves a Triton model
    # of the same name as this one's text ensemble.
    model_label = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_",
                                                           Label.MODEL.value)
    endpoint = {"port": "metrics", "path": "/metrics", "interval": "15s",
                "relabelings": [{"sourceLabels": [pool_label], "targetLabel": "pool",
                                 "action": "replace"},
                                {"sourceLabels": [model_label], "targetLabel": MODEL_LABEL,
                                 "action": "replace"}]}
    spec: dict[str, Any] = {"selector": {"matchLabels": selector(owner, Component.SERVING)}}
    if kind is MonitorKind.SERVICE_MONITOR:
        spec["endpoints"] = [endpoint]
    else:
        spec["podMetricsEndpoints"] = [endpoint]
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": kind.value,
            "metadata": metadata(owner, owner.name, Component.SERVING), "spec": spec}


# -------------------------------------------------------------------------------- events


def build_event(owner: Owner, *, reason: str, message: str, warning: bool,
                now: datetime, seq: int = 0, key: str = "") -> dict[str, Any]:
    """A core/v1 Event about the CompressedModel, named explicitly (no generateName needed).

    With a ``key`` (the operator passes a digest of the status the transition starts from) the
    name depends on the transition, not the clock: posting the same transition twice — a retry
    after a failed status write, two reconciles racing on one stale body — is a 409, not a
    duplicate Event.
    """
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    unique = hashlib.sha256(f"{owner.uid}/{reason}/{key or now.isoformat()}/{seq}".encode())
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": f"{owner.name}.{unique.hexdigest()[:16]}",
                     "namespace": owner.namespace},
        "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": owner.name,
                           "namespace": owner.namespace, "uid": owner.uid},
        "reason": reason,
        "message": message[:1024],
        "type": "Warning" if warning else "Normal",
        "source": {"component": EVENT_COMPONENT},
        "reportingComponent": EVENT_COMPONENT,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
