"""Request intake: the one way a parse request's image enters the server, at bounded cost.

Invariant: no byte of a body is read before the request holds an upload slot (:class:`Admission`:
at most ``max_uploads`` bodies are received at once, ``max_uploads_per_client`` from one client address;
a request that gets none within ``upload_wait`` s, or arrives while the parse queue is full, is refused
with 503 + ``Retry-After`` unread). Holding the slot, the body is read within ``body_timeout`` s and at
``min_body_rate`` bytes/s on average once ``body_grace`` s have passed (else 408, connection closed), and
up to ``max_body_bytes`` (else 413: at once from ``Content-Length``, or as soon as the bytes read pass it).
So bodies in reception hold at most ``max_uploads × max_body_bytes``, whatever the number of
connections; no connection keeps a slot longer than ``body_timeout``, nor a trickling one longer than
``body_grace`` plus what it sent at the minimum rate.

Accepted: ``multipart/form-data`` with exactly one file field ``image`` (other flat fields are read
and dropped), or a raw ``image/*`` / ``application/octet-stream`` body; ``/api/{version}/score`` reads the
file fields ``image`` and ``label`` the same way (:func:`read_files`). A nested multipart, a second
``image``, ``image`` as a plain field, an encoded part or any malformed body is a 400 whose reason
names the problem; aiohttp's own exception text goes to the log only.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import warnings
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import MultipartReader, StreamReader, hdrs, web
from aiohttp.helpers import parse_mimetype
from aiohttp.http_exceptions import BadHttpMessage

from . import keys
from .admission import Admission
from .connections import client_key
from .errors import HTTPProblem

log = logging.getLogger(__name__)

IMAGE_TYPES = ("image/", "application/octet-stream")
#: parts a multipart body may hold (the image and a few form fields)
MAX_PARTS = 16
#: multipart boundaries longer than this are refused (RFC 2046)
MAX_BOUNDARY = 70
_CHUNK = 2**16
_PLAIN_TRANSFER = (None, "binary", "8bit", "7bit")
_PLAIN_ENCODING = (None, "identity")
#: what aiohttp's multipart reader raises on a malformed body
_MALFORMED = (ValueError, RuntimeError, LookupError, BadHttpMessage)
T = TypeVar("T")


def malformed(detail: str) -> HTTPProblem:
    return HTTPProblem(400, "malformed_body", detail)


class _CappedStream:
    """The request's body stream, refusing (413) once more than ``cap`` bytes were taken from it, and moving
    ``deadline`` as bytes come: ``min(start + timeout, start + grace + taken / rate)``.

    Offers what :class:`aiohttp.MultipartReader` uses of a :class:`aiohttp.StreamReader`."""

    def __init__(self, stream: StreamReader, cap: int) -> None:
        self._stream, self.cap, self.taken = stream, cap, 0
        self._deadline: asyncio.Timeout | None = None
        self.start = self.hard_deadline = 0.0
        self.rate = self.grace = math.inf

    def pace(self, deadline: asyncio.Timeout, timeout: float, rate: float, grace: float) -> None:
        """From now, keep ``deadline`` (entered) at the body timeout or the minimum rate, whichever is sooner."""
        self._deadline, self.rate, self.grace = deadline, rate, grace
        self.start = asyncio.get_running_loop().time()
        self.hard_deadline = self.start + timeout
        self._move_deadline()

    def too_slow(self) -> bool:
        """Whether the deadline that passed was the minimum rate's, not the body timeout's."""
        return asyncio.get_running_loop().time() < self.hard_deadline

    def _move_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.reschedule(min(self.hard_deadline, self.start + self.grace + self.taken / self.rate))

    def _count(self, data: bytes) -> bytes:
        self.taken += len(data)
        if self.taken > self.cap:
            raise too_large(self.cap)
        if data:
            self._move_deadline()
        return data

    async def read(self, n: int = -1) -> bytes:
        return self._count(await self._stream.read(n))

    async def readline(self, *, max_line_length: int | None = None) -> bytes:
        return self._count(await self._stream.readline(max_line_length=max_line_length))

    def at_eof(self) -> bool:
        return self._stream.at_eof()

    def unread_data(self, data: bytes) -> None:
        self.taken -= len(data)
        self._stream.unread_data(data)


def too_large(cap: int) -> HTTPProblem:
    return HTTPProblem(413, "body_too_large", f"the request body is larger than the limit of {cap} bytes "
                                              f"({cap / 2**20:g} MB; the server's --max-body-mb raises it)")


def body_kind(request: web.Request) -> str:
    """``"multipart"`` or ``"raw"`` from the Content-Type, refused (415/400) before anything is read."""
    ctype = request.content_type
    if ctype == "multipart/form-data":
        mime = parse_mimetype(request.headers.get(hdrs.CONTENT_TYPE, ""))
        boundary = mime.parameters.get("boundary", "")
        if (mime.type, mime.subtype) != ("multipart", "form-data") or not boundary:
            raise malformed("multipart/form-data needs a boundary parameter in Content-Type")
        if len(boundary) > MAX_BOUNDARY:
            raise malformed(f"multipart boundary longer than {MAX_BOUNDARY} characters")
        return "multipart"
    if ctype.startswith(IMAGE_TYPES):
        return "raw"
    raise HTTPProblem(415, "unsupported_media_type",
                      f"send multipart/form-data with an 'image' file or a raw image body, not {ctype!r}")


async def read_image(request: web.Request) -> bytes:
    """The image bytes of a parse request, read under the invariant above (slot, deadline, size cap)."""
    return await read_body(request, body_kind(request))


async def read_body(request: web.Request, kind: str = "raw") -> bytes:
    """The body of a parse request (``"raw"``: all of it; ``"multipart"``: its ``image`` field), read under
    the invariant above (slot, deadline, size cap). OIP ``infer`` reads its body raw through this too."""
    if kind == "multipart":
        return (await receive(request, functools.partial(read_multipart, request, files=("image",))))["image"]
    return await receive(request, read_raw)


async def read_files(request: web.Request, files: tuple[str, ...], refusal: str) -> dict[str, bytes]:
    """The file fields ``files`` of a multipart/form-data request, each required, read under the invariant
    above (slot, deadline, size cap: the whole body, every field together). Another content type is 415 with
    ``refusal`` as the reason."""
    if request.content_type != "multipart/form-data":
        raise HTTPProblem(415, "unsupported_media_type", f"{refusal}, not {request.content_type!r}")
    body_kind(request)  # the boundary's checks
    return await receive(request, functools.partial(read_multipart, request, files=files))


async def receive(request: web.Request, read: Callable[[_CappedStream], Awaitable[T]]) -> T:
    """``read(stream)`` over the request's body under the invariant above (slot, deadline, size cap)."""
    cfg, admission = request.app[keys.CONFIG], request.app[keys.ADMISSION]
    cap = cfg.max_body_bytes
    if request.content_length is not None and request.content_length > cap:
        drop_unread(request)
        raise too_large(cap)
    if admission.full():  # the parse would be refused anyway: do not take in its body
        raise admission.overloaded()
    client = client_key(request.transport.get_extra_info("peername") if request.transport else None)
    async with admission.upload(cfg.upload_wait, cfg.body_timeout, client) as admitted:
        if not admitted:
            raise no_upload_slot(admission, client)
        stream = _CappedStream(request.content, cap)
        deadline = asyncio.timeout(None)
        try:
            async with deadline:
                stream.pace(deadline, cfg.body_timeout, cfg.min_body_rate, cfg.body_grace)
                return await read(stream)
        except HTTPProblem as exc:
            if exc.status == 413:
                drop_unread(request)
            raise
        except TimeoutError:
            if not deadline.expired():
                raise
            close_after_response(request)
            if stream.too_slow():
                raise HTTPProblem(408, "body_too_slow", f"the request body arrived slower than {cfg.min_body_rate} "
                                                        f"bytes/s after {cfg.body_grace:g} s ({stream.taken} bytes "
                                                        "received; the server's --min-body-rate)",
                                  {"Connection": "close"}) from None
            raise HTTPProblem(408, "body_timeout", f"the request body did not arrive within {cfg.body_timeout:g} s "
                                                   f"({stream.taken} bytes received)",
                              {"Connection": "close"}) from None
        except ConnectionError:
            raise malformed("the connection closed before the body was complete") from None


