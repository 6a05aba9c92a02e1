"""Versions of a bundle store and their life cycle.

States: ``discovered`` (verified on disk, not loaded) → ``loading`` → ``ready`` → (``draining`` →)
``unloaded``; ``failed`` keeps the reason. A request *leases* the ready predictor of a version and
holds it until done, so a swap or an unload never cuts a request short: the old predictor is closed
when its last lease is returned. Loads are single-flight per version, run one at a time on a
dedicated thread, and a version becomes routable only after verification, graph checks, a warm-up run
and (if present) its golden self-test. A replacement that fails to load never displaces a working one.

All bookkeeping runs on the event loop thread; only verification, loading and inference run in
executors.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import lkg
from .bundle import reader
from .bundle.config import BundleConfig
from .bundle.signature import NO_KEYS, TrustPolicy
from .bundle.store import MODEL, BundleStore
from .errors import BundleError, UnknownVersion, VersionUnavailable
from .memory import rss_bytes, trim_heap
from .predictor import ImageLimits, Prediction, Predictor
from .session import RuntimeSettings, SessionFactory
from .versions import SemVer, check_name, is_version_name

log = logging.getLogger(__name__)


class State(str, enum.Enum):
    DISCOVERED = "discovered"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    UNLOADED = "unloaded"
    FAILED = "failed"


@dataclass
class Loaded:
    predictor: Predictor
    fingerprint: str
    loaded_at: float
    load_seconds: float
    memory_bytes: int
    in_flight: int = 0
    retired: bool = False


def _shared_bytes(loaded: Loaded | None) -> int:
    session = loaded.predictor.session if loaded else None
    return getattr(session, "shared_bytes", 0)


@dataclass
class Slot:
    name: str
    path: Path
    config: BundleConfig | None = None
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


@dataclass(frozen=True)
class RegistryOptions:
    settings: RuntimeSettings = field(default_factory=RuntimeSettings)
    limits: ImageLimits = field(default_factory=ImageLimits)
    idle_ttl: float = 600.0
    memory_budget: int | None = None
    preload: tuple[str, ...] = ()
    watch: bool = True
    watch_polling: bool = False
    warmup: bool = True
    #: which signatures a bundle needs before anything of it is listed or loaded (keys: required)
    trust: TrustPolicy = NO_KEYS


class Registry:
    """The versions under ``root/<model>`` and what is loaded; see the module docstring."""

    def __init__(self, root: str | Path, options: RegistryOptions | None = None, *, model: str = MODEL) -> None:
        self.options = options or RegistryOptions()
        self.store = BundleStore(root, model)
        self.factory = SessionFactory(self.options.settings)
        self._slots: dict[str, Slot] = {}
        self._alias_overrides: dict[str, str] = {}
        self._routes_snapshot: dict = {}
        self.last_known_good: lkg.LastKnownGood | None = None
        self._pinned_extra: set[str] = set(self.options.preload)
        self._infer = ThreadPoolExecutor(self.options.settings.concurrent_runs, thread_name_prefix="m2fp-infer")
        self._load = ThreadPoolExecutor(1, thread_name_prefix="m2fp-load")
        self._tasks: list[asyncio.Task] = []
        self._stop = asyncio.Event()
        self._scan_lock = asyncio.Lock()
        self.events: dict[str, int] = {"loads": 0, "load_failures": 0, "unloads": 0, "swaps": 0, "evictions": 0}

    # ------------------------------------------------------------------------------- life cycle
    async def start(self) -> None:
        """Serve the last-known-good set first (if recorded and intact), then everything on disk."""
        self.store.dir.mkdir(parents=True, exist_ok=True)
        self.last_known_good = lkg.load(self.store.dir)
        if self.last_known_good is not None:
            await self._boot_last_known_good(self.last_known_good)
        await self.rescan()
        await self._preload()
        if self.options.watch:
            from .watcher import watch_store
            self._tasks.append(asyncio.create_task(watch_store(self, self._stop), name="m2fp-watch"))
        if self.options.idle_ttl > 0:
            self._tasks.append(asyncio.create_task(self._reaper(), name="m2fp-reaper"))

    async def close(self, drain_timeout: float = 30.0) -> None:
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        loads = [s.loading for s in self._slots.values() if s.loading is not None]
        if loads:
            await asyncio.wait(loads, timeout=drain_timeout)
        deadline = time.monotonic() + drain_timeout
        while any(l.in_flight for s in self._slots.values() for l in [s.active, *s.draining] if l) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for slot in self._slots.values():
            for loaded in [slot.active, *slot.draining]:
                if loaded:
                    loaded.predictor.close()
            slot.active, slot.draining = None, []
        self._infer.shutdown(wait=True, cancel_futures=True)
        self._load.shutdown(wait=True, cancel_futures=True)

    async def __aenter__(self) -> "Registry":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---------------------------------------------------------------------------------- names
    def aliases(self) -> dict[str, str]:
        """Alias → version: the store's aliases.json, overridden by the routing file's.

        An alias whose target is not usable (e.g. points at a broken new bundle) falls back to the
        target recorded in the last-known-good state, if that one is usable.
        """
        out = {**self.store.read_aliases(), **self._alias_overrides}
        if self.last_known_good is not None:
            for alias, old in self.last_known_good.aliases.items():
                if not self.is_usable(out.get(alias, "")) and self.is_usable(old):
                    out[alias] = old
        return out

    def set_routes_snapshot(self, routes: dict) -> None:
        """The routing table in force, recorded with the last-known-good state."""
        self._routes_snapshot = dict(routes)
        self._record_last_known_good()

    async def _boot_last_known_good(self, state: lkg.LastKnownGood) -> None:
        loop = asyncio.get_running_loop()
        for version, why in state.intact(self.store.dir).items():
            if why is not None:
                log.warning("last-known-good %s not restored: %s", version, why)
                continue
            path = self.store.dir / version
            fp = reader.stat_fingerprint(path)
            try:
                info = await loop.run_in_executor(self._load, reader.inspect, path, self.options.trust)
            except BundleError as exc:
                log.warning("last-known-good %s not restored: %s", version, exc)
                continue
            self._slots[version] = Slot(version, path, config=info.config, fingerprint=fp, identity=info.identity)
        log.info("last-known-good set (%s): %s", state.recorded_at, ", ".join(sorted(self._slots)) or "empty")
        await self._preload()

    def _record_last_known_good(self) -> None:
        versions = {n: s.identity for n, s in self._slots.items() if s.usable and s.identity}
        if not versions:
            return
        aliases = {a: v for a, v in self.aliases().items() if v in versions}
        try:
            lkg.record(self.store.dir, versions, aliases, self._routes_snapshot)
            self.last_known_good = lkg.LastKnownGood(versions, aliases, self._routes_snapshot)
        except (OSError, ValueError) as exc:
            log.warning("cannot record the last-known-good state: %s", exc)

    def set_alias_overrides(self, aliases: dict[str, str]) -> None:
        self._alias_overrides = dict(aliases)

    def set_pinned(self, versions: Iterable[str]) -> None:
        """Versions that must stay loaded (e.g. those with routing weight), besides latest and aliases."""
        self._pinned_extra = set(self.options.preload) | set(versions)

    def versions(self) -> list[str]:
        return sorted((n for n, s in self._slots.items() if not s.removed), key=SemVer.parse)

    def config(self, version: str) -> BundleConfig | None:
        slot = self._slots.get(version)
        return slot.config if slot else None

    def is_ready(self, version: str) -> bool:
        slot = self._slots.get(version)
        return bool(slot and slot.active is not None and not slot.removed)

    def is_usable(self, version: str) -> bool:
        slot = self._slots.get(version)
        return bool(slot and slot.usable)

    def latest(self, accept: Callable[[str], bool] | None = None) -> str | None:
        """The ``latest`` alias if it names a usable version; else the newest ready (then usable) release.

        ``accept`` narrows the candidates (e.g. to versions compatible with the client's API).
        """
        ok = accept or (lambda _v: True)
        target = self.aliases().get("latest")
        if target and target in self._slots and self._slots[target].usable and ok(target):
            return target
        usable = [n for n, s in self._slots.items() if s.usable and ok(n)]
        ready = [n for n in usable if self._slots[n].active is not None]
        pool = ready or usable
        releases = [n for n in pool if not SemVer.parse(n).prerelease] or pool
        return max(releases, key=SemVer.parse) if releases else None

    def resolve(self, name: str) -> str:
        """Version name for an exact version, ``latest`` or another alias; raises a VersionError."""
        check_name(name)
        if is_version_name(name):
            target = name
        elif name == "latest":
            target = self.latest()
            if target is None:
                raise VersionUnavailable("no version is available")
        else:
            target = self.aliases().get(name)
            if target is None:
                raise UnknownVersion(f"no version or alias named {name!r}")
        slot = self._slots.get(target)
        if slot is None or slot.removed:
            raise UnknownVersion(f"version {target!r} does not exist" + (f" (alias {name!r})" if target != name else ""))
        if not slot.usable:
            raise VersionUnavailable(f"version {target} failed: {slot.reason}")
        return target

    def _newest_release(self) -> str | None:
        usable = [n for n, s in self._slots.items() if s.usable]
        releases = [n for n in usable if not SemVer.parse(n).prerelease] or usable
        return max(releases, key=SemVer.parse) if releases else None

    def pinned(self) -> set[str]:
        """Versions kept loaded: latest and the release about to become latest, aliases, weighted, preload."""
        pins = set(self._pinned_extra) | set(self.aliases().values())
        for v in (self.latest(), self._newest_release()):
            if v:
                pins.add(v)
        return {p for p in pins if p in self._slots}

    # ------------------------------------------------------------------------------------ use
    @contextlib.asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[Predictor]:
        """Hold the ready predictor of ``name`` (loading it if needed) for the duration of a request."""
        version = self.resolve(name)
        slot = self._slots[version]
        loaded = await self._ensure_loaded(slot)
        loaded.in_flight += 1
        slot.requests += 1
        slot.last_used = time.monotonic()
        try:
            yield loaded.predictor
        finally:
            loaded.in_flight -= 1
            slot.last_used = time.monotonic()
            if loaded.retired and loaded.in_flight == 0:
                self._finish_drain(slot, loaded)

    async def predict(self, name: str, data: bytes, limits: ImageLimits | None = None) -> Prediction:
        async with self.lease(name) as predictor:
            return await self.run_in_executor(predictor.predict, data, limits or self.options.limits)

    async def run_in_executor(self, fn, *args):
        """Run ``fn`` on the inference pool; if the caller is cancelled, still wait for the thread to finish
        (so a lease held around this call is returned only when the predictor is really idle)."""
        fut = asyncio.get_running_loop().run_in_executor(self._infer, fn, *args)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            await asyncio.wait([fut])
            raise

    async def load(self, name: str) -> str:
        version = self.resolve(name)
        await self._ensure_loaded(self._slots[version])
        return version

    async def unload(self, version: str) -> None:
        slot = self._slots.get(version)
        if slot and slot.active:
            loaded, slot.active = slot.active, None
            self._retire(slot, loaded)
            self.events["unloads"] += 1

    # -------------------------------------------------------------------------------- loading
    async def _ensure_loaded(self, slot: Slot) -> Loaded:
        if slot.active is not None:
            return slot.active
        if slot.reason is not None:
            raise VersionUnavailable(f"version {slot.name} failed: {slot.reason}")
        if slot.loading is None:
            slot.loading = asyncio.create_task(self._load_slot(slot), name=f"m2fp-load-{slot.name}")
        await asyncio.shield(slot.loading)
        if slot.active is None:
            raise VersionUnavailable(f"version {slot.name} could not be loaded: {slot.reason or slot.update_error}")
        return slot.active

    def _load_sync(self, path: Path) -> tuple[Predictor, float, int]:
        t0, rss0 = time.perf_counter(), rss_bytes()
        predictor = Predictor.load(path, self.factory, self.options.trust)
        try:
            if self.options.warmup:
                predictor.warmup()
            predictor.self_test()
        except Exception:
            predictor.close()
            raise
        return predictor, time.perf_counter() - t0, max(0, rss_bytes() - rss0)

    async def _load_slot(self, slot: Slot) -> None:
        replacing = slot.active is not None
        fp = reader.stat_fingerprint(slot.path)
        loop = asyncio.get_running_loop()
        try:
            predictor, seconds, mem = await loop.run_in_executor(self._load, self._load_sync, slot.path)
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
        new = Loaded(predictor, fp, time.time(), seconds, mem)
        old = slot.active
        slot.active, slot.config, slot.fingerprint = new, predictor.config, fp
        slot.reason, slot.update_error, slot.was_loaded = None, None, True
        slot.identity = predictor.identity
        slot.last_used = time.monotonic()
        self.events["loads"] += 1
        if old is not None:
            self.events["swaps"] += 1
            self._retire(slot, old)
            log.info("%s: swapped to new bundle in %.2f s", slot.name, seconds)
        else:
            log.info("%s: ready in %.2f s (+%.0f MB)", slot.name, seconds, mem / 2**20)
        self._enforce_budget(exclude=slot.name)
        self._record_last_known_good()

    def _retire(self, slot: Slot, loaded: Loaded) -> None:
        """Stop handing ``loaded`` out; close it now or when its last lease is returned."""
        loaded.retired = True
        if loaded.in_flight == 0:
            loaded.predictor.close()
            trim_heap()
        else:
            slot.draining.append(loaded)

    def _finish_drain(self, slot: Slot, loaded: Loaded) -> None:
        if loaded in slot.draining:
            slot.draining.remove(loaded)
        loaded.predictor.close()
        trim_heap()
        if slot.removed and not slot.draining and self._slots.get(slot.name) is slot:
            self._slots.pop(slot.name, None)

    async def preload(self) -> None:
        """Load every pinned version that is not loaded yet (latest, aliases, weighted, preload list)."""
        await self._preload()

    async def _preload(self) -> None:
        for name in sorted(self.pinned(), key=SemVer.parse):
            slot = self._slots[name]
            if slot.usable and slot.active is None:
                with contextlib.suppress(VersionUnavailable):
                    await self._ensure_loaded(slot)

    # ------------------------------------------------------------------------------- scanning
    async def rescan(self) -> None:
        """Bring slots in line with the disk: new, replaced and removed versions."""
        async with self._scan_lock:
            on_disk = {n: self.store.dir / n for n in self.store.versions()}
            loop = asyncio.get_running_loop()
            for name, slot in list(self._slots.items()):
                if name not in on_disk and not slot.removed:
                    self._remove(slot)
            for name, path in on_disk.items():
                slot = self._slots.get(name)
                fp = reader.stat_fingerprint(path)
                if slot is not None and not slot.removed and slot.fingerprint == fp:
                    continue
                if slot is None or slot.removed:
                    slot = self._slots[name] = Slot(name, path)
                slot.fingerprint = fp
                try:
                    info = await loop.run_in_executor(self._load, reader.inspect, path, self.options.trust)
                except BundleError as exc:
                    if slot.active is not None:
                        slot.update_error = str(exc)
                        log.error("%s: new content refused, previous bundle keeps serving: %s", name, exc)
                    else:
                        slot.reason = str(exc)
                        log.error("%s: refused: %s", name, exc)
                    continue
                if slot.active is not None:
                    if info.identity == slot.active.predictor.identity:
                        slot.update_error = None  # files touched or rewritten with the very same content
                        continue
                    log.info("%s: content changed on disk, loading the replacement aside", name)
                    if slot.loading is None:
                        slot.loading = asyncio.create_task(self._load_slot(slot))
                else:
                    slot.config, slot.reason, slot.identity = info.config, None, info.identity
                    log.info("%s: discovered (%s, %s)", name, info.config.task, info.config.channel)
        await self._preload()

    def _remove(self, slot: Slot) -> None:
        log.info("%s: removed from disk; draining", slot.name)
        slot.removed = True
        if slot.active is not None:
            loaded, slot.active = slot.active, None
            self._retire(slot, loaded)
            self.events["unloads"] += 1
        if not slot.draining:
            self._slots.pop(slot.name, None)

    # ----------------------------------------------------------------------- memory and idle
    def _enforce_budget(self, exclude: str) -> None:
        budget = self.options.memory_budget
        if not budget:
            return
        pinned = self.pinned()
        loaded = [s for s in self._slots.values() if s.active]
        total = sum(s.active.memory_bytes for s in loaded)  # type: ignore[union-attr]
        for slot in sorted(loaded, key=lambda s: s.last_used):
            if total <= budget:
                break
            if slot.name in pinned or slot.name == exclude or slot.active.in_flight:  # type: ignore[union-attr]
                continue
            total -= slot.active.memory_bytes  # type: ignore[union-attr]
            log.info("%s: evicted (memory budget %.0f MB)", slot.name, budget / 2**20)
            self.events["evictions"] += 1
            loaded, slot.active = slot.active, None
            self._retire(slot, loaded)  # type: ignore[arg-type]

    async def _reaper(self) -> None:
        ttl = self.options.idle_ttl
        period = min(30.0, max(0.2, ttl / 4))
        while not self._stop.is_set():
            await asyncio.sleep(period)
            now, pinned = time.monotonic(), self.pinned()
            for slot in list(self._slots.values()):
                a = slot.active
                if a and slot.name not in pinned and a.in_flight == 0 and now - slot.last_used > ttl:
                    log.info("%s: idle for %.0f s, unloading", slot.name, now - slot.last_used)
                    await self.unload(slot.name)

    # ------------------------------------------------------------------------------- status
    def status(self) -> list[dict]:
        aliases = self.aliases()
        latest, pinned = self.latest(), self.pinned()
        out = []
        for name in sorted(self._slots, key=SemVer.parse):
            s = self._slots[name]
            c = s.config
            names = [a for a, v in aliases.items() if v == name and a != "latest"] + (["latest"] if name == latest else [])
            out.append({
                "version": name, "state": s.state.value, "reason": s.reason, "update_error": s.update_error,
                "channel": c.channel if c else None, "task": c.task if c else None,
                "compatible_api": list(c.compatible_api) if c else [], "semver": str(SemVer.parse(name)),
                "created_at": c.created_at if c else None, "notes": c.notes if c else None,
                "aliases": sorted(set(names)), "pinned": name in pinned, "loaded": s.active is not None,
                "in_flight": sum(l.in_flight for l in [s.active, *s.draining] if l),
                "requests": s.requests,
                "last_used_seconds_ago": round(time.monotonic() - s.last_used, 1) if s.last_used else None,
                "load_seconds": round(s.active.load_seconds, 3) if s.active else None,
                "memory_bytes": s.active.memory_bytes if s.active else 0,
                "shared_weight_bytes": _shared_bytes(s.active),
            })
        return out

    def weight_bytes(self) -> dict[str, int]:
        """Weights the loaded sessions use through the shared pool vs bytes actually mapped for them."""
        used = sum(_shared_bytes(l) for s in self._slots.values() for l in [s.active, *s.draining])
        return {"used": used, "mapped": self.factory.pool.stats()["bytes"]}

    def slot_states(self) -> dict[str, State]:
        return {n: s.state for n, s in self._slots.items()}

    def replace_options(self, **changes) -> None:
        self.options = dataclasses.replace(self.options, **changes)
