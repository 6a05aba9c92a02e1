"""Request intake (``server/intake.py``): every malformed body is a 400 with its reason (fault 1), a body is
read only inside an upload slot, under a deadline and a size cap, and only while the parse queue has room
(fault 3). Network tests talk to the in-process server on 127.0.0.1 with raw sockets and stop by themselves."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from m2fpkit.server import keys
from m2fpkit.server.app import make_app
from m2fpkit.server.config import ServerConfig

pytest.register_assert_rewrite("server_fixtures")
pytest_plugins = ["server_fixtures"]
from server_fixtures import png_bytes  # noqa: E402

IMAGE = png_bytes(32, 24)
DISPOSITION = 'form-data; name="image"; filename="a.png"'


def multipart(parts: list[tuple[dict[str, str], bytes]], boundary: str = "BND") -> bytes:
    out = b""
    for headers, body in parts:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        out += f"--{boundary}\r\n{head}\r\n".encode() + body + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def image_part(**extra: str) -> tuple[dict[str, str], bytes]:
    return {"Content-Disposition": DISPOSITION, "Content-Type": "image/png", **extra}, IMAGE


async def start(aiohttp_client, root: Path, **config):
    return await aiohttp_client(make_app(ServerConfig(bundles=root, **config)))


async def expect_400(response, error: str = "malformed_body") -> str:
    text = await response.text()
    assert response.status == 400, text
    body = json.loads(text)
    assert body["success"] is False and body["error"] == error, body
    assert body["detail"] and body["request_id"] == response.headers["X-Request-ID"]
    return body["detail"]


# ====================================================================== fault 1: malformed multipart
MALFORMED: dict[str, tuple[str, bytes, str]] = {
    # case: (Content-Type, body, a word the reason must contain)
    "no boundary": ("multipart/form-data", multipart([image_part()]), "boundary"),
    "empty boundary": ('multipart/form-data; boundary=""', multipart([image_part()]), "boundary"),
    "boundary over 70 chars": ("multipart/form-data; boundary=" + "b" * 71, multipart([image_part()], "b" * 71),
                               "boundary"),
    "other boundary in body": ("multipart/form-data; boundary=OTHER", multipart([image_part()]), "boundary"),
    "empty body": ("multipart/form-data; boundary=BND", b"", "boundary"),
    "garbage": ("multipart/form-data; boundary=BND", b"\x00\xffnot multipart at all", "boundary"),
    "truncated": ("multipart/form-data; boundary=BND", multipart([image_part()])[:-30], "closing boundary"),
    "no closing boundary": ("multipart/form-data; boundary=BND", multipart([image_part()])[:-9], "closing boundary"),
    "part without disposition": ("multipart/form-data; boundary=BND", multipart([({}, IMAGE)]), "Content-Disposition"),
    "header line without colon": ("multipart/form-data; boundary=BND",
                                  b"--BND\r\nno colon here\r\n\r\nabc\r\n--BND--\r\n", "headers"),
    "nested multipart": ("multipart/form-data; boundary=BND", multipart([(
        {"Content-Disposition": 'form-data; name="image"', "Content-Type": "multipart/mixed; boundary=IN"},
        multipart([({"Content-Disposition": 'attachment; filename="a.png"'}, IMAGE)], "IN"))]), "multipart"),
    "nested multipart without boundary": ("multipart/form-data; boundary=BND", multipart([(
        {"Content-Disposition": 'form-data; name="image"', "Content-Type": "multipart/mixed"}, b"x")]), "part 1"),
    "unknown transfer encoding": ("multipart/form-data; boundary=BND",
                                  multipart([image_part(**{"Content-Transfer-Encoding": "rot13"})]),
                                  "Content-Transfer-Encoding"),
    "compressed image part": ("multipart/form-data; boundary=BND",
                              multipart([image_part(**{"Content-Encoding": "gzip"})]), "Content-Encoding"),
    "bad _charset_ field": ("multipart/form-data; boundary=BND", multipart([
        ({"Content-Disposition": 'form-data; name="_charset_"'}, b"x" * 40), image_part()]), "_charset_"),
    "two image fields": ("multipart/form-data; boundary=BND", multipart([image_part(), image_part()]),
                         "more than one"),
    "too many parts": ("multipart/form-data; boundary=BND",
                       multipart([({"Content-Disposition": f'form-data; name="f{i}"'}, b"v") for i in range(40)]),
                       "parts"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_every_malformed_multipart_body_is_a_400_with_its_reason(aiohttp_client, latest_only_root: Path,
                                                                      case: str):
    """Before: ``request.post()`` raised ValueError/RuntimeError/InvalidHeader/LookupError → 500."""
    client = await start(aiohttp_client, latest_only_root)
    ctype, body, word = MALFORMED[case]
    r = await client.post("/api/latest/parse", data=body, headers={"Content-Type": ctype})
    detail = await expect_400(r)
    assert word.lower() in detail.lower(), detail


async def test_image_as_a_plain_field_or_missing(aiohttp_client, latest_only_root: Path):
    client = await start(aiohttp_client, latest_only_root)
    for parts in ([({"Content-Disposition": 'form-data; name="image"'}, b"\xff\xfe not utf-8")],  # was 500
                  [({"Content-Disposition": 'form-data; name="image"', "Content-Type": "text/plain; charset=nope"},
                    b"abc")],  # was 500 (LookupError)
                  [({"Content-Disposition": 'form-data; name="file"; filename="a.png"'}, IMAGE)]):
        r = await client.post("/api/latest/parse", data=multipart(parts),
                              headers={"Content-Type": "multipart/form-data; boundary=BND"})
        detail = await expect_400(r, "missing_image")
        assert "'image'" in detail


async def test_other_fields_are_read_and_dropped(aiohttp_client, latest_only_root: Path):
    client = await start(aiohttp_client, latest_only_root)
    body = multipart([({"Content-Disposition": 'form-data; name="note"'}, b"hello"), image_part(),
                      ({"Content-Disposition": 'form-data; name="x"; filename="b.bin"'}, b"\x00" * 1000)])
    r = await client.post("/api/latest/parse?visualization=0", data=body,
                          headers={"Content-Type": "multipart/form-data; boundary=BND"})
    assert r.status == 200, await r.text()
    assert (await r.json())["image"] == {"height": 24, "width": 32}


# ================================================================================= fault 3: limits
async def test_body_over_the_cap_is_413_from_content_length_or_while_streaming(aiohttp_client, latest_only_root):
    client = await start(aiohttp_client, latest_only_root, max_body_bytes=10_000)
    r = await client.post("/api/latest/parse", data=b"\x89PNG" + b"\x00" * 20_000,
                          headers={"Content-Type": "image/png"})
    assert r.status == 413 and (await r.json())["error"] == "body_too_large"

    async def chunks():  # chunked: no Content-Length, the cap holds while reading
        for _ in range(10):
            yield b"\x00" * 4096

    r = await client.post("/api/latest/parse", data=chunks(), headers={"Content-Type": "image/png"})
    assert r.status == 413, await r.text()
    body = multipart([({"Content-Disposition": 'form-data; name="pad"'}, b"p" * 6000), image_part(),
                      ({"Content-Disposition": 'form-data; name="pad2"'}, b"p" * 6000)])
    r = await client.post("/api/latest/parse", data=body, headers={"Content-Type": "multipart/form-data; boundary=BND"})
    assert r.status == 413, await r.text()


class Raw:
    """One HTTP/1.1 connection to the test server on 127.0.0.1, written and read by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, client) -> Raw:
        return cls(*await asyncio.open_connection("127.0.0.1", client.server.port))

    def send_head(self, length: int, ctype: str = "image/png", path: str = "/api/latest/parse") -> None:
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
                          f"Content-Length: {length}\r\n\r\n".encode())

    async def response(self, timeout: float) -> tuple[int, dict[str, str], dict]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await asyncio.wait_for(self.reader.readexactly(int(headers["content-length"])), timeout)
        return status, headers, json.loads(body)

    async def closed_within(self, timeout: float) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(1), timeout) == b""
        except (TimeoutError, ConnectionError):
            return False

    def close(self) -> None:
        self.writer.close()


