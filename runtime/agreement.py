"""How closely two runs of a version agree: the measures plan verification and the export gates share.

``semantic_labels`` is the per-pixel class argmax at mask resolution, Σ_q softmax(class)[:-1] · sigmoid(mask):
unlike the final label map it does not pass through the instance thresholds, so it shows a numeric
difference between engines even where random weights leave the label map all background.
"""

from __future__ import annotations

import numpy as np


def semantic_labels(logits: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(B, C) class argmax per pixel of (B, Q, H, W) masks: ``(B, H, W)`` int64."""
    e = np.exp(logits - logits.max(-1, keepdims=True))
    probs = (e / e.sum(-1, keepdims=True))[..., :-1]
    sig = 1.0 / (1.0 + np.exp(-masks))
    return np.einsum("bqc,bqhw->bchw", probs, sig).argmax(1)


def pixel_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of equal pixels; 0.0 when the shapes differ (nothing can be compared)."""
    return float((a == b).mean()) if a.shape == b.shape else 0.0
