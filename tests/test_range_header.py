"""``Range`` on ``/bundles/{version}.tar`` and clients that hang up mid-download.

Audit of ``0aa94e1``: ``Range: bytes=<4,400 digits>-`` answered 500 with a ``ValueError`` traceback (Python's
``int()`` digit limit); ``bytes=١٠-١٩`` (Arabic-Indic digits, which ``\\d`` matches) answered 206; a client
hanging up during a download was logged as an ERROR with a traceback and its access line said 500.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from hypothesis import example, given, settings
from hypothesis import strategies as st

from m2fpkit.runtime.registry import RegistryOptions
from m2fpkit.server import distribution
from m2fpkit.server.app import make_app
from m2fpkit.server.config import ServerConfig
from m2fpkit.server.distribution import Unsatisfiable, parse_range
from reference.bundles import clone_bundle

TOKEN = {"Authorization": "Bearer dist"}
DIGITS_4400 = "7" * 4400


# ------------------------------------------------------------------------------------------- parser
def reference(header: str, size: int) -> tuple[int, int] | None | str:
    """RFC 9110's single byte range, written plainly (small numbers only): None ignore, "416", or the range."""
    if not header.startswith("bytes=") or header.count("-") != 1:
        return None
    first, last = header[len("bytes="):].split("-")
    if not all(c in "0123456789" for c in first + last) or not (first or last):
        return None
    if first:
        start, end = int(first), size - 1
        if last:
            if int(last) < start:
                return None
            end = min(int(last), size - 1)
    else:
        start, end = max(0, size - int(last)), size - 1
    return "416" if start >= size else (start, end)


def outcome(header: str, size: int) -> tuple[int, int] | None | str:
    try:
        return parse_range(header, size)
    except Unsatisfiable:
        return "416"


numbers = st.one_of(st.just(""), st.integers(0, 10**6).map(str), st.text("0123456789", min_size=1, max_size=30))
well_formed = st.builds(lambda a, b: f"bytes={a}-{b}", numbers, numbers)
anything = st.one_of(well_formed, st.text(max_size=60),
                     st.builds(lambda s: "bytes=" + s, st.text(alphabet=st.characters(), max_size=40)))


@settings(max_examples=400, deadline=None)
@given(anything, st.integers(0, 10**7))
@example("bytes=١٠-١٩", 100).via("audit: Arabic-Indic digits")
@example(f"bytes={DIGITS_4400}-", 100).via("audit: 4,400 digits")
@example(f"bytes=-{DIGITS_4400}", 100)
@example(f"bytes=0-{DIGITS_4400}", 100)
@example("bytes=0-0,5-9", 100)
@example("bytes=-0", 100)
@example("bytes=0-", 0)
def test_parse_range_answers_every_header_like_the_rfc_and_fast(header, size):
    t0 = time.perf_counter()
    got = outcome(header, size)
    assert time.perf_counter() - t0 < 0.05
    if isinstance(got, tuple):
        start, end = got
        assert 0 <= start <= end < size
    short = all(len(part) <= 18 for part in header.split("-"))
    if short:
        assert got == reference(header, size)
    elif header.startswith("bytes=") and got is not None:  # a huge position: past the end, or clamped to it
        assert got == "416" or got[1] == size - 1


def test_only_ascii_digits_are_digits():
    for digits in ("١٠-١٩", "۱۰-۱۹", "१०-१९", "１０-１９", "10-1٩"):
        assert parse_range(f"bytes={digits}", 100) is None, digits


def test_huge_positions_are_past_the_end_or_clamped():
    with pytest.raises(Unsatisfiable, match="past 10\\^18"):
        parse_range(f"bytes={DIGITS_4400}-", 100)
    assert parse_range(f"bytes=10-{DIGITS_4400}", 100) == (10, 99)
    assert parse_range(f"bytes=-{DIGITS_4400}", 100) == (0, 99)


# ------------------------------------------------------------------------------------------- server
@pytest.fixture
def dist_config(fast_multi_src: Path, tmp_path: Path) -> ServerConfig:
    root = tmp_path / "bundles"
    clone_bundle(fast_multi_src, root, "v1.0")
    return ServerConfig(bundles=root, distribution_token="dist", runtime=RegistryOptions(watch=False))


async def test_range_headers_from_the_audit(aiohttp_client, dist_config, caplog):
    caplog.set_level(logging.ERROR, logger="m2fpkit")
    client = await aiohttp_client(make_app(dist_config))
    whole = await (await client.get("/bundles/v1.0.tar", headers=TOKEN)).read()
    size = len(whole)
    r = await client.get("/bundles/v1.0.tar", headers={**TOKEN, "Range": f"bytes={DIGITS_4400}-"})
    assert r.status == 416, await r.text()
    assert r.headers["Content-Range"] == f"bytes */{size}"
    r = await client.get("/bundles/v1.0.tar", headers={**TOKEN, "Range": "bytes=١٠-١٩"})
    assert r.status == 200 and await r.read() == whole  # not a range: ignored
    r = await client.get("/bundles/v1.0.tar", headers={**TOKEN, "Range": "bytes=10-19"})
    assert r.status == 206 and await r.read() == whole[10:20]
    r = await client.get("/bundles/v1.0.tar", headers={**TOKEN, "Range": f"bytes=-{DIGITS_4400}"})
    assert r.status == 206 and await r.read() == whole
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


async def test_a_client_hanging_up_mid_download_is_no_server_error(dist_config, caplog, monkeypatch):
    """Served as ``m2fp-serve`` serves (aiohttp's test server would cancel the handler instead)."""
    monkeypatch.setattr(distribution, "_CHUNK", 4096)  # many writes: the hang-up lands in the middle
    caplog.set_level(logging.INFO)
    runner = web.AppRunner(make_app(dist_config))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with aiohttp.ClientSession() as session:
            r = await session.get(url + "/bundles/v1.0.tar", headers=TOKEN)
            assert r.status == 200
            size = int(r.headers["Content-Length"])
            await r.content.readexactly(4096)
            r.close()  # hang up with most of the archive unsent

            def access_line() -> logging.LogRecord | None:
                return next((rec for rec in caplog.records
                             if rec.name == "m2fpkit.access" and "/bundles/v1.0.tar" in rec.getMessage()), None)

            deadline = time.monotonic() + 30
            while access_line() is None:
                assert time.monotonic() < deadline, "the download never ended"
                await asyncio.sleep(0.02)
            line = access_line()
            assert line is not None and getattr(line, "status", None) == 200, line
            errors = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
            assert not errors, errors
            hung_up = [rec for rec in caplog.records if "hung up" in rec.getMessage()]
            assert hung_up and hung_up[0].levelno == logging.INFO and f"of {size} bytes" in hung_up[0].getMessage()
            text = await (await session.get(url + "/metrics")).text()
            assert 'status="500"' not in text
    finally:
        await runner.cleanup()
