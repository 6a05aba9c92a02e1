"""The HTTP API in process (pytest-aiohttp): every route, the parse response, versions, meta, health,
metrics, the OpenAPI document and API-version compatibility."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from aiohttp import FormData, web
from prometheus_client.parser import text_string_to_metric_families

from m2fpkit.server.app import make_app
from m2fpkit.server.config import ServerConfig

pytest.register_assert_rewrite("server_fixtures")
pytest_plugins = ["server_fixtures"]
from server_fixtures import DEMO_ALIASES, DEMO_VERSIONS, decode_png_b64, jpeg_bytes, png_bytes  # noqa: E402

STATES = {"discovered", "loading", "ready", "draining", "unloaded", "failed"}
CHANNELS = {"v1.0": "stable", "v1.1": "stable", "v1.2": "recommended", "v2.0-beta": "experimental"}
TASKS = {"v1.0": "multi-human", "v1.1": "single-human", "v1.2": "multi-human", "v2.0-beta": "multi-human"}


@pytest.fixture
async def client(aiohttp_client, demo_root: Path):
    return await aiohttp_client(make_app(ServerConfig(bundles=demo_root)))


def multipart(data: bytes, name: str = "image", filename: str = "person.png", ctype: str = "image/png") -> FormData:
    form = FormData()
    form.add_field(name, data, filename=filename, content_type=ctype)
    return form


async def parse_ok(client, version: str, data: bytes | FormData, query: str = "", **headers) -> tuple[dict, dict]:
    if isinstance(data, bytes):
        headers.setdefault("Content-Type", "image/png")
    r = await client.post(f"/api/{version}/parse{query}", data=data, headers=headers)
    body = await r.json()
    assert r.status == 200, body
    return body, dict(r.headers)


async def meta_of(client, version: str) -> dict:
    r = await client.get(f"/api/{version}/meta")
    assert r.status == 200
    return await r.json()


def decode_jpeg_b64(data: str) -> np.ndarray:
    import base64

    import cv2

    raw = base64.b64decode(data, validate=True)
    assert raw[:3] == b"\xff\xd8\xff", "not a JPEG"
    img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, "JPEG does not decode"
    return img


def check_parse_body(body: dict, headers: dict, meta: dict, hw: tuple[int, int]) -> None:
    assert body["success"] is True
    assert headers["X-Model-Version"] == body["version"] == meta["version"]
    assert headers["X-Request-ID"] == body["request_id"]
    assert body["task"] == meta["task"]
    assert body["image"] == {"height": hw[0], "width": hw[1]}
    assert body["visualization_format"] == "jpeg"  # the default: JPEG, at most 1280 px (these images are smaller)
    assert body["visualization_size"] == {"height": hw[0], "width": hw[1]}
    vis = decode_jpeg_b64(body["visualization"])
    assert vis.shape == (hw[0], hw[1], 3) and vis.dtype == np.uint8
    assert isinstance(body["labels"], list) and isinstance(body["scores"], list)
    assert len(body["labels"]) == len(body["scores"])
    assert set(body["labels"]) <= set(meta["classes"])
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in body["scores"])
    assert set(body["classes_present"]) <= set(meta["classes"]) and body["classes_present"]
    t = body["timing"]
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in t.values()), t  # all ms
    # every response says whether the weights are random, with the channel: the demo's are trained ones
    assert body["channel"] == meta["channel"]
    assert body["random_weights"] is meta["random_weights"] is False
    assert body["weights_note"] == meta["weights_note"] and "not M2FP's checkpoint" in body["weights_note"]
    for step in ("queue", "decode", "preprocess", "inference", "postprocess", "render", "encode"):
        assert isinstance(t[step], (int, float)) and t[step] >= 0, step
    assert t["inference"] > 0


# ============================================================================================ parse
async def test_parse_multipart_on_latest(client):
    image = png_bytes(160, 120)
    body, headers = await parse_ok(client, "latest", multipart(image))
    assert body["version"] == "v1.2"
    assert headers["X-Route-Rule"] == body["route"] == "latest"
    check_parse_body(body, headers, await meta_of(client, "v1.2"), (120, 160))


async def test_parse_raw_body_on_exact_versions(client):
    image = jpeg_bytes(144, 200, seed=3)
    body, headers = await parse_ok(client, "v1.1", image, **{"Content-Type": "image/jpeg"})
    assert body["version"] == "v1.1" and body["task"] == "single-human"
    assert headers["X-Route-Rule"] == "exact"
    check_parse_body(body, headers, await meta_of(client, "v1.1"), (200, 144))
    # application/octet-stream is an image body too (sniffed by content)
    body, headers = await parse_ok(client, "v2.0-beta", png_bytes(100, 80),
                                   **{"Content-Type": "application/octet-stream", "X-API-Version": "2.0"})
    check_parse_body(body, headers, await meta_of(client, "v2.0-beta"), (80, 100))


async def test_parse_alias_and_auto(client):
    image = png_bytes(120, 96)
    body, headers = await parse_ok(client, "stable", image)
    assert body["version"] == headers["X-Model-Version"] == "v1.0"
    assert body["route"] == "alias:stable"
    check_parse_body(body, headers, await meta_of(client, "v1.0"), (96, 120))
    # without a routes file, auto has no weights and falls back to latest
    body, headers = await parse_ok(client, "auto", image)
    assert body["version"] == headers["X-Model-Version"] == "v1.2"
    assert body["route"] == headers["X-Route-Rule"] == "auto-fallback"
    # the same image gives the same answer every time (and the request id is the client's when given)
    again, headers = await parse_ok(client, "v1.2", image, **{"X-Request-ID": "req-123"})
    assert again["request_id"] == headers["X-Request-ID"] == "req-123"
    assert (again["labels"], again["scores"], again["visualization"]) == (body["labels"], body["scores"],
                                                                         body["visualization"])


def rle_decode(rle: dict) -> np.ndarray:
    h, w = rle["size"]
    counts = rle["counts"]
    assert sum(counts) == h * w and all(c >= 0 for c in counts)
    flat = np.zeros(h * w, dtype=bool)
    pos = 0
    for i, c in enumerate(counts):
        if i % 2 == 1:
            flat[pos:pos + c] = True
        pos += c
    return flat.reshape(h, w)


async def test_parse_includes_label_map_persons_and_masks(client):
    image = png_bytes(128, 96, seed=5)
    meta = await meta_of(client, "v1.2")
    rle_body, _ = await parse_ok(client, "v1.2", image, "?include=label_map,persons,masks,person_map&mask_format=rle")
    png_body, _ = await parse_ok(client, "v1.2", image,
                                 "?include=label_map,persons,masks&mask_format=png&visualization=0")
    assert "visualization" not in png_body and "person_map" not in png_body

    label_map = decode_png_b64(rle_body["label_map"])
    assert label_map.shape == (96, 128) and label_map.dtype == np.uint8
    assert int(label_map.max()) < len(meta["classes"])
    assert sorted({meta["classes"][c] for c in np.unique(label_map)}) == rle_body["classes_present"]
    assert np.array_equal(label_map, decode_png_b64(png_body["label_map"]))
    person_map = decode_png_b64(rle_body["person_map"])
    assert person_map.shape == (96, 128) and person_map.dtype == np.uint16

    assert len(rle_body["masks"]) == len(png_body["masks"]) == len(rle_body["labels"])
    for r, p in zip(rle_body["masks"], png_body["masks"]):
        assert r["size"] == [96, 128]
        m_png = decode_png_b64(p)
        assert m_png.shape == (96, 128) and set(np.unique(m_png)) <= {0, 255}
        assert np.array_equal(rle_decode(r), m_png == 255)

    assert len(rle_body["persons"]) == len(png_body["persons"])
    ids = [p["id"] for p in rle_body["persons"]]
    assert ids == list(range(1, len(ids) + 1))
    for pr, pp in zip(rle_body["persons"], png_body["persons"]):
        assert pr["id"] == pp["id"] and pr["parts"] == pp["parts"]
        assert np.array_equal(rle_decode(pr["mask"]), decode_png_b64(pp["mask"]) == 255)
        assert all(q["label"] in meta["classes"] for q in pr["parts"])
        # a person's pixels in the person map carry its id
        assert set(np.unique(person_map[rle_decode(pr["mask"])]).tolist()) <= {pr["id"], *ids, 0}


# ========================================================================================= versions
async def test_versions_listing(client):
    r = await client.get("/api/versions")
    assert r.status == 200
    data = await r.json()
    assert [v["version"] for v in data["versions"]] == list(DEMO_VERSIONS)
    assert data["latest"] == "v1.2"
    assert data["aliases"] == DEMO_ALIASES
    assert data["routes"]["weights"] == {} and data["routes"]["sticky"]["header"] == "X-Route-Key"
    assert data["last_known_good"] == "on"  # the demo store is writable: the record is kept there
    by = {v["version"]: v for v in data["versions"]}
    for name, v in by.items():
        assert v["state"] in STATES
        assert v["channel"] == CHANNELS[name] and v["task"] == TASKS[name]
        assert v["weight"] == 0.0 and v["in_flight"] == 0 and v["reason"] is None
    assert set(by["v1.0"]) == {  # the registry's 24 fields, the weight from the routes and the grades (quality)
        "version", "state", "reason", "update_error", "channel", "task", "compatible_api", "semver", "created_at",
        "notes", "aliases", "pinned", "loaded", "in_flight", "requests", "last_used_seconds_ago", "load_seconds",
        "memory_bytes", "shared_weight_bytes", "weight", "random_weights", "weights_note", "plan", "golden",
        "identity", "quality"}
    assert all(v["quality"] == [] for v in by.values())  # no grade recorded
    # the demo versions are trained on synthetic figures (not random, not M2FP's checkpoint) and say so
    assert all(v["random_weights"] is False and "trained on synthetic figures" in v["weights_note"]
               and "synthetic figures" in v["notes"] for v in by.values())
    # latest and aliased versions are loaded at start, the others on first use
    assert (by["v1.2"]["state"], by["v1.2"]["loaded"], by["v1.2"]["pinned"]) == ("ready", True, True)
    assert (by["v1.0"]["state"], by["v1.0"]["loaded"], by["v1.0"]["pinned"]) == ("ready", True, True)
    assert (by["v1.1"]["state"], by["v1.1"]["loaded"]) == ("discovered", False)
    assert by["v1.2"]["aliases"] == ["latest"] and by["v1.0"]["aliases"] == ["stable"] and by["v1.1"]["aliases"] == []
    assert by["v2.0-beta"]["compatible_api"] == ["2.0"]

    # a request in flight is visible, then it is not; the version it loaded stays listed as ready
    task = asyncio.ensure_future(client.post("/api/v1.1/parse", data=png_bytes(96, 72),
                                             headers={"Content-Type": "image/png"}))
    seen = 0
    deadline = time.monotonic() + 60
    while not task.done() and time.monotonic() < deadline:
        by = {v["version"]: v for v in (await (await client.get("/api/versions")).json())["versions"]}
        seen = max(seen, by["v1.1"]["in_flight"])
        await asyncio.sleep(0.01)
    r = await task
    assert r.status == 200
    assert seen == 1, "the in-flight parse never showed in /api/versions"
    by = {v["version"]: v for v in (await (await client.get("/api/versions")).json())["versions"]}
    assert (by["v1.1"]["state"], by["v1.1"]["loaded"], by["v1.1"]["in_flight"], by["v1.1"]["requests"]) == (
        "ready", True, 0, 1)


async def test_meta(client):
    for name, version in (("v1.0", "v1.0"), ("latest", "v1.2"), ("stable", "v1.0"), ("v1.1", "v1.1")):
        r = await client.get(f"/api/{name}/meta")
        m = await r.json()
        assert r.status == 200, m
        assert m["version"] == r.headers["X-Model-Version"] == version
        assert m["channel"] == CHANNELS[version] and m["task"] == TASKS[version]
        assert m["classes"] and m["classes"][0] == "Background"
        assert m["num_classes"] == len(m["classes"]) == len(m["palette"])
        assert all(len(c) == 3 and all(isinstance(x, int) and 0 <= x <= 255 for x in c) for c in m["palette"])
        assert m["palette"][0] == [0, 0, 0]
        pre = m["preprocess"]
        assert len(pre["mean"]) == 3 and len(pre["std"]) == 3 and pre["size_divisibility"] >= 1
        if m["task"] == "multi-human":
            assert pre["resize"] == "shortest-edge" and m["input_size"] is None
            assert m["classes"][m["human_class"]] == "Human"
        else:
            assert pre["resize"] == "center-canvas" and m["human_class"] is None
            assert m["input_size"] == [pre["canvas"][1], pre["canvas"][0]]
        assert m["compatible_api"] and m["semver"].startswith(version[1:])
        assert m["random_weights"] is False and "trained on synthetic figures" in m["weights_note"]
    for name, status in (("auto", 404), ("v9.9", 404), ("nosuch", 404), ("Bad Name", 400)):
        r = await client.get(f"/api/{name}/meta")
        body = await r.json()
        assert r.status == status, (name, body)
        assert body["success"] is False and body["detail"]
        if name in ("v9.9", "nosuch"):  # an unknown name's 404 lists what exists
            assert "available versions: v1.0, v1.1, v1.2, v2.0-beta; aliases: latest, stable" in body["detail"], body


# ========================================================================================== health
async def test_healthz(client):
    r = await client.get("/healthz")
    assert r.status == 200 and await r.json() == {"status": "alive"}
    assert r.headers["X-Request-ID"]


async def test_readyz_lists_ready_versions(client):
    r = await client.get("/readyz")
    body = await r.json()
    assert r.status == 200, body
    assert body["ready"] is True and body["latest"] == "v1.2" and "detail" not in body
    assert {"v1.0", "v1.2"} <= set(body["versions"]) <= set(DEMO_VERSIONS)
    assert body["last_known_good"] == "on"


async def test_empty_bundle_root_is_alive_but_not_ready(aiohttp_client, empty_root: Path):
    client = await aiohttp_client(make_app(ServerConfig(bundles=empty_root)))
    r = await client.get("/healthz")
    assert r.status == 200
    r = await client.get("/readyz")
    body = await r.json()
    assert r.status == 503 and body == {"ready": False, "versions": [], "latest": None, "detail": "no versions yet",
                                        "last_known_good": "on"}
    r = await client.get("/api/versions")
    assert r.status == 200
    listing = await r.json()
    assert listing["versions"] == [] and listing["latest"] is None and listing["aliases"] == {}
    assert list(empty_root.iterdir()) == []  # nothing created in the bundle root
    r = await client.post("/api/latest/parse", data=png_bytes(), headers={"Content-Type": "image/png"})
    body = await r.json()
    assert r.status == 503 and body["error"] == "version_unavailable" and r.headers["Retry-After"]
    assert body["detail"] == "no versions yet"


async def test_index_and_static_files(client):
    r = await client.get("/")
    assert r.status == 200 and r.content_type == "text/html"
    html = await r.text()
    for element in ('id="version"', 'id="file"', 'id="sample"', 'id="parse"', 'id="result-img"',
                    'id="answered-version"', 'id="latency"', 'id="warning"', 'id="legend"', 'id="error"'):
        assert element in html, element
    assert not re.search(r"""(src|href)=["']https?://""", html), "the WebUI must not load anything from outside"
    samples = re.findall(r'<option value="([^"]+\.(?:png|jpg))"', html)
    assert samples
    for name in samples:
        r = await client.get(f"/static/samples/{name}")
        assert r.status == 200, name
        assert (await r.read())[:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb", b"\xff\xd8\xff\xe1")


# ========================================================================================= metrics
def samples(text: str, name: str) -> list:
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name]


