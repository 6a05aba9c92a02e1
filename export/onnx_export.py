"""PyTorch M2FP → ONNX (dynamo exporter, dynamic height/width in multiples of 32, external weights)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch

from .model.m2fp import M2FP, SIZE_DIVISIBILITY

log = logging.getLogger(__name__)

INPUT = "image"
OUTPUTS = ("pred_logits", "pred_masks")
MAX_SIDE_BLOCKS = 256  # dynamic sides up to 256 * 32 = 8192 px


def export_onnx(model: M2FP, path: Path, *, opset: int, example_hw: tuple[int, int] = (256, 320)) -> None:
    """Write ``path`` (+ ``path.data``): input ``image [1,3,32*h,32*w]`` normalised RGB, outputs logits/masks."""
    h, w = example_hw
    if h % SIZE_DIVISIBILITY or w % SIZE_DIVISIBILITY:
        raise ValueError(f"example size {example_hw} must be a multiple of {SIZE_DIVISIBILITY}")
    x = torch.zeros(1, 3, h, w)
    hd = torch.export.Dim("h32", min=1, max=MAX_SIDE_BLOCKS)
    wd = torch.export.Dim("w32", min=1, max=MAX_SIDE_BLOCKS)
    out = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(out), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), str(path), input_names=[INPUT], output_names=list(OUTPUTS), dynamo=True,
            opset_version=opset, external_data=True, optimize=True, verbose=False,
            dynamic_shapes={"image": {2: SIZE_DIVISIBILITY * hd, 3: SIZE_DIVISIBILITY * wd}},
        )
    for line in out.getvalue().splitlines():
        log.debug("torch.onnx: %s", line)


def set_metadata(path: Path, props: dict[str, str]) -> None:
    """Store bundle identity in the graph's ``metadata_props`` (readable through onnxruntime)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    del model.metadata_props[:]
    for k, v in sorted(props.items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = k, str(v)
    onnx.save(model, str(path))
