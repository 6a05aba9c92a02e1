"""Weights shared across loaded versions: one read-only mmapped buffer per distinct tensor.

Versions of a model often differ in a few layers only (a retrained head over the same backbone).
onnxruntime shares nothing between sessions on its own: each maps its own external-data file. A
bundle's ``weights.json`` (written at export) lists every external initializer with its offset,
length, dtype, shape and SHA-256. The pool maps each distinct tensor once, from the first bundle that
has it, and hands the same ``OrtValue`` to every session through ``SessionOptions.add_initializer``
(onnxruntime uses the buffer in place and never writes to it). A match by hash is confirmed by
comparing bytes before a buffer is reused, so a wrong index cannot swap weights between versions.

Lifetime: a session keeps its shared tensors alive (see ``session.py``); the pool holds weak
references only, so a tensor is unmapped when the last session using it is gone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .bundle import is_file_name
from .errors import BundleError

log = logging.getLogger(__name__)

INDEX_FORMAT = 1
DTYPES = frozenset({"float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"})


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
    tensors: tuple[IndexEntry, ...]


def read_index(bundle_dir: Path, rel: str) -> WeightsIndex:
    """Parse and check ``rel`` against the data file it describes (bounds, sizes, unique names)."""
    try:
        raw = json.loads((bundle_dir / rel).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{rel} is unreadable: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != INDEX_FORMAT:
        raise BundleError(f"{rel} → format: this runtime reads weights index format {INDEX_FORMAT}")
    data_file = raw.get("data_file")
    if not is_file_name(data_file):
        raise BundleError(f"{rel} → data_file: expected a file name inside the bundle, got {data_file!r}")
    try:
        size = (bundle_dir / data_file).stat().st_size
    except OSError:
        raise BundleError(f"{rel} → data_file: {data_file} is missing") from None
    items = raw.get("tensors")
    if not isinstance(items, list):
        raise BundleError(f"{rel} → tensors: expected a list")
    entries, names = [], set()
    for i, t in enumerate(items):
        entry = _entry(t, f"{rel} → tensors[{i}]")
        if entry.name in names:
            raise BundleError(f"{rel} → tensors[{i}] → name: {entry.name!r} is listed twice")
        if entry.offset + entry.length > size:
            raise BundleError(f"{rel} → tensors[{i}]: bytes {entry.offset}+{entry.length} lie beyond the end of "
                              f"{data_file} ({size} bytes)")
        names.add(entry.name)
        entries.append(entry)
    return WeightsIndex(data_file, tuple(entries))


def _entry(t: object, where: str) -> IndexEntry:
    if not isinstance(t, dict):
        raise BundleError(f"{where}: expected an object")
    name, offset, length, dtype, shape, sha = (t.get(k) for k in ("name", "offset", "length", "dtype", "shape", "sha256"))
    if not isinstance(name, str) or not name:
        raise BundleError(f"{where} → name: expected a non-empty string")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)):
        raise BundleError(f"{where}: offset and length must be non-negative integers")
    if dtype not in DTYPES:
        raise BundleError(f"{where} → dtype: {dtype!r} is not one of {', '.join(sorted(DTYPES))}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BundleError(f"{where} → shape: expected a list of non-negative integers")
    if length != math.prod(shape) * np.dtype(dtype).itemsize:
        raise BundleError(f"{where} → length: {length} bytes does not fit {dtype} {shape}")
    if not isinstance(sha, str) or len(sha) != 64:
        raise BundleError(f"{where} → sha256: expected 64 hex digits")
    return IndexEntry(name, offset, length, dtype, tuple(shape), sha)


class SharedTensor:
    """One mmapped tensor and its ``OrtValue``; alive while some session holds it."""

    __slots__ = ("key", "array", "value", "_map", "_span", "__weakref__")

    def __init__(self, key: tuple, mapping: mmap.mmap, entry: IndexEntry) -> None:
        self.key = key
        raw = np.frombuffer(mapping, dtype=np.uint8, count=entry.length, offset=entry.offset)
        self.array = raw.view(entry.dtype).reshape(entry.shape)
        self.value = ort.OrtValue.ortvalue_from_numpy(self.array)
        start = entry.offset - entry.offset % mmap.PAGESIZE
        self._map, self._span = mapping, (start, entry.offset + entry.length - start)

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def evict(self) -> None:
        """Drop the pages from this process's resident set; the next read maps them again from the page cache.

        Called after a session is built: onnxruntime reads every initializer while optimising and
        prepacking, but keeps using only some in place. Without this, the originals of prepacked or
        folded weights would stay resident here next to onnxruntime's own copies.
        """
        if self._span[1]:
            self._map.madvise(mmap.MADV_DONTNEED, *self._span)


class WeightPool:
    """Process-wide map from tensor identity (sha256, dtype, shape) to the live shared buffer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: weakref.WeakValueDictionary[tuple, SharedTensor] = weakref.WeakValueDictionary()

    def initializers(self, bundle_dir: Path, index_file: str) -> list[tuple[str, SharedTensor]]:
        """``(initializer name, shared tensor)`` for every tensor of the bundle's index."""
        index = read_index(bundle_dir, index_file)
        out = []
        with self._lock, open(bundle_dir / index.data_file, "rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) if index.tensors else None
            for e in index.tensors:
                shared = self._live.get(e.key)
                if shared is not None and not _same_bytes(shared, f, e, index_file):
                    shared = None
                if shared is None:
                    shared = SharedTensor(e.key, mapping, e)  # type: ignore[arg-type]
                    self._live.setdefault(e.key, shared)
                out.append((e.name, shared))
        return out

    def stats(self) -> dict[str, int]:
        with self._lock:
            tensors = list(self._live.values())
        return {"tensors": len(tensors), "bytes": sum(t.nbytes for t in tensors)}


def _same_bytes(shared: SharedTensor, f, e: IndexEntry, index_file: str) -> bool:
    """Confirm a hash match by content; a mismatch means one of the two indexes is wrong."""
    data = os.pread(f.fileno(), e.length, e.offset)
    if np.array_equal(np.frombuffer(data, np.uint8), shared.array.reshape(-1).view(np.uint8)):
        return True
    if hashlib.sha256(data).hexdigest() != e.sha256:
        raise BundleError(f"{index_file}: tensor {e.name!r} does not match its sha256 (index or data file corrupt)")
    log.error("weights: a loaded bundle's index mislabels tensor sha256 %s…; %s keeps its own copy", e.sha256[:12], e.name)
    return False


#: The pool every ``SessionFactory`` in this process uses.
POOL = WeightPool()
