"""Errors → HTTP, in one place. Every error body is ``{"error", "detail", "request_id"}``.

Invariant: what a client reads is a *public* reason (:func:`public_reason`): it names the problem and
the bundle file concerned, never the server's internals — no absolute filesystem path (only its last
part: ``model.onnx.data``), no library exception text (onnxruntime's ``[ONNXRuntimeError] …``, a Python
exception's class and message). Every error body passes through :func:`error_response`, which logs the
full detail under the request id whenever the public reason differs; ``/api/versions`` shows the
versions' reasons through the same function (their full text was logged when the version failed).
"""

from __future__ import annotations

import logging
import re
from typing import Any

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


#: the server option that raises the limit behind a 413 raised where flags are unknown (the runtime, aiohttp)
_RAISED_BY = {"image_too_large": "--max-pixels", "request_entity_too_large": "--max-body-mb"}


def name_option(status: int, code: str, detail: str) -> str:
    """``detail`` naming the option that raises the limit a 413 reports (as the server's own 413s do)."""
    option = _RAISED_BY.get(code) if status == 413 else None
    return detail if option is None or option in detail else f"{detail} (the server's {option} raises it)"


#: where the full text is, said instead of what was removed
_SEE_LOG = "details in the server log"
#: an absolute POSIX path of two or more parts (not glued to a word: ``image/png`` is no path)
_ABS_PATH = re.compile(r"(?<![\w.~/<>{}\[\]@+-])(?:/[^\s'\"`()<>{}\[\],;:|*?/]+){2,}/?")
#: the server's own URL space: quoted in messages on purpose, not a file
_URL_PREFIXES = ("/api/", "/admin/", "/static/")
#: onnxruntime's exception text: "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : …" to the end of the line
_ORT_TEXT = re.compile(r"\s*:?\s*\[ONNXRuntimeError\][^\n]*")
#: a Python exception rendered as "SomeError: text" (the registry's reason for an unexpected failure)
_EXCEPTION_TEXT = re.compile(r"\b(?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception)\b(?::[^\n]*)?")
_ERRNO = re.compile(r"\[Errno \d+\]\s*")
MAX_REASON = 500


def _last_part(match: re.Match[str]) -> str:
    path = match.group(0)
    if path.startswith(_URL_PREFIXES):
        return path
    return path.rstrip("/").rsplit("/", 1)[-1]


def public_reason(detail: str) -> str:
    """``detail`` as a client may read it: no absolute path, no library exception text, bounded length."""
    text = _ORT_TEXT.sub(f" ({_SEE_LOG})", detail)
    text = _EXCEPTION_TEXT.sub(f"an internal error ({_SEE_LOG})", text)
    text = _ABS_PATH.sub(_last_part, _ERRNO.sub("", text))
    return text if len(text) <= MAX_REASON else text[:MAX_REASON - 1] + "…"


def error_body(request: web.Request, status: int, error: str, detail: str) -> dict[str, Any]:
    """The JSON error body with the public reason; the full detail is logged under the request id."""
    request_id = request.get(keys.REQUEST_ID, "")
    public = public_reason(detail)
    if public != detail:
        log.warning("request %s: %d %s: %s", request_id, status, error, detail,
                    extra={"request_id": request_id, "status": status})
    return {"success": False, "error": error, "detail": public, "request_id": request_id}


def error_response(request: web.Request, status: int, error: str, detail: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    """:func:`error_body` as a response (the Open Inference Protocol's routes reshape it: ``server/oip.py``)."""
    return web.json_response(error_body(request, status, error, detail), status=status, headers=headers)


def classify(exc: Exception) -> tuple[int, str, str, dict[str, str]]:
    """Status, error code, detail and headers for an exception (generic 500 for anything unknown)."""
    if isinstance(exc, HTTPProblem):
        return exc.status, exc.error, exc.detail, exc.headers
    for kind, status, code in _STATUS:
        if isinstance(exc, kind):
            headers = {"Retry-After": "1"} if status == 503 else {}
            return status, code, name_option(status, code, str(exc)), headers
    if isinstance(exc, web.HTTPException):
        code = exc.reason.lower().replace(" ", "_")
        detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        kept = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        return exc.status, code, name_option(exc.status, code, detail), kept
    return 500, "internal_error", "internal server error", {}
