"""The spec contract: examples accepted, invalid examples refused with their messages, the CRD
generated from the models matches deploy/crds and is a valid apiextensions.k8s.io/v1 object."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from leanserve.api import SpecError, load_file, parse
from leanserve.api.crd import crd, crd_yaml
from leanserve.cli import app

ROOT = Path(__file__).resolve().parents[2]
VALID = sorted(p for p in (ROOT / "examples").glob("*.yaml"))
INVALID = sorted((ROOT / "examples" / "invalid").glob("*.yaml"))
runner = CliRunner()


def test_there_are_enough_invalid_examples() -> None:
    assert len(INVALID) >= 20
    for spec in INVALID:
        assert spec.with_suffix(".expected").exists(), f"{spec.name} has no .expected message"


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_examples_validate(path: Path) -> None:
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output and "candidates=" in result.output


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_examples_are_refused_with_their_message(path: Path) -> None:
    expected = path.with_suffix(".expected").read_text().strip()
    result = runner.invoke(app, ["validate", str(path.relative_to(ROOT))],
                           catch_exceptions=False, env={"COLUMNS": "400"})
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    for line in expected.splitlines():
        assert line in result.output


def test_validate_reports_every_error_of_a_document(tmp_path: Path) -> None:
    doc = yaml.safe_load((ROOT / "examples" / "minilm-cpu.yaml").read_text())
    doc["spec"]["slo"]["latencyP95Ms"] = 0
    doc["spec"]["model"]["format"] = "pickle"
    bad = tmp_path / "two.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpecError) as info:
        load_file(bad)
    assert len(info.value.errors) == 2


def test_multi_document_file(tmp_path: Path) -> None:
    text = (ROOT / "examples" / "minilm-cpu.yaml").read_text()
    both = tmp_path / "both.yaml"
    both.write_text(text + "\n---\n" + text.replace("name: minilm", "name: minilm-2"))
    assert [s.name for s in load_file(both)] == ["minilm", "minilm-2"]


@pytest.mark.parametrize("args", [["validate", "/no/such/file.yaml"], ["validate", "/"]])
def test_bad_paths_are_one_line_errors(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_defaults_match_the_design() -> None:
    doc = yaml.safe_load((ROOT / "examples" / "minilm-cpu.yaml").read_text())
    for key in ("quality", "serving", "autoscaling"):
        doc["spec"].pop(key)
    spec = parse(doc).spec
    assert spec.quality.metric.value == "cosine" and spec.quality.max_drop == 0.01
    assert spec.serving.max_batch_size == 32 and spec.serving.max_queue_delay_microseconds == 1000
    assert spec.autoscaling.scale_down_stabilization_seconds == 300
    step = spec.compression.candidates[1].steps[0]
    raw = doc["spec"]["compression"]["candidates"][1]["steps"][0]["prune"]
    assert step.kind == "prune" and step.config.sparsity == raw["sparsity"]
    assert step.config.iterations == raw.get("iterations", 1)  # default when not given


def test_crd_in_deploy_matches_the_models() -> None:
    on_disk = (ROOT / "deploy" / "crds" / "compressedmodels.leanserve.io.yaml").read_text()
    hint = "run `leanserve crd > deploy/crds/compressedmodels.leanserve.io.yaml`"
    assert on_disk == crd_yaml(), hint


def test_crd_command_prints_the_crd() -> None:
    out = subprocess.run([sys.executable, "-m", "leanserve", "crd"], capture_output=True,
                         text=True, check=True).stdout
    assert yaml.safe_load(out) == crd()


def test_crd_is_a_valid_v1_object() -> None:
    kubernetes_validate.validate(crd(), "1.30.0", strict=True)


def _walk(node: object, path: str = ""):
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def test_crd_schema_is_structural() -> None:
    version = crd()["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        if path.endswith((".properties", "x-kubernetes-validations", ".default")):
            continue  # maps of schemas, rule lists, default values: not schema nodes
        assert "$ref" not in node and "anyOf" not in node and "title" not in node, path
        if "properties" in node:
            assert node.get("type") == "object", path
            assert "additionalProperties" not in node, path
        if "x-kubernetes-int-or-string" not in node and not path.endswith("]") and \
                "rule" not in node and not path.endswith("metadata"):
            assert "type" in node, path
    # a status the operator has not written yet reads as {phase: Pending, observedGeneration:
    # 0}: kstatus says InProgress (generation not observed), not Current
    status = schema["properties"]["status"]
    assert status["default"] == {} and status["properties"]["observedGeneration"][
        "default"] == 0 and status["properties"]["phase"]["default"] == "Pending"
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert names == ["Phase", "Selected", "Pool", "Replicas", "Cost/h", "Age"]
    assert crd()["spec"]["names"]["shortNames"] == ["cmod"]
    rules = [v["rule"] for _, n in _walk(schema) for v in n.get("x-kubernetes-validations", [])]
    assert any("minReplicas <= self.maxReplicas" in r for r in rules)
    assert any("exists_one" in r and "quantize" in r for r in rules)
    assert sum("exists_one(d, d.name" in r or "exists_one(q, q.name" in r for r in rules) == 2
