"""Mask2Former's set loss over matched (query, segment) pairs.

Per prediction (the final one and each auxiliary decoder layer, matched separately as Mask2Former does):
``class·CE + mask·BCE + dice·Dice``, weights 2, 5, 5. The cross-entropy runs over every query, an unmatched
query's target being "no object" (the last logit) with weight ``no_object`` (0.1); BCE (mean over the points
of the stride-4 grid) and dice are summed over matched pairs and divided by the number of target segments in
the batch. A perfect prediction scores near 0; the loss is never negative.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .data import Sample
from .matcher import CostWeights, match


@dataclass(frozen=True)
class LossWeights:
    cls: float = 2.0
    mask: float = 5.0
    dice: float = 5.0
    no_object: float = 0.1

    @property
    def cost(self) -> CostWeights:
        """The matching cost uses the same three weights."""
        return CostWeights(self.cls, self.mask, self.dice)


@dataclass(frozen=True)
class Terms:
    """The weighted terms of one prediction (tensors with gradients) and their sum."""

    cls: torch.Tensor
    mask: torch.Tensor
    dice: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.cls + self.mask + self.dice


def pair_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[K]`` dice loss of row ``k`` of ``logits [K, P]`` against row ``k`` of ``targets [K, P]`` (the matcher's
    ``mask_dice`` on its diagonal)."""
    p = logits.sigmoid()
    return 1 - (2 * (p * targets).sum(1) + 1) / (p.sum(1) + targets.sum(1) + 1)


def prediction_loss(logits: torch.Tensor, masks: torch.Tensor, targets: list[Sample],
                    weights: LossWeights = LossWeights()) -> Terms:
    """The loss of one prediction: ``logits [B, Q, C+1]``, ``masks [B, Q, H/4, W/4]``, a target per image."""
    b, q, c1 = logits.shape
    no_object = c1 - 1
    class_weight = torch.ones(c1)
    class_weight[no_object] = weights.no_object
    want = torch.full((b, q), no_object, dtype=torch.int64)
    n_masks = max(1, sum(len(t.classes) for t in targets))
    bce = logits.new_zeros(())
    dice = logits.new_zeros(())
    for i, t in enumerate(targets):
        flat = masks[i].flatten(1)
        tgt = t.masks.flatten(1)
        rows, cols = match(logits[i].detach(), flat.detach(), t.classes, tgt, weights.cost)
        if len(rows) == 0:
            continue
        want[i, rows] = t.classes[cols]
        pred, truth = flat[rows], tgt[cols]
        bce = bce + F.binary_cross_entropy_with_logits(pred, truth, reduction="none").mean(1).sum()
        dice = dice + pair_dice(pred, truth).sum()
    ce = F.cross_entropy(logits.transpose(1, 2), want, weight=class_weight)
    return Terms(weights.cls * ce, weights.mask * bce / n_masks, weights.dice * dice / n_masks)


def set_loss(predictions: list[tuple[torch.Tensor, torch.Tensor]], targets: list[Sample],
             weights: LossWeights = LossWeights()) -> tuple[torch.Tensor, Terms]:
    """Summed loss over ``predictions`` (final first, then auxiliary layers); also the final one's terms."""
    terms = [prediction_loss(lg, mk, targets, weights) for lg, mk in predictions]
    return torch.stack([t.total for t in terms]).sum(), terms[0]
