"""The one way a file of the bundle store or the state directory is opened: a regular file, size-capped.

Invariant: opening never blocks, whatever sits at the path — the open is ``O_NONBLOCK`` (a FIFO opens at
once instead of waiting for a writer) and the opened file must be a regular file (``fstat``), else
:class:`~m2fpkit.runtime.errors.MalformedFile` names the path and what it is instead (a FIFO, a device,
a socket, a directory, a symbolic link where links are not followed). A file larger than the caller's
cap is refused before its bytes are read. ``FileNotFoundError`` and other ``OSError`` pass through: a
missing file is the caller's decision. Callers still run these reads off the event loop: a regular
file on a slow disk takes its time too.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import MalformedFile

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"))


def kind(mode: int) -> str:
    """What a file of ``mode`` is, in words (for an error message)."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _refusal(what: str, mode: int) -> MalformedFile:
    return MalformedFile(what, f"{kind(mode)}, not a regular file; refused")


def open_regular(path: str | os.PathLike, what: str | None = None, *, follow_links: bool = True,
                 max_bytes: int | None = None) -> int:
    """A read-only descriptor of the regular file at ``path`` (the caller closes it); never blocks.

    ``follow_links=False`` refuses a symbolic link as the last path component (files inside a bundle,
    the state directory's own files). ``max_bytes``: refuse a larger file before reading it.
    """
    what = what or Path(path).name
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # a link with O_NOFOLLOW; a socket (no open(2) for those)
            try:
                mode = os.lstat(path).st_mode
            except OSError:
                raise exc from None
            raise _refusal(what, mode) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refusal(what, st.st_mode)
        if max_bytes is not None and st.st_size > max_bytes:
            raise MalformedFile(what, f"{st.st_size} bytes, more than the {max_bytes}-byte limit for this file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike, what: str | None = None, *, max_bytes: int,
                 follow_links: bool = True) -> bytes:
    """The bytes of the regular file at ``path``: at most ``max_bytes`` (more is MalformedFile, also when the
    file grows while being read); see :func:`open_regular`."""
    what = what or Path(path).name
    fd = open_regular(path, what, follow_links=follow_links, max_bytes=max_bytes)
    try:
        parts, got = [], 0
        while got <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - got))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
    finally:
        os.close(fd)
    if got > max_bytes:
        raise MalformedFile(what, f"more than the {max_bytes}-byte limit for this file")
    return b"".join(parts)
