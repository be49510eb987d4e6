"""The two bounds bench/autoscaling.py judges feasibility by, on traces small enough to work out
by hand: one pool of 100 req/s replicas at $1/h, 5 s ticks, a 30 s start-up (6 ticks)."""

from __future__ import annotations

import pytest

from leanserve.autoscaling.policy import PoolCapacity, Target
from leanserve.autoscaling.simulate import SimConfig, Trace, reactive_bound, rise_bound

POOL = [PoolCapacity("p", 100.0, 1.0)]
TARGET = Target(latency_p95_ms=100, min_replicas=1, max_replicas=20, interval_seconds=5,
                scale_down_stabilization_seconds=20)
CFG = SimConfig(startup_seconds=30)


def _step(low: float = 100.0, high: float = 300.0) -> Trace:
    """10 minutes at ``low``, then 10 minutes at ``high``: 240 ticks, one rise at tick 120."""
    return Trace((0.0, 600.0), (low, high))


def test_rise_bound_prices_an_unforeseeable_step():
    rb = rise_bound(_step(), POOL, TARGET, CFG, attainment=0.99, noise=False)
    assert (rb.rises, rb.lag_ticks) == (1, 6)
    # not provisioned for, the step misses the SLO for the 6 ticks its new replicas take
    assert rb.unabsorbed_attainment == pytest.approx(1 - 6 / 240)
    # 99% of 240 ticks allows 2 misses, so 4 of the 6 must be covered: holding 300 req/s
    # (3 replicas instead of 1) through the 120 blind ticks before costs 240 replica-ticks,
    # a share 4/6 of that (the rise's start is unforeseeable) less the 6 window ticks' cost
    # taken as free: 480 oracle replica-ticks + (-18 + 4/6 * 258) = 480 + 154; and climbing
    # from the warm start (2 replicas for 100 req/s at 90%) to 300 req/s starts one replica,
    # paid for the 6 ticks it starts: + 6
    assert rb.min_cost_ratio == pytest.approx((480 + 154 + 6) / 480)
    assert rb.startup_share == pytest.approx(6 / 480)


def test_rise_bound_is_the_oracle_without_rises_and_looser_with_a_short_start_up():
    flat = rise_bound(_step(250.0, 250.0), POOL, TARGET, CFG, noise=False)
    assert flat.rises == 0 and flat.unabsorbed_attainment == 1.0
    # with no rise to pay for, the budget's two misses are taken as free: just below the oracle
    assert flat.min_cost_ratio == pytest.approx((240 * 3 - 2 * 3) / (240 * 3))
    fast = rise_bound(_step(), POOL, TARGET, SimConfig(startup_seconds=5))
    slow = rise_bound(_step(), POOL, TARGET, CFG)
    assert fast.lag_ticks == 1
    assert fast.min_cost_ratio < 1.0 < slow.min_cost_ratio


def test_rise_bound_ignores_rises_below_the_ratio():
    assert rise_bound(_step(100.0, 110.0), POOL, TARGET, CFG, rise_ratio=1.15).rises == 0
    assert rise_bound(_step(100.0, 110.0), POOL, TARGET, CFG, rise_ratio=1.05).rises == 1


