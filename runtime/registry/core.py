""":class:`Registry`: the versions under ``<root>/m2fp`` and what is loaded — the parts wired together.

Invariants: ``start`` creates nothing in the bundle root (a missing ``m2fp/`` is an empty store; a
missing root is a BundleError naming it); it serves the last-known-good set first when one is
recorded and intact, then everything on disk. All bookkeeping runs on the event loop thread; only
verification, loading (one load thread) and inference (``settings.concurrent_runs`` threads) run in
executors, and so does every read of a file (``aliases.json`` is read by each scan: a change of it applies
with the next scan, which the store watcher starts). The registry's own state is reached through its
methods; the server changes names only through :meth:`Registry.apply_routes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ..bundle.config import BundleConfig
from ..bundle.store import MODEL, BundleStore
from ..bundle.versions import SemVer
from ..errors import VersionUnavailable
from ..lkg import LastKnownGood
from ..predictor import ImageLimits, Prediction, Predictor
from ..roots import require_root
from ..session import SessionFactory
from ..watcher import watch_store
from . import policy
from .lifecycle import Lifecycle, Slot
from .names import Names, RouteOverlay
from .options import RegistryOptions
from .recovery import LastKnownGoodKeeper
from .scan import Scanner
from .status import RegistrySnapshot, snapshot

log = logging.getLogger(__name__)
T = TypeVar("T")


class Registry:
    """Versions of a bundle store: discovery, lazy single-flight loads, hot swaps, idle unload, budget."""

    def __init__(self, root: str | Path, options: RegistryOptions | None = None, *, model: str = MODEL) -> None:
        self.options = options or RegistryOptions()
        self.store = BundleStore(root, model)
        self.factory = SessionFactory(self.options.settings)
        self._lkg = LastKnownGoodKeeper(self.store, self.options.state_dir)
        self._lifecycle = Lifecycle(self.factory, self.options, on_active=self._on_active,
                                    cache_dir=lambda: self._lkg.dir)
        self._scanner = Scanner(self.store, self._lifecycle, self.options.trust)
        self._names = Names(self._scanner.view, self._lifecycle.slots, preload=self.options.preload,
                            fallback=self._lkg.aliases)
        self._infer = ThreadPoolExecutor(self.options.settings.concurrent_runs, thread_name_prefix="m2fp-infer")
        self._tasks: list[asyncio.Task] = []
        self._stop = asyncio.Event()

    # ------------------------------------------------------------------------------ start, stop
    async def start(self) -> None:
        """Serve the last-known-good set first (if recorded and intact), then everything on disk."""
        require_root(self.store.root)
        state = await asyncio.to_thread(self._lkg.open)
        if state is not None:
            await self._scanner.view.refresh()  # aliases.json's aliases are pinned too
            for version, why in (await asyncio.to_thread(self._lkg.intact)).items():
                why = why or await self._scanner.adopt(version)
                if why is not None:
                    log.warning("last-known-good %s not restored: %s", version, why)
            log.info("last-known-good set (%s): %s", state.recorded_at, ", ".join(self.versions()) or "empty")
            await self.preload()
        await self.rescan()
        if self.options.watch:
            self._tasks.append(asyncio.create_task(
                watch_store(self.store, self.rescan, self._stop, polling=self.options.watch_polling),
                name="m2fp-watch"))
        if self.options.idle_ttl > 0:
            self._tasks.append(asyncio.create_task(policy.reap(self.options.idle_ttl, self._stop, self._reap_idle),
                                                   name="m2fp-reaper"))

    async def close(self, drain_timeout: float = 30.0) -> None:
        """Stop watching and reaping, let loads finish and requests drain, close every predictor."""
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self._lifecycle.close(drain_timeout)
        self._infer.shutdown(wait=True, cancel_futures=True)

    async def __aenter__(self) -> Registry:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------------------------ names
    def versions(self) -> list[str]:
        return self._names.versions()

    def config(self, version: str) -> BundleConfig | None:
        return self._names.config(version)

    def is_ready(self, version: str) -> bool:
        return self._names.is_ready(version)

    def is_usable(self, version: str) -> bool:
        return self._names.is_usable(version)

    def compatible(self, version: str, api: str | None) -> bool:
        return self._names.compatible(version, api)

    def aliases(self) -> dict[str, str]:
        return self._names.aliases()

    def latest(self, api: str | None = None) -> str | None:
        return self._names.latest(api)

    def resolve(self, name: str, api: str | None = None) -> str:
        """The version a name (version, ``latest``, alias) stands for, for a client of ``api``; a VersionError."""
        return self._names.resolve(name, api)

    def pinned(self) -> set[str]:
        return self._names.pinned()

    def apply_routes(self, overlay: RouteOverlay) -> None:
        """The server's routing changed: its aliases and pinned versions apply from now on (recorded as
        last-known-good with the set that serves). Call :meth:`preload` to load newly pinned versions."""
        self._names.overlay = overlay
        self._record_last_known_good()

    @property
    def last_known_good(self) -> LastKnownGood | None:
        return self._lkg.state

    # -------------------------------------------------------------------------------------- use
    @contextlib.asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[Predictor]:
        """Hold the ready predictor of ``name`` (loading it if needed) for the duration of a request."""
        slot = self._lifecycle.slots[self.resolve(name)]
        async with self._lifecycle.lease(slot) as predictor:
            yield predictor

    async def predict(self, name: str, data: bytes, limits: ImageLimits | None = None) -> Prediction:
        async with self.lease(name) as predictor:
            return await self.run_in_executor(predictor.predict, data, limits or self.options.limits)

    async def run_in_executor(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the inference pool; if the caller is cancelled, still wait for the thread to finish
        (so a lease held around this call is returned only when the predictor is really idle)."""
        fut = asyncio.get_running_loop().run_in_executor(self._infer, fn, *args)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            await asyncio.wait([fut])
            raise

    async def load(self, name: str) -> str:
        """Load the version ``name`` stands for (if not loaded yet); returns the version."""
        version = self.resolve(name)
        await self._lifecycle.ensure_loaded(self._lifecycle.slots[version])
        return version

    async def unload(self, version: str) -> None:
        slot = self._lifecycle.slots.get(version)
        if slot is not None:
            self._lifecycle.retire(slot, "unloads")

    async def preload(self) -> None:
        """Load every pinned version that is not loaded yet (latest, aliases, routed, preload list).

        The pinned set is looked at again after each load: when a version fails, ``latest`` may move to
        another one, which is then loaded too. Each version is tried once per call."""
        tried: set[str] = set()
        while True:
            slots = self._lifecycle.slots
            todo = [n for n in sorted(self.pinned(), key=SemVer.parse)
                    if n not in tried and slots[n].usable and slots[n].active is None]
            if not todo:
                return
            tried.add(todo[0])
            with contextlib.suppress(VersionUnavailable):  # the reason is kept on the slot
                await self._lifecycle.ensure_loaded(slots[todo[0]])

    async def rescan(self) -> None:
        """Bring the versions in line with the disk (new, replaced, removed), then load what is pinned."""
        await self._scanner.scan()
        await self.preload()

    # ----------------------------------------------------------------------------------- status
    @property
    def events(self) -> dict[str, int]:
        """Life-cycle counters since start: loads, load_failures, unloads, swaps, evictions."""
        return self._lifecycle.events

    def status(self) -> RegistrySnapshot:
        return snapshot(self._lifecycle.slots, self._names, self._lkg.status)

    def weight_bytes(self) -> dict[str, int]:
        """Weights the loaded sessions use through the shared pool vs bytes actually mapped for them."""
        used = sum(loaded.shared_bytes for s in self._lifecycle.slots.values() for loaded in s.leased())
        return {"used": used, "mapped": self.factory.pool.stats()["bytes"]}

    # ---------------------------------------------------------------------------------- policy
    def _on_active(self, slot: Slot) -> None:
        budget = self.options.memory_budget
        for victim in policy.over_budget(self._lifecycle.slots.values(), budget, self.pinned(), exclude=slot.name):
            log.info("%s: evicted (memory budget %.0f MB)", victim.name, (budget or 0) / 2**20)
            self._lifecycle.retire(victim, "evictions")
        self._record_last_known_good()

    def _reap_idle(self) -> None:
        now = time.monotonic()
        for slot in policy.idle(list(self._lifecycle.slots.values()), self.options.idle_ttl, now, self.pinned()):
            log.info("%s: idle for %.0f s, unloading", slot.name, now - slot.last_used)
            self._lifecycle.retire(slot, "unloads")

    def _record_last_known_good(self) -> None:
        if not self._lkg.on:
            return
        versions = {n: s.identity for n, s in self._lifecycle.slots.items() if s.usable and s.identity}
        aliases = {a: v for a, v in self.aliases().items() if v in versions}
        self._lkg.record(versions, aliases, self._names.overlay.routes)
