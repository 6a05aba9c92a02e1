"""The routes file: weights per version, named aliases, sticky-key names and a shadow candidate, as data.

One parser for every source of routes (the server's ``--routes`` file, the admin API, the last-known-good
record, ``m2fp-bundle rm --routes``): :func:`load_routes` reads a file (a regular file of at most
:data:`MAX_ROUTES_BYTES`, never blocking on a FIFO: ``bundle.regular``), :func:`loads_routes` parses its
bytes (TOML, or JSON by suffix), :func:`parse_routes` validates the decoded document. A weight is a finite
number in [0, :data:`MAX_WEIGHT`] (booleans, strings, NaN, infinities and numbers beyond the range are
refused with :class:`RoutesError` naming the source and the key), so the total of the weights is always
finite. Whether the named versions are installed is not the file's concern: a routes file may name a
version before it is pulled (the server warns about those, see ``server.routes_state``).
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bundle import jsonfile
from .bundle.regular import read_regular
from .bundle.versions import is_alias_name, is_version_name
from .errors import MalformedFile

MAX_ROUTES_BYTES = 1 << 20
#: the largest routing weight; weights are relative, so [0, 1e6] allows any ratio down to one in a million
MAX_WEIGHT = 1_000_000.0
#: an HTTP token (RFC 9110): what a header or cookie name may be
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")


class RoutesError(ValueError):
    """The routes file is wrong; the message names the file and the key."""


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
    """Routes from a decoded routes document; RoutesError naming ``source`` and the key for anything else."""
    if not isinstance(raw, dict):
        raise RoutesError(f"{source}: expected an object/table")
    unknown = set(raw) - {"weights", "aliases", "sticky", "shadow", "source"}
    if unknown:
        raise RoutesError(f"{source}: unknown key(s) {brief_key(', '.join(sorted(map(str, unknown))))}")
    weights = raw.get("weights", {})
    if not isinstance(weights, dict):
        raise RoutesError(f"{source} → weights: expected a table of version = weight")
    parsed = []
    for v, w in weights.items():
        if not isinstance(v, str) or not is_version_name(v):
            raise RoutesError(f"{source} → weights → {brief_key(str(v))}: not a version name like v1.2")
        weight = _weight(w)
        if weight is None:
            raise RoutesError(f"{source} → weights → {v}: expected a finite number in [0, {MAX_WEIGHT:.0f}], "
                              f"got {jsonfile.brief(w)}")
        parsed.append((v, weight))
    aliases = raw.get("aliases", {})
    if not isinstance(aliases, dict):
        raise RoutesError(f"{source} → aliases: expected a table of alias = version")
    for a, v in aliases.items():
        if not isinstance(a, str) or not is_alias_name(a) or a == "auto":
            raise RoutesError(f"{source} → aliases → {brief_key(str(a))}: not a valid alias name "
                              "(lower-case word, not 'auto')")
        if not isinstance(v, str) or not is_version_name(v):
            raise RoutesError(f"{source} → aliases → {a}: expected a version name, got {jsonfile.brief(v)}")
    sticky = raw.get("sticky", {})
    if not isinstance(sticky, dict):
        raise RoutesError(f"{source} → sticky: expected a table")
    unknown = set(sticky) - {"header", "cookie"}
    if unknown:
        raise RoutesError(f"{source} → sticky: unknown key(s) {brief_key(', '.join(sorted(map(str, unknown))))}")
    header, cookie = sticky.get("header", "X-Route-Key"), sticky.get("cookie", "m2fp_route")
    for key, name in (("header", header), ("cookie", cookie)):
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise RoutesError(f"{source} → sticky → {key}: expected a {key} name (1-64 token characters), "
                              f"got {jsonfile.brief(name)}")
    shadow = raw.get("shadow")
    sh = None
    if shadow is not None:
        version = shadow.get("version") if isinstance(shadow, dict) else None
        if not isinstance(version, str) or not is_version_name(version):
            raise RoutesError(f"{source} → shadow: expected {{version = \"vX.Y\", fraction = 0.1}}")
        frac = _weight(shadow.get("fraction", 0.1), 1.0)
        if frac is None:
            raise RoutesError(f"{source} → shadow → fraction: expected a number in [0, 1]")
        sh = Shadow(version, frac)
    return Routes(weights=tuple(parsed), aliases=dict(aliases), key_header=header, key_cookie=cookie, shadow=sh,
                  source=source)


def brief_key(key: str, limit: int = 64) -> str:
    """A key of the file as it is quoted in an error: cut to ``limit`` characters."""
    return key if len(key) <= limit else key[:limit - 1] + "…"


def _weight(w: Any, limit: float = MAX_WEIGHT) -> float | None:
    """``w`` as a finite float in [0, ``limit``], or None (booleans, strings, NaN, infinities, out of range)."""
    if isinstance(w, bool) or not isinstance(w, (int, float)):
        return None
    if isinstance(w, int) and w.bit_length() > 64:  # far beyond any limit; float() of it may overflow
        return None
    value = float(w)
    return value + 0.0 if math.isfinite(value) and 0 <= value <= limit else None  # + 0.0: -0.0 becomes 0.0


def loads_routes(data: bytes | str, fmt: str, source: str = "routes") -> Routes:
    """Parse routes file content (``fmt`` "json" or "toml"); RoutesError naming ``source`` for anything wrong."""
    raw_bytes = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw_bytes) > MAX_ROUTES_BYTES:
        raise RoutesError(f"{source}: {len(raw_bytes)} bytes, more than the {MAX_ROUTES_BYTES}-byte limit")
    if fmt == "json":
        try:
            raw = jsonfile.loads(raw_bytes, source, max_bytes=MAX_ROUTES_BYTES)
        except MalformedFile as exc:
            raise RoutesError(str(exc)) from None
    elif fmt == "toml":
        try:
            raw = tomllib.loads(raw_bytes.decode("utf-8"))
        except UnicodeDecodeError:
            raise RoutesError(f"{source}: not UTF-8 text") from None
        except RecursionError:  # tomllib recurses once per nested array or inline table
            raise RoutesError(f"{source}: nested too deeply") from None
        except ValueError as exc:  # TOMLDecodeError, integers beyond Python's digit limit
            raise RoutesError(f"{source}: not valid TOML ({exc})") from None
    else:
        raise ValueError(f"routes format {fmt!r}: expected 'json' or 'toml'")
    return parse_routes(raw, source=source)


def load_routes(path: Path) -> Routes:
    """The routes file at ``path``: JSON if its name ends in ``.json``, TOML otherwise (blocking: call it off
    the event loop)."""
    try:
        data = read_regular(path, str(path), max_bytes=MAX_ROUTES_BYTES)
    except MalformedFile as exc:  # not a regular file, or too large
        raise RoutesError(str(exc)) from None
    except OSError as exc:
        raise RoutesError(f"{path}: {exc.strerror or exc}") from None
    return loads_routes(data, "json" if Path(path).suffix == ".json" else "toml", source=str(path))
