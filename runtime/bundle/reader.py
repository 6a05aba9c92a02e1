"""Reading and verifying a bundle directory: the one place that decides whether a bundle is valid.

Checks, in order, each recorded in a :class:`Verification`:

``manifest``
    ``manifest.json`` parses; every listed file is a regular file of the listed size and SHA-256; no
    unlisted file is present (side files aside).
``signature``
    ``manifest.sig`` verifies the exact manifest bytes with a key of the :class:`TrustPolicy`
    (required when the policy has keys, reported otherwise).
``config``
    ``config.json`` parses; its version equals the directory's name; every file it names is listed.
``weights``
    ``weights.json`` (when the config names one) parses, its data file is listed and every range lies
    inside it.

:func:`verify` runs them all and reports (for ``m2fp-bundle verify``); :func:`inspect` raises the first
failure as its typed error; :func:`load` does the same while keeping the verified bytes in memory,
so what a session is built from is exactly what was hashed (no file is read twice, an edit of the
files on disk afterwards changes nothing). Whether the graph in those bytes matches the config is the
runtime's check (``runtime/graph_check.py``), on the session it builds from them.

Identity: :func:`identity` — SHA-256 of the manifest bytes, plus the first 16 hex digits of the
signature's SHA-256 when signed — names a bundle's content for the registry, last-known-good and
distribution alike. :func:`stat_fingerprint` is only a cheap "did anything change on disk" probe.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BundleError, IntegrityError, MalformedFile
from . import manifest as manifest_mod
from . import regular, signature, weights_index
from .config import CONFIG, BundleConfig
from .golden_check import GoldenVerdict, judge_bundle
from .manifest import MANIFEST, SIDE_FILES, Manifest
from .signature import NO_KEYS, TrustPolicy
from .weights_index import IndexEntry, WeightsIndex

OK, FAIL, SKIP = "ok", "FAIL", "skip"
_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class Check:
    """One named check and its outcome (:data:`OK`, :data:`FAIL` or :data:`SKIP`)."""

    name: str
    status: str
    detail: str
    error: BundleError | None = None


@dataclass
class Verification:
    """The checks run on one bundle, in order; ``bundle`` is set when every file check passed.

    Callers that check more (an archive, a session, the golden run) append their own checks.
    """

    version: str | None = None
    checks: list[Check] = field(default_factory=list)
    bundle: BundleInfo | None = None

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.status != FAIL for c in self.checks)

    def add(self, name: str, status: str, detail: str, error: BundleError | None = None) -> Check:
        check = Check(name, status, detail, error)
        self.checks.append(check)
        return check

    def fail(self, name: str, error: BundleError) -> None:
        self.add(name, FAIL, str(error), error)

    def first_failure(self) -> Check | None:
        return next((c for c in self.checks if c.status == FAIL), None)

    def raise_for_failure(self) -> None:
        failure = self.first_failure()
        if failure is not None:
            raise failure.error or BundleError(f"{failure.name}: {failure.detail}")


@dataclass(frozen=True)
class BundleInfo:
    """A bundle whose files verified: what it is and who vouches for it."""

    path: Path
    manifest: Manifest
    config: BundleConfig
    index: WeightsIndex | None
    identity: str
    #: id of the trusted key that verified the signature; None when no key was required
    signed_by: str | None
    signed: bool

    @property
    def version(self) -> str:
        return self.config.version


# ------------------------------------------------------------------------------------------ identity
def identity(manifest_raw: bytes, signature_raw: bytes | None) -> str:
    """The content key: manifest SHA-256 (64 hex), ``-`` + 16 hex of the signature's SHA-256 if signed."""
    key = hashlib.sha256(manifest_raw).hexdigest()
    return f"{key}-{hashlib.sha256(signature_raw).hexdigest()[:16]}" if signature_raw is not None else key


def identity_of(bundle_dir: str | os.PathLike) -> str:
    """:func:`identity` of a directory's current manifest and signature (cheap; verifies nothing)."""
    return identity(manifest_mod.read(Path(bundle_dir)).raw, signature.read_signature_bytes(bundle_dir))


