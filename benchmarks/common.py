"""Shared by the benchmarks: mode parameters, statistics, test images, process measurements, subprocesses,
and bundles of another graph (built through the bundle writer, never sessions by hand).

Our side always runs through :class:`~m2fpkit.runtime.predictor.Predictor` (``Predictor.load`` and its
stages decode → prepare → run → postprocess → render, or ``predict``); the benchmarks never rebuild
that pipeline. Every benchmark module has ``run(mode, out_dir) -> dict`` (called by :mod:`benchmarks.run`) and
most also a ``child`` entry point run as ``python -m benchmarks.<module> --child ...`` so that a
measured system lives in a fresh process (clean peak RSS, its own thread settings).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m2fpkit.runtime.memory import smaps_rollup  # noqa: F401  (re-exported for the benchmarks)

if TYPE_CHECKING:
    from m2fpkit.runtime.bundle.reader import BundleContent

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mode:
    name: str
    #: e2e images, (width, height): portrait photos, as people are usually shot
    sizes: tuple[tuple[int, int], ...] = ((512, 512), (640, 853), (1080, 1920))
    e2e_repeats: int = 3
    warmup: int = 1
    #: forward benchmark images (width, height); the bundle's own preprocessing makes the input tensor
    #: (full: 640×640 and 864×640 for the multi-human r101 bundle)
    forward_images: tuple[tuple[int, int], ...] = ((512, 512), (640, 853))
    forward_repeats: int = 3
    options_repeats: int = 3
    calibration_images: int = 3
    server_levels: tuple[int, ...] = (1, 2, 4, 8)
    #: requests per concurrency level = max(min_requests, per_client × level)
    server_min_requests: int = 4
    server_per_client: int = 1
    direct_repeats: int = 5
    overload_seconds: float = 40.0
    memory_counts: tuple[int, ...] = (1, 2, 3)
    #: one fresh subprocess per (kind, settings, count); quick mode loads incrementally in one
    memory_fresh_each: bool = True
    leak_cycles: int = 20
    swaps: int = 20
    steady_seconds: float = 60.0
    swap_clients: int = 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MODES = {
    "quick": Mode(
        "quick", sizes=((192, 256), (240, 320), (360, 640)), e2e_repeats=2, warmup=0,
        forward_images=((256, 256), (256, 448)), forward_repeats=2, options_repeats=1, calibration_images=2,
        server_min_requests=1, server_per_client=1, direct_repeats=2, overload_seconds=2.0,
        memory_fresh_each=False, leak_cycles=5, swaps=3, steady_seconds=1.0, swap_clients=2),
    "full": Mode("full"),
}


# ----------------------------------------------------------------------------------- statistics

def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty sequence."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(xs: Sequence[float]) -> dict[str, float]:
    """n, median (= p50), p95, p99, min, max and the spread (IQR and max-min relative to the median)."""
    xs = [float(x) for x in xs]
    if not xs:
        return {"n": 0}
    med = statistics.median(xs)
    iqr = percentile(xs, 75) - percentile(xs, 25)
    return {"n": len(xs), "p50": med, "p95": percentile(xs, 95), "p99": percentile(xs, 99),
            "min": min(xs), "max": max(xs), "mean": statistics.fmean(xs), "iqr": iqr,
            "spread_pct": 100.0 * (max(xs) - min(xs)) / med if med else 0.0}


def ratio(a: dict, b: dict, key: str = "p50") -> float | None:
    """a[key] / b[key] (e.g. ModelScope latency / ours), None if either is missing."""
    try:
        return a[key] / b[key] if b[key] else None
    except (KeyError, TypeError):
        return None


def ratio_summary(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """Ratios of paired runs xs[i]/ys[i] (interleaved measurements): median and min-max."""
    rs = [x / y for x, y in zip(xs, ys) if y]
    return summary(rs)


# ---------------------------------------------------------------------------------------- images

def person_image(width: int, height: int, seed: int = 0, people: int = 2):
    """A synthetic but structured RGB photo: gradient background, textured floor, 'people' made of
    a head, torso, arms and legs in different colours, plus JPEG-like fine texture (uint8 HxWx3)."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bg = np.stack([120 + 80 * np.sin(xx / width * 3.1 + seed), 140 + 60 * np.cos(yy / height * 2.3),
                   160 + 50 * np.sin((xx + yy) / (width + height) * 5.0)], -1)
    img = np.clip(bg, 0, 255).astype(np.uint8)
    floor = int(height * 0.8)
    img[floor:] = (img[floor:] * 0.6 + rng.integers(0, 60, (height - floor, width, 1))).clip(0, 255).astype(np.uint8)
    for p in range(people):
        cx = int(width * (p + 1) / (people + 1) + rng.integers(-width // 12, width // 12 + 1))
        s = height / 8.0 * rng.uniform(0.85, 1.1)
        top = int(height * 0.12 + rng.integers(0, max(1, height // 20)))
        skin = tuple(int(c) for c in rng.integers(150, 230, 3))
        shirt = tuple(int(c) for c in rng.integers(0, 255, 3))
        pants = tuple(int(c) for c in rng.integers(0, 120, 3))
        cv2.ellipse(img, (cx, int(top + s * 0.5)), (int(s * 0.38), int(s * 0.5)), 0, 0, 360, skin, -1)  # head
        cv2.ellipse(img, (cx, int(top + s * 0.3)), (int(s * 0.4), int(s * 0.25)), 0, 180, 360, (40, 30, 20), -1)  # hair
        torso = np.array([[cx - s * 0.6, top + s * 1.1], [cx + s * 0.6, top + s * 1.1],
                          [cx + s * 0.5, top + s * 3.2], [cx - s * 0.5, top + s * 3.2]], np.int32)
        cv2.fillPoly(img, [torso], shirt)
        for side in (-1, 1):
            cv2.line(img, (int(cx + side * s * 0.6), int(top + s * 1.3)),
                     (int(cx + side * s * 1.0), int(top + s * 2.9)), skin, max(2, int(s * 0.22)))
            cv2.line(img, (int(cx + side * s * 0.25), int(top + s * 3.2)),
                     (int(cx + side * s * 0.35), int(top + s * 5.6)), pants, max(2, int(s * 0.3)))
            cv2.ellipse(img, (int(cx + side * s * 0.4), int(top + s * 5.7)), (int(s * 0.25), int(s * 0.12)), 0, 0, 360,
                        (20, 20, 20), -1)
    noise = rng.normal(0, 6, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def jpeg_bytes(rgb, quality: int = 90) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def test_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    return jpeg_bytes(person_image(width, height, seed))


# ------------------------------------------------------------------------ bundles of another graph

def graph_bundle(root: Path, base: BundleContent, what: str, write_graph: Callable[[Path], None]) -> Path:
    """``base``'s bundle around another graph, published by the bundle writer under ``root``; its directory.

    ``write_graph(path)`` saves the graph at ``path`` (the config's model file), with at most one
    external data file beside it; the writer indexes those tensors, hashes, verifies and publishes.
    The version keeps ``base``'s name (the graph's metadata must match config.json) in a store of its
    own. A bundle already there is reused while it verifies and was built from the same ``base`` content.
    """
    import dataclasses

    from m2fpkit.export.weights_index import external_tensors
    from m2fpkit.runtime.bundle import reader, writer
    from m2fpkit.runtime.bundle.store import BundleStore
    from m2fpkit.runtime.errors import BundleError

    cfg = base.config
    store = BundleStore(root)
    source = {"kind": "benchmark-graph", "uri": f"{cfg.version}:{what}", "base_identity": base.info.identity}
    try:
        if reader.inspect(store.path(cfg.version)).config.source == source:
            return store.path(cfg.version)
    except BundleError:
        pass  # missing, stale or damaged: build it
    config = dataclasses.replace(cfg, weights_index=None, golden=None, parity={}, source=source,
                                 notes=f"benchmarks: {cfg.version} with its graph replaced ({what})")
    with writer.stage(store, cfg.version, force=True) as staged:
        model = staged.dir / cfg.model_file
        write_graph(model)
        data_file, tensors = external_tensors(model)
        staged.finish(config, tensors=tensors or None, data_file=data_file)
    return store.path(cfg.version)


# ------------------------------------------------------------------------------ process readings

def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM … in bytes from /proc/<pid>/status."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                parts = v.split()
                if len(parts) == 2 and parts[1] == "kB":
                    out[k] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to clear_refs); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mb(n: float | int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


class Timer:
    """Wall and CPU seconds of a block."""

    def __enter__(self) -> Timer:
        self.t0, self.c0 = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = cpu_seconds() - self.c0


def measure(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[dict, dict, Any]:
    """Run ``fn`` warmup + repeats times: (wall summary, cpu summary, last result)."""
    result = None
    for _ in range(warmup):
        result = fn()
    walls, cpus = [], []
    for _ in range(repeats):
        with Timer() as t:
            result = fn()
        walls.append(t.wall)
        cpus.append(t.cpu)
    return summary(walls), summary(cpus), result


# -------------------------------------------------------------------------------- subprocesses

def child_env(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads:
        for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[k] = str(threads)
    env.setdefault("TORCH_LOGS", "-all")
    return env


def run_child(module: str, args: Sequence[str], scratch: Path, timeout: float = 3600,
              label: str | None = None) -> dict:
    """``python -m benchmarks.<module> --child ... --json FILE``; returns the JSON it wrote.

    The child's stderr goes to ``scratch/<label>.log``; a failure raises with the log's tail.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    label = label or module
    out = scratch / f"{label}.json"
    log = scratch / f"{label}.log"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", f"benchmarks.{module}", "--child", *map(str, args), "--json", str(out)]
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    with open(log, "w") as lf:
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(), stdout=lf, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{label}: child exited {proc.returncode}:\n{tail}")
    data = json.loads(out.read_text())
    if isinstance(data, dict):  # how busy the box was: other processes share the cores
        data["_child"] = {"wall_seconds": round(time.perf_counter() - t0, 1),
                          "load_average_1min": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    return data


def run_all(jobs: Sequence[Callable[[], Any]], parallel: int = 1) -> list[Any]:
    """Run ``jobs`` (sequentially unless ``parallel`` > 1); a job's exception is returned, not raised.

    Quick mode runs independent child processes side by side: it asserts nothing about speed, and
    start-up time (imports) dominates its tiny runs. Full mode always measures one thing at a time.
    """
    def call(job):
        try:
            return job()
        except Exception as exc:  # reported by the caller next to the other results
            return exc
    if parallel <= 1:
        return [call(j) for j in jobs]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(call, jobs))


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_default) + "\n")
    tmp.replace(path)


def _default(x: Any) -> Any:
    try:
        import numpy as np
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:
        pass
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
