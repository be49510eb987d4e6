#!/usr/bin/env bash
# The GPU check of leanserve's training paths, in ONE device call: prune and lowRank fine-tunes,
# width and transformer distillation, QAT in fp32/bf16/fp16 on cuda:0, and the report's
# gpu_seconds (tests/unit/test_training_devices.py, tests/unit/test_precision.py).
#
# A session with a GPU machine (the device tool's `status` says can_start_another: true):
#   1. here, in the checkout the session was started in (the one the tool sends):
#        scripts/device-wheels.sh            # .whl/: pydantic & co, torch-pruning (~3 MiB)
#   2. one call of the tool:
#        run(command="bash scripts/device-check.sh", carry=[".whl"], timeout_s=300)
#      It must fit in ~5 minutes (the session has 15 minutes of device time, start included;
#      300 s leaves time for one rerun); give_back right after unless rerunning at once.
#   3. read pytest.log from the files that come back; the cuda test ids must say PASSED.
#
# On a machine without a GPU it runs too (the cuda variants skip): OUT=/tmp/x
# PYTHON=python scripts/device-check.sh. It exits with pytest's status.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/device-check}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"

if compgen -G ".whl/*.whl" >/dev/null; then
    if "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" .whl/*.whl || exit 1
    else  # the wheels are the GPU image's Python's (3.12); here the environment has them
        echo "device-check: not installing .whl (built for Python 3.12, this is $("$PY" -V))"
    fi
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

nvidia-smi || echo "device-check: no nvidia-smi"
"$PY" - <<'EOF'
import torch

print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"cuda:0 {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
          f"bf16: {torch.cuda.is_bf16_supported()}")
EOF

"$PY" -m pytest -q -p no:cacheprovider -s -rA --durations=10 \
    tests/unit/test_training_devices.py tests/unit/test_precision.py 2>&1 | tee "$OUT/pytest.log"
exit "${PIPESTATUS[0]}"
