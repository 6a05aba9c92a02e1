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
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from m2fpkit.runtime.bundle import reader
from m2fpkit.runtime.bundle.archive import archive_name, pack
from m2fpkit.runtime.errors import BundleError
from m2fpkit.runtime.versions import is_version_name

from . import keys
from .auth import require_bearer
from .errors import HTTPProblem

log = logging.getLogger(__name__)
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
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
    for version in store.versions():
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


def _packed(bundle_dir: Path, cache: Path) -> tuple[Path, str]:
    """The cached archive of the bundle's current content (packed now if needed) and its key."""
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
    if version not in registry.store.versions():
        raise HTTPProblem(404, "unknown_version", f"no version {version} on this server")
    reason, _ = await _verified(request, version)
    if reason is not None:
        raise HTTPProblem(404, "version_refused", f"{version} is not served: it does not verify ({reason})")
    lock = state.locks.setdefault(version, asyncio.Lock())
    loop = asyncio.get_running_loop()
    async with lock:
        try:
            path, key = await loop.run_in_executor(None, _packed, registry.store.dir / version,
                                                   _cache_dir(state, registry.store.dir))
        except (BundleError, OSError) as exc:
            raise HTTPProblem(503, "pack_failed", f"{version} could not be packed: {exc}",
                              headers={"Retry-After": "5"}) from None
    return await _send(request, path, key, version)


def _byte_range(request: web.Request, size: int, etag: str) -> tuple[int, int] | None:
    """(start, end inclusive) of a satisfiable single range to honour, None to send everything.

    Raises 416 for a range past the end. Multiple ranges and malformed headers are ignored (RFC 9110).
    """
    header = request.headers.get("Range")
    if not header:
        return None
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range != etag:
        return None  # the client's partial copy is of other content: send the whole new file
    m = _RANGE.match(header.strip())
    if not m or (not m[1] and not m[2]):
        return None
    if m[1]:
        start = int(m[1])
        end = min(int(m[2]), size - 1) if m[2] else size - 1
        if m[2] and int(m[2]) < start:
            return None
    else:
        start, end = max(0, size - int(m[2])), size - 1
    if start >= size:
        raise HTTPProblem(416, "range_not_satisfiable", f"range starts at {start}, the file has {size} bytes",
                          headers={"Content-Range": f"bytes */{size}"})
    return start, end


async def _send(request: web.Request, path: Path, key: str, version: str) -> web.StreamResponse:
    etag = f'"{key}"'
    f = open(path, "rb")  # noqa: SIM115 - closed below; an open handle survives a concurrent repack
    try:
        size = os.fstat(f.fileno()).st_size
        rng = _byte_range(request, size, etag)
        start, end = rng if rng else (0, size - 1)
        response = web.StreamResponse(status=206 if rng else 200, headers={
            "Content-Type": "application/x-tar", "ETag": etag, "Accept-Ranges": "bytes",
            "X-Manifest-SHA256": key[:64], "X-Model-Version": version,
            "Content-Disposition": f'attachment; filename="{archive_name(version)}"',
            **({"Content-Range": f"bytes {start}-{end}/{size}"} if rng else {})})
        response.content_length = end - start + 1
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        loop = asyncio.get_running_loop()
        f.seek(start)
        left = end - start + 1
        while left > 0:
            chunk = await loop.run_in_executor(None, f.read, min(_CHUNK, left))
            if not chunk:
                break
            await response.write(chunk)
            left -= len(chunk)
        await response.write_eof()
        return response
    finally:
        f.close()
