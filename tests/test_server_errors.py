"""Every failure maps to its status with a JSON body ``{success: false, error, detail, request_id}``."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from aiohttp import FormData

from m2fpkit.runtime import errors as rt
from m2fpkit.runtime.imageio import decode_image
from m2fpkit.runtime.predictor import ImageLimits
from m2fpkit.runtime.registry import RegistryOptions
from m2fpkit.server.app import make_app
from m2fpkit.server.config import ServerConfig

pytest.register_assert_rewrite("server_fixtures")
pytest_plugins = ["server_fixtures"]
from server_fixtures import copy_root, encode, jpeg_bytes, person_image, png_bytes  # noqa: E402

PNG = {"Content-Type": "image/png"}


async def start(aiohttp_client, root: Path, **config):
    return await aiohttp_client(make_app(ServerConfig(bundles=root, **config)))


@pytest.fixture
async def client(aiohttp_client, latest_only_root: Path):
    return await start(aiohttp_client, latest_only_root)


async def expect_error(response, status: int, error: str | None = None) -> dict:
    text = await response.text()
    assert response.status == status, text
    assert response.content_type == "application/json", text
    body = await response.json()
    assert set(body) == {"success", "error", "detail", "request_id"}, body
    assert body["success"] is False
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["request_id"] and body["request_id"] == response.headers["X-Request-ID"]
    assert "X-Model-Version" not in response.headers
    if error is not None:
        assert body["error"] == error, body
    return body


def form(field: str, data, filename: str | None = "x.png", ctype: str = "image/png") -> FormData:
    f = FormData(default_to_multipart=True)
    if filename is None:
        f.add_field(field, data)
    else:
        f.add_field(field, data, filename=filename, content_type=ctype)
    return f


# ============================================================================================ input
async def test_empty_body(client):
    body = await expect_error(await client.post("/api/latest/parse", data=b"", headers=PNG), 400, "empty_image")
    assert "empty" in body["detail"]
    await expect_error(await client.post("/api/latest/parse", data=form("image", b"")), 400, "empty_image")


async def test_truncated_jpeg(client):
    data = jpeg_bytes(160, 120)
    for cut in (len(data) // 2, len(data) - 2, 40):
        r = await client.post("/api/latest/parse", data=data[:cut], headers={"Content-Type": "image/jpeg"})
        await expect_error(r, 400, "undecodable_image")


def runtime_status(data: bytes) -> int:
    """The status the runtime's own classification of ``data`` calls for."""
    try:
        decode_image(data)
    except rt.UnsupportedImageFormat:
        return 415
    except rt.ImageTooLarge:
        return 413
    except rt.BadAspectRatio:
        return 422
    except rt.InputError:
        return 400
    return 200


async def test_random_bytes_are_refused_as_the_runtime_classifies_them(client):
    rng = np.random.default_rng(7)
    cases = [rng.bytes(n) for n in (1, 16, 1000, 20_000)]
    cases += [b"\xff\xd8\xff" + rng.bytes(500), b"\x89PNG\r\n\x1a\n" + rng.bytes(500), b"BM" + rng.bytes(40),
              b"RIFF\x00\x00\x00\x00WEBP" + rng.bytes(50), b"II*\x00" + rng.bytes(64)]
    seen = set()
    for data in cases:
        want = runtime_status(data)
        assert want in (400, 413, 415), (data[:8], want)  # a random BMP header may claim a huge size
        r = await client.post("/api/latest/parse", data=data, headers={"Content-Type": "application/octet-stream"})
        await expect_error(r, want)
        seen.add(want)
    assert {400, 415} <= seen


async def test_text_body_is_unsupported_media_type(client):
    r = await client.post("/api/latest/parse", data="a picture of a person", headers={"Content-Type": "text/plain"})
    body = await expect_error(r, 415, "unsupported_media_type")
    assert "multipart/form-data" in body["detail"]
    r = await client.post("/api/latest/parse", json={"image": "aGVsbG8="})
    await expect_error(r, 415, "unsupported_media_type")
    # text sent as an image is sniffed as text
    r = await client.post("/api/latest/parse", data=b"hello, I am not a picture", headers=PNG)
    body = await expect_error(r, 415, "unsupported_media_type")
    assert "text" in body["detail"]


async def test_gif_is_unsupported(client):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(buf, "GIF")
    r = await client.post("/api/latest/parse", data=buf.getvalue(), headers={"Content-Type": "image/gif"})
    body = await expect_error(r, 415, "unsupported_media_type")
    assert "GIF" in body["detail"]
    r = await client.post("/api/latest/parse", data=form("image", buf.getvalue(), "a.gif", "image/gif"))
    await expect_error(r, 415, "unsupported_media_type")


async def test_multipart_without_image_field(client):
    r = await client.post("/api/latest/parse", data=form("file", png_bytes()))
    body = await expect_error(r, 400, "missing_image")
    assert "'image'" in body["detail"]
    r = await client.post("/api/latest/parse", data=form("image", "not a file", filename=None))
    await expect_error(r, 400, "missing_image")


