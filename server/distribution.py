"""Read-only bundle downloads for edge boxes (``m2fp-bundle pull``), behind their own bearer token.

``GET /bundles``
    ``{"versions": [{version, manifest_sha256, signed, bytes, channel, task, url}], "refused": [...]}``:
    the versions of this server's store that verify (manifest hashes + config), refused ones apart.
``GET /bundles/{version}.tar``
    The version packed as by ``m2fp-bundle pack`` (deterministic bytes), cached in
    ``<store>/.distribution/`` (a dot-directory, ignored by the watcher; a temporary directory when the
    store is read-only). ``ETag`` = the manifest's SHA-256 (+ the signature's digest), ``Range`` and
    ``If-Range`` are honoured, so an interrupted download resumes — and restarts from zero if the
    bundle changed meanwhile.

Both are disabled (404) unless the server runs with ``--distribution-token`` (distinct from the admin
token); a missing or wrong token is 401. Version names are checked (no path tricks) and only
installed versions that verify, and that the registry has not refused, are served.

Invariants: every file access (listing, verification, packing, opening the archive — a regular file
only, ``bundle.regular`` — and each read) runs off the event loop. ``Range`` is parsed by
:func:`parse_range`: ASCII digits only, a position of any length costs nothing (one beyond 10**18 is
past the end of any file), a single range only. A client that hangs up mid-download is logged at info
level; the access line keeps the status that was sent (200/206), never a 5xx.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from aiohttp import web

from m2fpkit.runtime.bundle import reader
from m2fpkit.runtime.bundle.archive import archive_name, pack
from m2fpkit.runtime.bundle.regular import open_regular
from m2fpkit.runtime.bundle.versions import is_version_name
from m2fpkit.runtime.errors import BundleError

from . import keys
from .auth import require_bearer
from .errors import HTTPProblem

log = logging.getLogger(__name__)
#: one ``bytes=first-last`` / ``bytes=-suffix`` range; ASCII digits only (``\d`` would take any script's digits)
_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.ASCII)
#: a position with more digits is past the end of any file: it is not converted (``int()`` of thousands of
#: digits is slow, and refused past 4300)
_MAX_DIGITS = 18
_CHUNK = 256 << 10


@dataclass
class Distribution:
    """Per-app cache: verification results by content fingerprint, one pack at a time per version."""

    verified: dict[str, tuple[str, str | None, dict]] = field(default_factory=dict)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    cache_dir: Path | None = None


STATE = web.AppKey("distribution", Distribution)


def setup(app: web.Application) -> None:
    app[STATE] = Distribution()
    app.router.add_get("/bundles", list_bundles)
    app.router.add_get("/bundles/{name}", download)


def _authorize(request: web.Request) -> None:
    require_bearer(request, request.app[keys.CONFIG].distribution_token, realm="m2fp-distribution",
                   disabled=("distribution_disabled",
                             "bundle distribution is disabled (start the server with --distribution-token)"))


def _check(bundle_dir: Path, trust: reader.TrustPolicy) -> tuple[str, str | None, dict]:
    """(fingerprint, refusal reason or None, listing entry) — blocking, run in an executor."""
    fp = reader.stat_fingerprint(bundle_dir)
    try:
        info = reader.inspect(bundle_dir, trust)
    except BundleError as exc:
        return fp, str(exc), {}
    return fp, None, {"version": info.version, "manifest_sha256": info.manifest.sha256, "signed": info.signed,
                      "etag": info.identity, "bytes": info.manifest.total_bytes, "channel": info.config.channel,
                      "task": info.config.task, "url": f"/bundles/{info.version}.tar"}


async def _verified(request: web.Request, version: str) -> tuple[str | None, dict]:
    """Refusal reason (None if fine) and listing entry of an installed version, cached by content."""
    state, registry = request.app[STATE], request.app[keys.REGISTRY]
    path = registry.store.dir / version
    loop = asyncio.get_running_loop()
    fp = await loop.run_in_executor(None, reader.stat_fingerprint, path)
    cached = state.verified.get(version)
    if cached is None or cached[0] != fp:
        cached = await loop.run_in_executor(None, _check, path, registry.options.trust)
        state.verified[version] = cached
    reason, entry = cached[1], cached[2]
    status = registry.status().get(version)
    return reason or (status.reason if status else None), entry


async def list_bundles(request: web.Request) -> web.Response:
    _authorize(request)
    store = request.app[keys.REGISTRY].store
    versions, refused = [], []
    for version in await asyncio.to_thread(store.versions):
        reason, entry = await _verified(request, version)
        if reason is None:
            versions.append({k: v for k, v in entry.items() if k != "etag"})
        else:
            refused.append({"version": version, "reason": reason})
    return web.json_response({"model": store.model, "versions": versions, "refused": refused})


def _cache_dir(state: Distribution, store_dir: Path) -> Path:
    if state.cache_dir is None:
        wanted = store_dir / ".distribution"
        try:
            wanted.mkdir(parents=True, exist_ok=True)
            probe = wanted / f".probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
            state.cache_dir = wanted
        except OSError:  # read-only store: pack into a private temporary directory instead
            state.cache_dir = Path(tempfile.mkdtemp(prefix="m2fp-distribution-"))
            log.info("bundle store is read-only; caching packed bundles in %s", state.cache_dir)
    return state.cache_dir


def _packed(bundle_dir: Path, state: Distribution, store_dir: Path) -> tuple[Path, str]:
    """The cached archive of the bundle's current content (packed now if needed) and its key — blocking."""
    cache = _cache_dir(state, store_dir)
    for _ in range(3):
        key = reader.identity_of(bundle_dir)
        path = cache / archive_name(f"{bundle_dir.name}-{key}")
        if path.is_file():
            return path, key
        pack(bundle_dir, path)
        if reader.identity_of(bundle_dir) == key:  # not replaced while packing
            for old in cache.glob(archive_name(f"{bundle_dir.name}-*")):
                if old != path:
                    old.unlink(missing_ok=True)
            return path, key
        path.unlink(missing_ok=True)
    raise BundleError(f"{bundle_dir.name} keeps changing on disk; try again")