def _noisy_step(sigma: float, seed: int = 0) -> Trace:
    """_step's two plateaus at 10 s points, each point times 1 + N(0, sigma) noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    times = tuple(float(t) for t in range(0, 1200, 10))
    level = [100.0 if t < 600 else 300.0 for t in times]
    return Trace(times, tuple(float(x * rng.normal(1.0, sigma)) for x in level))


def test_rise_bound_charges_the_headroom_unforeseeable_noise_needs():
    quiet = rise_bound(_noisy_step(0.0), POOL, TARGET, CFG)
    noisy = rise_bound(_noisy_step(0.05), POOL, TARGET, CFG)
    assert quiet.noise == 0.0 and quiet.headroom == 0.0
    assert quiet.min_cost_ratio == pytest.approx(
        rise_bound(_noisy_step(0.0), POOL, TARGET, CFG, noise=False).min_cost_ratio)
    # the trace's own residuals put the noise near what made it, and covering it costs more
    assert 0.02 < noisy.noise < 0.08
    assert noisy.headroom > 0
    assert noisy.min_cost_ratio > rise_bound(_noisy_step(0.05), POOL, TARGET, CFG,
                                             noise=False).min_cost_ratio
    # a trace of two points says nothing of noise: none is assumed
    assert rise_bound(_step(), POOL, TARGET, CFG).noise == 0.0


def test_mix_prices_are_cheapest_mix_by_lookup():
    from leanserve.autoscaling.policy import capacity, cheapest_mix, hourly_cost
    from leanserve.autoscaling.simulate import MixPrices

    np = pytest.importorskip("numpy")

    pools = [PoolCapacity("small", 433.7, 0.10), PoolCapacity("large", 1734.8, 0.38)]
    for target in (Target(100, 1, 20, 5.0), Target(100, 3, 6, 1.2), Target(100, 0, 4)):
        priced = MixPrices(pools, target)
        for need in [0.0, 1.0, 433.7, 433.71, 1734.8, 2000.0, 5000.0, 9000.0, 1e9,
                     *(x * 97.3 for x in range(200))]:
            mix = cheapest_mix(need, pools, target)[0]
            assert priced(need) == pytest.approx((capacity(mix, pools), hourly_cost(mix, pools)))
        needs = np.array([0.0, 433.7, 433.71, 5000.0, 1e9, *(x * 97.3 for x in range(200))])
        caps, costs = priced.many(needs)
        # pytest.approx compares flat sequences only (pytest >= 9 refuses nested tuples)
        one_by_one = [priced(x) for x in needs]
        assert list(caps) == pytest.approx([c for c, _ in one_by_one])
        assert list(costs) == pytest.approx([k for _, k in one_by_one])


def test_reactive_bound_on_a_step_misses_the_start_up_or_pays_for_headroom():
    rb = reactive_bound(_step(), POOL, TARGET, CFG, max_cost_ratio=1.15)
    # at <= 1.15x the oracle no headroom covers a 3x step: its 6 start-up ticks are missed
    assert rb.attainment == pytest.approx(1 - 6 / 240)
    assert rb.cost_ratio <= 1.15
    # covering it takes 3x headroom: over the whole trace, dearer than the oracle by far
    assert rb.cheapest_at_99 is not None and rb.cheapest_at_99 > 2.0
    easy = reactive_bound(_step(), POOL, TARGET, CFG, max_cost_ratio=5.0)
    assert easy.attainment == 1.0


def test_simulate_command_writes_the_contract_and_the_bounds(tmp_path):
    """`leanserve simulate` on a committed trace with the measured profile: simulation.json has
    every contender of DESIGN.md section 6, the bounds at the start-up asked for, and the PNG."""
    import json
    from pathlib import Path

    from typer.testing import CliRunner

    from leanserve.cli import app

    root = Path(__file__).resolve().parents[2]
    args = ["simulate", "--trace", str(root / "bench/traces/step.csv"),
            "--spec", str(root / "examples/minilm-cpu.yaml"),
            "--profile", str(root / "bench/profiles/minilm-cpu.json")]
    out = tmp_path / "sim"
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--startup-seconds", "10"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "simulation.json").read_text())
    assert set(data["policies"]) == {"leanserve", "static", "hpa", "keda", "oracle"}
    for run in data["policies"].values():
        assert run["cost"] > 0 and 0 <= run["slo_attainment"] <= 1 and run["replica_minutes"] > 0
    assert data["bounds"]["startup_seconds"] == 10
    assert data["bounds"]["rise"]["lag_intervals"] == 2  # 10 s at the spec's 5 s interval
    assert data["bounds"]["rise"]["rises"] >= 4  # the trace's four up-steps at least
    assert (out / "simulation.png").stat().st_size > 0
    assert "rises of the load" in result.output

    bad = CliRunner().invoke(app, [*args[:2], str(tmp_path / "none.csv"), *args[3:],
                                   "--out", str(out)])
    assert bad.exit_code == 1
    assert "no such file" in bad.output and "Traceback" not in bad.output


def test_reactive_bound_projects_a_ramp_it_would_otherwise_trail():
    """On a steady ramp the peak of the past is always a start-up behind; the family's trend
    members project the line and meet the ramp at a lower cost than headroom alone."""
    times = tuple(float(t) for t in range(0, 3600, 10))
    ramp = Trace(times, tuple(100.0 + 0.5 * t for t in times))
    flat_only = reactive_bound(ramp, POOL, TARGET, CFG, max_cost_ratio=1.15, trends=((0.0, 0.0),))
    with_trend = reactive_bound(ramp, POOL, TARGET, CFG, max_cost_ratio=1.15)
    assert with_trend.attainment >= flat_only.attainment
    assert with_trend.attainment == 1.0 and with_trend.trend_seconds > 0
    assert with_trend.cheapest_at_99 is not None and flat_only.cheapest_at_99 is not None
    assert with_trend.cheapest_at_99 < flat_only.cheapest_at_99


def test_bench_judges_all_four_targets_together():
    """bench/autoscaling.py asks one run for max(99%, HPA's attainment) at min(1.15x oracle,
    0.75x HPA's cost), and names that infeasible when a bound rules it out."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench/autoscaling.py"
    spec = importlib.util.spec_from_file_location("bench_autoscaling", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up there
    spec.loader.exec_module(bench)

    def summary(att: float, vs_oracle: float, hpa_att: float, hpa_vs_oracle: float) -> dict:
        return {"leanserve": {"slo_attainment": att, "cost": vs_oracle},
                "oracle": {"cost": 1.0},
                "hpa": {"slo_attainment": hpa_att, "cost": hpa_vs_oracle}}

    # HPA at 100% for 1.6x the oracle: together, 100% at <= min(1.15, 0.75 * 1.6 = 1.2)
    s = summary(0.997, 1.14, 1.0, 1.6)
    assert bench.joint_targets(s) == pytest.approx((1.0, 1.15))
    assert bench.joint_verdict(s, bound=1.0, rise=1.16)[0] == "infeasible"
    assert "any policy" in bench.joint_verdict(s, bound=1.0, rise=1.16)[1]
    assert bench.joint_verdict(s, bound=0.998, rise=1.10)[0] == "infeasible"
    assert bench.joint_verdict(s, bound=1.0, rise=1.10)[0] == "MISSED"
    met = summary(1.0, 1.10, 1.0, 1.6)
    assert bench.joint_verdict(met, bound=0.0, rise=9.0) == ("met", "met")
