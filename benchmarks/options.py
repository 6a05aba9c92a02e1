"""onnxruntime options, each with its speed and label-map agreement against the fp32 default.

Each option runs in its own subprocess next to a baseline predictor with the runtime's defaults
(``RuntimeSettings()``: extended optimisation, per-session pool of all cores, spinning off); runs
alternate baseline/option on the same input, so the ratio sees the same machine load (the options in
:data:`ALONE` cannot share a process with the baseline: they run in processes of their own). Both sides are
:class:`~m2fpkit.runtime.predictor.Predictor` s from ``Predictor.load`` (a settings option is the same
bundle with other ``RuntimeSettings``); inputs come from ``Predictor.decode`` → ``Predictor.prepare``,
the forward pass is ``Predictor.run`` and label maps are ``Predictor.postprocess``. The option's
outputs are compared with the baseline's on every test image:

- *semantic agreement*: per-pixel argmax of Σ_q softmax(cls)·sigmoid(mask) at mask resolution over
  the image area (what the parity gate compares; non-trivial even with random weights);
- *label-map agreement*: the runtime's final label map at the original size.

An option agreeing on fewer than 99.5 % of pixels (the golden self-test's bar) is flagged as
losing agreement. Options run on the single-human bundle (fixed 512×384 canvas: the cheapest
full-size input), except ``fixed-canvas``, which only makes sense for multi-human's variable sizes.

Options that run another graph are built once as bundles of their own, through the bundle writer
(:func:`benchmarks.common.graph_bundle`, cached under ``.cache/<mode>/option-bundles/<option>/``,
rebuilt when the source bundle changes) and loaded with ``Predictor.load``:

- ``pre-optimized``: the graph onnxruntime saves while a ``SessionFactory`` builds the default
  session (``optimized_model_filepath``), loaded with optimisation disabled;
- ``int8-static-conv``: static QDQ on the convolutions (the export's ``pre_process``, ``quantize_static``
  per-channel, ``reduce_range`` when the CPU lacks VNNI, MinMax calibration on a few synthetic person
  images prepared by the bundle's ``Predictor.prepare``);
- ``int8-dynamic-matmul``: MatMul-only dynamic quantization (``quantize_dynamic``).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from m2fpkit.runtime import cpu
from m2fpkit.runtime.bundle.config import PLAN_MIN_DECISIVE_AGREEMENT

from . import bundles
from .common import Mode, Timer, graph_bundle, jpeg_bytes, log, person_image, run_all, run_child, summary, write_json

if TYPE_CHECKING:
    import numpy as np

    from m2fpkit.runtime.predictor import Predictor
    from m2fpkit.runtime.preprocess import Prepared
    from m2fpkit.runtime.session import RuntimeSettings, SessionFactory

#: an option's worst label-map agreement below the plans' decisive-pixel floor loses it (measured here on every
#: pixel, a stricter bar than the one a plan must pass to serve)
AGREEMENT_BAR = PLAN_MIN_DECISIVE_AGREEMENT

#: name → (bundle role, what it changes)
OPTIONS: dict[str, tuple[str, str]] = {
    "level=basic": ("single", "graph optimisation ORT_ENABLE_BASIC"),
    "level=all": ("single", "graph optimisation ORT_ENABLE_ALL (layout transforms; do not ship across CPU types)"),
    "pre-optimized": ("single", "model saved after EXTENDED optimisation, loaded with optimisation disabled"),
    "spinning=on": ("single", "per-session pool with intra-op spinning on"),
    "global-pool": ("single", "process-wide thread pool (set_global_thread_pool_sizes), no spin control"),
    "memory-tuned": ("single", "shared arena + disable_prepacking + BASIC optimisation"),
    "int8-static-conv": ("single", "static QDQ int8 on Conv (per-channel, reduce_range w/o VNNI, calibrated)"),
    "int8-dynamic-matmul": ("single", "dynamic int8 on MatMul only"),
    "fixed-canvas": ("multi", "every multi-human input padded to one canvas (largest test size) vs /32 padding"),
}
#: options measured in a process of their own, compared with a default session in another process (not
#: interleaved): a global pool excludes per-session pools, and a spinning pool's idle threads keep its
#: cores busy, which slows a default session beside it instead of speeding up the option
ALONE = ("global-pool", "spinning=on")


def option_root(mode: str, option: str) -> Path:
    """Bundle root holding ``option``'s graph as a bundle (same version name as its source)."""
    return bundles.CACHE / mode / "option-bundles" / option


# ------------------------------------------------------------------------- bundles of other graphs

