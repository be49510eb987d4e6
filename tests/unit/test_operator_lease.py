"""Leader election decisions (pure): who may act, judged on the candidate's own clock.

Two replicas both acting cannot be shown without two processes and a real API server's
optimistic concurrency; tests/cluster runs that. Here: the decision table and the Lease body.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from leanserve.operator.lease import Action, decide, lease_body, record

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def lease(holder: str, renew: str = "2026-03-01T11:59:59.000000Z", seconds: int = 15,
          version: str = "7") -> dict[str, Any]:
    return {"metadata": {"name": "l", "namespace": "ns", "resourceVersion": version},
            "spec": {"holderIdentity": holder, "renewTime": renew,
                     "leaseDurationSeconds": seconds, "leaseTransitions": 2}}


@pytest.mark.parametrize(("current", "unchanged_for", "action"), [
    (None, 0.0, Action.CREATE),
    (lease("me"), 0.0, Action.RENEW),
    (lease("me"), 100.0, Action.RENEW),
    (lease("other"), 0.0, Action.WAIT),
    (lease("other"), 15.0, Action.WAIT),  # a full duration is not yet expiry
    (lease("other"), 15.1, Action.TAKE),
    (lease(""), 0.0, Action.TAKE),  # released on a clean stop
    (lease("other", seconds=60), 30.0, Action.WAIT),  # the Lease's own duration counts
])
def test_decisions(current: dict[str, Any] | None, unchanged_for: float, action: Action) -> None:
    assert decide(current, "me", unchanged_for, 15.0) is action


def test_expiry_is_judged_by_the_record_changing_not_by_clocks() -> None:
    """A renewal changes renewTime and resourceVersion: the candidate's timer restarts."""
    a, b = lease("other"), lease("other", renew="2026-03-01T12:00:04.000000Z", version="8")
    assert record(a) != record(b)
    assert record(a) == record(lease("other"))
    # renewTime far in the past by this node's clock, yet just renewed: still WAIT.
    stale_clock = lease("other", renew="2020-01-01T00:00:00.000000Z")
    assert decide(stale_clock, "me", 0.0, 15.0) is Action.WAIT


def test_lease_body_when_taking_and_renewing() -> None:
    taken = lease_body("ns", "l", "me", NOW, 15, lease("other"))
    assert taken["metadata"]["resourceVersion"] == "7"  # a concurrent taker gets 409
    assert taken["spec"]["holderIdentity"] == "me"
    assert taken["spec"]["leaseTransitions"] == 3
    assert taken["spec"]["acquireTime"] == taken["spec"]["renewTime"] == \
        "2026-03-01T12:00:00.000000Z"
    renewed = lease_body("ns", "l", "me", NOW, 15, {**taken, "metadata": {
        **taken["metadata"], "resourceVersion": "9"}})
    assert renewed["spec"]["leaseTransitions"] == 3  # a renewal is no transition
    assert renewed["spec"]["acquireTime"] == taken["spec"]["acquireTime"]
    created = lease_body("ns", "l", "me", NOW, 15, None)
    assert "resourceVersion" not in created["metadata"]
    assert created["spec"]["leaseTransitions"] == 0
    assert created["apiVersion"] == "coordination.k8s.io/v1" and created["kind"] == "Lease"
