"""The machine and the software the numbers were measured with, and the box's SGEMM rate.

SGEMM GFLOP/s = 2·n³ / seconds for an n×n float32 matmul on all cores, best of N, measured three
ways: numpy (its BLAS), onnxruntime (one MatMul node, intra-op threads = cores) and torch.mm. The
best of the three is the "peak" that the forward benchmark's achieved GFLOP/s is compared with.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from m2fpkit.runtime import cpu

from .common import REPO, Mode, log, run_child, write_json

PACKAGES = ("numpy", "onnxruntime", "onnx", "onnxscript", "torch", "modelscope", "opencv-python-headless",
            "pillow", "aiohttp", "matplotlib", "psutil")


def cpu_info() -> dict:
    """The runtime's own CPU detection (what plans are chosen by) plus the box's memory."""
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    info = cpu.detect().to_dict()
    return {**info, "logical_cpus": os.cpu_count(), "memory_gb": round(mem / 2**30, 1), "key": cpu.detect().key}


def cpu_slug(model: str, flags: set[str] | frozenset[str]) -> str:
    """Results folder of a CPU: its model name lower-cased, non-alphanumerics → '-', plus its vector class
    (``-amx``, ``-avx512``, ``-avx2``; nothing below AVX2). ``flags``: /proc/cpuinfo flag names."""
    name = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-") or "unknown-cpu"
    cls = next((c for c, f in (("amx", "amx_tile"), ("avx512", "avx512f"), ("avx2", "avx2")) if f in flags), None)
    return f"{name}-{cls}" if cls else name


def this_cpu_slug() -> str:
    info = cpu.detect()
    return cpu_slug(info.model, info.flags)


def recorded_cpu_slug(results: dict) -> str:
    """The slug of the CPU a results JSON recorded in ``env.cpu`` (KeyError if it recorded none)."""
    c = results["env"]["cpu"]
    return cpu_slug(c["model"], {f for f, on in c.get("flags", {}).items() if on})


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def git_state() -> dict:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def describe() -> dict:
    """Everything but the SGEMM measurement (cheap; the parent process calls this)."""
    return {
        "date": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "host": platform.node(), "kernel": platform.release(), "platform": platform.platform(),
        "cpu": cpu_info(), "versions": versions(), "git": git_state(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


# ---------------------------------------------------------------------------------------- SGEMM

#: best CPU-seconds of the last measurement, per method (the wall-clock rate suffers when other
#: processes share the cores; GFLOP per CPU-second does much less)
LAST_CPU: dict[str, float] = {}


def _best(fn, repeats: int, key: str = "") -> float:
    from .common import cpu_seconds

    fn()
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), cpu_seconds()
        fn()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, cpu_seconds() - c0)
    LAST_CPU[key] = best_cpu
    return best


def sgemm_numpy(n: int, repeats: int) -> float:
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), np.float32)
    return 2 * n**3 / _best(lambda: np.matmul(a, b, out=out), repeats, "numpy") / 1e9


def sgemm_onnxruntime(n: int, repeats: int, threads: int) -> float:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "sgemm",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
                          [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.log_severity_level = 3
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")  # CPU time = work, not spinning
    sess = ort.InferenceSession(model.SerializeToString(), o, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    return 2 * n**3 / _best(lambda: sess.run(None, feeds), repeats, "onnxruntime") / 1e9


def sgemm_torch(n: int, repeats: int, threads: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    return 2 * n**3 / _best(lambda: torch.mm(a, b, out=out), repeats, "torch") / 1e9


def sgemm(n: int = 2048, repeats: int = 5, with_torch: bool = True) -> dict:
    """SGEMM GFLOP/s three ways, all cores, best of ``repeats``; ``peak`` is the best of them."""
    cores = cpu_info()["cores"]
    res = {"n": n, "repeats": repeats, "threads": cores,
           "numpy": round(sgemm_numpy(n, repeats), 1),
           "onnxruntime": round(sgemm_onnxruntime(n, repeats, cores), 1)}
    t = sgemm_torch(n, repeats, cores) if with_torch else None
    res["torch"] = None if t is None else round(t, 1)
    res["peak"] = max(v for k, v in res.items() if k in ("numpy", "onnxruntime", "torch") and v)
    per_cpu = {k: round(2 * n**3 / c / 1e9, 1) for k, c in LAST_CPU.items() if c > 0}
    res["per_cpu_second"] = per_cpu
    #: GFLOP per CPU-second of the best method: the per-core rate, robust to time-slicing by others
    res["peak_per_cpu_second"] = max(per_cpu.values()) if per_cpu else None
    return res


def library_threads() -> dict:
    out: dict = {}
    try:
        import numpy as np
        cfg = np.show_config(mode="dicts")
        out["numpy_blas"] = cfg.get("Build Dependencies", {}).get("blas", {}).get("name")
    except Exception:  # informative only
        pass
    if "torch" in sys.modules:
        import torch
        out["torch_threads"] = torch.get_num_threads()
        out["torch_mkldnn"] = bool(torch.backends.mkldnn.is_available())
    return out


# ------------------------------------------------------------------------------------------ run

def run(mode: Mode, out_dir: Path) -> dict:
    env = describe()
    n, reps = (768, 2) if mode.name == "quick" else (2048, 7)
    log(f"env: {env['cpu']['model']}, {env['cpu']['cores']} cores; measuring SGEMM (n={n}, best of {reps})")
    child = run_child("env", ["--n", n, "--repeats", reps, *(["--no-torch"] if mode.name == "quick" else [])],
                      out_dir / "tmp" / mode.name, label="env")
    env["sgemm_gflops"] = child["sgemm"]
    env["libraries"] = child["libraries"]
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true", help="skip torch.mm (saves the torch import)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if not a.child:
        print(json.dumps({**describe(), "sgemm_gflops": sgemm(a.n, a.repeats)}, indent=2))
        return 0
    write_json(a.json, {"sgemm": sgemm(a.n, a.repeats, with_torch=not a.no_torch), "libraries": library_threads()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
