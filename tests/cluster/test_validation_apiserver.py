"""The CRD on a real kube-apiserver: it is accepted (every CEL rule compiles and fits the cost
budget), the examples are accepted, and each examples/invalid case is refused by `kubectl apply`
exactly when its first line says ``# refused-by: apiserver`` (the ``operator`` ones pass the
schema and are refused by leanserve's own validation, which the operator runs).

Runs on the session's real control plane (tests/cluster/conftest.py). Uses server-side dry runs
only: nothing is left in the cluster but the CRD and the namespace ``ml``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from leanserve.api import SpecError, parse

ROOT = Path(__file__).resolve().parents[2]
INVALID = sorted((ROOT / "examples" / "invalid").glob("*.yaml"))
CLUSTER: dict[str, Path] = {}


def kubectl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLUSTER["bin"] / "kubectl"), f"--kubeconfig={CLUSTER['config']}",
                           *args], input=stdin, capture_output=True, text=True, timeout=60,
                          check=False)


@pytest.fixture(scope="module", autouse=True)
def crd_installed(control_plane) -> None:
    CLUSTER.update(bin=control_plane.bin, config=control_plane.kubeconfig)
    crd = ROOT / "deploy" / "crds" / "compressedmodels.leanserve.io.yaml"
    r = kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    assert r.returncode == 0, r.stderr
    r = kubectl("wait", "--for=condition=Established", "crd/compressedmodels.leanserve.io",
                "--timeout=30s")
    assert r.returncode == 0, r.stderr
    if kubectl("get", "namespace", "ml").returncode != 0:
        assert kubectl("create", "namespace", "ml").returncode == 0


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.stem)
def test_examples_are_accepted(path: Path) -> None:
    r = kubectl("apply", "--dry-run=server", "-f", str(path))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_example_is_refused_where_its_mark_says(path: Path) -> None:
    mark = path.read_text().splitlines()[0].removeprefix("# refused-by: ")
    r = kubectl("apply", "--dry-run=server", "-f", str(path))
    if mark == "apiserver":
        assert r.returncode != 0, f"{path.name}: the API server accepted it"
    else:
        assert mark == "operator"
        assert r.returncode == 0, f"{path.name}: {r.stderr}"
        with pytest.raises(SpecError):
            parse(yaml.safe_load(path.read_text()))


def test_refusal_names_the_field() -> None:
    doc = yaml.safe_load((ROOT / "examples" / "minilm-cpu.yaml").read_text())
    doc["spec"]["data"]["uri"] = "pvc://models/../../etc/passwd"
    r = kubectl("apply", "--dry-run=server", "-f", "-", stdin=json.dumps(doc))
    assert r.returncode != 0 and "spec.data.uri" in r.stderr and "'..'" in r.stderr


def test_what_leanserve_accepts_the_api_server_accepts() -> None:
    """Hypothesis mutations of the example: a spec leanserve's validation accepts is never
    refused by the API server (the CRD is not stricter than `leanserve validate`)."""
    import sys

    from hypothesis import HealthCheck, given, settings

    sys.path.insert(0, str(ROOT / "tests" / "unit"))
    from test_validation_fuzz import mutated, python_accepts

    seen = {"accepted": 0}

    @settings(max_examples=300, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(mutated())
    def check(doc: dict) -> None:
        try:
            body = json.dumps(doc, allow_nan=False)
        except ValueError:
            return
        if not python_accepts(doc):
            return
        seen["accepted"] += 1
        r = kubectl("apply", "--dry-run=server", "-f", "-", stdin=body)
        assert r.returncode == 0, r.stderr

    check()
    assert seen["accepted"] >= 10
