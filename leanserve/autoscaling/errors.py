"""The autoscaling subpackage's exceptions (one hierarchy, rooted in LeanserveError).

The operator maps MetricsError to "hold and retry" and the others to a condition; the CLI prints
any of them as one line.
"""

from leanserve.errors import LeanserveError


class AutoscalingError(LeanserveError):
    """Something in autoscaling the user can act on."""


class PolicyError(AutoscalingError):
    """Inputs to the policy that cannot be used (no pools, a bad profile)."""


class MetricsError(AutoscalingError):
    """Prometheus could not answer (unreachable, HTTP error, bad JSON, query error, an answer
    of the wrong shape); ``kind`` says which (leanserve.autoscaling.metrics.ERROR_KINDS)."""

    def __init__(self, message: str, kind: str = "unreachable") -> None:
        super().__init__(message)
        self.kind = kind


class TraceError(AutoscalingError):
    """A load trace that cannot be replayed (missing file, bad header, bad or negative rates)."""
