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
from pathlib import Path

import pytest

from leanserve.api.spec import Serving
from leanserve.operator import builders
from leanserve.operator.settings import OperatorSettings
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



def test_the_serving_image_is_used_by_default() -> None:
    """A spec that keeps the default Triton image is served on the leanserve build of it."""
    image = OperatorSettings().serving.image
    assert image == "ghcr.io/leanserve/serving:24.08-py3"
    default = Serving().image
    assert builders.serving_image(default, OperatorSettings()) == image
    assert image.rsplit(":", 1)[1] == default.rsplit(":", 1)[1]  # the same Triton release
    mine = "registry.example/triton-with-extras:1"
    assert builders.serving_image(mine, OperatorSettings()) == mine  # an explicit choice stays
