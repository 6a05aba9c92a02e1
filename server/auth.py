"""The one bearer-token check (admin and distribution endpoints): byte-safe, scheme case-insensitive,
constant-time. A feature without a configured token does not exist (404); a missing, malformed or
wrong token is 401 with ``WWW-Authenticate``."""

from __future__ import annotations

import hmac

from aiohttp import web

from .errors import HTTPProblem


def require_bearer(request: web.Request, token: str | None, *, realm: str, disabled: tuple[str, str]) -> None:
    """Refuse the request unless it carries ``Authorization: Bearer <token>``; ``disabled`` = (code, message)."""
    if not token:
        raise HTTPProblem(404, *disabled)
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # compare bytes: a header aiohttp decoded as latin-1 or a non-ASCII token never raises here
    given_b = given.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given_b, token.encode("utf-8", "surrogateescape")):
        raise HTTPProblem(401, "unauthorized", "missing or wrong bearer token",
                          headers={"WWW-Authenticate": f'Bearer realm="{realm}"'})
