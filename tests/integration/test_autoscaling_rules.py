"""The alert rules load in Prometheus's own checker and pass their promtool unit tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not Path(PROMTOOL).exists(), reason="promtool not installed")]


@pytest.mark.parametrize("args", [
    ["check", "rules", "rules.yaml"],
    ["test", "rules", "rules_test.yaml"],
])
def test_promtool(args):
    proc = subprocess.run([PROMTOOL, *args], cwd=ROOT / "deploy/prometheus",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr
