"""What the operator's autoscaling step writes to status, and when (issue 14 item 14, 15).

The step writes status.autoscaling when the replicas or what stops the autoscaler change and at
least every HISTORY_SECONDS (the history a restart resumes from), never for a new load figure.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leanserve.api.load import load_one
from leanserve.autoscaling.capacity import DEFAULT_CURVE, curve_from_profile
from leanserve.autoscaling.policy import Decision, HistoryEntry
from leanserve.autoscaling.policy import Reason as PolicyReason
from leanserve.operator import handback
from leanserve.operator.autoscale import (
    HISTORY_SECONDS,
    decision_from_status,
    decision_to_status,
    pools_from_status,
    status_patch,
)
from leanserve.operator.handlers import merge_patch  # RFC 7386, as the API server applies it

ROOT = Path(__file__).resolve().parents[2]


def decision(t: float, replicas: dict[str, int], rate: float = 10.0,
             code: PolicyReason = PolicyReason.STEADY) -> Decision:
    return Decision(t, replicas, f"{code.value}: load {rate}", code, rate, 50.0, 0.1, True,
                    (HistoryEntry(t, tuple(sorted(replicas.items())), rate),))


def test_an_unchanged_decision_is_written_only_at_the_history_cadence() -> None:
    first = decision(1000.0, {"cpu": 1})
    patch = status_patch({}, first, None, 1000.0)
    assert patch is not None and patch["last"]["replicas"] == {"cpu": 1} and \
        patch["state"] is None
    saved = patch
    for t in (1030.0, 1200.0, 1000.0 + HISTORY_SECONDS - 1):
        assert status_patch(saved, decision(t, {"cpu": 1}, rate=t / 100), None, t) is None
    later = status_patch(saved, decision(1000.0 + HISTORY_SECONDS, {"cpu": 1}), None,
                         1000.0 + HISTORY_SECONDS)
    assert later is not None and later["last"]["time"] == 1000.0 + HISTORY_SECONDS
    restored = decision_from_status(later)
    assert restored is not None and restored.replicas == {"cpu": 1}


def test_new_replicas_or_a_new_obstacle_are_written_at_once() -> None:
    saved = decision_to_status(decision(1000.0, {"cpu": 1}))
    assert status_patch(saved, decision(1010.0, {"cpu": 1, "gpu": 1}), None, 1010.0) \
        is not None
    stuck = {"reason": "MetricsUnavailable", "message": "Prometheus unreachable"}
    patch = status_patch(saved, decision(1010.0, {"cpu": 1}), stuck, 1010.0)
    assert patch is not None and patch["state"] == stuck
    saved = {**saved, "state": stuck}
    # the same obstacle, other words: not written again until the cadence
    assert status_patch(saved, decision(1020.0, {"cpu": 1}),
                        {**stuck, "message": "other words"}, 1020.0) is None
    cleared = status_patch(saved, decision(1030.0, {"cpu": 1}), None, 1030.0)
    assert cleared is not None and cleared["state"] is None  # merge patch: removes it
    # no decision at all (a refused profile): the state alone
    assert status_patch({}, None, {"reason": "ProfileInvalid", "message": "m"}, 1.0) == \
        {"state": {"reason": "ProfileInvalid", "message": "m"}}
    assert status_patch({"state": {"reason": "ProfileInvalid"}}, None,
                        {"reason": "ProfileInvalid", "message": "m"}, 2.0) is None


def test_a_pool_taken_out_of_the_spec_leaves_the_stored_replicas() -> None:
    # a merge patch keeps keys it leaves out: without deleting the pool the stored replicas
    # never equal a decision again, and every interval would rewrite status
    saved = merge_patch({}, status_patch({}, decision(1000.0, {"cpu": 2, "gpu": 1}), None,
                                         1000.0))
    patch = status_patch(saved, decision(1030.0, {"cpu": 2}), None, 1030.0)
    assert patch is not None and patch["last"]["replicas"] == {"cpu": 2, "gpu": None}
    saved = merge_patch(saved, patch)
    assert saved["last"]["replicas"] == {"cpu": 2}
    assert status_patch(saved, decision(1060.0, {"cpu": 2}), None, 1060.0) is None


def test_the_cluster_autoscaler_plans_with_the_curve_the_job_measured() -> None:
    """The Job's profile keeps its trials; the termination message carries the curve fitted to
    them, and the operator's step plans each replica with it rather than the default shape."""
    profile = json.loads((ROOT / "bench/profiles/minilm-cpu.json").read_text())
    fitted = curve_from_profile(profile)
    assert fitted.fitted and fitted != DEFAULT_CURVE
    report = {"selected": "int8", "metric": "cosine",
              "candidates": [{"name": "int8", "passed": True, "quality": 0.995}]}
    summary = handback.decode(handback.encode(handback.summarize(
        report, "pvc://m/x/model_repository", "a" * 64, profile)))
    assert summary is not None
    compression = {**summary, "recipeHash": "h", "job": "j"}  # as the planner stores it
    spec = load_one(ROOT / "examples/minilm-cpu.yaml").spec
    pools = pools_from_status(compression, spec)
    assert [p.name for p in pools] == [p.name for p in spec.node_pools]
    for p in pools:
        assert (p.curve.a, p.curve.b, p.curve.m) == pytest.approx(
            (fitted.a, fitted.b, fitted.m), rel=1e-5)
        # what a replica carries at 99% within the SLO differs from the default shape's
        assert p.per_replica(0.99) == pytest.approx(
            p.capacity_rps * fitted.load_for(0.99), rel=1e-4)
        assert abs(p.per_replica(0.99) - p.capacity_rps * DEFAULT_CURVE.load_for(0.99)) > 1
    # a status written before the curve was carried, or an unusable one: the default shape
    for curve in (None, {"a": 0.1, "b": -1, "m": 1.2}, {"a": "x"}):
        old = {**compression, "curve": curve}
        assert all(p.curve == DEFAULT_CURVE for p in pools_from_status(old, spec))
