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


def test_the_operators_queries_keep_to_the_models_namespace(tmp_path: Path):
    """A model of the same name in another namespace is not this model's load (Prometheus's own
    evaluation, promtool's promql_expr_test); series without the label still count."""
    import json

    from leanserve.autoscaling.metrics import Queries

    series = {  # requests/s per series: counters that grow this much every 15 s scrape
        'nv_inference_request_success{namespace="team-a",model="minilm",instance="a"}': 10.0,
        'nv_inference_request_success{namespace="team-b",model="minilm",instance="b"}': 100.0,
        'nv_inference_request_success{model="minilm",instance="c"}': 2.0,
        'nv_inference_request_success{namespace="team-a",model="other",instance="d"}': 7.0,
    }
    cases = [(Queries("minilm", namespace="team-a"), 12.0), (Queries("minilm"), 112.0)]
    test = {"rule_files": [], "tests": [{
        "interval": "15s",
        "input_series": [{"series": s, "values": f"0+{r * 15:g}x40"} for s, r in series.items()],
        "promql_expr_test": [{"expr": q.request_rate, "eval_time": "5m",
                              "exp_samples": [{"labels": "{}", "value": v}]}
                             for q, v in cases]}]}
    (tmp_path / "queries_test.yaml").write_text(json.dumps(test))
    proc = subprocess.run([PROMTOOL, "test", "rules", "queries_test.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'namespace=~"team-a|"' in Queries("minilm", namespace="team-a").arrival_rate


def test_the_p95_is_what_a_client_of_the_text_ensemble_sees(tmp_path: Path):
    """The p95 the operator reads is the slowest of the model and its text ensemble
    (``<model>-text``: tokenizer + model) on its own pods: here the ensemble's 60 ms, not the
    model's 20 ms; a pod of another CompressedModel called ``minilm-text`` (its own Triton model
    of that name, labelled leanserve_model="minilm-text" by its monitor) is not counted, nor is
    a replica that served nothing in the window."""
    import json

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
    test = {"rule_files": [], "tests": [{
        "interval": "15s", "input_series": series,
        "promql_expr_test": [{"expr": q.p95_ms, "eval_time": "5m",
                              "exp_samples": [{"labels": "{}", "value": 60}]},
                             # the load is still the model's own: every request reaches it
                             {"expr": q.request_rate, "eval_time": "5m",
                              "exp_samples": [{"labels": "{}", "value": 5}]}]}]}
    (tmp_path / "p95_test.yaml").write_text(json.dumps(test))
    proc = subprocess.run([PROMTOOL, "test", "rules", "p95_test.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_pod_scraped_once_is_not_in_the_rate_and_is_counted_apart(tmp_path: Path):
    """Prometheus's own evaluation: a pod that appeared at the last scrape has one sample, so
    rate() leaves it out of the request rate; two replicas are scraped and one is in the rate
    (the operator then adds the new pod's even share). A pod that stopped (its series ended a
    minute ago) is neither scraped now nor counted in the rate."""
    import json

    from leanserve.autoscaling.metrics import Queries

    old = 'nv_inference_request_success{model="minilm",instance="a"}'
    new = 'nv_inference_request_success{model="minilm",instance="b"}'
    gone = 'nv_inference_request_success{model="minilm",instance="c"}'
    q = Queries("minilm", window="60s")
    test = {"rule_files": [], "tests": [{
        "interval": "15s",
        "input_series": [{"series": old, "values": "0+150x20"},
                         {"series": new, "values": "_x19 150"},
                         {"series": gone, "values": "0+150x15 stale"}],
        "promql_expr_test": [
            {"expr": q.replicas_in_rate, "eval_time": "5m",
             "exp_samples": [{"labels": "{}", "value": 1}]},
            {"expr": q.replicas_scraped, "eval_time": "5m",
             "exp_samples": [{"labels": "{}", "value": 2}]},
            {"expr": q.request_rate, "eval_time": "5m",
             "exp_samples": [{"labels": "{}", "value": 10}]}]}]}
    (tmp_path / "count_test.yaml").write_text(json.dumps(test))
    proc = subprocess.run([PROMTOOL, "test", "rules", "count_test.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
