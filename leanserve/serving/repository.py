"""Triton model repositories for compressed models: the cluster form and the local form.

The cluster form is what a tritonserver image serves: ``<name>/config.pbtxt`` and
``<name>/1/model.onnx`` on the onnxruntime backend (with the TensorRT accelerator on GPU pools),
and for text models the ensemble ``<name>-text`` that tokenizes inside Triton. The local form is
the same repository with every onnxruntime model wrapped in a python-backend model, because the
tritonserver shipped in the nvidia-pytriton wheel has only the python backend.

Configs are built as plain dicts by pure functions (``build_model_config`` and friends) and
rendered separately by ``leanserve.serving.pbtxt``. Inputs and outputs come from the ONNX graph.
"""

from __future__ import annotations

import copy
import enum
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leanserve.api.spec import Task
from leanserve.serving import pbtxt
from leanserve.serving.errors import ConfigError, RepositoryError

MODEL_FILE = "model.onnx"
VERSION = "1"
TEXT_SUFFIX = "-text"
TOKENIZER_SUFFIX = "-tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_MODELS_DIR = Path(__file__).parent / "triton_models"

# config.pbtxt ``parameters`` keys leanserve reads back (input generation, the local wrapper).
PARAM_TASK = "leanserve.task"
PARAM_VOCAB = "leanserve.vocab_size"
PARAM_SEQ = "max_sequence_length"
PARAM_THREADS = "intra_op_thread_count"


class Backend(str, enum.Enum):
    """How the model runs inside Triton."""

    ONNXRUNTIME = "onnxruntime"
    #: Triton's onnxruntime backend with the TensorRT execution accelerator (GPU pools). A native
    #: TensorRT plan must be built on the target GPU, so "tensorrt" writes this form too.
    ONNXRUNTIME_TRT = "onnxruntime-trt"
    TENSORRT = "tensorrt"
    #: onnxruntime inside the python backend: the local tritonserver's only option.
    PYTHON = "python"

    @property
    def needs_gpu(self) -> bool:
        return self in (Backend.ONNXRUNTIME_TRT, Backend.TENSORRT)


class InstanceKind(str, enum.Enum):
    CPU = "KIND_CPU"
    GPU = "KIND_GPU"


# ONNX TensorProto element types -> Triton data types.
_ONNX_TO_TRITON = {
    1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16",
    6: "TYPE_INT32", 7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16",
    11: "TYPE_FP64", 12: "TYPE_UINT32", 13: "TYPE_UINT64", 16: "TYPE_BF16",
}


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as Triton declares it (batch dimension excluded)."""

    name: str
    data_type: str
    dims: tuple[int, ...]

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, "data_type": self.data_type, "dims": list(self.dims)}


@dataclass(frozen=True)
class OnnxSignature:
    """What config.pbtxt needs to know about an ONNX graph."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    vocab_size: int | None = None


@dataclass(frozen=True)
class ServingConfig:
    """The knobs the profiler searches; one value of each is one Triton config."""

    max_batch_size: int = 1
    max_queue_delay_us: int = 0
    instance_count: int = 1
    #: False reproduces Triton's default: every request runs alone.
    dynamic_batching: bool = False
    preferred_batch_sizes: tuple[int, ...] = ()
    #: onnxruntime intra-op threads per instance; 0 lets onnxruntime decide.
    intra_op_threads: int = 0
    kind: InstanceKind = InstanceKind.CPU
    #: Triton's queue policy: reject (HTTP 503) a request that waited longer than this in the
    #: queue; 0 keeps it queued however long. Not searched: the profiler measures without it.
    queue_timeout_us: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"max_batch_size": self.max_batch_size,
                "max_queue_delay_us": self.max_queue_delay_us,
                "instance_count": self.instance_count,
                "dynamic_batching": self.dynamic_batching,
                "preferred_batch_sizes": list(self.preferred_batch_sizes),
                "intra_op_threads": self.intra_op_threads,
                "kind": self.kind.value,
                "queue_timeout_us": self.queue_timeout_us}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServingConfig:
        return cls(max_batch_size=int(data["max_batch_size"]),
                   max_queue_delay_us=int(data.get("max_queue_delay_us", 0)),
                   instance_count=int(data.get("instance_count", 1)),
                   dynamic_batching=bool(data.get("dynamic_batching", False)),
                   preferred_batch_sizes=tuple(data.get("preferred_batch_sizes", ())),
                   intra_op_threads=int(data.get("intra_op_threads", 0)),
                   kind=InstanceKind(data.get("kind", InstanceKind.CPU.value)),
                   queue_timeout_us=int(data.get("queue_timeout_us", 0)))

    @property
    def label(self) -> str:
        batching = f"dyn{self.max_queue_delay_us}us" if self.dynamic_batching else "nodyn"
        return f"b{self.max_batch_size}-{batching}-i{self.instance_count}"


@dataclass
class ModelEntry:
    """A model directory of a repository and its parsed config."""

    name: str
    path: Path
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def backend(self) -> str:
        return str(self.config.get("backend") or self.config.get("platform") or "")

    @property
    def onnx_path(self) -> Path | None:
        filename = self.config.get("default_model_filename") or MODEL_FILE
        path = self.path / VERSION / filename
        return path if path.is_file() else None

    @property
    def parameters(self) -> dict[str, str]:
        return {k: v.get("string_value", "") for k, v in self.config.get("parameters", {}).items()}


# --------------------------------------------------------------------------------------------
# ONNX signature


def read_onnx_signature(onnx_path: Path) -> OnnxSignature:
    """Inputs, outputs (first dimension taken as the batch) and vocabulary size of a graph."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError and others for bad files
        raise RepositoryError(f"{onnx_path}: not a readable ONNX model ({exc})") from None
    graph = model.graph
    initializers = {i.name for i in graph.initializer}

    def spec(value: Any) -> TensorSpec:
        ttype = value.type.tensor_type
        if ttype.elem_type not in _ONNX_TO_TRITON:
            raise RepositoryError(f"{onnx_path}: tensor {value.name} has ONNX element type "
                                  f"{ttype.elem_type}, which Triton cannot serve")
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
                     for d in ttype.shape.dim)
        return TensorSpec(value.name, _ONNX_TO_TRITON[ttype.elem_type], dims)

    inputs = tuple(spec(v) for v in graph.input if v.name not in initializers)
    outputs = tuple(spec(v) for v in graph.output)
    if not inputs or not outputs:
        raise RepositoryError(f"{onnx_path}: the graph has no inputs or no outputs")
    return OnnxSignature(inputs, outputs, _vocab_size(graph))


def _vocab_size(graph: Any) -> int | None:
    """Rows of the embedding table that ``input_ids`` indexes (a Gather on an initializer)."""
    shapes = {i.name: list(i.dims) for i in graph.initializer}
    fed = {"input_ids"}
    for node in graph.node:  # ids may pass through a Cast or Unsqueeze before the Gather
        if node.op_type in ("Cast", "Unsqueeze", "Reshape", "Identity") and \
                node.input and node.input[0] in fed:
            fed.update(node.output)
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in fed:
            dims = shapes.get(node.input[0])
            if dims and len(dims) == 2:
                return int(dims[0])
    return None


# --------------------------------------------------------------------------------------------
# config dicts (pure)


def build_model_config(name: str, signature: OnnxSignature, *, task: Task, backend: Backend,
                       serving: ServingConfig, max_sequence_length: int | None = None,
                       trt_precision: str = "FP16") -> dict[str, Any]:
    """config.pbtxt for the model itself, as a dict."""
    if backend.needs_gpu and serving.kind is not InstanceKind.GPU:
        raise ConfigError(f"{name}: backend {backend.value} needs kind KIND_GPU "
                          f"(got {serving.kind.value})")
    if backend is Backend.PYTHON and serving.kind is InstanceKind.GPU:
        raise ConfigError(f"{name}: backend python (the local wrapper) runs on CPU only "
                          "(allowed kind: KIND_CPU)")
    batching = serving.max_batch_size > 0

    def dims(t: TensorSpec) -> TensorSpec:
        return TensorSpec(t.name, t.data_type, t.dims[1:] if batching else t.dims)

    params = {PARAM_TASK: task.value}
    if signature.vocab_size:
        params[PARAM_VOCAB] = str(signature.vocab_size)
    if max_sequence_length:
        params[PARAM_SEQ] = str(max_sequence_length)
    if serving.intra_op_threads:
        params[PARAM_THREADS] = str(serving.intra_op_threads)
    config: dict[str, Any] = {
        "name": name,
        "backend": "python" if backend is Backend.PYTHON else "onnxruntime",
        "max_batch_size": serving.max_batch_size,
        "input": [dims(t).to_config() for t in signature.inputs],
        "output": [dims(t).to_config() for t in signature.outputs],
        "instance_group": [{"count": serving.instance_count, "kind": serving.kind.value}],
        "default_model_filename": MODEL_FILE,
        "parameters": {k: {"string_value": v} for k, v in sorted(params.items())},
    }
    if backend is Backend.PYTHON:
        del config["default_model_filename"]
        config["parameters"]["default_model_filename"] = {"string_value": MODEL_FILE}
    config = with_serving_config(config, serving)
    if backend.needs_gpu:
        config["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [{
            "name": "tensorrt",
            "parameters": {"precision_mode": trt_precision,
                           "max_workspace_size_bytes": str(1 << 30),
                           "trt_engine_cache_enable": "true"},
        }]}}
    return config


def with_serving_config(config: dict[str, Any], serving: ServingConfig) -> dict[str, Any]:
    """A copy of ``config`` with batching, instance and thread settings replaced."""
    out = copy.deepcopy(config)
    old_batching = int(out.get("max_batch_size", 0)) > 0
    if old_batching != (serving.max_batch_size > 0):
        raise ConfigError(f"{out.get('name')}: cannot switch between batching and "
                          "non-batching (max_batch_size 0) configs; regenerate the repository")
    out["max_batch_size"] = serving.max_batch_size
    out.pop("dynamic_batching", None)
    # Triton's queue policy lives in the dynamic batcher: a config without batching gets it
    # with no delay, which batches only requests that are already waiting together
    if serving.dynamic_batching or serving.queue_timeout_us > 0:
        dyn: dict[str, Any] = {"max_queue_delay_microseconds": (
            serving.max_queue_delay_us if serving.dynamic_batching else 0)}
        if serving.preferred_batch_sizes:
            dyn["preferred_batch_size"] = list(serving.preferred_batch_sizes)
        if serving.queue_timeout_us > 0:
            dyn["default_queue_policy"] = {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": serving.queue_timeout_us}
        out["dynamic_batching"] = dyn
    out["instance_group"] = [{"count": serving.instance_count, "kind": serving.kind.value}]
    params = dict(out.get("parameters", {}))
    if serving.intra_op_threads:
        params[PARAM_THREADS] = {"string_value": str(serving.intra_op_threads)}
    else:
        params.pop(PARAM_THREADS, None)
    out["parameters"] = params
    pbtxt.validate(out)
    return out


def serving_config_of(config: dict[str, Any]) -> ServingConfig:
    """Read the searched knobs back from a config dict."""
    dyn = config.get("dynamic_batching")
    group = (config.get("instance_group") or [{}])[0]
    threads = config.get("parameters", {}).get(PARAM_THREADS, {}).get("string_value") or 0
    return ServingConfig(
        max_batch_size=int(config.get("max_batch_size", 0)),
        max_queue_delay_us=int((dyn or {}).get("max_queue_delay_microseconds", 0)),
        instance_count=int(group.get("count", 1)),
        dynamic_batching=dyn is not None,
        preferred_batch_sizes=tuple(int(x) for x in (dyn or {}).get("preferred_batch_size", [])),
        intra_op_threads=int(threads),
        kind=InstanceKind(group.get("kind", InstanceKind.CPU.value)),
        queue_timeout_us=_queue_timeout_of(dyn or {}),
    )


def _queue_timeout_of(dyn: dict[str, Any]) -> int:
    policy = dyn.get("default_queue_policy") or {}
    if policy.get("timeout_action", "REJECT") != "REJECT":  # REJECT is the proto default
        return 0
    return int(policy.get("default_timeout_microseconds", 0))


def build_tokenizer_config(name: str, model_inputs: list[str], *, max_batch_size: int,
                           max_sequence_length: int, pad_token: str,
                           instance_count: int = 1) -> dict[str, Any]:
    """The python-backend tokenizer step of the text ensemble."""
    return {
        "name": name,
        "backend": "python",
        "max_batch_size": max_batch_size,
        "input": [{"name": "text", "data_type": "TYPE_STRING", "dims": [1]}],
        "output": [{"name": n, "data_type": "TYPE_INT64", "dims": [-1]} for n in model_inputs],
        "instance_group": [{"count": instance_count, "kind": InstanceKind.CPU.value}],
        "parameters": {PARAM_SEQ: {"string_value": str(max_sequence_length)},
                       "pad_token": {"string_value": pad_token}},
    }


def build_ensemble_config(name: str, tokenizer: str, model: str, model_config: dict[str, Any]
                          ) -> dict[str, Any]:
    """``<model>-text``: text (BYTES) -> tokenizer -> model, outputs as the model's."""
    inputs = [i["name"] for i in model_config["input"]]
    outputs = [dict(o) for o in model_config["output"]]
    return {
        "name": name,
        "platform": "ensemble",
        "max_batch_size": model_config["max_batch_size"],
        "input": [{"name": "text", "data_type": "TYPE_STRING", "dims": [1]}],
        "output": outputs,
        "ensemble_scheduling": {"step": [
            {"model_name": tokenizer, "model_version": -1,
             "input_map": {"text": "text"},
             "output_map": {n: f"_{n}" for n in inputs}},
            {"model_name": model, "model_version": -1,
             "input_map": {n: f"_{n}" for n in inputs},
             "output_map": {o["name"]: o["name"] for o in outputs}},
        ]},
    }


