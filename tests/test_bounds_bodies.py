"""What one client can make the server hold while it sends request bodies (``server/intake.py``,
``server/admission.py``): a body slower than the minimum rate is cut after its grace, one client address holds
at most ``max_uploads_per_client`` of the upload slots, and every 413 names the option that raises its limit.

In-process server on 127.0.0.1; a second client address is another loopback address (127.0.0.2)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from m2fpkit.runtime.predictor import ImageLimits
from m2fpkit.runtime.registry import RegistryOptions
from m2fpkit.server import keys
from m2fpkit.server.app import make_app
from m2fpkit.server.config import ServerConfig

pytest.register_assert_rewrite("server_fixtures")
pytest_plugins = ["server_fixtures"]
from server_fixtures import png_bytes  # noqa: E402

IMAGE = png_bytes(32, 24)
PNG = {"Content-Type": "image/png"}


async def start(aiohttp_client, root: Path, **config):
    return await aiohttp_client(make_app(ServerConfig(bundles=root, **config)))


class Drip:
    """A raw parse request from ``source`` (a loopback address) whose body comes one byte per ``every`` s."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.t0 = time.monotonic()
        self._task: asyncio.Future | None = None

    @classmethod
    async def start(cls, port: int, source: str = "127.0.0.1", every: float = 0.5, length: int = 10_000) -> Drip:
        conn = cls(*await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)))
        conn.writer.write(f"POST /api/latest/parse HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                          f"Content-Length: {length}\r\n\r\n".encode() + IMAGE[:8])

        async def drip() -> None:
            while True:
                await asyncio.sleep(every)
                conn.writer.write(b"\x00")

        conn._task = asyncio.ensure_future(drip())
        return conn

    async def response(self, timeout: float) -> tuple[int, dict[str, str], dict, float]:
        """(status, headers, JSON body, seconds since the request started)."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        answered = time.monotonic() - self.t0
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await asyncio.wait_for(self.reader.readexactly(int(headers["content-length"])), timeout)
        return int(lines[0].split()[1]), headers, json.loads(body), answered

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.writer.close()


async def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)


async def test_slow_bodies_from_one_address_leave_upload_slots_for_other_clients(aiohttp_client, latest_only_root):
    """Before: 4 connections sending a body at 1 byte per 5 s held every upload slot (default 4) until the 30 s
    body timeout; every other client got 503. Now one address holds at most 2 slots (the default)."""
    client = await start(aiohttp_client, latest_only_root)
    admission = client.app[keys.ADMISSION]
    drips = [await Drip.start(client.server.port) for _ in range(4)]
    answers: list[asyncio.Future] = []
    try:
        await wait_until(lambda: admission.receiving >= 2, 5, "the drips to take upload slots")
        await asyncio.sleep(0.3)  # the other two drips are refused or wait: a third slot is never theirs
        assert admission.receiving == 2  # before: 4, every slot
        assert ServerConfig().max_uploads_per_client == 2
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(connector=connector) as other:
            t0 = time.monotonic()
            async with other.post(client.make_url("/api/latest/parse?visualization=0"), data=IMAGE,
                                  headers=PNG) as r:
                assert r.status == 200, await r.text()
            assert time.monotonic() - t0 < 3
        answers = [asyncio.ensure_future(d.response(timeout=5)) for d in drips]
        done, _ = await asyncio.wait(answers, timeout=2.5)  # the slot holders are still dripping
        assert len(done) == 2, [a.result()[:3] for a in done]
        for status, headers, body, _ in (a.result() for a in done):
            assert status == 503 and body["error"] == "overloaded", body
            assert "--max-uploads-per-client" in body["detail"] and int(headers["retry-after"]) >= 1
    finally:
        for a in answers:
            a.cancel()
        for d in drips:
            d.close()


async def test_a_body_slower_than_the_minimum_rate_is_cut_after_its_grace(aiohttp_client, latest_only_root):
    """Before: a body at 2 bytes/s kept its upload slot until the body timeout (30 s by default). Defaults:
    5 s of grace, then 4096 bytes/s on average."""
    client = await start(aiohttp_client, latest_only_root)
    drip = await Drip.start(client.server.port, every=0.5)
    try:
        status, headers, body, answered = await drip.response(timeout=8)
        cfg = ServerConfig()
        assert status == 408 and body["error"] == "body_too_slow", body
        assert f"{cfg.min_body_rate} bytes/s" in body["detail"] and "--min-body-rate" in body["detail"]
        assert headers["connection"].lower() == "close"
        assert cfg.body_grace <= answered < cfg.body_grace + 1.5, answered  # far below the 30 s body timeout
        assert await asyncio.wait_for(drip.reader.read(1), 2) == b""  # cut, though it is still sending
    finally:
        drip.close()
    assert client.app[keys.ADMISSION].receiving == 0


async def test_a_body_at_the_minimum_rate_is_not_cut(aiohttp_client, latest_only_root):
    """The rate is an average since the body started: a client at ~2× the minimum finishes its upload."""
    client = await start(aiohttp_client, latest_only_root, body_grace=0.3, min_body_rate=1000)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    try:
        writer.write(f"POST /api/latest/parse?visualization=0 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     f"Content-Length: {len(IMAGE)}\r\n\r\n".encode())
        step = max(1, len(IMAGE) // 8)
        for i in range(0, len(IMAGE), step):  # ~2000 bytes/s, in 8 pieces
            writer.write(IMAGE[i:i + step])
            await asyncio.sleep(step / 2000)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 200"), head
    finally:
        writer.close()


# ---------------------------------------------------------------------------------- 413s name their option
def error_of(status: int, text: str, code: str) -> str:
    body = json.loads(text)
    assert status == 413 and body["error"] == code, (status, body)
    return body["detail"]


async def test_every_413_names_the_option_that_raises_the_limit(aiohttp_client, latest_only_root):
    client = await start(aiohttp_client, latest_only_root, max_body_bytes=20_000,
                         runtime=RegistryOptions(limits=ImageLimits(max_pixels=1000)))
    noise = np.random.default_rng(0).integers(0, 256, 30_000, dtype=np.uint8).tobytes()
    # the body cap (one message, whether Content-Length tells or the bytes read pass it), on /api and OIP infer
    r = await client.post("/api/latest/parse", data=noise, headers=PNG)
    assert "--max-body-mb" in error_of(r.status, await r.text(), "body_too_large")
    r = await client.post("/v2/models/m2fp/infer", data=noise, headers={"Inference-Header-Content-Length": "10"})
    assert r.status == 413 and "--max-body-mb" in await r.text()
    # the pixel limit, from the header and from the decoded image
    r = await client.post("/api/latest/parse", data=png_bytes(40, 30), headers=PNG)  # 1200 px
    assert "--max-pixels" in error_of(r.status, await r.text(), "image_too_large")
