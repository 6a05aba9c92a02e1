"""Errors → HTTP, in one place. Every error body is ``{"error", "detail", "request_id"}``."""

from __future__ import annotations

import logging

from aiohttp import web

from m2fpkit.runtime import errors as rt

from . import keys

log = logging.getLogger(__name__)


class HTTPProblem(Exception):
    """A server-side refusal with its own status (bad request shape, auth, limits)."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers or {}


#: most specific first
_STATUS: list[tuple[type[Exception], int, str]] = [
    (rt.EmptyImage, 400, "empty_image"),
    (rt.UndecodableImage, 400, "undecodable_image"),
    (rt.UnsupportedImageFormat, 415, "unsupported_media_type"),
    (rt.ImageTooLarge, 413, "image_too_large"),
    (rt.BadAspectRatio, 422, "bad_aspect_ratio"),
    (rt.InputError, 400, "bad_input"),
    (rt.InvalidVersionName, 400, "invalid_version_name"),
    (rt.UnknownVersion, 404, "unknown_version"),
    (rt.IncompatibleAPI, 409, "incompatible_api"),
    (rt.VersionUnavailable, 503, "version_unavailable"),
    (rt.Overloaded, 503, "overloaded"),
]


def error_response(request: web.Request, status: int, error: str, detail: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = {"success": False, "error": error, "detail": detail, "request_id": request.get(keys.REQUEST_ID, "")}
    return web.json_response(body, status=status, headers=headers)


def classify(exc: Exception) -> tuple[int, str, str, dict[str, str]]:
    """Status, error code, detail and headers for an exception (generic 500 for anything unknown)."""
    if isinstance(exc, HTTPProblem):
        return exc.status, exc.error, exc.detail, exc.headers
    for kind, status, code in _STATUS:
        if isinstance(exc, kind):
            headers = {"Retry-After": "1"} if status == 503 else {}
            return status, code, str(exc), headers
    if isinstance(exc, web.HTTPException):
        code = exc.reason.lower().replace(" ", "_")
        detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        return exc.status, code, detail, {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
    return 500, "internal_error", "internal server error", {}
