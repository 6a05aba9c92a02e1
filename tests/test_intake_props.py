"""Property tests of the parse request's parsers, in process: any body (multipart of random structure, raw
bytes), any query options and any headers give a 2xx or a 4xx JSON error with a reason — never a 5xx.

Hypothesis runs in a worker thread and sends each example to the app's loop (pytest-aiohttp's
``aiohttp_client``); seeded (``derandomize``), bounded in examples and time."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2fpkit.server.app import make_app
from m2fpkit.server.config import ServerConfig

pytest.register_assert_rewrite("server_fixtures")
pytest_plugins = ["server_fixtures"]
from server_fixtures import png_bytes  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::aiohttp.multipart.BadContentDispositionHeader"),
              pytest.mark.filterwarnings("ignore::aiohttp.multipart.BadContentDispositionParam")]
IMAGE = png_bytes(24, 16)
SETTINGS = {"derandomize": True, "database": None, "deadline": None, "suppress_health_check": list(HealthCheck)}
#: header values the HTTP client can send (no CR/LF); latin-1 beyond ASCII included
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=80)
TOKENS = st.sampled_from(["image", "file", "_charset_", "", "IMAGE", "image ", "x"])


@pytest.fixture
async def app_client(aiohttp_client, latest_only_root: Path):
    # a small body cap so that "too large" is reachable by generated bodies
    return await aiohttp_client(make_app(ServerConfig(bundles=latest_only_root, max_body_bytes=64_000,
                                                      body_timeout=5.0)))


def check(status: int, text: str) -> None:
    assert status < 500, (status, text)
    assert 200 <= status < 300 or 400 <= status < 500, (status, text)
    body = json.loads(text)
    if status >= 400:
        assert body["success"] is False and body["error"], body
        assert isinstance(body["detail"], str) and body["detail"].strip(), body
    else:
        assert body["success"] is True, body


async def run_property(client, prop) -> None:
    """Run a hypothesis test (sync) in a thread; each example posts through ``client`` on this loop."""
    loop = asyncio.get_running_loop()

    def post(path: str, body: bytes, headers: dict[str, str]) -> None:
        async def go() -> tuple[int, str]:
            r = await client.post(path, data=body, headers=headers)
            return r.status, await r.text()

        status, text = asyncio.run_coroutine_threadsafe(go(), loop).result(30)
        check(status, text)

    await asyncio.wait_for(loop.run_in_executor(None, prop, post), 120)


# ------------------------------------------------------------------------------------ strategies
@st.composite
def part(draw) -> bytes:
    headers: list[str] = []
    if draw(st.booleans()):
        disp = "form-data"
        if draw(st.booleans()):
            disp += f'; name="{draw(TOKENS)}"'
        if draw(st.booleans()):
            disp += f'; filename="{draw(st.sampled_from(["a.png", "", "x y.jpg", "ü.png"]))}"'
        if draw(st.booleans()):
            disp += draw(st.sampled_from(["; filename*=utf-8''%C3%BC.png", "; filename*=bogus''%ff", "; name*=x",
                                          ';name=image', "; ;", '; name="image"; name="image"']))
        headers.append("Content-Disposition: " + disp)
    if draw(st.booleans()):
        headers.append("Content-Type: " + draw(st.sampled_from(
            ["image/png", "text/plain; charset=nope", "text/plain; charset=utf-8", "multipart/mixed",
             "multipart/mixed; boundary=IN", "application/octet-stream", ""])))
    if draw(st.integers(0, 4)) == 0:
        headers.append("Content-Transfer-Encoding: " + draw(st.sampled_from(["base64", "binary", "rot13", "8bit"])))
    if draw(st.integers(0, 4)) == 0:
        headers.append("Content-Encoding: " + draw(st.sampled_from(["gzip", "deflate", "identity", "br0ken"])))
    if draw(st.integers(0, 6)) == 0:
        headers.append(draw(st.sampled_from(["no colon", ": empty name", "X-Big: " + "a" * 9000])))
    content = draw(st.one_of(st.just(IMAGE), st.binary(max_size=300),
                             st.builds(lambda cut: IMAGE[:cut], st.integers(0, len(IMAGE)))))
    return ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + content


@st.composite
def multipart_body(draw) -> tuple[str, bytes]:
    boundary = draw(st.sampled_from(["BND", "----WebKitFormBoundary7MA4YWxkTrZu0gW", "a'b()+_,-./:=?", "x" * 70]))
    parts = draw(st.lists(part(), max_size=5))
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + p + b"\r\n" for p in parts)
    body += draw(st.sampled_from([b"--" + boundary.encode() + b"--\r\n", b"--" + boundary.encode() + b"--",
                                  b"", b"--" + boundary.encode() + b"\r\n", b"--WRONG--\r\n"]))
    if draw(st.integers(0, 3)) == 0:  # damage: cut, or insert random bytes
        at = draw(st.integers(0, len(body)))
        body = body[:at] + (draw(st.binary(max_size=20)) if draw(st.booleans()) else b"")
    ctype = draw(st.sampled_from([f"multipart/form-data; boundary={boundary}",
                                  f'multipart/form-data; boundary="{boundary}"', "multipart/form-data",
                                  "multipart/form-data; boundary=", "multipart/form-data; boundary=" + "y" * 80,
                                  f"Multipart/Form-Data; BOUNDARY={boundary}; charset=utf-8",
                                  f"multipart/mixed; boundary={boundary}"]))
    return ctype, body


# --------------------------------------------------------------------------------------- properties
async def test_any_multipart_body_is_2xx_or_4xx(app_client):
    @settings(max_examples=250, **SETTINGS)
    @given(multipart_body())
    def prop(post, case: tuple[str, bytes]) -> None:
        ctype, body = case
        post("/api/latest/parse?visualization=0", body, {"Content-Type": ctype})

    await run_property(app_client, prop)


async def test_any_raw_body_is_2xx_or_4xx(app_client):
    image_bytes = st.one_of(
        st.binary(max_size=2000),
        st.builds(lambda cut: IMAGE[:cut], st.integers(0, len(IMAGE))),
        st.builds(lambda at, b: IMAGE[:at] + bytes([b]) + IMAGE[at + 1:], st.integers(0, len(IMAGE) - 1),
                  st.integers(0, 255)),
        st.builds(lambda n: b"\x89PNG\r\n\x1a\n" + b"\x00" * n, st.integers(0, 70_000)))
    ctypes = st.one_of(st.sampled_from(["image/png", "image/jpeg", "image/gif", "image/svg+xml", "image/",
                                        "application/octet-stream", "text/plain", "application/json", "",
                                        "image/png; charset=utf-8", "IMAGE/PNG"]), HEADER_TEXT)

    @settings(max_examples=200, **SETTINGS)
    @given(image_bytes, ctypes)
    def prop(post, body: bytes, ctype: str) -> None:
        post("/api/latest/parse?visualization=0", body, {"Content-Type": ctype})

    await run_property(app_client, prop)


async def test_any_query_and_headers_are_2xx_or_4xx(app_client):
    from m2fpkit.server import render

    words = st.one_of(st.sampled_from(sorted(render.INCLUDES) + ["", "everything", "LABEL_MAP"]), HEADER_TEXT)
    query = st.fixed_dictionaries({}, optional={
        "include": st.lists(words, max_size=4).map(",".join),
        "mask_format": st.one_of(st.sampled_from(sorted(render.MASK_FORMATS) + ["jpeg", ""]), HEADER_TEXT),
        "visualization": st.one_of(st.sampled_from(["0", "1", "false", "no", "yes", ""]), HEADER_TEXT),
        "api": st.one_of(st.sampled_from(["1.0", "2.0", "banana"]), HEADER_TEXT),
    })
    headers = st.fixed_dictionaries({}, optional={
        "X-Route-Key": HEADER_TEXT, "X-Request-ID": HEADER_TEXT, "X-Forwarded-For": HEADER_TEXT,
        "X-API-Version": st.one_of(st.sampled_from(["1.0", "2.0", "9.9"]), HEADER_TEXT),
        "Cookie": HEADER_TEXT.map(lambda v: "m2fp_route=" + v),
    })
    names = st.sampled_from(["latest", "auto", "v1.2", "stable", "v9.9", "..", "v1.2%00", "%2e%2e%2fetc"])

    @settings(max_examples=200, **SETTINGS)
    @given(names, query, headers, st.booleans())
    def prop(post, name: str, q: dict[str, str], h: dict[str, str], as_form: bool) -> None:
        from urllib.parse import urlencode

        path = f"/api/{name}/parse" + ("?" + urlencode(q) if q else "")
        if as_form:
            body = (b"--B\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n" + IMAGE
                    + b"\r\n--B--\r\n")
            post(path, body, {**h, "Content-Type": "multipart/form-data; boundary=B"})
        else:
            post(path, IMAGE, {**h, "Content-Type": "image/png"})

    await run_property(app_client, prop)
