"""File watching with watchfiles: one loop for the bundle store and for a server's routes file.

Invariants: a callback runs after every settled change the filter accepts, one at a time, and a failing
callback is logged and never stops the loop. The store watcher watches the bundle *root*, not
``<root>/m2fp``, so a store directory that does not exist yet is noticed when it appears; it accepts
only paths under ``<root>/m2fp/`` without a dot-part (staging and removed directories, ``.lkg.json``,
temporary alias files, caches): publishing and removing are renames, so the version's own name or
``aliases.json`` always shows up in the change set.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import watchfiles

from .bundle.store import BundleStore

log = logging.getLogger(__name__)

Accept = Callable[[watchfiles.Change, str], bool]


async def watch(path: Path, accept: Accept, on_change: Callable[[], Awaitable[None]], stop: asyncio.Event, *,
                recursive: bool = True, polling: bool = False, debounce: int = 300) -> None:
    """Call ``on_change`` after each settled batch of changes under ``path`` that ``accept`` lets through."""
    async for _changes in watchfiles.awatch(path, watch_filter=accept, stop_event=stop, debounce=debounce, step=50,
                                            force_polling=polling, recursive=recursive):
        try:
            await on_change()
        except Exception:  # a change that cannot be applied must never kill the watcher
            log.exception("applying a change under %s failed", path)


def store_filter(root: Path, model: str) -> Accept:
    """Accept ``<root>/<model>`` and what is under it, except paths with a dot-part below the root."""

    def accept(_change: watchfiles.Change, path: str) -> bool:
        try:
            parts = Path(path).relative_to(root).parts
        except ValueError:
            return False
        return bool(parts) and parts[0] == model and not any(p.startswith(".") for p in parts)

    return accept


async def watch_store(store: BundleStore, on_change: Callable[[], Awaitable[None]], stop: asyncio.Event, *,
                      polling: bool = False) -> None:
    """Run ``on_change`` (a rescan) whenever the store under ``store.root`` changes."""
    root = store.root.absolute()  # watchfiles reports absolute paths, whatever root it is given
    await watch(root, store_filter(root, store.model), on_change, stop, polling=polling)
