"""What one client can make the server hold in connections (``server/connections.py``, ``server/serve.py``):
a request head has a deadline, an idle keep-alive connection does not; one address holds at most its share of
connections and all of them stay below the descriptor limit, so other clients keep being served, and a refused
client reads its 503; a client that does not take what is sent to it loses its connection after the write
deadline, descriptor included; shutdown answers the request under way and closes the rest; a busy port
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
from aiohttp import web

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


async def until(predicate, what: str, timeout: float = 5.0) -> float:
    """Poll ``predicate`` until true; seconds waited (fails naming ``what`` after ``timeout``)."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not seen within {timeout:g} s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


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


async def test_a_refused_client_whose_request_was_already_sent_reads_its_503_not_a_reset(server):
    """Before: a busy server (when caps are reached) finds the request of a connection it refuses already
    queued; closing with unread bytes makes the kernel reset the connection, and the client saw
    "connection reset by peer" instead of the 503 and its Retry-After. Now the refusal is sent with a FIN
    and what the client sends is read and dropped until it closes (or for ``REFUSED_LINGER`` s)."""
    port, guard = await server(max_connections_per_client=1, header_timeout=30)
    holder = await Conn.open(port)
    holder.writer.write(HEAD_START)  # mid-head: not idle, so not evicted
    await until(lambda: len(guard) == 1, "the holder admitted")
    loop = asyncio.get_running_loop()
    refused: list[socket.socket] = []
    try:
        for _ in range(5):  # connect and send while the event loop is held (blocking calls): a busy server
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            sock.setblocking(False)
            refused.append(sock)
        time.sleep(0.2)
        for sock in refused:
            data = b""
            while chunk := await asyncio.wait_for(loop.sock_recv(sock, 4096), 5):
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in head, data
            assert json.loads(body)["error"] == "too_many_connections"
        assert guard.refused == 5 and len(guard) == 1
        for sock in refused:
            sock.close()
        await until(lambda: guard.lingering == 0, "the refused connections closed once their clients closed",
                    timeout=0.5)  # well before REFUSED_LINGER
    finally:
        for sock in refused:
            sock.close()
        holder.close()


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


# ---------------------------------------------------------------------------------- replies nobody reads
async def unread_reply(port: int, guard, path: str) -> tuple[socket.socket, object, asyncio.Transport]:
    """A client that asks for ``path`` and never reads, with small socket buffers at both ends (its receive
    window, the server's send buffer) so that the reply's tail waits in aiohttp's transport, not in the
    kernel; (its socket, the server's handler of that connection, the handler's transport)."""
    loop = asyncio.get_running_loop()
    before = set(guard._open)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await until(lambda: set(guard._open) - before, "the connection admitted")
    (conn,) = set(guard._open) - before
    transport = conn.transport
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return sock, conn, transport


async def test_a_reply_its_client_does_not_read_does_not_hold_the_connection_past_the_write_timeout(server):
    """Before: a client that asked for the OpenAPI document (172 KB) and read nothing held its connection (a
    slot of both caps, a descriptor, the reply) for as long as it stayed connected: aiohttp waits for its
    buffer to drain with no deadline, and a connection with a request under way is neither idle (no eviction)
    nor under the keep-alive timeout. Now: writing paused for ``write_timeout`` s aborts it."""
    port, guard = await server(write_timeout=1.0, keepalive_timeout=30, header_timeout=30)
    sock, conn, transport = await unread_reply(port, guard, "/api/openapi.json")
    try:
        await until(lambda: conn.writing_paused, "the reply stuck at the transport's high-water mark")
        assert not conn.idle()
        waited = await until(lambda: len(guard) == 0, "the connection aborted", timeout=6)
        assert 0.8 <= waited < 3.0, waited
        assert transport.get_extra_info("socket").fileno() == -1  # the descriptor is closed
    finally:
        sock.close()


async def test_a_connection_closed_with_unsent_bytes_is_aborted_after_the_write_timeout(server):
    """Before: once aiohttp closed an idle kept-alive connection whose client had not read the tail of its
    reply (34 KB: all of it written, below the high-water mark), asyncio kept the socket open until the tail
    was taken, with no deadline: the connection stayed counted, its descriptor open, as long as its client
    wished. Now it is aborted ``write_timeout`` s after the close."""
    port, guard = await server(write_timeout=1.0, keepalive_timeout=2.0, header_timeout=30)
    sock, conn, transport = await unread_reply(port, guard, "/")
    try:
        await until(transport.is_closing, "the keep-alive timeout closing the connection")
        assert conn.idle() and transport.get_write_buffer_size() > 0  # answered, its tail unsent
        waited = await until(lambda: len(guard) == 0, "the closing connection aborted", timeout=6)
        assert waited < 3.0, waited
        assert transport.get_extra_info("socket").fileno() == -1
    finally:
        sock.close()


