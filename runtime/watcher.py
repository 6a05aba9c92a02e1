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
    """Ignore changes inside dot-directories (staging, removed) — only published names matter."""

    def accept(change: watchfiles.Change, path: str) -> bool:
        try:
            rel = Path(path).relative_to(root)
        except ValueError:
            return False
        return not any(part.startswith(".") for part in rel.parts[:-1]) and (
            not rel.parts or not rel.parts[0].startswith(".") or len(rel.parts) == 1)

    return accept


async def watch_store(registry: "Registry", stop: asyncio.Event) -> None:
    root = registry.store.dir
    async for _changes in watchfiles.awatch(root, watch_filter=_visible(root), stop_event=stop, debounce=300,
                                            step=50, force_polling=registry.options.watch_polling,
                                            recursive=True):
        try:
            await registry.rescan()
        except Exception:  # a scan must never kill the watcher
            log.exception("rescan after a change in %s failed", root)
