"""The operator's exceptions; only ``handlers`` turns them into kopf's retry/permanent errors."""

from __future__ import annotations

from leanserve.errors import LeanserveError


class OperatorError(LeanserveError):
    """Something the operator cannot do; the message names what and what to do."""


class ClusterSpecError(OperatorError):
    """A spec that validates on one machine but cannot run in a cluster (e.g. a relative URI)."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("; ".join(errors))


class ApiError(OperatorError):
    """The Kubernetes API refused a request."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"Kubernetes API answered {status}: {message}")


class ConflictError(ApiError):
    """The object already exists (HTTP 409)."""


class KubeconfigError(OperatorError):
    """No usable credentials for the Kubernetes API."""