async def test_metrics_count_requests_per_version_and_rule(client):
    image = png_bytes(96, 64)
    await parse_ok(client, "latest", image, "?visualization=0")
    await parse_ok(client, "v1.0", image, "?visualization=0")
    await parse_ok(client, "v1.0", image, "?visualization=0")
    r = await client.post("/api/v9.9/parse", data=image, headers={"Content-Type": "image/png"})
    assert r.status == 404
    r = await client.get("/metrics")
    assert r.status == 200 and r.content_type == "text/plain"
    text = await r.text()
    got = {(s.labels["version"], s.labels["rule"], s.labels["status"]): s.value
           for s in samples(text, "m2fp_requests_total")}
    assert got[("v1.2", "latest", "200")] == 1.0
    assert got[("v1.0", "exact", "200")] == 2.0
    assert got[("-", "-", "404")] == 1.0
    errors = {(s.labels["error"], s.labels["status"]): s.value for s in samples(text, "m2fp_errors_total")}
    assert errors[("unknown_version", "404")] == 1.0
    weights = {s.labels["kind"]: s.value for s in samples(text, "m2fp_weight_bytes")}
    assert weights["used"] > 0 and weights["mapped"] > 0, weights
    loaded = {(s.labels["version"], s.labels["state"]): s.value for s in samples(text, "m2fp_version_loaded")}
    assert loaded[("v1.2", "ready")] == 1.0 and loaded[("v1.1", "discovered")] == 0.0
    counts = {s.labels["version"]: s.value for s in samples(text, "m2fp_inference_seconds_count")}
    assert counts["v1.0"] == 2.0 and counts["v1.2"] == 1.0
    events = {s.labels["event"]: s.value for s in samples(text, "m2fp_version_events")}
    assert events["loads"] >= 2 and events["load_failures"] == 0
    assert samples(text, "m2fp_in_flight")[0].value == 0.0


