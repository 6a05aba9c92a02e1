"""The planner: which plan (``runtime.plans``) runs a version on this box, built and verified here.

Invariants:

* ``ort-fp32`` (onnxruntime on the bundle's main graph) is the reference: always a candidate, the
  fallback of every other plan, and what ``--plan fp32`` serves. It passes the golden self-test at the
  golden sample's own floor or the version fails, as it always has.
* Any other plan is served only on evidence (:mod:`.plan_evidence`): built here and run beside ``ort-fp32``
  on the golden image and generated scenes, its semantic labels agree with ort-fp32's on the pixels where
  ort-fp32 is decisive and its per-class IoU holds, at the floors of ``config.json → plans``. The evidence
  must be real: with too few decisive pixels or fewer than two classes on them (a random model that outputs
  one class everywhere) no plan is served but the reference, whatever it would agree, and none is built;
  nor when the golden label map is degenerate (one class, or no person pixel). ort-fp32's maps are computed
  once per load, by the reference predictor the load verified or else by one built for them: verifying
  another plan builds the reference too. A plan that is unavailable (engine not installed, CPU feature
  missing, no variant in the bundle, no or a degenerate golden sample), fails to build, has too little
  evidence or misses a floor is skipped with the reason logged and recorded — never served. Every verdict on
  evidence records its figures (images, decisive pixels, classes, agreement, worst class IoU and which class)
  in the plan's trial, which ``/api/versions``, ``/api/{v}/meta`` and the cache show and keep.
* ``auto`` walks the verified candidates in preference order (:data:`.plans.PLANS`) and races each against the
  current choice on the golden input, run by run in alternation (:meth:`Planner.race`): the box's speed
  drifts between runs, so only paired runs compare. The challenger displaces the choice when the median
  of its per-round time ratios is below 1 − :func:`.plans.margin`: :data:`.plans.TIE_MARGIN` on the same engine (the
  race's noise; both build alike) and :data:`.plans.ENGINE_MARGIN` on another one (OpenVINO compiles for 2-5 s
  at every start and hot swap, onnxruntime builds r101 in ~0.5 s). The decision is cached per (bundle
  content, CPU, threads, engine versions, candidate set, margins, verification rule) in the state directory;
  a restart builds only the cached plan (and the reference for its evidence) and re-verifies it (the
  verification run is also the warm-up).
* New content for a version that already serves (a hot swap) is served at once with the plan the
  previous content chose, if it verifies: ready after its verification instead of a full timing round. A
  plan's speed is the architecture's and the engine's, not the weights' (agreement is the weights', and every
  load verifies it), so when the previous choice was made on this box among the same candidates with the
  same engines and margins, and every one of them verified and raced (a plan refused on its evidence
  for the old weights may pass for the new ones, and be faster), the choice is cached for the new content
  too: a restart after a rollout builds only that plan (and the reference for its evidence). Otherwise the
  next start times the candidates again.
* The cache (:mod:`.plan_cache`) keeps the most recently used decisions and drops one whose data does not
  check out (evidence included); the plan a cache names is verified again like any other, on fresh evidence.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort

from . import cpu as cpu_mod
from . import openvino_engine
from .bundle.reader import BundleContent
from .errors import BundleError
from .plan_cache import PlanCache, reason
from .plan_evidence import Evidence, PlanRefused, ReferenceMaps, candidate_labels, judge, reference_maps, too_little
from .plans import AUTO, ENGINE_MARGIN, PLANS, REFERENCE, TIE_MARGIN, Plan, PlanChoice, margin, normalise_mode
from .predictor import Predictor
from .session import SessionFactory

log = logging.getLogger(__name__)


#: recorded in every cache key: decisions made under another verification rule are not reused
VERIFICATION = "evidence vs ort-fp32"


def engine_versions() -> dict[str, str]:
    out = {"onnxruntime": ort.__version__}
    if openvino_engine.available() is None:
        out["openvino"] = openvino_engine.version()
    return out


class Planner:
    """Builds the predictor of a version with the plan ``mode`` asks for (see the module docstring)."""

    def __init__(self, factory: SessionFactory, mode: str = AUTO, *,
                 cache_dir: Callable[[], Path | None] = lambda: None, cpu: cpu_mod.CpuInfo | None = None,
                 timing_runs: int = 3, forward_gate: contextlib.AbstractContextManager[Any] | None = None) -> None:
        self.factory = factory
        #: given to every predictor built here: verification and timing forwards take it like served ones
        self.forward_gate = forward_gate
        self.mode = normalise_mode(mode)
        self.cache_dir = cache_dir
        self.cache = PlanCache(cache_dir)
        self.cpu = cpu or cpu_mod.detect()
        self.timing_runs = max(1, timing_runs)
        #: version → the plan its current content serves with (auto mode), the cache key of that decision minus
        #: the content, and whether every candidate verified: the first guess for new content (see the module
        #: docstring for when it is cached for the new content too)
        self._serving: dict[str, tuple[Plan, dict[str, Any], bool]] = {}

    # --------------------------------------------------------------------------------- candidates
    def unavailable(self, plan: Plan, content: BundleContent) -> str | None:
        """Why ``plan`` cannot run this bundle on this box, or None."""
        if plan.variant is not None:
            variant = content.config.plans.variants.get(plan.variant)
            if variant is None:
                return f"the bundle ships no {plan.variant} variant (m2fp-export --int8)"
            if variant.model_file not in content.files:
                return f"variant graph {variant.model_file} is not a verified graph file of the bundle"
        missing = [n for n in plan.needs if not self.cpu.has(n)]
        if missing:
            return f"this CPU ({self.cpu.model}) lacks {', '.join(missing)}"
        if plan is not REFERENCE and not content.config.golden:
            return "the bundle has no golden sample to verify the plan against"
        degenerate = _golden_degenerate(content) if plan is not REFERENCE else None
        if degenerate is not None:
            return f"the golden sample is degenerate ({degenerate}): it cannot certify a plan"
        return openvino_engine.available() if plan.engine == "openvino" else None

    def candidates(self, content: BundleContent) -> tuple[list[Plan], dict[str, dict[str, Any]]]:
        """Plans to try (the reference always among them) and those skipped with their reasons."""
        wanted = list(PLANS.values()) if self.mode == AUTO else [PLANS[self.mode]]
        viable, skipped = [], {}
        for plan in wanted:
            why = self.unavailable(plan, content)
            if why is None:
                viable.append(plan)
            else:
                skipped[plan.name] = {"skipped": reason(why)}
                (log.warning if self.mode == plan.name else log.info)(
                    "%s: plan %s skipped: %s", content.config.version, plan.name, why)
        if REFERENCE not in viable:
            viable.append(REFERENCE)
        return viable, skipped

    # ----------------------------------------------------------------------------------- building
    def build(self, plan: Plan, content: BundleContent) -> Predictor:
        """The predictor of ``plan`` (graph ⇄ config checked); BundleError if the engine cannot build it."""
        model_file = content.config.plans.variants[plan.variant].model_file if plan.variant else None
        if plan.engine == "onnxruntime":
            session: Any = self.factory.create(content, model_file, plan.optimization)
        else:
            session = openvino_engine.OpenVINOSession(content, model_file or content.config.model_file,
                                                      plan.precision, self.factory.settings.threads())
        return Predictor.with_session(content, session, self.forward_gate)

    def verify(self, plan: Plan, predictor: Predictor,
               baseline: Baseline | None = None) -> tuple[float | None, Evidence | None]:
        """``predictor``'s agreement and evidence: the reference's golden self-test (no evidence), another plan's
        agreement with ort-fp32 on its evidence (``baseline``: ort-fp32's maps, else computed here); BundleError
        (:class:`.plan_evidence.PlanRefused` with the figures) when ``plan`` may not serve."""
        if plan is REFERENCE:
            return predictor.self_test(), None
        if not predictor.config.golden:  # unavailable() keeps such plans out; never serve one unverified
            raise BundleError(f"{plan.name}: no golden sample to verify against")
        maps = (baseline or Baseline(self, predictor.content)).maps()
        evidence = judge(maps, candidate_labels(predictor, maps), predictor.config)
        return evidence.agreement, evidence

    def time_run(self, predictor: Predictor, tensor: Any) -> float:
        """Seconds of one forward of ``predictor`` on ``tensor``."""
        t0 = time.perf_counter()
        predictor.run(tensor)
        return time.perf_counter() - t0

    def race(self, current: Predictor, challenger: Predictor) -> tuple[float, float, float]:
        """``timing_runs`` rounds of one forward each on the golden input, alternating which runs first:
        (current's median seconds, challenger's median seconds, median of the rounds' challenger / current).

        The challenger's first run after its verification is not timed: a new session still settles in it
        (a second run takes ~90 k page faults at r101 sizes, later runs none)."""
        tensor = current.golden_input()
        challenger.run(tensor)
        mine: list[float] = []
        theirs: list[float] = []
        for i in range(self.timing_runs):
            if i % 2:
                theirs.append(self.time_run(challenger, tensor))
                mine.append(self.time_run(current, tensor))
            else:
                mine.append(self.time_run(current, tensor))
                theirs.append(self.time_run(challenger, tensor))
        ratio = statistics.median(t / m for m, t in zip(mine, theirs))
        return statistics.median(mine), statistics.median(theirs), ratio

    # ------------------------------------------------------------------------------------- choice
    def load(self, content: BundleContent) -> Predictor:
        """The predictor of the plan this box should serve, with ``predictor.plan`` set.

        A named plan is built and verified alone (with the reference for its evidence; the reference serves if
        it is refused); ``auto`` tries every candidate, or only the cached choice when the cache holds one that
        still verifies.
        """
        viable, trials = self.candidates(content)
        baseline = Baseline(self, content)
        if self.mode != AUTO:
            return self._first_verified(content, viable, trials, baseline)
        key = self._cache_key(content, viable)
        cached = self.cache.read(key, viable, content.config.classes) if len(viable) > 1 else None
        if cached is not None:
            plan, recorded = cached
            try:
                predictor, agreement, evidence = self._verified(plan, content, baseline)
            except BundleError as exc:
                log.warning("%s: cached plan %s no longer verifies (%s); choosing again",
                            content.config.version, plan.name, exc)
            else:
                timed = recorded[plan.name].get("forward_seconds")
                return self._serve(predictor, plan, agreement, evidence, timed if isinstance(timed, float) else None,
                                   True, recorded, "cache", (key, _none_refused(recorded, viable)))
        previous, decided_under, complete = self._serving.get(content.config.version, (None, None, False))
        if previous is not None and previous in viable and len(viable) > 1:
            try:
                predictor, agreement, evidence = self._verified(previous, content, baseline)
            except BundleError:
                pass  # logged; choose among all candidates
            else:
                trials[previous.name] = _trial(agreement, evidence)
                if complete and decided_under == _beyond_content(key):
                    self.cache.write(key, previous, trials)
                return self._serve(predictor, previous, agreement, evidence, None, False, trials, "previous content",
                                   (key, complete))
        best: tuple[Predictor, Plan, float | None, Evidence | None] | None = None
        for plan in viable:
            try:
                predictor, agreement, evidence = self._verified(plan, content, baseline)
            except BundleError as exc:
                if plan is REFERENCE:
                    if best is not None:
                        best[0].close()
                    raise
                trials[plan.name] = _refusal(exc)
                continue
            trials[plan.name] = _trial(agreement, evidence)
            if best is None:
                best = (predictor, plan, agreement, evidence)
                continue
            mine, theirs, ratio = self.race(best[0], predictor)
            need = margin(best[1], plan)
            trials[best[1].name]["forward_seconds"] = mine
            trials[plan.name].update(forward_seconds=theirs, raced=best[1].name, time_ratio=ratio)
            won = ratio < 1 - need
            log.info("%s: plan %s raced %s: %.0f vs %.0f ms, time ratio %.3f (needs < %.3f): %s",
                     content.config.version, plan.name, best[1].name, 1000 * theirs, 1000 * mine, ratio,
                     1 - need, "displaces it" if won else "stays behind")
            if won:
                best[0].close()
                best = (predictor, plan, agreement, evidence)
            else:
                predictor.close()
        assert best is not None  # the reference either joined or raised
        predictor, plan, agreement, evidence = best
        if len(viable) > 1:
            self.cache.write(key, plan, trials)
        # the choice's median in its last race (None: never raced)
        return self._serve(predictor, plan, agreement, evidence, trials[plan.name]["forward_seconds"], False, trials,
                           "timed" if len(viable) > 1 else "only candidate", (key, _none_refused(trials, viable)))

    def _verified(self, plan: Plan, content: BundleContent,
                  baseline: Baseline) -> tuple[Predictor, float | None, Evidence | None]:
        """``plan``'s predictor, agreement and evidence; BundleError (predictor closed) if refused. A plan whose
        evidence would be too little is refused before it is built."""
        predictor = None
        try:
            if plan is not REFERENCE:
                refused = too_little(baseline.maps(), content.config)
                if refused is not None:
                    raise refused
            predictor = self.build(plan, content)
            agreement, evidence = self.verify(plan, predictor, baseline)
        except BundleError as exc:
            if predictor is not None:
                predictor.close()
            if plan is not REFERENCE:
                log.warning("%s: plan %s refused: %s", content.config.version, plan.name, exc)
            raise
        if plan is REFERENCE:
            baseline.reference = predictor
        if agreement is None:
            shown = "n/a (no golden sample)"
        elif evidence is None:
            shown = f"{100 * agreement:.2f}%"
        else:
            shown = f"{100 * agreement:.3f}% with ort-fp32 on decisive pixels, evidence {evidence.to_dict()}"
        log.info("%s: plan %s agrees %s", content.config.version, plan.name, shown)
        return predictor, agreement, evidence

    def _first_verified(self, content: BundleContent, viable: list[Plan], trials: dict[str, Any],
                        baseline: Baseline) -> Predictor:
        for plan in viable:  # the named plan, then the reference
            try:
                predictor, agreement, evidence = self._verified(plan, content, baseline)
            except BundleError as exc:
                if plan is REFERENCE:
                    raise
                trials[plan.name] = _refusal(exc)
                continue
            trials[plan.name] = _trial(agreement, evidence)
            return self._serve(predictor, plan, agreement, evidence, None, False, trials, "named")
        raise AssertionError("the reference plan is always a candidate")

    def _serve(self, predictor: Predictor, plan: Plan, agreement: float | None, evidence: Evidence | None,
               seconds: float | None, cached: bool, trials: dict[str, Any], basis: str,
               decision: tuple[dict[str, Any], bool] | None = None) -> Predictor:
        """``predictor`` with its :class:`PlanChoice`; ``decision`` (auto mode): the cache key it was decided
        under and whether every candidate verified, remembered for the version's next content."""
        mode = self.mode
        if mode != AUTO and plan.name != mode:
            log.warning("%s: plan %s asked for but not servable; serving %s", predictor.version, mode, plan.name)
        if decision is not None:
            key, complete = decision
            self._serving[predictor.version] = (plan, _beyond_content(key), complete)
        predictor.plan = PlanChoice(plan, mode, agreement, seconds, cached, self.cpu.model, dict(trials), basis,
                                    None if evidence is None else evidence.to_dict())
        log.info("%s: serving with plan %s (%s)", predictor.version, plan.name, basis)
        return predictor

    # -------------------------------------------------------------------------------------- cache
    def _cache_key(self, content: BundleContent, viable: list[Plan]) -> dict[str, Any]:
        return {"identity": content.info.identity, "cpu": self.cpu.key, "cpu_model": self.cpu.model,
                "threads": self.factory.settings.threads(), "engines": engine_versions(),
                "candidates": sorted(p.name for p in viable), "margins": [TIE_MARGIN, ENGINE_MARGIN],
                "timing": "paired", "verification": VERIFICATION}


def _beyond_content(key: dict[str, Any]) -> dict[str, Any]:
    """A decision's cache key without the bundle content: what a successor content's choice may inherit under."""
    return {k: v for k, v in key.items() if k != "identity"}


def _none_refused(trials: dict[str, Any], viable: list[Plan]) -> bool:
    """No candidate of a decision was refused on its evidence (or failed to build)."""
    return not any("skipped" in trials.get(plan.name, {}) for plan in viable)


def _trial(agreement: float | None, evidence: Evidence | None) -> dict[str, Any]:
    """A verified plan's trial entry (the race adds its figures)."""
    return {"agreement": agreement, "forward_seconds": None,
            **({} if evidence is None else {"evidence": evidence.to_dict()})}


def _refusal(exc: BundleError) -> dict[str, Any]:
    """A refused plan's trial entry: the reason, and the evidence it was judged on if it got that far."""
    evidence = {"evidence": exc.evidence.to_dict()} if isinstance(exc, PlanRefused) else {}
    return {"skipped": reason(str(exc)), **evidence}


def _golden_degenerate(content: BundleContent) -> str | None:
    """Why the golden label map cannot certify a plan (``bundle.golden_check``'s verdict), or None."""
    verdict = content.golden_verdict
    return verdict.reason if verdict is not None and verdict.degenerate else None


class Baseline:
    """ort-fp32's maps on the evidence images of one load, computed at most once: by the reference predictor
    the load verified (``reference``) while it is open, else by one built for them and closed after."""

    def __init__(self, planner: Planner, content: BundleContent) -> None:
        self.planner = planner
        self.content = content
        self.reference: Predictor | None = None
        self._maps: ReferenceMaps | None = None

    def maps(self) -> ReferenceMaps:
        if self._maps is None:
            reference = self.reference if self.reference is not None and self.reference.session is not None else None
            own = reference is None
            if reference is None:
                reference = self.planner.build(REFERENCE, self.content)
            try:
                self._maps = reference_maps(reference)
            finally:
                if own:
                    reference.close()
        return self._maps
