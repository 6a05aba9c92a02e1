"""One version ⇄ one tar file: deterministic packing, and unpacking that trusts nothing.

Layout of ``m2fp-<version>.tar`` (plain ustar/pax, uncompressed — ONNX weights do not compress)::

    <version>/manifest.json     first, so a reader learns the file list before anything else
    <version>/manifest.sig      only if the bundle is signed
    <version>/<file>            every file manifest.json lists, in its (sorted) order

Members are regular files with owner 0:0, mode 0644 and mtime 0: the same bundle always packs to
the same bytes. Packing hashes each file while copying it and fails if it differs from the manifest,
so a packed archive is a verified one.

:func:`unpack` trusts nothing in the archive. Before writing any file it reads every member header
and refuses: absolute names, ``..``, ``.``, empty or hidden path parts, members outside ``<version>/``,
paths deeper than the manifest allows (its own rule, :func:`.manifest.check_rel_path`) and over-long
names; anything but regular files and directories (symlinks, hard links, devices, FIFOs, sparse files
in every GNU flavour — old ``S`` members and ``GNU.sparse`` pax records are refused before tarfile
parses them); oversized or chained extended headers; duplicates; member sizes adding up to more than
the archive holds. It then reads the archive's own ``manifest.json`` (and ``manifest.sig``): with a
:class:`.signature.TrustPolicy` that has keys the signature must verify those exact bytes, still
before anything is written. Files the manifest does not list, listed files missing, and sizes that
differ from the manifest's are refused from the headers (an oversize member never fills the disk).
Files are created with ``O_EXCL | O_NOFOLLOW`` under a fresh directory; each write is counted against
the declared size and hashed, a file that is not exactly the manifest's bytes fails the unpack, and
each file is fsynced. Every refusal is one :class:`ArchiveError` line (or SignatureError).
"""

from __future__ import annotations

import contextvars
import errno
import hashlib
import io
import os
import shutil
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import ArchiveError, BundleError, MalformedFile
from . import manifest as manifest_mod
from . import signature
from .atomic import fsync_dir, write_all  # write_all: the one place unpacking writes (tests patch it)
from .manifest import MANIFEST, SIDE_FILES, SIGNATURE
from .signature import NO_KEYS, TrustPolicy
from .store import MODEL
from .versions import is_version_name

_CHUNK = 1 << 20
#: limits on what an archive may declare (the manifest's own sizes are exact limits for the rest)
MAX_MANIFEST_BYTES = manifest_mod.MAX_MANIFEST_BYTES
MAX_SIGNATURE_BYTES = signature.MAX_SIGNATURE_BYTES
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
#: a member name (UTF-8 bytes) and one part of it; the depth is the manifest's rule (MAX_PATH_PARTS)
MAX_NAME_BYTES = 1024
MAX_PART_BYTES = 255
#: a pax or GNU long-name header is read into memory whole by tarfile: bounded before it is read
MAX_EXTENDED_HEADER_BYTES = 64 << 10
#: extended headers in front of one member (global pax + pax + GNU long name + long link)
MAX_EXTENDED_CHAIN = 4
#: the largest archive a valid bundle packs to: its files, manifest and signature, and per member a
#: header, an extended header and padding (what ``pull`` caps a download at by default)
MAX_ARCHIVE_BYTES = MAX_TOTAL_BYTES + MAX_MANIFEST_BYTES + MAX_SIGNATURE_BYTES + (MAX_MEMBERS + 2) * 4096 + 10240

