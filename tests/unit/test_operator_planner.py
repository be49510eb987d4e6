"""The pure planner: situations in, children/status/events out (no cluster, no clock)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from leanserve.operator import builders, handback, planner
from leanserve.operator.constants import JobState, MonitorKind
from leanserve.operator.planner import DeploymentObservation, JobObservation, Observed, Resource
from leanserve.operator.settings import OperatorSettings
from tests.unit.test_operator_builders import OWNER, spec_of

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
S = OperatorSettings()
SPEC = spec_of()
JP = builders.job_plan(OWNER, SPEC)
PROFILE = {"cpu": {"capacity_rps": 50, "cost_per_million_requests": 0.6, "measured": True},
           "gpu-t4": {"capacity_rps": 900, "cost_per_million_requests": 0.15, "measured": False}}


def report(selected: str | None = "int8", pools: dict[str, Any] | None = None) -> str:
    r = {"metric": "cosine", "selected": selected, "baseline": {"quality": 1.0},
         "candidates": [{"name": "int8", "passed": selected is not None, "quality": 0.99}]}
    return handback.encode(handback.summarize(r, "pvc://models/x/model_repository", "f" * 64,
                                              {"pools": pools} if pools else None))


def compressed_status(pools: dict[str, Any] | None = None) -> dict[str, Any]:
    summary = handback.decode(report(pools=pools))
    assert summary is not None
    return {"compression": {**summary, "recipeHash": JP.recipe, "job": JP.name},
            "artifact": summary["artifact"], "phase": "Deploying"}


def conds(desired: planner.Desired) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in desired.status["conditions"]}


def kinds(objs: list[dict[str, Any]]) -> list[str]:
    return [o["kind"] for o in objs]


def created(d: planner.Desired) -> list[str]:
    """The compression objects a plan applies: the Job (when absent) and what it owns."""
    return kinds(([d.job] if d.job is not None else []) + d.job_owned)


CASES = {
    "new": (Observed(), {}, "Compressing", ["Job", "ConfigMap"], []),
    "running": (Observed(job=JobObservation(JP.name, JobState.RUNNING)), {}, "Compressing",
                ["ConfigMap"], []),
    "failed": (Observed(job=JobObservation(JP.name, JobState.FAILED, "DeadlineExceeded", "",
                                           "oom")), {}, "Failed", [], []),
    "succeeded": (Observed(job=JobObservation(JP.name, JobState.SUCCEEDED, termination=report())),
                  {}, "Deploying", [], ["Deployment", "Service", "PodDisruptionBudget"]),
    "no-candidate": (Observed(job=JobObservation(JP.name, JobState.SUCCEEDED,
                                                 termination=report(None))), {}, "Failed", [], []),
    "no-report": (Observed(job=JobObservation(JP.name, JobState.SUCCEEDED, termination="logs")),
                  {}, "Failed", [], []),
    "available": (Observed(deployments={"cpu": DeploymentObservation(
        "cpu", 2, 2, 2, True, "f" * 64)}), compressed_status(), "Serving", [],
        ["Deployment", "Service", "PodDisruptionBudget"]),
    "degraded": (Observed(deployments={"cpu": DeploymentObservation(
        "cpu", 3, 1, 3, False, "f" * 64)}), compressed_status(), "Degraded", [],
        ["Deployment", "Service", "PodDisruptionBudget"]),
    "old-artifact": (Observed(deployments={"cpu": DeploymentObservation(
        "cpu", 1, 1, 1, True, "0" * 64)}), compressed_status(), "Deploying", [],
        ["Deployment", "Service", "PodDisruptionBudget"]),
    "monitor": (Observed(monitor=MonitorKind.POD_MONITOR), compressed_status(), "Deploying", [],
                ["Deployment", "Service", "PodDisruptionBudget", "PodMonitor"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_matrix(case: str) -> None:
    observed, status, phase, compression, apply = CASES[case]
    d = planner.plan(Resource(OWNER, 3, SPEC, (), status), observed, NOW, S)
    assert d.status["phase"] == phase
    assert created(d) == compression
    assert kinds(d.apply) == apply
    assert d.status["observedGeneration"] == 3
    ready = conds(d)["Ready"]
    assert ready[0] == ("True" if phase == "Serving" else "False")
    old = status.get("phase", "Pending")
    transitions = [e for e in d.events if e.message.startswith(f"{old} -> {phase}:")]
    assert len(transitions) == int(old != phase)
    for e in transitions:  # the phase Event carries the new Ready reason
        assert e.reason == conds(d)["Ready"][1]
        assert e.warning == (phase in ("Failed", "Degraded"))


def test_failed_job_message_has_reason_and_logs() -> None:
    obs = Observed(job=JobObservation(JP.name, JobState.FAILED, "BackoffLimitExceeded",
                                      "Job has reached the specified backoff limit",
                                      "Traceback\nValueError: bad data"))
    d = planner.plan(Resource(OWNER, 1, SPEC), obs, NOW, S)
    c = next(x for x in d.status["conditions"] if x["type"] == "Compressed")
    assert c["reason"] == "JobFailed"
    assert "BackoffLimitExceeded" in c["message"] and "ValueError: bad data" in c["message"]
    assert [(e.reason, e.warning) for e in d.events] == [("JobFailed", True)]


def test_every_transition_posts_one_event_failed_as_warning() -> None:
    """Pending -> Compressing -> Failed: one Event each; the reason change of Compressed
    (Compressing -> JobFailed, status False both times) is what the Failed Event says."""
    first = planner.plan(Resource(OWNER, 1, SPEC), Observed(), NOW, S)
    assert [(e.reason, e.warning) for e in first.events] == [("Compressing", False)]
    assert first.events[0].message.startswith("Pending -> Compressing:")
    failed = Observed(job=JobObservation(JP.name, JobState.FAILED, "DeadlineExceeded"))
    second = planner.plan(Resource(OWNER, 1, SPEC, (), first.status), failed,
                          NOW + timedelta(minutes=1), S)
    assert [(e.reason, e.warning) for e in second.events] == [("JobFailed", True)]
    assert second.events[0].message.startswith("Compressing -> Failed: ")
    assert "DeadlineExceeded" in second.events[0].message
    again = planner.plan(Resource(OWNER, 1, SPEC, (), second.status), failed,
                         NOW + timedelta(minutes=2), S)
    assert again.events == []  # the same failure seen again is no new Event


def test_invalid_spec_plans_no_children() -> None:
    res = Resource(OWNER, 2, None, ("spec.slo.latencyP95Ms: must be > 0 (got -1)",))
    d = planner.plan(res, Observed(), NOW, S)
    assert (d.job, d.job_owned, d.apply, d.delete) == (None, [], [], [])
    assert conds(d)["Ready"] == ("False", "InvalidSpec")
    assert "spec.slo.latencyP95Ms" in d.status["conditions"][0]["message"]


def test_transition_time_changes_only_with_status() -> None:
    res = Resource(OWNER, 1, SPEC, (), compressed_status())
    obs = Observed(deployments={"cpu": DeploymentObservation("cpu", 2, 2, 2, True, "f" * 64)})
    first = planner.plan(res, obs, NOW, S)
    again = planner.plan(Resource(OWNER, 1, SPEC, (), {**compressed_status(), **first.status}),
                         obs, NOW + timedelta(minutes=5), S)
    assert first.status["conditions"] == again.status["conditions"]
    assert again.events == []  # nothing changed, nothing to announce
    broken = Observed(deployments={"cpu": DeploymentObservation("cpu", 2, 1, 2, False, "f" * 64)})
    later = planner.plan(Resource(OWNER, 1, SPEC, (), {**compressed_status(), **first.status}),
                         broken, NOW + timedelta(minutes=9), S)
    ready = next(c for c in later.status["conditions"] if c["type"] == "Ready")
    assert ready["lastTransitionTime"] == "2026-03-01T12:09:00Z"


def test_pool_choice_cheapest_per_million_that_meets_slo() -> None:
    choice = planner.choose_pool(SPEC, PROFILE)
    assert (choice.pool.name, choice.meets_slo) == ("gpu-t4", True)
    slow_gpu = {**PROFILE, "gpu-t4": {"capacity_rps": 0, "cost_per_million_requests": 0.1}}
    assert planner.choose_pool(SPEC, slow_gpu).pool.name == "cpu"
    none = planner.choose_pool(SPEC, None)
    assert none.pool.name == "cpu" and none.meets_slo is None and "hourlyPrice" in none.message
    nothing = planner.choose_pool(SPEC, {"cpu": {"capacity_rps": 0}})
    assert nothing.meets_slo is False


def test_pool_change_keeps_old_deployment_until_new_one_serves() -> None:
    status = compressed_status(PROFILE)  # the profile now picks gpu-t4
    old = DeploymentObservation("cpu", 1, 1, 1, True, "f" * 64)
    d = planner.plan(Resource(OWNER, 1, SPEC, (), status), Observed(deployments={"cpu": old}),
                     NOW, S)
    assert d.apply[0]["metadata"]["name"] == "minilm-gpu-t4" and d.delete == []
    new = DeploymentObservation("gpu-t4", 1, 1, 1, True, "f" * 64)
    d = planner.plan(Resource(OWNER, 1, SPEC, (), status),
                     Observed(deployments={"cpu": old, "gpu-t4": new}), NOW, S)
    assert d.status["phase"] == "Serving" and d.delete == [("Deployment", "minilm-cpu")]


def test_budget_condition() -> None:
    """A budget that the cheapest pool fits (validation refuses one below it) but the pool the
    profile makes cheapest per request does not: gpu-t4 at $0.50 an hour against $0.30."""
    spec = spec_of(autoscaling={"minReplicas": 1, "maxReplicas": 5, "maxHourlyCost": 0.3})
    jp = builders.job_plan(OWNER, spec)
    done = compressed_status(PROFILE)
    status = {**done, "compression": {**done["compression"], "recipeHash": jp.recipe}}
    d = planner.plan(Resource(OWNER, 1, spec, (), status), Observed(), NOW, S)
    assert conds(d)["BudgetMet"] == ("False", "OverBudget")
    assert d.status["cost"]["hourly"] == pytest.approx(0.5)


def test_summary_fits_the_termination_message_limit() -> None:
    cands = [{"name": f"cand-{i}", "passed": False, "quality": 0.5, "error": "x" * 300}
             for i in range(30)]
    text = handback.encode(handback.summarize(
        {"selected": "cand-7", "candidates": cands}, "pvc://m/r", "a" * 64, {"pools": PROFILE}))
    assert len(text.encode()) <= 4096
    decoded = handback.decode(text)
    assert decoded is not None and decoded["candidates"][0]["name"] == "cand-7"
    assert handback.decode("Traceback ...") is None


# ------------------------------------------------------------- outcomes by recipe (3, 4)

FAILED_JOB = JobObservation(JP.name, JobState.FAILED, "BackoffLimitExceeded", "", "oom")
NO_CANDIDATE = JobObservation(JP.name, JobState.SUCCEEDED, termination=report(None))
NO_REPORT = JobObservation(JP.name, JobState.SUCCEEDED, termination="log lines only")


@pytest.mark.parametrize("job,reason", [(FAILED_JOB, "JobFailed"),
                                        (NO_CANDIDATE, "NoCandidatePassed"),
                                        (NO_REPORT, "ReportMissing")])
def test_a_recipe_outcome_stays_after_the_ttl_controller_deletes_the_job(
        job: JobObservation, reason: str) -> None:
    """Issue 14 items 3 and 4: the outcome is recorded by recipe (and Job) in status.recipe;
    once recorded, the Job is never looked at again and never made again — not when the TTL
    controller deletes it a week later (observed: no Job), not on any later resync."""
    first = planner.plan(Resource(OWNER, 1, SPEC, (), {"phase": "Compressing"}),
                         Observed(job=job), NOW, S)
    assert first.status["phase"] == "Failed" and conds(first)["Compressed"] == ("False", reason)
    assert first.status["recipe"]["outcome"] == reason and first.status["recipe"]["job"] == JP.name
    assert "leanserve.io/retry" in first.status["recipe"]["message"]
    stored = {"phase": "Compressing", **first.status}
    res = Resource(OWNER, 1, SPEC, (), stored)
    assert planner.job_to_observe(res) is None  # no GET of the Job
    week = planner.plan(res, Observed(), NOW + timedelta(days=8), S)
    assert week.job is None and week.job_owned == []
    assert week.status["phase"] == "Failed" and conds(week)["Compressed"] == ("False", reason)
    assert conds(week)["Ready"] == ("False", reason)
    assert week.status["recipe"] == first.status["recipe"]
    assert week.events == []


def test_no_candidate_keeps_the_report_in_status() -> None:
    d = planner.plan(Resource(OWNER, 1, SPEC), Observed(job=NO_CANDIDATE), NOW, S)
    assert d.status["compression"]["selected"] is None
    assert d.status["compression"]["candidates"][0]["name"] == "int8"
    assert d.status["compression"]["recipeHash"] == JP.recipe
    assert "artifact" not in d.status and d.apply == []


def test_retry_annotation_or_spec_change_runs_the_recipe_again() -> None:
    failed = planner.plan(Resource(OWNER, 1, SPEC), Observed(job=FAILED_JOB), NOW, S).status
    retry = Resource(OWNER, 1, SPEC, (), failed, retry="2026-03-02")
    name = planner.job_to_observe(retry)
    assert name is not None and name != JP.name and name.startswith(JP.name + "-")
    again = planner.plan(retry, Observed(), NOW, S)
    assert again.job is not None and again.job["metadata"]["name"] == name
    assert again.status["phase"] == "Compressing"
    assert again.status["recipe"] == {"hash": JP.recipe, "job": name, "retry": "2026-03-02",
                                      "outcome": None, "message": None}
    # The same annotation value again is the same retry: its outcome is kept once known.
    done = planner.plan(retry, Observed(job=replace_name(FAILED_JOB, name)), NOW, S).status
    assert planner.job_to_observe(Resource(OWNER, 1, SPEC, (), done, retry="2026-03-02")) is None
    # A spec change is a new recipe: a new Job, with or without an annotation.
    spec = spec_of(compression={"candidates": [
        {"name": "int8-static", "steps": [{"quantize": {"method": "int8-static"}}]}]})
    changed = planner.plan(Resource(OWNER, 2, spec, (), failed), Observed(), NOW, S)
    assert changed.job is not None and changed.job["metadata"]["name"] != JP.name


def replace_name(job: JobObservation, name: str) -> JobObservation:
    return dataclasses.replace(job, name=name)


def test_a_succeeded_recipe_is_not_rerun_and_serves() -> None:
    ok = planner.plan(Resource(OWNER, 1, SPEC), Observed(job=JobObservation(
        JP.name, JobState.SUCCEEDED, termination=report())), NOW, S)
    assert ok.status["recipe"]["outcome"] == "Compressed"
    res = Resource(OWNER, 1, SPEC, (), {**ok.status, "compression": ok.status["compression"]})
    assert planner.job_to_observe(res) is None
    later = planner.plan(res, Observed(), NOW + timedelta(days=8), S)
    assert later.job is None and later.status["phase"] == "Deploying"


# ---------------------------------------------------------------- refusals, start (8)


def test_an_api_refusal_reaches_status_with_the_servers_message() -> None:
    """Issue 14 item 8, the planner's half (the handler's half runs against a real server)."""
    d = planner.plan(Resource(OWNER, 1, SPEC), Observed(), NOW, S)
    msg = 'Kubernetes API answered 403: jobs "minilm-compress-x" is forbidden: exceeded ' \
          "quota: compute, requested: requests.cpu=2, used: requests.cpu=0, limited: " \
          "requests.cpu=1"
    r = planner.refused(Resource(OWNER, 1, SPEC), d, msg, NOW)
    assert conds(r)["Ready"] == ("False", "APIRefused")
    ready = next(c for c in r.status["conditions"] if c["type"] == "Ready")
    assert ready["message"] == msg
    assert conds(r)["Compressed"] == conds(d)["Compressed"]
    assert [(e.reason, e.warning) for e in r.events] == [("APIRefused", True)]
    again = planner.refused(Resource(OWNER, 1, SPEC, (), r.status), d, msg,
                            NOW + timedelta(seconds=30))
    assert again.events == []  # the same refusal is no new Event
    assert next(c for c in again.status["conditions"] if c["type"] == "Ready")[
        "lastTransitionTime"] == ready["lastTransitionTime"]


def test_a_job_that_cannot_start_says_why() -> None:
    created_at = NOW - timedelta(seconds=S.job.start_timeout_seconds + 5)
    stuck = JobObservation(JP.name, JobState.RUNNING, created=created_at, started=False,
                           waiting="FailedCreate: pods is forbidden: exceeded quota: compute")
    d = planner.plan(Resource(OWNER, 1, SPEC), Observed(job=stuck), NOW, S)
    c = next(x for x in d.status["conditions"] if x["type"] == "Compressed")
    assert c["reason"] == "JobNotStarting" and "exceeded quota: compute" in c["message"]
    young = JobObservation(JP.name, JobState.RUNNING, created=NOW, started=False)
    assert conds(planner.plan(Resource(OWNER, 1, SPEC), Observed(job=young), NOW, S))[
        "Compressed"] == ("False", "Compressing")


# ------------------------------------------------------------ Deployment readiness (12)


def test_deployment_ready_only_when_its_controller_saw_the_current_spec() -> None:
    """An Available condition and readyReplicas from before the last spec change (status
    observedGeneration behind metadata.generation) do not make the model Serving."""
    stale = DeploymentObservation("cpu", 1, 1, 1, True, "f" * 64, generation=3,
                                  observed_generation=2)
    d = planner.plan(Resource(OWNER, 1, SPEC, (), compressed_status()),
                     Observed(deployments={"cpu": stale}), NOW, S)
    assert d.status["phase"] == "Deploying"
    fresh = DeploymentObservation("cpu", 1, 1, 1, True, "f" * 64, generation=3,
                                  observed_generation=3)
    d = planner.plan(Resource(OWNER, 1, SPEC, (), compressed_status()),
                     Observed(deployments={"cpu": fresh}), NOW, S)
    assert d.status["phase"] == "Serving"


def test_the_plan_serves_the_gpu_repository_only_on_a_gpu_pool_when_the_job_wrote_it() -> None:
    """Issue 14 item 10 through the planner: the Job's artifact record says whether the
    KIND_GPU sibling exists (handback ``artifact.gpu``)."""
    def args(status: dict[str, Any], pool: str) -> str:
        d = planner.plan(Resource(OWNER, 1, SPEC, (), status), Observed(), NOW, S)
        dep = next(o for o in d.apply if o["kind"] == "Deployment")
        assert dep["metadata"]["labels"]["leanserve.io/pool"] == pool
        return " ".join(dep["spec"]["template"]["spec"]["containers"][0]["args"])
    with_gpu = compressed_status(PROFILE)  # the profile picks gpu-t4
    with_gpu["compression"]["artifact"]["gpu"] = True
    assert "--model-repository=/models/x/model_repository-gpu" in args(with_gpu, "gpu-t4")
    without = compressed_status(PROFILE)
    assert "--model-repository=/models/x/model_repository " in args(without, "gpu-t4") + " "
    cpu = compressed_status()  # no profile: the cheapest pool, cpu
    cpu["compression"]["artifact"]["gpu"] = True
    assert "model_repository-gpu" not in args(cpu, "cpu")


# -------------------------------------------------------------------------- claims (11)


@pytest.mark.parametrize(("modes", "reason"), [
    (("ReadWriteOnce",), "ClaimNotShared"), (("ReadWriteOncePod",), "ClaimNotShared"),
    (None, "ClaimMissing")])
def test_a_claim_every_pod_cannot_mount_is_said_before_anything_is_made(
        modes: tuple[str, ...] | None, reason: str) -> None:
    """Issue 14 item 11: the Job and every serving replica mount the model's claim, on any
    node: ReadWriteMany or ReadOnlyMany. Not an outcome: a fixed claim lets the next pass on."""
    d = planner.plan(Resource(OWNER, 1, SPEC), Observed(claims={"models": modes}), NOW, S)
    assert d.job is None and d.job_owned == [] and d.status["phase"] == "Failed"
    c = next(x for x in d.status["conditions"] if x["type"] == "Compressed")
    assert c["reason"] == reason and "models" in c["message"]
    if modes:
        assert "ReadWriteMany" in c["message"] and modes[0] in c["message"]
    assert d.status["recipe"]["outcome"] is None
    ok = planner.plan(Resource(OWNER, 1, SPEC, (), d.status),
                      Observed(claims={"models": ("ReadWriteMany",)}), NOW, S)
    assert ok.job is not None and ok.status["phase"] == "Compressing"


# ------------------------------------------------ the autoscaler's decision (issue 15)


def decided(replicas: dict[str, int], **extra: Any) -> dict[str, Any]:
    """A Serving model's status whose autoscaler last decided ``replicas``."""
    return {**compressed_status(PROFILE), "phase": "Serving",
            "autoscaling": {"last": {"time": 1.0, "replicas": replicas, "code": "ScaleUp",
                                     "reason": "test"}, **extra}}


