"""Admin endpoints (reload routes, set weights, roll back). Disabled without a bearer token."""

from __future__ import annotations

import hmac
import json

from aiohttp import web

from . import keys
from .errors import HTTPProblem
from .routing import RoutesError


def _authorize(request: web.Request) -> None:
    token = request.app[keys.CONFIG].admin_token
    if not token:
        raise HTTPProblem(404, "admin_disabled", "admin endpoints are disabled (start with --admin-token)")
    given = request.headers.get("Authorization", "")
    if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), token.encode()):
        raise HTTPProblem(401, "unauthorized", "missing or wrong bearer token",
                          headers={"WWW-Authenticate": 'Bearer realm="m2fp-admin"'})


def _answer(request: web.Request) -> web.Response:
    return web.json_response({"success": True, "routes": request.app[keys.ROUTES].current.to_dict()})


async def get_routes(request: web.Request) -> web.Response:
    _authorize(request)
    return _answer(request)


async def reload_routes(request: web.Request) -> web.Response:
    _authorize(request)
    try:
        request.app[keys.ROUTES].reload()
    except RoutesError as exc:
        raise HTTPProblem(422, "bad_routes", str(exc)) from None
    await request.app[keys.REGISTRY].rescan()
    return _answer(request)


async def set_weights(request: web.Request) -> web.Response:
    _authorize(request)
    try:
        weights = json.loads(await request.read())
    except ValueError as exc:
        raise HTTPProblem(400, "bad_json", f"body must be JSON like {{\"v1.2\": 10}}: {exc}") from None
    if not isinstance(weights, dict):
        raise HTTPProblem(400, "bad_json", "body must be a JSON object of version → weight")
    registry = request.app[keys.REGISTRY]
    missing = [v for v in weights if v not in registry.versions()]
    if missing:
        raise HTTPProblem(404, "unknown_version", f"no such version(s): {', '.join(missing)}")
    try:
        request.app[keys.ROUTES].set_weights(weights)
    except RoutesError as exc:
        raise HTTPProblem(422, "bad_weights", str(exc)) from None
    await registry.rescan()
    return _answer(request)


async def rollback(request: web.Request) -> web.Response:
    _authorize(request)
    try:
        request.app[keys.ROUTES].rollback()
    except RoutesError as exc:
        raise HTTPProblem(409, "no_history", str(exc)) from None
    return _answer(request)
