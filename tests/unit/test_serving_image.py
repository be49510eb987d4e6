"""Every import of the python-backend models is provided by the serving image.

Issue 14 item 1: tritonserver runs with --exit-on-error, so a model file importing a package its
image lacks crash-loops the Deployment. This parses the model files (no Triton here to load them,
DESIGN.md 7) and checks each top-level import is the standard library, provided by Triton's
python backend, or pinned in deploy/images/serving/requirements.txt.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from leanserve.api.spec import DEFAULT_SERVING_IMAGE, LEGACY_SERVING_IMAGES, Serving
from leanserve.operator import builders
from leanserve.operator.settings import OperatorSettings, ServingSettings
from leanserve.serving import repository

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "deploy" / "images" / "serving"
# What the python backend itself provides inside every Triton image.
TRITON_PYTHON_BACKEND = {"triton_python_backend_utils", "numpy"}
# Import names that differ from their distribution's name.
DISTRIBUTION = {"ort": "onnxruntime"}
MODEL_FILES = sorted(Path(repository._MODELS_DIR).glob("*.py"))


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found - {"__future__"}


def pinned() -> dict[str, str]:
    out = {}
    for line in (IMAGE / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][A-Za-z0-9.]*)", line)
            assert m, f"requirements.txt: {line!r} is not pinned as NAME==VERSION"
            out[m[1].lower().replace("_", "-")] = m[2]
    return out


def test_there_are_model_files_to_check() -> None:
    names = {p.name for p in MODEL_FILES}
    assert {"tokenizer_model.py", "onnxruntime_model.py"} <= names


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.name)
def test_every_import_is_provided_by_the_serving_image(path: Path) -> None:
    have = pinned()
    missing = [name for name in sorted(imports(path))
               if name not in sys.stdlib_module_names and name not in TRITON_PYTHON_BACKEND
               and DISTRIBUTION.get(name, name).lower().replace("_", "-") not in have]
    assert missing == [], f"{path.name} imports {missing}, which the serving image " \
        f"({IMAGE.relative_to(ROOT)}) does not install"


def test_the_tokenizer_needs_tokenizers_and_the_image_pins_it() -> None:
    """The check above is not vacuous: the tokenizer model really imports `tokenizers`."""
    assert "tokenizers" in imports(repository._MODELS_DIR / "tokenizer_model.py")
    assert "tokenizers" in pinned()


def test_the_image_builds_on_triton_and_runs_as_the_serving_user() -> None:
    text = (IMAGE / "Dockerfile").read_text()
    base = re.search(r"^ARG TRITON_IMAGE=(\S+)", text, re.M)
    assert base and base[1].startswith("nvcr.io/nvidia/tritonserver:")
    assert "requirements.txt" in text
    assert re.search(r"^USER 1000$", text, re.M)



def test_the_spec_default_names_the_image_leanserve_ships() -> None:
    """The schema's default serving.image is the tag deploy/images/serving builds, on the same
    Triton release as its base; the operator runs its configured serving image for it (and for
    the earlier default, the stock Triton image, that CompressedModels created before keep)."""
    text = (IMAGE / "Dockerfile").read_text()
    built = re.search(r"docker build -t (\S+) deploy/images/serving", text)
    base = re.search(r"^ARG TRITON_IMAGE=(\S+)", text, re.M)
    assert built and base
    default = Serving().image
    assert default == built[1] == DEFAULT_SERVING_IMAGE == OperatorSettings().serving.image
    assert default.rsplit(":", 1)[1] == base[1].rsplit(":", 1)[1]  # the same Triton release
    schema = yaml.safe_load((ROOT / "deploy/crds/compressedmodels.leanserve.io.yaml").read_text())
    props = schema["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert props["properties"]["serving"]["properties"]["image"]["default"] == default
    mirror = replace(OperatorSettings(), serving=ServingSettings(image="mirror.example/ls:1"))
    for image in (default, *LEGACY_SERVING_IMAGES):
        assert builders.serving_image(image, OperatorSettings()) == default
        assert builders.serving_image(image, mirror) == "mirror.example/ls:1"
    assert base[1] in LEGACY_SERVING_IMAGES  # the stock image never serves a spec's default
    mine = "registry.example/triton-with-extras:1"
    assert builders.serving_image(mine, OperatorSettings()) == mine  # an explicit choice stays
    assert not any("tritonserver" in builders.serving_image(i, mirror)
                   for i in (default, *LEGACY_SERVING_IMAGES))