def serving(pool: str, replicas: int = 1, ready: int | None = None) -> DeploymentObservation:
    ready = replicas if ready is None else ready
    return DeploymentObservation(pool, replicas, ready, replicas, ready >= replicas, "f" * 64)


def deployments(d: planner.Desired) -> dict[str, int]:
    return {o["metadata"]["labels"]["leanserve.io/pool"]: o["spec"]["replicas"]
            for o in d.apply if o["kind"] == "Deployment"}


def test_a_pool_switch_decided_by_the_autoscaler_keeps_the_old_pool_until_the_new_serves() -> None:
    """cpu -> gpu-t4: both Deployments while gpu-t4 starts (each pool's own repository), the
    model stays Serving on cpu; cpu's Deployment goes only once gpu-t4 serves and the decision
    set cpu to 0."""
    switching = Resource(OWNER, 1, SPEC, (), decided({"cpu": 2, "gpu-t4": 1}))
    d = planner.plan(switching, Observed(deployments={"cpu": serving("cpu", 2)}), NOW, S)
    assert deployments(d) == {"cpu": 2, "gpu-t4": 1} and d.delete == []
    assert d.status["phase"] == "Serving" and "rolling out gpu-t4" in d.status["conditions"][
        [c["type"] for c in d.status["conditions"]].index("Ready")]["message"]
    assert d.status["serving"]["pool"] == "cpu,gpu-t4"
    assert d.status["cost"]["hourly"] == 2 * 0.1 + 0.5
    starting = Observed(deployments={"cpu": serving("cpu", 2), "gpu-t4": serving("gpu-t4", 1, 0)})
    assert planner.plan(switching, starting, NOW, S).delete == []
    # Each pool its own repository: KIND_GPU on the GPU pool (the Job wrote it), KIND_CPU on cpu.
    with_gpu = decided({"cpu": 2, "gpu-t4": 1})
    with_gpu["compression"]["artifact"]["gpu"] = True
    d = planner.plan(Resource(OWNER, 1, SPEC, (), with_gpu), starting, NOW, S)
    repos = {o["metadata"]["labels"]["leanserve.io/pool"]: o["spec"]["template"]["spec"][
        "containers"][0]["args"][0] for o in d.apply if o["kind"] == "Deployment"}
    assert repos == {"cpu": "--model-repository=/models/x/model_repository",
                     "gpu-t4": "--model-repository=/models/x/model_repository-gpu"}

    done = Resource(OWNER, 1, SPEC, (), decided({"cpu": 0, "gpu-t4": 1}))
    both = Observed(deployments={"cpu": serving("cpu", 0), "gpu-t4": serving("gpu-t4", 1, 0)})
    d = planner.plan(done, both, NOW, S)
    assert d.delete == [] and d.status["phase"] == "Deploying"  # gpu-t4 not ready: cpu stays
    both = Observed(deployments={"cpu": serving("cpu", 0), "gpu-t4": serving("gpu-t4", 1)})
    d = planner.plan(done, both, NOW, S)
    assert deployments(d) == {"gpu-t4": 1} and d.delete == [("Deployment", "minilm-cpu")]
    assert d.status["serving"] == {"pool": "gpu-t4", "replicas": 1, "readyReplicas": 1,
                                   "endpoint": "minilm.ml.svc:8000"}


