"""The one bearer-token check (``server/auth.py``), for the admin and the distribution endpoints.

Fault reproduced (outside audit on 8793463): ``Authorization: Bearer \\xff`` (a token that is not UTF-8)
gave 500 with a traceback on both endpoints, and a lower-case ``bearer`` scheme gave 401 although the
scheme is case-insensitive (RFC 9110 §11.1).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from m2fpkit.server.app import make_app
from m2fpkit.server.auth import require_bearer
from m2fpkit.server.config import ServerConfig
from m2fpkit.server.errors import HTTPProblem

pytest_plugins = ["server_fixtures"]

DISABLED = ("feature_disabled", "disabled")


def check(header: str | None, token: str | None = "s3cret") -> int:
    # the check reads only the headers; a stub holds what aiohttp's parser can hand over (surrogates)
    request = SimpleNamespace(headers={"Authorization": header} if header is not None else {})
    try:
        require_bearer(request, token, realm="test", disabled=DISABLED)  # type: ignore[arg-type]
    except HTTPProblem as exc:
        return exc.status
    return 200


@pytest.mark.parametrize("header, status", [
    ("Bearer s3cret", 200), ("bearer s3cret", 200), ("BEARER s3cret", 200), ("Bearer  s3cret ", 200),
    ("Bearer \udcff", 401),            # a raw 0xff byte, as aiohttp's parser hands it over (surrogateescape)
    ("Bearer \udcff\udcfe s3cret", 401), ("Bearer ÿ", 401), ("Bearer", 401), ("Basic czNjcmV0", 401),
    ("s3cret", 401), ("", 401), (None, 401), ("Bearer s3cret\udcff", 401), ("Bearer S3CRET", 401),
])
def test_the_check_is_byte_safe_and_the_scheme_case_insensitive(header, status):
    assert check(header) == status


def test_a_feature_without_token_does_not_exist():
    assert check("Bearer s3cret", token=None) == 404


async def _raw(port: int, path: str, authorization: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: " + authorization
                 + b"\r\nConnection: close\r\n\r\n")
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


async def test_non_utf8_tokens_and_lower_case_scheme_over_http(aiohttp_client, latest_only_root: Path):
    client = await aiohttp_client(make_app(ServerConfig(bundles=latest_only_root, admin_token="s3cret",
                                                        distribution_token="d1str")))
    port = client.server.port
    for path in ("/admin/routes", "/bundles"):
        status_line = (await _raw(port, path, b"Bearer \xff\xfe")).split(b"\r\n", 1)[0]
        assert status_line.endswith(b"401 Unauthorized"), (path, status_line)
    assert (await client.get("/admin/routes", headers={"Authorization": "bearer s3cret"})).status == 200
    assert (await client.get("/bundles", headers={"Authorization": "BEARER d1str"})).status == 200
    assert (await client.get("/bundles", headers={"Authorization": "Bearer s3cret"})).status == 401, \
        "the admin token does not open the distribution endpoints"
