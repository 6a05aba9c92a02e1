"""Admin endpoints (reload routes, set weights, roll back). Disabled without a bearer token.

Invariant: a change is validated like a routes file (runtime/routes_file.py) before it applies; a refused one
is a 4xx naming the key (400 not JSON, 404 unknown version, 422 invalid value), counted in
``m2fp_routes_refused_total{source="admin"}``, and leaves the routes in force untouched — never a 500.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from aiohttp import web

from m2fpkit.runtime.bundle import jsonfile
from m2fpkit.runtime.errors import MalformedFile
from m2fpkit.runtime.routes_file import RoutesError, brief_key

from . import keys
from .auth import require_bearer
from .errors import HTTPProblem

#: a weights body is one small JSON object
MAX_WEIGHTS_BODY = 64 << 10

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
    await request.app[keys.ROUTES].reload()
    await request.app[keys.REGISTRY].rescan()


def _refused(request: web.Request, status: int, code: str, detail: str) -> HTTPProblem:
    """The refusal of an admin change, logged and counted with the routes' other refusals."""
    request.app[keys.ROUTES].refuse("admin", detail)
    return HTTPProblem(status, code, detail)


@_change(422, "bad_weights")
async def set_weights(request: web.Request) -> None:
    try:
        weights = jsonfile.loads(await request.read(), "request body", max_bytes=MAX_WEIGHTS_BODY)
    except MalformedFile as exc:
        raise _refused(request, 400, "bad_json", f"body must be JSON like {{\"v1.2\": 10}}: {exc.reason}") from None
    if not isinstance(weights, dict):
        raise _refused(request, 400, "bad_json", "body must be a JSON object of version → weight")
    registry = request.app[keys.REGISTRY]
    known = set(registry.versions())
    missing = [v for v in weights if v not in known]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        names = ", ".join(brief_key(v) for v in missing[:5]) + more
        raise _refused(request, 404, "unknown_version", f"no such version(s): {names}")
    request.app[keys.ROUTES].set_weights(weights)  # RoutesError (counted there) → 422 naming the key
    await registry.rescan()


@_change(409, "no_history")
async def rollback(request: web.Request) -> None:
    request.app[keys.ROUTES].rollback()
