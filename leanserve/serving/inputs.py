"""Request inputs generated from a model's Triton config, shared by bench, profile and tests.

A load test needs inputs the model accepts without knowing the model: token ids inside the
vocabulary with a full attention mask for text encoders, random pixels for image models, short
sentences for the text ensemble, and plain random values for anything else. Everything comes from
the config (names, data types, dims, and the ``leanserve.*`` parameters the repository writer
records), so the same function serves a config read from disk or fetched from a running server.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from leanserve.serving.errors import ServingError
from leanserve.serving.repository import PARAM_VOCAB

#: Tokens per generated text request: about a sentence of the example data.
DEFAULT_SEQUENCE_LENGTH = 32
DEFAULT_IMAGE_SIDE = 32

_WORDS = ("the", "model", "serves", "requests", "quickly", "while", "cluster", "scales",
          "replicas", "on", "cost", "and", "latency", "targets", "every", "minute",
          "compressed", "weights", "keep", "accuracy", "close", "to", "baseline")

_NUMPY = {
    "TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_FP64": np.float64,
    "TYPE_INT64": np.int64, "TYPE_INT32": np.int32, "TYPE_INT16": np.int16,
    "TYPE_INT8": np.int8, "TYPE_UINT8": np.uint8, "TYPE_BOOL": np.bool_,
    "TYPE_STRING": np.object_,
}
#: Triton config data types -> the datatype strings of the inference protocol.
WIRE_TYPES = {
    "TYPE_FP32": "FP32", "TYPE_FP16": "FP16", "TYPE_FP64": "FP64", "TYPE_INT64": "INT64",
    "TYPE_INT32": "INT32", "TYPE_INT16": "INT16", "TYPE_INT8": "INT8", "TYPE_UINT8": "UINT8",
    "TYPE_BOOL": "BOOL", "TYPE_STRING": "BYTES",
}


def make_inputs(config: dict[str, Any], *, batch: int = 1,
                sequence_length: int = DEFAULT_SEQUENCE_LENGTH, variants: int = 8,
                rng: np.random.Generator | None = None) -> list[dict[str, np.ndarray]]:
    """``variants`` request payloads (name -> array with the batch dimension) for ``config``."""
    rng = rng if rng is not None else np.random.default_rng(0)
    name = config.get("name", "model")
    batching = int(config.get("max_batch_size", 0)) > 0
    if batching and batch > int(config["max_batch_size"]):
        raise ServingError(f"{name}: batch {batch} exceeds max_batch_size "
                           f"{config['max_batch_size']} (allowed: 1 to {config['max_batch_size']})")
    params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    vocab = int(params.get(PARAM_VOCAB) or 0)
    out = []
    for _ in range(variants):
        payload = {}
        for spec in config.get("input", []):
            dims = [int(d) for d in spec.get("dims", [])]
            shape = ([batch] if batching else []) + dims
            payload[spec["name"]] = _tensor(spec["name"], spec.get("data_type", "TYPE_FP32"),
                                            shape, sequence_length, vocab, rng)
        out.append(payload)
    return out


def _tensor(name: str, data_type: str, shape: list[int], sequence_length: int, vocab: int,
            rng: np.random.Generator) -> np.ndarray:
    if data_type not in _NUMPY:
        raise ServingError(f"input {name}: data type {data_type} not supported by the load "
                           f"generator (allowed: {', '.join(sorted(_NUMPY))})")
    dtype = _NUMPY[data_type]
    is_image = name == "pixel_values" or len(shape) == 4
    fill = DEFAULT_IMAGE_SIDE if is_image else sequence_length
    shape = [fill if d < 0 else d for d in shape]
    if data_type == "TYPE_STRING":
        rows = int(np.prod(shape)) if shape else 1
        texts = [" ".join(rng.choice(_WORDS, size=int(rng.integers(6, 16)))).encode()
                 for _ in range(rows)]
        return np.array(texts, dtype=np.object_).reshape(shape)
    if name == "input_ids":
        low, high = (1000, vocab) if vocab > 2000 else (1, max(vocab, 100))
        return rng.integers(low, high, size=shape).astype(dtype)
    if name == "attention_mask":
        return np.ones(shape, dtype=dtype)
    if name == "token_type_ids":
        return np.zeros(shape, dtype=dtype)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(size=shape).astype(dtype)
    if dtype is np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    return rng.integers(0, 10, size=shape).astype(dtype)


def wire_type(array: np.ndarray) -> str:
    """The inference protocol datatype of a numpy array."""
    if array.dtype == np.object_:
        return "BYTES"
    for triton, np_type in _NUMPY.items():
        if array.dtype == np_type:
            return WIRE_TYPES[triton]
    raise ServingError(f"numpy dtype {array.dtype} has no Triton datatype")
