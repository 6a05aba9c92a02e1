"""One version ⇄ one tar file: deterministic packing, and unpacking that trusts nothing.

Layout of ``m2fp-<version>.tar`` (plain ustar/pax, uncompressed — ONNX weights do not compress)::

    <version>/manifest.json     first, so a reader learns the file list before anything else
    <version>/manifest.sig      only if the bundle is signed
    <version>/<file>            every file manifest.json lists, in its (sorted) order

Members are regular files with owner 0:0, mode 0644 and mtime 0: the same bundle always packs to
the same bytes. Packing hashes each file while copying it and fails if it differs from the manifest,
so a packed archive is a verified one.

:func:`unpack` reads all member headers first and refuses, before writing any file: absolute names,
``..`` or empty path parts, members outside ``<version>/``, anything but regular files and
directories (symlinks, hard links, devices, FIFOs, sparse files), duplicates, files the manifest
does not list, and files whose size differs from the manifest's (an oversize member is refused
from its header, not after filling the disk). Files are created with ``O_EXCL | O_NOFOLLOW`` under
a fresh directory, each write is counted against the declared size, and each file is fsynced.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import ArchiveError, BundleError, MalformedFile
from ..versions import is_version_name
from . import manifest as manifest_mod
from .atomic import fsync_dir, write_all  # write_all: the one place unpacking writes (tests patch it)
from .manifest import MANIFEST, SIDE_FILES, SIGNATURE
from .store import MODEL

_CHUNK = 1 << 20
#: limits on what an archive may declare (the manifest's own sizes are exact limits for the rest)
MAX_MANIFEST_BYTES = manifest_mod.MAX_MANIFEST_BYTES
MAX_SIGNATURE_BYTES = 64 << 10
MAX_MEMBERS = 10_000
MAX_TOTAL_BYTES = 64 << 30


def archive_name(version: str) -> str:
    return f"{MODEL}-{version}.tar"


@dataclass(frozen=True)
class Packed:
    path: Path
    version: str
    files: int
    bytes: int


# ------------------------------------------------------------------------------------ file helpers
class _HashingReader(io.RawIOBase):
    """File wrapper hashing what tarfile reads from it."""

    def __init__(self, f) -> None:
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.h.update(data)
        self.n += len(data)
        return data


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.type = size, 0o644, 0, tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


# -------------------------------------------------------------------------------------------- pack
def pack(bundle_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Packed:
    """Write ``bundle_dir`` as one tar (default ``./m2fp-<version>.tar``; a directory means inside it).

    The archive appears under its final name only when complete (temporary file + rename).
    """
    src = Path(bundle_dir)
    version = src.name
    if not is_version_name(version):
        raise BundleError(f"{src}: the directory name {version!r} is not a version name like v1.2")
    manifest = manifest_mod.read(src)
    target = Path(out) if out is not None else Path(archive_name(version))
    if target.is_dir():
        target = target / archive_name(version)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    total = 0
    try:
        with open(tmp, "xb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for side in (MANIFEST, SIGNATURE):
                p = src / side
                if p.is_file() and not p.is_symlink():
                    data = p.read_bytes()
                    tf.addfile(_tarinfo(f"{version}/{side}", len(data)), io.BytesIO(data))
            for rel, entry in sorted(manifest.files.items()):
                p = src / rel
                if p.is_symlink() or not p.is_file():
                    raise BundleError(f"{rel}: listed in {MANIFEST} but missing")
                with open(p, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    if size != entry.size:
                        raise BundleError(f"{rel}: size {size} bytes, manifest says {entry.size}")
                    reader = _HashingReader(f)
                    try:
                        tf.addfile(_tarinfo(f"{version}/{rel}", size), reader)
                    except OSError as exc:  # tarfile raises OSError("unexpected end of data") on a shrinking file
                        raise BundleError(f"{rel}: changed while packing ({exc})") from None
                if reader.h.hexdigest() != entry.sha256:
                    raise BundleError(f"{rel}: SHA-256 does not match {MANIFEST}; not packed")
                total += size
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Packed(target, version, len(manifest.files), total)


# ------------------------------------------------------------------------------------------ unpack
def _check_path(name: str, what: str) -> list[str]:
    """The parts of a relative POSIX path; refuses absolute paths, '..', '.', empty parts, NUL, '\\'."""
    if not name or "\x00" in name or "\\" in name or name.startswith("/"):
        raise ArchiveError(f"unsafe {what} {name!r}: absolute or malformed")
    parts = name.rstrip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ArchiveError(f"unsafe {what} {name!r}: empty, '.' or '..' path parts")
    return parts


def _split(name: str) -> tuple[str, str]:
    """``<version>/<rel>`` → (version, rel); refuses every path trick."""
    parts = _check_path(name, "member name")
    if not is_version_name(parts[0]):
        raise ArchiveError(f"member {name!r} is not under a <version>/ directory")
    return parts[0], "/".join(parts[1:])


def _kind(m: tarfile.TarInfo) -> str:
    if m.issym():
        return f"symbolic link → {m.linkname}"
    if m.islnk():
        return f"hard link → {m.linkname}"
    if m.ischr() or m.isblk():
        return "device"
    if m.isfifo():
        return "FIFO"
    if m.issparse():
        return "sparse file"
    return f"member type {m.type.decode(errors='replace')!r}"


def peek_version(archive: str | os.PathLike) -> str:
    """The version an archive holds (from its first member), without reading the rest."""
    try:
        with tarfile.open(archive, mode="r:") as tf:
            first = tf.next()
    except FileNotFoundError:
        raise ArchiveError(f"{archive}: no such file") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveError(f"{archive}: not a readable tar archive ({exc})") from None
    if first is None:
        raise ArchiveError(f"{archive}: empty archive")
    return _split(first.name)[0]


def unpack(archive: str | os.PathLike, dest_parent: str | os.PathLike, *,
           max_total_bytes: int = MAX_TOTAL_BYTES) -> Path:
    """Unpack a bundle archive into ``dest_parent/<version>/`` (which must not exist); return that path.

    On any error the partially written ``<version>/`` is removed and the error raised.
    """
    archive = Path(archive)
    try:
        tf = tarfile.open(archive, mode="r:")
    except FileNotFoundError:
        raise ArchiveError(f"{archive}: no such file") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveError(f"{archive}: not a readable tar archive ({exc})") from None
    with tf:
        members = _plan(tf, archive, max_total_bytes)
        version = members[0][0]
        dest = Path(dest_parent) / version
        dest.mkdir()
        try:
            _check_space(dest, sum(m.size for _, _, m in members))
            for _, rel, m in members:
                _extract(tf, m, dest, rel)
            for d in sorted({(dest / rel).parent for _, rel, _ in members}, key=lambda p: -len(p.parts)):
                fsync_dir(d)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
    return dest


def _plan(tf: tarfile.TarFile, archive: Path, max_total: int) -> list[tuple[str, str, tarfile.TarInfo]]:
    """Every regular member as (version, rel, info), manifest first, after checking all headers."""
    try:
        infos = []
        for m in tf:
            infos.append(m)
            if len(infos) > MAX_MEMBERS:
                raise ArchiveError(f"{archive}: more than {MAX_MEMBERS} members")
    except (tarfile.TarError, EOFError) as exc:
        raise ArchiveError(f"{archive}: truncated or corrupt tar ({exc})") from None
    if not infos:
        raise ArchiveError(f"{archive}: empty archive")
    files: dict[str, tuple[str, str, tarfile.TarInfo]] = {}
    first = _split(infos[0].name)[0]
    for m in infos:
        version, rel = _split(m.name)
        if version != first:
            raise ArchiveError(f"{archive}: members of several versions ({first}, {version})")
        if m.isdir():
            continue
        if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):  # isreg() would also pass sparse/contiguous
            raise ArchiveError(f"{m.name}: {_kind(m)} not allowed in a bundle archive")
        if not rel:
            raise ArchiveError(f"{m.name}: a file where the version directory should be")
        if rel in files:
            raise ArchiveError(f"{m.name}: appears twice in the archive")
        files[rel] = (version, rel, m)
    if MANIFEST not in files:
        raise ArchiveError(f"{archive}: no {MANIFEST} inside; not a bundle archive")
    manifest_info = files[MANIFEST][2]
    if manifest_info.size > MAX_MANIFEST_BYTES:
        raise ArchiveError(f"{MANIFEST}: {manifest_info.size} bytes is too large for a manifest")
    sig = files.get(SIGNATURE)
    if sig is not None and sig[2].size > MAX_SIGNATURE_BYTES:
        raise ArchiveError(f"{SIGNATURE}: {sig[2].size} bytes is too large for a signature")
    listed = _manifest_files(tf, manifest_info)
    total = 0
    for rel, (_, _, m) in files.items():
        if rel in SIDE_FILES:
            continue
        entry = listed.get(rel)
        if entry is None:
            raise ArchiveError(f"{m.name}: not listed in {MANIFEST}; refused")
        if m.size != entry.size:
            raise ArchiveError(f"{m.name}: {m.size} bytes in the archive, {MANIFEST} says {entry.size}; refused")
        total += m.size
    if total > max_total:
        raise ArchiveError(f"{archive}: {total} bytes of files, more than the {max_total}-byte limit")
    missing = sorted(set(listed) - set(files))
    if missing:
        raise ArchiveError(f"{archive}: truncated or incomplete, missing {', '.join(missing)}")
    order = [files[MANIFEST]] + ([sig] if sig else []) + [files[r] for r in sorted(listed)]
    return order


def _manifest_files(tf: tarfile.TarFile, info: tarfile.TarInfo) -> dict[str, manifest_mod.FileEntry]:
    """The archive's manifest ``files`` table, parsed by the one manifest parser."""
    try:
        f = tf.extractfile(info)
        data = f.read(MAX_MANIFEST_BYTES + 1) if f is not None else b""
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveError(f"{MANIFEST}: unreadable in the archive ({exc})") from None
    if len(data) != info.size:
        raise ArchiveError(f"{MANIFEST}: truncated in the archive")
    try:
        return manifest_mod.parse(data).files
    except MalformedFile as exc:
        raise ArchiveError(f"archive: {exc}") from None


def _check_space(dest: Path, need: int) -> None:
    free = shutil.disk_usage(dest).free
    if need > free:
        raise OSError(errno.ENOSPC, f"needs {need / 2**20:.1f} MB, {free / 2**20:.1f} MB free", str(dest))


def _extract(tf: tarfile.TarFile, m: tarfile.TarInfo, dest: Path, rel: str) -> None:
    target = dest / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    src = tf.extractfile(m)
    if src is None:  # pragma: no cover - regular members always have a file object
        raise ArchiveError(f"{m.name}: unreadable")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        written = 0
        while True:
            try:
                chunk = src.read(min(_CHUNK, m.size - written + 1))
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise ArchiveError(f"{m.name}: truncated archive ({exc})") from None
            if not chunk:
                break
            written += len(chunk)
            if written > m.size:
                raise ArchiveError(f"{m.name}: more data than its declared {m.size} bytes")
            write_all(fd, chunk)
        if written != m.size:
            raise ArchiveError(f"{m.name}: truncated archive ({written} of {m.size} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)
