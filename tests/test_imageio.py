"""Decoding request bytes: formats, header-only size guards, and pixels equal to ModelScope's Pillow path."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from m2fpkit.runtime import imageio
from m2fpkit.runtime.errors import (
    BadAspectRatio,
    EmptyImage,
    ImageTooLarge,
    InputError,
    UndecodableImage,
    UnsupportedImageFormat,
)
from m2fpkit.runtime.imageio import decode_image, probe


def _rgb(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _pil_bytes(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def _modelscope_rgb(data: bytes) -> np.ndarray:
    """What ModelScope's LoadImage gives: exif_transpose, then convert('RGB')."""
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


@pytest.fixture
def no_decode(monkeypatch):
    """Fail the test if anything reaches the full decode."""
    def refuse(*args, **kwargs):
        raise AssertionError("cv2.imdecode was called")
    monkeypatch.setattr(imageio.cv2, "imdecode", refuse)


# ----------------------------------------------------------------------------------- good images

@pytest.mark.parametrize(("fmt", "kw", "lossless"), [
    ("PNG", {}, True), ("BMP", {}, True), ("TIFF", {}, True), ("WEBP", {"lossless": True}, True),
    ("WEBP", {"quality": 90}, False), ("JPEG", {"quality": 95}, False),
])
def test_supported_formats_decode_like_pillow(fmt, kw, lossless):
    arr = _rgb(37, 53)
    data = _pil_bytes(arr, fmt, **kw)
    info = probe(data)
    assert (info.width, info.height) == (53, 37)
    out = decode_image(data)
    assert out.shape == (37, 53, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    ref = _modelscope_rgb(data)
    if lossless:
        assert np.array_equal(out, arr) and np.array_equal(out, ref)
    else:
        assert np.abs(out.astype(int) - ref).mean() < 2.0


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP"])
def test_pure_red_is_rgb_not_bgr(fmt):
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    out = decode_image(_pil_bytes(red, fmt))
    assert out[..., 0].min() >= 250 and out[..., 1:].max() <= 5


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_like_exif_transpose(orientation):
    arr = _rgb(40, 64, seed=orientation)
    arr[:8, :8] = (255, 0, 0)  # a marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _pil_bytes(arr, "JPEG", exif=exif, quality=95)
    out = decode_image(data)
    ref = _modelscope_rgb(data)
    assert out.shape == ref.shape == ((40, 64, 3) if orientation == 3 else (64, 40, 3))
    assert np.abs(out.astype(int) - ref).mean() < 2.0
    assert not np.array_equal(out[:8, :8].mean((0, 1)).round(), [255, 0, 0])  # the corner moved


def test_grayscale_becomes_three_equal_channels():
    grey = _rgb()[..., 1]
    for data in (_pil_bytes(grey, "PNG"), _pil_bytes(grey, "JPEG", quality=95)):
        out = decode_image(data)
        assert out.shape == grey.shape + (3,)
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
        assert np.abs(out.astype(int) - _modelscope_rgb(data)).max() <= 1


def test_alpha_is_dropped_without_compositing():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (200, 50, 10)
    rgba[:4, ..., 3] = 0      # fully transparent: compositing would turn these white or black
    rgba[4:, ..., 3] = 128
    for fmt, kw in (("PNG", {}), ("WEBP", {"lossless": True, "exact": True})):
        data = _pil_bytes(rgba, fmt, **kw)
        out = decode_image(data)
        assert out.shape == (8, 8, 3)
        assert (out == (200, 50, 10)).all()
        assert np.array_equal(out, _modelscope_rgb(data))


def test_16_bit_png_keeps_the_high_byte():
    rgb16 = (np.arange(48, dtype=np.uint16).reshape(4, 4, 3) * 1361 + 7)
    ok, png = cv2.imencode(".png", rgb16[..., ::-1])  # OpenCV writes BGR
    assert ok
    out = decode_image(png.tobytes())
    assert out.dtype == np.uint8 and np.array_equal(out, (rgb16 >> 8).astype(np.uint8))
    grey16 = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000)
    ok, png = cv2.imencode(".png", grey16)
    out = decode_image(png.tobytes())
    assert np.array_equal(out, np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, axis=2))


def test_bytes_like_inputs_are_accepted():
    data = _pil_bytes(_rgb(), "PNG")
    assert np.array_equal(decode_image(bytearray(data)), decode_image(memoryview(data)))


# ----------------------------------------------------------------------------------------- errors

def test_empty():
    with pytest.raises(EmptyImage):
        decode_image(b"")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("keep", [0.4, 0.9])
