"""Compression cost, serving saving and payback arithmetic (leanserve.compression.costs)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from leanserve.api.spec import CompressedModelSpec
from leanserve.compression.costs import (
    UnitPrice,
    candidate_costs,
    cost_cells,
    cpu_clock,
    cpu_price,
    gpu_price,
)


def _spec(pools: list[dict]) -> CompressedModelSpec:
    return CompressedModelSpec.model_validate({
        "model": {"uri": "file:///m", "format": "onnx", "task": "feature-extraction"},
        "data": {"uri": "file:///d.jsonl"},
        "compression": {"candidates": [{"name": "a", "steps": [
            {"quantize": {"method": "int8-dynamic"}}]}]},
        "quality": {"metric": "cosine", "maxDrop": 0.01},
        "nodePools": pools, "slo": {"latencyP95Ms": 100}})


def test_the_cheapest_cpu_core_prices_the_job() -> None:
    spec = _spec([
        {"name": "small", "hourlyPrice": 0.10, "resources": {"requests": {"cpu": "2"}}},
        {"name": "large", "hourlyPrice": 0.38, "resources": {"requests": {"cpu": "8"}}},
        {"name": "milli", "hourlyPrice": 0.03, "resources": {"requests": {"cpu": "500m"}}},
        {"name": "gpu", "hourlyPrice": 0.01, "accelerator": "nvidia-gpu",
         "resources": {"limits": {"nvidia.com/gpu": 1}}},
    ])
    # per core: 0.05, 0.0475, 0.06; the GPU pool never runs the Job
    assert cpu_price(spec) == UnitPrice("large", pytest.approx(0.0475))


def test_payback_is_the_compression_cost_over_the_saving_per_request() -> None:
    price = UnitPrice("small", 0.05)
    # 720 CPU-seconds at $0.05 a core-hour: $0.01; on 2 cores ($0.10/h) 100 rps -> $0.2778 per
    # million, 200 rps -> $0.1389: a saving of $0.1389 per million pays $0.01 in 72,000 requests
    cost = candidate_costs(720.0, price, 2, 100.0, 200.0)
    assert cost["usd"] == pytest.approx(0.01)
    assert cost["serving"]["usd_per_million_baseline"] == pytest.approx(0.1 / 360000 * 1e6)
    assert cost["payback_requests"] == 72_000
    slower = candidate_costs(720.0, price, 2, 100.0, 90.0)
    assert slower["serving"]["saving_per_million"] < 0 and slower["payback_requests"] is None
    assert candidate_costs(5.0, None, 2, 100.0, 200.0)["usd"] is None


def test_gpu_time_is_priced_at_the_cheapest_gpu_pool_and_said_when_it_cannot_be() -> None:
    spec = _spec([
        {"name": "small", "hourlyPrice": 0.10, "resources": {"requests": {"cpu": "2"}}},
        {"name": "gpu1", "hourlyPrice": 1.20, "accelerator": "nvidia-gpu",
         "resources": {"limits": {"nvidia.com/gpu": 1}}},
        {"name": "gpu4", "hourlyPrice": 4.00, "accelerator": "nvidia-gpu",
         "resources": {"limits": {"nvidia.com/gpu": 4}}},
    ])
    gpu = gpu_price(spec)
    assert gpu == UnitPrice("gpu4", pytest.approx(1.0))  # $1.00 a GPU-hour beats $1.20
    assert gpu_price(_spec([{"name": "c", "hourlyPrice": 0.1}])) is None
    # 720 CPU-seconds at $0.05 a core-hour ($0.01) + 36 GPU-seconds at $1.00 an hour ($0.01)
    cost = candidate_costs(720.0, UnitPrice("small", 0.05), 2, 100.0, 200.0, gpu_seconds=36.0,
                           gpu=gpu)
    assert cost["usd"] == pytest.approx(0.02) and cost["gpu_pool"] == "gpu4"
    assert cost["payback_requests"] == 144_000  # twice the CPU-only cost, twice the requests
    assert cost_cells(cost) == ("720 cpu-s + 36 gpu-s, $0.0200", "144,000 requests")
    unpriced = candidate_costs(720.0, UnitPrice("small", 0.05), 2, 100.0, 200.0,
                               gpu_seconds=36.0, gpu=None)
    assert unpriced["usd"] == pytest.approx(0.01) and unpriced["gpu_pool"] is None
    assert cost_cells(unpriced)[0] == "720 cpu-s + 36 gpu-s (unpriced: no GPU pool), $0.0100"
    assert candidate_costs(720.0, UnitPrice("small", 0.05), 2, 100.0, 200.0)["gpu_seconds"] \
        is None


def test_cpu_clock_counts_children_it_waited_for() -> None:
    with cpu_clock() as spent:
        subprocess.run([sys.executable, "-c", "sum(i * i for i in range(3_000_000))"],
                       check=True)
    assert spent[0] > 0.05


def test_peak_rss_is_the_serving_process_own(tmp_path) -> None:
    """A probe started from a big process reports its own peak, not its parent's (getrusage's
    ru_maxrss survives fork and exec)."""
    import numpy as np
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from leanserve.compression.costs import serving_peak_rss
    from leanserve.compression.registry import Batch

    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["pixel_values", "w"], ["logits"])], "g",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["b", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    ballast = np.ones(96 * 2**20, np.float64)  # 768 MiB resident in this process
    rss = serving_peak_rss(tmp_path / "m.onnx", Batch(inputs={"pixel_values": torch.ones(2, 8)}),
                           threads=1)
    assert ballast.sum() > 0
    assert rss is not None and 10 * 2**20 < rss < 512 * 2**20
