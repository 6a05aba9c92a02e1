"""RGB image → the graph's input tensor, as ModelScope's human-parsing pipeline prepares it.

- ``shortest-edge`` (multi-human): resize so the short side is ``short_edge`` and the long side at
  most ``max_size``, sizes rounded with ``int(x + 0.5)``; Pillow-style antialiased bilinear.
- ``center-canvas`` (single-human): downscale only, keeping the aspect ratio (ModelScope truncates
  with ``int()``), then centre on a ``[width, height]`` canvas of raw value ``canvas_fill``.
  ModelScope skips the canvas when the left and top margins both round to 0, even if the right or
  bottom one is 1 pixel; that quirk is kept, so such inputs are padded to /32 with ``pad_value``.

Then ``(x - mean) / std`` in float32, pad bottom/right to a multiple of ``size_divisibility`` with
``pad_value`` (normalised units), NCHW, batch 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bundle.config import Preprocess
from .resize import resize_uint8


@dataclass(frozen=True)
class Prepared:
    """The graph input and the geometry needed to map outputs back onto the original image.

    ``resized_hw`` is the extent of the input before the /32 padding (ModelScope's ``image_size``):
    the resized image, or the canvas for ``center-canvas``. ``crop_box`` is ``[x0, y0, x1, y1]`` of
    the image inside that extent (``center-canvas`` only, else None).
    """

    tensor: np.ndarray
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    crop_box: tuple[int, int, int, int] | None = None

    @property
    def padded_hw(self) -> tuple[int, int]:
        return int(self.tensor.shape[2]), int(self.tensor.shape[3])

    @property
    def content_box(self) -> tuple[int, int, int, int]:
        """``[x0, y0, x1, y1]`` of the image pixels inside the input tensor, for either policy."""
        if self.crop_box is not None:
            return self.crop_box
        return 0, 0, self.resized_hw[1], self.resized_hw[0]


def shortest_edge_size(h: int, w: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """``(new_h, new_w)`` as ModelScope's ``_get_preprocess_shape`` computes it."""
    size = short_edge * 1.0
    scale = size / min(h, w)
    if h < w:
        new_h, new_w = size, scale * w
    else:
        new_h, new_w = scale * h, size
    if max(new_h, new_w) > max_size:
        scale = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    # ModelScope would fail on a zero side (only reachable at extreme aspect ratios)
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


def canvas_size(h: int, w: int, canvas_w: int, canvas_h: int) -> tuple[int, int]:
    """``(new_h, new_w)`` of the image on the canvas: ModelScope's downscale-only rules."""
    new_h, new_w = h, w
    if h > canvas_h and w > canvas_w:
        if h >= w:
            new_h = canvas_h
            new_w = int(new_h * w / h)
            if new_w > canvas_w:
                new_w = canvas_w
                new_h = int(new_w * h / w)
        else:
            new_w = canvas_w
            new_h = int(new_w * h / w)
            if new_h > canvas_h:
                new_h = canvas_h
                new_w = int(new_h * w / h)
    elif h > canvas_h:
        new_h = canvas_h
        new_w = int(new_h * w / h)
    elif w > canvas_w:
        new_w = canvas_w
        new_h = int(new_w * h / w)
    return max(1, new_h), max(1, new_w)


def _on_canvas(rgb: np.ndarray, canvas: tuple[int, int],
               fill: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    canvas_w, canvas_h = canvas
    h, w = rgb.shape[:2]
    new_h, new_w = canvas_size(h, w, canvas_w, canvas_h)
    img = rgb if (new_h, new_w) == (h, w) else resize_uint8(rgb, (new_h, new_w))
    top, left = int((canvas_h - new_h) / 2), int((canvas_w - new_w) / 2)
    box = (left, top, left + new_w, top + new_h)
    if top == 0 and left == 0:
        return img, box  # ModelScope's PadTransform returns the image unpadded in this case
    out = np.full((canvas_h, canvas_w, rgb.shape[2]), fill, dtype=np.uint8)
    out[top:top + new_h, left:left + new_w] = img
    return out, box


def prepare(rgb: np.ndarray, pre: Preprocess) -> Prepared:
    """Resize, normalise and pad an HxWx3 uint8 RGB image into a ``(1, 3, Hp, Wp)`` float32 tensor."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    if h < 1 or w < 1:
        raise ValueError(f"image is empty ({w}x{h})")
    crop_box: tuple[int, int, int, int] | None = None
    if pre.resize == "center-canvas":
        if pre.canvas is None:
            raise ValueError("center-canvas preprocessing needs a canvas size")
        img, crop_box = _on_canvas(rgb, pre.canvas, pre.canvas_fill)
    elif pre.resize == "shortest-edge":
        size = shortest_edge_size(h, w, pre.short_edge, pre.max_size)
        img = rgb if size == (h, w) else resize_uint8(rgb, size)
    else:
        raise ValueError(f"unknown resize policy {pre.resize!r}")
    if pre.channel_order == "BGR":
        img = img[:, :, ::-1]
    ih, iw = img.shape[:2]
    div = max(1, pre.size_divisibility)
    ph, pw = -(-ih // div) * div, -(-iw // div) * div
    tensor = np.full((1, 3, ph, pw), pre.pad_value, dtype=np.float32)
    mean = np.asarray(pre.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(pre.std, dtype=np.float32).reshape(3, 1, 1)
    chw = img.transpose(2, 0, 1).astype(np.float32)
    np.subtract(chw, mean, out=chw)
    np.divide(chw, std, out=tensor[0, :, :ih, :iw])
    return Prepared(tensor=tensor, original_hw=(h, w), resized_hw=(ih, iw), crop_box=crop_box)
