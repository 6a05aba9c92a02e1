"""``weights.json``: where each external initializer lies in the data file, its dtype, shape and SHA-256.

The runtime loads a bundle's weights through it (each tensor copied once into private memory, tensors
identical across versions held once: ``runtime/weights.py``). Parsing is pure and checks the index
against the data file's size: names unique, every range inside the file, ranges not overlapping,
length = dtype size × shape.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MalformedFile
from . import jsonfile
from .manifest import check_rel_path

INDEX_FILE = "weights.json"
INDEX_FORMAT = 1
DTYPES = frozenset({"float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"})
MAX_INDEX_BYTES = 64 << 20
MAX_RANK = 8


@dataclass(frozen=True)
class IndexEntry:
    name: str
    offset: int
    length: int
    dtype: str
    shape: tuple[int, ...]
    sha256: str

    @property
    def key(self) -> tuple[str, str, tuple[int, ...]]:
        return self.sha256, self.dtype, self.shape


@dataclass(frozen=True)
class WeightsIndex:
    data_file: str
    #: sorted by offset
    tensors: tuple[IndexEntry, ...]


def parse(raw: bytes, what: str, data_size: int | None = None) -> WeightsIndex:
    """Parse index bytes (file ``what``); with ``data_size``, check every range against the data file."""
    data = jsonfile.loads(raw, what, max_bytes=MAX_INDEX_BYTES)
    if not isinstance(data, dict) or type(data.get("format")) is not int or data["format"] != INDEX_FORMAT:
        raise MalformedFile(f"{what} → format", f"this runtime reads weights index format {INDEX_FORMAT}")
    data_file = check_rel_path(data.get("data_file"), f"{what} → data_file")
    items = data.get("tensors")
    if not isinstance(items, list):
        raise MalformedFile(f"{what} → tensors", "expected a list")
    entries, names = [], set()
    for i, t in enumerate(items):
        entry = _entry(t, f"{what} → tensors[{i}]")
        if entry.name in names:
            raise MalformedFile(f"{what} → tensors[{i}] → name", f"{jsonfile.brief(entry.name)} is listed twice")
        if data_size is not None and entry.offset + entry.length > data_size:
            raise MalformedFile(f"{what} → tensors[{i}]", f"bytes {entry.offset}+{entry.length} lie beyond the end "
                                                          f"of {data_file} ({data_size} bytes)")
        names.add(entry.name)
        entries.append(entry)
    entries.sort(key=lambda e: e.offset)
    for a, b in zip(entries, entries[1:]):
        if a.offset + a.length > b.offset:
            raise MalformedFile(what, f"tensors {jsonfile.brief(a.name)} and {jsonfile.brief(b.name)} "
                                      f"overlap in {data_file}")
    return WeightsIndex(data_file, tuple(entries))


def _entry(t: object, where: str) -> IndexEntry:
    if not isinstance(t, dict):
        raise MalformedFile(where, "expected an object")
    keys = ("name", "offset", "length", "dtype", "shape", "sha256")
    name, offset, length, dtype, shape, sha = (t.get(k) for k in keys)
    if not isinstance(name, str) or not name or len(name) > 4096:
        raise MalformedFile(f"{where} → name", "expected a non-empty string")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**62 for v in (offset, length)):
        raise MalformedFile(where, "offset and length must be non-negative integers")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise MalformedFile(f"{where} → dtype", f"{jsonfile.brief(dtype)} is not one of {', '.join(sorted(DTYPES))}")
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)):
        raise MalformedFile(f"{where} → shape", f"expected at most {MAX_RANK} non-negative integers")
    if length != math.prod(shape) * np.dtype(dtype).itemsize:
        raise MalformedFile(f"{where} → length", f"{length} bytes does not fit {dtype} {shape}")
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise MalformedFile(f"{where} → sha256", "expected 64 lower-case hex digits")
    return IndexEntry(name, offset, length, dtype, tuple(shape), sha)  # type: ignore[arg-type]


def build(bundle_dir: Path, data_file: str, tensors: list[dict[str, Any]]) -> bytes:
    """Index bytes for ``tensors`` (name, offset, length, dtype, shape) of ``data_file``, hashing each range."""
    rows = []
    with open(Path(bundle_dir) / data_file, "rb") as f:
        for t in sorted(tensors, key=lambda t: t["offset"]):
            f.seek(t["offset"])
            row = {k: t[k] for k in ("name", "offset", "length", "dtype")}
            row["shape"] = [int(d) for d in t["shape"]]
            row["sha256"] = hashlib.sha256(f.read(t["length"])).hexdigest()
            rows.append(row)
    raw = jsonfile.dumps({"format": INDEX_FORMAT, "data_file": data_file, "tensors": rows})
    parse(raw, INDEX_FILE)  # what we write, we can read
    return raw
