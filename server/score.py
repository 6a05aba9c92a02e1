"""``POST /api/{version}/score``: one image parsed by a version and scored against the label map a user gives.

Invariants:

* The request is a parse request: the version is chosen as the parse route chooses it
  (:func:`handlers.choose_version`), the body is read by the intake under its bounds (upload slot, deadline,
  size cap: :func:`intake.read_files`, the fields ``image`` and ``label``), and the work runs on the parse
  route's own path (:func:`handlers.run_parse`: lease, admission, request timeout, metrics); image errors are
  the parse route's.
* The label part is untrusted bytes, read in the worker before any inference by the dataset reader's own
  :func:`~m2fpkit.runtime.quality.dataset.decode_label` (an 8-bit single-channel PNG of class ids, 255 = not
  scored, within the pixel limit): anything else is 400 ``bad_label`` naming the problem. A label that is a
  label map but not this one's is 422 — ``label_mismatch``: another size than the decoded image (checked
  before the inference), or a class id outside the version's classes; ``nothing_to_score``: every pixel 255.
* Scores are :func:`~m2fpkit.runtime.quality.metrics.score`'s (``m2fp-eval``'s arithmetic): per-class IoU and
  mIoU over the classes present in the label, in the version's class order.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
from aiohttp import web

from m2fpkit.runtime.errors import DatasetError
from m2fpkit.runtime.predictor import ImageLimits, Predictor
from m2fpkit.runtime.quality import dataset, metrics

from . import handlers, keys, render, replies
from .errors import HTTPProblem
from .intake import read_files

#: the multipart file fields of a score request
FIELDS = ("image", "label")
#: what a label part is called in messages
LABEL = "label"


def read_label(data: bytes, max_pixels: int) -> np.ndarray:
    """The label part as an ``(H, W)`` uint8 array of class ids; 400 ``bad_label`` naming the problem otherwise
    (not a PNG, not 8-bit single-channel, over the pixel limit, corrupt)."""
    try:
        return dataset.decode_label(data, LABEL, max_pixels=max_pixels)
    except DatasetError as exc:
        raise HTTPProblem(400, "bad_label", f"{exc}; send the label map as an 8-bit single-channel (grayscale) "
                                            "PNG of class ids, 255 = not scored") from None


def check_classes(label: np.ndarray, version: str, classes: tuple[str, ...]) -> None:
    """422 ``label_mismatch`` when ``label`` holds a class id outside ``classes`` (255 aside), ``nothing_to_score``
    when it holds no class id at all."""
    try:
        dataset.check_classes(label, len(classes), LABEL)
    except DatasetError as exc:
        raise HTTPProblem(422, "label_mismatch", f"{exc}: {version} has {len(classes)} classes "
                                                 f"({classes[0]} … {classes[-1]}; GET /api/{version}/meta lists "
                                                 "them in id order)") from None
    if dataset.largest_class(label) < 0:
        raise HTTPProblem(422, "nothing_to_score", f"label: every pixel is {metrics.IGNORE} (not scored): "
                                                   "nothing to score")


def check_size(label: np.ndarray, rgb: np.ndarray) -> None:
    """422 ``label_mismatch`` when the label map's size is not the decoded image's."""
    if label.shape != rgb.shape[:2]:
        raise HTTPProblem(422, "label_mismatch", f"label: {label.shape[1]}x{label.shape[0]} pixels, but the image "
                                                 f"decodes to {rgb.shape[1]}x{rgb.shape[0]} (EXIF orientation "
                                                 "applied); the label map has the image's size")


def scored(label_bytes: bytes, predictor: Predictor, data: bytes, limits: ImageLimits) -> dict[str, Any]:
    """Read and check the label, parse the image, score the parse against the label (on the inference pool);
    a body whose ``timing`` holds milliseconds."""
    t0 = time.perf_counter()
    cfg = predictor.config
    label = read_label(label_bytes, limits.max_pixels)
    check_classes(label, cfg.version, tuple(cfg.classes))
    read = time.perf_counter() - t0
    _rgb, pred = render.predicted(predictor, data, limits, check=functools.partial(check_size, label))
    t1 = time.perf_counter()
    s = metrics.score(pred.result.label_map, label, cfg.classes)
    timings = {"label": read, **pred.timings, "score": time.perf_counter() - t1}
    return {"success": True, "version": pred.version, "plan": predictor.plan_name,
            "image": {"height": pred.result.hw[0], "width": pred.result.hw[1]},
            "miou": s.miou, "pixel_accuracy": s.pixel_accuracy, "mean_class_accuracy": s.mean_class_accuracy,
            "per_class": s.per_class, "pixels": s.pixels,
            "timing": {k: round(v * 1000, 2) for k, v in timings.items()}}


async def score(request: web.Request) -> web.StreamResponse:
    version, rule = handlers.choose_version(request, request.match_info["version"])  # before the body is read
    request[keys.VERSION], request[keys.RULE] = version, rule
    parts = await read_files(request, FIELDS, "send multipart/form-data with the file fields 'image' and 'label'")
    body = await handlers.run_parse(request, version, rule, parts.pop("image"),
                                    functools.partial(scored, parts.pop(LABEL)))
    body["route"] = rule
    body["request_id"] = request[keys.REQUEST_ID]
    return await replies.json_reply(request, body, {"X-Model-Version": version, "X-Route-Rule": rule},
                                    "the score reply")
