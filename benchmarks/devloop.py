"""The developer loop: how long one tiny export takes, with and without its architecture in the graph cache.

Each run is the real command, ``m2fp-export VERSION --bundles <fresh dir>`` in its own process (start-up,
imports, trace or cache, optimisation, parity gate, golden sample, publish), timed from process start to
exit. ``cold``: an empty ``$M2FP_EXPORT_CACHE`` every run (the first export after a change of the export
code or of the architecture). ``cached``: the cache holds the architecture, traced by one untimed export
of another demo version (other weights), as for every later export of that architecture. Runs
alternate cold / cached. Goal: a tiny export ≤ 10 s.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from .common import REPO, Mode, child_env, log, summary

GOAL_SECONDS = 10.0
#: the demo's tiny multi-human versions without an int8 variant: same architecture, other seeds
TRACER, TIMED = "v1.0", "v2.0-beta"


def _export(version: str, bundles: Path, cache: Path) -> float:
    shutil.rmtree(bundles, ignore_errors=True)
    env = {**child_env(), "M2FP_EXPORT_CACHE": str(cache)}
    exe = Path(sys.executable).with_name("m2fp-export")
    t0 = time.perf_counter()
    proc = subprocess.run([str(exe), version, "--bundles", str(bundles)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"m2fp-export {version} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return seconds


def run(mode: Mode, out_dir: Path) -> dict:
    scratch = out_dir / "tmp" / mode.name / "devloop"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    repeats = 1 if mode.name == "quick" else 3
    warm = scratch / "cache-warm"
    _export(TRACER, scratch / "tracer", warm)  # untimed: puts the architecture in the cache
    cold: list[float] = []
    cached: list[float] = []
    for i in range(repeats):
        cold.append(_export(TIMED, scratch / "bundles", scratch / f"cache-cold-{i}"))
        cached.append(_export(TIMED, scratch / "bundles", warm))
        log(f"devloop: tiny export cold {cold[-1]:.1f} s, cached {cached[-1]:.1f} s")
    shutil.rmtree(scratch, ignore_errors=True)
    c, w = summary(cold), summary(cached)
    return {"version": TIMED, "repeats": repeats, "cold": c, "cached": w,
            "cold_over_cached": c["p50"] / w["p50"] if w.get("p50") else None, "goal_seconds": GOAL_SECONDS,
            "verdict": "met" if w["p50"] <= GOAL_SECONDS else "missed",
            "cold_verdict": "met" if c["p50"] <= GOAL_SECONDS else "missed"}