def no_upload_slot(admission: Admission, client: str) -> HTTPProblem:
    """The 503 for a request that got no upload slot: its client holds its share, or every slot is taken."""
    if admission.client_full(client):
        retry = max(1, math.ceil(admission.next_upload_free(client)))
        detail = (f"your address is sending {admission.receiving_from(client)} request bodies already (limit "
                  f"{admission.per_client}: --max-uploads-per-client); retry in {retry} s")
    else:
        retry = max(1, math.ceil(admission.next_upload_free()))
        detail = f"server busy: {admission.receiving} uploads being received (limit {admission.uploads}); " \
                 f"retry in {retry} s"
    return HTTPProblem(503, "overloaded", detail, {"Retry-After": str(retry)})


def drop_unread(request: web.Request) -> None:
    """A compressed body refused before its end is not read further: aiohttp's lingering close would read and
    decompress the rest (a gzip bomb: gigabytes) on the event loop; the connection is closed once the response
    is sent instead. A plain body is left to the lingering close (reading it costs no CPU, and the client
    gets to finish sending and read its 413)."""
    if (request.headers.get(hdrs.CONTENT_ENCODING) or "identity").lower() != "identity":
        request.content.feed_eof()
        close_after_response(request)


def close_after_response(request: web.Request) -> None:
    """Close the connection once the response is sent: a client too slow for the deadline is cut, not
    left to aiohttp's lingering read of the rest of its body."""
    task, transport = asyncio.current_task(), request.transport
    if task is not None and transport is not None:
        task.add_done_callback(lambda _task: transport.close())


