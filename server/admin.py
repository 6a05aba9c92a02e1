"""Admin endpoints (reload routes, set weights, roll back). Disabled without a bearer token."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from aiohttp import web

from m2fpkit.runtime.bundle import jsonfile
from m2fpkit.runtime.errors import MalformedFile

from . import keys
from .auth import require_bearer
from .errors import HTTPProblem
from .routing import RoutesError

Change = Callable[[web.Request], Awaitable[None]]


def _authorize(request: web.Request) -> None:
    require_bearer(request, request.app[keys.CONFIG].admin_token, realm="m2fp-admin",
                   disabled=("admin_disabled", "admin endpoints are disabled (start with --admin-token)"))


def _answer(request: web.Request) -> web.Response:
    return web.json_response({"success": True, "routes": request.app[keys.ROUTES].current.to_dict()})


def _change(status: int, code: str) -> Callable[[Change], Callable[[web.Request], Awaitable[web.Response]]]:
    """An admin handler: authorize, apply ``change``, map a refused change to ``status``, answer the routes."""

    def wrap(change: Change) -> Callable[[web.Request], Awaitable[web.Response]]:
        @functools.wraps(change)
        async def handler(request: web.Request) -> web.Response:
            _authorize(request)
            try:
                await change(request)
            except RoutesError as exc:
                raise HTTPProblem(status, code, str(exc)) from None
            return _answer(request)
        return handler
    return wrap


async def get_routes(request: web.Request) -> web.Response:
    _authorize(request)
    return _answer(request)


@_change(422, "bad_routes")
async def reload_routes(request: web.Request) -> None:
    request.app[keys.ROUTES].reload()
    await request.app[keys.REGISTRY].rescan()


@_change(422, "bad_weights")
async def set_weights(request: web.Request) -> None:
    try:
        weights = jsonfile.loads(await request.read(), "request body", max_bytes=64 << 10)
    except MalformedFile as exc:
        raise HTTPProblem(400, "bad_json", f"body must be JSON like {{\"v1.2\": 10}}: {exc.reason}") from None
    if not isinstance(weights, dict):
        raise HTTPProblem(400, "bad_json", "body must be a JSON object of version → weight")
    registry = request.app[keys.REGISTRY]
    missing = [v for v in weights if v not in registry.versions()]
    if missing:
        raise HTTPProblem(404, "unknown_version", f"no such version(s): {', '.join(missing)}")
    request.app[keys.ROUTES].set_weights(weights)
    await registry.rescan()


@_change(409, "no_history")
async def rollback(request: web.Request) -> None:
    request.app[keys.ROUTES].rollback()
