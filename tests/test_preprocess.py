"""``prepare`` against the tensor ModelScope's pipeline and model build from the same image."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from m2fpkit.runtime.bundle.config import Preprocess
from m2fpkit.runtime.preprocess import Prepared, canvas_size, prepare, shortest_edge_size
from reference.modelscope_pipeline import bundle_config, modelscope_input, synthetic_image

CANVAS = (112, 150)  # single-human [width, height] of the tiny reference (not a multiple of 32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(("hw", "short", "longest"), [
    ((480, 640), 640, 1333),   # upscale, width 853 (not /32)
    ((64, 48), 640, 1333),     # portrait, ×13 upscale
    ((100, 500), 640, 1333),   # long side clamped to 1333
    ((1000, 700), 640, 1333),  # downscale (antialiased)
    ((123, 77), 160, 320),
])
def test_shortest_edge_matches_modelscope(ref_multi, hw, short, longest):
    rgb = synthetic_image(*hw, seed=hw[0])
    pre = Preprocess(short_edge=short, max_size=longest)
    ours = prepare(rgb, pre)
    tensor, image_size, crop = modelscope_input(ref_multi.pipe, rgb, short, longest)
    assert ours.tensor.shape == tensor.shape
    assert ours.resized_hw == image_size and ours.crop_box is crop is None
    assert ours.original_hw == hw
    np.testing.assert_allclose(ours.tensor, tensor, atol=1e-5, rtol=0)
    assert ours.tensor.std() > 0.3  # a real image, not padding


@pytest.mark.parametrize("hw", [
    (150, 100),   # fits: centred on the canvas, no resize
    (90, 60),     # small: wide grey margins
    (300, 180),   # portrait, downscaled to the canvas height
    (200, 400),   # landscape, downscaled to the canvas width
    (149, 111),   # left and top margins round to 0: ModelScope leaves the canvas out
    (151, 112),   # downscaled to 150x111: the same quirk
    (700, 500),
])
def test_center_canvas_matches_modelscope(ref_single, hw):
    rgb = synthetic_image(*hw, seed=hw[1])
    pre = bundle_config(ref_single.cfg).preprocess
    assert pre.canvas == CANVAS
    ours = prepare(rgb, pre)
    tensor, image_size, crop = modelscope_input(ref_single.pipe, rgb)
    assert ours.tensor.shape == tensor.shape
    assert ours.resized_hw == image_size and list(ours.crop_box) == crop
    np.testing.assert_allclose(ours.tensor, tensor, atol=1e-5, rtol=0)


def test_center_canvas_fill_is_applied_before_normalisation():
    pre = Preprocess(resize="center-canvas", canvas=(64, 96))
    out = prepare(np.zeros((40, 20, 3), np.uint8), pre)
    assert out.crop_box == (22, 28, 42, 68) and out.resized_hw == (96, 64)
    grey = (128 - np.array(pre.mean)) / np.array(pre.std)
    np.testing.assert_allclose(out.tensor[0, :, 0, 0], grey, rtol=1e-6)
    np.testing.assert_allclose(out.tensor[0, :, 30, 30], -np.array(pre.mean) / np.array(pre.std), rtol=1e-6)
    assert out.content_box == out.crop_box


def test_quirk_pads_with_pad_value_not_canvas_fill():
    pre = Preprocess(resize="center-canvas", canvas=(64, 96))
    out = prepare(np.full((95, 63, 3), 200, np.uint8), pre)  # margins 1 right / 1 bottom
    assert out.crop_box == (0, 0, 63, 95) and out.resized_hw == (95, 63)
    assert out.tensor.shape == (1, 3, 96, 64)
    assert (out.tensor[0, :, 95, :] == pre.pad_value).all() and (out.tensor[0, :, :, 63] == pre.pad_value).all()


def test_prepared_layout_and_padding():
    pre = Preprocess(short_edge=100, max_size=200, pad_value=-7.0)
    out = prepare(synthetic_image(50, 75, seed=3), pre)
    assert isinstance(out, Prepared)
    assert out.resized_hw == (100, 150) and out.padded_hw == (128, 160)
    assert out.tensor.dtype == np.float32 and out.tensor.flags.c_contiguous
    assert (out.tensor[0, :, 100:, :] == -7.0).all() and (out.tensor[0, :, :, 150:] == -7.0).all()
    assert (out.tensor[0, :, :100, :150] != -7.0).any()
    assert out.content_box == (0, 0, 150, 100)


def test_bgr_channel_order_swaps_channels():
    rgb = synthetic_image(32, 32, seed=4)
    pre = Preprocess(short_edge=32, max_size=64, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    a = prepare(rgb, pre).tensor
    b = prepare(rgb, dataclasses.replace(pre, channel_order="BGR")).tensor
    np.testing.assert_array_equal(a[:, ::-1], b)


def test_size_rules():
    assert shortest_edge_size(480, 640, 640, 1333) == (640, 853)
    assert shortest_edge_size(100, 500, 640, 1333) == (267, 1333)
    assert shortest_edge_size(640, 640, 640, 1333) == (640, 640)
    assert canvas_size(700, 450, 384, 512) == (512, 329)
    assert canvas_size(400, 600, 384, 512) == (256, 384)
    assert canvas_size(100, 80, 384, 512) == (100, 80)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8),
                                 np.zeros((4, 4, 3), np.float32), np.zeros((0, 4, 3), np.uint8)])
def test_bad_arrays_are_refused(bad):
    with pytest.raises(ValueError):
        prepare(bad, Preprocess())
