"""Fault 6 of the audit, end to end: deeply nested JSON anywhere in the store is one malformed file.

Before: a 100,000-deep array in ``aliases.json``, ``manifest.json``, ``config.json`` or ``.lkg.json``
raised RecursionError that nothing caught — /readyz, /api/versions, latest and alias routes answered
500, and with a saved last-known-good the server did not start. Now each is a MalformedFile for that
one file: the version is failed with a reason naming the file, the aliases and the last-known-good
state are ignored with a warning, and the real app starts and serves every other version.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from m2fpkit.runtime.bundle.writer import seal
from m2fpkit.server.app import make_app
from m2fpkit.server.config import ServerConfig
from reference.bundles import clone_bundle

pytest.register_assert_rewrite("server_fixtures")
pytest_plugins = ["server_fixtures"]
from server_fixtures import png_bytes  # noqa: E402

DEEP = b"[" * 100_000 + b"]" * 100_000


def _deep_config(stage: Path) -> None:
    """config.json replaced by the deep array; the manifest is resealed, so only the content is wrong."""
    (stage / "config.json").write_bytes(DEEP)
    seal(stage)


def _deep_manifest(stage: Path) -> None:
    (stage / "manifest.json").write_bytes(DEEP)


@pytest.fixture
def malformed_root(fast_multi_src: Path, tmp_path: Path) -> Path:
    """v1.0 and v1.2 intact; v2.0's config.json, v2.1's manifest.json, aliases.json and .lkg.json 100,000 deep."""
    root = tmp_path / "bundles"
    for version in ("v1.0", "v1.2"):
        clone_bundle(fast_multi_src, root, version)
    clone_bundle(fast_multi_src, root, "v2.0", then=_deep_config)
    clone_bundle(fast_multi_src, root, "v2.1", then=_deep_manifest)
    (root / "m2fp" / "aliases.json").write_bytes(DEEP)
    (root / "m2fp" / ".lkg.json").write_bytes(DEEP)
    return root


async def test_server_starts_and_serves_around_deeply_nested_files(aiohttp_client, malformed_root, caplog):
    caplog.set_level(logging.WARNING, logger="m2fpkit")
    client = await aiohttp_client(make_app(ServerConfig(bundles=malformed_root)))

    r = await client.get("/readyz")
    assert r.status == 200, await r.text()

    r = await client.get("/api/versions")
    assert r.status == 200, await r.text()
    data = await r.json()
    by = {v["version"]: v for v in data["versions"]}
    assert sorted(by) == ["v1.0", "v1.2", "v2.0", "v2.1"]
    for version, file in (("v2.0", "config.json"), ("v2.1", "manifest.json")):
        assert by[version]["state"] == "failed", by[version]
        assert by[version]["reason"].startswith(f"{file}: nested deeper than"), by[version]["reason"]
    for version in ("v1.0", "v1.2"):
        assert by[version]["state"] != "failed" and by[version]["reason"] is None, by[version]
    assert data["latest"] == "v1.2"  # newest usable release: the broken v2.x are not candidates
    assert data["aliases"] == {}  # aliases.json ignored

    r = await client.post("/api/latest/parse", data=png_bytes(96, 80), headers={"Content-Type": "image/png"})
    body = await r.json()
    assert r.status == 200, body
    assert body["version"] == r.headers["X-Model-Version"] == "v1.2" and body["route"] == "latest"

    r = await client.post("/api/v1.0/parse", data=png_bytes(96, 80), headers={"Content-Type": "image/png"})
    assert r.status == 200 and (await r.json())["version"] == "v1.0"

    r = await client.get("/api/v2.0/meta")
    body = await r.json()
    assert r.status == 503 and "config.json" in body["detail"], body
    r = await client.post("/api/stable/parse", data=png_bytes(96, 80), headers={"Content-Type": "image/png"})
    assert r.status == 404, await r.text()  # the alias lived in the ignored aliases.json

    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert any("aliases.json ignored" in m and "nested deeper" in m for m in warnings), warnings
    assert any(".lkg.json ignored" in m and "nested deeper" in m for m in warnings), warnings
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR and rec.exc_info], \
        "a traceback was logged"
