"""Watch the bundle store with watchfiles and rescan the registry on every settled change."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import watchfiles

if TYPE_CHECKING:
    from .registry import Registry

log = logging.getLogger(__name__)


def _visible(root: Path):
    """Ignore anything whose path under the store starts with a dot (staging and removed directories,
    ``.lkg.json``, temporary alias files): publishing and removing are renames, so the version's own
    name or ``aliases.json`` always shows up in the change set."""

    def accept(change: watchfiles.Change, path: str) -> bool:
        try:
            rel = Path(path).relative_to(root)
        except ValueError:
            return False
        return not any(part.startswith(".") for part in rel.parts)

    return accept


async def watch_store(registry: "Registry", stop: asyncio.Event) -> None:
    root = registry.store.dir.absolute()  # watchfiles reports absolute paths, whatever root it is given
    async for _changes in watchfiles.awatch(root, watch_filter=_visible(root), stop_event=stop, debounce=300,
                                            step=50, force_polling=registry.options.watch_polling,
                                            recursive=True):
        try:
            await registry.rescan()
        except Exception:  # a scan must never kill the watcher
            log.exception("rescan after a change in %s failed", root)