def stat_fingerprint(bundle_dir: str | os.PathLike) -> str:
    """Changes whenever any file under the bundle is added, removed, replaced or rewritten in place."""
    path = Path(bundle_dir)
    h = hashlib.sha256()
    try:
        entries = sorted(path.rglob("*"))
    except OSError:
        return "unreadable"
    for p in entries:
        try:
            st = p.lstat()
        except OSError:
            continue
        h.update(f"{p.relative_to(path)}|{st.st_mode}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}\n"
                 .encode("utf-8", "surrogateescape"))
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- checks
def _open_listed(bundle_dir: Path, rel: str) -> int:
    """An fd of a listed file: a regular file reached without following any link (:mod:`.regular`'s rule)."""
    try:
        return regular.open_regular(bundle_dir / rel, rel, follow_links=False)
    except FileNotFoundError:
        raise IntegrityError(f"{rel}: listed in {MANIFEST} but missing") from None
    except MalformedFile as exc:
        raise IntegrityError(f"{rel}: listed in {MANIFEST} but {exc.reason}") from None
    except OSError as exc:
        raise IntegrityError(f"{rel}: listed in {MANIFEST} but unreadable ({exc.strerror or exc})") from None


def _read_verified(bundle_dir: Path, rel: str, entry: manifest_mod.FileEntry, keep: bool) -> bytes | None:
    """Hash one listed file (keeping its bytes if ``keep``); IntegrityError unless size and hash match."""
    fd = _open_listed(bundle_dir, rel)
    try:
        size = os.fstat(fd).st_size
        if size != entry.size:
            raise IntegrityError(f"{rel}: size {size} bytes, manifest says {entry.size} (truncated or replaced?)")
        h, parts, got = hashlib.sha256(), [], 0
        while got <= entry.size:
            chunk = os.read(fd, min(_CHUNK, entry.size - got + 1))
            if not chunk:
                break
            got += len(chunk)
            h.update(chunk)
            if keep:
                parts.append(chunk)
        if got != entry.size or h.hexdigest() != entry.sha256:
            raise IntegrityError(f"{rel}: SHA-256 {h.hexdigest()[:12]}… does not match the manifest's "
                                 f"{entry.sha256[:12]}… (changed since it was published?)")
        return b"".join(parts) if keep else None
    finally:
        os.close(fd)


def _unlisted(bundle_dir: Path, listed: dict[str, Any]) -> list[str]:
    extra = []
    for p in bundle_dir.rglob("*"):
        rel = p.relative_to(bundle_dir).as_posix()
        if rel in SIDE_FILES or rel in listed:
            continue
        if p.is_symlink() or not p.is_dir():
            extra.append(rel)
    return sorted(extra)


def _files_check(bundle_dir: Path, manifest: Manifest, load: bool) -> dict[str, bytes]:
    """Verify every listed file; return the verified bytes of the JSON files, and with ``load`` of every
    file but the weights data file (only size-checked here: :meth:`BundleContent.tensors` hashes it)."""
    json_files = {rel for rel in manifest.files if rel.endswith(".json")}
    kept = {}
    for rel in sorted(json_files):
        kept[rel] = _read_verified(bundle_dir, rel, manifest.files[rel], True)
    data_file = _data_file(kept) if load else None
    for rel, entry in sorted(manifest.files.items()):
        if rel in json_files:
            continue
        if rel == data_file:
            fd = _open_listed(bundle_dir, rel)
            try:
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if size != entry.size:
                raise IntegrityError(f"{rel}: size {size} bytes, manifest says {entry.size} (truncated or replaced?)")
            continue
        data = _read_verified(bundle_dir, rel, entry, load)
        if data is not None:
            kept[rel] = data
    extra = _unlisted(bundle_dir, manifest.files)
    if extra:
        raise IntegrityError(f"files not in {MANIFEST}: {', '.join(extra[:10])}" + (" …" if len(extra) > 10 else ""))
    return {k: v for k, v in kept.items() if v is not None}


