"""A golden sample for the bundle: an image and the label map the *PyTorch* model gives for it.

The runtime re-parses the image at load time with onnxruntime and refuses the version unless the
label maps agree (``min_agreement``): a bundle proves on the edge box that it computes what the
PyTorch model computed at export, not merely that it runs.

The image shows people: by default a drawn scene (``runtime.figures.scene``, seed :data:`SCENE_SEED`, the
bundle's task), or the user's own photo (``m2fp-export --golden IMAGE``, :func:`read_image`). A label map of
one class or without a person pixel proves little; it is recorded as ``golden → degenerate``
(``runtime.bundle.golden_check.judge``, the rule the runtime applies again at load).
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import torch

from m2fpkit.runtime import figures
from m2fpkit.runtime.agreement import semantic_labels
from m2fpkit.runtime.bundle.config import GOLDEN_MIN_AGREEMENT, BundleConfig, Golden
from m2fpkit.runtime.bundle.golden_check import judge
from m2fpkit.runtime.errors import ExportError, InputError
from m2fpkit.runtime.imageio import decode_image
from m2fpkit.runtime.postprocess import postprocess
from m2fpkit.runtime.preprocess import prepare

from .model.m2fp import M2FP

log = logging.getLogger(__name__)

IMAGE = "golden/input.png"
LABELS = "golden/labels.png"
#: PyTorch's semantic argmax at mask resolution (``runtime.agreement.semantic_labels``): execution plans
#: are verified on it too, since random weights leave the final label map nearly all background
SEMANTIC = "golden/semantic.png"
#: the ``figures.scene`` seed of the default golden image: every export draws the same people
SCENE_SEED = 7
#: ``(height, width)`` of the default multi-human scene; a single-human scene fills the bundle's canvas
MULTI_HUMAN_SIZE = (384, 512)


def scene_size(config: BundleConfig) -> tuple[int, int]:
    """``(height, width)`` of the default golden scene: the canvas of a single-human bundle (within the
    generator's side limits), else :data:`MULTI_HUMAN_SIZE`."""
    return figures.size_for(config.preprocess.resize, config.preprocess.canvas, MULTI_HUMAN_SIZE)


def default_image(config: BundleConfig) -> np.ndarray:
    """The default golden image (RGB uint8): people drawn by ``figures.scene`` for the bundle's task."""
    h, w = scene_size(config)
    return figures.scene(SCENE_SEED, h, w, task=config.task).image


def read_image(path: Path) -> np.ndarray:
    """The photo at ``path`` decoded as the runtime decodes images (RGB uint8); ExportError naming it."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ExportError(f"golden image {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        return decode_image(data)
    except InputError as exc:
        raise ExportError(f"golden image {path}: not a usable image ({exc})") from None


def write_golden(model: M2FP, config: BundleConfig, bundle_dir: Path, image: np.ndarray | None = None) -> Golden:
    """Write the sample (``image``, RGB uint8; default :func:`default_image`) and its PyTorch label map into
    ``bundle_dir``; return config.json's ``golden``, ``degenerate`` set by ``golden_check.judge``."""
    rgb = np.ascontiguousarray(default_image(config) if image is None else image, dtype=np.uint8)
    (bundle_dir / "golden").mkdir(exist_ok=True)
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ExportError("cannot encode the golden image")
    (bundle_dir / IMAGE).write_bytes(png.tobytes())
    decoded = decode_image(png.tobytes())  # exactly what the runtime will see
    prepared = prepare(decoded, config.preprocess)
    with torch.no_grad():
        logits, masks = model(torch.from_numpy(prepared.tensor))
    result = postprocess(logits.numpy(), masks.numpy(), prepared, config)
    if not cv2.imwrite(str(bundle_dir / LABELS), result.label_map.astype(np.uint8)):
        raise ExportError("cannot write the golden label map")
    if not cv2.imwrite(str(bundle_dir / SEMANTIC), semantic_labels(logits.numpy(), masks.numpy())[0].astype(np.uint8)):
        raise ExportError("cannot write the golden semantic map")
    verdict = judge(result.label_map, config.classes)
    if verdict.degenerate:
        log.warning("%s: golden sample degenerate: %s", config.version, verdict.reason)
    return Golden(IMAGE, LABELS, SEMANTIC, GOLDEN_MIN_AGREEMENT, tuple(sorted(verdict.classes)),
                  degenerate=verdict.reason)