async def read_raw(stream: _CappedStream) -> bytes:
    chunks: list[bytes] = []  # joined once at the end: a body in reception holds what arrived, no spare
    try:
        while chunk := await stream.read(_CHUNK):
            chunks.append(chunk)
    except BadHttpMessage as exc:
        log.info("raw body refused: %r", exc)
        raise malformed("the request body is malformed (bad chunked encoding, content encoding or length)") from None
    return b"".join(chunks)


async def read_multipart(request: web.Request, stream: _CappedStream,
                         files: tuple[str, ...] = ("image",)) -> dict[str, bytes]:
    """The file fields ``files`` of a multipart/form-data body (read to its closing boundary), each required
    once (a missing one is 400 ``missing_<name>``); other fields are read and dropped."""
    reader = MultipartReader(request.headers, stream)  # type: ignore[arg-type]  # what it uses of a StreamReader
    found: dict[str, bytes] = {}
    for n in range(1, MAX_PARTS + 2):
        try:
            part = await reader.next()
        except _MALFORMED as exc:
            log.info("multipart body refused at part %d: %r", n, exc)
            if isinstance(exc, BadHttpMessage):
                raise malformed(f"multipart body: the headers of part {n} are malformed") from None
            if isinstance(exc, (RuntimeError, LookupError)):
                raise malformed("multipart body: the '_charset_' field is not a charset name") from None
            if n == 1:
                raise malformed("multipart body: part 1 is malformed or does not start with the boundary declared "
                                "in Content-Type") from None
            raise malformed(f"multipart body: part {n - 1} is not followed by a boundary "
                            "(truncated or malformed body)") from None
        if part is None:
            break
        if n > MAX_PARTS:
            raise malformed(f"multipart body has more than {MAX_PARTS} parts")
        if isinstance(part, MultipartReader):
            raise malformed(f"multipart body: part {n} is itself multipart; send the file field"
                            f"{'s' if len(files) > 1 else ''} {_fields(files)} at the top level")
        try:
            with warnings.catch_warnings():  # aiohttp warns on odd dispositions; the checks below refuse them
                warnings.simplefilter("ignore", RuntimeWarning)
                name, filename = part.name, part.filename
        except ValueError:
            raise malformed(f"multipart body: part {n} has an undecodable Content-Disposition") from None
        if name is None:
            raise malformed(f"multipart body: part {n} has no Content-Disposition name")
        wanted = name in files
        if wanted:
            if name in found:
                raise malformed(f"multipart body has more than one field named {name!r}")
            if filename is None:
                raise HTTPProblem(400, f"missing_{name}", f"field {name!r} must be a file upload (a part with a "
                                                          "filename)")
            transfer = (part.headers.get(hdrs.CONTENT_TRANSFER_ENCODING) or "").lower() or None
            encoding = (part.headers.get(hdrs.CONTENT_ENCODING) or "").lower() or None
            if transfer not in _PLAIN_TRANSFER:
                raise malformed(f"multipart body: Content-Transfer-Encoding {transfer[:40]!r} on the {name!r} part; "
                                "send the file's bytes as they are")
            if encoding not in _PLAIN_ENCODING:
                raise malformed(f"multipart body: Content-Encoding {encoding[:40]!r} on the {name!r} part; "
                                "send the file's bytes as they are")
        chunks: list[bytes] = []
        try:
            while not part.at_eof():
                chunk = await part.read_chunk(_CHUNK)
                if wanted:
                    chunks.append(chunk)
        except _MALFORMED as exc:
            log.info("multipart part %d (%r) refused: %r", n, name[:40], exc)
            raise malformed(f"multipart body: part {n} (field {name[:40]!r}) ends before its closing boundary") \
                from None
        if wanted:
            found[name] = b"".join(chunks)
    for name in files:
        if name not in found:
            raise HTTPProblem(400, f"missing_{name}", f"multipart body has no field named {name!r}")
    return found


def _fields(files: tuple[str, ...]) -> str:
    return " and ".join(repr(f) for f in files)