def _data_file(kept: dict[str, bytes | None]) -> str | None:
    """The weights data file named by the (verified, not yet checked) config and index, if any."""
    try:
        config = BundleConfig.from_bytes(kept[CONFIG] or b"")
        raw = kept.get(config.weights_index or "")
        return weights_index.parse(raw, config.weights_index or "").data_file if raw else None
    except (KeyError, BundleError):
        return None  # the config and weights checks report it


def _config_check(bundle_dir: Path, manifest: Manifest, raw: bytes) -> BundleConfig:
    config = BundleConfig.from_bytes(raw)
    if config.version != bundle_dir.name:
        raise MalformedFile(f"{CONFIG} → version", f"{config.version!r} but the directory is {bundle_dir.name!r}")
    for rel in config.files():
        if rel not in manifest.files:
            raise IntegrityError(f"{CONFIG} names {rel}, which is not in {MANIFEST}")
    return config


def _index_check(manifest: Manifest, config: BundleConfig, raw: bytes | None) -> WeightsIndex | None:
    if config.weights_index is None or raw is None:
        return None
    index = weights_index.parse(raw, config.weights_index)
    entry = manifest.files.get(index.data_file)
    if entry is None:
        raise IntegrityError(f"{config.weights_index} → data_file: {index.data_file} is not in {MANIFEST}")
    return weights_index.parse(raw, config.weights_index, entry.size)


def _run(bundle_dir: Path, trust: TrustPolicy, report: Verification, load: bool) -> dict[str, bytes]:
    """The checks in order; stops at the first failure (later ones are marked skipped)."""
    kept: dict[str, bytes] = {}
    steps = ["manifest", "signature", "config", "weights"]

    def skip_rest(after: str) -> dict[str, bytes]:
        for name in steps[steps.index(after) + 1:]:
            report.add(name, SKIP, f"not checked: {after} failed")
        return kept

    try:
        manifest = manifest_mod.read(bundle_dir)
        kept = _files_check(bundle_dir, manifest, load)
        report.add("manifest", OK, f"{len(manifest.files)} files, {manifest.total_bytes / 2**20:.1f} MB, "
                                   "sizes and SHA-256 match")
    except BundleError as exc:
        report.fail("manifest", exc)
        return skip_rest("manifest")
    try:
        sig_raw = signature.read_signature_bytes(bundle_dir)
        signed_by = signature.check(manifest.raw, sig_raw, trust)
        if signed_by:
            report.add("signature", OK, f"Ed25519 over {MANIFEST}, trusted key {signed_by}")
        elif sig_raw is None:
            report.add("signature", SKIP, "unsigned (no public key configured, not required)")
        else:
            report.add("signature", SKIP, "signed; not checked (no public key configured)")
    except BundleError as exc:
        report.fail("signature", exc)
        return skip_rest("signature")
    try:
        if CONFIG not in kept:
            raise IntegrityError(f"{CONFIG} is not in {MANIFEST}")
        config = _config_check(bundle_dir, manifest, kept[CONFIG])
        report.version = config.version
        report.add("config", OK, f"schema {config.schema_version}, {config.task}, {config.num_classes} classes, "
                                 f"channel {config.channel}, API {', '.join(config.compatible_api)}")
    except BundleError as exc:
        report.fail("config", exc)
        return skip_rest("config")
    try:
        index = _index_check(manifest, config, kept.get(config.weights_index or ""))
        report.add("weights", OK if index else SKIP,
                   f"{len(index.tensors)} tensors indexed in {index.data_file}" if index else "no weights index")
    except BundleError as exc:
        report.fail("weights", exc)
        return kept
    report.bundle = BundleInfo(bundle_dir, manifest, config, index, identity(manifest.raw, sig_raw), signed_by,
                               sig_raw is not None)
    return kept


def verify(bundle_dir: str | os.PathLike, trust: TrustPolicy = NO_KEYS, *,
           report: Verification | None = None) -> Verification:
    """Run every file check on a bundle directory, appending to ``report`` if given; never raises for a bad
    bundle (see ``.ok``)."""
    bundle_dir = Path(bundle_dir)
    report = report if report is not None else Verification(bundle_dir.name)
    _run(bundle_dir, trust, report, load=False)
    return report


