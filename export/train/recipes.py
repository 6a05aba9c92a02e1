"""The demo versions' training recipes: which run makes which version, at which step.

- ``cihp``: multi-human (CIHP classes); ``v1.0`` is an early checkpoint of the run, ``v1.2`` its end.
- ``cihp-beta``: ``v2.0-beta``, multi-human by another recipe: no mirroring, a wider range of scene sizes
  and aspects, half the peak learning rate, a "no object" weight of 0.2 and fewer steps; the architecture
  and query count are the same.
- ``lip``: ``v1.1``, single-human (LIP classes) on one-person scenes on the bundle's canvas (384 × 512).

Every recipe trains the ``tiny`` architecture from scratch, so the versions differ by training only. Steps
are sized so that ``make train-demo`` (two recipes at a time, one thread each, niced) takes about 25 minutes
on two cores shared with other work (1460 s measured for the committed weights); ``cihp`` is the longest.
"""

from __future__ import annotations

import dataclasses

from .data import Augment
from .loop import Recipe
from .set_loss import LossWeights

#: the multi-human demo versions infer at this scale (``export/versions.toml`` gives them the same
#: ``preprocess``): a quarter of the pixels of ModelScope's 640, which makes training four times cheaper
DEMO_MULTI_HUMAN_PREPROCESS = {"short_edge": 320, "max_size": 640}

RECIPES: dict[str, Recipe] = {
    "cihp": Recipe(
        name="cihp", task="multi-human", steps=5000, checkpoints={"v1.0": 600, "v1.2": 5000}, seed=1,
        batch=1, lr=2e-3, preprocess=DEMO_MULTI_HUMAN_PREPROCESS, augment=Augment(scale=(160, 480), crop=None),
    ),
    "cihp-beta": Recipe(
        name="cihp-beta", task="multi-human", steps=1200, checkpoints={"v2.0-beta": 1200}, seed=2,
        batch=1, lr=1e-3, weights=LossWeights(no_object=0.2), preprocess=DEMO_MULTI_HUMAN_PREPROCESS,
        augment=Augment(scale=(128, 640), aspect=(0.6, 1.8), flip=False, crop=None),
    ),
    "lip": Recipe(
        name="lip", task="single-human", steps=2800, checkpoints={"v1.1": 2800}, seed=3,
        batch=1, lr=2e-3, augment=Augment(scale=(0.55, 1.2), crop=None),
    ),
}


def scaled(recipe: Recipe, factor: float) -> Recipe:
    """``recipe`` with its steps, warm-up and checkpoint steps multiplied by ``factor`` (at least 1 each;
    for quick tries: the committed weights are trained with factor 1)."""
    if factor == 1:
        return recipe
    if factor <= 0:
        raise ValueError(f"steps scale: expected a positive factor, got {factor}")
    steps = max(1, round(recipe.steps * factor))
    return dataclasses.replace(
        recipe, steps=steps, warmup=max(1, min(steps, round(recipe.warmup * factor))),
        checkpoints={v: min(steps, max(1, round(s * factor))) for v, s in recipe.checkpoints.items()})
