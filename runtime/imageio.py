"""Image bytes → HxWx3 uint8 RGB, with the size checked from the header before anything is decoded.

The decoded pixels are what ModelScope's pipeline gets from Pillow (``exif_transpose`` then
``convert("RGB")``): EXIF orientation applied, grey replicated to three channels, alpha dropped
without compositing. 16-bit images keep their high byte. Decoding is OpenCV's ``imdecode``.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

import cv2
import numpy as np

from .errors import BadAspectRatio, EmptyImage, ImageTooLarge, UndecodableImage, UnsupportedImageFormat

log = logging.getLogger(__name__)

SUPPORTED = ("JPEG", "PNG", "WebP", "BMP", "TIFF")
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_NO_LENGTH = {0x01, *range(0xD0, 0xD9)}


@dataclass(frozen=True)
class ImageInfo:
    """What the header says: format name and stored size (before EXIF orientation)."""

    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _truncated(fmt: str) -> UndecodableImage:
    return UndecodableImage(f"{fmt} header is truncated or corrupt")


def _jpeg_markers(data: bytes) -> tuple[tuple[int, int] | None, int | None]:
    """``((width, height) of the first frame header, offset of the first scan)`` of a JPEG stream."""
    size: tuple[int, int] | None = None
    pos, n = 2, len(data)
    while pos < n:
        pos = data.find(b"\xff", pos)  # stray bytes between segments: libjpeg skips them too
        if pos < 0:
            break
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            break
        marker = data[pos]
        pos += 1
        if marker in _JPEG_NO_LENGTH:
            continue
        if marker == 0xD9 or pos + 2 > n:
            break
        (length,) = struct.unpack_from(">H", data, pos)
        if marker == 0xDA:
            return size, pos
        if marker in _JPEG_SOF and size is None:
            if pos + 7 > n:
                break
            height, width = struct.unpack_from(">HH", data, pos + 3)
            size = (width, height)
        if length < 2:
            raise _truncated("JPEG")
        pos += length
    return size, None


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack_from("<HH", data, 26)
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        (bits,) = struct.unpack_from("<I", data, 21)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    raise _truncated("WebP")


def _tiff_size(data: bytes) -> tuple[int, int]:
    bo = "<" if data[:2] == b"II" else ">"
    big = struct.unpack_from(bo + "H", data, 2)[0] == 43
    try:
        if big:
            (ifd,) = struct.unpack_from(bo + "Q", data, 8)
            (count,) = struct.unpack_from(bo + "Q", data, ifd)
            start, step, fmt = ifd + 8, 20, bo + "HHQ"
        else:
            (ifd,) = struct.unpack_from(bo + "I", data, 4)
            (count,) = struct.unpack_from(bo + "H", data, ifd)
            start, step, fmt = ifd + 2, 12, bo + "HHI"
        found: dict[int, int] = {}
        for i in range(min(count, 4096)):
            off = start + i * step
            tag, typ, _ = struct.unpack_from(fmt, data, off)
            if tag in (256, 257):
                value_off = off + struct.calcsize(fmt)
                code = {3: "H", 4: "I", 16: "Q"}.get(typ)
                if code is None:
                    raise _truncated("TIFF")
                found[tag] = struct.unpack_from(bo + code, data, value_off)[0]
        return found[256], found[257]
    except (struct.error, KeyError):
        raise _truncated("TIFF") from None


def _unsupported_name(data: bytes) -> str:
    head = data[:64]
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand.startswith(b"avi"):
            return "AVIF"
        return "HEIC/HEIF" if brand[:3] in (b"hei", b"mif", b"msf") else "ISO media"
    if head[:4] == b"%PDF":
        return "PDF"
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in data[:4096].lower()):
        return "SVG"
    if head[:4] == b"\x00\x00\x01\x00":
        return "ICO"
    if head[:4] == b"8BPS":
        return "PSD"
    if head[:2] == b"\xff\x0a" or head[4:8] == b"JXL ":
        return "JPEG XL"
    if head[4:8] == b"jP  " or head[:4] == b"\xff\x4f\xff\x51":
        return "JPEG 2000"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "text"
    return "unknown"


def probe(data: bytes) -> ImageInfo:
    """Format and size from the magic bytes and header alone (no pixel is decoded)."""
    return _probe(bytes(data))[0]


def _probe(data: bytes) -> tuple[ImageInfo, int | None]:
    """:func:`probe`, plus the offset of the first scan of a JPEG."""
    if len(data) == 0:
        raise EmptyImage("the image is empty (0 bytes)")
    scan = None
    if data[:3] == b"\xff\xd8\xff":
        size, scan = _jpeg_markers(data)
        if size is None:
            raise UndecodableImage("JPEG has no frame header (truncated or corrupt)")
        fmt = "JPEG"
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise _truncated("PNG")
        size = struct.unpack_from(">II", data, 16)
        fmt = "PNG"
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        size, fmt = _webp_size(data), "WebP"
    elif data[:2] == b"BM":
        if len(data) < 26:
            raise _truncated("BMP")
        if struct.unpack_from("<I", data, 14)[0] == 12:
            size = struct.unpack_from("<HH", data, 18)
        else:
            w, h = struct.unpack_from("<ii", data, 18)
            size = (abs(w), abs(h))
        fmt = "BMP"
    elif data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        size, fmt = _tiff_size(data), "TIFF"
    else:
        name = _unsupported_name(data)
        raise UnsupportedImageFormat(
            f"unsupported image format: {name} (supported: {', '.join(SUPPORTED)})")
    width, height = int(size[0]), int(size[1])
    if width <= 0 or height <= 0:
        raise UndecodableImage(f"{fmt} header gives an empty size {width}x{height}")
    return ImageInfo(fmt, width, height), scan


def _mpx(pixels: int) -> str:
    value = pixels / 1e6
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def check_size(info: ImageInfo, max_pixels: int, max_aspect: float) -> None:
    """Refuse too many pixels (decompression bombs) and extreme aspect ratios."""
    if info.pixels > max_pixels:
        raise ImageTooLarge(f"image is {info.width}x{info.height} = {_mpx(info.pixels)} Mpx, "
                            f"limit is {_mpx(max_pixels)} Mpx")
    aspect = max(info.width, info.height) / min(info.width, info.height)
    if aspect > max_aspect:
        raise BadAspectRatio(f"image is {info.width}x{info.height}, aspect ratio {aspect:.1f}:1, "
                             f"limit is {max_aspect:g}:1")


def decode_image(data: bytes, *, max_pixels: int = 40_000_000, max_aspect: float = 20.0) -> np.ndarray:
    """Decode JPEG/PNG/WebP/BMP/TIFF bytes into an HxWx3 uint8 RGB array (EXIF orientation applied)."""
    data = bytes(data)
    info, scan = _probe(data)
    check_size(info, max_pixels, max_aspect)
    if info.format == "JPEG":
        if scan is None or data.find(b"\xff\xd9", scan) < 0:
            raise UndecodableImage("JPEG data is truncated (no end-of-image marker after the scan)")
    buf = np.frombuffer(data, dtype=np.uint8)
    rgb_flag = getattr(cv2, "IMREAD_COLOR_RGB", None)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR if rgb_flag is None else rgb_flag)
    except cv2.error as exc:
        log.debug("imdecode failed: %s", exc)
        img = None
    if img is None or img.size == 0:
        raise UndecodableImage(f"{info.format} data could not be decoded (truncated or corrupt)")
    if rgb_flag is None:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.shape[:2] not in ((info.height, info.width), (info.width, info.height)):
        raise UndecodableImage(f"{info.format} header says {info.width}x{info.height} but the data "
                               f"decodes to {img.shape[1]}x{img.shape[0]}")
    return np.ascontiguousarray(img)
