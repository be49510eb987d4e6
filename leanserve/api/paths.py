"""Whether the local files a spec names exist (`leanserve validate`, before any work starts).

Only what this machine can see is checked: file:// paths, relative paths (resolved against the
folder of the spec file, as `leanserve run` and `compress` resolve them) and package:// paths
(files inside an installed Python package). pvc:// lives in the cluster and is not checked.
Nothing is imported or read: a package is found with importlib.util.find_spec.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from leanserve.api.load import LoadedSpec
from leanserve.api.validators import split_uri


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, without importing it (None when not installed)."""
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if found is None:
        return None
    if found.submodule_search_locations:
        return Path(next(iter(found.submodule_search_locations)))
    return Path(found.origin).parent if found.origin else None


def missing_paths(loaded: LoadedSpec) -> list[str]:
    """One line per model or data path that does not exist on this machine."""
    spec, base = loaded.spec, loaded.base_dir
    out = []
    for field, uri in (("spec.model.uri", spec.model.uri), ("spec.data.uri", spec.data.uri)):
        parts = split_uri(uri)
        if parts.scheme == "file":
            path = Path(parts.path)
            if not path.exists():
                out.append(f"{field}: {uri!r} does not exist on this machine")
        elif parts.scheme == "":
            where = base if base is not None else Path.cwd()
            path = where / parts.path
            if not path.exists():
                out.append(f"{field}: {uri!r} does not exist (looked at {path}; relative paths "
                           f"are resolved against the spec file's folder, {where})")
        elif parts.scheme == "package":
            root = package_dir(parts.root)
            if root is None:
                out.append(f"{field}: package {parts.root!r} of {uri!r} is not installed "
                           "(pip install it, or use a file:// path)")
            elif not (root / parts.path).exists():
                out.append(f"{field}: {uri!r} does not exist (looked at {root / parts.path})")
    return out
