"""Thread pools measured, not assumed: 1, 2 and 3 versions busy at once under three settings.

Versions: ``multi``, ``heads-1``, ``heads-2`` (same backbone, different heads). One client thread per
busy version loops ``Predictor.predict`` on the 640×853 JPEG for a fixed number of runs. Settings,
each in its own child process (onnxruntime's global pool is process-wide, so settings never mix):

- ``per-session``: default :class:`RuntimeSettings` (each session its own intra-op pool, all cores);
- ``global``: ``thread_pool="global"`` (one process-wide pool shared by every session);
- ``admission``: per-session pools, at most one parse at a time across versions (one shared
  ``threading.Semaphore(1)`` around ``predict``, what ``m2fp-serve --concurrency 1`` admission does:
  a client's latency includes its wait for the slot).

Reported per (setting, versions busy): throughput (images/s over the wall time of the whole cell) and
latency p50/p95 across all clients.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

from . import bundles
from .common import Mode, log, run_child, summary, test_jpeg, write_json

ROLES = ("multi", "heads-1", "heads-2")
SETTINGS = ("per-session", "global", "admission")


def _cell(predictors: list, data: bytes, runs: int,
          gate: threading.Semaphore | nullcontext) -> tuple[list[float], float]:
    """One client thread per predictor, all started together: (every call's latency, wall seconds)."""
    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(len(predictors) + 1)

    def client(p) -> None:
        start.wait()
        for _ in range(runs):
            t0 = time.perf_counter()
            with gate:
                p.predict(data)
            with lock:
                latencies.append(time.perf_counter() - t0)

    workers = [threading.Thread(target=client, args=(p,)) for p in predictors]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    return latencies, time.perf_counter() - t0


def _child(setting: str, dirs: list[Path], image: Path, runs: int) -> dict:
    from m2fpkit.runtime.predictor import Predictor
    from m2fpkit.runtime.session import RuntimeSettings, SessionFactory

    settings = RuntimeSettings(thread_pool="global" if setting == "global" else "per-session")
    factory = SessionFactory(settings)
    predictors = [Predictor.load(d, factory) for d in dirs]
    data = image.read_bytes()
    for p in predictors:  # warm-up
        p.predict(data)
    gate: threading.Semaphore | nullcontext = threading.Semaphore(1) if setting == "admission" else nullcontext()
    out: dict = {"setting": setting, "settings": str(settings), "threads": settings.threads(), "busy": {}}
    for busy in range(1, len(predictors) + 1):
        latencies, wall = _cell(predictors[:busy], data, runs, gate)
        out["busy"][str(busy)] = {"images": len(latencies), "wall_seconds": wall,
                                  "throughput_ips": len(latencies) / wall if wall else None,
                                  "latency": summary(latencies)}
        log(f"threads {setting}: {busy} busy → {len(latencies) / wall:.2f} img/s, "
            f"p50 {summary(latencies)['p50']:.3f} s")
    return out


def run(mode: Mode, out_dir: Path) -> dict:
    scratch = out_dir / "tmp" / mode.name / "threads"
    scratch.mkdir(parents=True, exist_ok=True)
    w, h = mode.sizes[1]
    image = scratch / f"{w}x{h}.jpg"
    image.write_bytes(test_jpeg(w, h, seed=1))
    runs = 2 if mode.name == "quick" else 4
    dirs = [str(bundles.bundle_dir(mode.name, r)) for r in ROLES]
    res: dict = {"image": f"{w}x{h}", "runs_per_client": runs,
                 "versions": [bundles.variants(mode.name)[r].version for r in ROLES], "settings": {}}
    for setting in SETTINGS:  # one at a time, each in a fresh process
        res["settings"][setting] = run_child("threads", ["--setting", setting, "--image", image, "--runs", runs,
                                                         *dirs], out_dir / "tmp" / mode.name,
                                             label=f"threads_{setting}")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true", required=True)
    ap.add_argument("--setting", choices=SETTINGS, required=True)
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("bundles", nargs="+", type=Path)
    a = ap.parse_args(argv)
    write_json(a.json, _child(a.setting, a.bundles, a.image, a.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