def build_quantized(mode: str, base: Predictor, kind: str, n_calib: int) -> Path:
    """The bundle of ``base``'s int8 graph (cached); ``kind`` is static-conv or dynamic-matmul."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from m2fpkit.export.quantize import pre_process

    cfg = base.config
    src = base.content.info.path / cfg.model_file  # the verified bundle's graph: the quantiser's input
    input_name = cfg.inputs[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            sizes = [(384, 512), (480, 640), (360, 640), (512, 512)][:n_calib]
            self.items = iter([
                {input_name: base.prepare(base.decode(jpeg_bytes(person_image(w, h, seed=100 + i)))).tensor}
                for i, (w, h) in enumerate(sizes)])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    def write_graph(model: Path) -> None:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            _quantize(Path(tmp), model)
        log(f"quantised {cfg.version} ({kind}) in {time.perf_counter() - t0:.0f} s")

    def _quantize(tmp: Path, model: Path) -> None:
        # a private copy of the graph: the quantiser writes beside its input (``*-inferred.onnx``), which
        # must never land in the verified bundle, and onnx refuses external data with several hard links
        own = tmp / "source"
        own.mkdir()
        for f in src.parent.iterdir():
            if f.name == src.name or f.name.startswith(src.name + "."):
                shutil.copyfile(f, own / f.name)
        graph = own / src.name
        if kind == "dynamic-matmul":
            quantize_dynamic(graph, model, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                             use_external_data_format=True)
        else:
            pre = tmp / "preprocessed.onnx"
            pre_process(graph, pre)  # the export's own pre-quantization pass
            quantize_static(pre, model, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"],
                            per_channel=True, reduce_range=not cpu.detect().has("vnni"),
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            use_external_data_format=True)

    return graph_bundle(option_root(mode, f"int8-{kind}"), base.content, f"int8 {kind}", write_graph)


def saving_factory(settings: RuntimeSettings, target: Path) -> SessionFactory:
    """A :class:`SessionFactory` whose sessions also have onnxruntime save the optimised graph to ``target``."""
    import onnxruntime as ort

    from m2fpkit.runtime.session import SessionFactory

    class SavingFactory(SessionFactory):
        def options(self, optimization: str | None = None) -> ort.SessionOptions:
            o = super().options(optimization)
            o.optimized_model_filepath = str(target)
            o.add_session_config_entry("session.optimized_model_external_initializers_file_name", target.name + ".data")
            o.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            return o

    return SavingFactory(settings)


def build_preoptimized(mode: str, base: Predictor, settings: RuntimeSettings) -> Path:
    """The bundle of the graph onnxruntime optimises from ``base``'s content with ``settings`` (cached)."""
    def write_graph(model: Path) -> None:
        saving_factory(settings, model).create(base.content)  # the session itself is not kept

    return graph_bundle(option_root(mode, "pre-optimized"), base.content,
                        f"saved by onnxruntime after {settings.optimization} optimisation", write_graph)


# ------------------------------------------------------------------------------------------ child

