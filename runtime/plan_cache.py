"""The plan cache: ``auto``'s decisions, kept in the state directory so a restart builds only the chosen plan.

One JSON file per decision, ``<state dir>/plans/<digest of its key>.json``: ``{"key", "chosen", "trials"}``.
The key holds what the decision depends on (bundle content, CPU, threads, engine versions, candidate set,
margins); the planner builds it. Invariants: only the :data:`CACHE_KEEP` most recently used decisions are
kept (a read counts as a use). The file is read as untrusted data — a regular file of at most
:data:`MAX_BYTES` (``bundle.regular``: never a blocked read on a FIFO), every field checked
(:func:`check_trials`: known plan names and keys, numbers in range, short printable strings, every
non-reference verdict with its evidence and the evidence's figures consistent) — and a
decision that fails any check is dropped with a warning naming the field: the plans are timed again.
The chosen plan itself is verified again by every load, whatever the cache says.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .bundle import jsonfile
from .bundle.atomic import write_atomic
from .errors import MalformedFile
from .plans import PLANS, REFERENCE, Plan
from .recent import keep_most_recent

log = logging.getLogger(__name__)

CACHE_DIR = "plans"
#: decisions kept in the cache: the most recently used (one per bundle content; ~2 KB each)
CACHE_KEEP = 64
MAX_BYTES = 256 * 1024
#: the longest reason a skipped plan's entry may give
MAX_REASON = 500
#: a plausible forward time (seconds) and challenger / current time ratio
MAX_SECONDS, MAX_RATIO = 3600.0, 1000.0
#: plausible evidence: images, decisive pixels, classes, and the longest class name it may name
MAX_IMAGES, MAX_PIXELS, MAX_CLASSES, MAX_CLASS_NAME = 64, 10**9, 1024, 100
EVIDENCE_KEYS = frozenset({"images", "decisive_pixels", "classes", "agreement", "worst_class_iou", "worst_class"})

Trials = dict[str, dict[str, Any]]


def reason(text: str) -> str:
    """A skipped plan's reason as it is recorded: one line of printable characters, at most :data:`MAX_REASON`."""
    line = " ".join("".join(c if c.isprintable() else " " for c in text).split()) or "refused"
    return line if len(line) <= MAX_REASON else line[:MAX_REASON - 1] + "…"


