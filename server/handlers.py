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

from m2fpkit.runtime.errors import UnknownVersion, VersionUnavailable
from m2fpkit.runtime.registry import RegistrySnapshot
from m2fpkit.runtime.versions import check_name, is_version_name

from . import keys, render
from .errors import HTTPProblem
from .routing import Routes, bucket, pick

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
    if name == "auto":
        routes = request.app[keys.ROUTES].current
        v = pick(routes.weights, bucket(route_key(request)),
                 lambda x: registry.is_ready(x) and registry.compatible(x, api))
        if v is not None:
            return v, "auto"
        return registry.resolve("latest", api), "auto-fallback"
    check_name(name)
    rule = "latest" if name == "latest" else "exact" if is_version_name(name) else f"alias:{name}"
    return registry.resolve(name, api), rule


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
                body = await registry.run_in_executor(render.parse, predictor, data, cfg.runtime.limits, opts)
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
    limits = app[keys.CONFIG].runtime.limits

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
def versions_body(snapshot: RegistrySnapshot, routes: Routes) -> dict:
    """``/api/versions``: the registry's snapshot with each version's routing weight, and the routes."""
    weights = dict(routes.weights)
    body = snapshot.to_dict()
    body["versions"] = [{**s.to_dict(), "weight": weights.get(s.version, 0.0)} for s in snapshot.versions]
    body["routes"] = routes.to_dict()
    return body


async def versions(request: web.Request) -> web.Response:
    app = request.app
    return web.json_response(versions_body(app[keys.REGISTRY].status(), app[keys.ROUTES].current))


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
    """200 once a version answers; 503 with the reason otherwise (no versions yet, or none ready)."""
    snapshot = request.app[keys.REGISTRY].status()
    ready = snapshot.ready()
    body: dict = {"ready": bool(ready), "versions": ready, "latest": snapshot.latest,
                  "last_known_good": snapshot.last_known_good}
    if not ready:
        body["detail"] = ("no versions yet" if not snapshot.versions else "no version is ready: " + ", ".join(
            f"{s.version} {s.state.value}" for s in snapshot.versions))
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    app = request.app
    m, registry = app[keys.METRICS], app[keys.REGISTRY]
    for event, n in registry.events.items():
        m.lifecycle.labels(event).set(n)
    m.loaded.clear()
    for s in registry.status().versions:
        m.loaded.labels(s.version, s.state.value).set(1 if s.loaded else 0)
    m.queue_depth.set(app[keys.ADMISSION].waiting)
    for kind, n in registry.weight_bytes().items():
        m.weights.labels(kind).set(n)
    return web.Response(body=generate_latest(m.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


async def openapi(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "openapi.json")
