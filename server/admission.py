"""Bounded admission, in two gates, both taken before the costly part:

* uploads — at most ``uploads`` request bodies are being received at once, at most ``per_client`` of them
  from one client address; the slot is taken before the first body byte is read (``server/intake.py``), so
  the memory held by bodies in reception is bounded by ``uploads × max body``, never by the number of
  connections, and one client cannot hold every slot;
* parses — at most ``workers`` parses run (the registry's ``concurrent_runs``: a parse holding a slot always
  finds an inference thread free) and at most ``max_queue`` wait; the rest are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator

from m2fpkit.runtime.errors import Overloaded

from .config import ServerConfig


class Admission:
    def __init__(self, workers: int, max_queue: int, uploads: int = 4, per_client: int = 0) -> None:
        if workers < 1 or max_queue < 0 or uploads < 1 or per_client < 0:
            raise ValueError(f"admission: workers ≥ 1, max_queue ≥ 0, uploads ≥ 1 and per_client ≥ 0 "
                             f"(got {workers}, {max_queue}, {uploads}, {per_client})")
        self.workers, self.max_queue, self.uploads, self.per_client = workers, max_queue, uploads, per_client
        self._sem = asyncio.Semaphore(workers)
        self.waiting = 0
        self.running = 0
        self._upload_sem = asyncio.Semaphore(uploads)
        #: (client, monotonic deadline) of each body being received (the soonest one frees a slot first)
        self._upload_deadlines: dict[int, tuple[str, float]] = {}
        self._upload_ids = itertools.count()
        #: per client address being received from or waiting: its own semaphore and how many use it
        self._clients: dict[str, tuple[asyncio.Semaphore, int]] = {}

    @classmethod
    def for_config(cls, cfg: ServerConfig) -> Admission:
        """The server's gates: workers are the runtime's ``concurrent_runs`` (``--concurrency``), read here
        and nowhere else in the server."""
        return cls(cfg.runtime.settings.concurrent_runs, cfg.max_queue, cfg.max_uploads, cfg.max_uploads_per_client)

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

    def receiving_from(self, client: str) -> int:
        return sum(1 for who, _ in self._upload_deadlines.values() if who == client)

    def next_upload_free(self, client: str | None = None) -> float:
        """Seconds until the soonest body deadline (of ``client``'s bodies when given), i.e. the latest a
        slot frees (0 when one is free)."""
        deadlines = [d for who, d in self._upload_deadlines.values() if client is None or who == client]
        if not deadlines or (client is None and not self._upload_sem.locked()):
            return 0.0
        return max(0.0, min(deadlines) - time.monotonic())

    def client_full(self, client: str) -> bool:
        return bool(self.per_client) and self.receiving_from(client) >= self.per_client

    @contextlib.asynccontextmanager
    async def upload(self, wait: float, hold: float, client: str = "") -> AsyncIterator[bool]:
        """Yield True holding an upload slot (for at most ``hold`` s, the caller's deadline), or False when
        none freed within ``wait`` s: one of ``client``'s own (``per_client``), then one of all. Nothing of
        the body may be read without the slot."""
        own = self._client_sem(client) if self.per_client else None
        got_own = got_all = False
        try:
            try:
                async with asyncio.timeout(wait):
                    if own is not None:
                        await own.acquire()
                        got_own = True
                    await self._upload_sem.acquire()
                    got_all = True
            except TimeoutError:
                pass
            if not got_all:
                yield False
                return
            key = next(self._upload_ids)
            self._upload_deadlines[key] = (client, time.monotonic() + hold)
            try:
                yield True
            finally:
                del self._upload_deadlines[key]
        finally:
            if got_all:
                self._upload_sem.release()
            if got_own and own is not None:
                own.release()
            self._client_done(client, own)

    def _client_sem(self, client: str) -> asyncio.Semaphore:
        sem, users = self._clients.get(client, (None, 0))
        if sem is None:
            sem = asyncio.Semaphore(self.per_client)
        self._clients[client] = (sem, users + 1)
        return sem

    def _client_done(self, client: str, sem: asyncio.Semaphore | None) -> None:
        if sem is None:
            return
        _, users = self._clients[client]
        if users <= 1:
            del self._clients[client]
        else:
            self._clients[client] = (sem, users - 1)
