#!/usr/bin/env bash
# Download, on this machine, the wheels that the GPU machine's image lacks for leanserve's
# compression path and its device tests (scripts/device-check.sh installs them there; nothing
# can be downloaded on that machine). Python 3.12, manylinux x86_64, the versions of
# requirements/lock.txt, into .whl/ (ignored by git: never commit wheels).
#
#   scripts/device-wheels.sh           download (again) and print the total size
#   scripts/device-wheels.sh --check   also run the device tests here with every import that
#                                      the GPU image could not satisfy refused (DEVICE_PACKAGES
#                                      plus the downloaded wheels are allowed)
#
# The list below was worked out with --check: the image has torch, transformers, onnx,
# onnxruntime, numpy, scikit-learn, safetensors, typer, rich, pyyaml and pytest, but not
# pydantic (leanserve.api.spec) or torch-pruning (leanserve.compression.prune). pydantic 2.14
# needs typing-extensions>=4.16.0, newer than the image may hold: it travels too (45 KiB).
set -euo pipefail
cd "$(dirname "$0")/.."

read -ra WHEELS <<<"${DEVICE_WHEELS:-pydantic pydantic-core annotated-types typing-inspection typing-extensions torch-pruning}"

# The GPU image's packages (/work/.library/device/KINDS.md, "Python packages already there",
# read 2026-11-17); --check refuses imports of any other installed distribution.
DEVICE_PACKAGES="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc
anyio attrs botorch build certifi charset-normalizer chex click cloudpickle cmake colorama
contourpy coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler
cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink
nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark
pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml
regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy
seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq
torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp"

TESTS=(tests/unit/test_training_devices.py tests/unit/test_precision.py)

exclude="$(git rev-parse --git-path info/exclude)"  # the common one in a worktree
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

# any python with pip (it downloads, it installs nothing; a uv venv has no pip)
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for cand in $(type -ap python3); do
        if "$cand" -m pip --version >/dev/null 2>&1; then PY=$cand; break; fi
    done
fi
[ -n "$PY" ] || { echo "device-wheels: no python3 with pip on PATH (set PYTHON)" >&2; exit 1; }
rm -rf .whl && mkdir -p .whl
for name in "${WHEELS[@]}"; do
    version=$(grep -iE "^${name}==" requirements/lock.txt | head -1 | sed -E 's/^[^=]+==([^ ]+).*/\1/')
    [ -n "$version" ] || { echo "device-wheels: $name is not in requirements/lock.txt" >&2; exit 1; }
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl "$name==$version"
done
ls -1 .whl
echo "wheels: $(du -ch .whl/*.whl | tail -1 | cut -f1); tracked files: $(git ls-files -z | xargs -0 du -ch 2>/dev/null | tail -1 | cut -f1) (64 MiB travel in all)"

[ "${1:-}" = "--check" ] || exit 0

# Run the device tests here, refusing every import (by leanserve, the tests or a carried
# package) of a distribution the GPU image lacks and no wheel carries: a missing wheel shows up
# as a ModuleNotFoundError naming the module. Third-party packages of the image import their
# own dependencies freely (this venv's versions of them differ from the image's).
allowed="$DEVICE_PACKAGES $(for w in .whl/*.whl; do basename "$w" | cut -d- -f1; done)"
DEVICE="$DEVICE_PACKAGES" ALLOWED="$allowed" PYTHONPATH="$PWD" PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 \
    "${CHECK_PYTHON:-python}" - "${TESTS[@]}" <<'EOF'
import importlib.abc
import importlib.metadata
import os
import re
import sys


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


allowed = {norm(n) for n in os.environ["ALLOWED"].split()}
device = {norm(n) for n in os.environ["DEVICE"].split()}
owners = importlib.metadata.packages_distributions()
refused = {module for module, dists in owners.items()
           if not any(norm(d) in allowed for d in dists) and module != "leanserve"}
carried = {module for module, dists in owners.items()
           if any(norm(d) in allowed for d in dists)
           and not any(norm(d) in device for d in dists)}


def importer() -> str:
    """The top-level module whose code asked for the import."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not name.startswith(("importlib", "_frozen_importlib")):
            return name.partition(".")[0]
        frame = frame.f_back
    return ""


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        top = fullname.partition(".")[0]
        by = importer()
        if top in refused and (by == "leanserve" or by not in owners or by in carried):
            raise ModuleNotFoundError(f"{fullname}: not on the GPU image and in no wheel "
                                      f"(imported by {by})", name=fullname)
        return None


sys.meta_path.insert(0, Refuse())
import pytest  # noqa: E402

sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[1:]]))
EOF
