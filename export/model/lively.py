"""Seeded random heads that parse visibly: what ``random:`` sources build, so a demo or test bundle shows
overlays, legends, persons and differences between versions instead of an all-background map.

Plain random init gives near-uniform class probabilities and masks near zero: no instance passes
ModelScope's thresholds and every label map is background, which also makes golden-sample checks
vacuous. Scaling the query embeddings, the class head and the last mask layer (and favouring the human
class for multi-human models) gives peaked class probabilities and masks of both signs, as a trained
model has. The weights are still random: the parsing means nothing (bundles say so, ``random_weights``).
"""

from __future__ import annotations

import torch

from .m2fp import M2FP

#: per task: query, class-head and mask-head scales, and class-logit biases ({class index: bias})
SETTINGS: dict[str, dict] = {
    "multi-human": {"query_scale": 3.0, "cls_scale": 6.0, "mask_scale": 8.0, "class_bias": {20: 4.0}},
    "single-human": {"query_scale": 30.0, "cls_scale": 8.0, "mask_scale": 24.0, "class_bias": {}},
}


def liven(model: M2FP, task: str) -> M2FP:
    """Scale ``model``'s decoder heads in place (see the module docstring); returns it."""
    s = SETTINGS[task]
    pred = model.sem_seg_head.predictor
    with torch.no_grad():
        pred.query_feat.weight.mul_(s["query_scale"])
        pred.query_embed.weight.mul_(s["query_scale"])
        pred.class_embed.weight.mul_(s["cls_scale"])
        pred.class_embed.bias.mul_(s["cls_scale"])
        last = pred.mask_embed.layers[-1]
        assert isinstance(last, torch.nn.Linear)
        last.weight.mul_(s["mask_scale"])
        for c, b in s["class_bias"].items():
            pred.class_embed.bias[c] += b
    return model