async def download(request: web.Request) -> web.StreamResponse:
    _authorize(request)
    name = request.match_info["name"]
    version = name[:-4] if name.endswith(".tar") else ""
    if not is_version_name(version):
        raise HTTPProblem(404, "not_found", f"{name!r} is not <version>.tar (e.g. v1.2.tar)")
    registry, state = request.app[keys.REGISTRY], request.app[STATE]
    if version not in await asyncio.to_thread(registry.store.versions):
        raise HTTPProblem(404, "unknown_version", f"no version {version} on this server")
    reason, _ = await _verified(request, version)
    if reason is not None:
        raise HTTPProblem(404, "version_refused", f"{version} is not served: it does not verify ({reason})")
    lock = state.locks.setdefault(version, asyncio.Lock())
    loop = asyncio.get_running_loop()
    async with lock:
        try:
            path, key = await loop.run_in_executor(None, _packed, registry.store.dir / version, state,
                                                   registry.store.dir)
        except (BundleError, OSError) as exc:
            raise HTTPProblem(503, "pack_failed", f"{version} could not be packed: {exc}",
                              headers={"Retry-After": "5"}) from None
    return await _send(request, path, key, version)


class Unsatisfiable(ValueError):
    """A range that starts at or after the end of the file (416)."""


def _position(digits: str) -> int:
    """A position of a ``Range`` header; one of more than :data:`_MAX_DIGITS` digits stands as 10**18."""
    return int(digits) if len(digits) <= _MAX_DIGITS else 10 ** _MAX_DIGITS


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) of the single satisfiable range ``header`` asks of a ``size``-byte file, None to
    send everything (malformed, several ranges, last before first: ignored, RFC 9110 § 14.2); Unsatisfiable
    when it starts at or after the end."""
    m = _RANGE.fullmatch(header.strip(" \t"))
    if not m or (not m[1] and not m[2]):
        return None
    if m[1]:
        start = _position(m[1])
        end = size - 1
        if m[2]:
            last = _position(m[2])
            if last < start:
                return None
            end = min(last, end)
    else:
        start, end = max(0, size - _position(m[2])), size - 1
    if start >= size:
        raise Unsatisfiable(f"range starts at {start if len(m[1]) <= _MAX_DIGITS else 'a position past 10^18'}, "
                            f"the file has {size} bytes")
    return start, end


def _byte_range(request: web.Request, size: int, etag: str) -> tuple[int, int] | None:
    """The range of the request to honour (see :func:`parse_range`); 416 for an unsatisfiable one."""
    header = request.headers.get("Range")
    if not header:
        return None
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range != etag:
        return None  # the client's partial copy is of other content: send the whole new file
    try:
        return parse_range(header, size)
    except Unsatisfiable as exc:
        raise HTTPProblem(416, "range_not_satisfiable", str(exc),
                          headers={"Content-Range": f"bytes */{size}"}) from None


def _open(path: Path) -> tuple[BinaryIO, int]:
    """The cached archive opened for reading (a regular file only) and its size — blocking."""
    f = os.fdopen(open_regular(path, path.name, follow_links=False), "rb")
    return f, os.fstat(f.fileno()).st_size


async def _send(request: web.Request, path: Path, key: str, version: str) -> web.StreamResponse:
    etag = f'"{key}"'
    loop = asyncio.get_running_loop()
    f, size = await loop.run_in_executor(None, _open, path)  # an open handle survives a concurrent repack
    sent = 0
    try:
        rng = _byte_range(request, size, etag)
        start, end = rng if rng else (0, size - 1)
        response = web.StreamResponse(status=206 if rng else 200, headers={
            "Content-Type": "application/x-tar", "ETag": etag, "Accept-Ranges": "bytes",
            "X-Manifest-SHA256": key[:64], "X-Model-Version": version,
            "Content-Disposition": f'attachment; filename="{archive_name(version)}"',
            **({"Content-Range": f"bytes {start}-{end}/{size}"} if rng else {})})
        response.content_length = end - start + 1
        try:
            await response.prepare(request)
            if request.method == "HEAD":
                return response
            await loop.run_in_executor(None, f.seek, start)
            left = end - start + 1
            while left > 0:
                chunk = await loop.run_in_executor(None, f.read, min(_CHUNK, left))
                if not chunk:
                    break
                await response.write(chunk)
                sent += len(chunk)
                left -= len(chunk)
            await response.write_eof()
        except ConnectionResetError:  # the client hung up: its choice, not a failure of the server
            log.info("%s: the client hung up after %d of %d bytes of %s", request.get(keys.REQUEST_ID, "-"), sent,
                     end - start + 1, archive_name(version))
        return response
    finally:
        f.close()