async def test_a_slow_body_gets_408_at_the_deadline_and_is_cut(aiohttp_client, latest_only_root: Path):
    """Before: no read deadline; a body dripping slowly kept its connection (and its buffer) indefinitely."""
    client = await start(aiohttp_client, latest_only_root, body_timeout=0.5)
    conn = await Raw.open(client)
    try:
        t0 = time.monotonic()
        conn.send_head(100_000)
        conn.writer.write(IMAGE[:10])  # … and nothing more: the client keeps the connection open
        status, headers, body = await conn.response(timeout=5)
        assert status == 408 and body["error"] == "body_timeout", body
        assert "0.5 s" in body["detail"] and "10 bytes" in body["detail"]
        assert headers["connection"].lower() == "close"
        assert time.monotonic() - t0 < 3
        assert await conn.closed_within(2), "the server kept reading the slow body after answering 408"
    finally:
        conn.close()
    assert client.app[keys.ADMISSION].receiving == 0
    r = await client.post("/api/latest/parse?visualization=0", data=IMAGE, headers={"Content-Type": "image/png"})
    assert r.status == 200, await r.text()


async def test_a_slow_multipart_body_gets_408(aiohttp_client, latest_only_root: Path):
    client = await start(aiohttp_client, latest_only_root, body_timeout=0.5)
    conn = await Raw.open(client)
    try:
        body = multipart([image_part()])
        conn.send_head(len(body), "multipart/form-data; boundary=BND")
        conn.writer.write(body[:60])
        status, _, payload = await conn.response(timeout=5)
        assert status == 408 and payload["error"] == "body_timeout"
        assert await conn.closed_within(2)
    finally:
        conn.close()


