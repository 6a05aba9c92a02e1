"""What one client can make the server build, hold and send is bounded (``server/replies.py``), and no reply
or request body is parsed or encoded on the event loop.

Each bound is driven past its limit on an in-process server over the demo v1.2 (small caps, small images):
the reply size cap and the OIP JSON output cap refuse before any inference (413 naming the flag), bytes in
flight per client address refuse with 503 + ``Retry-After``, a reply a client does not take is cut at the
write deadline and counted, an oversized OIP JSON header is 413, and a gzip bomb is refused with the
connection closed (no lingering decompression of the rest). Off-loop work is asserted structurally: the
codec and the JSON encoder are spied on and must never run in the event loop's thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import struct
import time
import zlib
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families

from m2fpkit.server import keys
from m2fpkit.server import serve as serving
from m2fpkit.server.app import make_app
from m2fpkit.server.config import ServerConfig

pytest.register_assert_rewrite("server_fixtures")
pytest_plugins = ["server_fixtures"]
from server_fixtures import encode, png_bytes  # noqa: E402

INFER = "/v2/models/m2fp/versions/v1.2/infer"


def flat_png(width: int, height: int) -> bytes:
    """A flat grey picture: a few hundred bytes of PNG for millions of pixels (the audit's 115 KB upload)."""
    return encode(np.full((height, width, 3), 128, np.uint8), ".png")


def infer_body(image: bytes, outputs: dict[str, bool], binary_input: bool = True) -> tuple[bytes, dict[str, str]]:
    """What tritonclient sends: the image as one BYTES element, the outputs named with their binary flag."""
    import base64

    inp = triton.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([image if binary_input else base64.b64encode(image)], dtype=object),
                            binary_data=binary_input)
    outs = [triton.InferRequestedOutput(n, binary_data=b) for n, b in outputs.items()]
    body, size = triton.InferenceServerClient.generate_request_body([inp], outputs=outs)
    headers = {"Content-Type": "application/octet-stream"}
    if size is not None:
        headers["Inference-Header-Content-Length"] = str(size)
    return body, headers


@pytest.fixture
def serve(aiohttp_client, latest_only_root: Path):
    async def start(root: Path = latest_only_root, **limits):
        return await aiohttp_client(make_app(dataclasses.replace(ServerConfig(bundles=root), **limits)))
    return start


