"""The aiohttp application factory: state, middleware, routes and resources' life cycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator

from aiohttp import web

from m2fpkit.runtime.registry import Registry
from m2fpkit.runtime.routes_file import RoutesError

from . import admin, compare, distribution, handlers, keys, oip, replies, score
from .admission import Admission
from .config import ServerConfig
from .errors import HTTPProblem, classify, error_response
from .metrics import Metrics
from .quality import GradeBoard, grades_dir
from .routes_state import RoutesState

log = logging.getLogger(__name__)
access_log = logging.getLogger("m2fpkit.access")


#: a client's ``X-Request-ID``: 1-64 visible ASCII characters (it is echoed in a header and logged)
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,64}")


def request_id(request: web.Request) -> tuple[str, bool]:
    """(the request's id, whether the client's ``X-Request-ID`` is acceptable); empty or absent → generated."""
    given = request.headers.get("X-Request-ID", "")
    if given and REQUEST_ID.fullmatch(given):
        return given, True
    return uuid.uuid4().hex[:16], not given


@web.middleware
async def request_context(request: web.Request, handler) -> web.StreamResponse:
    """Request id, JSON errors for everything, metrics and one access-log line per request."""
    request[keys.REQUEST_ID], id_ok = request_id(request)
    t0 = time.perf_counter()
    metrics = request.app[keys.METRICS]
    is_parse = request.path.endswith(("/parse", "/infer", "/score"))  # /api/{v}/parse|score and OIP infer
    if is_parse:
        metrics.in_flight.inc()
    try:
        if not id_ok:
            raise HTTPProblem(400, "bad_request_id", "X-Request-ID: expected 1-64 visible ASCII characters "
                                                     "(no spaces or control characters)")
        response = await handler(request)
    except Exception as exc:  # every failure becomes a JSON error; unknown ones are logged, never echoed
        status, code, detail, headers = classify(exc)
        if status == 500:
            log.exception("request %s %s failed", request.method, request.path)
        metrics.errors.labels(code, str(status)).inc()
        respond = oip.error_response if oip.handles(request) else error_response  # same mapping, its body
        response = respond(request, status, code, detail, headers)
    finally:
        if is_parse:
            metrics.in_flight.dec()
    if not response.prepared:
        response.headers["X-Request-ID"] = request[keys.REQUEST_ID]
    version, rule = request.get(keys.VERSION, "-"), request.get(keys.RULE, "-")
    if is_parse:
        metrics.requests.labels(version, rule, str(response.status)).inc()
    access_log.info("%s %s %s %d version=%s rule=%s %.1fms", request[keys.REQUEST_ID], request.method,
                    request.path_qs, response.status, version, rule, (time.perf_counter() - t0) * 1000,
                    extra={"request_id": request[keys.REQUEST_ID], "status": response.status, "version": version,
                           "rule": rule, "latency_ms": round((time.perf_counter() - t0) * 1000, 1)})
    return response


async def stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Every response carries ``X-Request-ID``, streamed ones too (their headers leave before the middleware ends)."""
    if keys.REQUEST_ID in request and "X-Request-ID" not in response.headers:
        response.headers["X-Request-ID"] = request[keys.REQUEST_ID]


async def runtime_context(app: web.Application) -> AsyncIterator[None]:
    cfg = app[keys.CONFIG]
    registry = Registry(cfg.bundles, cfg.runtime)
    routes = RoutesState(registry, cfg.routes_file)
    app[keys.REGISTRY] = registry
    app[keys.ROUTES] = routes
    app[keys.ADMISSION] = Admission.for_config(cfg)
    app[keys.BACKGROUND] = set()
    app[keys.GRADES] = grades = GradeBoard(grades_dir(cfg.runtime.state_dir, registry.store.dir))
    try:
        await registry.start()  # serves the last-known-good set first when one is recorded
    except BaseException:
        await registry.close()
        raise
    if cfg.routes_file is not None:
        try:
            await routes.reload()
        except RoutesError as exc:
            # a broken routes file: fall back to the last routes that served, else refuse to start
            if not routes.restore_last_known_good():
                await registry.close()
                raise
            log.error("routes file refused (%s); serving the last-known-good routes", exc)
        await registry.preload()  # versions the routes weight or alias are pinned: load them now
    await grades.current()  # the first read, so that the first requests show the grades
    stop = asyncio.Event()
    watcher = asyncio.ensure_future(routes.watch(stop)) if cfg.runtime.watch else None
    status = registry.status()
    log.info("serving %s: %s", cfg.bundles,
             ", ".join(f"{s.version}({s.state.value})" for s in status.versions) or "no versions yet")
    try:
        yield
    finally:
        stop.set()
        if watcher:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher
        background: set[asyncio.Future] = app[keys.BACKGROUND]
        for t in list(background):
            t.cancel()
        grades.close()
        await registry.close(drain_timeout=cfg.drain_timeout)


def make_app(config: ServerConfig | None = None) -> web.Application:
    cfg = config or ServerConfig()
    app = web.Application(client_max_size=cfg.max_body_bytes, middlewares=[request_context])
    app[keys.CONFIG] = cfg
    app[keys.METRICS] = Metrics()
    replies.setup(app)  # the reply budget: size, bytes in flight, write deadline (server/replies.py)
    app.cleanup_ctx.append(runtime_context)
    app.on_response_prepare.append(stamp_request_id)
    app.router.add_get("/", handlers.index)
    app.router.add_get("/static/{filename:.+}", handlers.static)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/metrics", handlers.metrics)
    app.router.add_get("/api/openapi.json", handlers.openapi)
    app.router.add_get("/api/versions", handlers.versions)
    app.router.add_post("/api/{version}/parse", handlers.parse)
    app.router.add_post("/api/{version}/score", score.score)
    app.router.add_post("/api/compare", compare.compare)
    app.router.add_get("/api/{version}/meta", handlers.meta)
    app.router.add_get("/admin/routes", admin.get_routes)
    app.router.add_post("/admin/routes/reload", admin.reload_routes)
    app.router.add_put("/admin/routes/weights", admin.set_weights)
    app.router.add_post("/admin/routes/rollback", admin.rollback)
    oip.setup(app)  # Open Inference Protocol v2: /v2, /v2/health/*, /v2/models/m2fp/…, /v2/repository/…
    distribution.setup(app)  # GET /bundles, /bundles/{version}.tar (404 without --distribution-token)
    return app