async def test_evicting_an_idle_connection_with_unsent_bytes_frees_its_descriptor_at_once(server):
    """Before: eviction closed such a connection gracefully, so its socket stayed open until its client read
    the tail (never) while the guard counted it gone: one address, at its cap of connections, could hold any
    number of descriptors by opening new connections. Now an evicted connection's unsent bytes are dropped."""
    port, guard = await server(max_connections_per_client=1, write_timeout=30, keepalive_timeout=30,
                               header_timeout=30)
    sock, conn, transport = await unread_reply(port, guard, "/")
    newcomer = None
    try:
        await until(lambda: conn.idle() and transport.get_write_buffer_size() > 0, "the reply answered, its tail "
                                                                                   "unsent")
        newcomer = await Conn.open(port)
        assert await newcomer.get() == 200  # room made by evicting the idle one
        await until(lambda: transport.get_extra_info("socket").fileno() == -1, "the evicted socket closed",
                    timeout=2)
        assert guard.count("127.0.0.1") == 1 and guard.evicted == 1
    finally:
        sock.close()
        if newcomer is not None:
            newcomer.close()


# ------------------------------------------------------------------------------------------- shutdown
async def test_shutdown_lets_the_request_under_way_finish_and_closes_the_other_connections(empty_root):
    """``runner.cleanup()`` (what SIGTERM runs): the listening socket closes, a request being handled is
    answered, an idle kept-alive connection and one halfway through its head are closed without waiting
    for it, and every connection leaves the guard."""
    cfg = ServerConfig(bundles=empty_root, header_timeout=30, drain_timeout=10)
    app = make_app(cfg)
    started = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        started.set()
        await asyncio.sleep(1.5)
        return web.json_response({"done": True})

    app.router.add_get("/slow", slow)
    socks = serve.bind("127.0.0.1", 0)
    port = socks[0].getsockname()[1]
    runner, guard = await serve.start(app, socks, cfg)
    conns: list[Conn] = []
    cleanup: asyncio.Future | None = None
    try:
        conns = [await Conn.open(port) for _ in range(3)]
        busy, idle, heading = conns
        busy.writer.write(b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert await idle.get() == 200
        heading.writer.write(HEAD_START)
        await asyncio.wait_for(started.wait(), 5)
        await until(lambda: len(guard) == 3, "three connections admitted")
        t0 = time.monotonic()
        cleanup = asyncio.ensure_future(runner.cleanup())
        for c in (idle, heading):
            assert await c.closed_within(1.0) is not None
        assert time.monotonic() - t0 < 1.0  # not after the slow request
        with pytest.raises(OSError):
            await Conn.open(port)  # no longer listening
        status, body, _ = await busy.response(timeout=5)
        assert status == 200 and body == {"done": True}
        await asyncio.wait_for(cleanup, 10)
        assert len(guard) == 0
    finally:
        for c in conns:
            c.close()
        await (cleanup if cleanup is not None else runner.cleanup())


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


def test_an_address_family_the_host_lacks_is_skipped_as_asyncio_does(monkeypatch):
    """Before: a host name resolving to an IPv6 address on a kernel without IPv6 (``socket()`` fails with
    EAFNOSUPPORT) refused to start, where aiohttp's own site (asyncio's ``create_server``) skips the family
    and listens on the others. A host with no usable family at all still fails in one line."""
    real_socket = socket.socket

    def no_ipv6(family=socket.AF_INET, *args, **kwargs):
        if family == socket.AF_INET6:
            raise OSError(97, "Address family not supported by protocol")
        return real_socket(family, *args, **kwargs)

    infos = [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 0, 0, 0)),
             (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]
    monkeypatch.setattr(serve.socket, "getaddrinfo", lambda *a, **k: infos)
    monkeypatch.setattr(serve.socket, "socket", no_ipv6)
    socks = serve.bind("localhost", 0)
    try:
        assert [s.family for s in socks] == [socket.AF_INET]
        assert socks[0].getsockname()[0] == "127.0.0.1"
    finally:
        for s in socks:
            s.close()
    monkeypatch.setattr(serve.socket, "getaddrinfo", lambda *a, **k: infos[:1])
    with pytest.raises(serve.BindError, match=r"cannot listen on localhost:0: .*--host"):
        serve.bind("localhost", 0)


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


class _ResetTransport(asyncio.Transport):
    """A transport whose client reset the connection before its answer: ``write_eof`` fails as the socket does."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.aborted = self.closed = False

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data) -> None:
        self.written.append(bytes(data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        raise OSError(107, "Transport endpoint is not connected")

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.aborted or self.closed


async def test_refusing_a_client_that_already_reset_aborts_its_connection_without_an_error():
    """Seen under load with reconnecting drippers: the refusal's FIN raised ENOTCONN out of ``connection_made``
    (an ERROR with a traceback per refused connection). The connection is aborted instead, and the refusal's
    lingering slot is given back when it is lost."""
    from m2fpkit.server.connections import ConnectionGuard, GuardedHandler

    guard = ConnectionGuard(1, 1)
    manager = web.Server(lambda request: web.Response())
    refused = GuardedHandler(manager, guard=guard, header_timeout=5, write_timeout=5, loop=asyncio.get_running_loop())
    transport = _ResetTransport()
    refused.refuse(transport, "too many connections")  # must not raise
    assert transport.written and transport.written[0].startswith(b"HTTP/1.1 503")
    assert transport.aborted and guard.lingering == 1
    refused.connection_lost(None)
    assert guard.lingering == 0
