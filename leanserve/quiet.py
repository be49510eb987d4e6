"""Keep known third-party chatter off stderr, so that what remains there is worth reading.

Each filter names one message, by its text, from one library's logger; nothing is silenced
wholesale and real errors still print:

- torchao logs a warning when its C++ extensions do not load (a wheel built for another Python
  or torch); leanserve uses none of them, its ONNX paths run the same without.
- torch logs a deprecation warning for every Enum torchao registers as a pytree constant.
- transformers draws a "Loading weights" progress bar per model load; leanserve reports its own
  progress (HF_HUB_DISABLE_PROGRESS_BARS, set only when the user has not set it).
"""

from __future__ import annotations

import logging
import os

NOISE = {
    "torchao": ("Failed to load ", "Skipping import of cpp extensions"),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
}


class _DropKnown(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        msg = record.getMessage()
        return not any(p in msg for p in self.prefixes)


def quiet_libraries() -> None:
    """Install the filters (idempotent); call before torch, torchao or transformers load."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name, prefixes in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(prefixes))
