"""The model's own tokenizer inside Triton, first step of the ``<name>-text`` ensemble.

Takes ``text`` (BYTES, one string per row) and returns the token tensors the encoder takes
(``input_ids``, ``attention_mask`` and, when the encoder has it, ``token_type_ids``), padded to the
longest row of the request and truncated to the model's maximum sequence length, exactly as the
tokenizer did when the model was evaluated. Needs the ``tokenizers`` package in the serving image.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]
from tokenizers import Tokenizer


class TritonPythonModel:
    """Tokenize with ``<version>/tokenizer/tokenizer.json``."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"], "tokenizer")
        self.tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(int(params.get("max_sequence_length") or 128))
        pad = self.tokenizer.token_to_id(params.get("pad_token") or "[PAD]")
        self.pad_id = int(pad) if pad is not None else 0
        self.output_names = [o["name"] for o in config["output"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)
            texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t)
                     for t in raw]
            encodings = self.tokenizer.encode_batch(texts)
            width = max((len(e.ids) for e in encodings), default=1)
            ids = np.full((len(texts), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(texts), width), dtype=np.int64)
            types = np.zeros((len(texts), width), dtype=np.int64)
            for row, enc in enumerate(encodings):
                ids[row, :len(enc.ids)] = enc.ids
                mask[row, :len(enc.ids)] = 1
                types[row, :len(enc.ids)] = enc.type_ids
            arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
            tensors = [pb_utils.Tensor(n, arrays[n]) for n in self.output_names]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
