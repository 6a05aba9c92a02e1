"""The versions' grades (``m2fp-eval --state-dir``) as the server shows them: ``quality`` in ``/api/versions`` and
``/api/{version}/meta``, ``m2fp_version_quality`` in ``/metrics``.

Invariants:

* Grades are read from the state directory the registry uses (``--state-dir``, else the store directory
  ``<bundles>/m2fp``: :func:`grades_dir`) by :func:`m2fpkit.runtime.quality.grades.load`, never on the event
  loop (a worker thread), at most once per :data:`REFRESH_SECONDS` and only when the ``grades`` directory
  changed (or :data:`RELOAD_SECONDS` passed): a request waits at most :data:`WAIT_SECONDS` for a refresh in
  progress, then is answered from the grades read before. A grade file that is not one (forged, truncated,
  foreign) is skipped by the loader; it never fails a request.
* A grade belongs to a version only through the bundle identity it was measured on: a version re-exported
  under the same name has another identity and shows none of the old content's grades.
* Work per request is bounded whatever the directory holds: grades are indexed by identity once per read,
  at most :data:`MAX_PER_VERSION` per identity (the most recent), and the metric holds at most
  :data:`MAX_METRIC_DATASETS` datasets per version known to the registry.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from m2fpkit.runtime.quality import grades as grades_mod
from m2fpkit.runtime.quality.grades import Grade

log = logging.getLogger(__name__)

#: seconds a read of the grades is used before the directory is looked at again
REFRESH_SECONDS = 5.0
#: seconds after which the grades are read again even if the directory looks unchanged (a file edited in place)
RELOAD_SECONDS = 60.0
#: seconds a request waits for a refresh in progress before it is answered from the previous read
WAIT_SECONDS = 0.5
#: grades shown per version (the most recent evaluations)
MAX_PER_VERSION = 16
#: datasets per version in ``m2fp_version_quality`` (the most recently graded)
MAX_METRIC_DATASETS = 8
#: the metric's ``metric`` label values, each a field of a grade (a ratio in [0, 1])
METRICS = ("miou", "pixel_accuracy", "mean_class_accuracy")


def grades_dir(state_dir: Path | None, store_dir: Path) -> Path:
    """Where the server reads grades: the registry's state directory when one is given, else the store
    directory (``<bundles>/m2fp``), where the last-known-good record goes by default too."""
    return state_dir if state_dir is not None else store_dir


def index(grades: Iterable[Grade], per_identity: int = MAX_PER_VERSION) -> dict[str, tuple[Grade, ...]]:
    """Bundle identity → its grades, most recent first, at most ``per_identity`` of them."""
    out: dict[str, list[Grade]] = {}
    for g in sorted(grades, key=lambda g: g.at, reverse=True):
        kept = out.setdefault(g.identity, [])
        if len(kept) < per_identity:
            kept.append(g)
    return {k: tuple(v) for k, v in out.items()}


def to_public(grade: Grade) -> dict[str, Any]:
    """A grade as clients read it (``quality`` entries): no filesystem path, no identity (the version's own)."""
    d = grade.dataset
    return {"dataset": {"name": d.name, "sha256": d.sha256, "images": d.images}, "plan": grade.plan,
            "miou": grade.miou, "pixel_accuracy": grade.pixel_accuracy,
            "mean_class_accuracy": grade.mean_class_accuracy, "per_class": dict(grade.per_class), "at": grade.at}


def latest_per_dataset(grades: Sequence[Grade], limit: int = MAX_METRIC_DATASETS) -> list[Grade]:
    """Of grades given most recent first, the most recent one per dataset name, at most ``limit`` datasets."""
    seen: dict[str, Grade] = {}
    for g in grades:
        if g.dataset.name not in seen and len(seen) < limit:
            seen[g.dataset.name] = g
    return list(seen.values())


def _signature(folder: Path) -> tuple[int, int, int] | None:
    """What changes when a grade is written or removed (the directory's inode, modification time, size)."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class GradeBoard:
    """The grades of one server, read from ``directory`` (None: no state directory, no grades) under the
    invariants of the module docstring."""

    def __init__(self, directory: Path | None, *, refresh: float | None = None, reload: float | None = None,
                 wait: float | None = None, clock: Callable[[], float] = time.monotonic,
                 loader: Callable[[Path], list[Grade]] = grades_mod.load) -> None:
        """``refresh``, ``reload``, ``wait``: seconds, default the module's constants at construction."""
        self.directory = directory
        self.refresh_after = REFRESH_SECONDS if refresh is None else refresh
        self.reload_after = RELOAD_SECONDS if reload is None else reload
        self.wait = WAIT_SECONDS if wait is None else wait
        self._clock, self._loader = clock, loader
        self._by_identity: Mapping[str, tuple[Grade, ...]] = {}
        self._checked = self._read_at = -float("inf")
        self._signature: tuple[int, int, int] | None = None
        self._task: asyncio.Future[None] | None = None

    def _read(self, directory: Path, now: float) -> None:
        """In a worker thread: read the grades again if the directory changed or the last read is old."""
        signature = _signature(directory / grades_mod.GRADES_DIR)
        if signature == self._signature and now - self._read_at < self.reload_after:
            return
        self._by_identity = index(self._loader(directory))
        self._signature, self._read_at = signature, now

    async def _refresh(self, directory: Path) -> None:
        try:
            await asyncio.to_thread(self._read, directory, self._clock())
        except Exception:  # the loader never raises for bad files; anything else keeps the previous grades
            log.exception("grades in %s not read", self.directory)

    async def current(self) -> Mapping[str, tuple[Grade, ...]]:
        """Bundle identity → its grades (most recent first), refreshed under the module's invariants."""
        if self.directory is None:
            return {}
        now = self._clock()
        if self._task is None and now - self._checked >= self.refresh_after:
            self._checked = now
            self._task = asyncio.ensure_future(self._refresh(self.directory))
            self._task.add_done_callback(self._done)
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self.wait)
            except TimeoutError:
                log.info("grades in %s still being read; answering with the previous read", self.directory)
        return self._by_identity

    def _done(self, task: asyncio.Future[None]) -> None:
        if self._task is task:
            self._task = None

    async def of(self, identity: str | None) -> list[dict[str, Any]]:
        """The ``quality`` list of the version whose bundle identity is ``identity`` (empty when unknown)."""
        if identity is None:
            return []
        return [to_public(g) for g in (await self.current()).get(identity, ())]

    def close(self) -> None:
        """Stop waiting for a read in progress (its thread finishes on its own)."""
        if self._task is not None:
            self._task.cancel()
