#!/usr/bin/env bash
# Install everything leanserve and its tests need on a fresh Debian machine with Python 3.11.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  echo "setup: installing Debian's prometheus (for the autoscaling integration tests)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq prometheus >/dev/null
  # Debian's package starts a system service on :9090; the tests start their own.
  $SUDO systemctl stop prometheus >/dev/null 2>&1 || $SUDO service prometheus stop >/dev/null 2>&1 || true
fi

if ! command -v lua5.4 >/dev/null 2>&1; then
  echo "setup: installing lua5.4 (tests the Argo CD health check in deploy/argocd)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq lua5.4 >/dev/null
fi

PY=${PYTHON:-python3}
# The CPU build of torch that lies on disk; a bare `torch` requirement would pull a CUDA build.
if ! $PY -c 'import torch' >/dev/null 2>&1; then
  $PY -m pip install -q torch==2.13.0
fi
$PY -m pip install -q -e ".[test]"
