"""Fetch a packed bundle from a central server (``m2fp-serve --distribution-token``) and install it.

``GET <url>/bundles/<version>.tar`` with ``Authorization: Bearer <token>``. The download goes to
``<root>/m2fp/.downloads/m2fp-<version>.tar.part`` (a dot-directory: invisible to version scans),
with the server's ETag beside it in ``….part.json``. An interrupted download keeps the part file;
running the same command again asks for the rest with ``Range: bytes=<n>-`` and ``If-Range:
<etag>``, so a server whose bundle changed meanwhile answers with the whole new file (200) instead of
a mismatched tail. Only a complete file is verified and installed (see :func:`..install.install`),
and only if it holds the version asked for; a file that fails verification is deleted, so the next
attempt starts clean. One pull per version at a time (a lock file), so two pulls never write the
same part file.

Limits, each a :class:`TransferError`: redirects are followed only within the origin (scheme, host,
port) of the URL, so the token never reaches another server; the file may not exceed ``max_bytes``
(by default the largest archive a bundle can pack to) nor the size the server announced
(``Content-Length``, ``Content-Range``) — either refusal deletes the part file, as does a failed
local write (a full disk); the whole download must finish within ``deadline`` seconds (checked
between socket reads, each of which waits at most ``timeout``), else it stops and can be resumed.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..bundle import jsonfile
from ..bundle.archive import MAX_ARCHIVE_BYTES, archive_name, write_all
from ..bundle.signature import NO_KEYS, TrustPolicy
from ..bundle.store import MODEL, BundleStore
from ..bundle.versions import is_version_name
from ..errors import ArchiveError, MalformedFile, TransferError, Unauthorized, VerificationFailed, VersionExists
from .install import Installed, install

_CHUNK = 1 << 20
#: seconds for a whole download (resumable: running the command again continues it)
DEFAULT_DEADLINE = 3600.0
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


@dataclass(frozen=True)
class Pulled:
    installed: Installed
    url: str
    bytes: int
    #: bytes already on disk from an earlier, interrupted attempt (0: downloaded from the start)
    resumed_from: int


def bundle_url(base: str, version: str) -> str:
    """``http://host:port`` (+ optional path prefix) → ``…/bundles/<version>.tar``; a ``.tar`` URL is kept."""
    if urllib.parse.urlsplit(base).scheme not in ("http", "https"):
        raise TransferError(f"{base}: expected an http:// or https:// URL")
    if base.endswith(".tar"):
        return base
    return f"{base.rstrip('/')}/bundles/{urllib.parse.quote(version)}.tar"


def read_chunk(response, size: int) -> bytes:
    """One read from the HTTP response (the one place the download reads; tests patch it)."""
    return response.read(size)


class _Expired(Exception):
    """The overall deadline passed while reading."""


class _Timed:
    """The response read in pieces of one socket read each, the deadline checked between pieces.

    ``read(size)`` returns ``size`` bytes, fewer only at the end of the body, or raises :class:`_Expired`.
    """

    def __init__(self, response: http.client.HTTPResponse, deadline_at: float) -> None:
        self.response, self.deadline_at = response, deadline_at

    def read(self, size: int) -> bytes:
        parts, got = [], 0
        while got < size:
            if time.monotonic() >= self.deadline_at:
                raise _Expired()
            piece = self.response.read1(size - got)
            if not piece:
                break
            parts.append(piece)
            got += len(piece)
        return b"".join(parts)


