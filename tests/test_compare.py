"""``POST /api/compare``: several versions on one upload, the agreement between them, and the ``versions``
parameter as untrusted text (hypothesis: accepted exactly when the OpenAPI pattern matches)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m2fpkit.runtime.agreement import by_class_name
from m2fpkit.runtime.errors import InvalidVersionName
from m2fpkit.server import compare
from m2fpkit.server.app import make_app
from m2fpkit.server.config import ServerConfig
from m2fpkit.server.errors import HTTPProblem

pytest.register_assert_rewrite("server_fixtures")
pytest_plugins = ["server_fixtures"]
from server_fixtures import decode_png_b64, png_bytes  # noqa: E402

OPENAPI = Path(compare.__file__).with_name("static") / "openapi.json"


@pytest.fixture
async def client(aiohttp_client, demo_root: Path):
    return await aiohttp_client(make_app(ServerConfig(bundles=demo_root)))


async def post_compare(client, query: str, data: bytes, **headers):
    headers.setdefault("Content-Type", "image/png")
    r = await client.post(f"/api/compare{query}", data=data, headers=headers)
    return r, await r.json()


def decode_image_b64(data: str) -> np.ndarray:
    """The overlay, in whatever format the server encodes it (PNG or JPEG)."""
    img = cv2.imdecode(np.frombuffer(base64.b64decode(data, validate=True), np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None, "the overlay does not decode"
    return img


def label_names(body: dict, classes: list[str]) -> np.ndarray:
    """The label map of a parse body as an array of class names (an independent reading for the test)."""
    ids = decode_png_b64(body["label_map"])
    return np.asarray(classes, dtype=object)[ids]


# ================================================================================= the route
async def test_compare_two_versions_matches_their_own_parses(client):
    image = png_bytes(160, 120, seed=3)
    r, body = await post_compare(client, "?versions=v1.0,v1.2", image)
    assert r.status == 200, body
    assert r.headers["X-Model-Version"] == "v1.0,v1.2" and r.headers["X-Route-Rule"] == "compare"
    assert body["success"] is True and body["versions"] == ["v1.0", "v1.2"]
    assert body["image"] == {"height": 120, "width": 160}
    assert [x["version"] for x in body["results"]] == ["v1.0", "v1.2"]
    for item, name in zip(body["results"], ("v1.0", "v1.2"), strict=True):
        assert item["requested"] == [name] and item["route"] == "exact"
        assert item["latency_ms"] > 0 and item["timing"]["inference"] > 0
        assert all(isinstance(v, (int, float)) for v in item["timing"].values())
        assert decode_image_b64(item["visualization"]).shape[2] == 3
        assert item["random_weights"] is False and "trained on synthetic figures" in item["weights_note"]
        assert "label_map" not in item  # kept for the agreement, not sent unless asked
    # the agreement equals what the versions' own parse responses give, read independently
    names = []
    for v in ("v1.0", "v1.2"):
        p = await client.post(f"/api/{v}/parse?include=label_map&visualization=0", data=image,
                              headers={"Content-Type": "image/png"})
        meta = await (await client.get(f"/api/{v}/meta")).json()
        names.append(label_names(await p.json(), meta["classes"]))
    [pair] = body["agreement"]
    assert (pair["a"], pair["b"]) == ("v1.0", "v1.2")
    assert pair["pixel_agreement"] == pytest.approx(float(np.mean(names[0] == names[1])), abs=1e-6)
    present = set(np.unique(names[0])) | set(np.unique(names[1]))
    assert {c["class"] for c in pair["classes"]} == present
    for c in pair["classes"]:
        a, b = names[0] == c["class"], names[1] == c["class"]
        assert (c["pixels_a"], c["pixels_b"], c["intersection"]) == (a.sum(), b.sum(), (a & b).sum())
        assert c["iou"] == pytest.approx((a & b).sum() / (a | b).sum(), abs=1e-6)
    assert pair["mean_iou"] == pytest.approx(np.mean([c["iou"] for c in pair["classes"]]), abs=1e-6)


async def test_compare_merges_names_of_one_version_and_keeps_label_maps_when_asked(client):
    image = png_bytes(96, 72)
    r, body = await post_compare(client, "?versions=latest,v1.2,v1.1,latest&include=label_map", image)
    assert r.status == 200, body
    assert body["versions"] == ["v1.2", "v1.1"]
    first, second = body["results"]
    assert first["requested"] == ["latest", "v1.2"] and first["route"] == "latest"
    assert second["requested"] == ["v1.1"] and second["task"] == "single-human"
    assert decode_png_b64(first["label_map"]).shape == (72, 96)
    [pair] = body["agreement"]  # multi-human (CIHP classes) against single-human (LIP classes), by name
    assert sum(c["pixels_a"] for c in pair["classes"]) == 72 * 96 == sum(c["pixels_b"] for c in pair["classes"])


async def test_three_versions_give_every_pair(client):
    r, body = await post_compare(client, "?versions=v1.0,v1.1,stable,v1.2&visualization=0", png_bytes(64, 64))
    assert r.status == 200, body
    assert body["versions"] == ["v1.0", "v1.1", "v1.2"] and body["results"][0]["requested"] == ["v1.0", "stable"]
    assert all("visualization" not in x for x in body["results"])
    assert [(p["a"], p["b"]) for p in body["agreement"]] == [("v1.0", "v1.1"), ("v1.0", "v1.2"), ("v1.1", "v1.2")]


@pytest.mark.parametrize(("query", "status", "error", "words"), [
    ("", 400, "bad_parameter", "two or more"),
    ("?versions=", 400, "bad_parameter", "two or more"),
    ("?versions=v1.0", 400, "bad_parameter", "two or more"),
    ("?versions=v1.0,,v1.2", 400, "bad_parameter", "name 2 is empty"),
    ("?versions=v1.0,../etc", 400, "invalid_version_name", "name 2"),
    ("?versions=v1.0,%20v1.2", 400, "invalid_version_name", "name 2"),
    ("?versions=" + ",".join(f"v1.{i}" for i in range(9)), 400, "bad_parameter", "at most 8"),
    ("?versions=" + "a" * 600, 400, "bad_parameter", "512"),
    ("?versions=v1.0,v9.9", 404, "unknown_version", "available versions: v1.0, v1.1, v1.2, v2.0-beta"),
    ("?versions=latest,v1.2", 409, "same_version", "nothing to compare"),
    ("?versions=v1.0,v1.0", 409, "same_version", "nothing to compare"),
    ("?versions=v1.0,v2.0-beta&api=1.0", 409, "incompatible_api", "v2.0-beta"),
    ("?versions=v1.0,v1.2&include=nonsense", 400, "bad_parameter", "include"),
])
async def test_bad_requests_are_refused_before_any_parse(client, query, status, error, words):
    r, body = await post_compare(client, query, png_bytes(32, 32))
    assert r.status == status, body
    assert body["success"] is False and body["error"] == error and words in body["detail"], body
    assert "X-Model-Version" not in r.headers


async def test_a_bad_image_is_the_parse_routes_error(client):
    r, body = await post_compare(client, "?versions=v1.0,v1.2", png_bytes(32, 32)[:60])  # truncated PNG
    assert r.status == 400 and body["error"] == "undecodable_image", body
    r, body = await post_compare(client, "?versions=v1.0,v1.2", b"not an image at all")
    assert r.status == 415 and body["error"] == "unsupported_media_type", body
    r, body = await post_compare(client, "?versions=v1.0,v1.2", b"x", **{"Content-Type": "text/plain"})
    assert r.status == 415, body


# ============================================================================ agreement (pure)
def test_agreement_by_class_name_pinned_values():
    # A numbers (Background, Hair); B numbers (Background, Face, Hair): Hair is 1 in A and 2 in B
    a = np.array([[0, 1, 1], [1, 1, 0]], np.uint8)
    b = np.array([[0, 2, 1], [2, 0, 0]], np.uint8)
    got = by_class_name(a, ("Background", "Hair"), b, ("Background", "Face", "Hair"))
    # pixels: (B,B) (H,H) (H,F) / (H,H) (H,B) (B,B) → 4 of 6 agree
    assert got["pixel_agreement"] == pytest.approx(4 / 6, abs=1e-6)
    by = {c["class"]: c for c in got["classes"]}
    assert by["Background"] == {"class": "Background", "iou": pytest.approx(2 / 3, abs=1e-6), "pixels_a": 2,
                                "pixels_b": 3, "intersection": 2}
    assert by["Hair"] == {"class": "Hair", "iou": pytest.approx(2 / 4, abs=1e-6), "pixels_a": 4, "pixels_b": 2,
                          "intersection": 2}
    assert by["Face"] == {"class": "Face", "iou": 0.0, "pixels_a": 0, "pixels_b": 1, "intersection": 0}
    assert got["mean_iou"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3, abs=1e-6)


def test_agreement_of_identical_maps_is_total_and_sizes_must_match():
    m = np.random.default_rng(0).integers(0, 5, (7, 9)).astype(np.uint8)
    classes = tuple(f"c{i}" for i in range(5))
    got = by_class_name(m, classes, m, classes)
    assert got["pixel_agreement"] == 1.0 and got["mean_iou"] == 1.0
    assert all(c["iou"] == 1.0 for c in got["classes"])
    with pytest.raises(ValueError, match="different sizes"):
        by_class_name(m, classes, m[:, :8], classes)


# ======================================================================== versions (property)
PATTERN = re.compile(json.loads(OPENAPI.read_text())["paths"]["/api/compare"]["post"]["parameters"][0]["schema"]
                     ["pattern"])
NAME = st.one_of(st.sampled_from(["v1.0", "v1.2", "v2.0-beta", "latest", "stable", "auto", "v10.0.3-rc.1", "a_b-c"]),
                 st.from_regex(r"v(0|[1-9][0-9]{0,5})(\.(0|[1-9][0-9]{0,5})){0,2}(-[0-9A-Za-z]+)?", fullmatch=True),
                 st.from_regex(r"[a-z][a-z0-9_-]{0,31}", fullmatch=True))
TEXT = st.one_of(st.text(max_size=80), st.lists(st.one_of(NAME, st.text(max_size=6)), max_size=10).map(",".join),
                 st.lists(NAME, min_size=1, max_size=10).map(",".join))


@settings(max_examples=400, deadline=None)
@given(TEXT)
def test_versions_accepted_exactly_when_the_openapi_pattern_matches(text):
    try:
        names = compare.parse_versions([text])
    except (HTTPProblem, InvalidVersionName) as exc:
        if isinstance(exc, HTTPProblem):
            assert exc.status == 400 and exc.error == "bad_parameter" and exc.detail.startswith("versions: ")
        assert not (PATTERN.search(text) and len(text) <= compare.MAX_QUERY), text
        return
    assert PATTERN.search(text) and len(text) <= compare.MAX_QUERY, text
    items = text.split(",")
    assert names == list(dict.fromkeys(items))  # duplicates merged, order kept
    assert 1 <= len(names) <= compare.MAX_VERSIONS and 2 <= len(items) <= compare.MAX_VERSIONS


@given(st.lists(NAME, min_size=2, max_size=compare.MAX_VERSIONS, unique=True))
def test_valid_lists_round_trip(names):
    assert compare.parse_versions([",".join(names)]) == names
