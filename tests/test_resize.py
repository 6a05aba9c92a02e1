"""The numpy resizes against what ModelScope's pipeline uses: Pillow's bilinear and torch's interpolate."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from m2fpkit.runtime.resize import resize_chw, resize_float, resize_uint8


def _image(h: int, w: int, channels: int | None, seed: int) -> np.ndarray:
    """Noise over smooth colour: every frequency is present, so filter differences show."""
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels is None else (h, w, channels)
    smooth = cv2.resize(rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), channels or 1), dtype=np.uint8),
                        (w, h), interpolation=cv2.INTER_CUBIC).reshape(shape)
    noise = rng.integers(-60, 61, shape)
    return np.clip(smooth.astype(int) + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("src", "dst"), [
    ((100, 150), (640, 960)),    # upscale ×6.4 (multi-human's usual direction)
    ((480, 640), (640, 853)),    # mild upscale to a width that is not a multiple of 32
    ((720, 1280), (640, 1138)),  # downscale: the filter support widens (antialiasing)
    ((700, 500), (150, 107)),    # strong downscale ×4.7 (single-human canvas)
    ((333, 517), (101, 77)),     # different factors per axis
    ((64, 48), (64, 97)),        # one axis only
    ((5, 7), (1, 1)),
])
@pytest.mark.parametrize("channels", [3, None])
def test_resize_uint8_matches_pillow_bilinear(src, dst, channels):
    img = _image(*src, channels, seed=src[0] + dst[1])
    ours = resize_uint8(img, dst)
    ref = np.asarray(Image.fromarray(img).resize((dst[1], dst[0]), Image.BILINEAR))
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 1
    assert (diff == 0).mean() >= 0.999
    assert img.std() > 20  # the comparison is not between two flat images


def test_resize_uint8_same_size_is_a_copy():
    img = _image(20, 30, 3, seed=1)
    out = resize_uint8(img, (20, 30))
    assert np.array_equal(out, img) and out is not img


@pytest.mark.parametrize(("img", "size"), [
    (np.zeros((4, 4, 3), np.float32), (2, 2)),
    (np.zeros((4,), np.uint8), (2, 2)),
    (np.zeros((4, 4, 3), np.uint8), (0, 2)),
])
def test_resize_uint8_rejects_bad_input(img, size):
    with pytest.raises(ValueError):
        resize_uint8(img, size)


def _torch_bilinear(x_chw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return F.interpolate(torch.from_numpy(x_chw)[None], size=size, mode="bilinear", align_corners=False)[0].numpy()


@pytest.mark.parametrize(("src", "dst"), [
    ((32, 48), (128, 192)),     # mask logits → padded input (×4)
    ((40, 60), (270, 480)),     # → an original size that is not a multiple
    ((160, 240), (120, 180)),   # cropped input → smaller original (downscale, no antialias)
    ((97, 131), (33, 70)),
    ((7, 9), (7, 9)),
])
@pytest.mark.parametrize("channels", [1, 3, 20])
def test_resize_float_matches_torch_interpolate(src, dst, channels):
    rng = np.random.default_rng(channels)
    x = (rng.standard_normal((channels, *src)) * 3).astype(np.float32)
    ref = _torch_bilinear(x, dst)
    if channels == 1:
        ours = resize_float(x[0], dst)[None]
    else:
        ours = resize_float(np.ascontiguousarray(x.transpose(1, 2, 0)), dst).transpose(2, 0, 1)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)
    np.testing.assert_allclose(resize_chw(x, dst), ref, atol=1e-3, rtol=0)
