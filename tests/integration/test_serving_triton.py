"""A real tritonserver: generated repositories, HTTP and gRPC, the text ensemble, metrics,
the load generator, profiling, and every way a start can fail without leaving a process."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from leanserve.api.load import load_one
from leanserve.api.spec import Task
from leanserve.serving.errors import PortInUseError, RepositoryError, ServerStartError
from leanserve.serving.loadgen import Balance, LoadSpec, Protocol, run_load
from leanserve.serving.repository import write_model_repository
from leanserve.serving.server import LocalTriton, port_in_use

pytestmark = pytest.mark.integration

SPEC = Path(__file__).resolve().parents[2] / "examples" / "minilm-cpu.yaml"


@pytest.fixture(scope="module")
def cluster_repo(tmp_path_factory: pytest.TempPathFactory, serving_tiny_onnx: Path,
                 serving_tokenizer_dir: Path) -> Path:
    """The cluster form (onnxruntime backend) plus the text ensemble."""
    repo = tmp_path_factory.mktemp("cluster") / "model_repository"
    return write_model_repository(serving_tiny_onnx, repo, "tiny", task=Task.FEATURE_EXTRACTION,
                                  max_batch_size=8, max_queue_delay_us=500,
                                  tokenizer_dir=serving_tokenizer_dir, max_sequence_length=64)


@pytest.fixture(scope="module")
def server(cluster_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    triton = LocalTriton(cluster_repo, log_dir=tmp_path_factory.mktemp("logs"),
                         startup_timeout=90)
    try:
        triton.start()
        yield triton
    finally:
        triton.stop()


def token_inputs(rows: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, size=(rows, length)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, length // 2:] = 0  # one padded row: pooling must honour the mask
    return ids, mask


def reference(onnx_path: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_outputs_equal_onnxruntime(server: LocalTriton, serving_tiny_onnx: Path,
                                   protocol: str) -> None:
    import tritonclient.grpc as tg
    import tritonclient.http as th

    lib, url = (th, server.http_url) if protocol == "http" else (tg, server.grpc_url)
    ids, mask = token_inputs(3, 12, seed=1) if protocol == "http" else token_inputs(2, 20, seed=2)
    client = lib.InferenceServerClient(url)
    try:
        inputs = [lib.InferInput("input_ids", list(ids.shape), "INT64"),
                  lib.InferInput("attention_mask", list(mask.shape), "INT64")]
        inputs[0].set_data_from_numpy(ids)
        inputs[1].set_data_from_numpy(mask)
        got = client.infer("tiny", inputs).as_numpy("embedding")
    finally:
        client.close()
    np.testing.assert_allclose(got, reference(serving_tiny_onnx, ids, mask), atol=1e-5)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)  # normalized embeddings


def test_text_ensemble_tokenizes_like_the_model(server: LocalTriton, serving_tiny_onnx: Path,
                                               serving_tokenizer_dir: Path) -> None:
    import tritonclient.http as th
    from tokenizers import Tokenizer

    sentences = ["Compression pays only when the model is served well.", "A short one."]
    text = th.InferInput("text", [2, 1], "BYTES")
    text.set_data_from_numpy(np.array([[s.encode()] for s in sentences], dtype=np.object_))
    client = th.InferenceServerClient(server.http_url)
    try:
        got = client.infer("tiny-text", [text]).as_numpy("embedding")
    finally:
        client.close()
    tokenizer = Tokenizer.from_file(str(serving_tokenizer_dir / "tokenizer.json"))
    tokenizer.no_padding()
    expected = []
    for sentence in sentences:  # each row alone: padding must not change an embedding
        ids = np.array([tokenizer.encode(sentence).ids], dtype=np.int64)
        expected.append(reference(serving_tiny_onnx, ids, np.ones_like(ids))[0])
    np.testing.assert_allclose(got, np.stack(expected), atol=1e-5)


def test_metrics_endpoint_has_latency_summaries(server: LocalTriton) -> None:
    payload = {"inputs": [
        {"name": "input_ids", "shape": [1, 4], "datatype": "INT64", "data": [101, 2000, 3000, 102]},
        {"name": "attention_mask", "shape": [1, 4], "datatype": "INT64", "data": [1, 1, 1, 1]}]}
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/tiny/infer",
                                     data=json.dumps(payload).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert json.loads(resp.read())["outputs"][0]["shape"] == [1, 32]
    with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
        metrics = resp.read().decode()
    assert 'nv_inference_request_success{model="tiny",version="1"}' in metrics
    assert 'nv_inference_request_summary_us{model="tiny",version="1",quantile="0.95"}' in metrics
    assert "nv_inference_request_summary_us_count" in metrics
    assert "nv_inference_queue_summary_us" in metrics


def test_open_loop_load_over_both_protocols(server: LocalTriton) -> None:
    from leanserve.serving import pbtxt
    from leanserve.serving.inputs import make_inputs

    payloads = make_inputs(pbtxt.read(server.repo / "tiny"), sequence_length=16)
    for protocol, url in ((Protocol.HTTP, server.http_url), (Protocol.GRPC, server.grpc_url)):
        series = []
        result = run_load([url], payloads, LoadSpec(model="tiny", protocol=protocol, rate=40,
                                                    duration_s=1.5, arrivals="constant"),
                          on_result=series.append, record_series=True)
        assert result["errors"] == 0
        assert 55 <= result["requests"] <= 60  # 40/s for 1.5 s, constant arrivals
        assert len(series) == result["requests"] == len(result["series"])
        assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p95"]


def test_several_servers_share_load(cluster_repo: Path, serving_tiny_onnx: Path,
                                    no_process_left: list[int]) -> None:
    from leanserve.serving import pbtxt
    from leanserve.serving.inputs import make_inputs

    payloads = make_inputs(pbtxt.read(cluster_repo / "tiny"), sequence_length=8)
    with LocalTriton(cluster_repo) as a, LocalTriton(cluster_repo) as b:
        no_process_left.extend([a.pid, b.pid])
        assert len({a.http_port, b.http_port, a.grpc_port, b.grpc_port}) == 4
        result = run_load([a.grpc_url, b.grpc_url], payloads, LoadSpec(
            model="tiny", protocol=Protocol.GRPC, rate=60, duration_s=1.0,
            balance=Balance.LEAST_OUTSTANDING))
    assert result["errors"] == 0
    assert all(row["requests"] > 5 for row in result["per_server"].values())


def test_python_backend_repository_serves_directly(tmp_path: Path, serving_tiny_onnx: Path,
                                                  no_process_left: list[int]) -> None:
    import tritonclient.http as th

    repo = write_model_repository(serving_tiny_onnx, tmp_path / "repo", "local",
                                  task=Task.FEATURE_EXTRACTION, max_batch_size=4,
                                  max_queue_delay_us=0, backend="python")
    ids, mask = token_inputs(1, 6, seed=3)
    with LocalTriton(repo) as triton:
        no_process_left.append(triton.pid)
        client = th.InferenceServerClient(triton.http_url)
        inputs = [th.InferInput("input_ids", [1, 6], "INT64"),
                  th.InferInput("attention_mask", [1, 6], "INT64")]
        inputs[0].set_data_from_numpy(ids)
        inputs[1].set_data_from_numpy(mask)
        got = client.infer("local", inputs).as_numpy("embedding")
        client.close()
    np.testing.assert_allclose(got, reference(serving_tiny_onnx, ids, mask), atol=1e-5)


def test_model_that_dies_at_start_reports_the_log(tmp_path: Path,
                                                  no_process_left: list[int]) -> None:
    model = tmp_path / "repo" / "broken"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(
        'name: "broken" backend: "python" max_batch_size: 1 '
        'input [{name: "x" data_type: TYPE_FP32 dims: [1]}] '
        'output [{name: "y" data_type: TYPE_FP32 dims: [1]}]')
    (model / "1" / "model.py").write_text(
        "class TritonPythonModel:\n"
        "    def initialize(self, args):\n"
        "        raise RuntimeError('weights are corrupt: leanserve-test-marker')\n")
    triton = LocalTriton(tmp_path / "repo", startup_timeout=60)
    with pytest.raises(ServerStartError) as info:
        triton.start()
    assert "leanserve-test-marker" in str(info.value)
    assert triton.pid is None and not triton.running


def test_bad_repositories_fail_before_any_process(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RepositoryError, match="no models"):
        LocalTriton(tmp_path / "empty").start()
    (tmp_path / "bad" / "m").mkdir(parents=True)
    (tmp_path / "bad" / "m" / "config.pbtxt").write_text("name: 'm' input [")
    triton = LocalTriton(tmp_path / "bad")
    with pytest.raises(RepositoryError, match=r"malformed config\.pbtxt"):
        triton.start()
    assert triton.pid is None


def test_taken_port_is_an_error_when_strict_and_moves_otherwise(
        server: LocalTriton, cluster_repo: Path, no_process_left: list[int]) -> None:
    taken = server.http_port
    assert port_in_use(taken)
    with pytest.raises(PortInUseError, match=f"port {taken} \\(http\\) is already in use"):
        LocalTriton(cluster_repo, http_port=taken, strict_ports=True).start()
    with LocalTriton(cluster_repo, http_port=taken) as moved:
        no_process_left.append(moved.pid)
        assert moved.http_port != taken


def test_quick_profile_prices_every_pool(cluster_repo: Path) -> None:
    from leanserve.serving.profile import SearchSettings, profile_repository

    spec = load_one(SPEC).spec
    settings = SearchSettings(trial_s=0.6, warmup_s=0.2, bisect_steps=1, probe_s=0.4)
    profile = profile_repository(cluster_repo, spec, quick=True, settings=settings, cores=2)
    assert profile["model"] == "tiny"
    assert profile["capacity_rps"] > 0 and profile["slo_met"]
    assert profile["default"]["config"]["max_batch_size"] == 1
    assert len(profile["grid"]) == 3
    small, large = profile["pools"]["cpu-small"], profile["pools"]["cpu-large"]
    assert small["measured"] is True and large["measured"] is False
    assert large["capacity_rps"] == pytest.approx(4 * small["capacity_rps"], rel=1e-3)
    expected = 0.10 / (small["capacity_rps"] * 3600) * 1e6
    assert small["cost_per_million_requests"] == pytest.approx(expected, rel=1e-3)
    json.dumps(profile)  # the file the operator and autoscaler read must serialise


def test_bench_command_writes_json(server: LocalTriton, tmp_path: Path) -> None:
    from leanserve.cli import app

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--url", server.grpc_url, "--model", "tiny-text",
                                      "--protocol", "grpc", "--rate", "20", "--duration", "1",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["errors"] == 0 and data["requests"] > 10
    assert set(data["latency_ms"]) >= {"p50", "p95", "p99"}
    bad = CliRunner().invoke(app, ["bench", "--url", server.http_url, "--model", "tiny",
                                   "--rate", "5", "--protocol", "carrier-pigeon"])
    assert bad.exit_code == 1
    assert "allowed: http, grpc" in bad.output


def test_serve_command_stops_on_ctrl_c_and_reaps(cluster_repo: Path,
                                                 serving_group_members) -> None:
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    from leanserve.serving.server import free_port

    ports = [free_port() for _ in range(3)]
    proc = subprocess.Popen([sys.executable, "-m", "leanserve", "serve", str(cluster_repo),
                             "--http-port", str(ports[0]), "--grpc-port", str(ports[1]),
                             "--metrics-port", str(ports[2])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            # pytest run as a background job ignores SIGINT and the child would
                            # inherit that (Python then installs no KeyboardInterrupt): restore it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    server_pids: list[int] = []
    try:
        deadline = time.monotonic() + 90
        ready = False
        while time.monotonic() < deadline and proc.poll() is None and not ready:
            try:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{ports[0]}/v2/health/ready", timeout=1) as resp:
                    ready = resp.status == 200
            except OSError:
                time.sleep(0.2)
        assert ready, "leanserve serve never became ready"
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                if int(stat[stat.rfind(")") + 2:].split()[1]) == proc.pid:
                    server_pids.append(int(entry))
        assert server_pids, "no tritonserver child found"
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130
        assert b"interrupted" in output
        for pid in server_pids:
            assert serving_group_members(pid) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for pid in server_pids:  # killed or failed, `leanserve serve` may leave its server
            if serving_group_members(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)


SLOW_MODEL = '''
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            time.sleep(0.06)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", x)]))
        return out
'''


def _slow_model(repo: Path, name: str, queue_timeout_us: int) -> None:
    from leanserve.serving import pbtxt
    from leanserve.serving.repository import ServingConfig, with_serving_config

    base = {"name": name, "backend": "python", "max_batch_size": 1,
            "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [1]}],
            "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [1]}]}
    config = with_serving_config(base, ServingConfig(max_batch_size=1,
                                                     queue_timeout_us=queue_timeout_us))
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.py").write_text(SLOW_MODEL)
    pbtxt.write(config, repo / name)


def _burst(url: str, model: str, n: int) -> list[int]:
    """``n`` requests at once; the HTTP status of each."""
    import concurrent.futures
    import urllib.error

    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32",
                                   "data": [1.0]}]}).encode()

    def one(_: int) -> int:
        req = urllib.request.Request(f"http://{url}/v2/models/{model}/infer", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_a_queue_timeout_rejects_what_waited_too_long_and_triton_counts_it(
        tmp_path: Path) -> None:
    """spec.serving.queueTimeoutMicroseconds as rendered runs on the real tritonserver: a burst
    of 16 on a one-at-a-time model that takes 60 ms is answered in full without the policy; with
    a 100 ms timeout, the requests that would wait longer get HTTP 503 at once, and Triton's
    failure counter (which the autoscaler's arrival rate adds) counts each one."""
    repo = tmp_path / "repo"
    _slow_model(repo, "slow", 0)
    _slow_model(repo, "shed", 100_000)
    with LocalTriton(repo, log_dir=tmp_path / "logs", startup_timeout=90) as triton:
        waited = _burst(triton.http_url, "slow", 16)
        shed = _burst(triton.http_url, "shed", 16)
        metrics = urllib.request.urlopen(triton.metrics_url, timeout=10).read().decode()
    assert waited == [200] * 16
    rejected = shed.count(503)
    assert 16 > 16 - rejected >= 2 and set(shed) == {200, 503}
    counted = [line for line in metrics.splitlines()
               if line.startswith("nv_inference_request_failure{") and 'model="shed"' in line
               and 'reason="REJECTED"' in line]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) == rejected
