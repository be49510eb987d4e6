"""docs/api.md is what scripts/api_docs.py writes from the CRD and the operator's constants, and
it names every field, condition type, reason, label and annotation the code ships."""

from __future__ import annotations

from pathlib import Path

import yaml
from scripts_by_path import load_script

from leanserve.api.spec import ConditionType
from leanserve.operator.constants import Annotation, Label, Reason

ROOT = Path(__file__).resolve().parents[2]


def _script():
    return load_script("scripts/api_docs.py")


def test_docs_api_md_is_current():
    mod = _script()
    assert (ROOT / "docs/api.md").read_text() == mod.render(), \
        "docs/api.md is stale: run python scripts/api_docs.py"
    assert mod.main(["--check"]) == 0


def test_every_name_the_code_ships_is_documented():
    mod = _script()
    text = mod.render()
    crd = yaml.safe_load((ROOT / "deploy/crds/compressedmodels.leanserve.io.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    paths = [p for part in ("spec", "status") for p, _, _ in mod.fields(schema[part], "")]
    assert "autoscaling.maxHourlyCost" in paths and "conditions[].reason" in paths
    for name in [*(f"`{p}`" for p in paths), *(c.value for c in ConditionType),
                 *(f"`{r.value}`" for r in Reason), *(f"`{x.value}`" for x in Label),
                 *(f"`{a.value}`" for a in Annotation)]:
        assert name in text, name
