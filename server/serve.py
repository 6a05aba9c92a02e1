"""Running the app: the listening socket is bound first, then the app starts, then connections are served.

Invariant: :func:`bind` runs before anything is loaded, so a busy or forbidden address fails in one line
(:class:`BindError`) instead of after every version has loaded; the bound socket is handed to aiohttp,
so nothing can take the port in between. :func:`serve` is ``aiohttp.web.run_app`` with the connection
bounds of ``server/connections.py`` (aiohttp's own runner cannot take another protocol factory).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from typing import Any

from aiohttp import web

from .config import ServerConfig
from .connections import BACKLOG, ConnectionGuard, GuardedSite, descriptor_cap

log = logging.getLogger("m2fpkit.server")



class BindError(Exception):
    """The address cannot be listened on; the message is one line for the operator."""


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address ``host`` resolves to (as aiohttp's TCPSite would open: an address
    family the host cannot make sockets of, such as IPv6 on a kernel without it, is skipped)."""
    where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"cannot listen on {where}: {exc.strerror} (check --host)") from None
    socks: list[socket.socket] = []
    lacking: OSError | None = None
    try:
        for family, kind, proto, _, addr in infos:
            if any(s.getsockname()[:2] == addr[:2] and s.family == family for s in socks):
                continue
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:  # as asyncio's create_server: a family this host lacks is skipped
                log.debug("no socket of family %s for %s: %s", family, addr[0], exc)
                lacking = exc
                continue
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio does for a TCP server
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError as exc:
        for sock in socks:
            sock.close()
        hint = ("another process listens there: stop it, or choose another port with --port N "
                "(make serve: PORT=N)") if exc.errno == errno.EADDRINUSE else "check --host and --port"
        raise BindError(f"cannot listen on {where}: {exc.strerror or exc} — {hint}") from None
    if not socks:
        reason = (lacking.strerror or str(lacking)) if lacking is not None else "no address"
        raise BindError(f"cannot listen on {where}: {reason} — check --host and --port")
    return socks


async def start(app: web.Application, socks: list[socket.socket], cfg: ServerConfig,
                handle_signals: bool = False) -> tuple[web.AppRunner, ConnectionGuard]:
    """Start ``app`` (its versions load here) and serve connections on ``socks`` under the connection bounds.
    The caller stops it with ``runner.cleanup()``."""
    handler_args: dict[str, Any] = {"keepalive_timeout": cfg.keepalive_timeout, "access_log": None}
    runner = web.AppRunner(app, handle_signals=handle_signals, shutdown_timeout=cfg.drain_timeout, **handler_args)
    await runner.setup()
    try:
        guard = ConnectionGuard(descriptor_cap(cfg.max_connections), cfg.max_connections_per_client)
        for sock in socks:
            await GuardedSite(runner, sock, guard, cfg.header_timeout, cfg.write_timeout, handler_args,
                              backlog=BACKLOG).start()
    except BaseException:
        await runner.cleanup()
        raise
    names = ", ".join(sorted(site.name for site in runner.sites))
    log.info("listening on %s: at most %d connections (%s per client), request heads within %g s, idle "
             "keep-alive %g s, replies taken within %g s", names, guard.max_connections,
             cfg.max_connections_per_client or "no cap", cfg.header_timeout, cfg.keepalive_timeout, cfg.write_timeout)
    return runner, guard


async def _serve(app: web.Application, socks: list[socket.socket], cfg: ServerConfig) -> None:
    runner, _ = await start(app, socks, cfg, handle_signals=True)
    try:
        while True:
            await asyncio.sleep(3600)
    finally:
        await runner.cleanup()


def serve(app: web.Application, socks: list[socket.socket], cfg: ServerConfig) -> None:
    """Serve ``app`` on the bound ``socks`` until SIGINT/SIGTERM, then drain (``cfg.drain_timeout``)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(_serve(app, socks, cfg))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
