"""The CustomResourceDefinition, generated from the pydantic models.

Kubernetes wants a *structural* OpenAPI v3 schema: every node typed, no $ref, no anyOf for
optional fields, boolean exclusiveMinimum. Pydantic emits JSON Schema 2020-12, so this module
translates one into the other. deploy/crds/ holds the output; a test fails when they drift.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from leanserve.api.spec import (
    API_VERSION,
    GROUP,
    KIND,
    METADATA_NAME_MAX,
    PLURAL,
    SHORT_NAME,
    SINGULAR,
    VERSION,
    CompressedModelSpec,
    CompressedModelStatus,
)
from leanserve.api.validators import DNS_1035_LABEL

_DROP = {"title", "$defs"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """Translate one JSON Schema node (pydantic output) into a structural OpenAPI v3 node."""
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if node.get("x-kubernetes-int-or-string") or _is_int_or_string(options):
            rest.pop("default", None) if rest.get("default") is None else None
            return {**{k: v for k, v in rest.items() if k not in _DROP},
                    "x-kubernetes-int-or-string": True}
        if len(options) == 1:
            if rest.get("default", 0) is None:
                rest.pop("default")
            return _structural({**options[0], **rest}, defs)
        raise ValueError(f"cannot express anyOf {options} structurally")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "const":
            out["enum"] = [value]
            out.setdefault("type", "string")
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True
        elif key == "additionalProperties" and value is False:
            continue
        elif key == "additionalProperties" and value is True:
            out["x-kubernetes-preserve-unknown-fields"] = True
        elif key == "properties":
            out[key] = {k: _structural(v, defs) for k, v in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = _structural(value, defs)
        else:
            out[key] = copy.deepcopy(value)  # a shared $def's list would dump as a YAML alias
    if "properties" in out or node.get("additionalProperties") is False:
        out.setdefault("type", "object")
    return out


def _is_int_or_string(options: list[dict[str, Any]]) -> bool:
    return sorted(o.get("type", "") for o in options) == ["integer", "string"]


def openapi_schema(model: type) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")  # type: ignore[attr-defined]
    return _structural(raw, raw.get("$defs", {}))


def crd() -> dict[str, Any]:
    """The CompressedModel CRD as a dict (apiextensions.k8s.io/v1)."""
    status = openapi_schema(CompressedModelStatus)
    status["x-kubernetes-preserve-unknown-fields"] = True
    # An object the operator has not written yet reads as status {phase: Pending,
    # observedGeneration: 0} (the API server defaults it on every read): kstatus (Flux's health
    # checks) sees generation 1 not observed, InProgress, instead of Current for an object with
    # no status at all, and `kubectl get` shows Pending at once.
    status["default"] = {}
    # Conditions are a map keyed by type (as metav1.Condition lists are): one per type, and
    # server-side apply merges them by type instead of replacing the list.
    status["properties"]["conditions"].update({"x-kubernetes-list-type": "map",
                                               "x-kubernetes-list-map-keys": ["type"]})
    schema = {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            # the only restriction a CRD may put on metadata: the name (it names a Service)
            "metadata": {"type": "object", "properties": {"name": {
                "type": "string", "pattern": DNS_1035_LABEL, "maxLength": METADATA_NAME_MAX}}},
            "spec": openapi_schema(CompressedModelSpec),
            "status": status,
        },
    }
    columns = [
        ("Phase", "string", ".status.phase"),
        ("Selected", "string", ".status.compression.selected"),
        ("Pool", "string", ".status.serving.pool"),
        ("Replicas", "integer", ".status.serving.replicas"),
        ("Cost/h", "number", ".status.cost.hourly"),
        ("Age", "date", ".metadata.creationTimestamp"),
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "leanserve",
                       "app.kubernetes.io/part-of": "leanserve"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": [SHORT_NAME],
                "categories": ["leanserve"],
            },
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": n, "type": t, "jsonPath": p} for n, t, p in columns
                ],
                "schema": {"openAPIV3Schema": schema},
            }],
        },
    }


def crd_yaml() -> str:
    header = f"# Generated by `leanserve crd` from leanserve.api ({API_VERSION}). Do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)
