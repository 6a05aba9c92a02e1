"""Which loaded versions to let go: the memory budget and the idle reaper.

Invariants: neither ever picks a pinned version (latest, alias targets, routed, preloaded) nor one
with a request in flight; the budget never picks the version whose load triggered the check, and
evicts least recently used first, only as many as needed to get under the budget. Both only *choose*:
the life cycle retires what they pick (so a chosen version drains like any other).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Set

from .lifecycle import Slot


def over_budget(slots: Iterable[Slot], budget: int | None, pinned: Set[str], exclude: str = "") -> list[Slot]:
    """Loaded versions to evict, least recently used first, until the rest fits ``budget`` bytes."""
    if not budget:
        return []
    loaded = [s for s in slots if s.active is not None]
    total = sum(s.active.memory_bytes for s in loaded if s.active is not None)
    chosen = []
    for slot in sorted(loaded, key=lambda s: s.last_used):
        if total <= budget:
            break
        active = slot.active
        assert active is not None
        if slot.name in pinned or slot.name == exclude or active.in_flight:
            continue
        total -= active.memory_bytes
        chosen.append(slot)
    return chosen


def idle(slots: Iterable[Slot], ttl: float, now: float, pinned: Set[str]) -> list[Slot]:
    """Loaded versions unused for more than ``ttl`` seconds (monotonic ``now``)."""
    return [s for s in slots if s.active is not None and s.name not in pinned and s.active.in_flight == 0
            and now - s.last_used > ttl]


def reaper_period(ttl: float) -> float:
    """How often to look for idle versions: a quarter of the TTL, within [0.2, 30] seconds."""
    return min(30.0, max(0.2, ttl / 4))


async def reap(ttl: float, stop: asyncio.Event, sweep: Callable[[], None]) -> None:
    """Call ``sweep`` every :func:`reaper_period` until ``stop`` is set."""
    period = reaper_period(ttl)
    while not stop.is_set():
        await asyncio.sleep(period)
        sweep()
