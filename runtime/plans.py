"""Execution plans: the engines, precisions and graphs a version can run with, and what serves it.

Invariants: :data:`PLANS` lists every plan the runtime knows in order of preference (the cheapest to build
first); ``ort-fp32`` (:data:`REFERENCE`: onnxruntime on the bundle's main graph) is always a candidate and
the fallback of every other plan. A later plan displaces an earlier one only when it is faster by
:func:`margin`. :class:`PlanChoice` is what a loaded version serves with and the evidence for it; how it is
chosen is :mod:`.planner`'s, where the decision is kept is :mod:`.plan_cache`'s. This module imports no
other part of the runtime.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Plan:
    name: str
    engine: str
    precision: str
    #: the bundle variant whose graph runs (None: the main graph)
    variant: str | None = None
    #: CPU features it needs (keys of ``cpu.FEATURES``)
    needs: tuple[str, ...] = ()
    #: onnxruntime graph optimisation level (None: the runtime settings'); "all" adds the NCHWc layout
    #: transformation (blocked convolutions for the box's vector width, decided at session creation)
    optimization: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "engine": self.engine, "precision": self.precision}


REFERENCE = Plan("ort-fp32", "onnxruntime", "fp32")
#: every plan the runtime knows, in order of preference (the cheapest to build first): a later plan must be
#: more than TIE_MARGIN faster than an earlier one to be served instead
PLANS: dict[str, Plan] = {p.name: p for p in (
    REFERENCE,
    Plan("ort-fp32-nchwc", "onnxruntime", "fp32", optimization="all"),
    Plan("ort-int8", "onnxruntime", "int8", variant="int8", needs=("vnni",)),
    Plan("ov-f32", "openvino", "f32"),
    Plan("ov-bf16", "openvino", "bf16", needs=("bf16",)),
    Plan("ov-int8", "openvino", "int8", variant="int8", needs=("vnni",)),
)}
#: how much faster (fraction of the current choice's forward time, paired) a later plan on the same engine
#: must be to displace it: below that the race cannot tell them apart
TIE_MARGIN = 0.02
#: the same for a plan on another engine than the current choice's: it costs more at every start and swap
ENGINE_MARGIN = 0.05
AUTO = "auto"
#: ``--plan`` values: auto, fp32 (= ort-fp32) or a plan's name
MODES = (AUTO, "fp32", *PLANS)
DEFAULT_MODE = AUTO
#: environment variable that overrides :data:`DEFAULT_MODE` for the library and ``m2fp-serve`` alike
ENV_PLAN = "M2FP_PLAN"


def margin(current: Plan, challenger: Plan) -> float:
    """How much faster ``challenger`` must be than ``current`` to displace it (see the module docstring)."""
    return TIE_MARGIN if challenger.engine == current.engine else ENGINE_MARGIN


def default_mode() -> str:
    """``$M2FP_PLAN`` if set, else :data:`DEFAULT_MODE` (``auto``)."""
    return os.environ.get(ENV_PLAN) or DEFAULT_MODE


def normalise_mode(mode: str) -> str:
    """``auto`` or a plan name; ValueError naming the known values otherwise."""
    if mode == "fp32":
        return REFERENCE.name
    if mode not in MODES:
        raise ValueError(f"unknown plan {mode!r} (known: {', '.join(MODES)})")
    return mode


@dataclass(frozen=True)
class PlanChoice:
    """What a loaded version serves with, and the evidence: what ``/api/versions`` and ``/meta`` show."""

    plan: Plan
    mode: str
    #: the reference: its golden-sample label-map agreement with the fp32 PyTorch reference; another plan: its
    #: semantic labels' agreement with ort-fp32 on ort-fp32's decisive pixels of its evidence (None: no golden)
    agreement: float | None
    #: median forward seconds on the golden input in its last race (None: not raced — a single verified candidate)
    forward_seconds: float | None
    #: the decision came from the plan cache (only the chosen plan was built, and the reference for its evidence)
    cached: bool
    cpu: str
    #: every candidate considered: {name: {"agreement", "forward_seconds"[, "evidence"][, "raced", "time_ratio"]}
    #: | {"skipped": reason[, "evidence"]}}; "evidence" (``plan_evidence.Evidence.to_dict``) for each plan judged
    #: against ort-fp32
    trials: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: how the plan was decided: "timed", "cache", "previous content", "named" or "only candidate"
    basis: str = "timed"
    #: the served plan's evidence, measured by this load (None: the reference, which the golden self-test verifies)
    evidence: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.plan.to_dict(), "mode": self.mode, "agreement": self.agreement, "evidence": self.evidence,
                "forward_seconds": self.forward_seconds, "cached": self.cached, "basis": self.basis,
                "cpu": self.cpu,
                "trials": self.trials}
