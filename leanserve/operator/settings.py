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


@dataclass(frozen=True)
class ServingSettings:
    run_as_user: int = 1000
    """UID of tritonserver and compression containers (non-root)."""
    min_available: int = 1
    """PodDisruptionBudget minAvailable for each model's serving pods."""


@dataclass(frozen=True)
class OperatorSettings:
    job: JobSettings = field(default_factory=JobSettings)
    serving: ServingSettings = field(default_factory=ServingSettings)
    resync_seconds: float = 10.0
    """How often each model is re-observed (Jobs and Deployments change without spec edits)."""
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
    )
    serving = replace(
        s.serving,
        run_as_user=get("RUN_AS_USER", int, s.serving.run_as_user),
        min_available=get("PDB_MIN_AVAILABLE", int, s.serving.min_available),
    )
    return replace(
        s, job=job, serving=serving,
        resync_seconds=get("RESYNC_SECONDS", float, s.resync_seconds),
        metrics_port=get("METRICS_PORT", int, s.metrics_port),
        liveness_port=get("LIVENESS_PORT", int, s.liveness_port),
    )