async def test_bad_query_parameters(client):
    r = await client.post("/api/latest/parse?include=label_map,everything", data=png_bytes(), headers=PNG)
    body = await expect_error(r, 400, "bad_parameter")
    assert "everything" in body["detail"]
    r = await client.post("/api/latest/parse?mask_format=jpeg", data=png_bytes(), headers=PNG)
    await expect_error(r, 400, "bad_parameter")


# ============================================================================================ limits
async def test_body_over_max_body_bytes(aiohttp_client, latest_only_root: Path):
    client = await start(aiohttp_client, latest_only_root, max_body_bytes=20_000)
    big = encode(person_image(320, 240, seed=1) + np.random.default_rng(1).integers(0, 40, (240, 320, 3),
                                                                                      dtype=np.uint8), ".png")
    assert len(big) > 20_000
    r = await client.post("/api/latest/parse", data=big, headers=PNG)
    await expect_error(r, 413)
    r = await client.post("/api/latest/parse", data=form("image", big))
    await expect_error(r, 413)
    # under the limit is fine
    small = png_bytes(64, 48)
    assert len(small) < 20_000
    r = await client.post("/api/latest/parse?visualization=0", data=small, headers=PNG)
    assert r.status == 200, await r.text()


async def test_pixel_limit_and_aspect_ratio(aiohttp_client, latest_only_root: Path):
    client = await start(aiohttp_client, latest_only_root,
                         runtime=RegistryOptions(limits=ImageLimits(max_pixels=10_000, max_aspect=20.0)))
    r = await client.post("/api/latest/parse", data=png_bytes(160, 120), headers=PNG)  # 19 200 px
    body = await expect_error(r, 413, "image_too_large")
    assert "160x120" in body["detail"]
    # checked from the header: a PNG that claims 100 000 x 100 000 is refused without decoding it
    huge_header = bytearray(png_bytes(16, 16))
    huge_header[16:24] = (100_000).to_bytes(4, "big") * 2
    r = await client.post("/api/latest/parse", data=bytes(huge_header), headers=PNG)
    await expect_error(r, 413, "image_too_large")
    r = await client.post("/api/latest/parse", data=png_bytes(300, 10), headers=PNG)  # 3 000 px, 30:1
    body = await expect_error(r, 422, "bad_aspect_ratio")
    assert "300x10" in body["detail"]
    r = await client.post("/api/latest/parse?visualization=0", data=png_bytes(100, 90), headers=PNG)
    assert r.status == 200, await r.text()


# ========================================================================================== versions
async def test_unknown_versions(client):
    for name in ("v9.9", "v1.2.7", "nosuch", "stable"):  # stable names v1.0, which this root lacks
        r = await client.post(f"/api/{name}/parse", data=png_bytes(), headers=PNG)
        body = await expect_error(r, 404, "unknown_version")
        assert name in body["detail"] or "v1.0" in body["detail"]
    await expect_error(await client.get("/api/v9.9/meta"), 404, "unknown_version")


_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event in ("open", "os.listdir", "os.scandir", "os.stat") and args:
        path = args[0]
        if isinstance(path, (str, bytes, os.PathLike)):
            _opened.append(os.path.abspath(os.fsdecode(path)))


sys.addaudithook(_audit)


async def test_path_traversal_never_leaves_the_bundle_root(aiohttp_client, latest_only_root: Path, tmp_path: Path):
    global _opened
    root = copy_root(latest_only_root, tmp_path / "inside" / "bundles")
    client = await start(aiohttp_client, root)
    # a complete, valid bundle and a secret just outside the root
    outside = tmp_path / "outside"
    copy_root(latest_only_root, outside)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0:secret\n")

    names = ["..%2F..%2Fetc", "..%2F..%2F..%2Foutside%2Fm2fp%2Fv1.2", "v1.2%2F..", "v1.2%2F..%2F..%2F..%2Fetc",
             "%2E%2E", "..", "...", "v1.2%00", "%2Fetc%2Fpasswd", "v1.2%5C..%5C..", "~root", "latest%2F..%2Fv1.2"]
    _opened = []
    try:
        for name in names:
            for method, path in (("POST", f"/api/{name}/parse"), ("GET", f"/api/{name}/meta")):
                r = await client.request(method, path, data=png_bytes(32, 32), headers=PNG, allow_redirects=False)
                text = await r.text()
                assert r.status in (400, 404), (path, r.status, text)
                if r.status == 400 or r.content_type == "application/json":
                    await expect_error(r, r.status)
                assert "secret" not in text and "X-Model-Version" not in r.headers, path
        for path in ("/static/..%2F..%2Fserver%2Fapp.py", "/static/../../../etc/passwd", "/static/%2E%2E/app.py",
                     "/static/samples/..%2F..%2Fapp.py"):
            r = await client.get(path, allow_redirects=False)
            assert r.status in (400, 403, 404), (path, r.status)
            assert "make_app" not in await r.text()
    finally:
        opened, _opened = _opened, None
    libraries = tuple(os.path.abspath(p) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix, "/usr/lib", "/proc",
                                                   "/dev", "/sys", "/etc/localtime"})
    static = os.path.abspath(Path(__file__).resolve().parent.parent / "server" / "static")
    stray = [p for p in opened
             if not p.startswith(os.path.abspath(root)) and not p.startswith(libraries) and not p.startswith(static)]
    assert not stray, f"files outside the bundle root were touched: {stray[:10]}"


