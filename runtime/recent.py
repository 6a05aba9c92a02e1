"""Bounded on-disk caches: an entry's modification time is its last use, and only the newest are kept."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path


def keep_most_recent(entries: Iterable[Path], keep: int, remove: Callable[[Path], None]) -> None:
    """``remove`` every entry but the ``keep`` most recently modified; one gone meanwhile (another process
    pruning the same cache) is skipped."""
    dated = []
    for entry in entries:
        with contextlib.suppress(OSError):
            dated.append((entry.stat().st_mtime, entry))
    for _, old in sorted(dated, reverse=True)[keep:]:
        remove(old)
