"""The one place that imports every technique module, so that each registers its transforms.

The pipeline calls ``load_all()`` before looking anything up; importing a technique module is
what registers it (``@register(ConfigType, Stage, method)``), so a module missing here would
make its steps fail with "no technique registered".
"""

from __future__ import annotations

import importlib

from leanserve.compression.registry import CompressionError

MODULES = (
    "leanserve.compression.quantize",
    "leanserve.compression.qat",
    "leanserve.compression.prune",
    "leanserve.compression.distill",
    "leanserve.compression.lowrank",
)


def load_all() -> None:
    for name in MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            raise CompressionError(f"technique module {name} is missing from this install "
                                   "(reinstall leanserve)") from None
