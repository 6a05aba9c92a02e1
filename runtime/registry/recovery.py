"""Last-known-good for the registry: where the record is kept, and keeping it.

The record itself (``.lkg.json``: versions by content key, aliases, routes) is :mod:`m2fpkit.runtime.lkg`.

Invariants: the place is decided once, at start — ``RegistryOptions.state_dir`` when given (created if
missing: it is not the bundle root), else the store directory ``<root>/m2fp`` when it is writable (or,
while it does not exist yet, when the root is) — and nothing is created in the bundle root to find out.
When there is no writable place the feature is *off* with its reason: logged once at start and shown in
the status (``"off: <reason>"``, without paths: the log names them), never a warning per load. A write
that fails later turns it off the same way, once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import lkg
from ..bundle.store import BundleStore
from ..roots import ENV_STATE_DIR

log = logging.getLogger(__name__)


def _writable(path: Path) -> bool:
    """Whether entries can be created in ``path`` (``access(2)``: false on a read-only mount, even as root)."""
    return os.access(path, os.W_OK | os.X_OK)


def place(store: BundleStore, state_dir: Path | None) -> tuple[Path | None, str | None]:
    """(directory for the record, None) or (None, why there is none); see the module docstring."""
    if state_dir is not None:
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return None, f"the state directory cannot be created ({exc.strerror or type(exc).__name__})"
        if not _writable(state_dir):
            return None, "the state directory is not writable"
        return state_dir, None
    hint = f"give a writable --state-dir (env {ENV_STATE_DIR})"
    if store.dir.is_dir():
        if _writable(store.dir):
            return store.dir, None
        return None, f"the bundle store is read-only; {hint}"
    if store.root.is_dir() and _writable(store.root):
        return store.dir, None  # created by the first publish, never by the registry
    return None, f"the bundle root is read-only; {hint}"


class LastKnownGoodKeeper:
    """Where the last-known-good record lives (or why it is off) and the record in force."""

    def __init__(self, store: BundleStore, state_dir: Path | None = None) -> None:
        self.store = store
        self.requested = state_dir
        self.dir: Path | None = None
        self.off_reason: str | None = "not started"
        #: the state read at start, then the last one recorded
        self.state: lkg.LastKnownGood | None = None

    def open(self) -> lkg.LastKnownGood | None:
        """Decide the place (logged once) and read the record there, if any."""
        self.dir, self.off_reason = place(self.store, self.requested)
        if self.dir is None:
            log.warning("last-known-good off (store %s, state dir %s): %s", self.store.dir, self.requested,
                        self.off_reason)
            return None
        log.info("last-known-good record: %s", self.dir / lkg.LKG)
        self.state = lkg.load(self.dir)
        return self.state

    @property
    def on(self) -> bool:
        return self.dir is not None

    @property
    def status(self) -> str:
        """``"on"`` or ``"off: <reason>"`` — public (no paths: the log names the directories)."""
        return "on" if self.dir is not None else f"off: {self.off_reason}"

    def aliases(self) -> Mapping[str, str]:
        return self.state.aliases if self.state is not None else {}

    def intact(self) -> dict[str, str | None]:
        """Recorded version → None if its bundle on disk is the recorded one, else why not."""
        return self.state.intact(self.store.dir) if self.state is not None else {}

    def record(self, versions: dict[str, str], aliases: dict[str, str], routes: Mapping[str, Any]) -> None:
        """Record the serving set (nothing when off or when nothing serves)."""
        if self.dir is None or not versions:
            return
        routes = dict(routes)
        try:
            lkg.record(self.dir, versions, aliases, routes)
        except OSError as exc:
            log.warning("last-known-good off: cannot write %s (%s)", self.dir / lkg.LKG, exc)
            self.dir, self.off_reason = None, f"the record cannot be written ({exc.strerror or type(exc).__name__})"
            return
        except ValueError as exc:  # malformed input is a bug here; say so, keep the previous record
            log.error("last-known-good not recorded: %s", exc)
            return
        self.state = lkg.LastKnownGood(dict(versions), dict(aliases), routes)
