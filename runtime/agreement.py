"""How closely two label maps agree: the one home of the measures plan verification, the golden self-test,
the export gates, shadow runs and ``/api/compare`` share.

``semantic_labels`` is the per-pixel class argmax at mask resolution, Σ_q softmax(class)[:-1] · sigmoid(mask):
unlike the final label map it does not pass through the instance thresholds, so it shows a numeric
difference between engines even where random weights leave the label map all background.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: A pixel is *decisive* when its top semantic score beats the runner-up by at least this share of the top
#: score. float32 rounding moves these scores by ~1e-6 relative, so no rounding difference between two correct
#: engines can flip a decisive pixel: a flip there is an error, not noise.
DECISIVE_MARGIN = 0.02


def semantic_scores(logits: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per-class score of every pixel, Σ_q softmax(class)[:-1] · sigmoid(mask): ``(B, C, H, W)``, computed in
    the inputs' float type."""
    e = np.exp(logits - logits.max(-1, keepdims=True))
    probs = (e / e.sum(-1, keepdims=True))[..., :-1]
    with np.errstate(over="ignore"):  # a trained model's logits below about -88: exp → inf, sigmoid → 0, as it is
        sig = 1.0 / (1.0 + np.exp(-masks))
    return np.einsum("bqc,bqhw->bchw", probs, sig)


def semantic_labels(logits: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(B, C) class argmax per pixel of (B, Q, H, W) masks: ``(B, H, W)`` int64."""
    return semantic_scores(logits, masks).argmax(1)


def decisive(scores: np.ndarray, margin: float = DECISIVE_MARGIN) -> np.ndarray:
    """``(B, H, W)`` bool: pixels of ``(B, C, H, W)`` scores whose top class leads the second by ≥ ``margin`` × top."""
    top2 = np.partition(scores, -2, axis=1)[:, -2:]
    first, second = top2[:, 1], top2[:, 0]
    return (first - second) >= margin * np.abs(first)


def pixel_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of equal pixels; 0.0 when the shapes differ (nothing can be compared)."""
    return float((a == b).mean()) if a.shape == b.shape else 0.0


def agreement_on(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """Fraction of the ``where`` pixels on which label maps ``a`` and ``b`` agree; 1.0 when ``where`` is empty."""
    n = int(where.sum())
    return float((a[where] == b[where]).sum()) / n if n else 1.0


def by_class_name(map_a: np.ndarray, classes_a: Sequence[str], map_b: np.ndarray,
              classes_b: Sequence[str]) -> dict[str, Any]:
    """Pixel agreement, per-class IoU and mean IoU of two label maps of one image, classes matched by *name*.

    Class ids index ``classes_a`` / ``classes_b``. ``pixel_agreement``: share of pixels whose class names are
    equal; for each class present in either map, ``iou`` = |A = c and B = c| / |A = c or B = c| with both pixel
    counts; ``mean_iou``: the mean of those IoUs (Background included). ValueError if the shapes differ."""
    if map_a.shape != map_b.shape:
        raise ValueError(f"label maps of different sizes: {map_a.shape} vs {map_b.shape}")
    names = list(dict.fromkeys([*classes_a, *classes_b]))
    index = {n: i for i, n in enumerate(names)}
    k = len(names)
    ids_a = np.asarray([index[n] for n in classes_a], np.int64)[map_a.astype(np.int64)]
    ids_b = np.asarray([index[n] for n in classes_b], np.int64)[map_b.astype(np.int64)]
    joint = np.bincount((ids_a * k + ids_b).ravel(), minlength=k * k).reshape(k, k)
    total = int(joint.sum())
    inter, count_a, count_b = np.diag(joint), joint.sum(axis=1), joint.sum(axis=0)
    per_class = []
    for c in range(k):
        union = int(count_a[c] + count_b[c] - inter[c])
        if union:
            per_class.append({"class": names[c], "iou": round(float(inter[c]) / union, 6),
                              "pixels_a": int(count_a[c]), "pixels_b": int(count_b[c]),
                              "intersection": int(inter[c])})
    return {
        "pixel_agreement": round(float(inter.sum()) / total, 6) if total else 1.0,
        "mean_iou": round(float(np.mean([c["iou"] for c in per_class])), 6) if per_class else 1.0,
        "classes": per_class,
    }