def _number(value: Any, low: float, high: float, *, low_open: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return (low < value if low_open else low <= value) and value <= high


def _count(value: Any, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= high


def check_evidence(evidence: Any, classes: Sequence[str] | None = None) -> str | None:
    """Why a recorded evidence (``plan_evidence.Evidence.to_dict``) is not one the planner writes (None: it is);
    ``classes``: the bundle's class names, one of which a worst class must be."""
    if not isinstance(evidence, dict) or set(evidence) != EVIDENCE_KEYS:
        return f"expected an object of {', '.join(sorted(EVIDENCE_KEYS))}"
    if not _count(evidence["images"], MAX_IMAGES) or not evidence["images"]:
        return f"images: expected an integer in 1..{MAX_IMAGES}"
    for key, high in (("decisive_pixels", MAX_PIXELS), ("classes", MAX_CLASSES)):
        if not _count(evidence[key], high):
            return f"{key}: expected an integer in 0..{high}"
    for key in ("agreement", "worst_class_iou"):
        if evidence[key] is not None and not _number(evidence[key], 0.0, 1.0):
            return f"{key}: expected null or a number in [0, 1]"
    name = evidence["worst_class"]
    if (name is None) != (evidence["worst_class_iou"] is None):
        return "worst_class: named exactly when worst_class_iou is measured"
    if name is not None and (not isinstance(name, str) or not 0 < len(name) <= MAX_CLASS_NAME
                             or not name.isprintable()):
        return f"worst_class: expected a class name of 1-{MAX_CLASS_NAME} printable characters"
    if name is not None and classes is not None and name not in classes:
        return "worst_class: not a class of the bundle"
    if evidence["worst_class_iou"] is not None and evidence["agreement"] is None:
        return "agreement: measured whenever a class IoU is"
    return None


def check_trials(trials: Any, classes: Sequence[str] | None = None) -> str | None:
    """Why a recorded ``trials`` table is not one the planner writes (None: it is): ``{plan name: {"skipped":
    reason[, "evidence"]} | {"agreement", "forward_seconds"[, "evidence"][, "raced", "time_ratio"]}}`` with
    numbers in range; a verified plan other than the reference has its evidence, whose agreement is the
    entry's, the reference none; ``classes``: the bundle's class names (see :func:`check_evidence`)."""
    if not isinstance(trials, dict):
        return "trials: expected an object"
    for name, entry in trials.items():
        where = f"trials → {jsonfile.brief(name, 40)}"
        if name not in PLANS:
            return f"{where}: not a plan name"
        if not isinstance(entry, dict):
            return f"{where}: expected an object"
        if "evidence" in entry and (why := check_evidence(entry["evidence"], classes)) is not None:
            return f"{where} → evidence: {why}"
        if "skipped" in entry:
            reason = entry["skipped"]
            if not set(entry) <= {"skipped", "evidence"}:
                return f"{where}: a skipped plan has only a reason (and its evidence)"
            if not isinstance(reason, str) or not 0 < len(reason) <= MAX_REASON or not reason.isprintable():
                return f"{where} → skipped: expected a reason of 1-{MAX_REASON} printable characters"
            continue
        unknown = set(entry) - {"agreement", "forward_seconds", "evidence", "raced", "time_ratio"}
        if unknown or "agreement" not in entry or "forward_seconds" not in entry:
            return f"{where}: expected agreement and forward_seconds (and evidence, raced, time_ratio), nothing else"
        if ("evidence" in entry) == (name == REFERENCE.name):
            return f"{where}: evidence is recorded for every plan but {REFERENCE.name}, and only for them"
        if "evidence" in entry and entry["evidence"]["agreement"] != entry["agreement"]:
            return f"{where} → agreement: not the agreement of its evidence"
        if entry["agreement"] is not None and not _number(entry["agreement"], 0.0, 1.0):
            return f"{where} → agreement: expected null or a number in [0, 1]"
        if entry["forward_seconds"] is not None and not _number(entry["forward_seconds"], 0.0, MAX_SECONDS,
                                                                low_open=True):
            return f"{where} → forward_seconds: expected null or a number in (0, {MAX_SECONDS:.0f}]"
        if "raced" in entry and entry["raced"] not in PLANS:
            return f"{where} → raced: not a plan name"
        if "time_ratio" in entry and not _number(entry["time_ratio"], 0.0, MAX_RATIO, low_open=True):
            return f"{where} → time_ratio: expected a number in (0, {MAX_RATIO:.0f}]"
    return None


class PlanCache:
    """Decisions under ``base()/plans`` (no cache while ``base()`` is None: no writable state directory)."""

    def __init__(self, base: Callable[[], Path | None]) -> None:
        self.base = base

    def file(self, key: dict[str, Any]) -> Path | None:
        base = self.base()
        if base is None:
            return None
        digest = hashlib.sha256(jsonfile.dumps(key)).hexdigest()[:32]
        return base / CACHE_DIR / f"{digest}.json"

    def read(self, key: dict[str, Any], viable: list[Plan],
             classes: Sequence[str] | None = None) -> tuple[Plan, Trials] | None:
        """The decision recorded under ``key`` among ``viable`` and its trials, or None (none, or dropped);
        ``classes``: the bundle's class names (see :func:`check_evidence`)."""
        path = self.file(key)
        if path is None:
            return None
        try:
            raw = jsonfile.read(path, f"plan cache {path.name}", max_bytes=MAX_BYTES, follow_links=False)
        except FileNotFoundError:
            return None
        except (MalformedFile, OSError) as exc:
            log.warning("plan cache %s unreadable (%s); choosing again", path.name, exc)
            return None
        if not isinstance(raw, dict) or set(raw) != {"key", "chosen", "trials"} or raw["key"] != key:
            log.warning("plan cache %s does not match this bundle and box; choosing again", path.name)
            return None
        chosen, trials = raw["chosen"], raw["trials"]
        why = check_trials(trials, classes)
        if why is None and (chosen not in {p.name for p in viable} or "skipped" in trials.get(chosen, {})):
            why = f"chosen: {jsonfile.brief(chosen, 40)} is not a candidate that verified"
        if why is not None:
            log.warning("plan cache %s dropped (%s); choosing again", path.name, why)
            return None
        with contextlib.suppress(OSError):  # recently used: kept by keep_most_recent (a read-only cache is still read)
            os.utime(path)
        recorded = dict(trials)
        recorded.setdefault(chosen, {"agreement": None, "forward_seconds": None})
        return PLANS[chosen], recorded

    def write(self, key: dict[str, Any], plan: Plan, trials: Trials) -> None:
        """Record a decision (a failure is logged: the next start times the plans again)."""
        path = self.file(key)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, jsonfile.dumps({"key": key, "chosen": plan.name, "trials": trials}))
            keep_most_recent(path.parent.glob("*.json"), CACHE_KEEP, lambda old: old.unlink(missing_ok=True))
        except OSError as exc:
            log.warning("plan cache not written (%s): the next start times the plans again", exc.strerror or exc)
