"""HTTP handlers: thin; parsing runs through the registry, choosing a version through the routes."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from pathlib import Path

import numpy as np
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from m2fpkit.runtime.errors import IncompatibleAPI, UnknownVersion, VersionUnavailable
from m2fpkit.runtime.versions import check_name, is_version_name

from . import keys, render
from .errors import HTTPProblem
from .routing import bucket, pick

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")
IMAGE_TYPES = ("image/", "application/octet-stream")


# ------------------------------------------------------------------------------------- choosing
def route_key(request: web.Request) -> str:
    routes = request.app[keys.ROUTES].current
    return (request.headers.get(routes.key_header) or request.cookies.get(routes.key_cookie)
            or request.headers.get("X-Forwarded-For", "").split(",")[0].strip() or request.remote or "")


def client_api(request: web.Request) -> str | None:
    return request.headers.get("X-API-Version") or request.query.get("api") or request.app[keys.CONFIG].default_api


def choose_version(request: web.Request, name: str) -> tuple[str, str]:
    """(version, route rule) for a path name: exact version, alias, ``latest`` or ``auto``."""
    registry = request.app[keys.REGISTRY]
    api = client_api(request)

    def compatible(v: str) -> bool:
        cfg = registry.config(v)
        return api is None or (cfg is not None and api in cfg.compatible_api)

    if name == "auto":
        routes = request.app[keys.ROUTES].current
        v = pick(routes.weights, bucket(route_key(request)), lambda x: registry.is_ready(x) and compatible(x))
        if v is not None:
            return v, "auto"
        name, rule = "latest", "auto-fallback"
    else:
        check_name(name)
        rule = "latest" if name == "latest" else "exact" if is_version_name(name) else f"alias:{name}"
    if name == "latest":
        v = registry.latest(accept=compatible)
        if v is None:
            if api is not None and registry.latest() is not None:
                raise IncompatibleAPI(f"no available version declares API {api!r} compatible")
            raise VersionUnavailable("no version is available")
        return v, rule
    v = registry.resolve(name)
    if not compatible(v):
        cfg = registry.config(v)
        raise IncompatibleAPI(f"{v} is compatible with API {', '.join(cfg.compatible_api) if cfg else '?'}, "
                              f"not {api!r}")
    return v, rule


# ------------------------------------------------------------------------------------- parsing
async def read_image(request: web.Request) -> bytes:
    ctype = request.content_type
    if ctype == "multipart/form-data":
        form = await request.post()
        field = form.get("image")
        if field is None:
            raise HTTPProblem(400, "missing_image", "multipart body has no field named 'image'")
        if isinstance(field, str):
            raise HTTPProblem(400, "missing_image", "field 'image' must be a file upload")
        return field.file.read()
    if ctype.startswith(IMAGE_TYPES):
        return await request.read()
    raise HTTPProblem(415, "unsupported_media_type",
                      f"send multipart/form-data with an 'image' file or a raw image body, not {ctype!r}")


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
    return render.RenderOptions(include=include, mask_format=fmt, visualization=vis)


async def parse(request: web.Request) -> web.Response:
    app = request.app
    cfg, registry, admission, metrics = app[keys.CONFIG], app[keys.REGISTRY], app[keys.ADMISSION], app[keys.METRICS]
    opts = render_options(request)
    name = request.match_info["version"]
    request[keys.VERSION], request[keys.RULE] = choose_version(request, name)  # fail fast on bad names
    data = await read_image(request)
    t_start = time.perf_counter()
    state = {"started": False}

    async def work() -> dict:
        # lease first: a queued request keeps the version it was routed to, even if that version is
        # swapped out or removed while it waits for a worker (it drains, it does not vanish)
        version = request[keys.VERSION]
        async with registry.lease(version) as predictor:
            async with admission.slot():
                queued = time.perf_counter() - t_start
                state["started"] = True
                body = await registry.run_in_executor(render.parse, predictor, data, cfg.limits, opts)
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
    version, rule = request[keys.VERSION], request[keys.RULE]
    metrics.latency.labels(version, rule).observe(elapsed)
    metrics.inference.labels(version).observe(body["timing"]["inference"] / 1000)
    body["route"] = rule
    body["request_id"] = request[keys.REQUEST_ID]
    maybe_shadow(request, version, data)
    return web.json_response(body, headers={"X-Model-Version": version, "X-Route-Rule": rule})


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
    limits = app[keys.CONFIG].limits

    async def compare() -> None:
        try:
            async with admission.slot():
                async with registry.lease(primary) as p, registry.lease(shadow.version) as s:
                    a = await registry.run_in_executor(p.predict, data, limits)
                    b = await registry.run_in_executor(s.predict, data, limits)
            same = a.result.label_map.shape == b.result.label_map.shape
            agree = float(np.mean(a.result.label_map == b.result.label_map)) if same else 0.0
            metrics.shadow_agreement.labels(primary, shadow.version).observe(agree)
            metrics.shadow_runs.labels(primary, shadow.version, "compared").inc()
        except Exception:  # shadow work never affects users; count and move on
            metrics.shadow_runs.labels(primary, shadow.version, "error").inc()
            log.exception("shadow run %s vs %s failed", primary, shadow.version)

    app[keys.BACKGROUND].add(t := asyncio.ensure_future(compare()))
    t.add_done_callback(app[keys.BACKGROUND].discard)


# ------------------------------------------------------------------------------- introspection
async def versions(request: web.Request) -> web.Response:
    app = request.app
    routes = app[keys.ROUTES].current
    weights = dict(routes.weights)
    items = app[keys.REGISTRY].status()
    for item in items:
        item["weight"] = weights.get(item["version"], 0.0)
    return web.json_response({"versions": items, "latest": app[keys.REGISTRY].latest(),
                              "aliases": app[keys.REGISTRY].aliases(), "routes": routes.to_dict()})


async def meta(request: web.Request) -> web.Response:
    registry = request.app[keys.REGISTRY]
    version = registry.resolve(request.match_info["version"]) if request.match_info["version"] != "auto" else None
    if version is None:
        raise UnknownVersion("'auto' picks a version per request; ask /api/versions for the routes")
    cfg = registry.config(version)
    if cfg is None:
        raise VersionUnavailable(f"{version} has no readable config")
    return web.json_response({
        "version": cfg.version, "semver": str(cfg.semver), "name": cfg.name, "task": cfg.task,
        "channel": cfg.channel, "notes": cfg.notes, "created_at": cfg.created_at, "backbone": cfg.backbone,
        "classes": list(cfg.classes), "palette": [list(c) for c in cfg.palette], "num_classes": cfg.num_classes,
        "human_class": cfg.human_class, "compatible_api": list(cfg.compatible_api),
        "preprocess": cfg.to_dict()["preprocess"], "input_size": cfg.input_size,
        "parity": cfg.parity, "source": cfg.source, "tools": cfg.tools,
    }, headers={"X-Model-Version": cfg.version})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    registry = request.app[keys.REGISTRY]
    ready = [v for v in registry.versions() if registry.is_ready(v)]
    status = 200 if ready else 503
    return web.json_response({"ready": bool(ready), "versions": ready, "latest": registry.latest()}, status=status)


async def metrics(request: web.Request) -> web.Response:
    app = request.app
    m, registry = app[keys.METRICS], app[keys.REGISTRY]
    for event, n in registry.events.items():
        m.lifecycle.labels(event).set(n)
    m.loaded.clear()
    for item in registry.status():
        m.loaded.labels(item["version"], item["state"]).set(1 if item["loaded"] else 0)
    m.queue_depth.set(app[keys.ADMISSION].waiting)
    for kind, n in registry.weight_bytes().items():
        m.weights.labels(kind).set(n)
    return web.Response(body=generate_latest(m.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


async def openapi(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "openapi.json")
