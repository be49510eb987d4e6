"""Mixed-precision training for every training step (distill, prune fine-tunes, lowRank
fine-tunes, quantization-aware training).

``precision`` is a step option: ``fp32`` (the default: no autocast), ``bf16`` (torch.autocast
to bfloat16 on the device the module is on: CPU or CUDA; bfloat16 keeps fp32's exponent range,
so no loss scaling is needed) or ``fp16`` (CUDA only: autocast to float16 with
``torch.amp.GradScaler``, which scales the loss so small gradients do not flush to zero in
fp16 and skips the optimizer steps whose gradients overflowed). fp16 on a machine without CUDA
is refused with a message naming the field: CPU kernels for fp16 autocast are few and slow,
and a silent fallback would make a recipe mean different things on different pools.

Parameters and optimizer state stay fp32 in every mode (autocast changes the dtype of the
matmuls' inputs, not of the weights), so a trained module is exported exactly as before.

Use::

    amp = MixedPrecision.create("bf16", device, field="...precision")
    for batch in ...:
        with amp.autocast():
            loss = ...
        amp.step(loss, optimizer)   # backward (scaled for fp16), unscale, step, update
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from leanserve.compression.registry import StepError

PRECISIONS = ("fp32", "bf16", "fp16")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve(precision: str, device: torch.device | str, *, field_name: str = "precision",
            cuda_available: bool | None = None) -> tuple[str, torch.dtype | None, bool]:
    """(autocast device type, autocast dtype or None for fp32, whether a GradScaler is used)
    for ``precision`` on ``device``; raises StepError naming ``field_name`` for a combination
    that cannot run (fp16 without CUDA, an unknown name)."""
    dev = torch.device(device)
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if precision not in PRECISIONS:
        raise StepError(f"{field_name}: {precision!r} is not a precision "
                        f"(allowed: {', '.join(PRECISIONS)})")
    if precision == "fp32":
        return dev.type, None, False
    if precision == "fp16":
        if dev.type != "cuda" or not cuda:
            raise StepError(f"{field_name}: fp16 trains only on a CUDA GPU (with a gradient "
                            "scaler) and this step runs on the CPU (allowed here: fp32, bf16)")
        return "cuda", torch.float16, True
    return dev.type, _DTYPES[precision], False


@dataclass
class MixedPrecision:
    """Autocast and, for fp16, a GradScaler around one training loop."""

    precision: str
    device_type: str
    dtype: torch.dtype | None
    scaler: Any = None
    skipped_steps: int = field(default=0)
    """Optimizer steps the GradScaler skipped because gradients overflowed (fp16)."""

    @classmethod
    def create(cls, precision: str, device: torch.device | str, *,
               field_name: str = "precision") -> MixedPrecision:
        device_type, dtype, scaled = resolve(precision, device, field_name=field_name)
        scaler = torch.amp.GradScaler(device_type) if scaled else None
        return cls(precision=precision, device_type=device_type, dtype=dtype, scaler=scaler)

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Run the forward pass and the loss inside this; backward goes outside (``step``)."""
        if self.dtype is None:
            yield
            return
        with torch.autocast(self.device_type, dtype=self.dtype):
            yield

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
        """Backward, then the optimizer step (through the scaler for fp16). Returns False when
        the scaler skipped the step (inf/nan gradients), True otherwise."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()
        took = self.scaler.get_scale() >= scale  # the scale drops only after a skipped step
        if not took:
            self.skipped_steps += 1
        return took


def training_device() -> torch.device:
    """Where an in-process training step runs: the first CUDA GPU when there is one (the step
    moves the model there and back), else the CPU."""
    return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")


def check(precision: str, field_name: str) -> None:
    """Refuse, before any work, a precision this machine cannot train in (StepError naming
    ``field_name``)."""
    resolve(precision, training_device(), field_name=field_name)


_GPU_SECONDS = [0.0]


def gpu_seconds_used() -> float:
    """GPU-seconds this process's training has held CUDA GPUs so far (monotonic; a candidate's
    share is the difference across it): time inside ``on_training_device`` on a GPU, and what
    ``add_gpu_seconds`` adds for training run elsewhere (torchrun workers)."""
    return _GPU_SECONDS[0]


def add_gpu_seconds(seconds: float) -> None:
    """Count GPU-seconds spent outside this process (e.g. DDP workers, one GPU each)."""
    _GPU_SECONDS[0] += max(0.0, seconds)


@contextlib.contextmanager
def on_training_device(*modules: torch.nn.Module) -> Iterator[torch.device]:
    """Move ``modules`` to ``training_device()`` for the block and back to the CPU after; the
    block's wall time counts as GPU time (``gpu_seconds_used``) when that is a GPU."""
    device = training_device()
    if device.type == "cpu":
        yield device
        return
    started = time.monotonic()
    try:
        for m in modules:
            m.to(device)
        yield device
    finally:
        for m in modules:
            m.to("cpu")
        add_gpu_seconds(time.monotonic() - started)


def module_device(module: torch.nn.Module) -> torch.device:
    """Where ``module``'s parameters live (CPU for a module without parameters)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


__all__ = ["PRECISIONS", "MixedPrecision", "add_gpu_seconds", "check", "gpu_seconds_used",
           "module_device", "on_training_device", "resolve", "training_device"]
