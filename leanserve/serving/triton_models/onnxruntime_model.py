"""onnxruntime inside Triton's python backend: the local stand-in for the onnxruntime backend.

The tritonserver in the nvidia-pytriton wheel ships only the python backend, so a repository
served on one machine wraps its ``model.onnx`` in this model, with the very inputs and outputs
that config.pbtxt declares for the cluster. Requests that the dynamic batcher hands over together
are concatenated (grouped by shape, as Triton's own batcher would) and run in one session call.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

_ORT_TO_NUMPY = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


class TritonPythonModel:
    """Serve ``<version>/model.onnx`` with onnxruntime on CPU."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_thread_count") or 0)
        options.inter_op_num_threads = int(params.get("inter_op_thread_count") or 1)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        filename = params.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]
        self.batching = int(config.get("max_batch_size", 0)) > 0
        self.dtypes = {i.name: _ORT_TO_NUMPY.get(i.type) for i in self.session.get_inputs()}

    def _inputs(self, request: Any) -> dict[str, np.ndarray]:
        feed = {}
        for name in self.input_names:
            array = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
            dtype = self.dtypes.get(name)
            feed[name] = array.astype(dtype, copy=False) if dtype is not None else array
        return feed

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, dict[str, np.ndarray]]]] = {}
        for index, request in enumerate(requests):
            try:
                feed = self._inputs(request)
            except Exception as exc:  # a bad request fails alone, not the whole batch
                responses[index] = _error(f"bad input: {exc}")
                continue
            key = tuple((n, a.shape[1:] if self.batching else a.shape) for n, a in feed.items())
            groups.setdefault(key, []).append((index, feed))
        for members in groups.values():
            try:
                self._run_group(members, responses)
            except Exception as exc:  # report to every request of the group, keep serving
                for index, _ in members:
                    responses[index] = _error(f"onnxruntime failed: {exc}")
        return responses

    def _run_group(self, members: list[tuple[int, dict[str, np.ndarray]]],
                   responses: list[Any]) -> None:
        if not self.batching or len(members) == 1:
            for index, feed in members:
                responses[index] = _response(self.output_names,
                                             self.session.run(self.output_names, feed))
            return
        feed = {n: np.concatenate([f[n] for _, f in members]) for n in self.input_names}
        outs = self.session.run(self.output_names, feed)
        start = 0
        for index, member_feed in members:
            rows = next(iter(member_feed.values())).shape[0]
            responses[index] = _response(self.output_names,
                                         [o[start:start + rows] for o in outs])
            start += rows


def _response(names: list[str], arrays: list[np.ndarray]) -> Any:
    tensors = [pb_utils.Tensor(n, np.ascontiguousarray(a))
               for n, a in zip(names, arrays, strict=True)]
    return pb_utils.InferenceResponse(output_tensors=tensors)


def _error(message: str) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
