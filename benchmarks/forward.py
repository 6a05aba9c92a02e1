"""Forward only: PyTorch eager vs onnxruntime on the same graph and input, against the box's SGEMM rate.

One subprocess holds both: the PyTorch M2FP (built from the bundle's own source, so the weights are
the bundle's: the state-dict hash is checked) and the bundle loaded with ``Predictor.load`` and the
runtime's default settings. The input tensor of each size is what the bundle's own
``Predictor.prepare`` makes of a synthetic person image (``Mode.forward_images``); onnxruntime runs
through ``Predictor.run``, once with the runtime's settings (the ``ort-fp32`` reference) and once at
level ALL (the ``ort-fp32-nchwc`` plan, same content). Runs alternate (torch, ort, ort-nchwc, torch, …)
so all see the same load.

- MACs: a small ``TorchDispatchMode`` counter over one forward (convolutions, matmuls, bmm/einsum,
  attention; GridSample and elementwise ops are not counted), split by module.
- Achieved GFLOP/s = 2 × MACs / p50 seconds, as % of the SGEMM GFLOP/s measured in the same process
  just before (best of numpy / onnxruntime / torch, all cores).
- onnxruntime per-node profile of one run at the first size, from a second predictor on the same
  verified bundle content whose factory also turns on ``SessionOptions.enable_profiling``,
  aggregated by op type and by model part: the "where the time goes" table, with each op type's
  achieved GFLOP/s where its MACs are known (Conv; MatMul/Gemm/Einsum).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import bundles
from .common import Mode, Timer, log, run_child, summary, write_json

PARTS = (("backbone", "backbone"), ("sem_seg_head.pixel_decoder", "pixel decoder"),
         ("sem_seg_head.predictor", "transformer decoder"))
MATMUL_OPS = ("MatMul", "Gemm", "FusedMatMul", "Einsum", "MatMulNBits", "FusedGemm", "QLinearMatMul",
              "MatMulInteger", "DynamicQuantizeMatMul")
CONV_OPS = ("Conv", "FusedConv", "QLinearConv", "ConvInteger", "NchwcConv")

if TYPE_CHECKING:
    import numpy as np

    from m2fpkit.runtime.predictor import Predictor
    from m2fpkit.runtime.session import RuntimeSettings, SessionFactory


def input_tensor(pred: Predictor, width: int, height: int, seed: int = 0) -> np.ndarray:
    """The graph input ``pred.prepare`` makes of a ``width``×``height`` synthetic person image."""
    import numpy as np

    from .common import person_image
    return np.ascontiguousarray(pred.prepare(person_image(width, height, seed)).tensor)


def profiling_factory(settings: RuntimeSettings, prefix: str) -> SessionFactory:
    """A :class:`SessionFactory` with ``settings`` whose sessions also record onnxruntime's profile."""
    import onnxruntime as ort

    from m2fpkit.runtime.session import SessionFactory

    class ProfilingFactory(SessionFactory):
        def options(self, optimization: str | None = None) -> ort.SessionOptions:
            o = super().options(optimization)
            o.enable_profiling = True
            o.profile_file_prefix = prefix
            return o

    return ProfilingFactory(settings)


def count_macs(model, x) -> dict:
    """MACs of one forward, by aten op and by model part (a small TorchDispatchMode counter).

    Counts what ``torch.utils.flop_counter.FlopCounterMode`` counts for this model — convolutions,
    linear layers, matmuls, einsum and attention — without importing torch._dynamo (seconds of
    start-up in a fresh process); the totals agree with FlopCounterMode's.
    """
    import math

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten

    def macs_of(func, args, out) -> int:
        # under inference_mode the mode sees composite ops (conv2d, linear, einsum, sdpa) undecomposed
        op = func.overloadpacket
        if op in (aten.conv2d, aten.convolution):
            w = args[1]
            return out.numel() * (w.shape[1] * math.prod(w.shape[2:]))
        if op is aten.linear:
            return out.numel() * args[1].shape[1]
        if op in (aten.mm, aten.bmm, aten.matmul):
            return out.numel() * args[0].shape[-1]
        if op in (aten.addmm, aten.baddbmm):
            return out.numel() * args[1].shape[-1]
        if op is aten.einsum:
            eq, ops = args[0].replace(" ", ""), args[1]
            sizes: dict[str, int] = {}
            for spec, t in zip(eq.split("->")[0].split(","), ops):
                sizes.update(zip(spec, t.shape))
            return math.prod(sizes.values())
        if op is aten.scaled_dot_product_attention:
            q, k, v = args[0], args[1], args[2]
            return math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        return 0

    counts: dict[str, int] = {}
    parts: dict[str, int] = {label: 0 for _, label in PARTS}
    current: list[str] = []

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            m = macs_of(func, args, out)
            if m:
                key = f"aten.{func.overloadpacket.__name__}"
                counts[key] = counts.get(key, 0) + m
                if current:
                    parts[current[-1]] += m
            return out

    def enter(label: str):
        def hook(_module, _args) -> None:
            current.append(label)
        return hook

    def leave(_module, _args, _out) -> None:  # must return None: a value would replace the output
        current.pop()

    hooks = []
    for key, label in PARTS:
        mod = model.get_submodule(key)
        hooks.append(mod.register_forward_pre_hook(enter(label)))
        hooks.append(mod.register_forward_hook(leave))
    try:
        with torch.inference_mode(), Counter():
            model(torch.from_numpy(x))
    finally:
        for h in hooks:
            h.remove()
    return {"total": sum(counts.values()), "by_aten_op": counts, "by_part": parts}


