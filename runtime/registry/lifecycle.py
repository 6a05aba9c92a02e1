"""Life cycle of versions: one :class:`Slot` per version and every transition it goes through.

States: ``discovered`` (verified on disk, not loaded) → ``loading`` → ``ready`` → (``draining`` →)
``unloaded``; ``failed`` keeps the reason.

Invariants:

- A request *leases* the active predictor of a slot and gives it back when done. A predictor leaves
  service in one way only, :meth:`Lifecycle.retire` (unload, eviction and removal) or the old side of
  a swap — both through :meth:`Lifecycle._release`, which closes it at once or when its last lease
  comes back. So a swap, an unload or a removal never cuts a request short.
- Loads are single-flight per slot and run one at a time on the load thread; a predictor becomes
  active only after verification, the graph check, a warm-up run and (if present) the golden
  self-test. A replacement that fails to load never displaces a working predictor: its error is the
  slot's ``update_error``, not its ``reason``.
- At most ``settings.concurrent_runs`` forward passes run at once (``forward_slots``), served ones and a
  load's golden and timing runs alike: a swap's runs wait for a free slot instead of halving the cores
  of the forwards being served.
- All bookkeeping runs on the event loop thread; verification, loading and closing run in the executor
  (hashing at background priority, ``runtime.priority``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..bundle import reader
from ..bundle.config import BundleConfig
from ..bundle.golden_check import GoldenVerdict
from ..errors import BundleError, VersionUnavailable
from ..memory import rss_bytes, trim_heap
from ..planner import Planner
from ..predictor import Predictor
from ..session import SessionFactory
from .options import RegistryOptions

log = logging.getLogger(__name__)

#: the counters of :attr:`Lifecycle.events` (``m2fp_version_events{event=…}``)
EVENTS = ("loads", "load_failures", "unloads", "swaps", "evictions")


class State(str, enum.Enum):
    DISCOVERED = "discovered"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    UNLOADED = "unloaded"
    FAILED = "failed"


@dataclass(eq=False)
class Loaded:
    """A loaded predictor and its leases."""

    predictor: Predictor
    fingerprint: str
    loaded_at: float
    load_seconds: float
    memory_bytes: int
    in_flight: int = 0
    retired: bool = False

    @property
    def shared_bytes(self) -> int:
        """Weight bytes its session reads from the process-wide pool (0 once closed)."""
        return getattr(self.predictor.session, "shared_bytes", 0)


@dataclass(eq=False)
class Slot:
    """One version: what is known of its bundle on disk and what of it is loaded."""

    name: str
    path: Path
    config: BundleConfig | None = None
    #: ``reader.stat_fingerprint`` of the files last looked at (cheap change probe)
    fingerprint: str = ""
    #: content key of the verified bundle (``bundle.reader.identity``; last-known-good records it)
    identity: str = ""
    #: why the version cannot be used (verification or load failure); None when fine
    reason: str | None = None
    #: why the latest content on disk was refused while an older load keeps serving
    update_error: str | None = None
    active: Loaded | None = None
    draining: list[Loaded] = field(default_factory=list)
    loading: asyncio.Task | None = None
    was_loaded: bool = False
    last_used: float = 0.0
    removed: bool = False
    requests: int = 0
    #: the runtime's verdict on the golden label map of the content ``config`` describes (``golden_check``):
    #: read from disk at discovery, from the verified bytes at load; None without a golden sample or unknown
    golden: GoldenVerdict | None = None

    @property
    def state(self) -> State:
        if self.active is not None and not self.removed:
            return State.READY
        if self.draining:
            return State.DRAINING
        if self.loading is not None:
            return State.LOADING
        if self.reason is not None:
            return State.FAILED
        return State.UNLOADED if self.was_loaded else State.DISCOVERED

    @property
    def usable(self) -> bool:
        return not self.removed and (self.active is not None or self.reason is None)

    @property
    def ready(self) -> bool:
        return self.active is not None and not self.removed

    @property
    def in_flight(self) -> int:
        return sum(loaded.in_flight for loaded in self.leased())

    def leased(self) -> list[Loaded]:
        """Every predictor of this version still open: the active one and those draining."""
        return [loaded for loaded in (self.active, *self.draining) if loaded is not None]


def _dispose(predictor: Predictor) -> None:
    predictor.close()
    trim_heap()


class Lifecycle:
    """The slot table and its transitions; see the module docstring."""

    def __init__(self, factory: SessionFactory, options: RegistryOptions,
                 on_active: Callable[[Slot], None] = lambda _slot: None,
                 cache_dir: Callable[[], Path | None] = lambda: None) -> None:
        self.factory = factory
        self.options = options
        #: at most ``concurrent_runs`` forward passes at once, a load's verification and timing runs included:
        #: a swap's golden run takes its turn between served forwards instead of sharing the cores with them
        self.forward_slots = threading.BoundedSemaphore(options.settings.concurrent_runs)
        self.planner = Planner(factory, options.plan, cache_dir=cache_dir, forward_gate=self.forward_slots)
        self.slots: dict[str, Slot] = {}
        self.events: dict[str, int] = dict.fromkeys(EVENTS, 0)
        #: verification and loading: one at a time (session construction holds the GIL anyway)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="m2fp-load")
        self._on_active = on_active

    # ----------------------------------------------------------------------------- discovery
    def add(self, name: str, path: Path, fingerprint: str = "") -> Slot:
        """A new slot for ``name`` (replacing a removed one that is still draining)."""
        slot = self.slots[name] = Slot(name, path, fingerprint=fingerprint)
        return slot

    def offer(self, slot: Slot, info: reader.BundleInfo, golden: GoldenVerdict | None = None) -> None:
        """Verified content on disk (``golden``: the verdict on its golden label map): describe it, or load it
        aside when another content is serving."""
        if slot.active is None:
            slot.config, slot.reason, slot.identity = info.config, None, info.identity
            slot.golden = golden
            log.info("%s: discovered (%s, %s)", slot.name, info.config.task, info.config.channel)
        elif info.identity == slot.active.predictor.identity:
            slot.update_error = None  # files touched or rewritten with the very same content
        else:
            log.info("%s: content changed on disk, loading the replacement aside", slot.name)
            self.start_load(slot)

    def refuse(self, slot: Slot, reason: str) -> None:
        """Content on disk failed verification: the version fails, unless an older load keeps serving."""
        if slot.active is not None:
            slot.update_error = reason
            log.error("%s: new content refused, previous bundle keeps serving: %s", slot.name, reason)
        else:
            slot.reason = reason
            log.error("%s: refused: %s", slot.name, reason)

    # ------------------------------------------------------------------------------- loading
    def start_load(self, slot: Slot) -> asyncio.Task:
        """The slot's load task, started if none is running (single flight)."""
        if slot.loading is None:
            slot.loading = asyncio.create_task(self._load(slot), name=f"m2fp-load-{slot.name}")
        return slot.loading

    async def ensure_loaded(self, slot: Slot) -> Loaded:
        """The active predictor of ``slot``, loading it first if needed; VersionUnavailable if it cannot be."""
        if slot.active is not None:
            return slot.active
        if slot.reason is not None:
            raise VersionUnavailable(f"version {slot.name} failed: {slot.reason}")
        await asyncio.shield(self.start_load(slot))
        if slot.active is None:
            raise VersionUnavailable(f"version {slot.name} could not be loaded: {slot.reason or slot.update_error}")
        return slot.active

    def _load_sync(self, path: Path) -> tuple[Predictor, float, int]:
        t0, rss0 = time.perf_counter(), rss_bytes()
        # the plan's golden verification is the self-test, and its run the warm-up (no second run)
        predictor = self.planner.load(reader.load(path, self.options.trust))
        try:
            _ = predictor.content.golden_verdict  # judged here, off the event loop (cached on the content)
            if self.options.warmup and not predictor.config.golden:
                predictor.warmup()
        except Exception:
            predictor.close()
            raise
        return predictor, time.perf_counter() - t0, max(0, rss_bytes() - rss0)

    async def _load(self, slot: Slot) -> None:
        replacing = slot.active is not None
        fingerprint = reader.stat_fingerprint(slot.path)
        loop = asyncio.get_running_loop()
        try:
            predictor, seconds, memory = await loop.run_in_executor(self.executor, self._load_sync, slot.path)
        except Exception as exc:  # a bundle can fail in many ways; the reason is kept for operators
            reason = str(exc) if isinstance(exc, BundleError) else f"{type(exc).__name__}: {exc}"
            self.events["load_failures"] += 1
            if replacing:
                slot.update_error = reason
                log.error("%s: replacement refused, previous bundle keeps serving: %s", slot.name, reason)
            else:
                slot.reason = reason
                log.error("%s: failed to load: %s", slot.name, reason)
            return
        finally:
            slot.loading = None
        if slot.removed:
            predictor.close()
            return
        self._activate(slot, Loaded(predictor, fingerprint, time.time(), seconds, memory))

    def _activate(self, slot: Slot, new: Loaded) -> None:
        """``new`` serves the slot from now on; a predictor it replaces is released (swap)."""
        old = slot.active
        slot.active, slot.config, slot.fingerprint = new, new.predictor.config, new.fingerprint
        slot.identity, slot.golden = new.predictor.identity, new.predictor.content.golden_verdict
        slot.reason, slot.update_error, slot.was_loaded = None, None, True
        slot.last_used = time.monotonic()
        self.events["loads"] += 1
        if old is not None:
            self.events["swaps"] += 1
            self._release(slot, old)
            log.info("%s: swapped to new bundle in %.2f s", slot.name, new.load_seconds)
        else:
            log.info("%s: ready in %.2f s (+%.0f MB)", slot.name, new.load_seconds, new.memory_bytes / 2**20)
        self._on_active(slot)

    # ------------------------------------------------------------------------ leaving service
    def retire(self, slot: Slot, event: str) -> bool:
        """Take the active predictor out of service (counted as ``event``); False if none was active."""
        loaded = slot.active
        if loaded is None:
            return False
        slot.active = None
        self.events[event] += 1
        self._release(slot, loaded)
        return True

    def _release(self, slot: Slot, loaded: Loaded) -> None:
        """Hand ``loaded`` out no more; close it now, or when its last lease is returned."""
        loaded.retired = True
        if loaded.in_flight == 0:
            self._close(slot, loaded)
        else:
            slot.draining.append(loaded)

    def _close(self, slot: Slot, loaded: Loaded) -> None:
        if loaded in slot.draining:
            slot.draining.remove(loaded)
        # freeing a session's memory and trimming the heap take tens of ms at r101: not on the event loop;
        # on the load thread, so a closed version's memory is returned before the next load starts
        try:
            self.executor.submit(_dispose, loaded.predictor)
        except RuntimeError:  # the registry is closed: no thread left to hand it to
            _dispose(loaded.predictor)
        self._forget_if_gone(slot)

    def remove(self, slot: Slot) -> None:
        """The version left the disk: no new leases; it disappears once its requests are done."""
        log.info("%s: removed from disk; draining", slot.name)
        slot.removed = True
        self.retire(slot, "unloads")
        self._forget_if_gone(slot)

    def _forget_if_gone(self, slot: Slot) -> None:
        if slot.removed and slot.active is None and not slot.draining and self.slots.get(slot.name) is slot:
            del self.slots[slot.name]

    # ----------------------------------------------------------------------------------- use
    @contextlib.asynccontextmanager
    async def lease(self, slot: Slot) -> AsyncIterator[Predictor]:
        """Hold the active predictor of ``slot`` (loading it if needed) for the duration of a request."""
        loaded = await self.ensure_loaded(slot)
        loaded.in_flight += 1
        slot.requests += 1
        slot.last_used = time.monotonic()
        try:
            yield loaded.predictor
        finally:
            loaded.in_flight -= 1
            slot.last_used = time.monotonic()
            if loaded.retired and loaded.in_flight == 0:
                self._close(slot, loaded)

    async def close(self, drain_timeout: float) -> None:
        """Let loads finish and requests drain (up to ``drain_timeout`` each), then close everything."""
        loads = [s.loading for s in self.slots.values() if s.loading is not None]
        if loads:
            await asyncio.wait(loads, timeout=drain_timeout)
        deadline = time.monotonic() + drain_timeout
        while any(s.in_flight for s in self.slots.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for slot in self.slots.values():
            for loaded in slot.leased():
                loaded.predictor.close()
            slot.active, slot.draining = None, []
        self.executor.shutdown(wait=True, cancel_futures=True)
