"""The serving subpackage's exceptions: one hierarchy under LeanserveError.

Each message names what was wrong and what to do; errors about a server that failed carry the
tail of its log, because that is where tritonserver says why.
"""

from __future__ import annotations

from leanserve.errors import LeanserveError


class ServingError(LeanserveError):
    """Anything in leanserve.serving a user can act on."""


class RepositoryError(ServingError):
    """A model repository that cannot be served: empty, missing or malformed config.pbtxt."""


class ConfigError(ServingError):
    """A config.pbtxt field outside what Triton or leanserve allows."""


class PortInUseError(ServingError):
    """A port asked for explicitly is taken."""


class ServerStartError(ServingError):
    """tritonserver exited or never became ready; the message ends with its log tail."""


class LoadError(ServingError):
    """Bad load generator arguments or a server that cannot be reached."""
