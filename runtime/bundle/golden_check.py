"""When a golden sample proves little: the one rule of a *degenerate* golden label map.

A golden sample shows that a graph computes what the PyTorch model computed only as far as its label map
holds something to get wrong. A map of one class (all Background, or all one part) or without a person pixel
(no class but Background) is matched by almost any graph: such a sample is *degenerate*. Export records the
verdict in ``config.json → golden → degenerate`` (and ``m2fp-export --strict-golden`` refuses it); the runtime
never trusts that field and judges the verified label map itself (``BundleContent.golden_verdict``, and the
registry before a load), so bundles written before the field existed are judged too.

Invariant: :func:`judge` is the only place that decides; everything else reads its :class:`GoldenVerdict`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BundleError
from .config import BundleConfig

log = logging.getLogger(__name__)

#: the class id of Background in every M2FP label map (CIHP and LIP alike); any other id is a person's pixel
BACKGROUND = 0


@dataclass(frozen=True)
class GoldenVerdict:
    """What a golden label map shows: ``classes`` present (id order) and why it is degenerate (None: it is not)."""

    reason: str | None
    classes: tuple[str, ...]

    @property
    def degenerate(self) -> bool:
        return self.reason is not None

    def to_dict(self) -> dict[str, Any]:
        """The JSON every surface shows (``/api/versions``, ``/api/{v}/meta``): degenerate, reason, classes."""
        return {"degenerate": self.degenerate, "reason": self.reason, "classes": list(self.classes)}


def _name(classes: Sequence[str], class_id: int) -> str:
    return classes[class_id] if 0 <= class_id < len(classes) else f"class {class_id}"


def judge(label_map: np.ndarray, classes: Sequence[str]) -> GoldenVerdict:
    """The rule: a golden label map (class ids of ``classes``) is degenerate when it holds one class only or no
    person pixel (no id but :data:`BACKGROUND`)."""
    ids = [int(i) for i in np.unique(np.asarray(label_map))]
    names = tuple(_name(classes, i) for i in ids)
    if not ids:
        reason: str | None = "empty golden label map: no person pixel"
    elif len(ids) == 1:
        reason = f"one class ({names[0]}) in the golden label map" + (": no person pixel" if ids[0] == BACKGROUND
                                                                     else "")
    else:  # two classes or more: at least one is not Background
        reason = None
    return GoldenVerdict(reason, names)


def decode_label_map(data: bytes, name: str) -> np.ndarray:
    """A golden label map PNG (uint8 class ids) as an array; BundleError naming ``name`` if unreadable."""
    import cv2

    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if image is None or image.ndim != 2:
        raise BundleError(f"golden file {name} is unreadable (expected a single-channel PNG of class ids)")
    return image


def judge_bundle(config: BundleConfig, label_map_png: bytes) -> GoldenVerdict | None:
    """:func:`judge` of a bundle's golden label map (``label_map_png``: the verified bytes of the file
    ``config.golden.label_map``); None without a golden sample. The config's recorded ``degenerate`` is only
    compared with the verdict (a warning when they differ), never believed."""
    golden = config.golden
    if golden is None:
        return None
    verdict = judge(decode_label_map(label_map_png, golden.label_map), config.classes)
    if verdict.degenerate:
        log.warning("%s: golden sample degenerate (%s): its self-test shows little of what the graph computes",
                    config.version, verdict.reason)
    elif golden.degenerate is not None:
        log.warning("%s: config.json calls the golden sample degenerate (%s), its label map is not",
                    config.version, golden.degenerate)
    return verdict