_PAX_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_EXTENDED_TYPES = _PAX_TYPES + (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
#: what tarfile's header parser raises on hostile input besides its own errors
_CORRUPT = (tarfile.TarError, EOFError, ValueError, IndexError, OverflowError, UnicodeError)
_chain: contextvars.ContextVar[int] = contextvars.ContextVar("m2fp_tar_extended_chain", default=0)


def _shown(name: str, limit: int = 120) -> str:
    """A member name fit for a one-line error: as is when short and printable, else a cut repr."""
    if len(name) <= limit and name.isprintable():
        return name
    return repr(name[:limit]) + (f"… ({len(name)} characters)" if len(name) > limit else "")


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


class _Header(tarfile.TarInfo):
    """tarfile's member header, refusing what must not reach tarfile's own parsers.

    ``_proc_member`` is tarfile's documented hook for header kinds. Before tarfile reads them it refuses:
    old GNU sparse members (type ``S``), pax headers carrying any ``GNU.sparse`` record (sparse formats
    0.0, 0.1, 1.0: a few KB that expand to any size), extended headers over
    :data:`MAX_EXTENDED_HEADER_BYTES` (read into memory whole) and chains of more than
    :data:`MAX_EXTENDED_CHAIN` of them (parsed recursively).
    """

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise ArchiveError(f"{_shown(self.name)}: sparse file (GNU) not allowed in a bundle archive")
        if self.type not in _EXTENDED_TYPES:
            return super()._proc_member(tf)  # type: ignore[misc]
        if self.size > MAX_EXTENDED_HEADER_BYTES:
            raise ArchiveError(f"extended tar header of {self.size} bytes at offset {self.offset}; "
                               f"at most {MAX_EXTENDED_HEADER_BYTES} allowed")
        depth = _chain.get()
        if depth >= MAX_EXTENDED_CHAIN:
            raise ArchiveError(f"more than {MAX_EXTENDED_CHAIN} extended tar headers in a row at offset {self.offset}")
        if self.type in _PAX_TYPES:
            fileobj = tf.fileobj
            pos = fileobj.tell()
            records = fileobj.read(self.size)
            fileobj.seek(pos)
            if b"GNU.sparse" in records:
                raise ArchiveError(f"pax header at offset {self.offset} describes a sparse file (GNU.sparse); "
                                   "not allowed in a bundle archive")
        token = _chain.set(depth + 1)
        try:
            return super()._proc_member(tf)  # type: ignore[misc]
        finally:
            _chain.reset(token)


def _open(archive: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(archive, mode="r:", tarinfo=_Header)
    except FileNotFoundError:
        raise ArchiveError(f"{archive}: no such file") from None
    except (*_CORRUPT, OSError) as exc:
        raise ArchiveError(f"{archive}: not a readable tar archive ({exc})") from None


def _check_path(name: str, what: str) -> list[str]:
    """The parts of a relative POSIX path; refuses absolute paths, '..', '.', empty parts, NUL, '\\'."""
    if not name or "\x00" in name or "\\" in name or name.startswith("/"):
        raise ArchiveError(f"unsafe {what} {_shown(name)}: absolute or malformed")
    parts = name.rstrip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ArchiveError(f"unsafe {what} {_shown(name)}: empty, '.' or '..' path parts")
    return parts


def _split(name: str) -> tuple[str, str]:
    """``<version>/<rel>`` → (version, rel); refuses every path trick, over-long names and parts, and any
    ``rel`` the manifest could not list (:func:`manifest.check_rel_path`: at most MAX_PATH_PARTS parts)."""
    parts = _check_path(name, "member name")
    if not is_version_name(parts[0]):
        raise ArchiveError(f"member {_shown(name)} is not under a <version>/ directory")
    rel = "/".join(parts[1:])
    if rel and rel not in SIDE_FILES:
        try:
            manifest_mod.check_rel_path(rel, MANIFEST)
        except MalformedFile:
            n = len(parts) - 1
            raise ArchiveError(f"unsafe member name {_shown(name)}: not a path a bundle can hold ({n} part"
                               f"{'s' if n != 1 else ''} under {parts[0]}/, at most {manifest_mod.MAX_PATH_PARTS}; "
                               "no empty, '.', '..' or hidden parts)") from None
    if _nbytes(name) > MAX_NAME_BYTES:
        raise ArchiveError(f"unsafe member name {_shown(name)}: longer than {MAX_NAME_BYTES} bytes")
    if any(_nbytes(p) > MAX_PART_BYTES for p in parts):
        raise ArchiveError(f"unsafe member name {_shown(name)}: a part longer than {MAX_PART_BYTES} bytes")
    return parts[0], rel


def _kind(m: tarfile.TarInfo) -> str:
    if m.issym():
        return f"symbolic link → {_shown(m.linkname)}"
    if m.islnk():
        return f"hard link → {_shown(m.linkname)}"
    if m.ischr() or m.isblk():
        return "device"
    if m.isfifo():
        return "FIFO"
    if _is_sparse(m):
        return "sparse file"
    return f"member type {m.type.decode(errors='replace')!r}"


def _is_sparse(m: tarfile.TarInfo) -> bool:
    return (m.type == tarfile.GNUTYPE_SPARSE or m.sparse is not None
            or any(k.startswith("GNU.sparse") for k in m.pax_headers))


def peek_version(archive: str | os.PathLike) -> str:
    """The version an archive holds (from its first member), without reading the rest."""
    archive = Path(archive)
    with _open(archive) as tf:
        try:
            first = tf.next()
        except _CORRUPT as exc:
            raise ArchiveError(f"{archive}: not a readable tar archive ({exc})") from None
    if first is None:
        raise ArchiveError(f"{archive}: empty archive")
    return _split(first.name)[0]


@dataclass(frozen=True)
class _Plan:
    """What unpacking will write, decided from the headers, the manifest and the signature alone."""

    version: str
    manifest: bytes
    signature: bytes | None
    #: (rel, member, manifest entry) of every listed file, in manifest order
    files: list[tuple[str, tarfile.TarInfo, manifest_mod.FileEntry]]

    @property
    def total(self) -> int:
        return len(self.manifest) + len(self.signature or b"") + sum(e.size for _, _, e in self.files)


def unpack(archive: str | os.PathLike, dest_parent: str | os.PathLike, *, trust: TrustPolicy = NO_KEYS,
           max_total_bytes: int = MAX_TOTAL_BYTES) -> Path:
    """Unpack a bundle archive into ``dest_parent/<version>/`` (which must not exist); return that path.

    Nothing is written until every header, the manifest and — when ``trust`` has keys — the signature
    over the archive's own ``manifest.json`` passed (SignatureError otherwise). What is returned holds
    exactly the manifest's files, each of the listed size and SHA-256, plus the side files; on any
    error the partially written ``<version>/`` is removed and the error raised.
    """
    archive = Path(archive)
    with _open(archive) as tf:
        plan = _plan(tf, archive, max_total_bytes, trust)
        dest = Path(dest_parent) / plan.version
        dest.mkdir()
        try:
            _check_space(dest, plan.total)
            _write_new(dest / MANIFEST, plan.manifest)
            if plan.signature is not None:
                _write_new(dest / SIGNATURE, plan.signature)
            for rel, m, entry in plan.files:
                _extract(tf, m, dest, rel, entry)
            for d in sorted({(dest / rel).parent for rel, _, _ in plan.files} | {dest}, key=lambda p: -len(p.parts)):
                fsync_dir(d)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
    return dest


def _members(tf: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    """Every member header, each refused at once if its name or kind is unsafe."""
    infos: list[tarfile.TarInfo] = []
    first: str | None = None
    try:
        for m in tf:
            if len(infos) >= MAX_MEMBERS:
                raise ArchiveError(f"{archive}: more than {MAX_MEMBERS} members")
            version, rel = _split(m.name)
            if first is None:
                first = version
            elif version != first:
                raise ArchiveError(f"{archive}: members of several versions ({first}, {version})")
            if _is_sparse(m) or m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE):
                raise ArchiveError(f"{_shown(m.name)}: {_kind(m)} not allowed in a bundle archive")
            if m.size < 0:  # base-256 or pax size: tarfile would step back and read this header forever
                raise ArchiveError(f"{_shown(m.name)}: negative size {m.size} in its tar header")
            infos.append(m)
    except _CORRUPT as exc:
        raise ArchiveError(f"{archive}: truncated or corrupt tar ({exc})") from None
    if not infos:
        raise ArchiveError(f"{archive}: empty archive")
    return infos


def _plan(tf: tarfile.TarFile, archive: Path, max_total: int, trust: TrustPolicy) -> _Plan:
    """Check all headers, the manifest and the signature; nothing is written here."""
    infos = _members(tf, archive)
    version = _split(infos[0].name)[0]
    files: dict[str, tarfile.TarInfo] = {}
    for m in infos:
        rel = _split(m.name)[1]
        if m.isdir():
            continue
        if not rel:
            raise ArchiveError(f"{_shown(m.name)}: a file where the version directory should be")
        if rel in files:
            raise ArchiveError(f"{_shown(m.name)}: appears twice in the archive")
        files[rel] = m
    if MANIFEST not in files:
        raise ArchiveError(f"{archive}: no {MANIFEST} inside; not a bundle archive")
    declared = sum(m.size for m in files.values())
    if declared > os.fstat(tf.fileobj.fileno()).st_size:  # type: ignore[union-attr,attr-defined]
        raise ArchiveError(f"{archive}: members declare {declared} bytes, more than the archive holds; "
                           "truncated or corrupt")
    manifest_raw = _read_member(tf, files[MANIFEST], MAX_MANIFEST_BYTES, "a manifest")
    try:
        listed = manifest_mod.parse(manifest_raw).files
    except MalformedFile as exc:
        raise ArchiveError(f"archive: {exc}") from None
    sig = files.get(SIGNATURE)
    sig_raw = _read_member(tf, sig, MAX_SIGNATURE_BYTES, "a signature") if sig is not None else None
    signature.check(manifest_raw, sig_raw, trust)  # before any file is written
    total = 0
    for rel, m in files.items():
        if rel in SIDE_FILES:
            continue
        entry = listed.get(rel)
        if entry is None:
            raise ArchiveError(f"{_shown(m.name)}: not listed in {MANIFEST}; refused")
        if m.size != entry.size:
            raise ArchiveError(f"{_shown(m.name)}: {m.size} bytes in the archive, {MANIFEST} says {entry.size}; "
                               "refused")
        total += m.size
    if total > max_total:
        raise ArchiveError(f"{archive}: {total} bytes of files, more than the {max_total}-byte limit")
    missing = sorted(set(listed) - set(files))
    if missing:
        raise ArchiveError(f"{archive}: truncated or incomplete, missing {', '.join(_shown(r) for r in missing[:10])}"
                           + (" …" if len(missing) > 10 else ""))
    for rel in listed:
        for i in range(1, rel.count("/") + 1):
            parent = rel.rsplit("/", i)[0]
            if parent in listed:
                raise ArchiveError(f"{MANIFEST} lists {_shown(parent)} both as a file and as the directory of "
                                   f"{_shown(rel)}")
    return _Plan(version, manifest_raw, sig_raw, [(rel, files[rel], listed[rel]) for rel in sorted(listed)])


def _read_member(tf: tarfile.TarFile, info: tarfile.TarInfo, limit: int, what: str) -> bytes:
    """The whole content of a small member (manifest, signature), at most ``limit`` bytes."""
    name = _shown(info.name)
    if info.size > limit:
        raise ArchiveError(f"{name}: {info.size} bytes is too large for {what}")
    try:
        f = tf.extractfile(info)
        data = f.read(info.size + 1) if f is not None else b""
    except (*_CORRUPT, OSError) as exc:
        raise ArchiveError(f"{name}: unreadable in the archive ({exc})") from None
    if len(data) != info.size:
        raise ArchiveError(f"{name}: truncated in the archive")
    return data


def _check_space(dest: Path, need: int) -> None:
    free = shutil.disk_usage(dest).free
    if need > free:
        raise OSError(errno.ENOSPC, f"needs {need / 2**20:.1f} MB, {free / 2**20:.1f} MB free", str(dest))


def _create(target: Path) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    return os.open(target, flags, 0o644)


def _write_new(target: Path, data: bytes) -> None:
    """A new file holding exactly ``data`` (the side files, already read and checked)."""
    fd = _create(target)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _extract(tf: tarfile.TarFile, m: tarfile.TarInfo, dest: Path, rel: str, entry: manifest_mod.FileEntry) -> None:
    """Write one listed file, counting and hashing every byte: ArchiveError unless it is exactly the
    manifest's size and SHA-256."""
    target = dest / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    name = _shown(m.name)
    try:
        src = tf.extractfile(m)
    except _CORRUPT as exc:
        raise ArchiveError(f"{name}: unreadable ({exc})") from None
    if src is None:  # pragma: no cover - regular members always have a file object
        raise ArchiveError(f"{name}: unreadable")
    fd = _create(target)
    try:
        written, h = 0, hashlib.sha256()
        while True:
            try:
                chunk = src.read(min(_CHUNK, m.size - written + 1))
            except (*_CORRUPT, OSError) as exc:
                raise ArchiveError(f"{name}: truncated archive ({exc})") from None
            if not chunk:
                break
            written += len(chunk)
            if written > m.size:
                raise ArchiveError(f"{name}: more data than its declared {m.size} bytes")
            h.update(chunk)
            write_all(fd, chunk)
        if written != m.size:
            raise ArchiveError(f"{name}: truncated archive ({written} of {m.size} bytes)")
        if h.hexdigest() != entry.sha256:
            raise ArchiveError(f"{name}: SHA-256 {h.hexdigest()[:12]}… does not match {MANIFEST}'s "
                               f"{entry.sha256[:12]}…; refused")
        os.fsync(fd)
    finally:
        os.close(fd)
