"""A plan's evidence: what a non-reference execution plan must show against ``ort-fp32`` to be served.

Evidence images: the bundle's golden image and :data:`SCENE_SEEDS` scenes of people drawn by
``figures.scene`` for the bundle's task (fixed seeds and sizes: every load compares the same pictures).
ort-fp32 runs each once per load (:func:`reference_maps`); its semantic scores (``agreement.semantic_scores``,
before any instance threshold) give its label map and the pixels where it is *decisive*
(``agreement.decisive`` at the bundle's ``decisive_margin``). A candidate runs the same input tensors.

Invariants (the floors are ``config.json → plans``, defaults in ``bundle.config``):

* No verdict without evidence: ort-fp32's maps must hold at least ``min_decisive_pixels`` decisive pixels
  and ``min_classes`` classes that each have ``min_class_pixels`` of them (:func:`too_little`, decided before
  the candidate is built). Otherwise the plan is not served: "too little evidence: …".
* A plan is served only if its semantic labels equal ort-fp32's on at least ``min_decisive_agreement`` of
  the decisive pixels and its per-class IoU with ort-fp32's map, pooled over the images, is at least
  ``min_class_iou`` for every class holding ``min_class_pixels`` of ort-fp32's pixels (:func:`judge`);
  otherwise it is refused (:class:`PlanRefused`) with the figures in the reason.
* Every verdict carries its :class:`Evidence`, the figures the trials record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import figures
from .agreement import DECISIVE_MARGIN, agreement_on, by_class_name, decisive, semantic_labels, semantic_scores
from .bundle.config import BundleConfig
from .errors import BundleError
from .predictor import Predictor

#: the ``figures.scene`` seeds of the generated evidence images: three scenes beside the golden sample
#: (four forwards per plan and load; export's golden scene is seed 7, so none repeats it)
SCENE_SEEDS = (1001, 1002, 1003)
#: ``(height, width)`` of a multi-human scene: square, so the short-edge resize gives the cheapest forward
#: that size allows (640 × 640 by default); a single-human scene fills the bundle's canvas
MULTI_HUMAN_SCENE = (256, 256)


@dataclass(frozen=True)
class Evidence:
    """What a plan was judged on: ``images`` compared, ort-fp32's ``decisive_pixels`` and the ``classes`` on
    them; the candidate's ``agreement`` on those pixels and its worst per-class IoU (None: not measured)."""

    images: int
    decisive_pixels: int
    classes: int
    agreement: float | None = None
    worst_class_iou: float | None = None
    worst_class: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "decisive_pixels": self.decisive_pixels, "classes": self.classes,
                "agreement": self.agreement, "worst_class_iou": self.worst_class_iou, "worst_class": self.worst_class}


class PlanRefused(BundleError):
    """A plan's evidence is too little or fails a floor; ``evidence`` holds the figures."""

    def __init__(self, message: str, evidence: Evidence) -> None:
        super().__init__(message)
        self.evidence = evidence


@dataclass(frozen=True)
class ReferenceMaps:
    """ort-fp32 on the evidence images: their input ``tensors``, its semantic ``labels`` and ``decisive`` pixels."""

    tensors: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray, ...]
    decisive: tuple[np.ndarray, ...]


def scene_size(config: BundleConfig) -> tuple[int, int]:
    """``(height, width)`` of the generated evidence scenes of ``config``'s bundle."""
    return figures.size_for(config.preprocess.resize, config.preprocess.canvas, MULTI_HUMAN_SCENE)


def evidence_tensors(predictor: Predictor) -> list[np.ndarray]:
    """The graph inputs of the evidence images: the golden image, then the scenes; BundleError without golden."""
    h, w = scene_size(predictor.config)
    images = [figures.scene(seed, h, w, task=predictor.config.task).image for seed in SCENE_SEEDS]
    return [predictor.golden_input(), *(predictor.prepare(rgb).tensor for rgb in images)]


def margin_of(config: BundleConfig) -> float:
    """The decisive margin the bundle declares, else ``agreement.DECISIVE_MARGIN``."""
    declared = config.plans.decisive_margin
    return DECISIVE_MARGIN if declared is None else declared