async def test_uploads_are_bounded_before_bodies_are_read(aiohttp_client, latest_only_root: Path):
    """Before: every connection's body was buffered at once, however many; now at most ``max_uploads`` are
    received, the rest get 503 + Retry-After without a byte of their body being read."""
    client = await start(aiohttp_client, latest_only_root, max_uploads=2, upload_wait=0.3, body_timeout=3.0)
    admission = client.app[keys.ADMISSION]
    conns = [await Raw.open(client) for _ in range(5)]
    try:
        for conn in conns:
            conn.send_head(1_000_000)
            conn.writer.write(b"\x89PNG" + b"\x00" * 1000)
        t0 = time.monotonic()
        answered = await asyncio.gather(*(c.response(timeout=2) for c in conns[2:]))
        assert time.monotonic() - t0 < 2
        for status, headers, body in answered:
            assert status == 503 and body["error"] == "overloaded", body
            assert "limit 2" in body["detail"]
            assert 1 <= int(headers["retry-after"]) <= 3
        assert admission.receiving == 2
    finally:
        for conn in conns:
            conn.close()
    for _ in range(50):  # the two slot holders notice their clients went away
        if admission.receiving == 0:
            break
        await asyncio.sleep(0.1)
    assert admission.receiving == 0
    r = await client.post("/api/latest/parse?visualization=0", data=IMAGE, headers={"Content-Type": "image/png"})
    assert r.status == 200, await r.text()


async def test_a_full_parse_queue_refuses_before_reading_the_body(aiohttp_client, latest_only_root: Path,
                                                                 monkeypatch):
    """Before: the body was read (however slowly) before the queue limit was applied."""
    import threading

    from m2fpkit.runtime.registry import RegistryOptions
    from m2fpkit.runtime.session import RuntimeSettings
    from m2fpkit.server import render

    release = threading.Event()
    real = render.parse

    def slow_parse(*args, **kwargs):
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(render, "parse", slow_parse)
    client = await start(aiohttp_client, latest_only_root, max_queue=0, body_timeout=5.0,
                         runtime=RegistryOptions(settings=RuntimeSettings(concurrent_runs=1)))
    busy = asyncio.ensure_future(client.post("/api/latest/parse?visualization=0", data=IMAGE,
                                             headers={"Content-Type": "image/png"}))
    admission = client.app[keys.ADMISSION]
    for _ in range(100):
        if admission.running:
            break
        await asyncio.sleep(0.05)
    assert admission.running == 1
    conn = await Raw.open(client)
    try:
        conn.send_head(len(IMAGE))
        conn.writer.write(IMAGE[:8])  # the rest never comes: a queued body must not be waited for
        status, headers, body = await conn.response(timeout=2)
        assert status == 503 and body["error"] == "overloaded" and headers["retry-after"]
    finally:
        conn.close()
        release.set()
    r = await busy
    assert r.status == 200, await r.text()