# --------------------------------------------------------------------------------------------
# writing


def write_model_repository(onnx_path: Path, repo: Path, name: str, *, task: Task,
                           max_batch_size: int, max_queue_delay_us: int,
                           backend: str = "onnxruntime", instance_count: int = 1,
                           kind: str = "KIND_CPU", tokenizer_dir: Path | None = None,
                           max_sequence_length: int = 128, intra_op_threads: int = 0,
                           dynamic_batching: bool | None = None,
                           queue_timeout_us: int = 0) -> Path:
    """Write ``repo/<name>/`` (and ``<name>-text`` for text models with a tokenizer).

    ``dynamic_batching`` defaults to on whenever ``max_batch_size`` > 1. Returns ``repo``.
    """
    onnx_path = Path(onnx_path)
    repo = Path(repo)
    try:
        backend_enum = Backend(backend)
        kind_enum = InstanceKind(kind)
    except ValueError as exc:
        raise ConfigError(f"{exc} (allowed backends: {', '.join(b.value for b in Backend)}; "
                          f"kinds: {', '.join(k.value for k in InstanceKind)})") from None
    if not onnx_path.is_file():
        raise RepositoryError(f"{onnx_path}: no such ONNX file")
    if max_batch_size < 1:
        raise ConfigError(f"{name}: max_batch_size {max_batch_size} out of range (allowed: >= 1)")
    signature = read_onnx_signature(onnx_path)
    serving = ServingConfig(
        max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
        instance_count=instance_count, kind=kind_enum, intra_op_threads=intra_op_threads,
        dynamic_batching=max_batch_size > 1 if dynamic_batching is None else dynamic_batching,
        queue_timeout_us=queue_timeout_us,
    )
    seq = max_sequence_length if task.is_text else None
    config = build_model_config(name, signature, task=task, backend=backend_enum,
                                serving=serving, max_sequence_length=seq)
    model_dir = repo / name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    (model_dir / VERSION).mkdir(parents=True)
    _place(onnx_path, model_dir / VERSION / MODEL_FILE)
    if onnx_path.with_name(onnx_path.name + ".data").exists():  # external weights
        _place(onnx_path.with_name(onnx_path.name + ".data"),
               model_dir / VERSION / (MODEL_FILE + ".data"))
    if backend_enum is Backend.PYTHON:
        shutil.copyfile(_MODELS_DIR / "onnxruntime_model.py", model_dir / VERSION / "model.py")
    pbtxt.write(config, model_dir)
    if task.is_text and tokenizer_dir is not None:
        write_text_ensemble(repo, name, config, Path(tokenizer_dir),
                            max_sequence_length=max_sequence_length)
    return repo


