"""Connections: how many one client and all clients may hold, how long a request head may take, and how
long a client may leave what is sent to it untaken.

Invariants (bounds in :class:`~m2fpkit.server.config.ServerConfig`, documented in docs/limits.md):

* at most ``max_connections`` connections are open (by default the descriptor limit minus those in use at
  start and :data:`FD_RESERVE`), at most ``max_connections_per_client`` from one client address. A new
  connection over a cap first closes the oldest *idle* one (no request under way) of that client, or of
  anyone at the global cap; when none is idle it is answered 503 and closed, before any of it is read
  (what its client sent is dropped: see :meth:`GuardedHandler.refuse`);
* a request head (request line and headers) must be complete within ``header_timeout`` s of the
  connection's accept, or of the first byte of the next request on a kept-alive connection; else 408 and
  the connection is closed. An idle kept-alive connection is aiohttp's: closed after ``keepalive_timeout``;
* a client must take what is sent to it: a connection whose writing stays paused for ``write_timeout`` s
  (the transport's buffer went over its high-water mark, 64 KiB, and has not come down to its low-water
  mark, 16 KiB, since), or that is closing and still holds unsent bytes ``write_timeout`` s after, is
  aborted (asyncio's ``close`` waits for the buffer to drain with no deadline: the connection, its reply and
  its descriptor would stay as long as the client wished). An evicted connection drops its unsent bytes at
  once, so that its descriptor is free when the guard counts it free.

The client is the connection's peer address (an IPv6 client by its /64 prefix); headers such as
X-Forwarded-For are never trusted for this. aiohttp has neither a head deadline nor a write deadline:
:class:`GuardedHandler` is its ``RequestHandler`` with both, made by the protocol factory of :class:`GuardedSite`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import logging
import os
import resource
import socket
from collections import OrderedDict
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)

#: descriptors kept free for everything but connections (bundle files, downloads, logs, the store watcher)
FD_RESERVE = 64
#: the listen backlog, which is also how many connections asyncio accepts in one go before any refused one
#: is closed: the automatic cap keeps this many descriptors free beside :data:`FD_RESERVE`
BACKLOG = 64
#: idle connections looked at, oldest first, before a new one over the global cap is refused
_EVICT_SCAN = 32
#: seconds a refused connection stays open after its 503, for its client to read it (see ``refuse``)
REFUSED_LINGER = 1.0
#: refused connections staying open at once (their descriptors come from the accept batch kept free)
MAX_LINGERING = 16
#: what :class:`GuardedHandler` reads of aiohttp's handler (checked at import: an aiohttp that renames
#: them fails here, loudly, instead of silently losing the head deadline)
_USED = ("_request_count", "_messages", "_force_close", "_loop")
#: and what it overrides or calls of it beyond them (an override of a renamed method would never run)
_HOOKS = ("connection_made", "connection_lost", "data_received", "eof_received", "start", "finish_response",
          "force_close", "pause_writing", "resume_writing", "writing_paused")
_missing = [name for name in _USED if not any(name in getattr(k, "__slots__", ()) for k in RequestHandler.__mro__)]
_missing += [name for name in _HOOKS if not hasattr(RequestHandler, name)]
if _missing:
    raise ImportError(f"aiohttp {RequestHandler.__module__}.RequestHandler lacks {', '.join(_missing)}: "
                      "server/connections.py needs updating for this aiohttp")


def client_key(peername: Any) -> str:
    """The client a connection counts against: its IPv4 address, or the /64 of its IPv6 address
    (IPv4-mapped IPv6 as IPv4); anything else (a Unix socket) is one client, ``"local"``."""
    host = peername[0] if isinstance(peername, (tuple, list)) and peername else None
    if not isinstance(host, str):
        return "local"
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


def descriptor_cap(configured: int) -> int:
    """The global connection cap: ``configured``, or (0) the soft RLIMIT_NOFILE minus the descriptors open
    now, :data:`FD_RESERVE` and one accept batch (:data:`BACKLOG`), at least 1."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 64
    room = (soft if soft != resource.RLIM_INFINITY else 2**20) - in_use - FD_RESERVE - BACKLOG
    if configured > 0:
        if configured > room:
            log.warning("--max-connections %d is above what the descriptor limit leaves (%d of %d): new "
                        "connections will fail to be accepted before the cap refuses them", configured, room, soft)
        return configured
    if room < 1:
        log.warning("descriptor limit %d leaves no room for connections (%d in use, %d reserved): raise it "
                    "(ulimit -n) or set --max-connections", soft, in_use, FD_RESERVE + BACKLOG)
    return max(1, room)


