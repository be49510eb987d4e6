#!/usr/bin/env bash
# Install everything leanserve and its tests need on a fresh Debian machine with Python 3.11:
# Debian's prometheus and lua5.4, then every Python package at exactly the version in
# requirements/lock.txt (torch included), then leanserve itself (editable, no dependency
# resolution of its own). Idempotent and quiet: a second run installs nothing and prints nothing.
#
# Installs into the Python environment of `python3` (or $PYTHON): an active virtual environment
# if there is one. In a virtual environment the set is made exact (`uv pip sync` also removes
# what the lock does not name); outside one, packages are only added or moved to the locked
# version, never removed.
#
# Regenerate the lock after editing pyproject.toml's dependencies: scripts/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=$(sed -n 's/^uv==\([^ ]*\).*/\1/p' requirements/lock.txt)
PY=${PYTHON:-python3}

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
apt_updated=""
apt_install() {  # apt_install PACKAGE WHY
  echo "setup: installing Debian's $1 ($2)"
  [ -n "$apt_updated" ] || { $sudo apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$1" >/dev/null
}

if ! command -v promtool >/dev/null 2>&1; then
  apt_install prometheus "the autoscaling tests start their own Prometheus"
  # Debian's package may start a system service on :9090; the tests start their own on free ports.
  $sudo service prometheus stop >/dev/null 2>&1 || true
fi
command -v lua5.4 >/dev/null 2>&1 || apt_install lua5.4 "tests the Argo CD health check in deploy/argocd"
command -v openssl >/dev/null 2>&1 || apt_install openssl "certificates of the test control plane"

in_venv=$($PY -c 'import sys; print("yes" if sys.prefix != sys.base_prefix else "")')
if [ -z "$in_venv" ] && $PY -c 'import pathlib, sys, sysconfig
sys.exit(0 if (pathlib.Path(sysconfig.get_path("stdlib")) / "EXTERNALLY-MANAGED").exists() else 1)'; then
  echo "setup: $PY belongs to the system's package manager; make and activate a virtual environment first:" >&2
  echo "       python3 -m venv .venv && . .venv/bin/activate && bash scripts/setup.sh" >&2
  exit 1
fi

# uv installs the lock in seconds where pip takes minutes; the lock pins it like everything else.
if ! $PY -m uv --version 2>/dev/null | grep -q "^uv $UV_VERSION\b"; then
  echo "setup: installing uv $UV_VERSION"
  $PY -m pip --version >/dev/null 2>&1 || $PY -m ensurepip >/dev/null
  $PY -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
fi

# requirements/self.txt is leanserve itself, editable; its dependencies are the lock's.
python=(--python "$($PY -c 'import sys; print(sys.executable)')")
if [ -n "$in_venv" ]; then
  $PY -m uv pip sync -q "${python[@]}" requirements/lock.txt requirements/self.txt
else
  $PY -m uv pip install -q "${python[@]}" -r requirements/lock.txt -r requirements/self.txt
fi
# pyenv finds new console scripts (leanserve) only after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash >/dev/null 2>&1 || true; fi
