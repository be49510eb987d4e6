"""requirements/lock.txt and pyproject.toml agree.

setup.sh and CI install exactly the lock, while people installing leanserve into their own
environment get pyproject's ranges. If the two drift apart, CI tests versions a user can never
get, or the lock lacks a package the code needs. Regenerate with scripts/lock.sh.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
# The platform the lock is made for (scripts/lock.sh): CPython 3.11 on x86_64 Linux.
LOCK_ENV = {"python_version": "3.11", "python_full_version": "3.11.7", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64",
            "implementation_name": "cpython", "os_name": "posix", "extra": "test"}


def locked() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements/lock.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;#]+)", line)
        if match:
            pins[canonicalize_name(match[1].split("[")[0])] = match[2]
    return pins


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    texts = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    return [Requirement(text) for text in texts]


@pytest.mark.parametrize("req", declared(), ids=str)
def test_every_declared_dependency_is_locked_within_its_range(req: Requirement) -> None:
    if req.marker is not None and not req.marker.evaluate(LOCK_ENV):
        pytest.skip(f"{req.name} is not installed on the lock's platform")
    pins = locked()
    name = canonicalize_name(req.name)
    assert name in pins, f"{req.name} is in pyproject.toml but not in the lock: run scripts/lock.sh"
    assert req.specifier.contains(pins[name], prereleases=True), (
        f"the lock pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}: "
        "run scripts/lock.sh")


def test_the_lock_holds_only_what_pyproject_pulls_in() -> None:
    """Every pin is annotated with what needs it; a pin nothing needs is a stale lock."""
    text = (ROOT / "requirements/lock.txt").read_text()
    declared_names = {canonicalize_name(r.name) for r in declared()}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==\S+\s+# via (.*)$", line)
        if not match:
            continue
        if "leanserve (pyproject.toml)" in match[2]:
            assert canonicalize_name(match[1]) in declared_names, (
                f"the lock says pyproject needs {match[1]}, but pyproject does not name it: "
                "run scripts/lock.sh")
    assert len(locked()) > len(declared_names)
