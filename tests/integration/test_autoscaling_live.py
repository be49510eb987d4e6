"""Real Prometheus scraping a real tritonserver under load; the policy scales up, then down.

Also: the operator's exporter (leanserve.operator.metrics.OperatorMetrics, what `leanserve
operator` serves), fed with the policy's real decisions for two models of one name in two
namespaces, is scraped by that Prometheus; every panel query of the Grafana dashboard (template
variables substituted) returns data, every alert rule evaluates without error, every series the
rules read exists, and a deleted model's series go away. Until leanserve.serving's LocalTriton
lands, the test starts tritonserver itself the way pytriton does (backends copied beside the
python stub).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from leanserve.autoscaling.metrics import PrometheusSource, Queries, observe
from leanserve.autoscaling.platform import InMemoryPlatform
from leanserve.autoscaling.policy import (
    SETTINGS,
    Decision,
    Observation,
    PoolCapacity,
    Reason,
    Target,
    decide,
)
from leanserve.operator.metrics import OperatorMetrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
MODEL = "echo"
# The operator's models: one name in two namespaces (the Triton pods are in NS_A, as a PodMonitor
# would label them); NS_B's model has a tighter budget, so its decisions differ.
NS_A, NS_B = "team-a", "team-b"

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason="prometheus missing")]

MODEL_PY = '''
import os, sys
sys.path.extend(p for p in os.environ.get("PYTHONPATH", "").split(":") if p and p not in sys.path)
import time
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "x").as_numpy()
            time.sleep(0.01)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", x * 2)]))
        return out
'''
CONFIG = '''name: "echo"
backend: "python"
max_batch_size: 8
input [{name: "x", data_type: TYPE_FP32, dims: [4]}]
output [{name: "y", data_type: TYPE_FP32, dims: [4]}]
instance_group [{kind: KIND_CPU, count: 1}]
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, deadline_s: float, proc: subprocess.Popen) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise TimeoutError(url)


def reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def triton(tmp_path_factory) -> Iterator[dict[str, int]]:
    import pytriton

    base = tmp_path_factory.mktemp("triton")
    dist = Path(pytriton.__file__).parent / "tritonserver"
    shutil.copytree(dist / "backends", base / "backends")
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    shutil.copy(dist / "python_backend_stubs" / ver / "triton_python_backend_stub",
                base / "backends/python/triton_python_backend_stub")
    (base / "repo" / MODEL / "1").mkdir(parents=True)
    (base / "repo" / MODEL / "config.pbtxt").write_text(CONFIG)
    (base / "repo" / MODEL / "1" / "model.py").write_text(MODEL_PY)
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    site = str(Path(pytriton.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": site,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "LD_LIBRARY_PATH": f"{Path(site) / 'nvidia_pytriton.libs'}:"
                              f"{os.environ.get('LD_LIBRARY_PATH', '')}"}
    log = open(base / "triton.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [str(dist / "bin/tritonserver"), "--model-repository", str(base / "repo"),
         "--backend-directory", str(base / "backends"), "--http-port", str(ports["http"]),
         "--grpc-port", str(ports["grpc"]), "--metrics-port", str(ports["metrics"]),
         "--metrics-config", "summary_latencies=true", "--metrics-interval-ms", "1000"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{ports['http']}/v2/models/{MODEL}/ready", 60, proc)
        yield ports
    finally:
        reap(proc)
        log.close()


@pytest.fixture(scope="module")
def exporter() -> Iterator[tuple[OperatorMetrics, int]]:
    """The operator's own exporter, served as `leanserve operator` serves it."""
    m = OperatorMetrics()
    port = free_port()
    server = m.serve(port, addr="127.0.0.1")
    try:
        yield m, port
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, triton, exporter) -> Iterator[str]:
    base = tmp_path_factory.mktemp("prom")
    shutil.copy(ROOT / "deploy/prometheus/rules.yaml", base / "rules.yaml")
    cfg = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(base / "rules.yaml")],
        "scrape_configs": [
            {"job_name": "triton", "static_configs": [
                {"targets": [f"127.0.0.1:{triton['metrics']}"],
                 "labels": {"pool": "cpu-small", "namespace": NS_A}}]},
            # as deploy/operator-with-servicemonitor scrapes the operator (honorLabels)
            {"job_name": "leanserve-operator", "honor_labels": True, "static_configs": [
                {"targets": [f"127.0.0.1:{exporter[1]}"],
                 "labels": {"namespace": "leanserve-system"}}]},
        ],
    }
    (base / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    log = open(base / "prom.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={base / 'prometheus.yml'}",
         f"--storage.tsdb.path={base / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ready", 60, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        reap(proc)
        log.close()


def load(url: str, rate: float, stop: threading.Event) -> None:
    """Open-loop-ish load: one request every 1/rate s from 4 threads (tritonclient)."""
    import tritonclient.http as httpclient

    def worker() -> None:
        client = httpclient.InferenceServerClient(url)
        x = httpclient.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        nxt = time.monotonic()
        while not stop.is_set():
            client.infer(MODEL, [x])
            nxt += 4 / rate
            time.sleep(max(0.0, nxt - time.monotonic()))
        client.close()

    ts = [threading.Thread(target=worker, daemon=True) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=30)


def early_scale_downs(decisions: list[Decision], window_s: float,
                      utilisation: float) -> list[str]:
    """Capacity drops that came less than ``window_s`` after more capacity was last desired.

    From the recorded decisions alone: decision j desired ``desired_rps / utilisation`` of
    capacity; a decision i that lowers capacity to C must come at least ``window_s`` after the
    last decision that desired more than C. One line per violation.
    """
    out = []
    for i in range(1, len(decisions)):
        d, before = decisions[i], decisions[i - 1]
        if d.capacity_rps + 1e-9 >= before.capacity_rps:
            continue
        wanted_more = [e.time for e in decisions[:i] if e.desired_rps is not None
                       and e.desired_rps / utilisation > d.capacity_rps + 1e-9]
        if wanted_more and d.time - max(wanted_more) < window_s - 1e-6:
            out.append(f"t={d.time:.2f}: capacity {before.capacity_rps:g} -> "
                       f"{d.capacity_rps:g} req/s only {d.time - max(wanted_more):.2f}s after "
                       f"more was desired (window {window_s:g}s): {d.reason}")
    return out


def test_early_scale_down_check_catches_violations():
    # the checker itself: a drop 2 s after a higher desire within a 4 s window is reported
    def dec(t: float, cap: float, want: float) -> Decision:
        return Decision(t, {"cpu-small": 1}, "x", Reason.STEADY, want, cap, 0.1, True)

    ok = [dec(0, 60, 50), dec(2, 60, 10), dec(4, 60, 10), dec(5, 15, 10)]
    bad = [dec(0, 60, 50), dec(2, 15, 10)]
    assert early_scale_downs(ok, 4, 1.0) == []
    assert len(early_scale_downs(bad, 4, 1.0)) == 1


def test_policy_scales_up_under_load_then_down(triton, exporter, prometheus):
    """Real load -> Triton -> Prometheus -> policy: up under load, back to minReplicas after.

    Phases end on what was observed, not on fixed sleeps (bounded by deadlines), so a slow
    machine makes the test longer, not different: the load runs until Prometheus has reported it
    for several decisions; the cool-down runs until the policy rests at minReplicas at zero load.
    What is asserted is what a user would see: capacity follows the measured load up at once,
    never drops within the stabilization window of a higher desire, and returns to the minimum.
    """
    metrics, _ = exporter
    pools = [PoolCapacity("cpu-small", 15.0, 0.10), PoolCapacity("cpu-large", 60.0, 0.38)]
    target = Target(latency_p95_ms=100, min_replicas=1, max_replicas=6, max_hourly_cost=2.0,
                    interval_seconds=1, scale_down_stabilization_seconds=4)
    target_b = replace(target, max_hourly_cost=0.3)
    minimum = {"cpu-small": 1, "cpu-large": 0}
    # replicas on this platform serve at once: project the load trend one scrape ahead, not
    # the 30 s of a Kubernetes pod start (which would provision for 8x the load on a ramp)
    settings = replace(SETTINGS, startup_seconds=1.0)
    # a replica carries this share of its capacity at the SLO with 99% of requests within it
    carried = pools[0].curve.load_for(settings.target_quantile)
    plat = InMemoryPlatform([p.name for p in pools], clock=time.monotonic, startup_seconds=0)
    plat.set_ready(MODEL, minimum)
    plat_b = InMemoryPlatform([p.name for p in pools], clock=time.monotonic, startup_seconds=0)
    plat_b.set_ready(MODEL, minimum)
    prev_b: Decision | None = None
    src = PrometheusSource(prometheus, Queries(MODEL, "5s"), clock=time.time)
    stop = threading.Event()
    loader = threading.Thread(target=load, args=(f"127.0.0.1:{triton['http']}", 40.0, stop))
    prev: Decision | None = None
    loaded: list[tuple[float | None, Decision]] = []
    after: list[tuple[float | None, Decision]] = []

    def step(into: list[tuple[float | None, Decision]]) -> Decision:
        nonlocal prev, prev_b
        o, reading = observe(src, plat, MODEL)
        d = decide(o, pools, target, prev, time.monotonic(), settings)
        plat.scale(MODEL, d.replicas)
        # what the operator's autoscale step exports, for NS_A's model and for NS_B's (its own
        # replicas and budget, the same measured load)
        metrics.record_decision(NS_A, MODEL, d, target, pools, o, reading)
        o_b = Observation(o.time, o.request_rate, o.p95_ms, o.queue_ms,
                          plat_b.ready_replicas(MODEL), plat_b.current_replicas(MODEL))
        d_b = decide(o_b, pools, target_b, prev_b, time.monotonic(), settings)
        plat_b.scale(MODEL, d_b.replicas)
        metrics.record_decision(NS_B, MODEL, d_b, target_b, pools, o_b, reading)
        into.append((o.request_rate, d))
        prev, prev_b = d, d_b
        time.sleep(target.interval_seconds)
        return d

    loader.start()
    try:
        t0 = time.monotonic()
        # load: at least 12 s, and until 6 decisions have read a rate above 25 req/s
        while time.monotonic() - t0 < 90:
            step(loaded)
            seen = sum(1 for r, _ in loaded if r is not None and r > 25)
            if seen >= 6 and time.monotonic() - t0 >= 12:
                break
        stop.set()
        loader.join(timeout=30)
        t_end_load = time.monotonic()
        # cool-down: until 3 decisions in a row rest at the minimum with zero measured load
        while time.monotonic() - t_end_load < 60:
            step(after)
            tail = after[-3:]
            if len(tail) == 3 and all(r == 0 and d.replicas == minimum for r, d in tail):
                break
    finally:
        stop.set()
        loader.join(timeout=30)

    every = [d for _, d in loaded + after]
    trace = "\n".join(f"{d.time - t_end_load:+6.1f}s rate={r} {d.reason}"
                      for r, d in loaded + after)
    print(trace)  # shown with -s, and by pytest on failure
    rates = [r for r, _ in loaded if r is not None]
    # Prometheus saw the real load, and the policy scaled up for it at once
    assert rates and max(rates) > 25, trace
    assert max(d.capacity_rps for _, d in loaded) > pools[0].capacity_rps, trace
    assert any(d.code in (Reason.SCALE_UP, Reason.SLO_AT_RISK) for _, d in loaded), trace
    for r, d in loaded:
        if r is not None:
            assert d.capacity_rps + 1e-9 >= r / carried, (r, d.reason)
    # back to minReplicas on the cheapest pool once the load is gone, from real (zero) metrics
    assert after[-1][1].replicas == minimum and after[-1][0] == 0, trace
    assert after[-1][1].code is not Reason.METRICS_UNAVAILABLE
    # never scaled down within the stabilization window of a higher desire (whole run)
    early = early_scale_downs(every, target.scale_down_stabilization_seconds, carried)
    assert not early, "\n".join(early) + "\n" + trace
    # every decision explains itself
    assert all(d.reason.startswith(d.code.value) for d in every)


def _dashboard() -> dict:
    return json.loads((ROOT / "deploy/grafana/leanserve.json").read_text())


def _promql_from_dashboard() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _dashboard()["panels"] for t in p["targets"]]


def _rules() -> list[tuple[str, str]]:
    doc = yaml.safe_load((ROOT / "deploy/prometheus/rules.yaml").read_text())
    return [(r["alert"], r["expr"]) for g in doc["groups"] for r in g["rules"]]


def _substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's substitution of the dashboard's variables (one value, or the "All" value)."""
    for name, value in values.items():
        expr = expr.replace(f"${name}", value)
    assert "$" not in expr.replace("$__rate_interval", ""), expr
    return expr.replace("$__rate_interval", "1m")


def test_dashboard_and_rules_promql_return_data(prometheus, exporter):
    """On the operator's exporter fed with the real decisions of the test above (module
    order): each panel query returns data for each namespace's model and for "All", and only
    that namespace's series; every alert rule evaluates without error (two models of one name:
    a join on model alone would be many-to-many); a deleted model's series go away."""
    metrics, port = exporter
    time.sleep(2)

    def q(expr: str) -> list:
        r = requests.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def drawn(expr: str, instant: bool) -> list:
        """What Grafana draws: a time series panel's range query over the test's minutes (an
        unknown figure is absent, not NaN, so a panel can be empty at one instant), a table's
        instant query."""
        if instant:
            return q(expr)
        now = time.time()
        r = requests.get(f"{prometheus}/api/v1/query_range", params={
            "query": expr, "start": now - 180, "end": now, "step": 5}, timeout=10)
        body = r.json()
        assert body["status"] == "success", (expr, body)
        return [s for s in body["data"]["result"] if s["values"]]

    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    assert {"namespace", "model"} <= set(variables)
    assert {s["metric"]["namespace"] for s in q("leanserve_replicas")} == {NS_A, NS_B}
    all_value = {"namespace": variables["namespace"]["allValue"],
                 "model": variables["model"]["allValue"]}
    panels = _promql_from_dashboard()
    instant = {p["title"]: any(t.get("instant") for t in p["targets"])
               for p in _dashboard()["panels"]}
    several = {"namespace": f"({NS_A}|{NS_B})", "model": f"({MODEL})"}  # a multi-select
    for values in ({"namespace": NS_A, "model": MODEL}, all_value, several):
        for title, expr in panels:
            e = _substitute(expr, values)
            got = drawn(e, instant[title])
            assert got, f"panel {title!r}: no data for {values}: {e}"
            if values["namespace"] == NS_A:
                assert {s["metric"].get("namespace") for s in got} <= {NS_A, None}, (e, got)
    for title, expr in panels:  # NS_B's model: every leanserve series (no Triton pods there)
        if "nv_inference" not in expr:
            got = drawn(_substitute(expr, {"namespace": NS_B, "model": MODEL}), instant[title])
            assert got and {s["metric"].get("namespace") for s in got} <= {NS_B, None}, title
    for name, expr in _rules():
        q(expr)  # valid and evaluable on these series
        for series in set(re.findall(r"\b((?:leanserve|nv)_[a-z0-9_]+)", expr)):
            assert q(f"last_over_time({series}[3m])"), \
                f"rule {name} reads {series}, which Prometheus does not have"
    rules = requests.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    evaluated = {r["name"]: r for g in rules for r in g["rules"]}
    assert set(evaluated) == {name for name, _ in _rules()}
    bad = {n: r.get("lastError") for n, r in evaluated.items() if r["health"] != "ok"}
    assert bad == {}, bad
    # NS_B's model is deleted: the operator's DELETED event forgets it, the next scrape drops
    # its series (staleness), NS_A's stay
    metrics.observe_phase(NS_B, MODEL, None)
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert f'namespace="{NS_B}"' not in text and f'namespace="{NS_A}"' in text
    deadline = time.monotonic() + 15
    while q(f'{{__name__=~"leanserve_.*",namespace="{NS_B}"}}') and time.monotonic() < deadline:
        time.sleep(0.5)
    assert q(f'{{__name__=~"leanserve_.*",namespace="{NS_B}"}}') == []
    assert q(f'leanserve_desired_replicas{{namespace="{NS_A}"}}')