def _origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) with the scheme's default port filled in."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = -1
    return scheme, parts.hostname or "", port or {"http": 80, "https": 443}.get(scheme, -1)


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects only within the request's origin: the bearer token never leaves it."""

    def redirect_request(self, req: urllib.request.Request, fp, code: int, msg: str, headers,
                         newurl: str) -> urllib.request.Request | None:
        if _origin(newurl) != _origin(req.full_url):
            fp.close()
            scheme, host, port = _origin(newurl)
            raise TransferError(f"{req.full_url}: HTTP {code} redirects to {scheme}://{host}:{port}, another "
                                f"origin; refused (the token is only sent to the server named in the URL)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


@contextlib.contextmanager
def _exclusive(lock_path: Path, version: str) -> Iterator[None]:
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TransferError(f"another pull of {version} is in progress") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def pull(url: str, version: str, bundles: str | os.PathLike, *, token: str | None = None,
         trust: TrustPolicy = NO_KEYS, force: bool = False, timeout: float = 60.0,
         deadline: float = DEFAULT_DEADLINE, max_bytes: int = MAX_ARCHIVE_BYTES, model: str = MODEL) -> Pulled:
    """Download ``version`` from ``url`` (resuming an interrupted download), verify and install it.

    ``timeout`` bounds each wait on the socket, ``deadline`` the whole download (seconds), ``max_bytes``
    the archive's size; the archive must hold ``version`` itself.
    """
    if not is_version_name(version):
        raise TransferError(f"{version!r} is not a version name like v1.2")
    store = BundleStore(bundles, model)
    if store.path(version).exists() and not force:
        raise VersionExists(f"{model}/{version} is already installed; versions are immutable (use --force to replace)")
    target = bundle_url(url, version)
    downloads = store.dir / ".downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    part = downloads / f"{archive_name(version)}.part"
    meta_path = downloads / f"{archive_name(version)}.part.json"
    with _exclusive(downloads / f"{archive_name(version)}.lock", version):
        limits = _Limits(timeout, time.monotonic() + deadline, deadline, max_bytes)
        etag, resumed_from, total = _download(target, part, meta_path, token, limits)
        try:
            installed = install(part, bundles, force=force, trust=trust, model=model,
                                expect_identity=_identity(etag), expect_version=version)
        except (VerificationFailed, ArchiveError):
            _discard(part, meta_path)  # a bad file must not be resumed from
            raise
        _discard(part, meta_path)
    return Pulled(installed, target, total, resumed_from)


@dataclass(frozen=True)
class _Limits:
    """One download's bounds: per socket wait, overall deadline (monotonic clock) and size."""

    timeout: float
    deadline_at: float
    deadline: float
    max_bytes: int

    def remaining(self, url: str, got: int | None = None) -> float:
        left = self.deadline_at - time.monotonic()
        if left <= 0:
            raise self.expired(url, got)
        return left

    def expired(self, url: str, got: int | None) -> TransferError:
        so_far = f" ({got} bytes on disk)" if got is not None else ""
        return TransferError(f"{url}: download not finished within the {self.deadline:g}-second deadline{so_far}; "
                             "run the same command again to resume")


def _discard(part: Path, meta_path: Path) -> None:
    part.unlink(missing_ok=True)
    meta_path.unlink(missing_ok=True)


def _identity(etag: str | None) -> str | None:
    """The distribution endpoint's ETag is the bundle's content key (``bundle.reader.identity``) in quotes."""
    if etag and re.fullmatch(r'"[0-9a-f]{64}(-[0-9a-f]{16})?"', etag):
        return etag.strip('"')
    return None


def _download(url: str, part: Path, meta_path: Path, token: str | None,
              limits: _Limits) -> tuple[str | None, int, int]:
    """Complete ``part``; returns (etag, bytes that were already there, total size)."""
    opener = urllib.request.build_opener(_SameOriginRedirects())
    meta = _read_meta(meta_path)
    have = part.stat().st_size if part.exists() else 0
    if have and (meta.get("url") != url or have > limits.max_bytes):
        have = 0  # a part from another server or version path, or over the limit: start over
    for attempt in range(2):
        headers = {"Accept": "application/x-tar"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if have:
            headers["Range"] = f"bytes={have}-"
            if meta.get("etag"):
                headers["If-Range"] = meta["etag"]
        request = urllib.request.Request(url, headers=headers)
        try:
            response = opener.open(request, timeout=min(limits.timeout, limits.remaining(url)))
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have and attempt == 0:  # the part is longer than the file: start over
                part.unlink(missing_ok=True)
                have = 0
                continue
            raise _http_error(exc, url) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise TransferError(f"{url}: cannot connect ({reason})") from None
        with response:
            etag = response.headers.get("ETag")
            if response.status == 206:
                m = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
                if (not m or int(m[1]) != have or int(m[2]) < int(m[1]) or int(m[2]) >= int(m[3])
                        or (meta.get("etag") and etag != meta.get("etag"))):
                    part.unlink(missing_ok=True)  # not the tail we asked for: start over
                    have = 0
                    continue
                total, start, end, mode = int(m[3]), have, int(m[2]) + 1, "ab"
                bound = f"the range the server announced ({m[0]})"
            else:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else -1
                start, end, mode = 0, total if total >= 0 else limits.max_bytes, "wb"
                bound = (f"the Content-Length the server announced ({total})" if total >= 0
                         else f"the {limits.max_bytes}-byte limit for a bundle archive")
            if total > limits.max_bytes:
                _discard(part, meta_path)
                raise TransferError(f"{url}: the server announces {total} bytes, more than the {limits.max_bytes}-"
                                    "byte limit for a bundle archive; refused")
            _write_meta(meta_path, {"url": url, "etag": etag, "total": total})
            _copy(response, part, meta_path, mode, (start, end, bound), total, url, limits)
            return etag, start, part.stat().st_size
    raise TransferError(f"{url}: the server keeps answering with a range that does not fit the partial download")


def _copy(response, part: Path, meta_path: Path, mode: str, span: tuple[int, int, str], total: int, url: str,
          limits: _Limits) -> None:
    """Write the body into ``part`` from byte ``start``; it must stop at byte ``end`` (``bound`` says why)
    and by the deadline.

    A body running past ``end`` (past what the server announced, or over the limit) or a failed write
    deletes the part file; an interruption or the deadline keeps it for resuming.
    """
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "ab" else os.O_TRUNC), 0o644)
    start, end, bound = span
    got, discard = start, False
    body = _Timed(response, limits.deadline_at)
    try:
        while True:
            try:
                chunk = read_chunk(body, min(_CHUNK, end - got + 1))
            except _Expired:
                raise limits.expired(url, got) from None
            except (OSError, ValueError, http.client.HTTPException) as exc:  # reset, timeout, IncompleteRead
                raise TransferError(f"{url}: download interrupted after {got} of {total if total >= 0 else '?'} "
                                    f"bytes ({exc}); run the same command again to resume") from None
            if not chunk:
                break
            if got + len(chunk) > end:
                discard = True
                raise TransferError(f"{url}: the body runs past byte {end}, {bound}; refused, the partial "
                                    "download is deleted")
            try:
                write_all(fd, chunk)
            except OSError:
                discard = True  # e.g. a full disk: free what was written, the next attempt starts clean
                raise
            got += len(chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
        if discard:
            _discard(part, meta_path)
    if total >= 0 and got != total:
        raise TransferError(f"{url}: download interrupted after {got} of {total} bytes; run the same command "
                            f"again to resume")


def _http_error(exc: urllib.error.HTTPError, url: str) -> TransferError:
    try:
        body = jsonfile.loads(exc.read(64 << 10) or b"{}", "error body", max_bytes=64 << 10)
        detail = body.get("detail", "") if isinstance(body, dict) else ""
    except (MalformedFile, OSError):
        detail = ""
    detail = f": {' '.join(detail.split())[:200]}" if isinstance(detail, str) and detail else ""
    if exc.code == 401:
        return Unauthorized(f"{url}: 401 unauthorized — missing or wrong token{detail}")
    if exc.code == 404:
        return TransferError(f"{url}: 404 not found — no such version on the server, or distribution is disabled "
                             f"there{detail}")
    return TransferError(f"{url}: HTTP {exc.code} {exc.reason}{detail}")


def _read_meta(path: Path) -> dict:
    try:
        raw = jsonfile.read(path, path.name, max_bytes=64 << 10)
    except (OSError, MalformedFile):
        return {}
    return raw if isinstance(raw, dict) else {}


def _write_meta(path: Path, meta: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(jsonfile.dumps(meta))
    os.replace(tmp, path)
