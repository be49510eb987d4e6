"""Load generator logic without a server: arrival schedules, balancers, summaries, inputs."""

from __future__ import annotations

import numpy as np
import pytest

from leanserve.serving.errors import LoadError, ServingError
from leanserve.serving.inputs import make_inputs, wire_type
from leanserve.serving.loadgen import (
    Arrivals,
    LeastOutstanding,
    LoadSpec,
    Record,
    RoundRobin,
    arrival_offsets,
    summarize,
)


def test_constant_arrivals_are_evenly_spaced() -> None:
    times = arrival_offsets(lambda _t: 10.0, 2.0, Arrivals.CONSTANT, np.random.default_rng(0))
    assert len(times) == 19  # 0.1, 0.2, ... 1.9 (2.0 is outside [0, 2))
    assert np.allclose(np.diff(times), 0.1)


def test_poisson_arrivals_have_the_asked_mean_rate() -> None:
    times = arrival_offsets(lambda _t: 200.0, 20.0, Arrivals.POISSON, np.random.default_rng(1))
    assert 3800 < len(times) < 4200
    gaps = np.diff(times)
    assert gaps.std() == pytest.approx(gaps.mean(), rel=0.1)  # exponential: sd == mean


def test_rate_schedule_shapes_the_load() -> None:
    def burst(t: float) -> float:
        return 0.0 if t < 1.0 else 100.0

    times = arrival_offsets(burst, 2.0, Arrivals.CONSTANT, np.random.default_rng(0))
    assert min(times) >= 1.0
    assert 95 <= len(times) <= 101


def test_round_robin_cycles() -> None:
    rr = RoundRobin(3)
    assert [rr.pick([0, 0, 0]) for _ in range(5)] == [0, 1, 2, 0, 1]


def test_least_outstanding_prefers_the_idle_server() -> None:
    lo = LeastOutstanding(3)
    assert lo.pick([5, 0, 2]) == 1
    assert lo.pick([5, 3, 2]) == 2
    picks = {lo.pick([1, 1, 1]) for _ in range(3)}
    assert picks == {0, 1, 2}  # ties rotate


def test_summary_leaves_warmup_out_and_counts_errors() -> None:
    records = [Record(0.1, 1.0, True, 0)]  # warm-up: ignored
    records += [Record(1.0 + i / 100, 0.010 + i / 10000, True, i % 2) for i in range(100)]
    records += [Record(1.5, None, False, 1, "boom"), Record(1.6, None, False, 1, "boom")]
    result = summarize(records, duration_s=3.0, warmup_s=1.0, urls=["a", "b"])
    assert result["requests"] == 102
    assert result["errors"] == 2
    assert result["error_samples"] == ["boom"]
    assert result["throughput_rps"] == pytest.approx(50.0)
    assert result["latency_ms"]["p50"] == pytest.approx(14.95, abs=0.01)
    assert result["latency_ms"]["p99"] < 20.0
    assert result["per_server"] == {"a": {"requests": 50, "errors": 0},
                                    "b": {"requests": 52, "errors": 2}}


def test_summary_without_successes_has_no_latency() -> None:
    result = summarize([Record(0.0, None, False, 0, "down")], duration_s=1.0)
    assert result["latency_ms"]["p95"] is None
    assert result["throughput_rps"] == 0.0


@pytest.mark.parametrize("kwargs", [
    {}, {"rate": 5.0, "concurrency": 2}, {"rate": -1.0}, {"concurrency": 0},
    {"rate": 1.0, "duration_s": 0.0},
])
def test_load_spec_refuses_bad_modes(kwargs: dict) -> None:
    with pytest.raises(LoadError):
        LoadSpec(model="m", **kwargs).validate()


TEXT_CONFIG = {
    "name": "enc", "max_batch_size": 8,
    "input": [{"name": "input_ids", "data_type": "TYPE_INT64", "dims": [-1]},
              {"name": "attention_mask", "data_type": "TYPE_INT64", "dims": [-1]},
              {"name": "token_type_ids", "data_type": "TYPE_INT64", "dims": [-1]}],
    "parameters": {"leanserve.vocab_size": {"string_value": "30522"}},
}


def test_text_inputs_stay_inside_the_vocabulary() -> None:
    payloads = make_inputs(TEXT_CONFIG, batch=3, sequence_length=16, variants=4)
    assert len(payloads) == 4
    ids = payloads[0]["input_ids"]
    assert ids.shape == (3, 16) and ids.dtype == np.int64
    assert ids.min() >= 1000 and ids.max() < 30522
    assert (payloads[0]["attention_mask"] == 1).all()
    assert (payloads[0]["token_type_ids"] == 0).all()


def test_image_and_string_inputs() -> None:
    image = {"name": "cnn", "max_batch_size": 4,
             "input": [{"name": "pixel_values", "data_type": "TYPE_FP32", "dims": [1, 8, 8]}]}
    (payload,) = make_inputs(image, batch=2, variants=1)
    assert payload["pixel_values"].shape == (2, 1, 8, 8)
    assert wire_type(payload["pixel_values"]) == "FP32"
    text = {"name": "t", "max_batch_size": 4,
            "input": [{"name": "text", "data_type": "TYPE_STRING", "dims": [1]}]}
    (payload,) = make_inputs(text, batch=2, variants=1)
    assert payload["text"].shape == (2, 1)
    assert isinstance(payload["text"][0, 0], bytes)
    assert wire_type(payload["text"]) == "BYTES"


def test_batch_above_max_is_refused() -> None:
    with pytest.raises(ServingError, match="exceeds max_batch_size 8"):
        make_inputs(TEXT_CONFIG, batch=9)


def test_load_spec_takes_strings_and_names_bad_ones() -> None:
    spec = LoadSpec(model="m", rate=1.0, protocol="grpc", arrivals="constant",
                    balance="least-outstanding")
    assert spec.arrivals is Arrivals.CONSTANT
    with pytest.raises(LoadError, match="allowed: poisson, constant"):
        LoadSpec(model="m", rate=1.0, arrivals="bursty")
