"""Durable, all-or-nothing file writes: temporary file, fsync, rename, fsync of the directory."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make renames and new entries in ``path`` durable (ignored where directories cannot be fsynced)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_atomic(path: Path, data: bytes, mode: int = 0o644, tmp_dir: Path | None = None) -> None:
    """Replace ``path`` with ``data`` in one rename; readers see the old or the new file, never half.

    ``tmp_dir`` keeps the temporary file out of a directory that others scan (e.g. a bundle, where a
    concurrent manifest check would see an unlisted file).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = (tmp_dir or path.parent) / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
