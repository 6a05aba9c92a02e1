"""The one reader and writer of this project's JSON files (manifest, config, weights index, signature,
aliases, last-known-good, routes given as JSON).

Reading never raises anything but :class:`~m2fpkit.runtime.errors.MalformedFile` for bad content or a
file that is not a regular file (``FileNotFoundError`` and other ``OSError`` pass through: a missing
file is the caller's decision); it never blocks on a FIFO (:mod:`.regular`).
Bounded before parsing: a size cap per file, nesting depth ≤ :data:`MAX_DEPTH` (checked on the bytes,
so a deep document never reaches the recursive parser), no ``NaN``/``Infinity`` (neither the literals
nor numbers too large for a float, such as ``1e400``), integers of at most 4300 digits, no duplicate
keys, UTF-8 only — also inside strings: an unpaired ``\\uD800``-``\\uDFFF`` escape is refused, since
such a string can neither be written back nor name a file. Writing is canonical: sorted keys,
two-space indent, a final newline.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from ..errors import MalformedFile
from .regular import read_regular

#: deepest nesting any of our files needs is 5 (config.json → architecture → …); leave room, refuse abuse
MAX_DEPTH = 32
#: default size cap; callers pass their own for large files (weights index of a big model)
MAX_BYTES = 4 << 20


def _depth(data: bytes) -> int:
    """Maximum nesting of ``[``/``{`` outside strings (a cheap scan, no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for b in data:
        if in_string:
            if escaped:
                escaped = False
            elif b == 0x5C:  # backslash
                escaped = True
            elif b == 0x22:  # quote
                in_string = False
        elif b == 0x22:
            in_string = True
        elif b in (0x5B, 0x7B):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    return deepest
        elif b in (0x5D, 0x7D):
            depth -= 1
    return deepest


#: a ``\uD800``-``\uDFFF`` escape somewhere (maybe preceded by an escaped backslash: then a harmless false alarm)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _lone_surrogate(value: Any) -> bool:
    """True if a string (key or value) in the parsed ``value`` holds a surrogate (JSON pairs decode to one
    code point, so any surrogate left is unpaired). Recursion is bounded by :data:`MAX_DEPTH`."""
    if isinstance(value, str):
        return not value.isascii() and any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, list):
        return any(_lone_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(_lone_surrogate(k) or _lone_surrogate(v) for k, v in value.items())
    return False


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} does not fit a finite double")
    return value


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {brief(k)} appears twice")
        out[k] = v
    return out


def loads(data: bytes | str, what: str, *, max_bytes: int = MAX_BYTES) -> Any:
    """Parse ``data`` (the content of the file named ``what``); MalformedFile for anything unusable."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if len(data) > max_bytes:
        raise MalformedFile(what, f"{len(data)} bytes, more than the {max_bytes}-byte limit for this file")
    if _depth(data) > MAX_DEPTH:
        raise MalformedFile(what, f"nested deeper than {MAX_DEPTH} levels")
    try:
        text = data.decode("utf-8")
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite, object_pairs_hook=_unique)
    except UnicodeDecodeError:
        raise MalformedFile(what, "not UTF-8 text") from None
    except RecursionError:  # pragma: no cover - the depth scan refuses such input first
        raise MalformedFile(what, "nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, overflowing floats, huge integers, duplicate keys
        raise MalformedFile(what, f"not valid JSON ({exc})") from None
    if _SURROGATE_ESCAPE.search(data) and _lone_surrogate(value):
        raise MalformedFile(what, "a string holds an unpaired UTF-16 surrogate (\\uD800-\\uDFFF), not Unicode text")
    return value


def read(path: str | os.PathLike, what: str | None = None, *, max_bytes: int = MAX_BYTES,
         follow_links: bool = True) -> Any:
    """Read and parse one file; ``what`` names it in errors (default: its file name). A regular file only
    (:func:`~m2fpkit.runtime.bundle.regular.read_regular`: a FIFO, device or, without ``follow_links``, a
    symbolic link is a MalformedFile, never a blocked read)."""
    what = what or Path(path).name
    return loads(read_regular(path, what, max_bytes=max_bytes, follow_links=follow_links), what,
                 max_bytes=max_bytes)


def brief(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: an untrusted value quoted in an error stays short and
    quoting never fails (a huge integer is named by its size: ``repr`` refuses past 4300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def dumps(value: Any) -> bytes:
    """Canonical bytes of ``value``: sorted keys, indent 2, UTF-8, final newline; refuses NaN/Infinity."""
    return (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n").encode()
