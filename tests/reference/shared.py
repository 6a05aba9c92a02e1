"""What the processes of one test run share: a directory, and locks that let one of them build what all read.

Under pytest-xdist a run is a controller and its workers (``PYTEST_XDIST_WORKER`` set in each worker, whose
base temp directory lies inside the controller's); without it the run is one process. Invariants: every process
of a run gets the same :func:`run_dir`; a builder that checks for its output under :func:`locked` builds it in
exactly one process, the others wait for the lock and then read the same files (``reference.cases.make_case``,
``reference.background.start``); :func:`held` tells whether a process still holds a lock (the builder's life).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
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
