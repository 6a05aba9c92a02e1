"""Segmentation scores from a confusion matrix: mIoU, pixel accuracy, mean class accuracy, per-class IoU.

Invariants: a pixel whose ground truth is :data:`IGNORE` (255) is never counted; every other pixel is counted
exactly once, in row ``truth`` and column ``predicted`` of :attr:`Confusion.matrix`. Means run over the
classes *present in the ground truth* (at least one truth pixel), as CIHP/LIP evaluations do: a class the
model predicts but the truth never shows lowers the IoU of the classes it takes pixels from, without
adding a zero of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..figures import IGNORE

#: class ids are uint8 and IGNORE (255) is no class: at most 255 classes
MAX_CLASSES = IGNORE

__all__ = ["IGNORE", "MAX_CLASSES", "Confusion", "Scores", "score"]


@dataclass(frozen=True)
class Scores:
    """Scores of a set of pixels; ratios in [0, 1]. With no scored pixel (``pixels == 0``) every ratio is 0.0
    and ``per_class`` is empty: check ``pixels`` before trusting them."""

    #: mean IoU over the classes present in the ground truth (at least one truth pixel)
    miou: float
    #: scored pixels whose prediction equals the truth / scored pixels
    pixel_accuracy: float
    #: mean over the classes present in the ground truth of (pixels of the class predicted as it / its pixels)
    mean_class_accuracy: float
    #: IoU of every class present in the ground truth, by name
    per_class: dict[str, float] = field(default_factory=dict)
    #: scored (non-ignored) pixels
    pixels: int = 0


class Confusion:
    """Accumulated confusion matrix over ``n_classes`` classes; pixels labelled IGNORE (255) in the ground
    truth are skipped. ``matrix[t, p]``: pixels of truth ``t`` predicted as ``p`` (int64)."""

    def __init__(self, n_classes: int) -> None:
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or not 1 <= n_classes <= MAX_CLASSES:
            raise ValueError(f"n_classes: expected an integer in 1..{MAX_CLASSES}, got {n_classes!r}")
        self.n_classes = n_classes
        self.matrix = np.zeros((n_classes, n_classes), np.int64)

    def add(self, predicted: np.ndarray, truth: np.ndarray) -> None:
        """Count one image: ``predicted`` and ``truth`` are label maps of the same shape (uint8 class ids;
        ``truth`` may hold 255). ValueError on a shape mismatch or a class id >= ``n_classes`` (the matrix is
        then unchanged)."""
        predicted, truth = np.asarray(predicted), np.asarray(truth)
        if predicted.shape != truth.shape:
            raise ValueError(f"predicted map {predicted.shape} and ground truth {truth.shape} differ in shape")
        for what, array in (("predicted map", predicted), ("ground truth", truth)):
            if array.dtype.kind not in "ui":
                raise ValueError(f"{what}: expected integer class ids, got {array.dtype}")
        scored = truth != IGNORE
        t = truth[scored].astype(np.int64)
        p = predicted[scored].astype(np.int64)
        n = self.n_classes
        for what, ids in (("ground truth", t), ("predicted map", p)):
            if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= n):
                bad = int(ids.max()) if int(ids.max()) >= n else int(ids.min())
                raise ValueError(f"{what}: class id {bad} outside 0..{n - 1}")
        self.matrix += np.bincount(t * n + p, minlength=n * n).reshape(n, n)

    def merge(self, other: Confusion) -> None:
        """Add ``other``'s counts (same number of classes, else ValueError)."""
        if other.n_classes != self.n_classes:
            raise ValueError(f"cannot merge {other.n_classes} classes into {self.n_classes}")
        self.matrix += other.matrix

    @property
    def pixels(self) -> int:
        return int(self.matrix.sum())

    def scores(self, names: Sequence[str]) -> Scores:
        """The scores of everything added so far; ``names``: one distinct name per class, in id order
        (ValueError otherwise)."""
        if len(names) != self.n_classes:
            raise ValueError(f"names: expected {self.n_classes} class names, got {len(names)}")
        if len(set(names)) != len(names):
            raise ValueError("names: a class name appears twice")
        m = self.matrix
        total = int(m.sum())
        if total == 0:
            return Scores(0.0, 0.0, 0.0, {}, 0)
        inter = np.diag(m)
        truth = m.sum(axis=1)
        union = truth + m.sum(axis=0) - inter
        present = np.flatnonzero(truth > 0)
        iou = {str(names[c]): float(inter[c]) / float(union[c]) for c in present.tolist()}
        recall = [float(inter[c]) / float(truth[c]) for c in present.tolist()]
        return Scores(miou=float(np.mean(list(iou.values()))), pixel_accuracy=float(inter.sum()) / total,
                      mean_class_accuracy=float(np.mean(recall)), per_class=iou, pixels=total)


def score(predicted: np.ndarray, truth: np.ndarray, names: Sequence[str]) -> Scores:
    """The scores of one image (see :class:`Confusion`; ``names`` gives the number of classes)."""
    confusion = Confusion(len(names))
    confusion.add(predicted, truth)
    return confusion.scores(names)
