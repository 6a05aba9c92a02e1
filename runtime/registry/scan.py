"""Bringing the slot table in line with the store on disk.

Invariants: only published versions count (``BundleStore.versions``: no dot-directories, links or
other names), and a store directory that does not exist is an empty store; every bundle is verified
(``reader.inspect`` with the trust policy) before it is listed, and is read again only when its files
changed (stat fingerprint); new content of a version that serves is loaded aside and swapped in only if
it loads (a refusal is an ``update_error``, the working load keeps serving); a version gone from disk
is removed (it drains first). Each scan also reads ``aliases.json`` (off the event loop) into
:class:`ScannedStore`, the store name resolution sees, so resolving a name never touches the disk. Scans
run one at a time and never create anything on disk.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from ..bundle import reader
from ..bundle.golden_check import GoldenVerdict, judge_bundle
from ..bundle.signature import TrustPolicy
from ..bundle.store import BundleStore
from ..errors import BundleError
from ..priority import run_in_background
from .lifecycle import Lifecycle

log = logging.getLogger(__name__)


def _inspect_sync(path: Path, trust: TrustPolicy) -> tuple[reader.BundleInfo, GoldenVerdict | None]:
    """``reader.inspect``, and the verdict on the golden label map it verified (``golden_check``), read again
    and checked against the manifest; None without a golden sample, or if that file changed since (the load
    then judges the bytes it verifies)."""
    info = reader.inspect(path, trust)
    golden = info.config.golden
    if golden is None:
        return info, None
    try:
        return info, judge_bundle(info.config, reader.read_listed(info, golden.label_map))
    except (BundleError, OSError) as exc:
        log.info("%s: golden label map not judged before load: %s", info.version, exc)
        return info, None


class ScannedStore(BundleStore):
    """The store as the last scan saw it: :meth:`read_aliases` answers from memory what :meth:`refresh` read
    (off the event loop). Read-only: aliases are written through a plain :class:`BundleStore`."""

    def __init__(self, store: BundleStore) -> None:
        super().__init__(store.root, store.model)
        self._disk = store
        self._aliases: dict[str, str] = {}

    def read_aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    async def refresh(self) -> None:
        """Read ``aliases.json`` again, in a worker thread (a broken one reads as none, with one warning)."""
        self._aliases = await asyncio.to_thread(self._disk.read_aliases)

    def update_aliases(self, change: Callable[[dict[str, str]], dict[str, str]]) -> dict[str, str]:
        raise TypeError("a ScannedStore is read-only; change aliases through a BundleStore")

    def write_aliases(self, aliases: dict[str, str]) -> None:
        raise TypeError("a ScannedStore is read-only; change aliases through a BundleStore")


class Scanner:
    def __init__(self, store: BundleStore, lifecycle: Lifecycle, trust: TrustPolicy) -> None:
        self.store, self.lifecycle, self.trust = store, lifecycle, trust
        #: what name resolution reads: the store's aliases as of the last scan
        self.view = ScannedStore(store)
        self._lock = asyncio.Lock()

    async def _inspect(self, version: str) -> tuple[reader.BundleInfo, GoldenVerdict | None]:
        loop = asyncio.get_running_loop()
        # hashing a whole bundle must not stall the forwards being served
        return await loop.run_in_executor(self.lifecycle.executor, run_in_background, _inspect_sync,
                                          self.store.dir / version, self.trust)

    async def adopt(self, version: str) -> str | None:
        """List one version (discovered, not loaded) after verifying it; None if done, else why not."""
        async with self._lock:
            path = self.store.dir / version
            fingerprint = await asyncio.to_thread(reader.stat_fingerprint, path)
            try:
                info, golden = await self._inspect(version)
            except BundleError as exc:
                return str(exc)
            self.lifecycle.offer(self.lifecycle.add(version, path, fingerprint), info, golden)
            return None

    async def scan(self) -> None:
        """New, changed and removed versions on disk → slots (see the module docstring)."""
        async with self._lock:
            await self.view.refresh()
            slots = self.lifecycle.slots
            on_disk = await asyncio.to_thread(self.store.versions)
            for name, gone in list(slots.items()):
                if name not in on_disk and not gone.removed:
                    self.lifecycle.remove(gone)
            for name in on_disk:
                path = self.store.dir / name
                slot = slots.get(name)
                fingerprint = await asyncio.to_thread(reader.stat_fingerprint, path)
                if slot is not None and not slot.removed and slot.fingerprint == fingerprint:
                    continue
                if slot is None or slot.removed:
                    slot = self.lifecycle.add(name, path)
                slot.fingerprint = fingerprint
                try:
                    info, golden = await self._inspect(name)
                except BundleError as exc:
                    self.lifecycle.refuse(slot, str(exc))
                    continue
                self.lifecycle.offer(slot, info, golden)
