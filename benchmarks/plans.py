"""Execution plans on this box: every plan of ``runtime.plans.PLANS`` on the multi-human bundle (with its
int8 variant), in one process.

Per plan: why it is unavailable (engine missing, CPU feature missing, no variant) or refused (fails to
build, or agrees with the golden sample below the bundle's floor — ``Planner.verify``, the runtime's
own rule), else its build seconds and golden agreement (final label map and semantic map, the
export's PyTorch fp32 reference). Then the forward on the 640×853 image's input tensor (864×640 for
the r101 bundle), the plans that built alternating run by run (rotating order): p50/p95 and the paired
speed-up over ``ort-fp32`` — a plan the golden check refused is timed too, to show what it would give
on a checkpoint where it verifies; the runtime never serves it. Last, what ``--plan auto`` chooses (a
``Planner`` with a fresh cache directory) and how long that load takes against a reload that finds the
cached decision.
This is where the agreement of every non-fp32 plan is published.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from . import bundles
from .common import Mode, log, ratio_summary, run_child, summary, test_jpeg, write_json

ROLE = "multi"
IMAGE = (640, 853)


def _child(bundle_dir: Path, repeats: int, timing_runs: int) -> dict:
    from m2fpkit.runtime import cpu, plans
    from m2fpkit.runtime.bundle import reader
    from m2fpkit.runtime.errors import BundleError
    from m2fpkit.runtime.planner import Planner, engine_versions
    from m2fpkit.runtime.session import SessionFactory

    content = reader.load(bundle_dir)
    factory = SessionFactory()
    planner = Planner(factory, plans.AUTO, cpu=cpu.detect(), timing_runs=timing_runs)
    out: dict = {"bundle": content.config.version, "cpu": cpu.detect().to_dict(),
                 "engines": engine_versions(), "min_agreement": content.config.plans.min_decisive_agreement,
                 "variants": sorted(content.config.plans.variants), "plans": {}}
    ready = {}
    for plan in plans.PLANS.values():
        entry: dict = {**plan.to_dict(), "variant": plan.variant, "needs": list(plan.needs)}
        out["plans"][plan.name] = entry
        why = planner.unavailable(plan, content)
        if why is not None:
            entry["unavailable"] = why
            log(f"plans: {plan.name} unavailable: {why}")
            continue
        try:
            t0 = time.perf_counter()
            predictor = planner.build(plan, content)
            entry["build_seconds"] = time.perf_counter() - t0
        except BundleError as exc:
            entry["refused"] = f"build failed: {exc}"
            log(f"plans: {plan.name} refused: {entry['refused']}")
            continue
        agreement = predictor.golden_agreement()
        if agreement is not None:
            entry["agreement"] = {"label": agreement.label, "semantic": agreement.semantic, "worst": agreement.worst}
        try:
            evidence = planner.verify(plan, predictor)[1]
            if evidence is not None:
                entry["evidence"] = evidence.to_dict()
        except BundleError as exc:
            entry["refused"] = str(exc)
            log(f"plans: {plan.name} refused: {exc}")
        ready[plan.name] = predictor  # a refused plan is timed too (what it would give), never served
        log(f"plans: {plan.name} built in {entry['build_seconds']:.1f} s, agreement {entry.get('agreement')}")

    if ready:
        any_pred = next(iter(ready.values()))
        tensor = any_pred.prepare(any_pred.decode(test_jpeg(*IMAGE))).tensor
        out["input_shape"] = list(tensor.shape)
        names = list(ready)
        for name in names:  # warm-up
            ready[name].run(tensor)
        times: dict[str, list[float]] = {n: [] for n in names}
        for i in range(repeats):
            for name in names[i % len(names):] + names[:i % len(names)]:
                t0 = time.perf_counter()
                ready[name].run(tensor)
                times[name].append(time.perf_counter() - t0)
        ref = times.get(plans.REFERENCE.name)
        for name in names:
            e = out["plans"][name]
            e["forward"] = summary(times[name])
            if ref is not None:
                e["speedup_vs_fp32"] = ratio_summary(ref, times[name])
            log(f"plans: {name} forward p50 {e['forward']['p50']:.3f} s")
        for p in ready.values():
            p.close()
        ready.clear()

    with tempfile.TemporaryDirectory(prefix="plan-cache-") as tmp:
        cache = Path(tmp)
        auto = Planner(factory, plans.AUTO, cache_dir=lambda: cache, cpu=cpu.detect(), timing_runs=timing_runs)
        t0 = time.perf_counter()
        first = auto.load(content)
        first_s = time.perf_counter() - t0
        choice = first.plan
        first.close()
        t0 = time.perf_counter()
        again = auto.load(content)
        again_s = time.perf_counter() - t0
        out["auto"] = {"chosen": choice.plan.name if choice else None,
                       "choice": choice.to_dict() if choice else None, "load_seconds": first_s,
                       "cached_reload_seconds": again_s,
                       "reload_used_cache": bool(again.plan and again.plan.cached),
                       "reload_chosen": again.plan.plan.name if again.plan else None}
        again.close()
    log(f"plans: auto chose {out['auto']['chosen']} in {first_s:.1f} s; cached reload {again_s:.1f} s")
    return out


def run(mode: Mode, out_dir: Path) -> dict:
    repeats = 2 if mode.name == "quick" else 7
    timing_runs = 1 if mode.name == "quick" else 3
    res = run_child("plans", ["--bundle", bundles.bundle_dir(mode.name, ROLE), "--repeats", repeats,
                              "--timing-runs", timing_runs], out_dir / "tmp" / mode.name, label="plans")
    res["image"] = f"{IMAGE[0]}x{IMAGE[1]}"
    res["repeats"] = repeats
    return res


def main(argv: list[str] | None = None) -> int:
    import logging

    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true", required=True)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--timing-runs", type=int, default=3)
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    write_json(a.json, _child(a.bundle, a.repeats, a.timing_runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
