"""The alert rules load in Prometheus's own checker and pass their promtool unit tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not Path(PROMTOOL).exists(), reason="promtool not installed")]


@pytest.mark.parametrize("args", [
    ["check", "rules", "rules.yaml"],
    ["test", "rules", "rules_test.yaml"],
])
def test_promtool(args):
    proc = subprocess.run([PROMTOOL, *args], cwd=ROOT / "deploy/prometheus",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


def _evaluate(tmp_path: Path, series: list[dict[str, str]], expected: list[tuple[str, float]]
              ) -> None:
    """Prometheus's own evaluation of each expression at 5 min over ``series`` scraped every
    15 s (promtool's promql_expr_test): each must give one sample of the expected value."""
    import json

    test = {"rule_files": [], "tests": [{
        "interval": "15s", "input_series": series,
        "promql_expr_test": [{"expr": expr, "eval_time": "5m",
                              "exp_samples": [{"labels": "{}", "value": value}]}
                             for expr, value in expected]}]}
    (tmp_path / "queries_test.yaml").write_text(json.dumps(test))
    proc = subprocess.run([PROMTOOL, "test", "rules", "queries_test.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_operators_queries_keep_to_the_models_namespace(tmp_path: Path):
    """A model of the same name in another namespace is not this model's load (Prometheus's own
    evaluation, promtool's promql_expr_test); series without the label still count."""
    from leanserve.autoscaling.metrics import Queries

    series = {  # requests/s per series: counters that grow this much every 15 s scrape
        'nv_inference_request_success{namespace="team-a",model="minilm",instance="a"}': 10.0,
        'nv_inference_request_success{namespace="team-b",model="minilm",instance="b"}': 100.0,
        'nv_inference_request_success{model="minilm",instance="c"}': 2.0,
        'nv_inference_request_success{namespace="team-a",model="other",instance="d"}': 7.0,
    }
    cases = [(Queries("minilm", namespace="team-a"), 12.0), (Queries("minilm"), 112.0)]
    _evaluate(tmp_path, [{"series": s, "values": f"0+{r * 15:g}x40"} for s, r in series.items()],
              [(q.request_rate, v) for q, v in cases])
    assert 'namespace=~"team-a|"' in Queries("minilm", namespace="team-a").arrival_rate


def test_the_p95_is_what_a_client_of_the_text_ensemble_sees(tmp_path: Path):
    """The p95 the operator reads is the slowest of the model and its text ensemble
    (``<model>-text``: tokenizer + model) on its own pods: here the ensemble's 60 ms, not the
    model's 20 ms; a pod of another CompressedModel called ``minilm-text`` (its own Triton model
    of that name, labelled leanserve_model="minilm-text" by its monitor) is not counted, nor is
    a replica that served nothing in the window."""
    from leanserve.autoscaling.metrics import Queries

    pods = {  # (labels, p95 us, requests/s)
        "a": ('namespace="team-a",leanserve_model="minilm",model="minilm"', 20_000, 5.0),
        "b": ('namespace="team-a",leanserve_model="minilm",model="minilm-text"', 60_000, 5.0),
        "c": ('namespace="team-a",leanserve_model="minilm-text",model="minilm-text"', 900_000,
              5.0),
        "d": ('namespace="team-a",leanserve_model="minilm",model="minilm-text"', 700_000, 0.0),
    }
    series = []
    for instance, (labels, p95, rate) in pods.items():
        series.append({"series": f'nv_inference_request_summary_us{{{labels},instance='
                                 f'"{instance}",version="1",quantile="0.95"}}',
                       "values": f"{p95}x40"})
        series.append({"series": f'nv_inference_request_success{{{labels},instance='
                                 f'"{instance}",version="1"}}',
                       "values": f"0+{rate * 15:g}x40"})
    q = Queries("minilm", window="60s", namespace="team-a")
    # the load is still the model's own: every request reaches it
    _evaluate(tmp_path, series, [(q.p95_ms, 60), (q.request_rate, 5)])


def test_a_pod_scraped_once_is_not_in_the_rate_and_is_counted_apart(tmp_path: Path):
    """Prometheus's own evaluation: a pod that appeared at the last scrape has one sample, so
    rate() leaves it out of the request rate; two replicas are scraped and one is in the rate
    (the operator then adds the new pod's even share). A pod that stopped (its series ended a
    minute ago) is neither scraped now nor counted in the rate."""
    from leanserve.autoscaling.metrics import Queries

    old = 'nv_inference_request_success{model="minilm",instance="a"}'
    new = 'nv_inference_request_success{model="minilm",instance="b"}'
    gone = 'nv_inference_request_success{model="minilm",instance="c"}'
    q = Queries("minilm", window="60s")
    _evaluate(tmp_path, [{"series": old, "values": "0+150x20"},
                         {"series": new, "values": "_x19 150"},
                         {"series": gone, "values": "0+150x15 stale"}],
              [(q.replicas_in_rate, 1), (q.replicas_scraped, 2), (q.request_rate, 10)])
