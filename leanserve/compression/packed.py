"""Padding removal for BERT-like encoders: token-wise layers run on real tokens only.

Why: a batch of sentences is padded to its longest row, and a plain BERT graph runs every
projection, LayerNorm and GELU on the padding too. On examples/minilm-cpu.yaml's held-out rows
a batch of 32 is 39% padding. Only attention needs the [batch, sequence] layout; every other
op is per token. ``PackedEncoder`` computes the same function as ``TextEncoder`` with the hidden
states kept packed as [tokens, hidden] (real tokens only) between layers: the projections
(query/key/value, attention output, FFN) run on the real tokens, and the query/key/value are
scattered back into [batch, sequence] only for the attention product and softmax. This is the
"remove padding" idea of FasterTransformer/ByteTransformer and of ONNX Runtime's packed
attention on GPU, written as plain ONNX ops (NonZero, CumSum, Gather), so ONNX Runtime's CPU
provider runs it and its dynamic int8 quantizer sees ordinary MatMuls.

BERT's embeddings (word + position + token type, LayerNorm) run on the real tokens too: the
ids are packed first and each token's position (its index in its row) passed in; embeddings
that derive positions from the padding (RoBERTa's ``padding_idx``) run padded, then are
packed. On MiniLM this is where the 4-bit vocabulary table is decoded: 59% fewer rows.

Packing needs no scatter: ``pack`` gathers the real rows (NonZero of the flattened mask);
``unpack`` gathers, for every padded position, the packed row of its own token (the running
count of real tokens); padding positions get a copy of a real row, which attention's mask and
the pooling's mask ignore. The result is exact up to float summation order;
``export.export_onnx(..., pack=True)`` checks it against the unpacked module
and falls back to the plain graph when a model does not fit (``PackError``).

The query/key/value are unpacked sequence-major ([S * B, 3 x hidden'], position s of row b at
s * B + b), so the heads split as a Transpose [1, 2, 0, 3] of [S, B, heads, d] (the keys'
transpose for the scores merges into [1, 2, 3, 0]). ONNX Runtime's MatmulTransposeFusion folds
exactly these into FusedMatMul (transBatchA / transBatchB, transB) when a session loads the
graph: the attention products read q, k and v in place, and only the context's Transpose back
to [B, S, ...] is left. Batch-major, the keys' Transpose [0, 2, 3, 1] (moving the last axis,
an element-by-element copy on ORT's CPU provider) is not fused: on examples/minilm-cpu.yaml's
bench batch (32 x 43, 2 threads, ORT 1.32) the six of them were 10% of the int8 graph's time.

The hidden states are 2-D on purpose: ONNX Runtime's SkipLayerNormFusion matches only 3-D
inputs, and its CPU SkipLayerNormalization kernel measured 6x slower than the Add +
LayerNormalization it replaces (1.3 ms vs 0.21 ms on [549, 384], ORT 1.31, one thread): that
fusion cost the 3-D graph 17% of its time. The exporter writes the 2-D projections as Gemm;
``quantize.gemm_as_matmul`` turns them back into MatMul + Add for int8.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from leanserve.compression.modules import TextEncoder
from leanserve.compression.registry import CompressionError


class PackError(CompressionError):
    """The model's structure is not the BERT layout packing knows (the plain export is used)."""


def _layers(encoder: TextEncoder) -> list[nn.Module]:
    backbone = encoder.backbone
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    if layers is None or getattr(backbone, "embeddings", None) is None:
        raise PackError("not a BERT-like backbone (no embeddings / encoder.layer)")
    config = getattr(backbone, "config", None)
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise PackError("relative position embeddings are not supported by packing")
    if getattr(config, "is_decoder", False):
        raise PackError("decoder models are not packed")
    for layer in layers:
        att = getattr(getattr(layer, "attention", None), "self", None)
        if att is None or not all(isinstance(getattr(att, n, None), nn.Linear)
                                  for n in ("query", "key", "value")):
            raise PackError("attention layers are not BERT's query/key/value Linear layout "
                            "(e.g. factorized by lowRank)")
        if getattr(layer, "crossattention", None) is not None:
            raise PackError("cross-attention layers are not packed")
        for path in ("attention.output.dense", "attention.output.LayerNorm",
                     "intermediate.dense", "output.dense", "output.LayerNorm"):
            obj: object = layer
            for part in path.split("."):
                obj = getattr(obj, part, None)
            if obj is None:
                raise PackError(f"layer has no {path}")
    return list(layers)


def _takes_positions(embeddings: nn.Module) -> bool:
    """Whether the embeddings are BERT's (position i of a row is i, token type 0 unless
    given), so that the real tokens alone can be embedded with their positions passed in.
    RoBERTa-style embeddings derive positions from the padding (``padding_idx``): those are
    embedded padded, then packed."""
    try:
        params = inspect.signature(embeddings.forward).parameters
    except (TypeError, ValueError):
        return False
    return ({"input_ids", "position_ids", "token_type_ids"} <= set(params)
            and not hasattr(embeddings, "padding_idx")
            and getattr(embeddings, "position_embeddings", None) is not None)


