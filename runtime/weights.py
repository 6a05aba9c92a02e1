"""Weights held in private memory, shared across loaded versions: one buffer per distinct tensor.

A session never reads its weights from the bundle's files: :meth:`BundleContent.tensors` streams the
data file once (hashing it against the manifest) into fresh private buffers, and onnxruntime receives
them as initializers. Nothing an operator or an attacker does to the files afterwards — truncate,
rewrite in place, delete — reaches a loaded version: no shared file mapping exists to fault (SIGBUS)
or to change under it.

Versions of a model often differ in a few layers only (a retrained head over the same backbone).
onnxruntime shares nothing between sessions on its own; the pool keys each tensor by (sha256, dtype,
shape) from the verified ``weights.json`` and hands the buffer of a live identical tensor to every
session that has it (``add_initializer``: used in place, never written). A key match is confirmed
byte for byte before a buffer is reused, so a wrong index cannot swap weights between versions.

Lifetime: a session keeps its tensors alive (see ``session.py``); the pool holds weak references
only, so a tensor's memory is freed when the last session using it is gone.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import weakref

import numpy as np
import onnxruntime as ort

from .bundle.reader import BundleContent
from .bundle.weights_index import IndexEntry
from .errors import IntegrityError

log = logging.getLogger(__name__)


class SharedTensor:
    """One read-only tensor in private memory and its ``OrtValue``; alive while some session holds it."""

    __slots__ = ("key", "array", "value", "__weakref__")

    def __init__(self, entry: IndexEntry, raw: np.ndarray) -> None:
        self.key = entry.key
        array = raw.view(entry.dtype).reshape(entry.shape)
        array.flags.writeable = False
        self.array = array
        self.value = ort.OrtValue.ortvalue_from_numpy(array)

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)


class WeightPool:
    """Process-wide map from tensor identity (sha256, dtype, shape) to the live shared buffer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: weakref.WeakValueDictionary[tuple, SharedTensor] = weakref.WeakValueDictionary()

    def tensors(self, content: BundleContent, *, share: bool = True) -> list[tuple[str, SharedTensor]]:
        """``(initializer name, tensor)`` for every indexed tensor of a verified bundle.

        Raises IntegrityError if the data file no longer matches the manifest, or if this bundle's index
        mislabels a tensor (nothing is kept then).
        """
        out, differing = [], []
        with self._lock:
            for entry, raw in content.tensors():  # the data file's hash is checked when this loop ends
                tensor = self._live.get(entry.key) if share else None
                if tensor is not None and not np.array_equal(raw, tensor.array.reshape(-1).view(np.uint8)):
                    differing.append((entry, raw))
                    tensor = SharedTensor(entry, raw)  # never shared: one of two indexes mislabels it
                elif tensor is None:
                    tensor = SharedTensor(entry, raw)
                    if share:
                        self._live.setdefault(entry.key, tensor)
                out.append((entry.name, tensor))
        for entry, raw in differing:
            if hashlib.sha256(raw.data).hexdigest() != entry.sha256:
                raise IntegrityError(f"weights.json: tensor {entry.name!r} does not match its sha256 "
                                     "(the index mislabels it)")
            log.error("weights: a loaded bundle's index mislabels tensor sha256 %s…; %s keeps its own copy",
                      entry.sha256[:12], entry.name)
        return out

    def stats(self) -> dict[str, int]:
        with self._lock:
            tensors = list(self._live.values())
        return {"tensors": len(tensors), "bytes": sum(t.nbytes for t in tensors)}


#: The pool every ``SessionFactory`` in this process uses.
POOL = WeightPool()
