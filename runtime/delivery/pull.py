"""Fetch a packed bundle from a central server (``m2fp-serve --distribution-token``) and install it.

``GET <url>/bundles/<version>.tar`` with ``Authorization: Bearer <token>``. The download goes to
``<root>/m2fp/.downloads/m2fp-<version>.tar.part`` (a dot-directory: invisible to version scans),
with the server's ETag beside it in ``….part.json``. An interrupted download keeps the part file;
running the same command again asks for the rest with ``Range: bytes=<n>-`` and ``If-Range:
<etag>``, so a server whose bundle changed meanwhile answers with the whole new file (200) instead of
a mismatched tail. Only a complete file is verified and installed (see :func:`..install.install`); a
file that fails verification is deleted, so the next attempt starts clean. One pull per version at
a time (a lock file), so two pulls never write the same part file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..bundle.archive import archive_name, write_all
from ..bundle.signature import NO_KEYS, TrustPolicy
from ..bundle.store import MODEL, BundleStore
from ..errors import ArchiveError, TransferError, Unauthorized, VerificationFailed, VersionExists
from ..versions import is_version_name
from .install import Installed, install

_CHUNK = 1 << 20
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
         model: str = MODEL) -> Pulled:
    """Download ``version`` from ``url`` (resuming an interrupted download), verify and install it."""
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
        etag, resumed_from, total = _download(target, part, meta_path, token, timeout)
        try:
            installed = install(part, bundles, force=force, trust=trust, model=model,
                                expect_identity=_identity(etag))
        except (VerificationFailed, ArchiveError):
            part.unlink(missing_ok=True)  # a bad file must not be resumed from
            meta_path.unlink(missing_ok=True)
            raise
        part.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
    return Pulled(installed, target, total, resumed_from)


def _identity(etag: str | None) -> str | None:
    """The distribution endpoint's ETag is the bundle's content key (``bundle.reader.identity``) in quotes."""
    if etag and re.fullmatch(r'"[0-9a-f]{64}(-[0-9a-f]{16})?"', etag):
        return etag.strip('"')
    return None


def _download(url: str, part: Path, meta_path: Path, token: str | None, timeout: float) -> tuple[str | None, int, int]:
    """Complete ``part``; returns (etag, bytes that were already there, total size)."""
    meta = _read_meta(meta_path)
    have = part.stat().st_size if part.exists() else 0
    if have and meta.get("url") != url:
        have = 0  # a part from another server or version path: start over
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
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have and attempt == 0:  # the part is longer than the file: start over
                part.unlink(missing_ok=True)
                have = 0
                continue
            raise _http_error(exc, url) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TransferError(f"{url}: cannot connect ({reason})") from None
        with response:
            etag = response.headers.get("ETag")
            if response.status == 206:
                m = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
                if not m or int(m[1]) != have or (meta.get("etag") and etag != meta.get("etag")):
                    part.unlink(missing_ok=True)  # not the tail we asked for: start over
                    have = 0
                    continue
                total, start, mode = int(m[3]), have, "ab"
            else:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else -1
                start, mode = 0, "wb"
            _write_meta(meta_path, {"url": url, "etag": etag, "total": total})
            resumed = start
            _copy(response, part, mode, start, total, url)
            return etag, resumed, part.stat().st_size
    raise TransferError(f"{url}: the server keeps answering with a range that does not fit the partial download")


def _copy(response, part: Path, mode: str, start: int, total: int, url: str) -> None:
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "ab" else os.O_TRUNC), 0o644)
    got = start
    try:
        while True:
            try:
                chunk = read_chunk(response, _CHUNK)
            except (OSError, ValueError) as exc:  # connection reset, timeout, http.client.IncompleteRead
                raise TransferError(f"{url}: download interrupted after {got} of {total if total >= 0 else '?'} "
                                    f"bytes ({exc}); run the same command again to resume") from None
            if not chunk:
                break
            write_all(fd, chunk)
            got += len(chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    if total >= 0 and got != total:
        raise TransferError(f"{url}: download interrupted after {got} of {total} bytes; run the same command "
                            f"again to resume")


def _http_error(exc: urllib.error.HTTPError, url: str) -> TransferError:
    try:
        detail = json.loads(exc.read() or b"{}").get("detail", "")
    except (ValueError, AttributeError, OSError):
        detail = ""
    detail = f": {detail}" if detail else ""
    if exc.code == 401:
        return Unauthorized(f"{url}: 401 unauthorized — missing or wrong token{detail}")
    if exc.code == 404:
        return TransferError(f"{url}: 404 not found — no such version on the server, or distribution is disabled "
                             f"there{detail}")
    return TransferError(f"{url}: HTTP {exc.code} {exc.reason}{detail}")


def _read_meta(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _write_meta(path: Path, meta: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, sort_keys=True))
    os.replace(tmp, path)
