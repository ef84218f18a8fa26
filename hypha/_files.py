"""Writing a file so that a crash leaves either the old content or the new, never a mixture."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO

__all__ = ["fsync_dir", "replace_atomically"]


def replace_atomically(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> None:
    """Run ``write(f)`` on a temporary file in ``path``'s directory, flush and fsync it, rename
    it over ``path`` and fsync the directory. If anything fails, ``path`` keeps its previous
    content and the temporary file is removed."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename in ``directory`` durable (the entry, not just the file; POSIX)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
