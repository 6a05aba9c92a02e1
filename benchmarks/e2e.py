"""End to end, image bytes → result: our ``Predictor.predict(bytes)`` vs the ModelScope way.

The ModelScope way is ModelScope's own code on the same checkpoint, PyTorch eager, torch threads =
cores: ``PIL.Image.open`` + ``exif_transpose`` + ``convert("RGB")`` (what its ``LoadImage`` does),
``ImageHumanParsingPipeline.preprocess`` → ``M2FP.forward`` → ``M2FP.postprocess`` →
``ImageHumanParsingPipeline.postprocess`` (built by ``tests/reference``; stand-ins only for the
mmcv/timm/torchvision imports M2FP does not run on CPU).

Each (system, task) runs in its own subprocess; sizes run in ascending order and the peak RSS
(VmHWM) is reset before each size, so "peak RSS" is the high-water mark while parsing that size.
Reported per size: latency p50/p95 (wall), CPU-seconds per image (user+sys, all threads), peak RSS,
the per-stage split, and the ratio ModelScope/ours. Ours also times what the server adds after the
prediction (not in the latency; ModelScope's pipeline has no counterpart): ``render`` (the overlay at
the server's default bound) and ``encode`` (it as the default JPEG), through ``m2fpkit.server.render``.
Both results are compared (label-map pixel agreement, instance labels and scores) to show that the two
systems computed the same thing.

Random-init weights give (almost) no multi-human instance above ModelScope's thresholds, which
flatters our select-before-upsample postprocessing. So the multi-human postprocess alone is also
timed on *trained-like* outputs (3 people, 15 parts: peaked class scores, blob-shaped masks) fed to
both postprocessors (ours: the ``Predictor.postprocess`` stage, on the geometry ``Predictor.prepare``
gives the image).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from . import bundles
from .common import (
    Mode,
    Timer,
    log,
    mb,
    proc_status,
    reset_peak_rss,
    run_all,
    run_child,
    summary,
    test_jpeg,
    write_json,
)

SYSTEMS = ("ours", "modelscope")
TASKS = ("multi", "single")


def size_key(w: int, h: int) -> str:
    return f"{w}x{h}"


# ------------------------------------------------------------------------- trained-like outputs

def trained_like_outputs(num_queries: int, num_classes: int, human: int, hw4: tuple[int, int], seed: int = 0):
    """``pred_logits [1,Q,C+1]``, ``pred_masks [1,Q,h,w]`` as a trained multi-human model gives them:
    3 confident human queries, 15 confident part queries (blobs inside the people), the rest
    'no object' with negative masks."""
    import numpy as np

    rng = np.random.default_rng(seed)
    q, c1 = num_queries, num_classes + 1
    h, w = hw4
    logits = rng.normal(0, 1, (q, c1)).astype(np.float32)
    masks = (-6 + rng.normal(0, 1, (q, h, w))).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    n_h, n_p = min(3, q), min(15, max(0, q - 3))
    people = []
    for i in range(n_h):
        cx, cy = w * (i + 1) / (n_h + 1), h * 0.55
        rx, ry = w / (2.5 * (n_h + 1)), h * 0.4
        people.append((cx, cy, rx, ry))
        d = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
        masks[i] = 8 * (1 - d)
        logits[i, human] = 9
    parts = [p for p in range(1, num_classes) if p != human]
    for j in range(n_p):
        k = n_h + j
        cx, cy, rx, ry = people[j % n_h]
        px, py = cx + rng.uniform(-0.5, 0.5) * rx, cy + rng.uniform(-0.8, 0.8) * ry
        d = np.sqrt(((xx - px) / (rx * 0.35)) ** 2 + ((yy - py) / (ry * 0.2)) ** 2)
        masks[k] = 8 * (1 - d)
        logits[k, parts[j % len(parts)]] = 9
    for k in range(n_h + n_p, q):
        logits[k, -1] = 9
    return logits[None], masks[None]


# ------------------------------------------------------------------------------------- children

def _ours(task: str, bundle_dir: Path, images: list[Path], repeats: int, warmup: int) -> dict:
    import numpy as np

    from m2fpkit.runtime.predictor import Predictor
    from m2fpkit.runtime.session import SessionFactory
    from m2fpkit.server import render

    factory = SessionFactory()
    with Timer() as t:
        pred = Predictor.load(bundle_dir, factory)
    out: dict = {"load_seconds": t.wall, "rss_after_load": proc_status()["VmRSS"],
                 "settings": str(factory.settings), "sizes": {}}
    cfg = pred.config
    for path in images:
        data = path.read_bytes()
        reset_peak_rss()
        for _ in range(warmup):
            pred.predict(data)
        walls, cpus, stages = [], [], {}
        for _ in range(repeats):
            with Timer() as t:
                p = pred.predict(data)
            walls.append(t.wall)
            cpus.append(t.cpu)
            for k, v in p.timings.items():
                stages.setdefault(k, []).append(v)
        rgb, opts = pred.decode(data), render.RenderOptions()
        for _ in range(repeats):  # the server's overlay of this result: drawn, then encoded
            with Timer() as t:
                overlay = render.draw(pred, p.result, rgb, opts)
            stages.setdefault("render", []).append(t.wall)
            with Timer() as t:
                render.encode_overlay(overlay, opts.visualization_format)
            stages.setdefault("encode", []).append(t.wall)
        res = p.result
        entry = {"latency": summary(walls), "cpu": summary(cpus), "peak_rss": proc_status()["VmHWM"],
                 "stages": {k: summary(v)["p50"] for k, v in stages.items() if k != "total"},
                 "instances": len(res.instances), "labels": [i.class_name for i in res.instances],
                 "scores": [float(i.score) for i in res.instances]}
        np.save(path.with_name(f"labels_ours_{task}_{path.stem}.npy"), res.label_map)
        if task == "multi":  # the postprocess stage alone, on trained-like outputs for this image's geometry
            prepared = pred.prepare(pred.decode(data))
            hp, wp = prepared.padded_hw
            outputs = trained_like_outputs(cfg.num_queries, cfg.num_classes, cfg.human_class, (hp // 4, wp // 4))
            post = []
            for _ in range(repeats):
                with Timer() as t:
                    r = pred.postprocess(outputs, prepared)
                post.append(t.wall)
            entry["post_trained_like"] = {"latency": summary(post), "instances": len(r.instances)}
        out["sizes"][path.stem] = entry
        log(f"ours {task} {path.stem}: p50 {entry['latency']['p50']:.3f} s")
    return out


def _modelscope(task: str, ms_dir: Path, images: list[Path], repeats: int, warmup: int,
                min_size: int = 640, max_size: int = 1333) -> dict:
    import io
    import os

    import numpy as np
    import torch
    from PIL import Image, ImageOps

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from reference.modelscope_m2fp import build_modelscope_m2fp  # noqa: E402
    from reference.modelscope_pipeline import modelscope_pipeline  # noqa: E402

    # torch threads = cores; quick mode uses 1 (tiny models: OpenMP start-up and spinning dominate)
    threads = 1 if os.environ.get("M2FP_BENCH_QUICK") else len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    conf = json.loads((ms_dir / "configuration.json").read_text())
    with Timer() as t:
        model = build_modelscope_m2fp(ms_dir, {**conf["model"], "pretrained": True})  # ModelScope loads the weights
        pipe = modelscope_pipeline(model)
    saved = torch.load(ms_dir / "pytorch_model.pt", map_location="cpu", weights_only=True)["model"]
    sd = model.state_dict()
    same = all(k in sd and torch.equal(sd[k], v) for k, v in saved.items() if not k.endswith("num_batches_tracked"))
    del saved
    out: dict = {"load_seconds": t.wall, "rss_after_load": proc_status()["VmRSS"], "torch_threads": threads,
                 "weights_identical_to_checkpoint": same, "sizes": {}}

    def parse(data: bytes, stages: dict | None = None):
        with Timer() as t0:
            img = Image.open(io.BytesIO(data))
            img = ImageOps.exif_transpose(img).convert("RGB")
        with Timer() as t1:
            inputs = pipe.preprocess(img, min_size=min_size, max_size=max_size)
        with Timer() as t2, torch.no_grad():
            raw = model.forward(inputs)
        with Timer() as t3:
            ev = model.postprocess(raw)
            result = pipe.postprocess(ev)
        if stages is not None:
            for k, tt in (("decode", t0), ("preprocess", t1), ("inference", t2), ("postprocess", t3)):
                stages.setdefault(k, []).append(tt.wall)
        return raw, ev, result

    for path in images:
        data = path.read_bytes()
        reset_peak_rss()
        for _ in range(warmup):
            parse(data)
        walls, cpus, stages = [], [], {}
        for _ in range(repeats):
            with Timer() as t:
                raw, ev, result = parse(data, stages)
            walls.append(t.wall)
            cpus.append(t.cpu)
        entry = {"latency": summary(walls), "cpu": summary(cpus), "peak_rss": proc_status()["VmHWM"],
                 "stages": {k: summary(v)["p50"] for k, v in stages.items()},
                 "instances": len(result["labels"]), "labels": list(result["labels"]),
                 "scores": [float(s) for s in result["scores"]]}
        pr = ev["eval_result"][0]
        if "sem_seg" in pr:
            labels = pr["sem_seg"].argmax(0).numpy().astype(np.uint8)
        else:
            labels = pr["parsing"]["semantic_outputs"].argmax(0).numpy().astype(np.uint8)
        np.save(path.with_name(f"labels_modelscope_{task}_{path.stem}.npy"), labels)
        if task == "multi":
            hp, wp = raw["images"].tensor.shape[-2:]
            lg, mk = trained_like_outputs(model.num_queries, model.num_classes, model.num_parsing, (hp // 4, wp // 4))
            fake = dict(outputs={"pred_logits": torch.from_numpy(lg), "pred_masks": torch.from_numpy(mk)},
                        batched_inputs=raw["batched_inputs"], images=raw["images"])
            post = []
            for _ in range(repeats):
                with Timer() as t, torch.no_grad():
                    r = pipe.postprocess(model.postprocess(fake))
                post.append(t.wall)
            entry["post_trained_like"] = {"latency": summary(post), "instances": len(r["labels"])}
        out["sizes"][path.stem] = entry
        log(f"modelscope {task} {path.stem}: p50 {entry['latency']['p50']:.3f} s")
    return out


# ---------------------------------------------------------------------------------------- parent

def _compare(scratch: Path, task: str, key: str, ours: dict, theirs: dict) -> dict:
    import numpy as np

    a = np.load(scratch / f"labels_ours_{task}_{key}.npy")
    b = np.load(scratch / f"labels_modelscope_{task}_{key}.npy")
    agree = float((a == b).mean()) if a.shape == b.shape else 0.0
    same_labels = ours["labels"] == theirs["labels"]
    diff = max((abs(x - y) for x, y in zip(ours["scores"], theirs["scores"])), default=0.0) if same_labels else None
    return {"label_map_agreement": agree, "same_instance_labels": same_labels, "max_score_diff": diff,
            "classes_in_label_map": int(len(np.unique(a))),
            "label_map_sha": hashlib.sha256(a.tobytes()).hexdigest()[:12]}


def run(mode: Mode, out_dir: Path) -> dict:
    scratch = out_dir / "tmp" / mode.name / "e2e"
    scratch.mkdir(parents=True, exist_ok=True)
    images = []
    for i, (w, h) in enumerate(mode.sizes):
        p = scratch / f"{size_key(w, h)}.jpg"
        p.write_bytes(test_jpeg(w, h, seed=i))
        images.append(p)
    res: dict = {"sizes": [size_key(w, h) for w, h in mode.sizes], "repeats": mode.e2e_repeats,
                 "warmup": mode.warmup, "tasks": {}}
    from m2fpkit.runtime.bundle.config import BundleConfig

    pre = BundleConfig.read(bundles.bundle_dir(mode.name, "multi")).preprocess
    common = ["--repeats", mode.e2e_repeats, "--warmup", mode.warmup, "--min-size", pre.short_edge,
              "--max-size", pre.max_size, *[str(p) for p in images]]
    children: dict[str, dict[str, dict]] = {s: {} for s in SYSTEMS}
    # full: one process per (system, task); quick: one per system (start-up dominates tiny runs)
    groups = [[t] for t in TASKS] if mode.name == "full" else [list(TASKS)]
    def job(system: str, tasks: list[str]):
        def run_one() -> dict:
            log(f"e2e {'+'.join(tasks)}: {system}")
            runs = []
            for task in tasks:
                src = (bundles.bundle_dir(mode.name, task) if system == "ours"
                       else bundles.modelscope_dir(mode.name, task))
                runs += ["--run", f"{task}={src}"]
            return run_child("e2e", ["--system", system, *runs, *common], out_dir / "tmp" / mode.name,
                             label=f"e2e_{system}_{'+'.join(tasks)}")
        return run_one

    cells = [(system, tasks) for tasks in groups for system in SYSTEMS]
    # quick mode runs both systems side by side (start-up dominates); full mode one at a time
    outs = run_all([job(*c) for c in cells], parallel=1 if mode.name == "full" else 2)
    for (system, tasks), got in zip(cells, outs):
        if isinstance(got, Exception):  # keep the other cells
            log(f"e2e {'+'.join(tasks)} {system} failed: {got}")
            res.setdefault("errors", {})[f"{system}:{'+'.join(tasks)}"] = str(got)[-2000:]
            continue
        children[system].update(got["tasks"])
    for task in TASKS:
        if not all(task in children[s] for s in SYSTEMS):
            continue
        runs = {s: children[s][task] for s in SYSTEMS}
        per_size = {}
        for key in res["sizes"]:
            o, m = runs["ours"]["sizes"][key], runs["modelscope"]["sizes"][key]
            row = {
                "ours": {k: o[k] for k in ("latency", "cpu", "peak_rss", "stages", "instances")},
                "modelscope": {k: m[k] for k in ("latency", "cpu", "peak_rss", "stages", "instances")},
                "speedup_p50": m["latency"]["p50"] / o["latency"]["p50"],
                "speedup_p95": m["latency"]["p95"] / o["latency"]["p95"],
                "cpu_ratio": m["cpu"]["p50"] / o["cpu"]["p50"],
                "peak_rss_ratio": m["peak_rss"] / o["peak_rss"],
                "agreement": _compare(scratch, task, key, o, m),
            }
            if "post_trained_like" in o:
                po, pm = o["post_trained_like"], m["post_trained_like"]
                row["post_trained_like"] = {"ours": po, "modelscope": pm,
                                            "speedup_p50": pm["latency"]["p50"] / po["latency"]["p50"]}
            per_size[key] = row
            log(f"e2e {task} {key}: ours {o['latency']['p50']:.3f} s, ModelScope {m['latency']['p50']:.3f} s "
                f"→ {row['speedup_p50']:.2f}×; peak RSS {mb(o['peak_rss'])} vs {mb(m['peak_rss'])} MB")
        res["tasks"][task] = {"bundle": bundles.variants(mode.name)[task].version, "sizes": per_size,
                              "load_seconds": {s: runs[s]["load_seconds"] for s in SYSTEMS},
                              "weights_identical": runs["modelscope"]["weights_identical_to_checkpoint"],
                              "settings": runs["ours"]["settings"]}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true", required=True)
    ap.add_argument("--system", choices=SYSTEMS, required=True)
    ap.add_argument("--run", action="append", required=True, help="TASK=SOURCE_DIR (repeatable)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--min-size", type=int, default=640)
    ap.add_argument("--max-size", type=int, default=1333)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("images", nargs="+", type=Path)
    a = ap.parse_args(argv)
    out = {}
    for item in a.run:
        task, _, src = item.partition("=")
        if a.system == "ours":
            out[task] = _ours(task, Path(src), a.images, a.repeats, a.warmup)
        else:
            out[task] = _modelscope(task, Path(src), a.images, a.repeats, a.warmup, a.min_size, a.max_size)
    write_json(a.json, {"tasks": out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