def inspect(bundle_dir: str | os.PathLike, trust: TrustPolicy = NO_KEYS) -> BundleInfo:
    """Verify a bundle directory's files; raise the first failure as its typed BundleError."""
    report = verify(bundle_dir, trust)
    report.raise_for_failure()
    assert report.bundle is not None
    return report.bundle


# -------------------------------------------------------------------------------------------- load
@dataclass(frozen=True)
class BundleContent:
    """A verified bundle held in memory: sessions are built from these bytes, never from the files."""

    info: BundleInfo
    #: every verified file except the weights data file (model graph, config, index, golden sample, …)
    files: dict[str, bytes]

    @property
    def config(self) -> BundleConfig:
        return self.info.config

    @functools.cached_property
    def golden_verdict(self) -> GoldenVerdict | None:
        """Is the golden sample degenerate, and why (``.degenerate``, ``.reason``, ``.classes``): the runtime's
        own verdict on the verified golden label map (``golden_check.judge``), None without a golden sample;
        BundleError if that map is unreadable. Judged once per content."""
        golden = self.config.golden
        return None if golden is None else judge_bundle(self.config, self.files[golden.label_map])

    def model_bytes(self) -> bytes:
        return self.files[self.info.config.model_file]

    def tensors(self) -> Iterator[tuple[IndexEntry, np.ndarray]]:
        """Each indexed tensor's bytes (a fresh uint8 array), in file order, from the data file.

        The whole data file is hashed on the way; if it no longer matches the manifest, IntegrityError
        is raised after the last tensor (consumers discard what they got).
        """
        index = self.info.index
        if index is None:
            return
        entry = self.info.manifest.files[index.data_file]
        fd = _open_listed(self.info.path, index.data_file)
        try:
            if os.fstat(fd).st_size != entry.size:
                raise IntegrityError(f"{index.data_file}: size changed since verification")
            h, pos = hashlib.sha256(), 0
            for t in index.tensors:
                if t.offset > pos:
                    _hash_range(fd, h, pos, t.offset - pos, index.data_file)
                buf = np.empty(t.length, dtype=np.uint8)
                if t.length:
                    got = os.preadv(fd, [buf.data], t.offset)
                    if got != t.length:
                        raise IntegrityError(f"{index.data_file}: truncated while loading")
                h.update(buf.data)
                pos = t.offset + t.length
                yield t, buf
            if entry.size > pos:
                _hash_range(fd, h, pos, entry.size - pos, index.data_file)
            if h.hexdigest() != entry.sha256:
                raise IntegrityError(f"{index.data_file}: changed on disk while loading (SHA-256 no longer matches "
                                     f"{MANIFEST})")
        finally:
            os.close(fd)


def _hash_range(fd: int, h: Any, start: int, length: int, rel: str) -> None:
    while length > 0:
        chunk = os.pread(fd, min(_CHUNK, length), start)
        if not chunk:
            raise IntegrityError(f"{rel}: truncated while loading")
        h.update(chunk)
        start += len(chunk)
        length -= len(chunk)


def read_listed(info: BundleInfo, rel: str) -> bytes:
    """File ``rel`` of a verified bundle read again from disk, checked against its manifest entry
    (IntegrityError if it is not listed or no longer holds the listed bytes)."""
    entry = info.manifest.files.get(rel)
    if entry is None:
        raise IntegrityError(f"{rel} is not in {MANIFEST}")
    data = _read_verified(info.path, rel, entry, True)
    assert data is not None  # keep=True
    return data


def load(bundle_dir: str | os.PathLike, trust: TrustPolicy = NO_KEYS) -> BundleContent:
    """Verify a bundle and keep every file but the weights data in memory (typed error on failure).

    The weights data file is verified again while :meth:`BundleContent.tensors` streams it.
    """
    bundle_dir = Path(bundle_dir)
    report = Verification(bundle_dir.name)
    kept = _run(bundle_dir, trust, report, load=True)
    report.raise_for_failure()
    info = report.bundle
    assert info is not None
    data_file = info.index.data_file if info.index else None
    return BundleContent(info, {k: v for k, v in kept.items() if k != data_file})
