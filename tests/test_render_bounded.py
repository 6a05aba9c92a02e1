"""The overlay is drawn at a bounded size and encoded fast unless the client asks otherwise; label maps stay
at the original size. The ``visualization_max_side`` / ``visualization_format`` parameters are untrusted
text: parsed by one function, refused with a 400 naming the parameter, and described exactly by the
OpenAPI document (same default, same accepted texts)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2fpkit.runtime.result import ParseResult, bounded_hw
from m2fpkit.server import handlers, render
from m2fpkit.server.app import make_app
from m2fpkit.server.config import ServerConfig
from m2fpkit.server.errors import HTTPProblem

pytest.register_assert_rewrite("server_fixtures")
pytest_plugins = ["server_fixtures"]
from server_fixtures import decode_png_b64, png_bytes  # noqa: E402

SETTINGS = {"derandomize": True, "database": None, "deadline": None, "suppress_health_check": list(HealthCheck)}
DOC = json.loads((Path(handlers.__file__).with_name("static") / "openapi.json").read_text())
PARSE_PARAMS = {p["name"]: p for p in DOC["paths"]["/api/{version}/parse"]["post"]["parameters"] if "name" in p}
#: what a query string can carry once decoded (any code point but surrogates), and texts near the grammar
TEXT = st.one_of(st.text(max_size=12), st.from_regex(r"[0-9 +\-_.a-z]{0,7}", fullmatch=True),
                 st.sampled_from(["full", "FULL", "full\n", "1280\n", "0", "01", "99999", "100000", "٣", "１２",
                                  " 64", "+64", "64.0", "1e3", ""]))


# ------------------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize(("hw", "max_side", "expected"), [
    ((2592, 3872), 1280, (857, 1280)),   # 10 MP landscape
    ((3872, 2592), 1280, (1280, 857)),   # portrait
    ((1080, 1920), 1280, (720, 1280)),
    ((1000, 1000), 1280, (1000, 1000)),  # never enlarged
    ((1280, 640), 1280, (1280, 640)),    # exactly the bound
    ((4000, 100), 40, (40, 1)),          # a side never reaches 0
    ((120, 160), None, (120, 160)),      # full size
])
def test_bounded_hw_pins(hw, max_side, expected):
    assert bounded_hw(hw, max_side) == expected


@settings(max_examples=300, **SETTINGS)
@given(st.integers(1, 30_000), st.integers(1, 30_000), st.integers(1, 99_999))
def test_bounded_hw_keeps_the_aspect_within_the_bound(h, w, max_side):
    bh, bw = bounded_hw((h, w), max_side)
    assert max(bh, bw) == min(max(h, w), max_side) and bh >= 1 and bw >= 1
    if max(h, w) > max_side:  # the other side is scaled by the same factor, rounded (at least 1)
        got, side = (bw, w) if h >= w else (bh, h)
        assert got == 1 or abs(got - side * max_side / max(h, w)) <= 0.5 + 1e-9
    else:
        assert (bh, bw) == (h, w)


def _result(label_map: np.ndarray) -> ParseResult:
    return ParseResult("single-human", tuple(f"c{i}" for i in range(4)), label_map, ())


PALETTE = [(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)]


def test_bounded_overlay_is_the_full_overlay_made_small():
    """Big class blocks over a smooth image: drawn small, each block keeps its colour blend and the
    background keeps the (area-averaged) image."""
    h, w = 1200, 1800
    labels = np.zeros((h, w), np.uint8)
    labels[100:700, 200:800], labels[300:1100, 1000:1600], labels[800:1150, 100:500] = 1, 2, 3
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (h + w)], axis=2).astype(np.uint8)
    res = _result(labels)
    full = res.overlay(rgb, PALETTE)
    assert full.shape == rgb.shape
    assert np.array_equal(res.overlay(rgb, PALETTE, max_side=1800), full)  # at the bound: untouched
    small = res.overlay(rgb, PALETTE, max_side=600)
    assert small.shape == (400, 600, 3) and small.dtype == np.uint8
    reference = cv2.resize(full, (600, 400), interpolation=cv2.INTER_AREA)
    inner = cv2.erode((cv2.resize(labels, (600, 400), interpolation=cv2.INTER_NEAREST_EXACT) + 1), np.ones((5, 5)))
    same_block = inner == cv2.dilate(cv2.resize(labels, (600, 400), interpolation=cv2.INTER_NEAREST_EXACT) + 1,
                                     np.ones((5, 5)))
    assert same_block.mean() > 0.8  # most pixels are inside a block (not a vacuous comparison)
    diff = np.abs(small.astype(int) - reference.astype(int))[same_block]
    assert diff.max() <= 2
    assert res.label_map.shape == (h, w)  # the parse itself is not changed


def test_overlay_refuses_a_bad_bound():
    res = _result(np.zeros((10, 20), np.uint8))
    with pytest.raises(ValueError, match="max_side"):
        res.overlay(np.zeros((10, 20, 3), np.uint8), PALETTE, max_side=0)


# ------------------------------------------------------------------------------ parameter parsing
def _accepted(text: str) -> int | None | str:
    try:
        return render.parse_max_side(text)
    except ValueError as e:
        assert "full or a longest side in pixels" in str(e)
        return "refused"


@settings(max_examples=400, **SETTINGS)
@given(TEXT)
def test_max_side_parsing_takes_full_or_1_to_99999_and_nothing_else(text):
    got = _accepted(text)
    if got == "refused":
        assert not (text == "full" or (text.isascii() and text.isdigit() and text[0] != "0" and len(text) <= 5))
    elif got is None:
        assert text == "full"
    else:
        assert isinstance(got, int) and 1 <= got <= 99_999 and str(got) == text


@settings(max_examples=400, **SETTINGS)
@given(TEXT)
def test_the_documented_pattern_accepts_exactly_what_the_server_accepts(text):
    pattern = PARSE_PARAMS["visualization_max_side"]["schema"]["pattern"]
    assert (re.search(pattern, text) is not None) == (_accepted(text) != "refused")


def test_the_document_states_the_code_defaults():
    schema = PARSE_PARAMS["visualization_max_side"]["schema"]
    assert schema["default"] == str(render.VISUALIZATION_MAX_SIDE) and render.RenderOptions().visualization_max_side \
        == render.VISUALIZATION_MAX_SIDE
    fmt = PARSE_PARAMS["visualization_format"]["schema"]
    assert fmt["enum"] == list(render.VISUALIZATION_FORMATS) and fmt["default"] == render.VISUALIZATION_FORMATS[0] \
        == render.RenderOptions().visualization_format
    props = DOC["components"]["schemas"]["ParseResult"]["properties"]
    assert props["visualization_format"]["enum"] == list(render.VISUALIZATION_FORMATS)
    assert {"render", "encode"} <= set(props["timing"]["properties"])


@settings(max_examples=300, **SETTINGS)
@given(st.fixed_dictionaries({}, optional={"visualization_max_side": TEXT,
                                           "visualization_format": st.one_of(TEXT, st.sampled_from(["jpeg", "png"])),
                                           "visualization": st.sampled_from(["0", "1"])}))
def test_render_options_are_parsed_or_refused_naming_the_parameter(query):
    from urllib.parse import urlencode

    request = make_mocked_request("POST", "/api/latest/parse?" + urlencode(query))
    try:
        opts = handlers.render_options(request)
    except HTTPProblem as e:
        assert e.status == 400 and e.error == "bad_parameter"
        name = e.detail.split(":", 1)[0]
        assert name in query and name.startswith("visualization_")
        return
    assert opts.visualization_max_side == (render.parse_max_side(query["visualization_max_side"])
                                           if "visualization_max_side" in query else render.VISUALIZATION_MAX_SIDE)
    assert opts.visualization_format == query.get("visualization_format", "jpeg")


# ------------------------------------------------------------------------------------------- HTTP
@pytest.fixture
async def client(aiohttp_client, demo_root: Path):
    return await aiohttp_client(make_app(ServerConfig(bundles=demo_root)))


def _image_b64(data: str, fmt: str) -> np.ndarray:
    raw = base64.b64decode(data, validate=True)
    assert raw.startswith(b"\xff\xd8\xff" if fmt == "jpeg" else b"\x89PNG\r\n\x1a\n"), fmt
    img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    return img


async def _parse(client, query: str, image: bytes) -> dict:
    r = await client.post(f"/api/v1.2/parse{query}", data=image, headers={"Content-Type": "image/png"})
    body = await r.json()
    assert r.status == 200, body
    return body


async def test_the_overlay_is_bounded_by_default_and_full_on_request(client):
    image = png_bytes(1600, 1200, seed=4)  # larger than the default bound
    body = await _parse(client, "?include=label_map", image)
    assert body["image"] == {"height": 1200, "width": 1600}
    assert body["visualization_format"] == "jpeg"
    assert body["visualization_size"] == {"height": 960, "width": 1280}
    assert _image_b64(body["visualization"], "jpeg").shape == (960, 1280, 3)
    assert decode_png_b64(body["label_map"]).shape == (1200, 1600)  # data stays at the original size
    assert body["timing"]["render"] >= 0 and body["timing"]["encode"] >= 0

    full = await _parse(client, "?visualization_max_side=full", image)
    assert full["visualization_size"] == {"height": 1200, "width": 1600}
    assert _image_b64(full["visualization"], "jpeg").shape == (1200, 1600, 3)

    png = await _parse(client, "?visualization_max_side=160&visualization_format=png", image)
    assert png["visualization_format"] == "png" and png["visualization_size"] == {"height": 120, "width": 160}
    small = _image_b64(png["visualization"], "png")
    assert small.shape == (120, 160, 3)
    # the same labels and scores whatever the overlay
    assert (png["labels"], png["scores"]) == (body["labels"], body["scores"]) == (full["labels"], full["scores"])
    # the JPEG overlay at full size is the PNG one up to compression
    exact = _image_b64((await _parse(client, "?visualization_max_side=full&visualization_format=png",
                                     image))["visualization"], "png")
    jpeg = _image_b64(full["visualization"], "jpeg")
    assert np.abs(exact.astype(int) - jpeg.astype(int)).mean() < 4

    none = await _parse(client, "?visualization=0&visualization_max_side=64", image)
    assert not {"visualization", "visualization_format", "visualization_size"} & set(none)


@pytest.mark.parametrize(("query", "names"), [
    ("visualization_max_side=0", "visualization_max_side"),
    ("visualization_max_side=-5", "visualization_max_side"),
    ("visualization_max_side=", "visualization_max_side"),
    ("visualization_max_side=Full", "visualization_max_side"),
    ("visualization_max_side=100000", "visualization_max_side"),
    ("visualization_max_side=12.5&visualization=0", "visualization_max_side"),
    ("visualization_format=gif", "visualization_format"),
    ("visualization_format=JPEG", "visualization_format"),
])
async def test_a_bad_overlay_parameter_is_a_400_naming_it(client, query, names):
    r = await client.post(f"/api/v1.2/parse?{query}", data=png_bytes(), headers={"Content-Type": "image/png"})
    body = await r.json()
    assert r.status == 400 and body["error"] == "bad_parameter", body
    assert body["detail"].startswith(names + ": "), body