def test_without_a_usable_decision_the_profile_choice_stands() -> None:
    for status in (compressed_status(PROFILE), decided({"gone": 3}), decided({"cpu": 0}),
                   decided({"cpu": "x"})):  # type: ignore[dict-item]
        d = planner.plan(Resource(OWNER, 1, SPEC, (), status), Observed(), NOW, S)
        assert deployments(d) == {"gpu-t4": 1}, status.get("autoscaling")


def test_the_autoscaling_condition_says_why_the_autoscaler_cannot_act() -> None:
    up = Observed(deployments={"cpu": serving("cpu")})
    none = planner.plan(Resource(OWNER, 1, SPEC, (), {**compressed_status(), "phase": "Serving"}),
                        up, NOW, S)
    assert conds(none)["Autoscaling"] == ("False", "NoProfile")
    assert [(e.reason, e.warning) for e in none.events] == [("NoProfile", True)]

    pending = planner.plan(Resource(OWNER, 1, SPEC, (), compressed_status(PROFILE)),
                           Observed(deployments={"gpu-t4": serving("gpu-t4")}), NOW, S)
    assert conds(pending)["Autoscaling"] == ("Unknown", "Pending")
    active = planner.plan(Resource(OWNER, 1, SPEC, (), decided({"gpu-t4": 1})),
                          Observed(deployments={"gpu-t4": serving("gpu-t4")}), NOW, S)
    assert conds(active)["Autoscaling"] == ("True", "Active")

    stuck = decided({"gpu-t4": 1}, state={"reason": "MetricsUnavailable",
                                           "message": "request rate: Prometheus unreachable"})
    stuck["conditions"] = active.status["conditions"]
    d = planner.plan(Resource(OWNER, 1, SPEC, (), stuck),
                     Observed(deployments={"gpu-t4": serving("gpu-t4")}), NOW, S)
    cond = next(c for c in d.status["conditions"] if c["type"] == "Autoscaling")
    assert (cond["status"], cond["reason"]) == ("False", "MetricsUnavailable")
    assert "Prometheus unreachable" in cond["message"]
    assert [(e.reason, e.warning) for e in d.events] == [("MetricsUnavailable", True)]


