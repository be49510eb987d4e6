"""Writing result files so that a crash or a full disk never leaves a half-written one in place.

Why: a reader (a user, the operator's hand-back, a later `leanserve` command) takes a result
file's presence as "the run finished". So each result is written to a temporary file in the same
folder, flushed and fsynced, then moved over the final name with ``os.replace`` (atomic on one
file system); on any error the temporary file is removed and the old result, if any, stays. A
full disk or any other OSError becomes a WriteError: one line naming the file and the cause.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from leanserve.errors import LeanserveError


class WriteError(LeanserveError):
    """A result file could not be written (full disk, no permission, ...); nothing was left."""


def disk_full(exc: BaseException) -> bool:
    """Whether an exception is the file system refusing more data (full disk, quota, file size
    limit): the error that dooms every write after it."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def describe(path: Path, exc: OSError) -> str:
    why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
           errno.EFBIG: "the file is larger than allowed"}.get(exc.errno or 0,
                                                               exc.strerror or str(exc))
    return f"cannot write {path}: {why}; nothing was written there (free space or choose " \
           "another --out)"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to (same suffix, so writers that go by it
    still can); moved over ``path`` when the block ends without error (fsynced first), removed
    otherwise. OSError becomes WriteError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}",
                                        dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise WriteError(describe(path, exc)) from None
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise WriteError(describe(path, exc)) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: Path, text: str, encoding: str = "utf-8") -> None:
    write_bytes(path, text.encode(encoding))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
