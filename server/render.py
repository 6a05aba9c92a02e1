"""Turn a prediction into the response JSON (runs in the worker thread: PNG encoding is CPU work)."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from m2fpkit.runtime.predictor import ImageLimits, Predictor

INCLUDES = frozenset({"label_map", "persons", "masks", "person_map"})
MASK_FORMATS = ("rle", "png")


@dataclass(frozen=True)
class RenderOptions:
    include: frozenset[str] = frozenset()
    mask_format: str = "rle"
    visualization: bool = True


def png_b64(img: np.ndarray) -> str:
    """PNG of an RGB (HxWx3) or single-channel image, base64."""
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return base64.b64encode(buf.tobytes()).decode("ascii")


def rle(mask: np.ndarray) -> dict[str, Any]:
    """Row-major run lengths of a boolean mask, starting with a run of zeros (possibly empty)."""
    flat = mask.ravel().astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate(([0], change, [flat.size]))
    counts = np.diff(edges).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def encode_mask(mask: np.ndarray, fmt: str) -> Any:
    return rle(mask) if fmt == "rle" else png_b64(mask.astype(np.uint8) * 255)


def parse(predictor: Predictor, data: bytes, limits: ImageLimits, opts: RenderOptions) -> dict[str, Any]:
    """Decode, predict and render one request; every step timed."""
    t0 = time.perf_counter()
    rgb = predictor.decode(data, limits)
    timings = {"decode": time.perf_counter() - t0}
    pred = predictor.predict_rgb(rgb, timings)
    t1 = time.perf_counter()
    res, cfg = pred.result, predictor.config
    body: dict[str, Any] = {
        "success": True, "version": pred.version, "task": cfg.task,
        "image": {"height": res.hw[0], "width": res.hw[1]},
        "labels": [i.class_name for i in res.instances],
        "scores": [round(float(i.score), 6) for i in res.instances],
        "classes_present": sorted({cfg.classes[c] for c in np.unique(res.label_map).tolist()}),
    }
    if opts.visualization:
        body["visualization"] = png_b64(predictor.render(res, rgb))
    if "label_map" in opts.include:
        body["label_map"] = png_b64(res.label_map.astype(np.uint8))
    if "person_map" in opts.include and res.person_map is not None:
        body["person_map"] = png_b64(res.person_map.astype(np.uint16))
    if "persons" in opts.include:
        body["persons"] = [{
            "id": p.id, "score": round(float(p.score), 6), "mask": encode_mask(p.mask, opts.mask_format),
            "parts": [{"label": q.class_name, "score": round(float(q.score), 6)} for q in p.parts],
        } for p in res.persons]
    if "masks" in opts.include:
        body["masks"] = [encode_mask(i.mask, opts.mask_format) for i in res.instances]
    timings["render"] = time.perf_counter() - t1
    body["timing"] = {k: round(v * 1000, 2) for k, v in timings.items()}
    body["timing"]["unit"] = "ms"
    return body
