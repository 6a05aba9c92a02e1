"""File watching with watchfiles: one loop for the bundle store and for a server's routes file.

Invariants: a callback runs after every settled change the filter accepts, one at a time; the loop ends
only when ``stop`` is set or its task is cancelled. A failing callback (any exception, a stray
cancellation included) is logged and never stops the loop; a failure of watchfiles itself is logged and
the watch restarts after a short back-off, with one callback run for what it may have missed. The store
watcher watches the bundle *root*, not ``<root>/m2fp``, so a store directory that does not exist yet is
noticed when it appears; it accepts only paths under ``<root>/m2fp/`` without a dot-part (staging and
removed directories, ``.lkg.json``, temporary alias files, caches): publishing and removing are renames,
so the version's own name or ``aliases.json`` always shows up in the change set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import watchfiles

from .bundle.store import BundleStore

log = logging.getLogger(__name__)

Accept = Callable[[watchfiles.Change, str], bool]
#: back-off (seconds) before watching again after watchfiles failed
_RETRY_FIRST, _RETRY_MAX = 0.5, 10.0


async def watch(path: Path, accept: Accept, on_change: Callable[[], Awaitable[None]], stop: asyncio.Event, *,
                recursive: bool = True, polling: bool = False, debounce: int = 300) -> None:
    """Call ``on_change`` after each settled batch of changes under ``path`` that ``accept`` lets through."""
    delay = _RETRY_FIRST
    while not stop.is_set():
        try:
            async for _changes in watchfiles.awatch(path, watch_filter=accept, stop_event=stop, debounce=debounce,
                                                    step=50, force_polling=polling, recursive=recursive):
                delay = _RETRY_FIRST
                await _run(on_change, path)
        except asyncio.CancelledError:
            if _cancelling():
                raise
            log.error("watching %s was interrupted; restarting", path)
        except Exception:  # watchfiles failed (e.g. the directory vanished): retry, never give up
            log.exception("watching %s failed; retrying in %.1f s", path, delay)
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(delay * 2, _RETRY_MAX)
        if not stop.is_set():
            await _run(on_change, path)  # a change made while the watch was down is not lost


def _cancelling() -> bool:
    """True if the running task itself is being cancelled (not merely a future it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _run(on_change: Callable[[], Awaitable[None]], path: Path) -> None:
    """Run one callback; whatever it raises is logged, except the cancellation of the watching task."""
    try:
        await on_change()
    except asyncio.CancelledError:
        if _cancelling():
            raise
        log.error("applying a change under %s was cancelled; watching goes on", path)
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