def test_a_scale_of_a_serving_pool_is_no_rollout_but_lost_replicas_are_degraded() -> None:
    """The autoscaler's scale bumps the Deployment's generation and a scale-up is not Available
    until its pods are Ready: a model that served this artifact stays Serving. Replicas lost
    (fewer Ready than the status last said) are Degraded; a new artifact is a rollout again."""
    first = planner.plan(Resource(OWNER, 1, SPEC, (), decided({"cpu": 1})),
                         Observed(deployments={"cpu": serving("cpu")}), NOW, S)
    assert first.status["phase"] == "Serving" and first.status["servedArtifact"] == "f" * 64
    before = {**decided({"cpu": 2}), **first.status}
    scaling = DeploymentObservation("cpu", 2, 1, 2, False, "f" * 64, generation=2,
                                    observed_generation=1)
    d = planner.plan(Resource(OWNER, 1, SPEC, (), before), Observed(deployments={"cpu": scaling}),
                     NOW, S)
    assert d.status["phase"] == "Serving" and d.events == []
    starting = dataclasses.replace(scaling, observed_generation=2)
    d = planner.plan(Resource(OWNER, 1, SPEC, (), before), Observed(deployments={"cpu": starting}),
                     NOW, S)
    assert d.status["phase"] == "Serving" and d.events == []

    full = {**before, "serving": {**before["serving"], "readyReplicas": 2}}
    d = planner.plan(Resource(OWNER, 1, SPEC, (), full), Observed(deployments={"cpu": starting}),
                     NOW, S)
    assert d.status["phase"] == "Degraded"

    other = {**before, "servedArtifact": "e" * 64}
    d = planner.plan(Resource(OWNER, 1, SPEC, (), other), Observed(deployments={"cpu": scaling}),
                     NOW, S)
    assert d.status["phase"] == "Deploying"