def write_text_ensemble(repo: Path, name: str, model_config: dict[str, Any],
                        tokenizer_dir: Path, *, max_sequence_length: int) -> None:
    """Write ``<name>-tokenizer`` and ``<name>-text`` beside the model ``name``."""
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise RepositoryError(f"{tokenizer_dir}: no tokenizer.json (the text ensemble needs the "
                              "model's fast tokenizer file)")
    inputs = [i["name"] for i in model_config["input"]]
    unknown = [n for n in inputs if n not in TEXT_INPUTS]
    if unknown:
        raise RepositoryError(f"{name}: inputs {unknown} are not token tensors (allowed: "
                              f"{', '.join(TEXT_INPUTS)}); no text ensemble for this model")
    pad_token = "[PAD]"
    special = tokenizer_dir / "tokenizer_config.json"
    if special.is_file():
        pad = json.loads(special.read_text(encoding="utf-8")).get("pad_token")
        if isinstance(pad, str):
            pad_token = pad
        elif isinstance(pad, dict) and isinstance(pad.get("content"), str):
            pad_token = pad["content"]
    tok_name = name + TOKENIZER_SUFFIX
    tok_dir = repo / tok_name
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    (tok_dir / VERSION / "tokenizer").mkdir(parents=True)
    for filename in TOKENIZER_FILES:
        if (tokenizer_dir / filename).is_file():
            shutil.copyfile(tokenizer_dir / filename, tok_dir / VERSION / "tokenizer" / filename)
    shutil.copyfile(_MODELS_DIR / "tokenizer_model.py", tok_dir / VERSION / "model.py")
    pbtxt.write(build_tokenizer_config(tok_name, inputs,
                                       max_batch_size=int(model_config["max_batch_size"]),
                                       max_sequence_length=max_sequence_length,
                                       pad_token=pad_token), tok_dir)
    text_dir = repo / (name + TEXT_SUFFIX)
    if text_dir.exists():
        shutil.rmtree(text_dir)
    (text_dir / VERSION).mkdir(parents=True)  # Triton wants a version directory for ensembles
    pbtxt.write(build_ensemble_config(name + TEXT_SUFFIX, tok_name, name, model_config),
                text_dir)


