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
    profile: bool = False
    """Also run `leanserve profile` in the Job (measures on the Job's node, not the pools')."""
    run_as_user: int = 10001
    """UID of the compression containers: the user the operator's image (Dockerfile) creates."""
    start_timeout_seconds: int = 600
    """A Job with no pod started after this long is reported (condition reason JobNotStarting)."""


@dataclass(frozen=True)
class ServingSettings:
    image: str = "ghcr.io/leanserve/serving:24.08-py3"
    """The serving image (deploy/images/serving): Triton plus what the python-backend models
    import. Used where a spec keeps the stock Triton image of the schema's default, which
    lacks `tokenizers` (text models would crash-loop on it)."""
    run_as_user: int = 1000
    """UID of tritonserver: the image's user (deploy/images/serving, Triton's triton-server)."""
    min_available: int = 1
    """PodDisruptionBudget minAvailable for each model's serving pods."""


@dataclass(frozen=True)
class OperatorSettings:
    job: JobSettings = field(default_factory=JobSettings)
    serving: ServingSettings = field(default_factory=ServingSettings)
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
    return replace(
        s, job=job, serving=serving,
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
