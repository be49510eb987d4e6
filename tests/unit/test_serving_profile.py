"""Config search and pricing, against synthetic servers (no processes)."""

from __future__ import annotations

import pytest

from leanserve.api.spec import NodePool
from leanserve.serving.errors import PortInUseError, ServingError
from leanserve.serving.profile import (
    GPU_EQUIVALENT_CPU_CORES,
    SearchSettings,
    Trial,
    best_config,
    cost_per_million,
    derive_pool,
    parse_cpu,
    pending_requests,
    plan_grid,
    search_capacity,
)
from leanserve.serving.server import choose_ports

SETTINGS = SearchSettings(bisect_steps=6)


def queue_server(capacity: float, service_ms: float = 5.0):
    """An M/M/1-like server: p95 grows as utilisation nears 1, collapses past it."""
    calls: list[float] = []

    def measure(rate: float) -> Trial:
        calls.append(rate)
        rho = rate / capacity
        if rho >= 1:
            return Trial(rate, 10_000.0, capacity, 0, int(rate * 3))
        p95 = service_ms * 3.0 / (1 - rho)  # ~ -ln(0.05) x mean sojourn
        return Trial(rate, p95, rate, 0, int(rate * 3))

    return measure, calls


@pytest.mark.parametrize("start", [10.0, 150.0, 900.0])
def test_search_finds_the_rate_where_p95_meets_the_slo(start: float) -> None:
    measure, calls = queue_server(capacity=200.0)
    slo_ms = 60.0
    # p95 = 15 / (1 - rho) <= 60  <=>  rho <= 0.75  <=>  rate <= 150
    result = search_capacity(measure, slo_ms, start, SETTINGS)
    assert 140.0 <= result.capacity_rps <= 150.0
    assert len(calls) == len(result.trials) <= 20
    assert all(t.passes(slo_ms, SETTINGS) for t in result.trials
               if t.rate <= result.capacity_rps)


def test_search_reports_zero_when_even_the_lowest_rate_fails() -> None:
    measure, _ = queue_server(capacity=200.0, service_ms=50.0)  # p95 >= 150 ms always
    result = search_capacity(measure, 100.0, 50.0, SETTINGS)
    assert result.capacity_rps == 0.0
    assert result.trials[-1].rate < SETTINGS.min_rate * SETTINGS.growth


def test_errors_or_slow_p95_fail_a_trial() -> None:
    assert not Trial(100, 5.0, 100, errors=5, requests=100).passes(50, SETTINGS)
    assert not Trial(100, 51.0, 100, errors=0, requests=300).passes(50, SETTINGS)
    assert Trial(100, 5.0, 99, errors=0, requests=300).passes(50, SETTINGS)
    assert Trial(100, 5.0, 99, errors=1, requests=300).passes(50, SETTINGS)
    assert not Trial(100, None, 0, errors=0, requests=0).passes(50, SETTINGS)


def test_pending_requests_are_read_per_model() -> None:
    text = ("# HELP nv_inference_pending_request_count x\n"
            'nv_inference_pending_request_count{model="m",version="1"} 3\n'
            'nv_inference_pending_request_count{model="m",version="2"} 1\n'
            'nv_inference_pending_request_count{model="other",version="1"} 9\n')
    assert pending_requests(text, "m") == 4
    assert pending_requests(text, "absent") is None


def test_grid_starts_with_tritons_default_and_spreads_cores() -> None:
    grid = plan_grid(32, 1000, cores=2, quick=False)
    default = grid[0]
    assert (default.max_batch_size, default.dynamic_batching, default.instance_count) == \
        (1, False, 1)
    assert len(grid) == len(set(grid)) == 9
    assert {c.max_batch_size for c in grid[1:]} == {8, 32}
    assert {c.max_queue_delay_us for c in grid[1:]} == {1000, 4000}
    assert all(c.intra_op_threads * c.instance_count == 2 for c in grid)
    quick = plan_grid(32, 1000, cores=2, quick=True)
    assert len(quick) == 3 and quick[0] == default


def test_single_core_grid_has_one_instance() -> None:
    assert {c.instance_count for c in plan_grid(16, 0, cores=1, quick=False)} == {1}


def test_best_config_prefers_capacity_then_fewer_instances() -> None:
    rows = [{"capacity_rps": 100, "config": {"instance_count": 1, "max_batch_size": 1}},
            {"capacity_rps": 180, "config": {"instance_count": 2, "max_batch_size": 8}},
            {"capacity_rps": 180, "config": {"instance_count": 1, "max_batch_size": 8}}]
    assert best_config(rows) is rows[2]


def test_cost_per_million_requests() -> None:
    assert cost_per_million(0.36, 100.0) == pytest.approx(1.0)
    assert cost_per_million(0.10, 0.0) is None


@pytest.mark.parametrize(("text", "cores"), [("2", 2.0), ("500m", 0.5), (4, 4.0), ("1.5", 1.5)])
def test_cpu_quantities(text, cores: float) -> None:
    assert parse_cpu(text) == cores


def test_bad_cpu_quantity() -> None:
    with pytest.raises(ServingError, match="not understood"):
        parse_cpu("two")


def pool(**kw) -> NodePool:
    return NodePool.model_validate({"name": "p", "hourlyPrice": 0.2, **kw})


def test_pool_matching_this_machine_is_measured() -> None:
    row = derive_pool(pool(resources={"requests": {"cpu": "2"}}), 100.0, 2.0)
    assert row["measured"] is True and row["capacity_rps"] == 100.0
    assert row["cost_per_million_requests"] == pytest.approx(0.2 / 360000 * 1e6, rel=1e-4)


def test_bigger_cpu_pool_is_scaled_and_says_so() -> None:
    row = derive_pool(pool(resources={"limits": {"cpu": "8"}}), 100.0, 2.0)
    assert row["measured"] is False
    assert row["capacity_rps"] == 400.0
    assert "scaled linearly" in row["basis"]


def test_gpu_pool_is_an_explicit_assumption() -> None:
    row = derive_pool(pool(accelerator="nvidia-gpu"), 100.0, 2.0)
    assert row["measured"] is False
    assert row["capacity_rps"] == pytest.approx(50.0 * GPU_EQUIVALENT_CPU_CORES)
    assert "no GPU here" in row["basis"]


def test_ports_zero_are_chosen_and_taken_ones_move_or_fail() -> None:
    taken = {8000}
    picks = iter([41000, 41001, 41002])

    def in_use(port: int, host: str) -> bool:
        return port in taken

    ports = choose_ports({"http": 8000, "grpc": 0, "metrics": 8002}, host="h", strict=False,
                         in_use=in_use, pick=lambda h: next(picks))
    assert ports == {"http": 41000, "grpc": 41001, "metrics": 8002}
    with pytest.raises(PortInUseError, match=r"port 8000 \(http\) is already in use"):
        choose_ports({"http": 8000}, host="h", strict=True, in_use=in_use,
                     pick=lambda h: 1)


def test_search_stops_at_max_trials_with_the_best_rate_seen() -> None:
    measure, calls = queue_server(capacity=1e6, service_ms=0.1)  # never saturates
    settings = SearchSettings(max_trials=5, max_rate=1e9)
    result = search_capacity(measure, 100.0, 10.0, settings)
    assert len(calls) == 5
    assert result.capacity_rps == pytest.approx(max(calls))