class PackedEncoder(nn.Module):
    """``TextEncoder``'s function with token-wise work on real tokens only.

    Built from the final weights at export time: each layer's query, key and value
    projections become one [hidden -> 3 x hidden'] projection (one GEMM instead of three)
    with the attention scale 1/sqrt(head size) folded into the query part. Its output is
    split while still packed and each third unpacked on its own: splitting the unpacked
    [B * S, 3 x hidden'] copied the padding too (on the MiniLM bench batch, 59% padding,
    Split + attention products 5.2 -> 3.3 ms of a 22 ms int8 graph).
    """

    def __init__(self, encoder: TextEncoder) -> None:
        super().__init__()
        self.layers = _layers(encoder)
        self.encoder = encoder
        config = encoder.backbone.config
        self.head_size = int(getattr(self.layers[0].attention.self, "attention_head_size",
                                     0)) or config.hidden_size // config.num_attention_heads
        scale = 1.0 / math.sqrt(self.head_size)
        fused = []
        with torch.no_grad():
            for layer in self.layers:
                att = layer.attention.self
                parts = [(att.query, scale), (att.key, 1.0), (att.value, 1.0)]
                lin = nn.Linear(att.query.in_features, sum(p.out_features for p, _ in parts))
                lin.weight.copy_(torch.cat([p.weight * k for p, k in parts]))
                lin.bias.copy_(torch.cat([p.bias * k for p, k in parts]))
                fused.append(lin)
        self.qkv = nn.ModuleList(fused)
        self.embed_packed = _takes_positions(encoder.backbone.embeddings)

    def _attention(self, index: int, h: torch.Tensor, unpack, bias: torch.Tensor,
                   shape: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        batch, seq = shape
        width = self.qkv[index].out_features // 3
        heads = width // self.head_size
        qkv = self.qkv[index](h)  # [T, 3 x width]: split while packed, then unpack each

        def part(i: int) -> torch.Tensor:  # [B, heads, S, d]
            x = unpack(qkv[:, i * width:(i + 1) * width])  # [S*B, width], sequence-major
            return x.reshape(seq, batch, heads, self.head_size).permute(1, 2, 0, 3)

        q, k, v = part(0), part(1), part(2)
        scores = torch.matmul(q, k.transpose(-1, -2)) + bias
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
        return ctx.transpose(1, 2).reshape(batch * seq, width)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        batch, seq = input_ids.shape[0], input_ids.shape[1]
        flat = attention_mask.reshape(-1)
        real = torch.nonzero(flat).reshape(-1)  # [T] positions of real tokens
        source = (torch.cumsum(flat, 0) - 1).clamp(min=0)  # packed row of each position
        # the same rows in sequence-major order (position s of row b at s * B + b), for the
        # attention's query/key/value: see ``_attention``
        by_step = source.reshape(batch, seq).transpose(0, 1).reshape(-1)

        def pack(x: torch.Tensor) -> torch.Tensor:  # [B*S, H] -> [T, H]
            return torch.index_select(x, 0, real)

        def unpack(x: torch.Tensor, rows: torch.Tensor = source) -> torch.Tensor:
            # [T, H] -> [B*S, H] (or [S*B, H] with by_step). Padding positions get a copy of
            # a real row: finite, masked out of attention keys by ``bias``, never packed
            # back, and zeroed by the pooling mask.
            return torch.index_select(x, 0, rows)

        bias = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * torch.finfo(
            torch.float32).min
        embeddings = enc.backbone.embeddings
        if self.embed_packed:  # word/position/type embeddings and their LayerNorm per token
            ids = pack(input_ids.reshape(-1, 1)).reshape(1, -1)  # [1, T]
            steps = torch.remainder(real, seq).reshape(1, -1)  # each token's position
            h = embeddings(input_ids=ids, position_ids=steps,
                           token_type_ids=torch.zeros_like(ids))[0]
        else:
            h = pack(embeddings(input_ids=input_ids).reshape(batch * seq, -1))
        for i, layer in enumerate(self.layers):
            ctx = pack(self._attention(i, h, lambda x: unpack(x, by_step), bias,
                                       (batch, seq)))
            out = layer.attention.output
            h = out.LayerNorm(out.dense(ctx) + h)
            inter = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(h))
            h = layer.output.LayerNorm(layer.output.dense(inter) + h)
        return enc.readout(unpack(h).reshape(batch, seq, -1), attention_mask)


def packable(module: nn.Module) -> PackedEncoder | None:
    """The packed form of ``module`` when it is a BERT-like ``TextEncoder``, else None."""
    if not isinstance(module, TextEncoder):
        return None
    try:
        return PackedEncoder(module).eval()
    except (PackError, AttributeError, TypeError, RuntimeError):
        return None  # a layout packing does not know: the plain export is used
