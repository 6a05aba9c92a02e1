"""Turn a prediction into the response JSON (runs in the worker thread: drawing and encoding are CPU work).

The overlay is drawn at a bounded size (:data:`VISUALIZATION_MAX_SIDE`, unless the client asks for
another bound or ``full``) and encoded as JPEG unless PNG is asked: the response says the size and
format it got. Label maps, person maps and masks are data: always at the original size, lossless.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from m2fpkit.runtime.bundle.jsonfile import brief
from m2fpkit.runtime.predictor import ImageLimits, Prediction, Predictor
from m2fpkit.runtime.result import ParseResult

INCLUDES = frozenset({"label_map", "persons", "masks", "person_map"})
MASK_FORMATS = ("rle", "png")
#: the overlay's longest side in pixels unless the client asks otherwise (``visualization_max_side``)
VISUALIZATION_MAX_SIDE = 1280
#: the overlay's encodings, the default first (JPEG: a photo overlay in a few ms and ~100 KB)
VISUALIZATION_FORMATS = ("jpeg", "png")
JPEG_QUALITY = 85
_MAX_SIDE = re.compile(r"full|[1-9][0-9]{0,4}")


@dataclass(frozen=True)
class RenderOptions:
    include: frozenset[str] = frozenset()
    mask_format: str = "rle"
    visualization: bool = True
    #: longest side of the overlay in pixels (never enlarged); None draws it at the image's size
    visualization_max_side: int | None = VISUALIZATION_MAX_SIDE
    visualization_format: str = VISUALIZATION_FORMATS[0]


def parse_max_side(text: str) -> int | None:
    """The ``visualization_max_side`` parameter: ``full`` → None, ``1`` … ``99999`` → that many pixels;
    anything else (empty, signs, spaces, other digits) is a ValueError naming what was given."""
    if not _MAX_SIDE.fullmatch(text):
        raise ValueError(f"expected full or a longest side in pixels (1 to 99999), got {brief(text, 40)}")
    return None if text == "full" else int(text)


def draw(predictor: Predictor, result: ParseResult, rgb: np.ndarray, opts: RenderOptions) -> np.ndarray:
    """The overlay the response carries: ``result`` over ``rgb`` in the bundle's palette, bounded by ``opts``."""
    return predictor.render(result, rgb, opts.visualization_max_side)


def encode_overlay(img: np.ndarray, fmt: str) -> str:
    """An RGB overlay as base64 JPEG (quality :data:`JPEG_QUALITY`) or PNG (:func:`png_b64`)."""
    if fmt == "png":
        return png_b64(img)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return base64.b64encode(buf.tobytes()).decode("ascii")


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


def predicted(predictor: Predictor, data: bytes, limits: ImageLimits,
              check: Callable[[np.ndarray], None] | None = None) -> tuple[np.ndarray, Prediction]:
    """Decode and predict one request (the worker thread's part every answer shares); the decoded RGB
    image and the prediction, whose ``timings`` hold decode and each stage in seconds. ``check`` sees the
    decoded image before the prediction (and may refuse the request: ``/api/{version}/score``'s label size)."""
    t0 = time.perf_counter()
    rgb = predictor.decode(data, limits)
    decoded = time.perf_counter() - t0
    if check is not None:
        check(rgb)
    return rgb, predictor.predict_rgb(rgb, {"decode": decoded})


def summary(predictor: Predictor, pred: Prediction) -> dict[str, Any]:
    """What every answer (``/parse``, OIP ``instances``) says of a prediction: which version, channel, task
    and plan answered, whether its weights are random, and the instances' labels and scores."""
    res, cfg = pred.result, predictor.config
    return {
        "version": pred.version, "channel": cfg.channel, "task": cfg.task, "plan": predictor.plan_name,
        "random_weights": cfg.random_weights, "weights_note": cfg.weights_note,
        "labels": [i.class_name for i in res.instances],
        "scores": [round(float(i.score), 6) for i in res.instances],
        "classes_present": sorted(cfg.classes[c] for c in np.flatnonzero(np.bincount(res.label_map.ravel()))),
    }


def persons(res: ParseResult, mask_format: str | None = None) -> list[dict[str, Any]]:
    """The persons of a parse as every answer lists them (``/parse``'s ``persons``, OIP ``instances``): id,
    score and parts, with each person's mask in ``mask_format`` when one is given."""
    out = []
    for p in res.persons:
        person: dict[str, Any] = {"id": p.id, "score": round(float(p.score), 6)}
        if mask_format is not None:
            person["mask"] = encode_mask(p.mask, mask_format)
        person["parts"] = [{"label": q.class_name, "score": round(float(q.score), 6)} for q in p.parts]
        out.append(person)
    return out


def parse(predictor: Predictor, data: bytes, limits: ImageLimits, opts: RenderOptions) -> dict[str, Any]:
    """Decode, predict and render one request; every step timed."""
    rgb, pred = predicted(predictor, data, limits)
    timings = pred.timings
    t1 = time.perf_counter()
    res = pred.result
    body: dict[str, Any] = {"success": True, **summary(predictor, pred),
                            "image": {"height": res.hw[0], "width": res.hw[1]}}
    if opts.visualization:
        t2 = time.perf_counter()
        overlay = draw(predictor, res, rgb, opts)
        drawn = time.perf_counter() - t2
        body["visualization"] = encode_overlay(overlay, opts.visualization_format)
        body["visualization_format"] = opts.visualization_format
        body["visualization_size"] = {"height": int(overlay.shape[0]), "width": int(overlay.shape[1])}
    else:
        drawn = 0.0
    if "label_map" in opts.include:
        body["label_map"] = png_b64(res.label_map.astype(np.uint8))
    if "person_map" in opts.include and res.person_map is not None:
        body["person_map"] = png_b64(res.person_map.astype(np.uint16))
    if "persons" in opts.include:
        body["persons"] = persons(res, opts.mask_format)
    if "masks" in opts.include:
        body["masks"] = [encode_mask(i.mask, opts.mask_format) for i in res.instances]
    timings["render"] = drawn  # the overlay; encode: images, maps and masks to base64 / RLE
    timings["encode"] = time.perf_counter() - t1 - drawn
    body["timing"] = {k: round(v * 1000, 2) for k, v in timings.items()}
    return body