def test_truncated_data_is_undecodable(fmt, keep):
    data = _pil_bytes(_rgb(64, 80), fmt, **({"quality": 90} if fmt != "PNG" else {}))
    with pytest.raises(UndecodableImage):
        decode_image(data[: int(len(data) * keep)])


@pytest.mark.parametrize(("fmt", "cut"), [("JPEG", 3), ("JPEG", 30), ("PNG", 12), ("WEBP", 16), ("BMP", 20)])
def test_truncated_header_is_undecodable(fmt, cut):
    with pytest.raises(UndecodableImage, match="truncated"):
        decode_image(_pil_bytes(_rgb(), fmt)[:cut])


def test_corrupt_png_header_is_undecodable():
    data = bytearray(_pil_bytes(_rgb(), "PNG"))
    data[19] ^= 0x01  # IHDR width 64 → 65: its CRC no longer matches
    with pytest.raises(UndecodableImage):
        decode_image(bytes(data))


def _gif() -> bytes:
    return _pil_bytes(_rgb(), "GIF")


@pytest.mark.parametrize(("data", "name"), [
    (_gif(), "GIF"),
    (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "SVG"),
    (b"  <svg width='10' height='10'></svg>", "SVG"),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "PDF"),
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIC"),
    (b"hello, this is not an image\n", "text"),
    (bytes(np.random.default_rng(5).integers(0, 256, 512, dtype=np.uint8)) .replace(b"\xff", b"\x00"), "unknown"),
])
def test_unsupported_formats_are_named(data, name):
    with pytest.raises(UnsupportedImageFormat, match=name):
        decode_image(data)


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def _jpeg_header(width: int, height: int) -> bytes:
    sof = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    app0 = b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    return (b"\xff\xd8" + b"\xff\xe0" + struct.pack(">H", len(app0) + 2) + app0
            + b"\xff\xc2" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9")


def _webp_header(width: int, height: int) -> bytes:
    body = b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    chunk = b"VP8X" + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def _bmp_header(width: int, height: int) -> bytes:
    dib = struct.pack("<IiiHHIIiiII", 40, width, -height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(dib), 0, 0, 14 + len(dib)) + dib


def _tiff_header(width: int, height: int, big_endian: bool = False) -> bytes:
    bo = ">" if big_endian else "<"

    def entry(tag: int, value: int) -> bytes:  # SHORT when it fits (value left-justified), else LONG
        if value < 65536:
            return struct.pack(bo + "HHIHH", tag, 3, 1, value, 0)
        return struct.pack(bo + "HHII", tag, 4, 1, value)
    entries = entry(256, width) + entry(257, height)
    return (b"MM\x00*" if big_endian else b"II*\x00") + struct.pack(bo + "I", 8) + struct.pack(bo + "H", 2) \
        + entries + struct.pack(bo + "I", 0)


@pytest.mark.parametrize("header", [_png_header, _jpeg_header, _webp_header, _bmp_header, _tiff_header,
                                    lambda w, h: _tiff_header(w, h, big_endian=True)])
def test_sizes_are_read_from_the_header_alone(header, no_decode):
    assert (probe(header(1234, 567)).width, probe(header(1234, 567)).height) == (1234, 567)


@pytest.mark.parametrize("header", [_png_header, _jpeg_header, _webp_header, _bmp_header, _tiff_header])
def test_decompression_bomb_is_refused_before_decoding(header, no_decode):
    width = height = 16000 if header in (_webp_header, _jpeg_header) else 100000
    data = header(width, height)
    assert len(data) < 200
    with pytest.raises(ImageTooLarge, match=rf"{width}x{height} = \d+ Mpx, limit is 40 Mpx"):
        decode_image(data)


def test_pixel_limit_is_configurable(no_decode):
    with pytest.raises(ImageTooLarge, match="limit is 1.0 Mpx"):
        decode_image(_png_header(2000, 1000), max_pixels=1_000_000)


def test_extreme_aspect_ratio_is_refused():
    with pytest.raises(BadAspectRatio, match="aspect ratio 30.0:1, limit is 20:1"):
        decode_image(_pil_bytes(_rgb(10, 300), "PNG"))
    with pytest.raises(BadAspectRatio):
        decode_image(_pil_bytes(_rgb(300, 20), "PNG"), max_aspect=10)
    assert decode_image(_pil_bytes(_rgb(10, 300), "PNG"), max_aspect=30).shape == (10, 300, 3)


def test_zero_size_header_is_undecodable(no_decode):
    with pytest.raises(UndecodableImage, match="0x10"):
        decode_image(_png_header(0, 10))


def test_every_error_is_an_input_error():
    for exc in (EmptyImage, UndecodableImage, UnsupportedImageFormat, ImageTooLarge, BadAspectRatio):
        assert issubclass(exc, InputError)
