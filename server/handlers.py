"""HTTP handlers: thin; parsing runs through the registry, choosing a version through the routes."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from m2fpkit.runtime.agreement import pixel_agreement
from m2fpkit.runtime.bundle.jsonfile import brief
from m2fpkit.runtime.bundle.versions import check_name, is_api_version, is_version_name
from m2fpkit.runtime.errors import UnknownVersion, VersionUnavailable
from m2fpkit.runtime.predictor import ImageLimits, Predictor
from m2fpkit.runtime.quality.grades import Grade
from m2fpkit.runtime.registry import RegistrySnapshot
from m2fpkit.runtime.routes_file import Routes

from . import keys, quality, render, replies
from .errors import HTTPProblem, public_reason
from .intake import read_image
from .routing import bucket, pick

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")


# ------------------------------------------------------------------------------------- choosing
def route_key(request: web.Request) -> str:
    routes = request.app[keys.ROUTES].current
    return (request.headers.get(routes.key_header) or request.cookies.get(routes.key_cookie)
            or request.headers.get("X-Forwarded-For", "").split(",")[0].strip() or request.remote or "")


def client_api(request: web.Request) -> str | None:
    """The API version the client speaks (header, else query, else the server's default), well-formed.

    A malformed value is 400 ``bad_api_version``; a well-formed one no version declares is the
    registry's 409 ``incompatible_api``."""
    given = [v for v in (request.headers.get("X-API-Version"), request.query.get("api")) if v]
    for where, value in (("X-API-Version", request.headers.get("X-API-Version")), ("api", request.query.get("api"))):
        if value and not is_api_version(value):  # every value given must be well-formed, used or not
            raise HTTPProblem(400, "bad_api_version", f"{where}: expected an API version like 1.0 or 2.0 "
                                                      f"(digits.digits), got {brief(value, 40)}")
    return given[0] if given else request.app[keys.CONFIG].default_api


def choose_version(request: web.Request, name: str, key: str | None = None) -> tuple[str, str]:
    """(version, route rule) for a path name: exact version, alias, ``latest`` or ``auto``; ``auto`` routes
    on ``key`` when given, else on the request's route key (header, cookie, client address)."""
    registry = request.app[keys.REGISTRY]
    api = client_api(request)
    if name == "auto":
        routes = request.app[keys.ROUTES].current
        v = pick(routes.weights, bucket(route_key(request) if key is None else key),
                 lambda x: registry.is_ready(x) and registry.compatible(x, api))
        if v is not None:
            return v, "auto"
        return registry.resolve("latest", api), "auto-fallback"
    check_name(name)
    rule = "latest" if name == "latest" else "exact" if is_version_name(name) else f"alias:{name}"
    return registry.resolve(name, api), rule


# ------------------------------------------------------------------------------------- parsing
def render_options(request: web.Request) -> render.RenderOptions:
    include = frozenset(p for p in request.query.get("include", "").split(",") if p)
    unknown = include - render.INCLUDES
    if unknown:
        raise HTTPProblem(400, "bad_parameter", f"include: unknown {', '.join(sorted(unknown))} "
                                                f"(choose from {', '.join(sorted(render.INCLUDES))})")
    fmt = request.query.get("mask_format", "rle")
    if fmt not in render.MASK_FORMATS:
        raise HTTPProblem(400, "bad_parameter", f"mask_format: expected rle or png, got {fmt!r}")
    vis = request.query.get("visualization", "1") not in ("0", "false", "no")
    given = request.query.get("visualization_max_side")  # checked even with visualization=0, like api
    try:
        max_side = render.VISUALIZATION_MAX_SIDE if given is None else render.parse_max_side(given)
    except ValueError as e:
        raise HTTPProblem(400, "bad_parameter", f"visualization_max_side: {e}") from None
    vis_fmt = request.query.get("visualization_format", render.VISUALIZATION_FORMATS[0])
    if vis_fmt not in render.VISUALIZATION_FORMATS:
        raise HTTPProblem(400, "bad_parameter", "visualization_format: expected "
                          f"{' or '.join(render.VISUALIZATION_FORMATS)}, got {brief(vis_fmt, 40)}")
    return render.RenderOptions(include=include, mask_format=fmt, visualization=vis,
                                visualization_max_side=max_side, visualization_format=vis_fmt)


async def parse(request: web.Request) -> web.StreamResponse:
    opts = render_options(request)
    name = request.match_info["version"]
    version, rule = choose_version(request, name)  # fail fast on bad names, before the body is read
    request[keys.VERSION], request[keys.RULE] = version, rule  # for the access log and the request metrics
    data = await read_image(request)  # bounded: upload slot, body deadline, size cap (server/intake.py)
    body = await run_parse(request, version, rule, data, functools.partial(render.parse, opts=opts))
    body["route"] = rule
    body["request_id"] = request[keys.REQUEST_ID]
    return await replies.json_reply(request, body, {"X-Model-Version": version, "X-Route-Rule": rule},
                                    "the parse reply (visualization, include=…)")


#: the work of one parse, run on the inference pool: (predictor, image bytes, limits) → a body whose
#: ``timing`` holds milliseconds, ``inference`` among them
Renderer = Callable[[Predictor, bytes, ImageLimits], dict[str, Any]]


async def run_parse(request: web.Request, version: str, rule: str, data: bytes, renderer: Renderer) -> dict[str, Any]:
    """The one parse path (``/api/{version}/parse``, ``/api/compare`` and OIP ``infer``): lease ``version``
    (chosen by ``rule``), wait for a worker (admission), run ``renderer`` within the request timeout, record
    latency and inference metrics, maybe shadow. Returns the renderer's body with ``timing.queue``."""
    app = request.app
    cfg, registry, admission, metrics = app[keys.CONFIG], app[keys.REGISTRY], app[keys.ADMISSION], app[keys.METRICS]
    t_start = time.perf_counter()
    state = {"started": False}

    async def work() -> dict[str, Any]:
        # lease first: a queued request keeps the version it was routed to, even if that version is
        # swapped out or removed while it waits for a worker (it drains, it does not vanish)
        async with registry.lease(version) as predictor:
            async with admission.slot():
                queued = time.perf_counter() - t_start
                state["started"] = True
                body = await registry.run_in_executor(renderer, predictor, data, cfg.runtime.limits)
                body["timing"]["queue"] = round(queued * 1000, 2)
                return body

    metrics.queue_depth.set(admission.waiting)
    task = asyncio.ensure_future(work())
    try:
        body = await asyncio.wait_for(asyncio.shield(task), cfg.request_timeout)
    except TimeoutError:
        if not state["started"]:
            task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        raise HTTPProblem(504, "timeout", f"no result within {cfg.request_timeout:g} s") from None
    finally:
        metrics.queue_depth.set(admission.waiting)
    elapsed = time.perf_counter() - t_start
    metrics.latency.labels(version, rule).observe(elapsed)
    metrics.inference.labels(version).observe(body["timing"]["inference"] / 1000)
    maybe_shadow(request, version, data)
    return body


def maybe_shadow(request: web.Request, primary: str, data: bytes) -> None:
    """Also run a sampled request on the shadow candidate, only when a worker is idle (dropped otherwise)."""
    app = request.app
    routes, registry, admission, metrics = (app[keys.ROUTES].current, app[keys.REGISTRY], app[keys.ADMISSION],
                                            app[keys.METRICS])
    shadow = routes.shadow
    if shadow is None or shadow.version == primary or random.random() >= shadow.fraction:
        return
    if not admission.idle() or not registry.is_ready(shadow.version):
        metrics.shadow_runs.labels(primary, shadow.version, "dropped").inc()
        return
    limits = app[keys.CONFIG].runtime.limits

    async def compare() -> None:
        try:
            async with admission.slot():
                async with registry.lease(primary) as p, registry.lease(shadow.version) as s:
                    a = await registry.run_in_executor(p.predict, data, limits)
                    b = await registry.run_in_executor(s.predict, data, limits)
            agree = pixel_agreement(a.result.label_map, b.result.label_map)
            metrics.shadow_agreement.labels(primary, shadow.version).observe(agree)
            metrics.shadow_runs.labels(primary, shadow.version, "compared").inc()
        except Exception:  # shadow work never affects users; count and move on
            metrics.shadow_runs.labels(primary, shadow.version, "error").inc()
            log.exception("shadow run %s vs %s failed", primary, shadow.version)

    app[keys.BACKGROUND].add(t := asyncio.ensure_future(compare()))
    t.add_done_callback(app[keys.BACKGROUND].discard)


# ------------------------------------------------------------------------------- introspection
def versions_body(snapshot: RegistrySnapshot, routes: Routes,
                  grades: Mapping[str, Sequence[Grade]] | None = None) -> dict:
    """``/api/versions``: the registry's snapshot with each version's routing weight, its grades (``grades``:
    bundle identity → grades, most recent first; ``server/quality.py``), and the routes.

    Unauthenticated: a version's ``reason`` / ``update_error`` are shown as public reasons (no paths, no
    library text; the full text was logged when the version failed)."""
    weights, grades = dict(routes.weights), grades or {}
    body = snapshot.to_dict()
    body["versions"] = [{**s.to_dict(), "weight": weights.get(s.version, 0.0),
                         "reason": None if s.reason is None else public_reason(s.reason),
                         "update_error": None if s.update_error is None else public_reason(s.update_error),
                         "quality": [quality.to_public(g) for g in grades.get(s.identity or "", ())]}
                        for s in snapshot.versions]
    body["routes"] = routes.to_dict()
    return body


async def versions(request: web.Request) -> web.Response:
    app = request.app
    grades = await app[keys.GRADES].current()
    return web.json_response(versions_body(app[keys.REGISTRY].status(), app[keys.ROUTES].current, grades))


async def meta(request: web.Request) -> web.Response:
    registry = request.app[keys.REGISTRY]
    version = registry.resolve(request.match_info["version"]) if request.match_info["version"] != "auto" else None
    if version is None:
        raise UnknownVersion("'auto' picks a version per request; ask /api/versions for the routes")
    cfg = registry.config(version)
    if cfg is None:
        raise VersionUnavailable(f"{version} has no readable config")
    status = registry.status().get(version)
    graded = await request.app[keys.GRADES].of(status.identity if status else None)
    return web.json_response({
        "version": cfg.version, "semver": str(cfg.semver), "name": cfg.name, "task": cfg.task,
        "channel": cfg.channel, "notes": cfg.notes, "created_at": cfg.created_at, "backbone": cfg.backbone,
        "classes": list(cfg.classes), "palette": [list(c) for c in cfg.palette], "num_classes": cfg.num_classes,
        "human_class": cfg.human_class, "compatible_api": list(cfg.compatible_api),
        "preprocess": cfg.to_dict()["preprocess"], "input_size": cfg.input_size,
        "parity": cfg.parity, "source": cfg.source, "tools": cfg.tools,
        "random_weights": cfg.random_weights, "weights_note": cfg.weights_note,
        "plan": status.plan if status else None,
        "golden": status.golden if status else None,
        "quality": graded,
    }, headers={"X-Model-Version": cfg.version})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


def readiness(snapshot: RegistrySnapshot) -> tuple[list[str], str | None]:
    """(the versions that answer, why none does — None once one does): the one readiness rule, of
    ``/readyz`` and the protocol's ``/v2/health/ready``."""
    ready = snapshot.ready()
    if ready:
        return ready, None
    if not snapshot.versions:
        return ready, "no versions yet"
    return ready, "no version is ready: " + ", ".join(f"{s.version} {s.state.value}" for s in snapshot.versions)


async def readyz(request: web.Request) -> web.Response:
    """200 once a version answers; 503 with the reason otherwise (no versions yet, or none ready)."""
    snapshot = request.app[keys.REGISTRY].status()
    ready, why = readiness(snapshot)
    body: dict = {"ready": bool(ready), "versions": ready, "latest": snapshot.latest,
                  "last_known_good": snapshot.last_known_good}
    if why is not None:
        body["detail"] = why
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    app = request.app
    m, registry = app[keys.METRICS], app[keys.REGISTRY]
    grades = await app[keys.GRADES].current()  # before the gauges are cleared: no await between clear and fill
    for event, n in registry.events.items():
        m.lifecycle.labels(event).set(n)
    for gauge in (m.loaded, m.failed, m.load_seconds, m.plan, m.plan_agreement, m.golden_degenerate, m.quality):
        gauge.clear()
    for s in registry.status().versions:
        for g in quality.latest_per_dataset(grades.get(s.identity or "", ())):
            for metric in quality.METRICS:
                m.quality.labels(s.version, g.dataset.name, metric).set(getattr(g, metric))
        m.loaded.labels(s.version, s.state.value).set(1 if s.loaded else 0)
        if s.reason is not None:
            m.failed.labels(s.version, "version").set(1)
        if s.update_error is not None:
            m.failed.labels(s.version, "update").set(1)
        if s.load_seconds is not None:
            m.load_seconds.labels(s.version).set(s.load_seconds)
        if s.golden is not None:
            m.golden_degenerate.labels(s.version).set(1 if s.golden["degenerate"] else 0)
        if s.plan is not None:
            m.plan.labels(s.version, s.plan["name"], s.plan["engine"], s.plan["precision"]).set(1)
            if s.plan["agreement"] is not None:
                m.plan_agreement.labels(s.version).set(s.plan["agreement"])
    m.queue_depth.set(app[keys.ADMISSION].waiting)
    m.queue_limit.set(app[keys.ADMISSION].max_queue)
    m.routes_refused.counts = app[keys.ROUTES].refusals
    for kind, n in registry.weight_bytes().items():
        m.weights.labels(kind).set(n)
    return web.Response(body=generate_latest(m.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


#: content types of the static files by extension (fixed, not the host's mime.types); others are octet-stream
STATIC_TYPES = {".html": "text/html", ".json": "application/json", ".png": "image/png", ".jpg": "image/jpeg",
                ".jpeg": "image/jpeg", ".js": "text/javascript", ".css": "text/css", ".txt": "text/plain"}


async def _file(path: Path) -> web.Response:
    """A small packaged file, whole (no ranges, no conditional requests: the OpenAPI document lists 200 only)."""
    body = await asyncio.get_running_loop().run_in_executor(None, path.read_bytes)
    return web.Response(body=body, content_type=STATIC_TYPES.get(path.suffix.lower(), "application/octet-stream"))


def static_file(name: str) -> Path | None:
    """The regular file ``name`` names under :data:`STATIC`, or None (outside it, hidden, missing, a directory)."""
    if not name or "\0" in name or any(part.startswith(".") for part in name.split("/")):
        return None
    root = STATIC.resolve()
    try:
        path = (root / name).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        return None
    return path if path.is_relative_to(root) and path.is_file() else None


async def static(request: web.Request) -> web.Response:
    """``/static/{filename}``: the WebUI's files; anything else is a JSON 404 like every other error."""
    path = static_file(request.match_info["filename"])
    if path is None:
        raise HTTPProblem(404, "not_found", "no such static file")
    return await _file(path)


async def index(request: web.Request) -> web.Response:
    return await _file(STATIC / "index.html")


async def openapi(request: web.Request) -> web.Response:
    return await _file(STATIC / "openapi.json")
