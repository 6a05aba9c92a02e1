"""Routes: weights per version, named aliases, sticky assignment.

A request's route key (header, cookie, else client address) is hashed to a bucket in [0, 10000).
Versions own consecutive bucket ranges in the order the routes file lists them, sized by weight, so
raising a canary's weight only moves the buckets next to its range to it; users already on the
canary stay there. Versions that are not ready are skipped: their buckets are re-spread over the
ready versions in proportion to their weights (users of healthy versions stay where they are), so a
not-ready version never causes a failed request.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m2fpkit.runtime.versions import is_alias_name, is_version_name

BUCKETS = 10_000


class RoutesError(ValueError):
    """The routes file is wrong; the message names the key."""


@dataclass(frozen=True)
class Shadow:
    version: str
    fraction: float


@dataclass(frozen=True)
class Routes:
    weights: tuple[tuple[str, float], ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)
    key_header: str = "X-Route-Key"
    key_cookie: str = "m2fp_route"
    shadow: Shadow | None = None
    source: str = "default"

    def weighted_versions(self) -> set[str]:
        return {v for v, w in self.weights if w > 0}

    def to_dict(self) -> dict[str, Any]:
        return {"weights": dict(self.weights), "aliases": dict(self.aliases),
                "sticky": {"header": self.key_header, "cookie": self.key_cookie},
                "shadow": None if self.shadow is None else {"version": self.shadow.version,
                                                            "fraction": self.shadow.fraction},
                "source": self.source}


def parse_routes(raw: Any, source: str = "routes") -> Routes:
    if not isinstance(raw, dict):
        raise RoutesError(f"{source}: expected an object/table")
    unknown = set(raw) - {"weights", "aliases", "sticky", "shadow", "source"}
    if unknown:
        raise RoutesError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")
    weights = raw.get("weights", {})
    if not isinstance(weights, dict):
        raise RoutesError(f"{source} → weights: expected a table of version = weight")
    parsed = []
    for v, w in weights.items():
        if not is_version_name(v):
            raise RoutesError(f"{source} → weights → {v}: not a version name like v1.2")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise RoutesError(f"{source} → weights → {v}: expected a number ≥ 0, got {w!r}")
        parsed.append((v, float(w)))
    aliases = raw.get("aliases", {})
    if not isinstance(aliases, dict):
        raise RoutesError(f"{source} → aliases: expected a table of alias = version")
    for a, v in aliases.items():
        if not is_alias_name(a) or a in ("auto",):
            raise RoutesError(f"{source} → aliases → {a}: not a valid alias name (lower-case word, not 'auto')")
        if not isinstance(v, str) or not is_version_name(v):
            raise RoutesError(f"{source} → aliases → {a}: expected a version name, got {v!r}")
    sticky = raw.get("sticky", {})
    if not isinstance(sticky, dict):
        raise RoutesError(f"{source} → sticky: expected a table")
    shadow = raw.get("shadow")
    sh = None
    if shadow is not None:
        if not isinstance(shadow, dict) or not is_version_name(str(shadow.get("version", ""))):
            raise RoutesError(f"{source} → shadow: expected {{version = \"vX.Y\", fraction = 0.1}}")
        frac = shadow.get("fraction", 0.1)
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac <= 1:
            raise RoutesError(f"{source} → shadow → fraction: expected a number in [0, 1]")
        sh = Shadow(shadow["version"], float(frac))
    return Routes(weights=tuple(parsed), aliases=dict(aliases),
                  key_header=str(sticky.get("header", "X-Route-Key")),
                  key_cookie=str(sticky.get("cookie", "m2fp_route")), shadow=sh, source=source)


def load_routes(path: Path) -> Routes:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RoutesError(f"{path}: {exc.strerror or exc}") from None
    try:
        raw = json.loads(text) if Path(path).suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise RoutesError(f"{path}: {exc}") from None
    return parse_routes(raw, source=str(path))


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
