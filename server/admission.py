"""Bounded admission, in two gates, both taken before the costly part:

* uploads — at most ``uploads`` request bodies are being received at once; the slot is taken before
  the first body byte is read (``server/intake.py``), so the memory held by bodies in reception is
  bounded by ``uploads × max body``, never by the number of connections;
* parses — at most ``workers`` parses run and at most ``max_queue`` wait; the rest are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator

from m2fpkit.runtime.errors import Overloaded


class Admission:
    def __init__(self, workers: int, max_queue: int, uploads: int = 4) -> None:
        if workers < 1 or max_queue < 0 or uploads < 1:
            raise ValueError(f"admission: workers ≥ 1, max_queue ≥ 0 and uploads ≥ 1 "
                             f"(got {workers}, {max_queue}, {uploads})")
        self.workers, self.max_queue, self.uploads = workers, max_queue, uploads
        self._sem = asyncio.Semaphore(workers)
        self.waiting = 0
        self.running = 0
        self._upload_sem = asyncio.Semaphore(uploads)
        #: monotonic deadline of each body being received (the soonest one frees a slot first)
        self._upload_deadlines: dict[int, float] = {}
        self._upload_ids = itertools.count()

    # ------------------------------------------------------------------------------- parses
    def full(self) -> bool:
        """True when a new parse would be refused at once (every worker busy, the queue at its limit)."""
        return self._sem.locked() and self.waiting >= self.max_queue

    def overloaded(self) -> Overloaded:
        return Overloaded(f"server busy: {self.running} parses running and {self.waiting} queued "
                          f"(queue limit {self.max_queue}); retry shortly")

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a worker, or raise :class:`Overloaded` at once when the queue is full."""
        if self.full():
            raise self.overloaded()
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._sem.release()

    def idle(self) -> bool:
        return self.running == 0 and self.waiting == 0

    # ------------------------------------------------------------------------------ uploads
    @property
    def receiving(self) -> int:
        """Bodies being received now."""
        return len(self._upload_deadlines)

    def next_upload_free(self) -> float:
        """Seconds until the soonest body deadline, i.e. the latest a slot frees (0 when one is free)."""
        if not self._upload_sem.locked() or not self._upload_deadlines:
            return 0.0
        return max(0.0, min(self._upload_deadlines.values()) - time.monotonic())

    @contextlib.asynccontextmanager
    async def upload(self, wait: float, hold: float) -> AsyncIterator[bool]:
        """Yield True holding an upload slot (for at most ``hold`` s, the caller's deadline), or False when
        none freed within ``wait`` s. Nothing of the body may be read without the slot."""
        try:
            await asyncio.wait_for(self._upload_sem.acquire(), wait)
        except TimeoutError:
            yield False
            return
        key = next(self._upload_ids)
        self._upload_deadlines[key] = time.monotonic() + hold
        try:
            yield True
        finally:
            del self._upload_deadlines[key]
            self._upload_sem.release()
