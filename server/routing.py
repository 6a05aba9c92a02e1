"""Sticky weighted routing: which version a request's route key goes to.

A request's route key (header, cookie, else client address) is hashed to a bucket in [0, 10000).
Versions own consecutive bucket ranges in the order the routes file lists them, sized by weight, so
raising a canary's weight only moves the buckets next to its range to it; users already on the
canary stay there. Versions that are not ready are skipped: their buckets are re-spread over the
ready versions in proportion to their weights (users of healthy versions stay where they are), so a
not-ready version never causes a failed request. The routes themselves (file format, validation) are
:mod:`m2fpkit.runtime.routes_file`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

BUCKETS = 10_000


def bucket(key: str) -> int:
    """Stable bucket in [0, 10000) for a route key."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "big") % BUCKETS


def _owner(weights: list[tuple[str, float]], key_bucket: int) -> str | None:
    total = sum(w for _, w in weights)
    if not weights or total <= 0:
        return None
    edge = 0.0
    for v, w in weights:
        edge += w / total * BUCKETS
        if key_bucket < edge:
            return v
    return weights[-1][0]


def pick(weights: Iterable[tuple[str, float]], key_bucket: int, usable: Callable[[str], bool]) -> str | None:
    """The version owning ``key_bucket`` (None if no weighted version is usable).

    If the owner is not usable, only its buckets move: they are scattered (a fixed permutation of
    the buckets) over the usable versions in proportion to their weights, so users of healthy
    versions never move.
    """
    weighted = [(v, w) for v, w in weights if w > 0]
    owner = _owner(weighted, key_bucket)
    if owner is None or usable(owner):
        return owner
    live = [(v, w) for v, w in weighted if usable(v)]
    return _owner(live, (key_bucket * 7919 + 4099) % BUCKETS)