async def test_wrong_method(client):
    r = await client.get("/api/latest/parse")
    await expect_error(r, 405, "method_not_allowed")
    assert "POST" in r.headers["Allow"]
    for method, path in (("POST", "/api/versions"), ("DELETE", "/api/latest/meta"), ("PUT", "/healthz"),
                         ("POST", "/metrics"), ("GET", "/admin/routes/rollback")):
        r = await client.request(method, path)
        await expect_error(r, 405, "method_not_allowed")
        assert r.headers["Allow"]
    await expect_error(await client.get("/no/such/page"), 404, "not_found")


async def test_failed_version_is_unavailable_with_its_reason(aiohttp_client, demo_root: Path, tmp_path: Path):
    root = copy_root(demo_root, tmp_path / "bundles", versions=("v1.0", "v1.2"))
    model = root / "m2fp" / "v1.0" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-100])  # truncated: the manifest no longer matches
    client = await start(aiohttp_client, root)
    for name in ("v1.0", "stable"):
        r = await client.post(f"/api/{name}/parse", data=png_bytes(), headers=PNG)
        body = await expect_error(r, 503, "version_unavailable")
        assert "model.onnx" in body["detail"] and r.headers["Retry-After"]
    by = {v["version"]: v for v in (await (await client.get("/api/versions")).json())["versions"]}
    assert by["v1.0"]["state"] == "failed" and "model.onnx" in by["v1.0"]["reason"]
    assert by["v1.2"]["state"] == "ready"
    r = await client.post("/api/latest/parse?visualization=0", data=png_bytes(64, 48), headers=PNG)
    assert r.status == 200 and r.headers["X-Model-Version"] == "v1.2"


# ===================================================================================== server state
async def test_overload_gives_503_with_retry_after(aiohttp_client, latest_only_root: Path):
    from m2fpkit.runtime.session import RuntimeSettings

    client = await start(aiohttp_client, latest_only_root, max_queue=0,
                         runtime=RegistryOptions(settings=RuntimeSettings(concurrent_runs=1)))
    image = png_bytes(160, 120)
    responses = await asyncio.gather(*(client.post("/api/latest/parse?visualization=0", data=image, headers=PNG)
                                       for _ in range(5)))
    statuses = sorted(r.status for r in responses)
    assert 500 not in statuses and set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    for r in responses:
        if r.status == 503:
            await expect_error(r, 503, "overloaded")
            assert int(r.headers["Retry-After"]) >= 1
    text = await (await client.get("/metrics")).text()
    assert 'm2fp_errors_total{error="overloaded",status="503"}' in text
    # capacity comes back once the running parse is done
    r = await client.post("/api/latest/parse?visualization=0", data=image, headers=PNG)
    assert r.status == 200


async def test_request_timeout_gives_504(aiohttp_client, latest_only_root: Path):
    client = await start(aiohttp_client, latest_only_root, request_timeout=0.001)
    r = await client.post("/api/latest/parse", data=png_bytes(160, 120), headers=PNG)
    body = await expect_error(r, 504, "timeout")
    assert "0.001" in body["detail"]
    r = await client.get("/healthz")
    assert r.status == 200
    r = await client.get("/readyz")
    assert r.status == 200


async def test_internal_error_is_generic_and_the_server_goes_on(client, monkeypatch, caplog):
    from m2fpkit.server import render

    real = render.parse

    def boom(*args, **kwargs):
        raise RuntimeError("secret: /etc/shadow password=hunter2")

    monkeypatch.setattr(render, "parse", boom)
    caplog.set_level(logging.ERROR, logger="m2fpkit.server.app")
    r = await client.post("/api/latest/parse", data=png_bytes(), headers=PNG)
    body = await expect_error(r, 500, "internal_error")
    raw = await r.text()
    assert "secret" not in raw and "hunter2" not in raw and "RuntimeError" not in raw
    assert body["detail"] == "internal server error"
    # the traceback went to the log, under the request id
    logged = [rec for rec in caplog.records if rec.exc_info and "failed" in rec.getMessage()]
    assert logged and "hunter2" in str(logged[0].exc_info[1])

    # the server keeps answering, and parses again once the fault is gone
    assert (await client.get("/healthz")).status == 200
    monkeypatch.setattr(render, "parse", real)
    r = await client.post("/api/latest/parse?visualization=0", data=png_bytes(), headers=PNG)
    assert r.status == 200, await r.text()
    by = {v["version"]: v for v in (await (await client.get("/api/versions")).json())["versions"]}
    assert by["v1.2"]["in_flight"] == 0 and by["v1.2"]["state"] == "ready"