# ========================================================================================= openapi
def documented_route(path: str) -> str:
    return "/static/{filename}" if path.startswith("/static") else path


async def test_openapi_documents_every_route(client):
    r = await client.get("/api/openapi.json")
    assert r.status == 200
    doc = json.loads(await r.text())
    assert doc["openapi"].startswith("3.0.") and doc["info"]["title"] and doc["info"]["version"]
    paths = doc["paths"]

    app: web.Application = client.server.app
    routed: set[tuple[str, str]] = set()
    for route in app.router.routes():
        if route.method == "HEAD":  # added with every GET
            continue
        info = route.resource.get_info()
        path = info.get("path") or info.get("formatter") or info.get("prefix")
        routed.add((documented_route(path), route.method.lower()))
    documented = {(p, m) for p, ops in paths.items() for m in ops if m in ("get", "post", "put", "delete", "patch")}
    assert routed - documented == set(), "routes missing from openapi.json"
    assert documented - routed == set(), "openapi.json documents routes the app does not have"

    # every $ref resolves
    def refs(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "$ref":
                    yield v
                else:
                    yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)

    for ref in set(refs(doc)):
        assert ref.startswith("#/"), ref
        node = doc
        for part in ref[2:].split("/"):
            assert part in node, f"dangling $ref {ref}"
            node = node[part]

    error = doc["components"]["schemas"]["Error"]
    assert set(error["required"]) == {"success", "error", "detail", "request_id"}
    parse = paths["/api/{version}/parse"]["post"]
    for status in ("200", "400", "404", "405", "408", "409", "413", "415", "422", "503", "504"):
        assert status in parse["responses"], status
        if status != "200":
            assert parse["responses"][status]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Error"}
    assert "Retry-After" in parse["responses"]["503"]["headers"]
    assert {"multipart/form-data", "image/jpeg", "image/png"} <= set(parse["requestBody"]["content"])
    params = {(p.get("in"), p.get("name")) for p in parse["parameters"]}
    assert {("path", "version"), ("query", "include"), ("query", "mask_format"), ("query", "visualization"),
            ("query", "api"), ("header", "X-API-Version"), ("header", "X-Route-Key")} <= params
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for path in ("/admin/routes", "/admin/routes/reload", "/admin/routes/weights", "/admin/routes/rollback"):
        for op in paths[path].values():
            assert op["security"] == [{"bearerAuth": []}], path
            assert "401" in op["responses"] and "404" in op["responses"], path