def reference_maps(reference: Predictor) -> ReferenceMaps:
    """Run ort-fp32's predictor ``reference`` on every evidence image."""
    tensors = evidence_tensors(reference)
    margin = margin_of(reference.config)
    labels, where = [], []
    for tensor in tensors:
        scores = semantic_scores(*reference.run(tensor))
        labels.append(scores.argmax(1)[0])
        where.append(decisive(scores, margin)[0])
    return ReferenceMaps(tuple(tensors), tuple(labels), tuple(where))


def _pooled(maps: tuple[np.ndarray, ...] | list[np.ndarray]) -> np.ndarray:
    return np.concatenate([m.ravel() for m in maps])


def _base(ref: ReferenceMaps, config: BundleConfig) -> tuple[Evidence, list[str]]:
    """The evidence's size and what it lacks (empty: enough)."""
    plans = config.plans
    where = _pooled(ref.decisive)
    on_decisive = np.bincount(_pooled(ref.labels)[where], minlength=len(config.classes))
    classes = int((on_decisive >= plans.min_class_pixels).sum())
    evidence = Evidence(len(ref.labels), int(where.sum()), classes)
    lacks = []
    if evidence.classes < plans.min_classes:
        lacks.append(f"{evidence.classes} class{'' if evidence.classes == 1 else 'es'} on decisive pixels "
                     f"(need {plans.min_classes}, each on {plans.min_class_pixels} pixels)")
    if evidence.decisive_pixels < plans.min_decisive_pixels:
        lacks.append(f"{evidence.decisive_pixels} decisive pixels (need {plans.min_decisive_pixels})")
    return evidence, lacks


def _images(evidence: Evidence) -> str:
    return f"{evidence.images} evidence images (the golden sample and {evidence.images - 1} scenes)"


def _too_little(evidence: Evidence, lacks: list[str]) -> PlanRefused:
    return PlanRefused(f"not served: too little evidence: {'; '.join(lacks)}, ort-fp32 on {_images(evidence)}",
                       evidence)


def too_little(ref: ReferenceMaps, config: BundleConfig) -> PlanRefused | None:
    """The refusal of every plan when ort-fp32's maps hold too little evidence to judge one, else None."""
    evidence, lacks = _base(ref, config)
    return _too_little(evidence, lacks) if lacks else None


def candidate_labels(candidate: Predictor, ref: ReferenceMaps) -> list[np.ndarray]:
    """The candidate's semantic labels on ort-fp32's evidence inputs."""
    return [semantic_labels(*candidate.run(tensor))[0] for tensor in ref.tensors]


def judge(ref: ReferenceMaps, labels: list[np.ndarray], config: BundleConfig) -> Evidence:
    """The candidate's ``labels`` against ort-fp32's: its :class:`Evidence`, or :class:`PlanRefused` naming the
    figures (too little evidence, a label map of another size, a floor missed)."""
    base, lacks = _base(ref, config)
    if lacks:
        raise _too_little(base, lacks)
    plans = config.plans
    for i, (mine, theirs) in enumerate(zip(ref.labels, labels, strict=True)):
        if mine.shape != theirs.shape:
            raise PlanRefused(f"refused: semantic map {theirs.shape} vs ort-fp32's {mine.shape} on evidence "
                              f"image {i}", base)
    ours, theirs = _pooled(ref.labels), _pooled(labels)
    share = agreement_on(ours, theirs, _pooled(ref.decisive))
    differ = base.decisive_pixels - round(share * base.decisive_pixels)
    agreement = round(share, 6)
    ious = [c for c in by_class_name(ours, config.classes, theirs, config.classes)["classes"]
            if c["pixels_a"] >= plans.min_class_pixels]
    worst = min(ious, key=lambda c: c["iou"]) if ious else None
    evidence = Evidence(base.images, base.decisive_pixels, base.classes, agreement,
                        None if worst is None else worst["iou"], None if worst is None else worst["class"])
    failed = []
    if share < plans.min_decisive_agreement:
        failed.append(f"labels differ on {differ} of {base.decisive_pixels} decisive pixels ({100 * share:.3f}% "
                      f"agree, need {100 * plans.min_decisive_agreement:.3f}%)")
    if worst is not None and worst["iou"] < plans.min_class_iou:
        failed.append(f"class IoU {worst['iou']:.3f} for {worst['class']} (need {plans.min_class_iou:.3f} for "
                      f"each of {len(ious)} classes)")
    if failed:
        raise PlanRefused(f"refused against ort-fp32 on {_images(base)}: {'; '.join(failed)}", evidence)
    return evidence
