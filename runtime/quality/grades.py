"""Grades: each version's scores on a labeled dataset, kept in the state directory (bundles stay immutable
and signed, so a grade lives beside them, never inside).

One JSON file per grade, ``<state dir>/grades/<digest of its key>.json``, the key being (bundle identity,
dataset fingerprint, plan): a later evaluation of the same bundle on the same data with the same plan
replaces the earlier one. Invariants: only the :data:`GRADES_KEEP` most recently written grades are kept
(``recent.keep_most_recent``); :func:`record` writes atomically and only what :func:`load` accepts; a file
is read as untrusted data — a regular file (never a blocked read on a FIFO, never a symbolic link) of at
most :data:`MAX_BYTES`, exactly the keys :meth:`Grade.to_json` writes, every field checked — and one that
fails is skipped with a warning naming the file and the field. :func:`load` is blocking I/O: callers on an
event loop run it in a thread.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bundle import jsonfile
from ..bundle.atomic import write_atomic
from ..bundle.versions import is_version_name
from ..errors import MalformedFile
from ..plans import PLANS
from ..recent import keep_most_recent
from .metrics import MAX_CLASSES

log = logging.getLogger(__name__)

GRADES_DIR = "grades"
#: grades kept: the most recently written (~2 KB each)
GRADES_KEEP = 256
MAX_BYTES = 256 * 1024
#: longest dataset name, dataset path and class name a grade may hold; most classes
MAX_NAME, MAX_PATH, MAX_CLASS_NAME = 200, 4096, 100
#: most images a dataset may have; fastest plausible rate (images/s); latest plausible time (year ~5100)
MAX_IMAGES, MAX_RATE, MAX_AT = 10**8, 1e9, 1e11
KEYS = frozenset({"version", "identity", "plan", "dataset", "miou", "pixel_accuracy", "mean_class_accuracy",
                  "per_class", "images_per_s", "at"})
DATASET_KEYS = frozenset({"name", "path", "images", "sha256"})
#: a bundle identity (``bundle.reader.identity``): manifest SHA-256, ``-`` + 16 hex of the signature's if signed
_IDENTITY = re.compile(r"[0-9a-f]{64}(-[0-9a-f]{16})?")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class DatasetRef:
    """The dataset a grade was measured on: its name (default: the directory's name), the path it was read
    from, its number of images and its fingerprint (``dataset.Dataset.sha256``)."""

    name: str
    path: str
    images: int
    sha256: str


@dataclass(frozen=True)
class Grade:
    """One version's scores on one dataset with one plan; ratios in [0, 1], ``at`` the evaluation's unix time."""

    version: str
    identity: str
    plan: str
    dataset: DatasetRef
    miou: float
    pixel_accuracy: float
    mean_class_accuracy: float
    per_class: dict[str, float] = field(default_factory=dict)
    images_per_s: float = 0.0
    at: float = 0.0

    @property
    def key(self) -> tuple[str, str, str]:
        """What a grade replaces an earlier one by: (bundle identity, dataset fingerprint, plan)."""
        return (self.identity, self.dataset.sha256, self.plan)

    def brief(self) -> str:
        """One line for people: ``mIoU 0.71 on figures-val``."""
        return f"mIoU {self.miou:.2f} on {self.dataset.name}"

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version, "identity": self.identity, "plan": self.plan,
            "dataset": {"name": self.dataset.name, "path": self.dataset.path, "images": self.dataset.images,
                        "sha256": self.dataset.sha256},
            "miou": self.miou, "pixel_accuracy": self.pixel_accuracy,
            "mean_class_accuracy": self.mean_class_accuracy, "per_class": dict(self.per_class),
            "images_per_s": self.images_per_s, "at": self.at,
        }


# ------------------------------------------------------------------------------------------ checks
def _number(value: Any, low: float, high: float) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return low <= value <= high


def _text(value: Any, longest: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= longest and value.isprintable()


def _why_dataset(raw: Any) -> str | None:
    if not isinstance(raw, dict) or set(raw) != DATASET_KEYS:
        return f"dataset: expected an object of {', '.join(sorted(DATASET_KEYS))}"
    if not _text(raw["name"], MAX_NAME):
        return f"dataset → name: expected 1-{MAX_NAME} printable characters"
    if not _text(raw["path"], MAX_PATH):
        return f"dataset → path: expected 1-{MAX_PATH} printable characters"
    images = raw["images"]
    if isinstance(images, bool) or not isinstance(images, int) or not 1 <= images <= MAX_IMAGES:
        return f"dataset → images: expected an integer in 1..{MAX_IMAGES}"
    if not isinstance(raw["sha256"], str) or not _SHA256.fullmatch(raw["sha256"]):
        return "dataset → sha256: expected 64 lowercase hex digits"
    return None


def why_not(raw: Any) -> str | None:
    """Why ``raw`` is not a grade as :meth:`Grade.to_json` writes it (None: it is); the reason names the field."""
    if not isinstance(raw, dict) or set(raw) != KEYS:
        return f"expected an object of exactly {', '.join(sorted(KEYS))}"
    if not isinstance(raw["version"], str) or not is_version_name(raw["version"]):
        return "version: expected a version name such as v1.2"
    if not isinstance(raw["identity"], str) or not _IDENTITY.fullmatch(raw["identity"]):
        return "identity: expected a bundle identity (64 hex digits, '-' and 16 more if signed)"
    if not isinstance(raw["plan"], str) or raw["plan"] not in PLANS:
        return f"plan: expected one of {', '.join(PLANS)}"
    if (why := _why_dataset(raw["dataset"])) is not None:
        return why
    for key in ("miou", "pixel_accuracy", "mean_class_accuracy"):
        if not _number(raw[key], 0.0, 1.0):
            return f"{key}: expected a number in [0, 1]"
    per_class = raw["per_class"]
    if not isinstance(per_class, dict) or len(per_class) > MAX_CLASSES:
        return f"per_class: expected an object of at most {MAX_CLASSES} classes"
    for name, iou in per_class.items():
        if not _text(name, MAX_CLASS_NAME):
            return f"per_class → {jsonfile.brief(name, 40)}: expected a class name of 1-{MAX_CLASS_NAME} " \
                   "printable characters"
        if not _number(iou, 0.0, 1.0):
            return f"per_class → {jsonfile.brief(name, 40)}: expected a number in [0, 1]"
    if not _number(raw["images_per_s"], 0.0, MAX_RATE):
        return f"images_per_s: expected a number in [0, {MAX_RATE:.0e}]"
    if not _number(raw["at"], 0.0, MAX_AT):
        return f"at: expected a unix time in [0, {MAX_AT:.0e}]"
    return None


def parse(raw: Any, what: str) -> Grade:
    """The grade ``raw`` (parsed JSON of the file named ``what``) holds; MalformedFile naming the field otherwise."""
    why = why_not(raw)
    if why is not None:
        raise MalformedFile(what, why)
    d = raw["dataset"]
    return Grade(version=raw["version"], identity=raw["identity"], plan=raw["plan"],
                 dataset=DatasetRef(d["name"], d["path"], d["images"], d["sha256"]),
                 miou=float(raw["miou"]), pixel_accuracy=float(raw["pixel_accuracy"]),
                 mean_class_accuracy=float(raw["mean_class_accuracy"]),
                 per_class={k: float(v) for k, v in raw["per_class"].items()},
                 images_per_s=float(raw["images_per_s"]), at=float(raw["at"]))


# ------------------------------------------------------------------------------------------ store
def file_name(key: tuple[str, str, str]) -> str:
    """The file of the grade keyed ``key`` (:attr:`Grade.key`) in the grades directory."""
    return hashlib.sha256(jsonfile.dumps(list(key))).hexdigest()[:32] + ".json"


def record(state_dir: Path, grade: Grade) -> Path:
    """Write ``grade`` into ``state_dir/grades`` (replacing the one of the same key) and keep the
    :data:`GRADES_KEEP` newest; returns the file. ValueError naming the field if ``grade`` is not one
    :func:`load` would accept (nothing written); OSError passes through."""
    raw = grade.to_json()
    why = why_not(raw)
    if why is not None:
        raise ValueError(f"grade not recorded: {why}")
    folder = Path(state_dir) / GRADES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name(grade.key)
    write_atomic(path, jsonfile.dumps(raw))
    keep_most_recent(folder.glob("*.json"), GRADES_KEEP, lambda old: old.unlink(missing_ok=True))
    return path


def load(state_dir: Path) -> list[Grade]:
    """Every valid grade in ``state_dir/grades``, oldest evaluation first; never raises for a bad file or an
    unreadable directory (each is skipped with a warning). Blocking I/O."""
    folder = Path(state_dir) / GRADES_DIR
    try:
        with os.scandir(folder) as it:
            names = [e.name for e in it if e.name.endswith(".json") and not e.name.startswith(".")]
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("grades directory %s unreadable (%s); no grades", folder, exc.strerror or exc)
        return []
    grades = []
    for name in sorted(names):
        try:
            grade = parse(jsonfile.read(folder / name, f"grade {name}", max_bytes=MAX_BYTES, follow_links=False),
                          f"grade {name}")
        except FileNotFoundError:  # pruned meanwhile
            continue
        except (MalformedFile, OSError) as exc:
            log.warning("grade skipped: %s", exc)
            continue
        if file_name(grade.key) != name:
            log.warning("grade skipped: grade %s: identity, dataset → sha256 and plan are not the key the file is "
                        "named by", name)
            continue
        grades.append(grade)
    return sorted(grades, key=lambda g: (g.at, g.version, g.plan, g.dataset.sha256))


def for_identity(grades: Iterable[Grade], identity: str) -> list[Grade]:
    """The grades of the bundle whose identity is ``identity``, in the order given."""
    return [g for g in grades if g.identity == identity]
