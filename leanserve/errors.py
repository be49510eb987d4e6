"""The root of leanserve's exceptions.

Each subpackage derives its own hierarchy from ``LeanserveError``; the CLI turns any of them into
one line on stderr and exit code 1, and the operator into kopf's temporary or permanent errors.
"""


class LeanserveError(Exception):
    """A problem the user can act on; the message says what was wrong and what to do."""
