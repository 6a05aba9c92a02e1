"""Mask2Former's Hungarian matching: which query predicts which target segment.

The cost of giving target ``t`` to query ``q`` is ``class·(−p_q(class_t)) + mask·BCE(q, t) + dice·(1 − Dice(q, t))``
(weights 2, 5, 5 as Mask2Former), the mask terms averaged over the points of the stride-4 grid (every cell, not
a random subset); :func:`assign` then picks the one-to-one assignment of least total cost. Invariants: each
query and each target is used at most once; ``min(Q, T)`` pairs are returned, in ascending query order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch.nn import functional as F


@dataclass(frozen=True)
class CostWeights:
    cls: float = 2.0
    mask: float = 5.0
    dice: float = 5.0


def assign(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the least-cost one-to-one assignment of a ``[Q, T]`` cost matrix (``min(Q, T)``
    pairs, rows ascending)."""
    if cost.ndim != 2:
        raise ValueError(f"cost: expected a 2-D matrix, got shape {cost.shape}")
    if not np.isfinite(cost).all():
        raise ValueError("cost: not finite")
    rows, cols = linear_sum_assignment(cost)
    return rows.astype(np.int64), cols.astype(np.int64)


def mask_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[Q, P]`` logits × ``[T, P]`` targets in [0, 1] → ``[Q, T]`` mean sigmoid cross-entropy over the points."""
    # BCE(x, t) = softplus(x) − x·t, summed over points as one matrix product
    return (F.softplus(logits).sum(1, keepdim=True) - logits @ targets.T) / logits.shape[1]


def mask_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[Q, T]`` dice loss ``1 − (2·Σpt + 1) / (Σp + Σt + 1)`` with ``p = sigmoid(logits)``."""
    p = logits.sigmoid()
    return 1 - (2 * (p @ targets.T) + 1) / (p.sum(1, keepdim=True) + targets.sum(1)[None, :] + 1)


def cost_matrix(logits: torch.Tensor, masks: torch.Tensor, classes: torch.Tensor, target_masks: torch.Tensor,
                weights: CostWeights = CostWeights()) -> torch.Tensor:
    """``[Q, T]`` matching cost of one image: ``logits [Q, C+1]``, ``masks [Q, P]`` (mask logits),
    ``classes [T]``, ``target_masks [T, P]``."""
    prob = logits.softmax(-1)[:, classes]
    return (weights.cls * -prob + weights.mask * mask_bce(masks, target_masks)
            + weights.dice * mask_dice(masks, target_masks))


@torch.no_grad()
def match(logits: torch.Tensor, masks: torch.Tensor, classes: torch.Tensor, target_masks: torch.Tensor,
          weights: CostWeights = CostWeights()) -> tuple[torch.Tensor, torch.Tensor]:
    """``(queries, targets)``: index pairs of the least-cost assignment for one image (see the module)."""
    if len(classes) == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty
    cost = cost_matrix(logits.float(), masks.flatten(1).float(), classes, target_masks.flatten(1).float(), weights)
    rows, cols = assign(cost.numpy())
    return torch.from_numpy(rows), torch.from_numpy(cols)