def node_parts(model_bytes: bytes) -> dict[str, str]:
    """ONNX node name → model part, from the exporter's name scopes (graph only, no weights)."""
    import onnx

    m = onnx.load_model_from_string(model_bytes)
    out = {}
    for n in m.graph.node:
        scopes = next((p.value for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        out[n.name] = next((label for key, label in PARTS if key in scopes), "other")
    return out


def profile(pred: Predictor, x: np.ndarray, settings: RuntimeSettings) -> dict:
    """Per-node times of the last of three profiled runs, aggregated by op type and by model part.

    The profiled predictor is built from ``pred``'s verified content with the same ``settings``. A new
    session settles in its second run (its memory pattern is planned in the first; the first two runs
    take ~90 k page faults, later ones none), so two runs are warm-up.
    """
    from m2fpkit.runtime.predictor import Predictor

    prefix = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"m2fp_profile_{os.getpid()}")
    profiled = Predictor.from_content(pred.content, profiling_factory(settings, prefix))
    for _ in range(3):
        profiled.run(x)
    path = profiled.session.end_profiling()
    profiled.close()
    events = json.loads(Path(path).read_text())
    Path(path).unlink(missing_ok=True)
    runs = [e for e in events if e.get("name") == "model_run"]
    last = runs[-1]
    t0, t1 = last["ts"], last["ts"] + last["dur"]
    parts = node_parts(pred.content.model_bytes())
    by_op: dict[str, float] = {}
    by_part: dict[str, float] = {}
    count: dict[str, int] = {}
    nodes = []
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or not t0 <= e["ts"] <= t1:
            continue
        op = e.get("args", {}).get("op_name", "?")
        node = e["name"][: -len("_kernel_time")]
        dur = e["dur"] / 1e6
        by_op[op] = by_op.get(op, 0.0) + dur
        count[op] = count.get(op, 0) + 1
        part = parts.get(node, "other")
        by_part[part] = by_part.get(part, 0.0) + dur
        nodes.append((dur, node, op))
    total = sum(by_op.values())
    nodes.sort(reverse=True)
    return {
        "run_seconds": last["dur"] / 1e6, "kernel_seconds": total,
        "by_op": {k: {"seconds": v, "share": v / total, "nodes": count[k]}
                  for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
        "by_part": {k: {"seconds": v, "share": v / total} for k, v in sorted(by_part.items(), key=lambda kv: -kv[1])},
        "top_nodes": [{"node": n, "op": op, "seconds": d} for d, n, op in nodes[:15]],
    }


def _rates(wall: list[float], cpu: list[float], gflop: float, peak: dict) -> dict:
    """Latency and CPU-seconds of one system's runs, and its GFLOP/s against the SGEMM ``peak`` (wall-clock
    and per CPU-second)."""
    lat, used = summary(wall), summary(cpu)
    pcs = peak.get("peak_per_cpu_second")
    return {"latency": lat, "cpu": used, "gflops": gflop / lat["p50"],
            "pct_of_sgemm": 100 * gflop / lat["p50"] / peak["peak"],
            "gflops_per_cpu_second": gflop / used["p50"],
            "pct_of_sgemm_cpu": 100 * gflop / used["p50"] / pcs if pcs else None}


def child(bundle_dir: Path, images: list[tuple[int, int]], repeats: int, sgemm_n: int) -> dict:
    import numpy as np
    import torch

    from m2fpkit.export import sources
    from m2fpkit.runtime.cpu import usable_cores
    from m2fpkit.runtime.predictor import Predictor
    from m2fpkit.runtime.session import SessionFactory

    from .env import sgemm

    threads = usable_cores()
    torch.set_num_threads(1 if os.environ.get("M2FP_BENCH_QUICK") else threads)  # quick: see e2e
    factory = SessionFactory()
    pred = Predictor.load(bundle_dir, factory)
    cfg = pred.config
    ck = sources.resolve(cfg.source["uri"])
    model = ck.build_model()
    if ck.sha256 != cfg.source.get("sha256"):
        raise RuntimeError("PyTorch weights are not the bundle's")
    peak = sgemm(sgemm_n, 5 if sgemm_n >= 1024 else 2)
    # the same content at level ALL: the ort-fp32-nchwc plan, timed beside the reference
    nchwc = Predictor.from_content(pred.content, SessionFactory(dataclasses.replace(factory.settings,
                                                                                    optimization="all")))
    out: dict = {"threads": threads, "settings": str(factory.settings), "sgemm_gflops": peak,
                 "parameters": sum(p.numel() for p in model.parameters()), "sizes": {}}
    for i, (iw, ih) in enumerate(images):
        x = input_tensor(pred, iw, ih, seed=i)
        h, w = x.shape[2:]
        macs = count_macs(model, x)
        xt = torch.from_numpy(x)
        with torch.inference_mode():
            ref = [t.numpy() for t in model(xt)]
        got = pred.run(x)
        nchwc.run(x)  # its first run (layout transformation's buffers) is not timed
        wall: dict[str, list[float]] = {"torch": [], "onnxruntime": [], "onnxruntime_nchwc": []}
        cpu: dict[str, list[float]] = {k: [] for k in wall}
        for _ in range(repeats):
            # partial binds this image's tensors (the calls run within this iteration anyway)
            for name, fn in (("torch", functools.partial(model, xt)),
                             ("onnxruntime", functools.partial(pred.run, x)),
                             ("onnxruntime_nchwc", functools.partial(nchwc.run, x))):
                with Timer() as t, torch.inference_mode():
                    fn()
                wall[name].append(t.wall)
                cpu[name].append(t.cpu)
        gflop = 2 * macs["total"] / 1e9
        by_system = {name: _rates(wall[name], cpu[name], gflop, peak) for name in wall}
        entry = {
            "gmacs": macs["total"] / 1e9, "macs": macs, **by_system,
            "speedup_p50": by_system["torch"]["latency"]["p50"] / by_system["onnxruntime"]["latency"]["p50"],
            "paired_speedups": summary([a / b for a, b in zip(wall["torch"], wall["onnxruntime"])]),
            "nchwc_paired_speedups": summary([a / b for a, b in zip(wall["onnxruntime"], wall["onnxruntime_nchwc"])]),
            "max_abs_diff": {n: float(np.abs(r - g).max()) for n, r, g in zip(("pred_logits", "pred_masks"), ref, got)},
        }
        if i == 0:
            # "after": the same graph at level ALL (the ort-fp32-nchwc plan), profiled the same way
            entry["profile_nchwc"] = profile(pred, x, dataclasses.replace(factory.settings, optimization="all"))
            prof = profile(pred, x, factory.settings)
            conv_keys = ("aten.convolution", "aten.conv2d")
            conv_macs = sum(v for k, v in macs["by_aten_op"].items() if k in conv_keys)
            mm_macs = sum(v for k, v in macs["by_aten_op"].items() if k not in conv_keys)
            for ops, m in ((CONV_OPS, conv_macs), (MATMUL_OPS, mm_macs)):
                secs = sum(v["seconds"] for k, v in prof["by_op"].items() if k in ops)
                if secs:
                    for k in ops:
                        if k in prof["by_op"]:
                            prof["by_op"][k]["family_gflops"] = 2 * m / secs / 1e9
                            prof["by_op"][k]["family_pct_of_sgemm"] = 100 * 2 * m / secs / 1e9 / peak["peak"]
            # the profiled run's wall time vs the unprofiled p50: how much the profile itself is skewed
            prof["family_note"] = "family GFLOP/s = 2·MACs of the op family / its kernel seconds (wall)"
            entry["profile"] = prof
        entry["image_wh"] = [iw, ih]
        out["sizes"][f"{h}x{w}"] = entry
        st, so = entry["torch"]["latency"], entry["onnxruntime"]["latency"]
        log(f"forward {h}x{w}: {macs['total'] / 1e9:.1f} GMAC; torch {st['p50']:.3f} s, ort {so['p50']:.3f} s "
            f"({entry['onnxruntime']['pct_of_sgemm']:.0f}% of SGEMM {peak['peak']} GFLOP/s)")
    return out


def run(mode: Mode, out_dir: Path) -> dict:
    res = {}
    for role in ("multi",):
        images = ",".join(f"{w}x{h}" for w, h in mode.forward_images)
        res[role] = run_child("forward", ["--bundle", bundles.bundle_dir(mode.name, role), "--images", images,
                                          "--repeats", mode.forward_repeats,
                                          "--sgemm-n", 768 if mode.name == "quick" else 2048],
                              out_dir / "tmp" / mode.name, label=f"forward_{role}")
        res[role]["bundle"] = bundles.variants(mode.name)[role].version
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true", required=True)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--images", required=True, help="WxH,WxH: images the bundle prepares into the inputs")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sgemm-n", type=int, default=2048)
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args(argv)
    images = [tuple(int(v) for v in s.split("x")) for s in a.images.split(",")]
    t0 = time.perf_counter()
    out = child(a.bundle, images, a.repeats, a.sgemm_n)  # type: ignore[arg-type]
    out["seconds"] = time.perf_counter() - t0
    write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
