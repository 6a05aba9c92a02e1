"""A golden sample for the bundle: an image and the label map the *PyTorch* model gives for it.

The runtime re-parses the image at load time with onnxruntime and refuses the version unless the
label maps agree (``min_agreement``): a bundle proves on the edge box that it computes what the
PyTorch model computed at export, not merely that it runs.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from m2fpkit.runtime.agreement import semantic_labels
from m2fpkit.runtime.bundle.config import GOLDEN_MIN_AGREEMENT, BundleConfig, Golden
from m2fpkit.runtime.imageio import decode_image
from m2fpkit.runtime.postprocess import postprocess
from m2fpkit.runtime.preprocess import prepare

from .model.m2fp import M2FP
from .parity import synthetic_image

IMAGE = "golden/input.png"
LABELS = "golden/labels.png"
#: PyTorch's semantic argmax at mask resolution (``runtime.agreement.semantic_labels``): execution plans
#: are verified on it too, since random weights leave the final label map nearly all background
SEMANTIC = "golden/semantic.png"


def write_golden(model: M2FP, config: BundleConfig, bundle_dir: Path, size: tuple[int, int] = (360, 280)) -> Golden:
    """Write the sample and its PyTorch label map into ``bundle_dir``; return config.json's ``golden``."""
    h, w = size
    rgb = np.ascontiguousarray(synthetic_image(h, w, seed=7).transpose(1, 2, 0).round().astype(np.uint8))
    (bundle_dir / "golden").mkdir(exist_ok=True)
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("cannot encode the golden image")
    (bundle_dir / IMAGE).write_bytes(png.tobytes())
    decoded = decode_image(png.tobytes())  # exactly what the runtime will see
    prepared = prepare(decoded, config.preprocess)
    with torch.no_grad():
        logits, masks = model(torch.from_numpy(prepared.tensor))
    result = postprocess(logits.numpy(), masks.numpy(), prepared, config)
    if not cv2.imwrite(str(bundle_dir / LABELS), result.label_map.astype(np.uint8)):
        raise RuntimeError("cannot write the golden label map")
    if not cv2.imwrite(str(bundle_dir / SEMANTIC), semantic_labels(logits.numpy(), masks.numpy())[0].astype(np.uint8)):
        raise RuntimeError("cannot write the golden semantic map")
    return Golden(IMAGE, LABELS, SEMANTIC, GOLDEN_MIN_AGREEMENT,
                  tuple(sorted({config.classes[c] for c in np.unique(result.label_map).tolist()})))
