"""Held-out grades while training: the PyTorch model's outputs through the runtime's own preprocessing and
postprocessing (``runtime.preprocess``, ``runtime.postprocess``), scored by ``runtime.quality.metrics``.

The scenes are drawn at the size the bundles' golden sample uses (``export.golden.scene_size``) from seeds
that training never draws (:func:`heldout_seeds`), so a grade here is what a bundle built from the same
weights would get on those scenes, up to the ONNX graph's rounding.
"""

from __future__ import annotations

import numpy as np
import torch

from m2fpkit.runtime import figures
from m2fpkit.runtime.bundle.config import BundleConfig
from m2fpkit.runtime.postprocess import postprocess
from m2fpkit.runtime.preprocess import prepare
from m2fpkit.runtime.quality.metrics import Confusion, Scores

from ..build import make_config, preprocess_for
from ..golden import scene_size
from ..model.config import M2FPConfig
from ..model.m2fp import M2FP
from ..source_types import Checkpoint
from ..specs import VersionSpec

#: dataset seed of the held-out scenes: training draws ``figures.item_seed(recipe.seed, i)`` with recipe seeds 1-3
HELDOUT_SEED = 777_000


def heldout_seeds(count: int, seed: int = HELDOUT_SEED) -> list[int]:
    """Scene seeds of the held-out set: ``figures.item_seed(seed, i)``, as ``m2fp-figures --seed`` writes them."""
    return [figures.item_seed(seed, i) for i in range(count)]


def bundle_config(cfg: M2FPConfig, preprocess: dict[str, int] | None = None) -> BundleConfig:
    """The :class:`BundleConfig` an export of ``cfg`` would write (with a spec's ``preprocess`` overrides), as
    far as pre- and postprocessing go."""
    spec = VersionSpec(version="v0.0", source="training", task=cfg.task, preprocess=dict(preprocess or {}))
    ck = Checkpoint(kind="training", uri="training", config=cfg, sha256="0" * 64)
    return make_config(spec, ck, preprocess_for(cfg, spec.preprocess), {}, "1970-01-01T00:00:00Z", 0)


def parsing_classes(cfg: M2FPConfig) -> tuple[str, ...]:
    """The classes a label map holds (multi-human: the parsing classes, never "Human")."""
    return tuple(cfg.classes[:cfg.num_parsing])


@torch.no_grad()
def grade(model: M2FP, seeds: list[int], preprocess: dict[str, int] | None = None) -> Scores:
    """Scores of ``model`` (put in eval mode) on the scenes ``seeds`` of its task, prepared as a bundle with
    ``preprocess`` overrides would."""
    cfg = model.config
    bundle = bundle_config(cfg, preprocess)
    h, w = scene_size(bundle)
    names = parsing_classes(cfg)
    confusion = Confusion(len(names))
    model.eval()
    for seed in seeds:
        sc = figures.scene(seed, h, w, task=cfg.task)
        prepared = prepare(sc.image, bundle.preprocess)
        logits, masks = model(torch.from_numpy(prepared.tensor))
        result = postprocess(logits.numpy(), masks.numpy(), prepared, bundle)
        confusion.add(result.label_map, np.asarray(sc.labels))
    return confusion.scores(names)
