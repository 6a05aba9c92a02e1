"""``manifest.json``: size and SHA-256 of every file of a bundle — the root of its identity and trust.

The manifest lists every file except itself and its signature (:data:`SIDE_FILES`); the signature
covers the manifest's exact bytes, so one signature vouches for the whole bundle. Parsing is pure (bytes
in, :class:`Manifest` out); checking files against it is :mod:`.reader`'s job.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import IntegrityError, MalformedFile
from . import jsonfile
from .regular import read_regular

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
#: Files that describe the manifest rather than being listed in it (and so can never be a model file).
SIDE_FILES = frozenset({MANIFEST, SIGNATURE})
MAX_MANIFEST_BYTES = 16 << 20
MAX_FILES = 10_000
MAX_PATH_PARTS = 8
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    files: dict[str, FileEntry]
    #: the exact bytes parsed: what a signature covers and what the bundle's identity hashes
    raw: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files.values())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_rel_path(rel: object, where: str) -> str:
    """A relative POSIX path inside the bundle: no absolute, '..', '.', empty or hidden parts, no side file."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel or rel.startswith("/"):
        raise MalformedFile(where, f"{jsonfile.brief(rel)} is not a relative path inside the bundle")
    parts = rel.split("/")
    if len(parts) > MAX_PATH_PARTS or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise MalformedFile(where, f"{jsonfile.brief(rel)} is not a plain path inside the bundle "
                                   f"(at most {MAX_PATH_PARTS} parts, no empty, '.', '..' or hidden parts)")
    if rel in SIDE_FILES:
        raise MalformedFile(where, f"{rel} describes the manifest and cannot be listed or named as a bundle file")
    return rel


def parse(raw: bytes) -> Manifest:
    """Parse manifest bytes; MalformedFile unless ``{"algorithm": "sha256", "files": {path: {size, sha256}}}``."""
    data = jsonfile.loads(raw, MANIFEST, max_bytes=MAX_MANIFEST_BYTES)
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("algorithm") != "sha256" or not isinstance(files, dict) or not files:
        raise MalformedFile(MANIFEST, "expected {\"algorithm\": \"sha256\", \"files\": {path: {size, sha256}}}")
    if len(files) > MAX_FILES:
        raise MalformedFile(MANIFEST, f"{len(files)} files, more than {MAX_FILES}")
    out: dict[str, FileEntry] = {}
    for rel, entry in files.items():
        check_rel_path(rel, f"{MANIFEST} → files")
        size = entry.get("size") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if (not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(digest, str)
                or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)):
            raise MalformedFile(f"{MANIFEST} → files → {rel}", "expected a size ≥ 0 and 64 lower-case hex digits")
        out[rel] = FileEntry(size, digest)
    return Manifest(out, bytes(raw))


def read(bundle_dir: Path) -> Manifest:
    """The bundle's manifest; IntegrityError when it is missing."""
    try:
        raw = read_regular(Path(bundle_dir) / MANIFEST, MANIFEST, max_bytes=MAX_MANIFEST_BYTES, follow_links=False)
    except FileNotFoundError:
        raise IntegrityError(f"{MANIFEST} is missing") from None
    except OSError as exc:
        raise IntegrityError(f"{MANIFEST} is unreadable ({exc.strerror or exc})") from None
    return parse(raw)


def build(bundle_dir: Path) -> dict[str, Any]:
    """Size and SHA-256 of every regular file under ``bundle_dir`` except the side files."""
    files = {}
    for p in sorted(Path(bundle_dir).rglob("*")):
        rel = p.relative_to(bundle_dir).as_posix()
        if p.is_symlink():
            raise IntegrityError(f"{rel}: symbolic links are not allowed in a bundle")
        if p.is_file() and rel not in SIDE_FILES:
            files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return {"algorithm": "sha256", "files": files}