def _answer(status: int, reason: str, error: str, detail: str, headers: str = "") -> bytes:
    """A complete HTTP/1.1 error reply that closes the connection (the JSON error body of server/errors.py)."""
    body = json.dumps({"success": False, "error": error, "detail": detail, "request_id": ""}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{headers}Connection: close\r\n\r\n").encode() + body


class ConnectionGuard:
    """The connections open now, by client, with the caps; one per listening server (event loop only)."""

    def __init__(self, max_connections: int, per_client: int) -> None:
        if max_connections < 1 or per_client < 0:
            raise ValueError(f"connections: max_connections ≥ 1 and per_client ≥ 0 (got {max_connections}, "
                             f"{per_client})")
        self.max_connections, self.per_client = max_connections, per_client
        #: every admitted connection, least recently active first
        self._open: OrderedDict[GuardedHandler, None] = OrderedDict()
        self._by_client: dict[str, dict[GuardedHandler, None]] = {}
        self.refused = 0
        self.evicted = 0
        #: refused connections open now (``GuardedHandler.refuse``)
        self.lingering = 0
        #: connections aborted because their client took nothing for ``write_timeout`` s
        self.aborted = 0

    def __len__(self) -> int:
        return len(self._open)

    def count(self, client: str) -> int:
        return len(self._by_client.get(client, ()))

    def admit(self, conn: GuardedHandler) -> str | None:
        """Count ``conn`` in, closing an idle connection to make room when a cap is reached; the reason it
        is refused otherwise."""
        mine = self._by_client.get(conn.client, {})
        if self.per_client and len(mine) >= self.per_client and not self._evict(mine):
            return (f"too many connections from your address ({len(mine)}, limit {self.per_client}: "
                    "--max-connections-per-client); reuse a connection or close idle ones")
        if len(self._open) >= self.max_connections and not self._evict(self._open, _EVICT_SCAN):
            return f"server at its connection limit ({self.max_connections}: --max-connections); retry shortly"
        self._open[conn] = None
        self._by_client.setdefault(conn.client, {})[conn] = None
        return None

    def _evict(self, conns: dict[GuardedHandler, None], scan: int | None = None) -> bool:
        """Close the first idle connection among the ``scan`` oldest of ``conns`` (all when None)."""
        for conn in list(itertools.islice(conns, scan)):
            if conn.idle():
                log.debug("closing idle connection from %s to make room", conn.client)
                self.evicted += 1
                conn.evict()
                self.release(conn)
                return True
        return False

    def touch(self, conn: GuardedHandler) -> None:
        if conn in self._open:
            self._open.move_to_end(conn)

    def release(self, conn: GuardedHandler) -> None:
        if conn not in self._open:
            return
        del self._open[conn]
        mine = self._by_client[conn.client]
        del mine[conn]
        if not mine:
            del self._by_client[conn.client]


class GuardedHandler(RequestHandler):
    """aiohttp's connection handler, counted by a :class:`ConnectionGuard`, with a request-head deadline and a
    write deadline."""

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, header_timeout: float, write_timeout: float,
                 **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.guard, self.header_timeout, self.write_timeout = guard, header_timeout, write_timeout
        self.client = "local"
        self._admitted = False
        #: the transport from the accept to ``connection_lost`` (aiohttp lets go of it when it closes it; its
        #: descriptor stays open until its buffer is sent)
        self._socket: asyncio.Transport | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        #: a refused connection's close (``refuse``)
        self._linger: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        #: requests answered on this connection (aiohttp's ``_request_count`` counts the heads received)
        self._answered = 0
        #: the body of the newest request: bytes that arrive while it is unfinished are body, not a head
        self._body: Any = None

    # ---------------------------------------------------------------------------------- life cycle
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client = client_key(transport.get_extra_info("peername"))
        refusal = self.guard.admit(self)
        if refusal is not None:  # never handed to aiohttp: answered and closed, nothing of it parsed
            self.guard.refused += 1
            log.warning("connection from %s refused: %s", self.client, refusal)
            self.refuse(cast(asyncio.Transport, transport), refusal)
            return
        self._admitted = True
        self._socket = cast(asyncio.Transport, transport)
        super().connection_made(transport)
        self._arm()  # a new connection: its first head is due header_timeout s after the accept

    def refuse(self, transport: asyncio.Transport, refusal: str) -> None:
        """Answer 503 and close without handing the connection to aiohttp. The answer is followed by a FIN,
        and what the client sends is read and dropped (``data_received``) until it closes, or for
        :data:`REFUSED_LINGER` s: closing a socket with unread bytes resets the connection, and the client
        loses its 503 (a busy server, the one refusing, often finds the request already queued). At most
        :data:`MAX_LINGERING` refused connections stay open so; others are closed at once."""
        transport.write(_answer(503, "Service Unavailable", "too_many_connections", refusal, "Retry-After: 1\r\n"))
        if self.guard.lingering >= MAX_LINGERING or not transport.can_write_eof():
            transport.close()
            return
        self.guard.lingering += 1
        self._linger = self._loop.call_later(REFUSED_LINGER, transport.abort)
        try:
            transport.write_eof()
        except OSError:  # the client is gone already (reset before its answer): nothing to linger for
            transport.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        self._unwatch()
        self._socket = None
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
            self.guard.lingering -= 1
        if self._admitted:
            self._admitted = False
            self.guard.release(self)
            super().connection_lost(exc)

    async def start(self) -> None:
        try:
            await super().start()
        finally:
            self._watch_close()  # aiohttp closes the transport when it is done with the connection

    def force_close(self) -> None:
        super().force_close()
        self._watch_close()

    def eof_received(self) -> None:
        super().eof_received()
        self._watch()  # the client's FIN: asyncio closes the transport once this returns

    def evict(self) -> None:
        """Close at once, dropping unsent bytes (those of an answered reply its client is not reading)."""
        sock = self._socket
        self.force_close()
        if sock is not None and sock.get_write_buffer_size():
            sock.abort()

    def idle(self) -> bool:
        """No request under way: nothing of a head received, every head received answered, no body unfinished."""
        return self._head_bytes == 0 and self._answered == self._request_count and not self._in_body()

    async def finish_response(self, request: Any, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._answered += 1

    def _in_body(self) -> bool:
        return self._body is not None and not self._body.is_eof()

    # --------------------------------------------------------------------------------------- bytes
    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        in_body = self._in_body()
        heads = self._request_count
        super().data_received(data)
        if data:
            self.guard.touch(self)
        if self._request_count != heads:  # one or more heads complete (a parse error counts: it is answered)
            self._disarm()
            self._head_bytes = 0
            self._body = self._messages[-1][1] if self._messages else None
        elif data and not in_body:
            self._head_bytes += len(data)
            if self._head_timer is None:  # the next request started on a kept-alive connection
                self._arm()

    # ----------------------------------------------------------------------------- write deadline
    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._socket is not None and not self._socket.is_closing():
            self._unwatch()  # the client took its bytes (a closing transport keeps its deadline)

    def _watch_close(self) -> None:
        if self._socket is not None and self._socket.is_closing():
            self._watch()

    def _watch(self) -> None:
        if self._write_timer is None and self._socket is not None:
            self._write_timer = self._loop.call_later(self.write_timeout, self._write_expired)

    def _unwatch(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_expired(self) -> None:
        self._write_timer = None
        sock = self._socket
        if sock is None or not (self.writing_paused or sock.is_closing()):
            return
        self.guard.aborted += 1
        log.info("connection from %s aborted: %d bytes not taken within %g s (--write-timeout)", self.client,
                 sock.get_write_buffer_size(), self.write_timeout)
        sock.abort()

    # ------------------------------------------------------------------------------ head deadline
    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self._loop.call_later(self.header_timeout, self._head_expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or self._force_close:
            return
        if self._answered != self._request_count:  # a pipelined head behind a request being answered
            self._arm()
            return
        if self._head_bytes:
            log.info("request head from %s incomplete after %g s (%d bytes): 408, connection closed",
                     self.client, self.header_timeout, self._head_bytes)
            transport.write(_answer(408, "Request Timeout", "header_timeout",
                                    f"the request head did not arrive within {self.header_timeout:g} s "
                                    f"({self._head_bytes} bytes received; --header-timeout)"))
        self.force_close()


class GuardedSite(web.BaseSite):
    """A listening socket bound beforehand (``serve.bind``) whose connections are :class:`GuardedHandler`."""

    def __init__(self, runner: web.AppRunner, sock: socket.socket, guard: ConnectionGuard, header_timeout: float,
                 write_timeout: float, handler_args: dict[str, Any], backlog: int = BACKLOG) -> None:
        super().__init__(runner, backlog=backlog)
        self._sock, self.guard, self.handler_args = sock, guard, handler_args
        self.header_timeout, self.write_timeout = header_timeout, write_timeout
        host, port = sock.getsockname()[:2]
        self._name = f"http://{f'[{host}]' if ':' in host else host}:{port}"

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None

        def protocol() -> GuardedHandler:
            return GuardedHandler(server, loop=loop, guard=self.guard, header_timeout=self.header_timeout,
                                  write_timeout=self.write_timeout, **self.handler_args)

        self._server = await loop.create_server(protocol, sock=self._sock, backlog=self._backlog)
