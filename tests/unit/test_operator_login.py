"""In-cluster credentials (issue 14 item 9): the server from KUBERNETES_SERVICE_HOST/PORT as
client-go reads it, and the ServiceAccount token read again at every login, so a rotated token
is picked up on the 401 that the old one earns (shown on the real control plane in
tests/cluster/test_operator_behaviour.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from leanserve.operator.errors import KubeconfigError
from leanserve.operator.runner import SERVICE_ACCOUNT_DIR_ENV, service_account_login


def test_the_token_is_read_at_every_login(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("first\n")
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "namespace").write_text("leanserve-system")
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "6443",
           SERVICE_ACCOUNT_DIR_ENV: str(tmp_path)}
    info = service_account_login(env)
    assert info is not None
    assert (info.server, info.token, info.default_namespace) == \
        ("https://10.0.0.1:6443", "first", "leanserve-system")
    assert info.ca_path == str(tmp_path / "ca.crt")
    (tmp_path / "token").write_text("second")  # the kubelet rotated it
    assert service_account_login(env).token == "second"  # type: ignore[union-attr]
    assert service_account_login({**env, "KUBERNETES_SERVICE_HOST": "fd00::1"}).server == \
        "https://[fd00::1]:6443"  # type: ignore[union-attr]


def test_outside_a_cluster_or_without_a_token(tmp_path: Path) -> None:
    assert service_account_login({SERVICE_ACCOUNT_DIR_ENV: str(tmp_path)}) is None
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", SERVICE_ACCOUNT_DIR_ENV: str(tmp_path)}
    assert service_account_login(env) is None  # no token file: try the kubeconfig
    (tmp_path / "token").write_text("")
    with pytest.raises(KubeconfigError, match="empty"):
        service_account_login(env)
