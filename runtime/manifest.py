"""Per-file SHA-256 manifest of a bundle (``manifest.json``), written at export, checked before load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import BundleError

MANIFEST = "manifest.json"
#: Files that describe the manifest rather than being listed in it.
SIDE_FILES = frozenset({MANIFEST, "manifest.sig"})
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(bundle_dir: Path) -> dict:
    """Size and SHA-256 of every regular file under ``bundle_dir`` except the manifest itself."""
    files = {}
    for p in sorted(bundle_dir.rglob("*")):
        if p.is_symlink():
            raise BundleError(f"{p.relative_to(bundle_dir)}: symbolic links are not allowed in a bundle")
        if p.is_file() and p.relative_to(bundle_dir).as_posix() not in SIDE_FILES:
            rel = p.relative_to(bundle_dir).as_posix()
            files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return {"algorithm": "sha256", "files": files}


def write_manifest(bundle_dir: Path) -> dict:
    manifest = build_manifest(bundle_dir)
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(bundle_dir: Path) -> dict:
    path = bundle_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{MANIFEST} is missing") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{MANIFEST} is unreadable: {exc}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("algorithm") != "sha256" or not isinstance(files, dict) or not files:
        raise BundleError(f"{MANIFEST}: expected {{'algorithm': 'sha256', 'files': {{...}}}}")
    for rel, entry in files.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("size"), int):
            raise BundleError(f"{MANIFEST} → files → {rel}: expected size and sha256")
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise BundleError(f"{MANIFEST} → files → {rel}: path leaves the bundle")
    return manifest


def verify_manifest(bundle_dir: Path) -> dict:
    """Check every listed file's size and hash and that no unlisted file is present; return the manifest."""
    manifest = read_manifest(bundle_dir)
    listed = manifest["files"]
    for rel, entry in listed.items():
        p = bundle_dir / rel
        if not p.is_file() or p.is_symlink():
            raise BundleError(f"{rel}: listed in {MANIFEST} but missing")
        size = p.stat().st_size
        if size != entry["size"]:
            raise BundleError(f"{rel}: size {size} bytes, manifest says {entry['size']} (truncated or replaced?)")
        digest = sha256_file(p)
        if digest != entry["sha256"]:
            raise BundleError(f"{rel}: SHA-256 {digest[:12]}… does not match the manifest's {entry['sha256'][:12]}…")
    extra = [p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*")
             if p.is_file() and p.relative_to(bundle_dir).as_posix() not in SIDE_FILES | set(listed)]
    if extra:
        raise BundleError(f"files not in {MANIFEST}: {', '.join(sorted(extra))}")
    return manifest