# ------------------------------------------------ kstatus: Reconciling and Stalled (GitOps)


def progress(d: planner.Desired) -> dict[str, tuple[str, str, str]]:
    """The kstatus conditions of a plan: type -> (status, reason, message)."""
    return {c["type"]: (c["status"], c["reason"], c["message"]) for c in d.status["conditions"]
            if c["type"] in ("Reconciling", "Stalled")}


def ready_of(d: planner.Desired) -> tuple[str, str]:
    c = next(c for c in d.status["conditions"] if c["type"] == "Ready")
    return c["reason"], c["message"]


@pytest.mark.parametrize(("case", "kstatus"), [
    ("new", "Reconciling"), ("running", "Reconciling"), ("succeeded", "Reconciling"),
    ("old-artifact", "Reconciling"), ("monitor", "Reconciling"), ("degraded", "Reconciling"),
    ("failed", "Stalled"), ("no-candidate", "Stalled"), ("no-report", "Stalled"),
    ("available", None),
])
def test_reconciling_while_working_stalled_when_a_person_is_needed(
        case: str, kstatus: str | None) -> None:
    """kstatus' abnormal-true pattern: at most one of them, True, with Ready's reason and
    message; neither (absent, not False) once the model serves."""
    observed, status, _, _, _ = CASES[case]
    d = planner.plan(Resource(OWNER, 3, SPEC, (), status), observed, NOW, S)
    got = progress(d)
    if kstatus is None:
        assert got == {}
        return
    reason, message = ready_of(d)
    assert got == {kstatus: ("True", reason, message)}
    assert all(c["observedGeneration"] == 3 for c in d.status["conditions"])


