"""Slow clients against a real ``m2fp-serve``: eight connections dripping large bodies neither delay a normal
client's parse beyond its usual latency plus the body deadline, nor make the server's memory grow with their
number; the ones holding an upload slot are cut at the deadline (408), the others refused unread (503).

Everything on 127.0.0.1; the server is stopped by its own pid."""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time
from pathlib import Path

import aiohttp
import psutil
import pytest

pytest.register_assert_rewrite("server_fixtures")
pytest_plugins = ["server_fixtures"]
from server_fixtures import ServerProcess, copy_root, png_bytes  # noqa: E402

BODY_TIMEOUT = 3.0
MAX_UPLOADS = 2
MAX_BODY_MB = 16
DRIPPERS = 8
#: what each dripper sends at once before dripping (of a declared 15 MB body)
FRONT = 12 * 2**20
#: RSS growth allowed while they drip: the upload slots' worth of bodies, plus allocator slack. The code before
#: this bound read every body at once (8 × 12 MB = 96 MB and more).
log = logging.getLogger(__name__)
RSS_BOUND = MAX_UPLOADS * MAX_BODY_MB * 2**20 + 32 * 2**20


async def drip(port: int, results: dict, i: int, stop: asyncio.Event) -> None:
    """Send 12 MB of a 15 MB raw body, then one byte every 0.25 s until the server answers and closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    try:
        writer.write(b"POST /api/latest/parse HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                     b"Content-Length: %d\r\n\r\n" % (15 * 2**20) + b"\x89PNG\r\n\x1a\n" + b"\x00" * (FRONT - 8))

        async def trickle() -> None:
            while not stop.is_set():
                await asyncio.sleep(0.25)
                writer.write(b"\x00")

        trickling = asyncio.ensure_future(trickle())
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BODY_TIMEOUT + 10)
            answered = time.monotonic() - t0
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            body = json.loads(await reader.readexactly(int(headers["content-length"])))
            status = int(lines[0].split()[1])
            closed = None
            if status == 408:  # cut: the server closes at once, though this client is still sending
                closed = await asyncio.wait_for(reader.read(1), 3) == b""
            results[i] = {"status": status, "answered": answered, "error": body["error"], "closed": closed}
        finally:
            trickling.cancel()
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
        results[i] = {"status": None, "exc": repr(exc), "answered": time.monotonic() - t0}
    finally:
        writer.close()


async def parse_once(session: aiohttp.ClientSession, url: str, image: bytes) -> tuple[float, int]:
    """A normal client: post, and on 503 wait ``Retry-After`` and retry; (seconds to the 200, attempts)."""
    t0, attempts = time.monotonic(), 0
    while True:
        attempts += 1
        async with session.post(url + "/api/latest/parse?visualization=0", data=image,
                                headers={"Content-Type": "image/png"}) as r:
            await r.read()
            if r.status == 200:
                return time.monotonic() - t0, attempts
            assert r.status == 503, r.status
            await asyncio.sleep(float(r.headers["Retry-After"]))


async def test_dripping_clients_neither_delay_a_normal_client_nor_grow_memory(latest_only_root: Path,
                                                                              tmp_path: Path):
    root = copy_root(latest_only_root, tmp_path / "bundles")
    server = ServerProcess(root, tmp_path / "server.log", "--body-timeout", str(BODY_TIMEOUT), "--max-uploads",
                           str(MAX_UPLOADS), "--max-body-mb", str(MAX_BODY_MB), "--concurrency", "1",
                           "--log-level", "warning")
    server.start()
    try:
        proc = psutil.Process(server.proc.pid)
        image = png_bytes(160, 120)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            usual = statistics.median([(await parse_once(session, server.url, image))[0] for _ in range(5)])
            baseline = proc.memory_info().rss

            stop, results = asyncio.Event(), {}
            drippers = [asyncio.ensure_future(drip(server.port, results, i, stop)) for i in range(DRIPPERS)]
            peak = baseline

            async def sample() -> None:
                nonlocal peak
                while not stop.is_set():
                    peak = max(peak, proc.memory_info().rss)
                    await asyncio.sleep(0.05)

            sampler = asyncio.ensure_future(sample())
            await asyncio.sleep(0.5)  # the drippers hold the upload slots now
            latency, attempts = await parse_once(session, server.url, image)
            await asyncio.wait_for(asyncio.gather(*drippers), BODY_TIMEOUT + 20)
            stop.set()
            await sampler
            after = await parse_once(session, server.url, image)
    finally:
        server.stop()

    log.info("normal client %.2f s (usual %.2f s, %d attempts); RSS +%.1f MB (bound %.0f MB); drippers %s", latency,
             usual, attempts, (peak - baseline) / 2**20, RSS_BOUND / 2**20,
             sorted((r["status"], round(r["answered"], 2)) for r in results.values()))
    slack = 1.0 + 2.0  # the upload wait before a 503, and scheduling on a shared 2-core box
    assert latency <= usual + BODY_TIMEOUT + slack, (latency, usual, attempts)
    assert peak - baseline <= RSS_BOUND, f"RSS grew {(peak - baseline) / 2**20:.0f} MB > {RSS_BOUND / 2**20:.0f} MB"
    statuses = sorted(r["status"] for r in results.values())
    assert statuses == [408] * MAX_UPLOADS + [503] * (DRIPPERS - MAX_UPLOADS), results
    for r in results.values():
        if r["status"] == 408:  # cut at the deadline, connection closed although still sending
            assert r["error"] == "body_timeout" and r["closed"] is True, r
            assert BODY_TIMEOUT - 0.5 <= r["answered"] <= BODY_TIMEOUT + 2.0, r
        else:  # refused before a byte of the body was read
            assert r["error"] == "overloaded" and r["answered"] <= 1.0 + 2.0, r
    assert after[0] <= usual + 2.0 and after[1] == 1, (after, usual)
