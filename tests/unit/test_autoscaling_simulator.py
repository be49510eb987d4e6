"""The simulator judges every request: the latency curve fitted to the serving profile, queues
and backlog that carry over, start-up as a parameter; and the shipped settings are what runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from leanserve.api.load import load_one
from leanserve.autoscaling.capacity import DEFAULT_CURVE, LatencyCurve, curve_from_profile
from leanserve.autoscaling.commands import read_profile
from leanserve.autoscaling.errors import TraceError
from leanserve.autoscaling.policy import SETTINGS, PoolCapacity, Target, pools_from_profile
from leanserve.autoscaling.simulate import (
    DEFAULT_STARTUP_SECONDS,
    FRONTIER_TARGETS,
    SimConfig,
    Trace,
    _Queues,
    hpa_for_share,
    simulate,
    simulate_hpa,
)

ROOT = Path(__file__).resolve().parents[2]
POOLS = [PoolCapacity("cpu-small", 40.0, 0.10), PoolCapacity("cpu-large", 170.0, 0.38)]
ONE = [PoolCapacity("a", 100.0, 0.1)]


def test_curve_fitted_to_the_bench_profile_predicts_its_trials():
    spec = load_one(ROOT / "examples/minilm-cpu.yaml").spec
    profile = read_profile(ROOT / "bench/profiles/minilm-cpu.json")
    pools = pools_from_profile(profile, spec)
    curve = pools[0].curve
    assert curve.fitted and curve == curve_from_profile(profile)
    assert [p.hourly_price for p in pools] == [float(p.hourly_price) for p in spec.node_pools]
    grid = next(g for g in profile["grid"] if g["config"] == profile["config"])
    cap, slo = grid["capacity_rps"], profile["slo_latency_p95_ms"]
    for trial in grid["trials"]:
        u, p95 = trial["rate"] / cap, trial["p95_ms"]
        if p95 <= slo:  # every trial within the SLO is predicted within 25%
            assert curve.p95_share(u) * slo == pytest.approx(p95, rel=0.25)
        else:  # and every one beyond it is predicted beyond it
            assert curve.p95_share(u) > 1.0
    # the share within the SLO falls with the load, and load_for inverts it
    assert curve.within(0.5) > curve.within(0.9) > curve.within(1.1)
    assert curve.within(curve.load_for(0.99)) == pytest.approx(0.99)
    assert curve.within(0.5, wait=1.0) == 0.0  # waited a whole SLO behind a backlog


def test_too_few_trials_give_the_default_shape():
    assert curve_from_profile({}) == DEFAULT_CURVE
    assert curve_from_profile({"config": {}, "grid": [{"config": {}, "capacity_rps": 10,
                                                       "trials": [{"rate": 5, "p95_ms": 9}]}],
                               "slo_latency_p95_ms": 100}) == DEFAULT_CURVE


def test_below_capacity_every_step_is_the_curves_share():
    q = _Queues({"a": 0.0})
    req, within, done, pending, p95 = q.step(50.0, {"a": 1}, ONE, 100.0, 10.0)
    assert req == done == 500.0
    assert within == pytest.approx(500.0 * DEFAULT_CURVE.within(0.5))
    assert p95 == pytest.approx(100.0 * DEFAULT_CURVE.p95_share(0.5))
    assert q.backlog["a"] == 0.0 and pending > 0


def test_a_backlog_carries_over_and_delays_the_requests_behind_it():
    q = _Queues({"a": 0.0})
    mu = DEFAULT_CURVE.m * 100.0  # what one pod completes at most
    req, within, done, _, _ = q.step(400.0, {"a": 1}, ONE, 100.0, 10.0)
    assert done == pytest.approx(mu * 10)
    assert q.backlog["a"] == pytest.approx((400.0 - mu) * 10)
    assert within / req < 0.5
    # the load is back to half a pod's capacity, but the requests wait for the backlog first
    _, within2, _, _, _ = q.step(50.0, {"a": 1}, ONE, 100.0, 10.0)
    assert within2 == 0.0 and q.backlog["a"] > 0
    for _ in range(40):
        q.step(50.0, {"a": 1}, ONE, 100.0, 10.0)
    assert q.backlog["a"] == 0.0
    # nothing ready: every request misses
    assert q.step(50.0, {"a": 0}, ONE, 100.0, 10.0)[1] == 0.0


def test_a_queue_timeout_caps_the_backlog_and_rejected_requests_miss():
    mu = DEFAULT_CURVE.m * 100.0
    q = _Queues({"a": 0.0}, timeout_s=0.05)
    req, within, done, _, _ = q.step(400.0, {"a": 1}, ONE, 100.0, 10.0)
    assert req == 4000.0 and done == pytest.approx(mu * 10)
    # the queue holds 50 ms of the pod's work; the rest was rejected, and is not within the SLO
    assert q.backlog["a"] == pytest.approx(0.05 * mu)
    rejected = req - done - q.backlog["a"]
    assert rejected > 2000 and within <= req - rejected
    # the requests Triton accepted wait at most 50 ms: most of them are still within the SLO
    assert within / (req - rejected) > 0.5
    # and once the load falls, the next requests no longer wait behind 30 s of backlog
    _, within2, _, _, _ = q.step(50.0, {"a": 1}, ONE, 100.0, 10.0)
    assert within2 > 0.5 * 500.0 and q.backlog["a"] == 0.0
    # under a sustained overload, shedding keeps more requests within the SLO than queueing
    t = Target(100, 1, 20, 5.0, 10, 60)
    trace = _steps(100.0, 600.0)
    shares = {ms: simulate(trace, POOLS, t, SimConfig(startup_seconds=60.0, queue_timeout_ms=ms),
                           only=("hpa",)).summary()["policies"]["hpa"]["slo_attainment"]
              for ms in (0.0, 50.0)}
    assert shares[50.0] > shares[0.0]


def _steps(low: float, high: float, n: int = 90) -> Trace:
    return Trace(tuple(float(10 * i) for i in range(n)),
                 tuple(low if (i // 15) % 2 == 0 else high for i in range(n)))


def test_attainment_is_per_request_and_the_start_up_matters():
    t = Target(100, 1, 20, 5.0, 10, 60)
    att = {s: simulate(_steps(100.0, 600.0), POOLS, t, SimConfig(startup_seconds=s),
                       only=("leanserve",)).summary()["policies"]["leanserve"]
           for s in (5.0, 120.0)}
    assert att[120.0]["slo_attainment"] < att[5.0]["slo_attainment"]
    for a in att.values():
        assert 0.0 < a["slo_attainment"] <= 1.0 and a["requests"] > 0
        assert "interval_attainment" in a


def test_simulate_runs_only_the_named_contenders_and_records_the_settings():
    t = Target(100, 1, 20, 5.0, 10, 60)
    sim = simulate(_steps(100.0, 300.0, 60), POOLS, t, only=("leanserve", "oracle"))
    assert set(sim.runs) == {"leanserve", "oracle"}
    assert sim.runs["oracle"].cost <= sim.runs["leanserve"].cost
    s = sim.summary()
    assert s["startup_seconds"] == DEFAULT_STARTUP_SECONDS
    assert s["settings"] == {**SETTINGS.__dict__, "startup_seconds": DEFAULT_STARTUP_SECONDS}
    with pytest.raises(TraceError, match="unknown policies"):
        simulate(_steps(1, 2), POOLS, t, only=("leanserve", "vpa"))


def test_hpa_for_share_finds_the_most_utilised_target_that_reaches_a_share():
    t = Target(100, 1, 20, 5.0, 10, 60)
    trace = _steps(100.0, 600.0)  # 6x jumps every 150 s: a 70% HPA misses some at each
    cfg = SimConfig(startup_seconds=30.0)
    h70 = simulate_hpa(trace, POOLS, t, cfg, 0.7)
    assert h70.within / h70.requests < 0.99
    # simulate() runs the same baseline under its own name
    assert simulate(trace, POOLS, t, cfg, only=("hpa",)).runs["hpa"].cost == h70.cost
    found = hpa_for_share(trace, POOLS, t, cfg, 0.99)
    assert found is not None
    u, run = found
    assert u < 0.7 and run.within / run.requests >= 0.99 and run.cost > h70.cost
    # the next, more utilised target on the list did not reach it
    more = FRONTIER_TARGETS[FRONTIER_TARGETS.index(u) - 1]
    r = simulate_hpa(trace, POOLS, t, cfg, more)
    assert r.within / r.requests < 0.99
    # a share no target reaches: None, not a made-up answer
    assert hpa_for_share(trace, POOLS, t, cfg, 1.000001) is None


def test_simulate_command_prints_the_shipped_settings(tmp_path: Path):
    from leanserve.cli import DEFAULT_STARTUP_SECONDS as CLI_DEFAULT
    from leanserve.cli import app

    assert CLI_DEFAULT == DEFAULT_STARTUP_SECONDS
    trace = tmp_path / "t.csv"
    trace.write_text("time_s,requests_per_s\n" + "".join(
        f"{10 * i},{20 + (60 if 20 <= i < 40 else 0)}\n" for i in range(60)))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["simulate", "--trace", str(trace), "--spec",
                                      str(ROOT / "examples/minilm-cpu.yaml"), "--profile",
                                      str(ROOT / "bench/profiles/minilm-cpu.json"), "--out",
                                      str(out), "--startup-seconds", "30"])
    assert result.exit_code == 0, result.output
    assert "PolicySettings() as shipped" in result.output
    assert "target_quantile=0.99" in result.output
    doc = json.loads((out / "simulation.json").read_text())
    assert set(doc["policies"]) == {"leanserve", "static", "hpa", "hpa85", "keda", "oracle"}
    assert doc["settings"]["startup_seconds"] == 30.0
    assert all(0 <= p["slo_attainment"] <= 1 for p in doc["policies"].values())
    assert (out / "simulation.png").is_file()
    # the only bound printed is the proven one (leanserve.autoscaling.bound): below what
    # leanserve paid for the share it reached
    assert "lower bound: no policy" in result.output
    lb = doc["lower_bound"]
    assert lb["share"] == doc["policies"]["leanserve"]["slo_attainment"]
    assert 0 < lb["cost"] <= doc["policies"]["leanserve"]["cost"]
    assert lb["leanserve_over_bound"] >= 1.0
    # and the HPA that serves as many requests within the SLO, beside what leanserve paid
    same = doc["hpa_at_leanserve_share"]
    assert "at equal service: an HPA keeps as many" in result.output
    assert same["slo_attainment"] >= doc["policies"]["leanserve"]["slo_attainment"]
    assert same["utilisation_target"] in FRONTIER_TARGETS
    assert same["leanserve_over_hpa"] == pytest.approx(
        doc["policies"]["leanserve"]["cost"] / same["cost"], rel=1e-3)
    assert doc["queue_timeout_ms"] == 0 and "no queue timeout" in result.output
    # the spec's queue timeout is the simulator's physics too
    shed = tmp_path / "shed.yaml"
    shed.write_text((ROOT / "examples/minilm-cpu.yaml").read_text().replace(
        "maxQueueDelayMicroseconds: 1000",
        "maxQueueDelayMicroseconds: 1000\n    queueTimeoutMicroseconds: 40000"))
    result = CliRunner().invoke(app, ["simulate", "--trace", str(trace), "--spec", str(shed),
                                      "--profile", str(ROOT / "bench/profiles/minilm-cpu.json"),
                                      "--out", str(tmp_path / "shed")])
    assert result.exit_code == 0, result.output
    assert "rejected after 40 ms" in " ".join(result.output.split())
    assert json.loads((tmp_path / "shed/simulation.json").read_text())["queue_timeout_ms"] == 40


def test_a_latency_curve_round_trips_as_json():
    c = LatencyCurve(0.1, 0.2, 1.3, True)
    assert LatencyCurve(**json.loads(json.dumps(c.to_dict()))) == c
