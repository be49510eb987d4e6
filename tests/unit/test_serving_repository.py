"""Repository writing and reading: config.pbtxt from the ONNX graph, backends, ensemble, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from leanserve.api.spec import Task
from leanserve.serving import pbtxt
from leanserve.serving.errors import ConfigError, RepositoryError
from leanserve.serving.repository import (
    Backend,
    InstanceKind,
    OnnxSignature,
    ServingConfig,
    TensorSpec,
    build_model_config,
    gpu_config,
    list_models,
    localize_config,
    primary_model,
    read_onnx_signature,
    serving_config_of,
    to_gpu_repository,
    to_local_repository,
    with_serving_config,
    write_model_repository,
)

VOCAB = 50


def tiny_text_onnx(path: Path) -> Path:
    """input_ids/attention_mask -> embedding [batch, 4]: an embedding lookup and a mean."""
    table = helper.make_tensor("table", TensorProto.FLOAT, [VOCAB, 4],
                               [float(i % 7) for i in range(VOCAB * 4)])
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("ReduceMean", ["masked", "axis1"], ["embedding"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 4])],
        [table, helper.make_tensor("axis", TensorProto.INT64, [1], [2]),
         helper.make_tensor("axis1", TensorProto.INT64, [1], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    return tiny_text_onnx(tmp_path / "model.onnx")


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    (folder / "tokenizer_config.json").write_text('{"pad_token": "<pad>"}')
    return folder


def test_signature_is_read_from_the_graph(onnx_file: Path) -> None:
    sig = read_onnx_signature(onnx_file)
    assert [t.name for t in sig.inputs] == ["input_ids", "attention_mask"]
    assert sig.inputs[0] == TensorSpec("input_ids", "TYPE_INT64", (-1, -1))
    assert sig.outputs == (TensorSpec("embedding", "TYPE_FP32", (-1, 4)),)
    assert sig.vocab_size == VOCAB


def test_not_onnx_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(RepositoryError, match="not a readable ONNX model"):
        read_onnx_signature(bad)


def test_cluster_repository_has_onnx_and_dynamic_batching(onnx_file: Path, tmp_path: Path
                                                           ) -> None:
    repo = write_model_repository(onnx_file, tmp_path / "repo", "enc",
                                  task=Task.FEATURE_EXTRACTION, max_batch_size=16,
                                  max_queue_delay_us=500, instance_count=2)
    config = pbtxt.read(repo / "enc")
    assert config["backend"] == "onnxruntime"
    assert config["max_batch_size"] == 16
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 500}
    assert config["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
    assert config["input"][0] == {"name": "input_ids", "data_type": "TYPE_INT64", "dims": [-1]}
    assert config["output"][0]["dims"] == [4]
    assert (repo / "enc" / "1" / "model.onnx").read_bytes() == onnx_file.read_bytes()
    assert not (repo / "enc" / "1" / "model.py").exists()
    assert config["parameters"]["leanserve.vocab_size"]["string_value"] == str(VOCAB)


def test_gpu_backend_uses_tensorrt_accelerator(onnx_file: Path, tmp_path: Path) -> None:
    repo = write_model_repository(onnx_file, tmp_path / "repo", "enc",
                                  task=Task.FEATURE_EXTRACTION, max_batch_size=8,
                                  max_queue_delay_us=100, backend="onnxruntime-trt",
                                  kind="KIND_GPU")
    config = pbtxt.read(repo / "enc")
    accel = config["optimization"]["execution_accelerators"]["gpu_execution_accelerator"][0]
    assert accel["name"] == "tensorrt"
    assert accel["parameters"]["precision_mode"] == "FP16"
    assert config["instance_group"][0]["kind"] == "KIND_GPU"
    assert "tensorrt" in pbtxt.render(config)


def test_gpu_backend_on_cpu_kind_is_refused(onnx_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs kind KIND_GPU"):
        write_model_repository(onnx_file, tmp_path / "repo", "enc",
                               task=Task.FEATURE_EXTRACTION, max_batch_size=8,
                               max_queue_delay_us=100, backend="tensorrt")


def test_unknown_backend_lists_the_allowed(onnx_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="allowed backends: onnxruntime"):
        write_model_repository(onnx_file, tmp_path / "r", "enc", task=Task.FEATURE_EXTRACTION,
                               max_batch_size=8, max_queue_delay_us=0, backend="tflite")


def test_python_backend_writes_the_wrapper(onnx_file: Path, tmp_path: Path) -> None:
    repo = write_model_repository(onnx_file, tmp_path / "repo", "enc",
                                  task=Task.FEATURE_EXTRACTION, max_batch_size=4,
                                  max_queue_delay_us=0, backend="python")
    config = pbtxt.read(repo / "enc")
    assert config["backend"] == "python"
    assert "TritonPythonModel" in (repo / "enc" / "1" / "model.py").read_text()
    assert config["parameters"]["default_model_filename"]["string_value"] == "model.onnx"


def test_text_ensemble_tokenizes_then_calls_the_model(onnx_file: Path, tmp_path: Path,
                                                      tokenizer_dir: Path) -> None:
    repo = write_model_repository(onnx_file, tmp_path / "repo", "enc",
                                  task=Task.FEATURE_EXTRACTION, max_batch_size=8,
                                  max_queue_delay_us=0, tokenizer_dir=tokenizer_dir,
                                  max_sequence_length=64)
    names = [e.name for e in list_models(repo)]
    assert names == ["enc", "enc-text", "enc-tokenizer"]
    ensemble = pbtxt.read(repo / "enc-text")
    assert ensemble["platform"] == "ensemble"
    assert ensemble["input"] == [{"name": "text", "data_type": "TYPE_STRING", "dims": [1]}]
    steps = ensemble["ensemble_scheduling"]["step"]
    assert [s["model_name"] for s in steps] == ["enc-tokenizer", "enc"]
    assert steps[1]["input_map"] == {"input_ids": "_input_ids",
                                     "attention_mask": "_attention_mask"}
    tok = pbtxt.read(repo / "enc-tokenizer")
    assert [o["name"] for o in tok["output"]] == ["input_ids", "attention_mask"]
    assert tok["parameters"]["pad_token"]["string_value"] == "<pad>"
    assert tok["parameters"]["max_sequence_length"]["string_value"] == "64"
    assert (repo / "enc-tokenizer" / "1" / "tokenizer" / "tokenizer.json").is_file()
    assert primary_model(repo).name == "enc"


def test_image_model_gets_no_ensemble(onnx_file: Path, tmp_path: Path,
                                      tokenizer_dir: Path) -> None:
    repo = write_model_repository(onnx_file, tmp_path / "repo", "img",
                                  task=Task.IMAGE_CLASSIFICATION, max_batch_size=8,
                                  max_queue_delay_us=0, tokenizer_dir=tokenizer_dir)
    assert [e.name for e in list_models(repo)] == ["img"]


def test_local_form_wraps_onnxruntime_and_leaves_the_source_alone(
        onnx_file: Path, tmp_path: Path, tokenizer_dir: Path) -> None:
    repo = write_model_repository(onnx_file, tmp_path / "repo", "enc",
                                  task=Task.FEATURE_EXTRACTION, max_batch_size=8,
                                  max_queue_delay_us=100, tokenizer_dir=tokenizer_dir)
    before = (repo / "enc" / "config.pbtxt").read_text()
    local = to_local_repository(repo, tmp_path / "local")
    config = pbtxt.read(local / "enc")
    assert config["backend"] == "python"
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 100}
    assert (local / "enc" / "1" / "model.py").is_file()
    assert pbtxt.read(local / "enc-text")["platform"] == "ensemble"
    assert (repo / "enc" / "config.pbtxt").read_text() == before


def test_localize_drops_gpu_settings() -> None:
    cluster = {"name": "m", "backend": "onnxruntime", "max_batch_size": 4,
               "instance_group": [{"count": 2, "kind": "KIND_GPU", "gpus": [0]}],
               "optimization": {"execution_accelerators": {}},
               "default_model_filename": "model.onnx"}
    local = localize_config(cluster)
    assert local["backend"] == "python"
    assert local["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
    assert "optimization" not in local
    assert cluster["backend"] == "onnxruntime"  # pure: the input is untouched


def test_serving_config_round_trips_through_a_config(onnx_file: Path) -> None:
    sig = read_onnx_signature(onnx_file)
    base = build_model_config("m", sig, task=Task.FEATURE_EXTRACTION,
                              backend=Backend.ONNXRUNTIME, serving=ServingConfig())
    wanted = ServingConfig(max_batch_size=32, max_queue_delay_us=2000, instance_count=2,
                           dynamic_batching=True, preferred_batch_sizes=(8, 16),
                           intra_op_threads=1)
    config = with_serving_config(base, wanted)
    assert serving_config_of(config) == wanted
    assert serving_config_of(pbtxt.parse(pbtxt.render(config))) == wanted
    assert ServingConfig.from_json(wanted.to_json()) == wanted
    assert "dynamic_batching" not in base


def test_a_queue_timeout_renders_triton_s_reject_policy_and_reads_back(onnx_file: Path,
                                                                      tmp_path: Path) -> None:
    sig = read_onnx_signature(onnx_file)
    base = build_model_config("m", sig, task=Task.FEATURE_EXTRACTION,
                              backend=Backend.ONNXRUNTIME, serving=ServingConfig())
    batched = ServingConfig(max_batch_size=8, max_queue_delay_us=500, dynamic_batching=True,
                            queue_timeout_us=50_000)
    text = pbtxt.render(with_serving_config(base, batched))
    assert "default_queue_policy" in text and "default_timeout_microseconds: 50000" in text
    assert serving_config_of(pbtxt.parse(text)) == batched
    assert ServingConfig.from_json(batched.to_json()) == batched
    # the policy lives in the dynamic batcher: a config without batching gets one, with no delay
    alone = with_serving_config(base, ServingConfig(max_batch_size=8, queue_timeout_us=20_000))
    assert alone["dynamic_batching"] == {
        "max_queue_delay_microseconds": 0, "default_queue_policy": {
            "timeout_action": "REJECT", "default_timeout_microseconds": 20_000}}
    # 0 is Triton's default: no policy at all
    assert "dynamic_batching" not in with_serving_config(base, ServingConfig(max_batch_size=8))
    # DELAY is not a rejection: read back as no timeout
    delayed = dict(alone, dynamic_batching={"default_queue_policy": {
        "timeout_action": "DELAY", "default_timeout_microseconds": 20_000}})
    assert serving_config_of(delayed).queue_timeout_us == 0
    # the profile's best config goes on disk with the deployment's timeout on top
    from leanserve.serving.profile import apply_profile_config

    repo = write_model_repository(onnx_file, tmp_path / "repo", "enc",
                                  task=Task.FEATURE_EXTRACTION, max_batch_size=4,
                                  max_queue_delay_us=100)
    best = ServingConfig(max_batch_size=16, max_queue_delay_us=2000, dynamic_batching=True,
                         instance_count=2)
    apply_profile_config(repo, {"config": best.to_json()}, queue_timeout_us=80_000)
    on_disk = serving_config_of(pbtxt.read(repo / "enc"))
    assert on_disk.queue_timeout_us == 80_000 and on_disk.max_batch_size == 16
    assert on_disk.instance_count == 2


def test_preferred_batch_above_max_is_refused() -> None:
    sig = OnnxSignature((TensorSpec("x", "TYPE_FP32", (-1, 3)),),
                        (TensorSpec("y", "TYPE_FP32", (-1, 3)),))
    with pytest.raises(ConfigError, match="preferred_batch_size 64 out of range"):
        build_model_config("m", sig, task=Task.IMAGE_CLASSIFICATION, backend=Backend.ONNXRUNTIME,
                           serving=ServingConfig(max_batch_size=8, dynamic_batching=True,
                                                 preferred_batch_sizes=(64,)))


def test_python_backend_on_gpu_is_refused() -> None:
    sig = OnnxSignature((TensorSpec("x", "TYPE_FP32", (-1, 3)),),
                        (TensorSpec("y", "TYPE_FP32", (-1, 3)),))
    with pytest.raises(ConfigError, match="CPU only"):
        build_model_config("m", sig, task=Task.IMAGE_CLASSIFICATION, backend=Backend.PYTHON,
                           serving=ServingConfig(kind=InstanceKind.GPU))


@pytest.mark.parametrize(("setup", "message"), [
    (lambda repo: None, "no models in the repository"),
    (lambda repo: (repo / "m").mkdir(), "missing config.pbtxt"),
    (lambda repo: ((repo / "m").mkdir(), (repo / "m" / "config.pbtxt").write_text(
        "name: 'm' max_batch_size: [")), "malformed config.pbtxt"),
    (lambda repo: ((repo / "m").mkdir(), (repo / "m" / "config.pbtxt").write_text(
        "name: 'other'")), "differs from its directory"),
    (lambda repo: ((repo / "m").mkdir(), (repo / "m" / "config.pbtxt").write_text(
        "name: 'm' colour: 'blue'")), "malformed config.pbtxt"),
])
def test_unusable_repositories_are_named(tmp_path: Path, setup, message: str) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    setup(repo)
    with pytest.raises(RepositoryError, match=message):
        list_models(repo)


def test_missing_repository(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="no such model repository"):
        list_models(tmp_path / "absent")


def test_gpu_form_runs_onnxruntime_on_kind_gpu_and_keeps_the_tokenizer_on_cpu(
        onnx_file: Path, tmp_path: Path, tokenizer_dir: Path) -> None:
    """Issue 14 item 10: the repository a GPU pool serves (the Job writes it beside the CPU
    one) asks for the GPU; the CPU repository it derives from is left as it is."""
    repo = write_model_repository(onnx_file, tmp_path / "repo", "enc",
                                  task=Task.FEATURE_EXTRACTION, max_batch_size=8,
                                  max_queue_delay_us=100, tokenizer_dir=tokenizer_dir,
                                  intra_op_threads=2)
    before = {p: p.read_text() for p in repo.rglob("config.pbtxt")}
    gpu = to_gpu_repository(repo, tmp_path / "repo-gpu")
    enc = pbtxt.read(gpu / "enc")
    assert enc["backend"] == "onnxruntime"
    assert enc["instance_group"] == [{"count": 1, "kind": "KIND_GPU"}]
    accel = enc["optimization"]["execution_accelerators"]["gpu_execution_accelerator"][0]
    assert accel["name"] == "tensorrt"
    assert "intra_op_thread_count" not in enc["parameters"]
    assert enc["dynamic_batching"] == {"max_queue_delay_microseconds": 100}
    assert pbtxt.read(gpu / "enc-tokenizer")["instance_group"][0]["kind"] == "KIND_CPU"
    assert pbtxt.read(gpu / "enc-text")["platform"] == "ensemble"
    assert (gpu / "enc" / "1" / "model.onnx").read_bytes() == onnx_file.read_bytes()
    assert {p: p.read_text() for p in repo.rglob("config.pbtxt")} == before
    for config in (pbtxt.read(repo / n) for n in ("enc", "enc-tokenizer", "enc-text")):
        assert "KIND_GPU" not in pbtxt.render(config)  # the CPU pools' repository


def test_gpu_form_of_a_python_model_is_refused() -> None:
    with pytest.raises(ConfigError, match="only onnxruntime models have a GPU form"):
        gpu_config({"name": "m", "backend": "python", "max_batch_size": 1})


def test_profile_apply_serves_what_was_measured(onnx_file: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`leanserve profile --apply` (what the compression Job runs) writes the profile's best
    config and the spec's queue timeout into the repository the pods serve; without --apply
    the repository is left as it was. The measurement itself is tests/integration's."""
    from typer.testing import CliRunner

    import leanserve.serving.profile as profile_mod
    from leanserve.cli import app

    root = Path(__file__).resolve().parents[2]
    spec = tmp_path / "spec.yaml"
    spec.write_text((root / "examples/minilm-cpu.yaml").read_text().replace(
        "maxQueueDelayMicroseconds: 1000",
        "maxQueueDelayMicroseconds: 1000\n    queueTimeoutMicroseconds: 60000"))
    best = ServingConfig(max_batch_size=16, max_queue_delay_us=4000, dynamic_batching=True,
                         instance_count=2)
    measured = {"config": best.to_json(), "slo_latency_p95_ms": 100.0, "grid": [],
                "measured_on": {"cores": 2}, "capacity_rps": 10.0, "pools": {},
                "speedup_vs_default": None}
    monkeypatch.setattr(profile_mod, "profile_repository", lambda *a, **k: measured)
    for apply in (False, True):
        repo = write_model_repository(onnx_file, tmp_path / f"repo-{apply}", "enc",
                                      task=Task.FEATURE_EXTRACTION, max_batch_size=4,
                                      max_queue_delay_us=100)
        before = pbtxt.read(repo / "enc")
        args = ["profile", str(repo), "--spec", str(spec), "--out", str(tmp_path / "p.json")]
        result = CliRunner().invoke(app, args + (["--apply"] if apply else []))
        assert result.exit_code == 0, result.output
        after = serving_config_of(pbtxt.read(repo / "enc"))
        if apply:
            assert after == dataclasses.replace(best, queue_timeout_us=60_000)
        else:
            assert pbtxt.read(repo / "enc") == before
