"""Timings that select reliably: models timed in interleaved rounds rank the same way in two
runs when they clearly differ, and every model gets the calls the settings promise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from leanserve.compression.benchmark import BenchSettings, benchmark_many
from leanserve.compression.registry import Batch


def _mlp(path: Path, width: int, layers: int) -> Path:
    """pixel_values [b, 64] -> logits through ``layers`` MatMuls of ``width``: cost grows with
    width^2 * layers."""
    rng = np.random.default_rng(width)
    nodes, inits, x = [], [], "pixel_values"
    dims = [64] + [width] * layers + [10]
    for i in range(len(dims) - 1):
        w = numpy_helper.from_array(
            (rng.standard_normal((dims[i], dims[i + 1])) / np.sqrt(dims[i])).astype(np.float32),
            f"w{i}")
        inits.append(w)
        out = "logits" if i == len(dims) - 2 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [x, w.name], [out]))
        x = out
    graph = helper.make_graph(nodes, "mlp",
                              [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT,
                                                             ["batch", 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                             ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_two_interleaved_runs_rank_clearly_different_models_alike(tmp_path: Path) -> None:
    # ~16x apart in work from one model to the next: a real ranking, not noise
    paths = {name: _mlp(tmp_path / f"{name}.onnx", width, layers)
             for name, width, layers in (("small", 64, 1), ("medium", 256, 2),
                                         ("large", 1024, 2))}
    rows = [Batch(inputs={"pixel_values": torch.rand(32, 64)})]
    settings = BenchSettings(batch=32, warmup=1, iterations_b1=4, iterations_bn=8, rounds=4,
                             pause_s=0.0, min_round_s=0.02)
    rankings = []
    for _ in range(2):
        timed = benchmark_many(paths, rows, settings)
        # at least the calls promised; a fast model gets more (min_round_s of calls per round)
        assert all(r.calls >= settings.timing()["calls_batch"] == 8 for r in timed.values())
        assert timed["small"].calls > timed["large"].calls
        rankings.append(sorted(timed, key=lambda k: -timed[k].throughput_rps))
    assert rankings[0] == rankings[1] == ["small", "medium", "large"]


def test_rounds_rotate_the_order_and_pause_before_each_model(tmp_path: Path) -> None:
    paths = {n: _mlp(tmp_path / f"{n}.onnx", 32, 1) for n in ("a", "b", "c")}
    rows = [Batch(inputs={"pixel_values": torch.rand(4, 64)})]
    ticks = iter(range(10_000))
    pauses: list[float] = []
    settings = BenchSettings(batch=4, warmup=1, iterations_b1=3, iterations_bn=3, rounds=3,
                             pause_s=0.5, min_round_s=0.0)
    timed = benchmark_many(paths, rows, settings, clock=lambda: float(next(ticks)),
                           sleep=pauses.append)
    # one pause per model per round; one call per round and batch size (3 calls over 3 rounds)
    assert pauses == [0.5] * 9
    assert all(r.calls == 3 for r in timed.values())
    # a fake clock that ticks once per read: every call took 1 "second"
    assert all(r.throughput_rps == 4.0 for r in timed.values())
