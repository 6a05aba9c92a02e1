"""Resizing in numpy/OpenCV that reproduces what ModelScope's pipeline gets from Pillow and PyTorch.

- :func:`resize_uint8` is Pillow's ``Image.resize(size, BILINEAR)``: a triangle filter whose support
  grows with the downscale factor (antialiasing), fixed-point weights with 22 fractional bits,
  horizontal pass first, the intermediate image rounded and clipped to uint8.
- :func:`resize_float` is ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``
  (no antialiasing), which ``cv2.resize(INTER_LINEAR)`` computes on float32 data.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point precision for 8-bit images
_CV2_MAX_CHANNELS = 512  # OpenCV's CV_CN_MAX


def _coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """First source index and fixed-point weights of every output sample: ``(out,)``, ``(out, taps)``."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the bilinear (triangle) filter has support 1
    taps = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    # C casts truncate towards zero; both bounds are clamped, which makes truncation equal flooring
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
    k = np.arange(taps)
    t = np.abs((k[None, :] + xmin[:, None] - center[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(t < 1.0, 1.0 - t, 0.0)
    w[k[None, :] >= xmax[:, None]] = 0.0
    total = np.zeros(out_size)
    for j in range(taps):  # summed tap by tap, in Pillow's order, so the rounding below agrees
        total += w[:, j]
    w = w / np.where(total == 0.0, 1.0, total)[:, None]
    fixed = np.where(w < 0, w * (1 << _PRECISION_BITS) - 0.5, w * (1 << _PRECISION_BITS) + 0.5)
    return xmin, fixed.astype(np.int32)


def _rows(img: np.ndarray, out_size: int) -> np.ndarray:
    """One separable pass of Pillow's bilinear filter along axis 0 (whole rows are gathered: fast)."""
    in_size = img.shape[0]
    xmin, weights = _coefficients(in_size, out_size)
    bshape = (out_size,) + (1,) * (img.ndim - 1)
    acc = np.full((out_size,) + img.shape[1:], 1 << (_PRECISION_BITS - 1), dtype=np.int32)
    for j in range(weights.shape[1]):
        col = weights[:, j]
        if not col.any():
            continue
        idx = np.minimum(xmin + j, in_size - 1)  # taps past the end carry weight 0
        tap = img[idx].astype(np.int32)
        tap *= col.reshape(bshape)
        acc += tap
    np.right_shift(acc, _PRECISION_BITS, out=acc)
    return np.clip(acc, 0, 255).astype(np.uint8)


def resize_uint8(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pillow-compatible antialiased bilinear resize of an HxW or HxWxC uint8 image to ``size=(h, w)``."""
    if img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise ValueError(f"expected an HxW or HxWxC uint8 image, got {img.dtype} {img.shape}")
    out_h, out_w = int(size[0]), int(size[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"target size must be positive, got {out_h}x{out_w}")
    out = img
    if out_w != img.shape[1]:  # horizontal pass first, as Pillow does; done on the transposed image
        out = np.ascontiguousarray(_rows(np.ascontiguousarray(out.swapaxes(0, 1)), out_w).swapaxes(0, 1))
    if out_h != img.shape[0]:
        out = _rows(out, out_h)
    return out if out is not img else img.copy()


def resize_float(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (half-pixel centres, no antialiasing) of HxW or HxWxC float data to ``(h, w)``.

    Equal, up to float rounding, to ``F.interpolate(x, size, mode="bilinear", align_corners=False)``.
    """
    if arr.ndim not in (2, 3):
        raise ValueError(f"expected HxW or HxWxC, got shape {arr.shape}")
    out_h, out_w = int(size[0]), int(size[1])
    src = np.ascontiguousarray(arr, dtype=np.float32)
    if src.shape[:2] == (out_h, out_w):
        return src.copy() if src is arr else src
    if src.ndim == 2 or src.shape[2] <= _CV2_MAX_CHANNELS:
        out = cv2.resize(src, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
        return out.reshape(out_h, out_w, *src.shape[2:])
    out = np.empty((out_h, out_w, src.shape[2]), dtype=np.float32)
    for c in range(0, src.shape[2], _CV2_MAX_CHANNELS):
        part = np.ascontiguousarray(src[:, :, c:c + _CV2_MAX_CHANNELS])
        res = cv2.resize(part, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
        out[:, :, c:c + _CV2_MAX_CHANNELS] = res.reshape(out_h, out_w, -1)
    return out


def resize_chw(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """:func:`resize_float` for channel-first ``(C, H, W)`` data; returns ``(C, h, w)`` float32."""
    if arr.ndim != 3:
        raise ValueError(f"expected CxHxW, got shape {arr.shape}")
    return np.ascontiguousarray(resize_float(arr.transpose(1, 2, 0), size).reshape(
        int(size[0]), int(size[1]), arr.shape[0]).transpose(2, 0, 1))
