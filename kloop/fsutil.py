"""Atomic file replacement, written once: a reader sees the old file or the whole new one.

Everything kloop persists for another process to read (checkpoints, run results, exported models,
aliases, the server's ports file) goes through ``atomic_path``: write to a temporary file in the
same directory, fsync it, then ``os.replace`` it over the target (atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, the file written there is
    fsynced and renamed over ``path``. On failure it is removed and ``path`` is untouched.
    ``suffix``: for writers that insist on a file extension."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
