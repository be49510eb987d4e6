"""Spec and status models of the CompressedModel resource (the public contract)."""

from leanserve.api.load import LoadedSpec, SpecError, load_file, load_one, parse
from leanserve.api.spec import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    CompressedModel,
    CompressedModelSpec,
    CompressedModelStatus,
    ConditionType,
    Phase,
)

__all__ = [
    "API_VERSION", "GROUP", "KIND", "PLURAL", "VERSION", "CompressedModel", "CompressedModelSpec",
    "CompressedModelStatus", "ConditionType", "LoadedSpec", "Phase", "SpecError", "load_file",
    "load_one", "parse",
]