async def test_every_route_answers_without_a_server_error(client):
    """Each route of the router, called once as a client would (admin and other token-guarded routes refuse
    politely); a route added later is exercised too."""
    app: web.Application = client.server.app
    concrete = {"version": "latest", "name": "v1.2.tar", "filename": "samples/one_person.png", "model": "m2fp"}
    seen = set()
    for route in app.router.routes():
        info = route.resource.get_info()
        if "prefix" in info:  # static
            path = info["prefix"].rstrip("/") + "/" + concrete["filename"]
        else:
            path = (info.get("path") or info["formatter"]).format(**concrete)
        kwargs = {}
        if route.method in ("POST", "PUT"):
            kwargs = ({"data": png_bytes(64, 48), "headers": {"Content-Type": "image/png"}} if path.endswith("/parse")
                      else {"json": {"v1.2": 1}})
        r = await client.request(route.method, path, **kwargs)
        await r.read()
        assert r.status < 500, (route.method, path, r.status)
        if r.status >= 400 and route.method != "HEAD":
            body = await r.json()
            if path.startswith("/v2"):  # the Open Inference Protocol's error body: {"error": <reason>, …}
                assert isinstance(body["error"], str) and body["error"], (route.method, path, body)
            else:
                assert body["success"] is False and body["error"] and body["request_id"], (route.method, path, body)
        seen.add((route.method, path))
    assert ("POST", "/api/latest/parse") in seen and ("GET", "/api/latest/meta") in seen


