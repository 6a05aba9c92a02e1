"""What the processes of one test run share: a directory, and things built in it once.

Under pytest-xdist a run is a controller and its workers (``PYTEST_XDIST_WORKER`` set in each worker, whose
base temp directory lies inside the controller's); without it the run is one process. Invariants: every process
of a run gets the same :func:`run_dir`; :func:`once` builds ``run_dir/name`` in exactly one process and every
other process that asks waits for it and then reads the same files (published by an atomic rename, so a reader
sees all or nothing). A build that fails is not published: the next process to ask tries again and fails the same
way, naming the error in its own test.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

WORKER_ENV = "PYTEST_XDIST_WORKER"


def is_worker() -> bool:
    return WORKER_ENV in os.environ


def run_dir(factory: pytest.TempPathFactory) -> Path:
    """The directory this run's processes share: the controller's base temp directory (workers' lie inside it)."""
    base = factory.getbasetemp()
    return base.parent if is_worker() else base


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def held(path: Path) -> bool:
    """Whether another open file description holds an ``flock`` on ``path`` (a live process's mark)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def once(root: Path, name: str, build: Callable[[Path], None]) -> Path:
    """``root/name``, built by ``build(tmp)`` in the first process that asks, then renamed into place."""
    target = root / name
    with locked(root / f".{name}.lock"):
        if not target.exists():
            tmp = root / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                build(tmp)
                tmp.rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target
