"""Grading a version on a labeled dataset, through the runtime path the server serves with.

Invariants: a version is loaded as the registry loads it — its bundle verified into memory against the trust
policy (``bundle.reader.load``), then the planner builds and verifies the plan asked for
(``Planner.load``: ``fp32`` is the reference and runs the golden self-test; another plan serves only on
evidence, else the reference does) — and every image passes through :meth:`Predictor.predict_rgb`'s stages
(prepare → run → postprocess). The plan a grade names is the one that actually ran. ``images_per_s`` counts
those stages only (reading and decoding the dataset's files is not the model's time).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bundle import reader
from ..bundle.signature import NO_KEYS, TrustPolicy
from ..bundle.store import BundleStore
from ..bundle.versions import is_version_name
from ..errors import BundleError
from ..planner import Planner
from ..plans import REFERENCE
from ..predictor import Predictor
from ..session import SessionFactory
from .dataset import Dataset
from .grades import DatasetRef, Grade
from .metrics import Confusion, Scores

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evaluation:
    """One version's scores on one dataset: what ``m2fp-eval`` reports and records."""

    version: str
    identity: str
    plan: str
    dataset: DatasetRef
    scores: Scores
    #: seconds spent in the predictor's stages over all images
    seconds: float
    #: unix time the evaluation finished
    at: float

    @property
    def images_per_s(self) -> float:
        return self.dataset.images / self.seconds if self.seconds > 0 else 0.0

    def grade(self) -> Grade:
        s = self.scores
        return Grade(version=self.version, identity=self.identity, plan=self.plan, dataset=self.dataset,
                     miou=s.miou, pixel_accuracy=s.pixel_accuracy, mean_class_accuracy=s.mean_class_accuracy,
                     per_class=dict(s.per_class), images_per_s=self.images_per_s, at=self.at)

    def to_json(self) -> dict[str, Any]:
        """``{"version", "plan", "dataset": {"name", "path", "images", "sha256"}, "miou", "pixel_accuracy",
        "mean_class_accuracy", "per_class": {name: IoU}, "identity", "images_per_s", "at", "pixels"}``."""
        return {**self.grade().to_json(), "pixels": self.scores.pixels}


def resolve(store: BundleStore, name: str) -> str:
    """The version ``name`` names: a version, or an alias of ``aliases.json``; BundleError otherwise."""
    if is_version_name(name):
        return name
    target = store.read_aliases().get(name)
    if target is None:
        raise BundleError(f"{name!r} is neither a version nor an alias of {store.dir}")
    return target


def load_predictor(bundles: Path, name: str, plan: str = REFERENCE.name, *, trust: TrustPolicy = NO_KEYS,
                   factory: SessionFactory | None = None) -> Predictor:
    """The predictor the server would serve ``name`` (a version or an alias) of the store at ``bundles`` with,
    under plan mode ``plan`` (``fp32``, a plan name or ``auto``); BundleError if it cannot be loaded."""
    store = BundleStore(bundles)
    version = resolve(store, name)
    path = store.path(version)
    if not path.is_dir():
        raise BundleError(f"{version} is not installed in {bundles}")
    return Planner(factory or SessionFactory(), plan).load(reader.load(path, trust))


def evaluate(predictor: Predictor, dataset: Dataset, progress: Callable[[int], None] = lambda _n: None) -> Evaluation:
    """Score ``predictor`` on every image of ``dataset``; ``progress(1)`` after each image. DatasetError for a
    file that turns out unusable (or changed since the dataset was opened)."""
    classes = predictor.config.classes
    confusion = Confusion(len(classes))
    seconds = 0.0
    for sample in dataset.samples(classes):
        t0 = time.perf_counter()
        prediction = predictor.predict_rgb(sample.rgb)
        seconds += time.perf_counter() - t0
        confusion.add(prediction.result.label_map, sample.label)
        progress(1)
    scores = confusion.scores(classes)
    log.info("%s (%s) on %s: mIoU %.4f over %d images", predictor.version, predictor.plan_name, dataset.name,
             scores.miou, len(dataset))
    return Evaluation(predictor.version, predictor.identity, predictor.plan_name, dataset.ref(), scores, seconds,
                      time.time())