@pytest.mark.parametrize("errors", [("spec.slo.latencyP95Ms: must be > 0 (got -1)",), ()])
def test_an_invalid_spec_is_stalled_at_once(errors: tuple[str, ...]) -> None:
    d = planner.plan(Resource(OWNER, 2, None, errors), Observed(), NOW, S)
    assert progress(d) == {"Stalled": ("True", "InvalidSpec", ready_of(d)[1])}


def test_a_job_that_cannot_start_is_stalled_and_a_refusal_too() -> None:
    created_at = NOW - timedelta(seconds=S.job.start_timeout_seconds + 5)
    stuck = JobObservation(JP.name, JobState.RUNNING, created=created_at, started=False,
                           waiting="FailedCreate: pods is forbidden: exceeded quota: compute")
    d = planner.plan(Resource(OWNER, 1, SPEC), Observed(job=stuck), NOW, S)
    assert d.status["phase"] == "Compressing"
    assert progress(d) == {"Stalled": ("True", "JobNotStarting", ready_of(d)[1])}
    first = planner.plan(Resource(OWNER, 1, SPEC), Observed(), NOW, S)
    r = planner.refused(Resource(OWNER, 1, SPEC, (), first.status), first, "exceeded quota", NOW)
    assert progress(r) == {"Stalled": ("True", "APIRefused", "exceeded quota")}
    assert [e.reason for e in r.events] == ["APIRefused"]  # no Event of their own