async def metric(client, name: str, **labels: str) -> float:
    text = await (await client.get("/metrics")).text()
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def until(predicate, what: str, timeout: float = 30.0) -> None:
    """Wait for a server-side event (a metric changing), polling; fail naming it after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen within {timeout:g} s: {what}")
        await asyncio.sleep(0.05)


def off_loop_spy(monkeypatch, module, name: str, calls: list[bool]) -> None:
    """Replace ``module.name`` by a wrapper recording, per call, whether it ran outside the event loop."""
    real = getattr(module, name)

    def spy(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            calls.append(False)
        except RuntimeError:
            calls.append(True)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, spy)


# ------------------------------------------------------------------------------- reply size (fault 1)
async def test_a_reply_over_the_size_cap_is_refused_before_inference(serve):
    client = await serve(max_reply_bytes=50_000)
    body, headers = infer_body(png_bytes(160, 120), {"label_map": True})  # 76,800 bytes of INT32
    r = await client.post(INFER, data=body, headers=headers)
    doc = await r.json()
    assert r.status == 413 and doc["code"] == "reply_too_large", doc
    assert "--max-reply-mb" in doc["error"] and "label_map" in doc["error"], doc
    assert await metric(client, "m2fp_inference_seconds_count") == 0  # refused before any worker ran


async def test_only_the_outputs_asked_for_are_built(serve):
    """``instances`` alone fits a cap a label map would not: the maps are neither built nor budgeted."""
    client = await serve(max_reply_bytes=50_000)
    body, headers = infer_body(png_bytes(160, 120), {"instances": True})
    r = await client.post(INFER, data=body, headers=headers)
    assert r.status == 200, await r.text()
    result = triton.InferenceServerClient.parse_response_body(
        await r.read(), header_length=int(r.headers["Inference-Header-Content-Length"]))
    assert [o["name"] for o in result.get_response()["outputs"]] == ["instances"]
    assert json.loads(result.as_numpy("instances")[0])["version"] == "v1.2"


async def test_a_reply_the_client_does_not_take_is_cut_at_the_write_deadline(serve):
    """A client that never reads its 16 MB reply: cut after ``write_timeout``, counted; meanwhile its bytes in
    flight refuse its next large reply (503 + Retry-After naming the limit); released once cut."""
    client = await serve(write_timeout=1.0, reply_bytes_per_client=20 * 2**20)
    image = flat_png(2000, 2000)
    body, headers = infer_body(image, {"label_map": True})
    expected = 2000 * 2000 * 4
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small receive window
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", client.port))
    head = (f"POST {INFER} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()
    await loop.sock_sendall(sock, head + body)
    try:
        async def in_flight() -> bool:
            return await metric(client, "m2fp_reply_bytes_in_flight") >= expected
        await until(in_flight, "the unread reply's bytes in flight")
        r = await client.post(INFER, data=body, headers=headers)
        doc = await r.json()
        assert r.status == 503 and doc["code"] == "replies_in_flight", doc
        assert int(r.headers["Retry-After"]) >= 1 and "--reply-per-client-mb" in doc["error"], doc

        async def cut() -> bool:
            return await metric(client, "m2fp_replies_cut_total", reason="write_timeout") == 1
        await until(cut, "the write deadline cutting the unread reply")
        assert await metric(client, "m2fp_reply_bytes_in_flight") == 0
        received = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 10):
            received += chunk
        assert len(received) < expected, "the reply was sent whole, not cut"
    finally:
        sock.close()
    small, small_headers = infer_body(png_bytes(160, 120), {"label_map": True})
    assert (await client.post(INFER, data=small, headers=small_headers)).status == 200  # budget released


@pytest.fixture
async def served(latest_only_root: Path):
    """``start(**limits)`` runs the app as ``m2fp-serve`` does (``serve.start``: its connection handler, and
    handlers left running when their client hangs up, where ``aiohttp_client``'s test server cancels them);
    (port, app)."""
    runners = []

    async def start(root: Path = latest_only_root, **limits):
        cfg = dataclasses.replace(ServerConfig(bundles=root), **limits)
        app = make_app(cfg)
        socks = serving.bind("127.0.0.1", 0)
        runner, _ = await serving.start(app, socks, cfg)
        runners.append(runner)
        return socks[0].getsockname()[1], app
    yield start
    for runner in runners:
        await runner.cleanup()


def sample(app, name: str, **labels: str) -> float:
    return app[keys.METRICS].registry.get_sample_value(name, labels) or 0.0


async def test_a_client_hanging_up_mid_reply_releases_its_bytes_and_is_counted_gone(served):
    """The other way a reply ends early: its client resets the connection while its 16 MB reply waits to be
    taken. The lease is released at once (not at the write deadline, 30 s here), the cut is counted
    ``client_gone``, not ``write_timeout``, and the client's next reply fits the budget again."""
    port, app = await served(reply_bytes_per_client=20 * 2**20)
    body, headers = infer_body(flat_png(2000, 2000), {"label_map": True})
    expected = 2000 * 2000 * 4
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    head = (f"POST {INFER} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()
    try:
        await loop.sock_sendall(sock, head + body)
        # the reply is being sent (its lease was taken before inference): its first bytes are here
        first = await asyncio.wait_for(loop.sock_recv(sock, 64), 60)
        assert first.startswith(b"HTTP/1.1 200"), first
        assert sample(app, "m2fp_reply_bytes_in_flight") >= expected
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
        sock.close()
    t0 = time.monotonic()

    async def gone() -> bool:
        return sample(app, "m2fp_replies_cut_total", reason="client_gone") == 1
    await until(gone, "the reset counted as client_gone", timeout=10)
    assert time.monotonic() - t0 < 10 < ServerConfig().write_timeout  # not the write deadline's doing
    assert sample(app, "m2fp_reply_bytes_in_flight") == 0
    assert sample(app, "m2fp_replies_cut_total", reason="write_timeout") == 0
    async with aiohttp.ClientSession() as session:  # the whole budget is this client's again
        async with session.post(f"http://127.0.0.1:{port}{INFER}", data=body, headers=headers) as r:
            assert r.status == 200 and len(await r.read()) > expected


# --------------------------------------------------------------------------- JSON output (fault 2)
async def test_json_output_over_its_cap_is_refused_before_inference_naming_binary(serve):
    client = await serve(max_json_output_bytes=50_000)
    body, headers = infer_body(png_bytes(160, 120), {"label_map": False})
    r = await client.post(INFER, data=body, headers=headers)
    doc = await r.json()
    assert r.status == 413 and doc["code"] == "json_output_too_large", doc
    assert "--max-json-output-mb" in doc["error"] and "binary_data" in doc["error"], doc
    assert await metric(client, "m2fp_inference_seconds_count") == 0
    body, headers = infer_body(png_bytes(160, 120), {"label_map": True})  # the same map as binary data fits
    assert (await client.post(INFER, data=body, headers=headers)).status == 200


async def test_the_codec_never_runs_on_the_event_loop(serve, monkeypatch):
    from m2fpkit.server import oip_codec

    calls: list[bool] = []
    for name in ("decode_request", "encode_response"):
        off_loop_spy(monkeypatch, oip_codec, name, calls)
    client = await serve()
    for binary in (True, False):
        body, headers = infer_body(png_bytes(160, 120), {"label_map": binary, "instances": binary}, binary)
        r = await client.post(INFER, data=body, headers=headers)
        assert r.status == 200, await r.text()
    assert calls and all(calls), calls


# ---------------------------------------------------------------------------- JSON header (fault 3)
async def test_a_json_header_over_64_kib_is_refused_and_json_embedded_images_are_not(serve):
    client = await serve()
    body, headers = infer_body(png_bytes(160, 120), {"instances": True})
    n = int(headers["Inference-Header-Content-Length"])
    padded = body[:n - 1] + b" " * 70_000 + body[n - 1:]  # whitespace before the header's closing brace
    headers["Inference-Header-Content-Length"] = str(n + 70_000)
    r = await client.post(INFER, data=padded, headers=headers)
    doc = await r.json()
    assert r.status == 413 and doc["code"] == "infer_header_too_large" and "65536" in doc["error"], doc
    big = png_bytes(400, 300, seed=1)  # > 64 KiB once base64 in a JSON-only request: allowed up to the body cap
    assert len(big) * 4 // 3 > 64 << 10
    body, headers = infer_body(big, {"instances": False}, binary_input=False)
    r = await client.post(INFER, data=body, headers=headers)
    assert r.status == 200, await r.text()


# ------------------------------------------------------------------------------- gzip bomb (fault 4)
async def test_a_gzip_bomb_is_refused_and_its_connection_closed(serve):
    """256 MB of zeros in ~256 KB of gzip: 413 at the body cap, and the connection is closed at once rather
    than the rest being read (and decompressed on the event loop) for aiohttp's lingering close."""
    client = await serve(max_body_bytes=1 << 20)
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"\0" * (16 << 20)
    bomb = b"".join(z.compress(block) for _ in range(16)) + z.flush()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write((f"POST {INFER} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
                      f"Content-Encoding: gzip\r\nContent-Length: {len(bomb)}\r\n\r\n").encode() + bomb)
        status = await asyncio.wait_for(reader.readline(), 10)
        assert b" 413 " in status, status
        try:  # closed at once: EOF, or a reset (the rest of the bomb was left unread in the server's buffer)
            await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            pass
    finally:
        writer.close()


# ------------------------------------------------------------------------- /api replies (fault 5)
async def test_api_parse_and_compare_replies_have_the_same_cap_and_encode_off_loop(serve, monkeypatch):
    from m2fpkit.server import replies

    calls: list[bool] = []
    off_loop_spy(monkeypatch, replies, "json_bytes", calls)
    client = await serve()
    image = png_bytes(160, 120)
    r = await client.post("/api/v1.2/parse", data=image, headers={"Content-Type": "image/png"})
    assert r.status == 200 and (await r.json())["version"] == "v1.2"
    assert calls and all(calls), calls

    client = await serve(max_reply_bytes=4096)
    r = await client.post("/api/v1.2/parse?visualization_max_side=full&include=label_map", data=image,
                          headers={"Content-Type": "image/png"})
    doc = await r.json()
    assert r.status == 413 and doc["error"] == "reply_too_large" and "--max-reply-mb" in doc["detail"], doc


async def test_compare_replies_have_the_same_cap(serve, demo_root: Path):
    client = await serve(demo_root, max_reply_bytes=4096)
    r = await client.post("/api/compare?versions=v1.0,v1.2", data=png_bytes(160, 120),
                          headers={"Content-Type": "image/png"})
    doc = await r.json()
    assert r.status == 413 and doc["error"] == "reply_too_large" and "--max-reply-mb" in doc["detail"], doc


# ------------------------------------------------------------------------------ the budget, unit by unit
def test_the_budget_counts_per_client_and_in_total_and_refuses_naming_the_flag():
    from m2fpkit.server.errors import HTTPProblem
    from m2fpkit.server.replies import ReplyBudget

    budget = ReplyBudget(max_reply=100, in_flight=250, per_client=150, write_timeout=5.0)
    a1 = budget.reserve("a", 100)
    with pytest.raises(HTTPProblem) as exc:  # a's second reply would put 200 > 150 of a's bytes in flight
        budget.reserve("a", 60)
    assert exc.value.status == 503 and exc.value.error == "replies_in_flight"
    assert "--reply-per-client-mb" in exc.value.detail and 1 <= int(exc.value.headers["Retry-After"]) <= 5
    b1 = budget.reserve("b", 100)
    with pytest.raises(HTTPProblem) as exc:  # 200 + 60 > 250 in total, though c has nothing in flight
        budget.reserve("c", 60)
    assert exc.value.status == 503 and "--replies-in-flight-mb" in exc.value.detail
    with pytest.raises(HTTPProblem) as exc:
        budget.reserve("c", 101, "the outputs asked for")
    assert exc.value.status == 413 and exc.value.error == "reply_too_large"
    assert "the outputs asked for" in exc.value.detail and "--max-reply-mb" in exc.value.detail
    assert (budget.in_flight, budget.by_client) == (200, {"a": 100, "b": 100})
    a1.resize(40)
    a1.release()
    a1.release()  # idempotent
    b1.release()
    assert (budget.in_flight, budget.by_client) == (0, {})
    budget.reserve("a", 100).release()
    budget.reserve("b", 100)
    assert budget.in_flight == 100


def test_a_reply_that_could_never_be_in_flight_is_413_not_a_503_to_retry():
    from m2fpkit.server.errors import HTTPProblem
    from m2fpkit.server.replies import ReplyBudget

    budget = ReplyBudget(max_reply=500, in_flight=400, per_client=300, write_timeout=5.0)
    for nbytes, flag in ((350, "--reply-per-client-mb"), (450, "--replies-in-flight-mb"), (600, "--max-reply-mb")):
        with pytest.raises(HTTPProblem) as exc:
            budget.reserve("a", nbytes)
        assert exc.value.status == 413 and flag in exc.value.detail, exc.value.detail
