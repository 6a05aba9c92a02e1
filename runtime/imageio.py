"""Image bytes → HxWx3 uint8 RGB, with the size checked from the header before anything is decoded.

Pixels as ModelScope's pipeline gets them from Pillow (``exif_transpose``, ``convert("RGB")``): EXIF
orientation applied, grey replicated, alpha dropped without compositing, 16-bit → its high byte.

The pixel limit holds for every accepted format, three times over:

1. :func:`probe` + :func:`check_size` refuse what the header admits is too large, before any decode; an
   ambiguous header (a TIFF IFD repeating ImageWidth) is sized by its worst case.
2. OpenCV's decoders refuse more than ``OPENCV_IO_MAX_IMAGE_PIXELS``, which OpenCV reads once, when cv2
   loads: this module sets it to :data:`DEFAULT_MAX_PIXELS` (unless the environment does) before its
   ``import cv2``; :func:`limit_decoder_pixels` can then only compare it with ``--max-pixels`` and warn.
3. The decoded image is measured again: too many pixels → :class:`ImageTooLarge`, another size than the
   header said → :class:`UndecodableImage`.

Decoding time is bounded (``tests/test_decode_guards.py``): a JPEG with more than :data:`MAX_JPEG_SCANS`
scans or :data:`MAX_JPEG_SEGMENTS` segments is refused before decoding; multi-page TIFF, APNG and animated
WebP decode their first page or frame only; GIF is unsupported.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import sys
from dataclasses import dataclass

#: the default pixel limit (``ImageLimits.max_pixels``, ``m2fp-serve --max-pixels``)
DEFAULT_MAX_PIXELS = 40_000_000
#: the default longest-to-shortest side ratio (``ImageLimits.max_aspect``)
DEFAULT_MAX_ASPECT = 20.0
#: the variable OpenCV reads, once at load, for the pixel cap its decoders enforce
DECODER_CAP_ENV = "OPENCV_IO_MAX_IMAGE_PIXELS"
_OPENCV_DEFAULT_CAP = 1 << 30
_CV2_LOADED_BEFORE = "cv2" in sys.modules
if not _CV2_LOADED_BEFORE:
    os.environ.setdefault(DECODER_CAP_ENV, str(DEFAULT_MAX_PIXELS))

import cv2  # noqa: E402 - after the cap is in the environment
import numpy as np  # noqa: E402

from .errors import (  # noqa: E402
    BadAspectRatio,
    EmptyImage,
    ImageTooLarge,
    UndecodableImage,
    UnsupportedImageFormat,
)

log = logging.getLogger(__name__)

SUPPORTED = ("JPEG", "PNG", "WebP", "BMP", "TIFF")
#: most scans (SOS markers) a JPEG may have; more is refused before decoding (time bound)
MAX_JPEG_SCANS = 100
#: most marker segments a JPEG may have (keeps the marker walk itself short)
MAX_JPEG_SEGMENTS = 10_000
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
#: a marker that starts a segment with a length: 0xFF (fill bytes) then anything but a stuffed zero, TEM,
#: RSTn or SOI (those stand alone; inside entropy-coded data only stuffed zeros and RSTn follow 0xFF)
_JPEG_SEGMENT = re.compile(rb"\xff+([^\x00\x01\xd0-\xd8\xff])")


def _env_cap() -> int:
    """The cap ``OPENCV_IO_MAX_IMAGE_PIXELS`` sets (OpenCV's default when unset or not a plain number)."""
    value = os.environ.get(DECODER_CAP_ENV, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else _OPENCV_DEFAULT_CAP


_DECODER_CAP = _env_cap()


def decoder_pixel_cap() -> int:
    """The pixel cap OpenCV's decoders enforce in this process (fixed when cv2 was loaded).

    Exact when this module loaded cv2; if something imported cv2 before it, this is the environment's
    value at this module's import (what OpenCV read, unless the environment changed in between).
    """
    return _DECODER_CAP


def limit_decoder_pixels(max_pixels: int) -> int:
    """Check OpenCV's decoder cap against the pixel limit ``max_pixels``; return the cap in force.

    Called by ``m2fp-serve`` at start with ``--max-pixels``. The cap was fixed when cv2 was loaded (see the
    module docstring), so a mismatch can only be reported: a higher cap still bounds a lying header (the
    result is refused after the decode); a lower one refuses (413) images the limit admits until
    ``OPENCV_IO_MAX_IMAGE_PIXELS`` is set in the environment of the process.
    """
    cap = _DECODER_CAP
    if cap < max_pixels:
        log.warning("the image decoder refuses images over %s Mpx (%s=%d, read when OpenCV loaded), below the "
                    "pixel limit of %s Mpx: set %s=%d in the environment to admit them",
                    _mpx(cap), DECODER_CAP_ENV, cap, _mpx(max_pixels), DECODER_CAP_ENV, max_pixels)
    elif cap > max_pixels:
        log.info("the image decoder's own cap is %s Mpx (%s, read when OpenCV loaded); the %s Mpx limit is "
                 "checked on the header and again after decoding", _mpx(cap), DECODER_CAP_ENV, _mpx(max_pixels))
    return cap


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


@dataclass(frozen=True)
class _JpegLayout:
    """What the marker walk found: the first frame's size, the first scan's offset, scans, end of image."""

    size: tuple[int, int] | None
    first_scan: int | None
    scans: int
    complete: bool


def _jpeg_markers(data: bytes) -> _JpegLayout:
    """Walk a JPEG's marker segments as libjpeg does (first SOF wins), skipping entropy-coded data.

    Refuses more than :data:`MAX_JPEG_SCANS` scans or :data:`MAX_JPEG_SEGMENTS` segments (time bounds).
    """
    size: tuple[int, int] | None = None
    first_scan: int | None = None
    scans = segments = 0
    pos, n = 2, len(data)
    while True:
        # stray bytes between segments and entropy-coded data: libjpeg skips them too
        match = _JPEG_SEGMENT.search(data, pos)
        if match is None:
            break
        marker, pos = match.group(1)[0], match.end()
        if marker == 0xD9:
            return _JpegLayout(size, first_scan, scans, True)
        if pos + 2 > n:
            break
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2:
            raise _truncated("JPEG")
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise UndecodableImage(f"JPEG has more than {MAX_JPEG_SEGMENTS} marker segments")
        if marker == 0xDA:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise UndecodableImage(f"JPEG has more than {MAX_JPEG_SCANS} scans (a decoding-time bomb)")
            if first_scan is None:
                first_scan = pos
        elif marker in _JPEG_SOF and size is None:
            if pos + 7 > n:
                break
            height, width = struct.unpack_from(">HH", data, pos + 3)
            size = (width, height)
        pos += length
    return _JpegLayout(size, first_scan, scans, False)


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
    """Width and height of the first IFD; a repeated tag counts with its largest value (worst case).

    libtiff keeps the first of repeated entries; whichever a decoder keeps, the size checked is never
    smaller than the size decoded. Only single SHORT/LONG values (LONG8 in BigTIFF) are read.
    """
    bo = "<" if data[:2] == b"II" else ">"
    try:
        big = struct.unpack_from(bo + "H", data, 2)[0] == 43
        if big:
            (ifd,) = struct.unpack_from(bo + "Q", data, 8)
            (count,) = struct.unpack_from(bo + "Q", data, ifd)
            start, step, fmt = ifd + 8, 20, bo + "HHQ"
        else:
            (ifd,) = struct.unpack_from(bo + "I", data, 4)
            (count,) = struct.unpack_from(bo + "H", data, ifd)
            start, step, fmt = ifd + 2, 12, bo + "HHI"
        types = {3: "H", 4: "I", **({16: "Q"} if big else {})}
        found: dict[int, list[int]] = {}
        for i in range(min(count, 4096)):
            off = start + i * step
            tag, typ, n = struct.unpack_from(fmt, data, off)
            if tag in (256, 257):
                code = types.get(typ)
                if code is None or n != 1:
                    raise _truncated("TIFF")
                found.setdefault(tag, []).append(struct.unpack_from(bo + code, data, off + struct.calcsize(fmt))[0])
        return max(found[256]), max(found[257])
    except (struct.error, KeyError, OverflowError):  # offsets past the end (or past any buffer)
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


def _probe(data: bytes) -> tuple[ImageInfo, _JpegLayout | None]:
    """:func:`probe`, plus the marker layout of a JPEG."""
    if len(data) == 0:
        raise EmptyImage("the image is empty (0 bytes)")
    layout = None
    if data[:3] == b"\xff\xd8\xff":
        layout = _jpeg_markers(data)
        size = layout.size
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
    return ImageInfo(fmt, width, height), layout


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


def _decoder_refusal(exc: cv2.error, info: ImageInfo, max_pixels: int) -> ImageTooLarge | None:
    """The :class:`ImageTooLarge` for OpenCV's own size assertion (``validateInputImageSize``), else None."""
    text = str(exc)
    if not any(name in text for name in ("CV_IO_MAX_IMAGE_PIXELS", "CV_IO_MAX_IMAGE_WIDTH", "CV_IO_MAX_IMAGE_HEIGHT")):
        return None
    cap = _mpx(_DECODER_CAP)
    if info.pixels > _DECODER_CAP:  # an honest header over a cap below the configured limit
        return ImageTooLarge(f"image is {info.width}x{info.height} = {_mpx(info.pixels)} Mpx, over the image "
                             f"decoder's {cap} Mpx cap ({DECODER_CAP_ENV})")
    return ImageTooLarge(f"{info.format} data is larger than its header says ({info.width}x{info.height}): "
                         f"the decoder refused it over its {cap} Mpx cap, "
                         f"limit is {_mpx(min(max_pixels, _DECODER_CAP))} Mpx")


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_aspect: float = DEFAULT_MAX_ASPECT) -> np.ndarray:
    """Decode JPEG/PNG/WebP/BMP/TIFF bytes into an HxWx3 uint8 RGB array (EXIF orientation applied).

    Never more than ``max_pixels`` come back, and the decoder never allocates more than
    :func:`decoder_pixel_cap`; anything unusable raises an :class:`~.errors.InputError`.
    """
    data = bytes(data)
    info, layout = _probe(data)
    check_size(info, max_pixels, max_aspect)
    if layout is not None and (layout.first_scan is None or not layout.complete):
        raise UndecodableImage("JPEG data is truncated (no end-of-image marker after the scan)")
    buf = np.frombuffer(data, dtype=np.uint8)
    rgb_flag = getattr(cv2, "IMREAD_COLOR_RGB", None)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR if rgb_flag is None else rgb_flag)
    except cv2.error as exc:
        refusal = _decoder_refusal(exc, info, max_pixels)
        if refusal is not None:
            raise refusal from None
        log.debug("imdecode failed: %s", exc)
        img = None
    if img is None or img.size == 0:
        raise UndecodableImage(f"{info.format} data could not be decoded (truncated or corrupt)")
    height, width = img.shape[:2]
    if width * height > max_pixels:
        raise ImageTooLarge(f"{info.format} data decodes to {width}x{height} = {_mpx(width * height)} Mpx "
                            f"(its header says {info.width}x{info.height}), limit is {_mpx(max_pixels)} Mpx")
    if rgb_flag is None:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.shape[:2] not in ((info.height, info.width), (info.width, info.height)):
        raise UndecodableImage(f"{info.format} header says {info.width}x{info.height} but the data "
                               f"decodes to {img.shape[1]}x{img.shape[0]}")
    return np.ascontiguousarray(img)