def test_a_pool_joining_while_another_serves_is_reconciling_and_ready() -> None:
    switching = Resource(OWNER, 1, SPEC, (), decided({"cpu": 2, "gpu-t4": 1}))
    d = planner.plan(switching, Observed(deployments={"cpu": serving("cpu", 2)}), NOW, S)
    assert d.status["phase"] == "Serving" and conds(d)["Ready"] == ("True", "Serving")
    status, reason, message = progress(d)["Reconciling"]
    assert (status, reason) == ("True", "RollingOut")
    assert "minilm-gpu-t4 (0/1 ready)" in message and "while cpu serve" in message
    assert "Stalled" not in progress(d)


def test_the_kstatus_conditions_go_away_and_post_no_events_of_their_own() -> None:
    """Compressing -> Failed -> (retry) Compressing -> ... -> Serving: each change of
    Reconciling/Stalled rides on the phase Event; once serving both are gone, so a `kubectl
    get -o yaml` and kstatus see only Ready."""
    first = planner.plan(Resource(OWNER, 1, SPEC), Observed(), NOW, S)
    assert set(progress(first)) == {"Reconciling"}
    failed = planner.plan(Resource(OWNER, 1, SPEC, (), first.status), Observed(job=FAILED_JOB),
                          NOW + timedelta(minutes=1), S)
    assert set(progress(failed)) == {"Stalled"}
    assert [e.reason for e in failed.events] == ["JobFailed"]
    prev = {**compressed_status(), "conditions": failed.status["conditions"]}
    obs = Observed(deployments={"cpu": DeploymentObservation("cpu", 2, 2, 2, True, "f" * 64)})
    up = planner.plan(Resource(OWNER, 1, SPEC, (), prev), obs, NOW + timedelta(minutes=2), S)
    assert progress(up) == {} and conds(up)["Ready"] == ("True", "Serving")
    assert all(e.reason not in ("Reconciling", "Stalled") and not e.message.startswith(
        ("Reconciling=", "Stalled=")) for e in [*first.events, *failed.events, *up.events])