def _semantic(logits: np.ndarray, masks: np.ndarray, prepared: Prepared) -> np.ndarray:
    import numpy as np

    x0, y0, x1, y1 = prepared.content_box
    m = masks[0][:, y0 // 4:-(-y1 // 4), x0 // 4:-(-x1 // 4)]
    e = np.exp(logits[0] - logits[0].max(-1, keepdims=True))
    p = (e / e.sum(-1, keepdims=True))[:, :-1]
    sig = 1 / (1 + np.exp(-m))
    return np.einsum("qc,qhw->chw", p, sig).argmax(0)


def _load(bundle_dir: Path, settings: RuntimeSettings) -> tuple[Predictor, float]:
    """``Predictor.load`` with a factory of ``settings``, and its wall seconds."""
    from m2fpkit.runtime.predictor import Predictor
    from m2fpkit.runtime.session import SessionFactory

    with Timer() as t:
        pred = Predictor.load(bundle_dir, SessionFactory(settings))
    return pred, t.wall


def child(option: str, mode: str, images: list[Path], repeats: int, n_calib: int) -> dict:
    import numpy as np

    from m2fpkit.runtime.session import RuntimeSettings

    role = OPTIONS.get(option, ("single",))[0]
    bdir = bundles.bundle_dir(mode, role)
    if option in ALONE or option == "baseline":
        return _alone(option, bdir, images, repeats)
    settings = RuntimeSettings()
    base, base_load = _load(bdir, settings)
    extra: dict = {}
    if option.startswith("level="):
        opt, load = _load(bdir, dataclasses.replace(settings, optimization=option.split("=")[1]))
    elif option == "pre-optimized":
        with Timer() as t:
            path = build_preoptimized(mode, base, settings)
        extra["build_seconds"] = t.wall
        opt, load = _load(path, dataclasses.replace(settings, optimization="disable"))
    elif option == "memory-tuned":
        opt, load = _load(bdir, dataclasses.replace(settings, shared_arena=True, disable_prepacking=True,
                                                    optimization="basic"))
    elif option.startswith("int8-"):
        with Timer() as t:
            path = build_quantized(mode, base, option[len("int8-"):], n_calib)
        extra["build_seconds"] = t.wall
        opt, load = _load(path, settings)
    elif option == "fixed-canvas":
        opt, load = _load(bdir, settings)  # same settings: this predictor only ever sees the canvas
    else:
        raise SystemExit(f"unknown option {option}")
    prepared = [base.prepare(base.decode(p.read_bytes())) for p in images]
    canvas = None
    if option == "fixed-canvas":
        canvas = (max(p.padded_hw[0] for p in prepared), max(p.padded_hw[1] for p in prepared))
        extra["canvas_hw"] = list(canvas)

    def opt_input(p: Prepared) -> Prepared:
        """The option's input: the prepared tensor, padded further to the fixed canvas if there is one."""
        if canvas is None:
            return p
        t = np.zeros((1, 3, *canvas), np.float32)
        t[:, :, :p.padded_hw[0], :p.padded_hw[1]] = p.tensor
        return dataclasses.replace(p, tensor=t)

    main = prepared[min(1, len(prepared) - 1)]
    main_opt = opt_input(main)
    tb, to = [], []
    for i in range(1 + repeats):
        with Timer() as t:
            base.run(main.tensor)
        b = t.wall
        with Timer() as t:
            opt.run(main_opt.tensor)
        if i:  # first round is the warm-up
            tb.append(b)
            to.append(t.wall)
    agreement = []
    for p in prepared:
        q = opt_input(p)
        lb, mb_ = base.run(p.tensor)
        lo, mo = opt.run(q.tensor)
        h4, w4 = mb_.shape[2:]
        sb_, so_ = _semantic(lb, mb_, p), _semantic(lo, mo[:, :, :h4, :w4], p)
        rb = base.postprocess((lb, mb_), p).label_map
        ro = opt.postprocess((lo, mo), q).label_map
        agreement.append({"image": f"{p.original_hw[1]}x{p.original_hw[0]}", "semantic": float((sb_ == so_).mean()),
                          "semantic_classes": int(len(np.unique(sb_))), "label_map_classes": int(len(np.unique(rb))),
                          "label_map": float((rb == ro).mean()),
                          "max_abs_logits": float(np.abs(lb - lo).max())})
    sb, so = summary(tb), summary(to)
    worst = min(min(a["semantic"], a["label_map"]) for a in agreement)
    return {"option": option, "bundle": base.version, "what": OPTIONS[option][1],
            "input_hw": list(main.padded_hw), "option_input_hw": list(main_opt.padded_hw),
            "baseline": {"latency": sb, "load_seconds": base_load},
            "option_run": {"latency": so, "load_seconds": load},
            "speedup_p50": sb["p50"] / so["p50"], "paired_speedups": summary([a / b for a, b in zip(tb, to)]),
            "agreement": agreement, "worst_agreement": worst, "loses_agreement": worst < AGREEMENT_BAR, **extra}


def _alone(option: str, bdir: Path, images: list[Path], repeats: int) -> dict:
    """One predictor (default settings, or one of :data:`ALONE`); outputs saved for the parent to compare."""
    import numpy as np

    from m2fpkit.runtime.session import RuntimeSettings

    settings = {"baseline": RuntimeSettings(), "global-pool": RuntimeSettings(thread_pool="global"),
                "spinning=on": RuntimeSettings(allow_spinning=True)}[option]
    pred, load = _load(bdir, settings)
    prepared = [pred.prepare(pred.decode(p.read_bytes())) for p in images]
    main = prepared[min(1, len(prepared) - 1)]
    times = []
    for i in range(1 + repeats):
        with Timer() as tt:
            pred.run(main.tensor)
        if i:
            times.append(tt.wall)
    saved = {}
    for k, p in enumerate(prepared):
        outputs = pred.run(p.tensor)
        saved[f"sem{k}"] = _semantic(*outputs, p)
        saved[f"labels{k}"] = pred.postprocess(outputs, p).label_map
        saved[f"logits{k}"] = outputs[0]
    npz = images[0].parent / f"outputs_{option}.npz"
    np.savez(npz, **saved)
    return {"option": option, "bundle": pred.version, "input_hw": list(main.padded_hw),
            "latency": summary(times), "load_seconds": load, "outputs": str(npz), "n_images": len(prepared)}


def _combine(option: str, base: dict, opt: dict) -> dict:
    """Speed-up and agreement of two single-session runs made in separate processes."""
    import numpy as np

    a, b = np.load(base["outputs"]), np.load(opt["outputs"])
    agreement = []
    for k in range(base["n_images"]):
        agreement.append({"image": str(k), "semantic": float((a[f"sem{k}"] == b[f"sem{k}"]).mean()),
                          "semantic_classes": int(len(np.unique(a[f"sem{k}"]))),
                          "label_map_classes": int(len(np.unique(a[f"labels{k}"]))),
                          "label_map": float((a[f"labels{k}"] == b[f"labels{k}"]).mean()),
                          "max_abs_logits": float(np.abs(a[f"logits{k}"] - b[f"logits{k}"]).max())})
    worst = min(min(x["semantic"], x["label_map"]) for x in agreement)
    sp = base["latency"]["p50"] / opt["latency"]["p50"]
    return {"option": option, "bundle": opt["bundle"], "what": OPTIONS[option][1], "input_hw": opt["input_hw"],
            "option_input_hw": opt["input_hw"],
            "baseline": {"latency": base["latency"], "load_seconds": base["load_seconds"]},
            "option_run": {"latency": opt["latency"], "load_seconds": opt["load_seconds"]}, "speedup_p50": sp,
            "paired_speedups": {"p50": sp, "min": sp, "max": sp, "n": 0}, "not_interleaved": True,
            "agreement": agreement, "worst_agreement": worst, "loses_agreement": worst < AGREEMENT_BAR}


# ----------------------------------------------------------------------------------------- parent

def run(mode: Mode, out_dir: Path, only: list[str] | None = None) -> dict:
    from .e2e import size_key

    scratch = out_dir / "tmp" / mode.name / "options"
    scratch.mkdir(parents=True, exist_ok=True)
    images = []
    for i, (w, h) in enumerate(mode.sizes if mode.name == "full" else mode.sizes[:2]):
        p = scratch / f"{size_key(w, h)}.jpg"
        p.write_bytes(jpeg_bytes(person_image(w, h, seed=50 + i)))
        images.append(p)
    res = {"agreement_bar": AGREEMENT_BAR, "options": {}}
    tmp = out_dir / "tmp" / mode.name
    args = ["--mode", mode.name, "--repeats", mode.options_repeats, "--calibration", mode.calibration_images, *images]

    def job(option: str):
        def run_one() -> dict:
            log(f"options: {option}")
            if option in ALONE:  # separate processes, one after the other
                name = option.replace("=", "_")
                base = run_child("options", ["--option", "baseline", *args], tmp, label=f"options_baseline_{name}")
                opt = run_child("options", ["--option", option, *args], tmp, label=f"options_{name}")
                return _combine(option, base, opt)
            return run_child("options", ["--option", option, *args], tmp, label=f"options_{option.replace('=', '_')}")
        return run_one

    names = list(only or OPTIONS)
    if mode.name == "full":  # one fresh process per option, one at a time
        results = run_all([job(n) for n in names])
    else:  # quick: the other options in one process, beside the ALONE pairs (start-up dominates)
        rest = [n for n in names if n not in ALONE]
        alone = [n for n in names if n in ALONE]
        def pairs() -> list:  # one pair after the other: their baselines write the same outputs file
            return run_all([job(n) for n in alone])

        outs = run_all([lambda: run_child("options", ["--option", ",".join(rest), *args], tmp, label="options_all"),
                        pairs], parallel=2)
        many = outs[0] if not isinstance(outs[0], Exception) else {n: outs[0] for n in rest}
        by_name = {n: many.get(n, RuntimeError("missing")) if isinstance(many, dict) else many for n in rest}
        by_name.update(zip(alone, outs[1] if isinstance(outs[1], list) else [outs[1]] * len(alone)))
        results = [by_name[n] for n in names]
    for option, r in zip(names, results):
        if isinstance(r, dict) and "error" in r and "option" not in r:
            r = RuntimeError(r["error"])
        if isinstance(r, Exception):  # one broken option must not sink the others
            log(f"options: {option} failed: {r}")
            r = {"option": option, "error": str(r)[-2000:]}
        res["options"][option] = r
        if "speedup_p50" in r:
            log(f"options {option}: {r['speedup_p50']:.2f}× vs default, "
                f"worst agreement {100 * r['worst_agreement']:.2f}%")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true", required=True)
    ap.add_argument("--option", required=True, help="an option name, or several separated by commas")
    ap.add_argument("--mode", choices=("quick", "full"), required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calibration", type=int, default=3)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("images", nargs="+", type=Path)
    a = ap.parse_args(argv)
    names = a.option.split(",")
    unknown = [n for n in names if n not in OPTIONS and n != "baseline"]
    if unknown:
        ap.error(f"unknown option(s) {unknown}")
    if len(names) == 1:
        write_json(a.json, child(names[0], a.mode, a.images, a.repeats, a.calibration))
        return 0
    out = {}
    for n in names:  # quick mode: one process for many options
        try:
            out[n] = child(n, a.mode, a.images, a.repeats, a.calibration)
        except Exception as exc:  # reported per option
            out[n] = {"error": f"{type(exc).__name__}: {exc}"}
    write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
