"""The handlers' pure parts: reading a Job's outcome, the status write decision.

The handlers themselves run against the API emulator (tests/integration) and the real control
plane (tests/cluster); these pin what a real server's objects look like when read.
"""

from __future__ import annotations

from typing import Any

from leanserve.operator.constants import JobState
from leanserve.operator.handlers import (
    job_observation,
    merge_patch,
    status_changed,
    termination,
    waiting_reason,
)


def pod(name: str, created: str, message: str, index: str = "0") -> dict[str, Any]:
    return {"metadata": {"name": name, "creationTimestamp": created,
                         "annotations": {"batch.kubernetes.io/job-completion-index": index}},
            "status": {"containerStatuses": [{"state": {"terminated": {"message": message}}}]}}


def test_the_newest_attempt_of_the_leading_pod_speaks() -> None:
    """Issue 14 item 12: with backoffLimit retries, older failed pods stay; the newest one's
    termination message is the Job's outcome, whatever order the API lists them in."""
    pods = [pod("j-0-new", "2026-03-01T12:10:00Z", '{"v": 1}'),
            pod("j-0-old", "2026-03-01T12:00:00Z", "OOMKilled"),
            pod("j-1-x", "2026-03-01T12:20:00Z", "worker 1", index="1")]
    assert termination(pods) == '{"v": 1}'
    assert termination(list(reversed(pods))) == '{"v": 1}'
    assert termination([]) == ""


def test_a_job_observation_carries_uid_age_and_whether_it_started() -> None:
    job = {"metadata": {"name": "j", "uid": "u", "creationTimestamp": "2026-03-01T12:00:00Z"},
           "status": {}}
    obs = job_observation(job, [], "FailedCreate: exceeded quota")
    assert (obs.state, obs.uid, obs.started, obs.waiting) == (JobState.RUNNING, "u", False,
                                                              "FailedCreate: exceeded quota")
    assert obs.created is not None and obs.created.hour == 12
    done = {**job, "status": {"startTime": "x", "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}}
    assert job_observation(done, []).state is JobState.FAILED and job_observation(done, []).started
    # what the Job controller writes before any pod runs: startTime at its first sync (also when
    # a quota refuses every pod), active for a pending pod; a pod runs once one is ready
    for waiting in ({"startTime": "x"}, {"startTime": "x", "active": 1, "ready": 0}):
        assert not job_observation({**job, "status": waiting}, []).started, waiting
    assert job_observation({**job, "status": {"startTime": "x", "active": 1, "ready": 1}},
                           []).started


def test_why_no_pod_runs_in_the_clusters_words() -> None:
    pending = {"metadata": {"name": "j-0-a"}, "status": {"conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/3 nodes are available: 3 Insufficient cpu."}]}}
    assert "Insufficient cpu" in waiting_reason([pending], [])
    events = [{"type": "Normal", "reason": "SuccessfulCreate", "lastTimestamp": "2"},
              {"type": "Warning", "reason": "FailedCreate", "lastTimestamp": "1",
               "message": 'pods "j-0-a" is forbidden: exceeded quota: compute'}]
    assert waiting_reason([], events) == \
        'FailedCreate: pods "j-0-a" is forbidden: exceeded quota: compute'


def test_status_is_compared_after_the_merge_patch_it_is_written_as() -> None:
    stored = {"phase": "Failed", "recipe": {"hash": "a", "job": "j", "outcome": "JobFailed",
                                            "message": "m"}, "autoscaling": {"x": 1}}
    same = {"phase": "Failed", "recipe": {"hash": "a", "job": "j", "retry": None,
                                          "outcome": "JobFailed", "message": "m"}}
    assert not status_changed(stored, same)  # None removes a key that is absent anyway
    new_recipe = {"recipe": {"hash": "b", "job": "k", "retry": None, "outcome": None,
                             "message": None}}
    assert status_changed(stored, new_recipe)
    merged = merge_patch(stored, new_recipe)
    assert merged["recipe"] == {"hash": "b", "job": "k"}  # the old outcome does not linger
    assert merged["autoscaling"] == {"x": 1}  # the autoscaler's keys are not the operator's
    assert not status_changed({"cost": {"hourly": 1}}, {"cost": {"hourly": 1.0}})


def test_a_stale_body_is_planned_from_the_whole_status_the_operator_left() -> None:
    """Status writes the watch has not caught up with (an API server restart makes it lag):
    the operator plans from the whole status its writes left (write_status remembers it), never
    from the stale body merged with its last patch. Two writes: the second patch omits the
    artifact the first recorded (tests/cluster/test_operator_apiserver_restart.py hit a
    recorded outcome with nothing to serve). A new recipe: its patch removes the old outcome
    (null), which a merge into the stale body would bring back (the old Job's selection
    "compressed" the new recipe; tests/cluster/test_operator_lifecycle.py's spec edit)."""
    from leanserve.operator import builders, planner
    from tests.unit.test_operator_builders import spec_of
    from tests.unit.test_operator_planner import JP, NOW, OWNER, SPEC, S, report

    def plan(status: dict[str, Any], observed: planner.Observed = planner.Observed(),
             spec: Any = SPEC) -> planner.Desired:
        return planner.plan(planner.Resource(OWNER, 1, spec, (), status), observed, NOW, S)

    stale: dict[str, Any] = {"phase": "Compressing", "observedGeneration": 1}
    first = plan(stale, planner.Observed(job=planner.JobObservation(
        JP.name, JobState.SUCCEEDED, termination=report())))
    left = merge_patch(stale, first.status)  # what write_status remembers
    second = plan(left)
    assert "artifact" not in second.status  # a patch: the artifact is not repeated
    left = merge_patch(left, second.status)
    assert left["artifact"]["uri"]
    again = plan(left)
    assert next(o["kind"] for o in again.apply) == "Deployment"

    serving = {**left, "phase": "Serving"}
    edited = spec_of(compression={"candidates": [
        {"name": "other", "steps": [{"quantize": {"method": "int8-dynamic"}}]}]})
    new_job = builders.job_plan(OWNER, edited).name
    moved = plan(serving, spec=edited)
    assert moved.job is not None and moved.job["metadata"]["name"] == new_job
    assert moved.status["recipe"]["outcome"] is None  # removes the old recipe's outcome
    left = merge_patch(serving, moved.status)
    assert plan(left, planner.Observed(job=planner.JobObservation(
        new_job, JobState.RUNNING)), spec=edited).status["phase"] == "Compressing"
    # What merging the whole status into the stale body would do: the old outcome is back.
    assert merge_patch(serving, left)["recipe"]["outcome"] == "Compressed"
