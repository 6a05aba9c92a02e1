"""Durable, all-or-nothing file writes: temporary file, fsync, rename, fsync of the directory."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import uuid
from pathlib import Path

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2; False where the C library or the file system lacks it, OSError on failure."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename that raises FileExistsError instead of replacing ``dst`` (even an empty directory)."""
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(exc.errno, exc.strerror, str(dst)) from None
        raise
    if dst.exists():  # no renameat2: rename(2) would replace an empty directory, so look first
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (renameat2 RENAME_EXCHANGE); False where unavailable."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


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
