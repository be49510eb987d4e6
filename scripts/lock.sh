#!/usr/bin/env bash
# Regenerate requirements/lock.txt from pyproject.toml: every runtime and test dependency at one
# version, for the machines leanserve's setup targets (CPython 3.11 on x86_64 Linux, glibc >= 2.35,
# the oldest tag nvidia-pytriton ships). Commit the result; scripts/setup.sh installs from it.
#   scripts/lock.sh               keep what is locked where pyproject still allows it
#   scripts/lock.sh --upgrade     move every package to the newest version pyproject allows
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m uv pip compile pyproject.toml --extra test \
  --python-version 3.11 --python-platform x86_64-manylinux_2_35 \
  --annotation-style line --custom-compile-command scripts/lock.sh -o requirements/lock.txt "$@"
