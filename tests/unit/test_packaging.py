"""The wheel holds the leanserve package only: `leanserve run` writes leanserve-run/ into the
directory it runs in, often the repository, and a pattern like "leanserve*" packaged it (seen:
31 files of a run's output in the wheel)."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_package_discovery_takes_leanserve_and_its_subpackages_only() -> None:
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]
    patterns = find["include"]

    def taken(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    assert taken("leanserve") and taken("leanserve.operator") and taken("leanserve.api")
    for other in ("leanserve-run", "leanserve_run", "leanserve-run.logs", "leanservex"):
        assert not taken(other), f"{other} would be packaged by {patterns}"
