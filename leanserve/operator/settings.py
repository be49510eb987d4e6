"""The operator's settings: nested dataclasses with defaults, loaded from the environment once.

Resources for the compression Job, its limits and the operator's own ports are deployment
choices, not part of a model's spec, so they live here (set through the operator Deployment's
environment) rather than in the CompressedModel schema.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from leanserve.api.spec import DEFAULT_SERVING_IMAGE
from leanserve.operator.errors import OperatorError


@dataclass(frozen=True)
class JobSettings:
    image: str = "ghcr.io/leanserve/leanserve:0.1.0"
    """The operator's own image; the compression Job runs `leanserve compress` in it."""
    service_account: str = ""
    """ServiceAccount of the Job's pods ("" = the namespace default)."""
    resources: Mapping[str, Any] = field(default_factory=lambda: {
        "requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "4", "memory": "8Gi"}})
    """Requests/limits of each compression pod (per worker for distillation)."""
    backoff_limit: int = 1
    """Retries of a failed compression pod before the Job is Failed."""
    active_deadline_seconds: int = 6 * 3600
    """Hard limit on a compression Job's run time."""
    ttl_seconds_after_finished: int = 7 * 24 * 3600
    """How long a finished Job stays (its result is copied into status long before)."""
    profile: bool = True
    """Also run `leanserve profile --quick` in the Job: the selected model's capacity at the
    SLO, measured on the CPU the Job runs on and derived for every pool (marked measured:
    false). The autoscaler acts only once a profile exists (condition Autoscaling)."""
    run_as_user: int = 10001
    """UID of the compression containers: the user the operator's image (Dockerfile) creates."""
    start_timeout_seconds: int = 600
    """A Job with no pod started after this long is reported (condition reason JobNotStarting)."""


@dataclass(frozen=True)
class ServingSettings:
    image: str = DEFAULT_SERVING_IMAGE
    """The serving image (deploy/images/serving): Triton plus what the python-backend models
    import. Used where a spec keeps the schema's default serving.image (or an earlier default,
    the stock Triton image, which lacks `tokenizers`: text models would crash-loop on it); set
    it to a mirror of that image where ghcr.io is not reachable."""
    run_as_user: int = 1000
    """UID of tritonserver: the image's user (deploy/images/serving, Triton's triton-server)."""
    min_available: int = 1
    """PodDisruptionBudget minAvailable for each model's serving pods."""


DEFAULT_PROMETHEUS_URL = "http://prometheus-operated.monitoring:9090"
"""The Prometheus Operator's in-cluster Prometheus: spec.autoscaling.prometheusUrl's default."""
GPU_TOLERATION: Mapping[str, str] = {"key": "nvidia.com/gpu", "effect": "NoSchedule"}
"""The taint GPU node pools carry (the NVIDIA device plugin's convention)."""


@dataclass(frozen=True)
class PolicySettings:
    """What a CompressedModel may make the operator do (leanserve.operator.privilege checks it).

    Whoever may create a CompressedModel in a namespace gets no more than this: a spec asking
    for anything else is refused (condition Ready=False, reason Forbidden, naming the field)
    and the operator creates nothing for it.
    """

    images: tuple[str, ...] = ()
    """Images spec.serving.image may name, besides the operator's own serving and job images
    (always allowed). An entry ending in "/" is a registry or repository prefix
    ("ghcr.io/leanserve/" allows every image under it); any other entry is one exact image
    reference. The schema's default is served as serving.image, so it passes."""
    tolerations: tuple[Mapping[str, Any], ...] = (GPU_TOLERATION,)
    """Tolerations nodePools[].tolerations may use, as {key, effect, value}: a spec's toleration
    passes when it tolerates no more than one entry does. A missing key, effect or value in an
    entry means any; a spec toleration with no key (operator Exists: every taint), no effect
    (every effect) or operator Exists (every value) passes only where an entry is as wide."""
    prometheus_urls: tuple[str, ...] = (DEFAULT_PROMETHEUS_URL,)
    """The only URLs the operator sends requests to for spec.autoscaling.prometheusUrl (exact,
    ignoring a trailing "/"): any other is refused before a request is sent."""


@dataclass(frozen=True)
class OperatorSettings:
    job: JobSettings = field(default_factory=JobSettings)
    serving: ServingSettings = field(default_factory=ServingSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    resync_seconds: float = 300.0
    """How often each model is re-observed without an event (its Jobs and Deployments are
    watched, so this is only a safety net)."""
    reapply_seconds: float = 600.0
    """How long an applied child is trusted unchanged before it is applied again (repairs
    hand edits; an unchanged desired object is not re-sent in between)."""
    retry_seconds: float = 30.0
    """Delay before a reconcile the API refused (quota, webhook, 422) is tried again."""
    leader_election: bool = True
    """Hold a coordination.k8s.io Lease while acting, so two replicas never both act."""
    lease_namespace: str = "leanserve-system"
    """Namespace of the Lease (the operator's own namespace)."""
    lease_name: str = "leanserve-operator"
    """Name of the Lease."""
    lease_seconds: float = 15.0
    """Lease duration: a dead leader is replaced after at most this long."""
    metrics_port: int = 9090
    """Port of the operator's own Prometheus metrics (0 = off)."""
    liveness_port: int = 8080
    """Port of kopf's liveness endpoint /healthz (0 = off)."""


_ENV = "LEANSERVE_OPERATOR_"


def load_settings(env: Mapping[str, str] | None = None) -> OperatorSettings:
    """Settings from LEANSERVE_OPERATOR_* variables; a bad value is one clear error."""
    env = os.environ if env is None else env
    s = OperatorSettings()

    def get(key: str, cast: type, current: Any) -> Any:
        raw = env.get(_ENV + key)
        if raw is None or raw == "":
            return current
        try:
            if cast is bool:
                return raw.strip().lower() in ("1", "true", "yes", "on")
            if cast is dict:
                value = json.loads(raw)
                if not isinstance(value, dict):
                    raise ValueError("expected a JSON object")
                return value
            if cast is list:  # a JSON array of objects
                value = json.loads(raw)
                if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
                    raise ValueError("expected a JSON array of objects")
                return tuple(value)
            if cast is tuple:  # comma-separated strings
                return tuple(x.strip() for x in raw.split(",") if x.strip())
            return cast(raw)
        except ValueError as exc:
            raise OperatorError(f"{_ENV}{key}={raw!r}: {exc} (allowed: a {cast.__name__})") \
                from None

    job = replace(
        s.job,
        image=get("JOB_IMAGE", str, s.job.image),
        service_account=get("JOB_SERVICE_ACCOUNT", str, s.job.service_account),
        resources=get("JOB_RESOURCES", dict, s.job.resources),
        backoff_limit=get("JOB_BACKOFF_LIMIT", int, s.job.backoff_limit),
        active_deadline_seconds=get("JOB_ACTIVE_DEADLINE_SECONDS", int,
                                    s.job.active_deadline_seconds),
        ttl_seconds_after_finished=get("JOB_TTL_SECONDS", int, s.job.ttl_seconds_after_finished),
        profile=get("JOB_PROFILE", bool, s.job.profile),
        run_as_user=get("JOB_RUN_AS_USER", int, s.job.run_as_user),
        start_timeout_seconds=get("JOB_START_TIMEOUT_SECONDS", int, s.job.start_timeout_seconds),
    )
    serving = replace(
        s.serving,
        image=get("SERVING_IMAGE", str, s.serving.image),
        run_as_user=get("RUN_AS_USER", int, s.serving.run_as_user),
        min_available=get("PDB_MIN_AVAILABLE", int, s.serving.min_available),
    )
    policy = replace(
        s.policy,
        images=get("ALLOWED_IMAGES", tuple, s.policy.images),
        tolerations=_tolerations(get("ALLOWED_TOLERATIONS", list, s.policy.tolerations)),
        prometheus_urls=get("ALLOWED_PROMETHEUS_URLS", tuple, s.policy.prometheus_urls),
    )
    return replace(
        s, job=job, serving=serving, policy=policy,
        resync_seconds=get("RESYNC_SECONDS", float, s.resync_seconds),
        reapply_seconds=get("REAPPLY_SECONDS", float, s.reapply_seconds),
        retry_seconds=get("RETRY_SECONDS", float, s.retry_seconds),
        leader_election=get("LEADER_ELECTION", bool, s.leader_election),
        lease_namespace=get("LEASE_NAMESPACE", str, s.lease_namespace),
        lease_name=get("LEASE_NAME", str, s.lease_name),
        lease_seconds=get("LEASE_SECONDS", float, s.lease_seconds),
        metrics_port=get("METRICS_PORT", int, s.metrics_port),
        liveness_port=get("LIVENESS_PORT", int, s.liveness_port),
    )


_TOLERATION_KEYS = {"key", "operator", "value", "effect"}


def _tolerations(entries: tuple[Mapping[str, Any], ...]) -> tuple[Mapping[str, Any], ...]:
    """Allowed tolerations as given, each checked: only key, operator, value, effect."""
    for entry in entries:
        extra = set(entry) - _TOLERATION_KEYS
        if extra or not all(isinstance(v, str) for v in entry.values()):
            raise OperatorError(f"{_ENV}ALLOWED_TOLERATIONS: {dict(entry)!r} (allowed: objects "
                                "with string fields key, operator, value, effect)")
    return entries
