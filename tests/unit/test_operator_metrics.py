"""The operator's export of leanserve's autoscaling metrics (issue 15): per namespace and model,
priced from what runs, and gone with the model. (The same exporter on a real Prometheus with
the dashboard and the alert rules: tests/integration/test_autoscaling_live.py.)"""

from __future__ import annotations

import math

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from leanserve.autoscaling.policy import Observation, PoolCapacity, Reason, Target, decide
from leanserve.operator.metrics import OperatorMetrics

POOLS = [PoolCapacity("small", 10, 0.1), PoolCapacity("large", 50, 0.4)]


def samples(m: OperatorMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(m.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name.startswith("leanserve_") and not s.name.startswith("leanserve_operator")}


def value(m: OperatorMetrics, name: str, **labels: str) -> float:
    return samples(m)[(name, tuple(sorted(labels.items())))]


def test_one_model_name_in_two_namespaces_then_one_deleted() -> None:
    m = OperatorMetrics()
    t = Target(100, 1, 4, 1.0)
    seen = Observation(0, 36.0, 40.0, ready={"small": 1, "large": 1},
                       current={"small": 2, "large": 1})
    d_a = decide(seen, POOLS, t, None, 0)
    m.record_decision("a", "minilm", d_a, t, POOLS, seen)
    d_b = decide(Observation(0, None), POOLS, t, None, 0)  # no metrics: holds
    m.record_decision("b", "minilm", d_b, t, POOLS, Observation(0, None))
    assert d_b.code is Reason.METRICS_UNAVAILABLE
    for pool, n in d_a.replicas.items():
        assert value(m, "leanserve_desired_replicas", namespace="a", model="minilm",
                     pool=pool) == n
    # replicas set and ready as observed; the hourly cost is that of the replicas set
    assert value(m, "leanserve_replicas", namespace="a", model="minilm", pool="small") == 2
    assert value(m, "leanserve_ready_replicas", namespace="a", model="minilm",
                 pool="small") == 1
    assert value(m, "leanserve_hourly_cost_usd", namespace="a", model="minilm") == \
        2 * 0.1 + 1 * 0.4
    assert math.isclose(value(m, "leanserve_cost_per_million_requests_usd", namespace="a",
                              model="minilm"), 0.6 / (36.0 * 3600) * 1e6)
    assert value(m, "leanserve_metrics_available", namespace="a", model="minilm") == 1
    assert value(m, "leanserve_metrics_available", namespace="b", model="minilm") == 0
    assert value(m, "leanserve_decisions_total", namespace="b", model="minilm",
                 code="MetricsUnavailable") == 1
    # the code only: the reason's changing figures made a new series every decision
    info = value(m, "leanserve_last_decision_info", namespace="a", model="minilm",
                 code=d_a.code.value)
    assert info == 1
    m.observe_phase("a", "minilm", "Serving")
    m.observe_phase("b", "minilm", "Serving")
    m.observe_phase("b", "minilm", None)  # the CompressedModel was deleted
    left = samples(m)
    assert left and all(dict(k[1]).get("namespace") == "a" for k in left)
    m.observe_phase("a", "minilm", None)
    assert samples(m) == {}


def test_a_pool_that_leaves_the_decisions_leaves_the_export() -> None:
    m = OperatorMetrics()
    t = Target(100, 1, 4)
    d = decide(Observation(0, 5.0), POOLS, t, None, 0)
    m.record_decision("a", "x", d, t, POOLS)
    one = [PoolCapacity("small", 10, 0.1)]
    m.record_decision("a", "x", decide(Observation(1, 5.0), one, t, None, 1), t, one)
    pools = {dict(k[1]).get("pool") for k in samples(m) if k[0] == "leanserve_replicas"}
    assert pools == {"small"}


def test_a_model_no_longer_autoscaled_leaves_the_export() -> None:
    # compressing a new recipe (or failed): its last decision, say no metrics, must not stay
    # exported, or the alert on it fires until the operator restarts
    m = OperatorMetrics()
    t = Target(100, 1, 4, 1.0)
    held = decide(Observation(0, None), POOLS, t, None, 0)
    m.observe_phase("a", "minilm", "Serving")
    m.record_decision("a", "minilm", held, t, POOLS, Observation(0, None))
    assert value(m, "leanserve_metrics_available", namespace="a", model="minilm") == 0
    m.observe_phase("a", "minilm", "Compressing")
    assert not [k for k in samples(m) if dict(k[1]).get("model") == "minilm"]
