"""Schemathesis hooks of the OpenAPI fuzz test (loaded by ``st run`` through ``SCHEMATHESIS_HOOKS``).

The parse route's body is ``format: binary`` with image media types: JSON Schema cannot say "a
decodable image", so these strategies teach the generator what a schema-valid upload is — small real
images (1-48 px a side, aspect ratio within the server's limit) in every format the server accepts,
encoded by OpenCV, and for multipart file fields also label maps (8-bit single-channel PNGs of class ids,
what the score route's ``label`` takes). Negative cases (bodies the schema refuses) stay schemathesis' own.
"""

from __future__ import annotations

import base64

import cv2
import numpy as np
import schemathesis
from hypothesis import strategies as st

#: media type → OpenCV encoder extension
FORMATS = {"image/jpeg": ".jpg", "image/png": ".png", "image/webp": ".webp", "image/bmp": ".bmp",
           "image/tiff": ".tiff"}


def _encode(ext: str, width: int, height: int, seed: int) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(ext, img)
    assert ok, ext
    return buf.tobytes()


@st.composite
def _image(draw: st.DrawFn, ext: str) -> bytes:
    width = draw(st.integers(1, 48))
    height = draw(st.integers(max(1, -(-width // 4)), min(48, 4 * width)))  # aspect ratio at most 4:1
    return _encode(ext, width, height, draw(st.integers(0, 2**16)))


def images(ext: str) -> st.SearchStrategy[bytes]:
    """Images of one format; sides 1-48 px with an aspect ratio of at most 4:1 (no lambdas: CPython 3.11's
    ast.parse can fail when Hypothesis describes one deep in a recursive strategy)."""
    return _image(ext)


ANY_IMAGE = st.one_of(*(images(ext) for ext in FORMATS.values()))

# raw bodies: an image of the declared type (any of them for application/octet-stream)
for _media_type, _ext in FORMATS.items():
    schemathesis.openapi.media_type(_media_type, images(_ext))
schemathesis.openapi.media_type("application/octet-stream", ANY_IMAGE)


@st.composite
def _label(draw: st.DrawFn) -> bytes:
    """A label map as ``/api/{version}/score`` takes it: an 8-bit single-channel PNG of class ids 0-20 (an image
    too: a dark grey one), of a size of its own (an image of the same size is rare: mostly 422 label_mismatch)."""
    width = draw(st.integers(1, 48))
    height = draw(st.integers(max(1, -(-width // 4)), min(48, 4 * width)))
    ids = np.random.default_rng(draw(st.integers(0, 2**16))).integers(0, 21, (height, width), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", ids)
    assert ok
    return buf.tobytes()


# the multipart file fields (`format: binary`): `image`, and the score route's `label` (a label map or an image)
schemathesis.openapi.format("binary", st.one_of(ANY_IMAGE, _label()))


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# the Open Inference Protocol's JSON form carries the image as base64 text (`format: m2fp-image-base64`)
schemathesis.openapi.format("m2fp-image-base64", ANY_IMAGE.map(_base64))