def _place(src: Path, dst: Path) -> None:
    """Hard-link when possible (repositories of a profiling grid share one model), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


# --------------------------------------------------------------------------------------------
# reading and converting


def list_models(repo: Path) -> list[ModelEntry]:
    """Every model of a repository with its parsed config; RepositoryError for unusable ones."""
    repo = Path(repo)
    if not repo.exists():
        raise RepositoryError(f"{repo}: no such model repository")
    if not repo.is_dir():
        raise RepositoryError(f"{repo}: not a directory (a model repository is a directory of "
                              "model directories)")
    entries = []
    for child in sorted(repo.iterdir()):
        if not child.is_dir() or child.name.startswith("."):
            continue
        config = pbtxt.read(child)
        declared = config.get("name")
        if declared and declared != child.name:
            raise RepositoryError(f"{child / pbtxt.CONFIG_FILE}: name {declared!r} differs from "
                                  f"its directory {child.name!r} (make them equal)")
        entries.append(ModelEntry(child.name, child, config))
    if not entries:
        raise RepositoryError(f"{repo}: no models in the repository (expected "
                              "<model>/config.pbtxt and <model>/1/)")
    return entries


def primary_model(repo: Path) -> ModelEntry:
    """The model that runs the ONNX graph (not the tokenizer or the ensemble)."""
    candidates = [e for e in list_models(repo) if e.onnx_path is not None]
    if not candidates:
        raise RepositoryError(f"{repo}: no model with {VERSION}/{MODEL_FILE} "
                              "(profiling needs the ONNX model)")
    return candidates[0]


def to_local_repository(repo: Path, dest: Path) -> Path:
    """A copy of ``repo`` the python-backend-only tritonserver can serve, written to ``dest``.

    onnxruntime models become python-backend models running the same ``model.onnx`` with the
    same inputs, outputs, batching and instances; GPU settings (KIND_GPU, TensorRT) are dropped
    because the local server has no GPU. Python and ensemble models are copied as they are.
    Model files are hard-linked when possible, so this is cheap even for large models.
    """

    def localize(entry: ModelEntry, target: Path) -> None:
        pbtxt.write(localize_config(entry.config), target)
        shutil.copyfile(_MODELS_DIR / "onnxruntime_model.py", target / VERSION / "model.py")

    return _copy_repository(repo, dest, localize, "cannot run on the local tritonserver")


def to_gpu_repository(repo: Path, dest: Path, trt_precision: str = "FP16") -> Path:
    """A copy of ``repo`` for a GPU pool, written to ``dest`` (the cluster's GPU backend).

    onnxruntime models get instance_group KIND_GPU and the TensorRT execution accelerator
    (DESIGN.md section 5); python models (the tokenizer) and ensembles are copied as they are,
    on CPU. Only GPU pools are given this repository: a CPU pool keeps ``repo``, which asks for
    no GPU.
    """
    return _copy_repository(
        repo, dest, lambda entry, target: pbtxt.write(gpu_config(entry.config, trt_precision),
                                                      target), "has no GPU form")


def _copy_repository(repo: Path, dest: Path, onnx: Callable[[ModelEntry, Path], None],
                     refusal: str) -> Path:
    """``repo`` copied to ``dest`` (files hard-linked where possible), ``onnx`` rewriting each
    onnxruntime model's copy; python models and ensembles are kept as they are, any other
    backend is refused with ``refusal``."""
    entries = list_models(repo)
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for entry in entries:
        target = dest / entry.name
        shutil.copytree(entry.path, target, copy_function=_link_or_copy)
        if entry.backend == "onnxruntime":
            onnx(entry, target)
        elif entry.backend not in ("python", "ensemble"):
            raise RepositoryError(f"{entry.path}: backend {entry.backend!r} {refusal} "
                                  "(allowed: onnxruntime, python, ensemble)")
    return dest


def gpu_config(config: dict[str, Any], trt_precision: str = "FP16") -> dict[str, Any]:
    """An onnxruntime-backend config as its KIND_GPU, TensorRT-accelerated form (pure)."""
    if config.get("backend") != "onnxruntime":
        raise ConfigError(f"{config.get('name')}: only onnxruntime models have a GPU form "
                          f"(got backend {config.get('backend')!r})")
    out = copy.deepcopy(config)
    out["instance_group"] = [{**{k: v for k, v in g.items() if k != "gpus"},
                              "kind": InstanceKind.GPU.value}
                             for g in out.get("instance_group") or [{"count": 1}]]
    params = dict(out.get("parameters", {}))
    params.pop(PARAM_THREADS, None)  # CPU threads mean nothing to the CUDA provider
    out["parameters"] = params
    out["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [{
        "name": "tensorrt",
        "parameters": {"precision_mode": trt_precision,
                       "max_workspace_size_bytes": str(1 << 30),
                       "trt_engine_cache_enable": "true"},
    }]}}
    pbtxt.validate(out)
    return out


def localize_config(config: dict[str, Any]) -> dict[str, Any]:
    """An onnxruntime-backend config as the equivalent python-backend config (pure)."""
    out = copy.deepcopy(config)
    out["backend"] = "python"
    out.pop("platform", None)
    out.pop("optimization", None)
    filename = out.pop("default_model_filename", None) or MODEL_FILE
    params = dict(out.get("parameters", {}))
    params["default_model_filename"] = {"string_value": filename}
    out["parameters"] = params
    out["instance_group"] = [{**g, "kind": InstanceKind.CPU.value}
                             for g in out.get("instance_group", [{"count": 1}])]
    for group in out["instance_group"]:
        group.pop("gpus", None)
    return out


def _link_or_copy(src: str, dst: str) -> str:
    """Hard-link model weights (large, never edited in place); copy everything else."""
    if Path(src).suffix in (".onnx", ".data", ".plan", ".bin", ".safetensors"):
        try:
            os.link(src, dst)
            return dst
        except OSError:
            pass
    shutil.copy2(src, dst)
    return dst