# =================================================================================== compatible API
async def test_compatible_api(client):
    image = png_bytes(96, 64)
    # latest is v1.2 (API 1.0/1.1); the only 2.0 version is experimental: latest does not fall back to it,
    # the 409 names it, and asked for by name it answers with its channel
    for query, headers in (("?visualization=0", {"X-API-Version": "2.0"}), ("?visualization=0&api=2.0", {})):
        r = await client.post(f"/api/latest/parse{query}", data=image, headers={"Content-Type": "image/png", **headers})
        body = await r.json()
        assert r.status == 409 and body["error"] == "incompatible_api", body
        assert "v2.0-beta" in body["detail"] and "experimental" in body["detail"], body
    body, headers = await parse_ok(client, "v2.0-beta", image, "?visualization=0", **{"X-API-Version": "2.0"})
    assert body["version"] == headers["X-Model-Version"] == "v2.0-beta" and body["channel"] == "experimental"
    body, _ = await parse_ok(client, "latest", image, "?visualization=0", **{"X-API-Version": "1.1"})
    assert body["version"] == "v1.2"
    body, _ = await parse_ok(client, "v1.0", image, "?visualization=0", **{"X-API-Version": "1.0"})
    assert body["version"] == "v1.0"
    for path, api in (("/api/latest/parse", "9.9"), ("/api/auto/parse", "9.9"),  # nothing speaks 9.9
                      ("/api/v1.0/parse", "1.1"), ("/api/v2.0-beta/parse", "1.0"),  # exact, incompatible
                      ("/api/stable/parse", "2.0")):  # an alias of an incompatible version
        r = await client.post(path, data=image, headers={"Content-Type": "image/png", "X-API-Version": api})
        body = await r.json()
        assert r.status == 409, (path, api, body)
        assert body["error"] == "incompatible_api" and body["success"] is False and "X-Model-Version" not in r.headers
