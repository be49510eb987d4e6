"""The torch modules every technique sees.

Every model a technique receives takes the exported inputs of DESIGN.md section 4 as keyword
arguments and returns the exported output, so that what is compressed, evaluated and exported
is one and the same thing: for a sentence-transformers model that means pooling and
normalization live inside the module, not in the caller.
"""

from __future__ import annotations

import torch
from torch import nn


class TextEncoder(nn.Module):
    """A Hugging Face transformer with sentence-transformers' pooling (and optional head).

    forward(input_ids, attention_mask) -> embedding [batch, hidden] (mean pooling over real
    tokens, then L2 normalization when ``normalize``), or logits [batch, classes] with a head.
    ``backbone`` is the transformers model (BertModel for MiniLM), reachable for techniques that
    edit layers, heads or neurons.
    """

    def __init__(self, backbone: nn.Module, *, pooling: str = "mean", normalize: bool = True,
                 head: nn.Module | None = None) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling {pooling!r} not supported (allowed: mean, cls)")
        self.backbone = backbone
        self.pooling = pooling
        self.normalize = normalize
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask)[0]
        return self.readout(hidden, attention_mask)

    def readout(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooling, then the head or the normalization, of the last hidden states
        [batch, sequence, hidden] (shared with the padding-free form of this encoder)."""
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.head is not None:
            return self.head(pooled)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2.0, dim=1)
        return pooled


class ImageClassifier(nn.Module):
    """Any module mapping pixel_values [batch, C, H, W] to logits, called by keyword."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values)
