"""A Prometheus reply of every malformed shape: the source reports no data (never raises), the
policy holds with MetricsUnavailable, and the exporter counts the error by kind."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from leanserve.autoscaling.errors import MetricsError
from leanserve.autoscaling.exporter import LeanserveMetrics
from leanserve.autoscaling.metrics import (
    ERROR_KINDS,
    PrometheusSource,
    Queries,
    observe,
    parse_answer,
)
from leanserve.autoscaling.platform import InMemoryPlatform
from leanserve.autoscaling.policy import PoolCapacity, Reason, Target, decide


def ok(result: Any, kind: str = "vector") -> dict[str, Any]:
    return {"status": "success", "data": {"resultType": kind, "result": result}}


MALFORMED: dict[str, Any] = {
    "value abc": ok([{"metric": {}, "value": [0, "abc"]}]),
    "scalar abc": ok([0, "abc"], "scalar"),
    "value empty string": ok([{"metric": {}, "value": [0, ""]}]),
    "value true": ok([{"metric": {}, "value": [0, True]}]),
    "value null": ok([{"metric": {}, "value": [0, None]}]),
    "value object": ok([{"metric": {}, "value": {"t": 0, "v": "1"}}]),
    "value one element": ok([{"metric": {}, "value": ["1"]}]),
    "value three elements": ok([{"metric": {}, "value": [0, "1", "2"]}]),
    "value missing": ok([{"metric": {}}]),
    "sample is a list": ok([[0, "1"]]),
    "sample is a string": ok(["1"]),
    "result is an object": ok({"metric": {}, "value": [0, "1"]}),
    "result missing": {"status": "success", "data": {"resultType": "vector"}},
    "resultType missing": {"status": "success", "data": {"result": []}},
    "resultType matrix": ok([{"metric": {}, "values": [[0, "1"]]}], "matrix"),
    "resultType number": ok([], 5),  # type: ignore[arg-type]
    "data is a list": {"status": "success", "data": []},
    "data is a string": {"status": "success", "data": "x"},
    "data missing": {"status": "success"},
    "reply is a list": [ok([])],
    "reply is a number": 42,
    "reply is null": None,
    "status missing": {"data": ok([])["data"]},
    "status is a number": {"status": 1, "data": ok([])["data"]},
    "metric is a list": ok([{"metric": ["pool", "a"], "value": [0, "1"]}]),
    "label value a number": ok([{"metric": {"pool": 1}, "value": [0, "1"]}]),
    "huge number literal": ok([{"metric": {}, "value": [0, 10 ** 400]}]),
}


class Replies:
    """An HttpGet that answers every query with one body."""

    def __init__(self, status: int, body: Any) -> None:
        self.status, self.body = status, body

    def __call__(self, url: str, params: dict[str, str], timeout: float) -> tuple[int, bytes]:
        return self.status, self.body


def source(status: int, body: Any) -> PrometheusSource:
    return PrometheusSource("http://prom:9090", Queries("m", "30s"), clock=lambda: 0.0,
                            http=Replies(status, body))


def hold_and_count(src: PrometheusSource, kind: str) -> None:
    """The autoscaling loop's step: observe, decide, export; holds and counts ``kind``."""
    plat = InMemoryPlatform(["a"], clock=lambda: 0.0)
    plat.set_ready("m", {"a": 3})
    obs, reading = observe(src, plat, "m")
    target = Target(100, 1, 5)
    d = decide(obs, [PoolCapacity("a", 10, 0.1)], target, None, 0)
    assert d.code is Reason.METRICS_UNAVAILABLE and d.replicas == {"a": 3}
    assert d.slo_met is None
    exporter = LeanserveMetrics()
    exporter.record("m", d, target, reading=reading)
    text = generate_latest(exporter.registry).decode()
    assert f'leanserve_metrics_errors_total{{kind="{kind}",model="m"}} ' in text
    assert set(reading.error_kinds) <= set(ERROR_KINDS)
    assert len(reading.error_kinds) == len(reading.problems)


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_reply_holds_and_is_counted(name: str) -> None:
    src = source(200, json.dumps(MALFORMED[name]).encode())
    reading = src.read()
    assert reading.request_rate is None and reading.p95_ms is None
    assert any("malformed" in p for p in reading.problems), reading.problems
    assert "malformed" in reading.error_kinds
    hold_and_count(src, "malformed")


