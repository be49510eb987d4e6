"""config.pbtxt rendering and parsing through Triton's ModelConfig proto."""

from __future__ import annotations

import pytest

from leanserve.serving import pbtxt
from leanserve.serving.errors import ConfigError, RepositoryError

CONFIG = {
    "name": "m", "backend": "onnxruntime", "max_batch_size": 8,
    "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1, 3]}],
    "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [2]}],
    "dynamic_batching": {"max_queue_delay_microseconds": 1500, "preferred_batch_size": [4, 8]},
    "instance_group": [{"count": 2, "kind": "KIND_CPU"}],
    "parameters": {"k": {"string_value": "v"}},
}


def test_round_trip_keeps_every_field_and_int_types() -> None:
    text = pbtxt.render(CONFIG)
    assert 'backend: "onnxruntime"' in text
    assert "max_queue_delay_microseconds: 1500" in text
    back = pbtxt.parse(text)
    assert back == CONFIG
    assert isinstance(back["input"][0]["dims"][0], int)


def test_misspelt_field_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="max_batch_sise"):
        pbtxt.render({**CONFIG, "max_batch_sise": 4})


def test_unknown_enum_is_refused() -> None:
    bad = {**CONFIG, "instance_group": [{"count": 1, "kind": "KIND_TPU"}]}
    with pytest.raises(ConfigError, match="KIND_TPU"):
        pbtxt.render(bad)


def test_dynamic_batching_needs_batching() -> None:
    with pytest.raises(ConfigError, match="needs max_batch_size >= 1"):
        pbtxt.render({**CONFIG, "max_batch_size": 0})


def test_zero_instances_refused() -> None:
    with pytest.raises(ConfigError, match=r"instance_group.count 0 out of range"):
        pbtxt.render({**CONFIG, "instance_group": [{"count": 0, "kind": "KIND_CPU"}]})


def test_malformed_text_names_the_source() -> None:
    with pytest.raises(RepositoryError, match=r"repo/m/config.pbtxt: malformed"):
        pbtxt.parse("name: 'm'\ninput [ {", "repo/m/config.pbtxt")
