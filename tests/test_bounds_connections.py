"""What one client can make the server hold in connections (``server/connections.py``, ``server/serve.py``):
a request head has a deadline, an idle keep-alive connection does not; one address holds at most its share of
connections and all of them stay below the descriptor limit, so other clients keep being served; a busy port
fails in one line before anything loads. Everything on loopback; a second client is another loopback address
(127.0.0.2)."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from m2fpkit.server import serve
from m2fpkit.server.app import make_app
from m2fpkit.server.config import ServerConfig

pytest.register_assert_rewrite("server_fixtures")
pytest_plugins = ["server_fixtures"]
import server_fixtures  # noqa: E402
from server_fixtures import ServerProcess, copy_root  # noqa: E402

HEAD_START = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"


@pytest.fixture
async def server(empty_root: Path):
    """``start(**config)`` serves an app over an empty root on 127.0.0.1 as ``m2fp-serve`` does; (port, guard)."""
    runners = []

    async def start(**config) -> tuple[int, object]:
        cfg = ServerConfig(bundles=empty_root, **config)
        socks = serve.bind("127.0.0.1", 0)
        runner, guard = await serve.start(make_app(cfg), socks, cfg)
        runners.append(runner)
        return socks[0].getsockname()[1], guard

    yield start
    for runner in runners:
        await runner.cleanup()


class Conn:
    """One raw connection from ``source``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.t0 = reader, writer, time.monotonic()

    @classmethod
    async def open(cls, port: int, source: str = "127.0.0.1") -> Conn:
        return cls(*await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)))

    async def response(self, timeout: float = 5) -> tuple[int, dict, float]:
        """(status, JSON body or {}, seconds since the connection opened)."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        at = time.monotonic() - self.t0
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await asyncio.wait_for(self.reader.readexactly(int(headers.get("content-length", 0))), timeout)
        return int(lines[0].split()[1]), json.loads(body) if body.startswith(b"{") else {}, at

    async def get(self, path: str = "/healthz") -> int:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        return (await self.response())[0]

    async def closed_within(self, timeout: float) -> float | None:
        """Seconds since the connection opened when the server closed it, None if it did not in time."""
        try:
            while await asyncio.wait_for(self.reader.read(4096), timeout):
                pass
        except TimeoutError:
            return None
        except ConnectionError:
            pass
        return time.monotonic() - self.t0

    def close(self) -> None:
        self.writer.close()


async def drip(conn: Conn, every: float = 0.2) -> None:
    """Send a request head a byte at a time, never finishing it."""
    conn.writer.write(HEAD_START)
    while True:
        conn.writer.write(b"X")
        await asyncio.sleep(every)


# ------------------------------------------------------------------------------------------ head deadline
async def test_a_dripped_request_head_is_cut_at_the_header_deadline(server):
    """Before: nothing but aiohttp's 75 s keep-alive timeout cut a head sent a byte at a time, and reconnecting
    kept it up."""
    port, _ = await server(header_timeout=1.0)
    conn = await Conn.open(port)
    silent = await Conn.open(port)
    dripping = asyncio.ensure_future(drip(conn))
    try:
        status, body, at = await conn.response(timeout=4)
        assert status == 408 and body["error"] == "header_timeout" and "--header-timeout" in body["detail"], body
        # the client's clock starts once its connect returns, a little after the server's accept: 0.9, not 1.0
        assert 0.9 <= at < 2.0, at
        assert await conn.closed_within(2) is not None
        at = await silent.closed_within(3)  # a connection that never sends a byte is closed too, unanswered
        assert at is not None and 0.9 <= at < 2.0, at
    finally:
        dripping.cancel()
        conn.close()
        silent.close()


async def test_an_idle_keep_alive_connection_is_not_cut_but_its_next_head_has_the_deadline(server):
    port, guard = await server(header_timeout=0.5, keepalive_timeout=30)
    conn = await Conn.open(port)
    try:
        assert await conn.get() == 200
        await asyncio.sleep(1.0)  # idle for twice the head deadline: kept (keep-alive has its own timeout)
        assert await conn.get() == 200
        await asyncio.sleep(1.0)
        conn.writer.write(HEAD_START)  # the next head starts, and stops
        t0 = time.monotonic()
        status, body, _ = await conn.response(timeout=3)
        assert status == 408 and body["error"] == "header_timeout"
        assert 0.5 <= time.monotonic() - t0 < 1.5  # counted from its first byte, not from the previous answer
    finally:
        conn.close()


async def test_an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout(server):
    port, guard = await server(keepalive_timeout=0.5, header_timeout=30)
    conn = await Conn.open(port)
    try:
        assert await conn.get() == 200
        t0 = time.monotonic()
        assert await conn.closed_within(3) is not None
        assert time.monotonic() - t0 < 2.0
        assert len(guard) == 0
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------- connection caps
async def test_one_address_holds_at_most_its_connections_and_others_are_still_served(server):
    port, guard = await server(max_connections_per_client=4, header_timeout=30)
    drips = [await Conn.open(port) for _ in range(4)]
    tasks = [asyncio.ensure_future(drip(c, every=0.5)) for c in drips]
    try:
        while len(guard) < 4:
            await asyncio.sleep(0.01)
        fifth = await Conn.open(port)
        status, body, at = await fifth.response(timeout=3)
        assert status == 503 and body["error"] == "too_many_connections", body
        assert "--max-connections-per-client" in body["detail"] and at < 1
        other = await Conn.open(port, "127.0.0.2")
        assert await other.get() == 200
        other.close()
    finally:
        for t in tasks:
            t.cancel()
        for c in drips:
            c.close()


async def test_an_idle_connection_makes_room_for_a_new_one_from_its_address(server):
    port, guard = await server(max_connections_per_client=2)
    idle = [await Conn.open(port) for _ in range(2)]
    try:
        for c in idle:
            assert await c.get() == 200  # answered, now idle
        newcomer = await Conn.open(port)
        assert await newcomer.get() == 200
        closed = [await c.closed_within(1) for c in idle]
        assert sum(x is not None for x in closed) == 1, closed  # the oldest idle one made room
        assert guard.count("127.0.0.1") == 2
    finally:
        for c in idle:
            c.close()


async def test_all_clients_together_hold_at_most_max_connections(server):
    port, guard = await server(max_connections=3, max_connections_per_client=0, header_timeout=30)
    drips = [await Conn.open(port, f"127.0.0.{i}") for i in (1, 2, 3)]
    tasks = [asyncio.ensure_future(drip(c, every=0.5)) for c in drips]
    try:
        while len(guard) < 3:
            await asyncio.sleep(0.01)
        late = await Conn.open(port, "127.0.0.4")
        status, body, _ = await late.response(timeout=3)
        assert status == 503 and "--max-connections" in body["detail"], body
        assert len(guard) == 3
    finally:
        for t in tasks:
            t.cancel()
        for c in drips:
            c.close()


# ------------------------------------------------------------------------------- a real process, few fds
def _low_fd_serve(tmp_path: Path, limit: int) -> Path:
    """An ``m2fp-serve`` wrapper whose descriptor limit (RLIMIT_NOFILE, soft) is ``limit``."""
    wrapper = tmp_path / "m2fp-serve-low-fd"
    wrapper.write_text(f"#!{sys.executable}\nimport os, resource, sys\n"
                       f"resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, "
                       f"resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
                       f"os.execv({str(server_fixtures.M2FP_SERVE)!r}, [{str(server_fixtures.M2FP_SERVE)!r}] "
                       "+ sys.argv[1:])\n")
    wrapper.chmod(0o755)
    return wrapper


async def test_drippers_past_the_descriptor_limit_leave_room_for_others_and_the_log_quiet(empty_root, tmp_path,
                                                                                         monkeypatch):
    """Before: with a 1,024-descriptor limit ~1,010 dripping clients shut every other client out (accept()
    failing with EMFILE, logged each time) until aiohttp's keep-alive timeout cut them at 75 s. Here: a
    256-descriptor limit, default flags, 300 reconnecting drippers from one address."""
    limit, drippers = 256, 300
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > drippers + 100, "this test needs descriptors itself"
    monkeypatch.setattr(server_fixtures, "M2FP_SERVE", _low_fd_serve(tmp_path, limit))
    proc = ServerProcess(empty_root, tmp_path / "server.log")
    await asyncio.to_thread(proc.start, 60, "/healthz")
    stop, connected = asyncio.Event(), [0]

    async def dripper() -> None:
        while not stop.is_set():
            try:
                conn = await Conn.open(proc.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            connected[0] += 1
            try:
                conn.writer.write(HEAD_START)
                while not stop.is_set():
                    conn.writer.write(b"X")
                    try:
                        if not await asyncio.wait_for(conn.reader.read(4096), 0.2):
                            break  # cut: reconnect
                    except TimeoutError:
                        continue
            except ConnectionError:
                pass
            finally:
                conn.close()

    tasks = [asyncio.ensure_future(dripper()) for _ in range(drippers)]
    latencies: list[float] = []
    try:
        while connected[0] < drippers:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0), force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as other:
            for _ in range(5):
                t0 = time.monotonic()
                async with other.get(proc.url + "/healthz") as r:
                    assert r.status == 200
                latencies.append(time.monotonic() - t0)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        proc.stop()
    assert max(latencies) < 2.0, latencies  # before: timed out (5 s) while the drippers held every descriptor
    log = proc.log_path.read_text(errors="replace").splitlines()
    assert len(log) < 40, "\n".join(log[:60])
    assert not any("Too many open files" in line for line in log), "\n".join(log[:60])


# ------------------------------------------------------------------------------------------- busy port
def test_a_busy_port_fails_in_one_line_before_anything_loads(latest_only_root, tmp_path):
    """Before: every version loaded, then a raw ``OSError: [Errno 98]`` traceback with no hint."""
    root = copy_root(latest_only_root, tmp_path / "bundles")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([str(server_fixtures.M2FP_SERVE), "--bundles", str(root), "--port", str(port)],
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    out = (r.stdout + r.stderr).strip()
    assert r.returncode == 1, out
    assert "Traceback" not in out and "v1.2" not in out, out  # nothing was loaded
    lines = out.splitlines()
    assert len(lines) == 1, out
    assert f"127.0.0.1:{port}" in lines[0] and "--port" in lines[0] and "PORT=" in lines[0], out


# ------------------------------------------------------------------------------------------ pure parts
def test_a_client_is_its_ipv4_address_or_its_ipv6_64():
    from m2fpkit.server.connections import client_key

    assert client_key(("127.0.0.2", 5000)) == "127.0.0.2"
    assert client_key(("::ffff:10.0.0.7", 5000, 0, 0)) == "10.0.0.7"
    assert client_key(("2001:db8:1:2:aaaa::1", 1, 0, 0)) == client_key(("2001:db8:1:2:ffff::9", 1, 0, 0)) \
        == "2001:db8:1:2::/64"
    assert client_key(("2001:db8:1:3::1", 1, 0, 0)) != client_key(("2001:db8:1:2::1", 1, 0, 0))
    assert client_key(("fe80::1%eth0", 1, 0, 2)) == "fe80::/64"
    assert client_key("/run/m2fp.sock") == client_key(None) == "local"


def test_a_repeated_warning_is_written_a_few_times_per_interval_then_counted():
    import logging

    from m2fpkit.server.logs import RateLimit

    now = [0.0]
    limit = RateLimit(burst=3, interval=60, clock=lambda: now[0])

    def record(msg: str, level: int = logging.ERROR, *args) -> logging.LogRecord:
        return logging.LogRecord("asyncio", level, __file__, 1, msg, args, None)

    passed = [r for r in (record("socket.accept() out of system resource") for _ in range(100)) if limit.filter(r)]
    assert len(passed) == 3 and "suppressed" in passed[-1].getMessage()
    assert limit.filter(record("another kind")) and limit.filter(record("info", logging.INFO))
    assert all(limit.filter(record("access %s", logging.INFO, i)) for i in range(100))  # the access log: untouched
    now[0] = 61.0
    first = record("socket.accept() out of system resource")
    assert limit.filter(first) and "97 more like this suppressed" in first.getMessage()
    with_args = record("connection from %s refused", logging.WARNING, "10.0.0.1")
    for _ in range(3):
        limit.filter(with_args)
    assert "10.0.0.1" in with_args.getMessage()  # notes keep the record's own arguments working
