"""Bounded admission: at most ``workers`` parses run, at most ``max_queue`` wait; the rest are refused."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from m2fpkit.runtime.errors import Overloaded


class Admission:
    def __init__(self, workers: int, max_queue: int) -> None:
        self.workers, self.max_queue = workers, max_queue
        self._sem = asyncio.Semaphore(workers)
        self.waiting = 0
        self.running = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a worker, or raise :class:`Overloaded` at once when the queue is full."""
        if self._sem.locked() and self.waiting >= self.max_queue:
            raise Overloaded(f"server busy: {self.running} parses running and {self.waiting} queued "
                             f"(queue limit {self.max_queue}); retry shortly")
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
