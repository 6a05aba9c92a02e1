"""What a client reads names the problem, never the server's internals (issue 11, fault 6), and a malformed
``X-API-Version`` is a 400, not a 409 (fault 7)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from m2fpkit.runtime import session as session_mod
from m2fpkit.runtime.registry import RegistryOptions
from m2fpkit.server.app import make_app
from m2fpkit.server.config import ServerConfig
from m2fpkit.server.errors import public_reason

pytest.register_assert_rewrite("server_fixtures")
pytest_plugins = ["server_fixtures"]
from server_fixtures import copy_root, png_bytes  # noqa: E402

PNG = {"Content-Type": "image/png"}


# ================================================================================= public reasons
@pytest.mark.parametrize("detail,public", [
    (("version v1.0 failed: onnxruntime cannot load model.onnx: [ONNXRuntimeError] : 7 : INVALID_PROTOBUF : "
      "Failed to load model because protobuf parsing failed."),
     "version v1.0 failed: onnxruntime cannot load model.onnx (details in the server log)"),
    ("PermissionError: [Errno 13] Permission denied: '/srv/bundles/m2fp/v1.0/model.onnx.data'",
     "an internal error (details in the server log)"),
    ("v1.0 is not served: it does not verify (/srv/bundles/m2fp/v1.0/config.json: bad)",
     "v1.0 is not served: it does not verify (config.json: bad)"),
    ("/etc/m2fp/routes.toml → weights → v1.2: expected a finite number",
     "routes.toml → weights → v1.2: expected a finite number"),
])
def test_public_reason_drops_paths_and_library_text(detail, public):
    assert public_reason(detail) == public


@pytest.mark.parametrize("detail", [
    "model.onnx.data: SHA-256 6d0cf2e38cb1… does not match the manifest's 749c6f5755bd…",
    "send multipart/form-data with an 'image' file or a raw image body, not 'text/plain'",
    "'auto' picks a version per request; ask /api/versions for the routes",
    "no routes file configured (start with --routes FILE)",
    "weights.json: listed in manifest.json but missing",
])
def test_public_reason_keeps_what_names_the_problem(detail):
    assert public_reason(detail) == detail


# ============================================================================= broken versions
def repin(bundle: Path, rel: str) -> None:
    """Make the manifest agree with the file's new content (so only onnxruntime can object)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    data = (bundle / rel).read_bytes()
    manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def assert_public(text: str, root: Path) -> None:
    for secret in (str(root), str(root.resolve()), "/tmp/", "ONNXRuntimeError", "INVALID_PROTOBUF", "Errno",
                   "PermissionError"):
        assert secret not in text, (secret, text)


async def test_failed_versions_show_public_reasons_and_the_log_has_the_detail(aiohttp_client, demo_root: Path,
                                                                                tmp_path: Path, monkeypatch,
                                                                                caplog):
    root = copy_root(demo_root, tmp_path / "bundles")
    m2fp = root / "m2fp"
    (m2fp / "v1.0" / "model.onnx").write_bytes(b"this is not an ONNX graph " * 64)  # garbage graph, pinned
    repin(m2fp / "v1.0", "model.onnx")
    data = m2fp / "v1.1" / "model.onnx.data"  # corrupted weights: the manifest no longer matches
    raw = bytearray(data.read_bytes())
    raw[100:200] = bytes(100)
    data.write_bytes(bytes(raw))
    # a failure whose text carries an absolute path of the store (an OSError while building the session)
    real_create = session_mod.SessionFactory.create

    def create(self, content, *args, **kwargs):
        if content.config.version == "v2.0-beta":
            raise PermissionError(13, "Permission denied", str(m2fp / "v2.0-beta" / "model.onnx.data"))
        return real_create(self, content, *args, **kwargs)

    monkeypatch.setattr(session_mod.SessionFactory, "create", create)
    caplog.set_level(logging.INFO)
    client = await aiohttp_client(make_app(ServerConfig(bundles=root, runtime=RegistryOptions(watch=False))))

    details = {}
    for version, rid in (("v1.0", "req-garbage-graph"), ("v1.1", "req-corrupt-data"), ("v2.0-beta", "req-oserror")):
        r = await client.post(f"/api/{version}/parse", data=png_bytes(), headers={**PNG, "X-Request-ID": rid,
                                                                                   "X-API-Version": "2.0"
                                                                                   if version == "v2.0-beta"
                                                                                   else "1.0"})
        text = await r.text()
        assert r.status == 503, text
        body = json.loads(text)
        assert body["error"] == "version_unavailable" and body["request_id"] == rid
        assert_public(text, root)
        details[version] = body["detail"]
    assert "model.onnx" in details["v1.0"] and "onnxruntime" in details["v1.0"]
    assert "model.onnx.data: SHA-256" in details["v1.1"] and "does not match the manifest" in details["v1.1"]
    assert "v2.0-beta" in details["v2.0-beta"] and "server log" in details["v2.0-beta"]

    # the full detail is in the log, under the request id
    logged = [rec.getMessage() for rec in caplog.records]
    assert any("req-garbage-graph" in m and "ONNXRuntimeError" in m for m in logged), logged
    assert any("req-oserror" in m and str(m2fp / "v2.0-beta" / "model.onnx.data") in m for m in logged), logged

    text = await (await client.get("/api/versions")).text()
    assert_public(text.replace(json.dumps(json.loads(text)["last_known_good"]), '""'), root)
    by = {v["version"]: v for v in json.loads(text)["versions"]}
    assert by["v1.0"]["state"] == by["v1.1"]["state"] == by["v2.0-beta"]["state"] == "failed"
    assert "model.onnx" in by["v1.0"]["reason"]
    assert by["v1.1"]["reason"].startswith("model.onnx.data: SHA-256")
    assert by["v2.0-beta"]["reason"] == "an internal error (details in the server log)"
    assert by["v1.2"]["state"] == "ready" and by["v1.2"]["reason"] is None


# =================================================================================== API version
@pytest.fixture
async def client(aiohttp_client, demo_root: Path):
    return await aiohttp_client(make_app(ServerConfig(bundles=demo_root, runtime=RegistryOptions(watch=False))))


@pytest.mark.parametrize("where,value", [
    ("header", "banana"), ("header", "1"), ("header", "1.0.0"), ("header", "v1.0"), ("header", "1.x"),
    ("header", "１.０"), ("header", "1.0; drop"), ("query", "banana"), ("query", "2.0-beta"), ("query", "9" * 500),
])
async def test_malformed_api_version_is_400(client, where, value):
    for path in ("/api/latest/parse", "/api/auto/parse", "/api/v1.0/parse"):
        if where == "header":
            r = await client.post(path, data=png_bytes(), headers={**PNG, "X-API-Version": value})
        else:
            r = await client.post(path, data=png_bytes(), headers=PNG, params={"api": value})
        body = await r.json()
        assert r.status == 400, (path, value, body)
        assert body["error"] == "bad_api_version" and "1.0" in body["detail"] and len(body["detail"]) < 200
        assert ("X-API-Version" if where == "header" else "api") in body["detail"]


async def test_well_formed_but_incompatible_api_version_stays_409(client):
    r = await client.post("/api/latest/parse", data=png_bytes(), headers={**PNG, "X-API-Version": "9.9"})
    assert r.status == 409 and (await r.json())["error"] == "incompatible_api"
    r = await client.post("/api/latest/parse?visualization=0", data=png_bytes(96, 64),
                          headers={**PNG, "X-API-Version": "1.0"})
    assert r.status == 200, await r.text()