@pytest.mark.parametrize(("body", "kind"), [
    (b"[" * 100_000, "malformed"),            # nested too deep for the JSON decoder
    (b"\xff\xfe\x00garbage", "malformed"),    # not UTF-8
    (b"", "malformed"),
    (None, "malformed"),                      # a transport that returned no body
    (b'{"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, '
     b'"value": [0, NaN]}]}}', "not_finite"),
    (json.dumps(ok([{"metric": {}, "value": [0, "1e999"]}])).encode(), "not_finite"),
    (json.dumps(ok([])).encode(), "empty"),
    (json.dumps(ok([{"metric": {"i": "1"}, "value": [0, "1"]},
                    {"metric": {"i": "2"}, "value": [0, "2"]}])).encode(), "ambiguous"),
    (json.dumps({"status": "error", "error": {"nested": ["x"]}}).encode(), "query"),
])
def test_odd_bodies_hold_and_are_counted(body: Any, kind: str) -> None:
    src = source(200, body)
    reading = src.read()
    assert reading.request_rate is None and kind in reading.error_kinds
    hold_and_count(src, kind)


def test_http_errors_and_transport_failures_are_counted() -> None:
    hold_and_count(source(500, b"oops"), "http")

    def boom(url: str, params: dict[str, str], timeout: float) -> tuple[int, bytes]:
        raise RuntimeError("a transport bug")

    src = PrometheusSource("http://prom:9090", Queries("m"), clock=lambda: 0.0, http=boom)
    assert src.read().error_kinds[0] == "unreachable"
    hold_and_count(src, "unreachable")


def test_an_unreachable_prometheus_is_asked_once_per_reading() -> None:
    # each query would wait out the same timeout: one is enough to know (the operator steps its
    # models one after another, so 5 x 5 s per model stalled every other model's interval)
    asked: list[str] = []

    def timeout(url: str, params: dict[str, str], t: float) -> tuple[int, bytes]:
        asked.append(params["query"])
        raise TimeoutError("timed out")

    reading = PrometheusSource("http://prom:9090", Queries("m"), clock=lambda: 0.0,
                               http=timeout).read()
    assert len(asked) == 1 and reading.error_kinds == ["unreachable"]
    assert reading.request_rate is None and reading.arrival_rate is None
    assert reading.p95_ms is None and reading.pending is None


def test_well_formed_answers_still_parse() -> None:
    rows = parse_answer(ok([{"metric": {"pool": "a"}, "value": [0, "1.5"]},
                            {"value": [0, 2]}, {"metric": None, "value": [0, "+Inf"]}]), "q")
    assert rows[0] == ({"pool": "a"}, 1.5) and rows[1] == ({}, 2.0)
    assert math.isinf(rows[2][1])
    assert parse_answer(ok([0, "3"], "scalar"), "q") == [({}, 3.0)]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)


def near_shapes() -> st.SearchStrategy[Any]:
    """Replies close to the real shape, with any part replaced by any JSON value."""
    value = st.one_of(st.just("1.5"), st.just("NaN"), json_values)
    sample = st.one_of(st.fixed_dictionaries({"metric": st.one_of(
        st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2), json_values),
        "value": st.one_of(st.tuples(st.integers(), value).map(list), json_values)}),
        json_values)
    data = st.fixed_dictionaries({"resultType": st.sampled_from(["vector", "scalar", "matrix",
                                                                 1, None]),
                                  "result": st.one_of(st.lists(sample, max_size=3),
                                                      json_values)})
    return st.one_of(st.fixed_dictionaries({"status": st.sampled_from(["success", "error", 0]),
                                            "data": st.one_of(data, json_values)}), json_values)


@settings(max_examples=300, deadline=None)
@given(near_shapes())
def test_any_reply_is_samples_or_metrics_error(doc: Any) -> None:
    try:
        rows = parse_answer(doc, "q")
    except MetricsError as exc:
        assert exc.kind in ERROR_KINDS
        return
    for labels, v in rows:
        assert isinstance(v, float)
        assert all(isinstance(k, str) and isinstance(x, str) for k, x in labels.items())


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=64) | near_shapes().map(lambda d: json.dumps(d).encode()),
       st.sampled_from([200, 200, 404, 503]))
def test_read_never_raises(body: bytes, status: int) -> None:
    reading = source(status, body).read()
    assert len(reading.error_kinds) == len(reading.problems)
    for v in (reading.request_rate, reading.p95_ms, reading.queue_ms):
        assert v is None or math.isfinite(v)


def test_no_request_rate_says_what_the_window_needs() -> None:
    # a Prometheus that scrapes Triton every minute (its default) has no rate() over 30s
    reading = source(200, json.dumps(ok([])).encode()).read()
    assert reading.request_rate is None and reading.error_kinds[0] == "empty"
    assert reading.problems[0] == ("request rate: no data (empty result): is Triton scraped, "
                                   "and at least every 7.5s? rate() over 30s needs two samples "
                                   "within it")

