"""Verify, install, promote, remove and list bundles in a bundle root.

**Verify** reports each check (``ok`` / ``FAIL`` / ``skip``): the archive's safety (for a tar), the
bundle layer's file checks (``bundle.reader``: manifest, signature, config, weights index), then the
graph (a session built from the verified bytes, checked against ``config.json``) and the golden
self-test when the bundle carries one. With public keys configured a missing or wrong signature
fails; without, the signature is reported but not required.

**Install** unpacks into ``<root>/m2fp/.staging-<version>-<random>/<version>/`` (a dot-directory:
version scans and the server's watcher ignore it), verifies there, then publishes with one
``renameat2(RENAME_NOREPLACE)``: of two concurrent installs of one version exactly one rename
succeeds, the other fails with :class:`VersionExists` and removes its staging copy. A failure at
any point — a bad archive, a failed check, a full disk — removes the staging directory, so nothing
partial is ever visible under a version name. ``force`` replaces an installed version by swapping
the two directories atomically (``BundleStore``'s exchange). With public keys configured, an
archive's signature is checked on the archive's own ``manifest.json`` before any other file is
unpacked (``bundle.archive.unpack``), and again on the staged copy; ``expect_version`` (what ``pull``
asked for) refuses an archive of another version before anything is unpacked or replaced.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bundle import reader
from ..bundle.archive import peek_version, unpack, write_all
from ..bundle.config import BundleConfig
from ..bundle.manifest import MANIFEST, SIGNATURE
from ..bundle.reader import FAIL, OK, SKIP
from ..bundle.signature import NO_KEYS, TrustPolicy
from ..bundle.store import MODEL, BundleStore
from ..bundle.versions import is_alias_name, is_version_name
from ..errors import ArchiveError, BundleError, SignatureError, VerificationFailed, VersionExists, VersionInUse
from ..routes_file import RoutesError, load_routes
from .report import Report

__all__ = ["FAIL", "OK", "SKIP", "Installed", "Report", "install", "list_versions", "promote", "remove", "verify",
           "verify_dir"]


@dataclass(frozen=True)
class Installed:
    version: str
    path: Path
    report: Report
    replaced: bool


# ------------------------------------------------------------------------------------------ verify
def verify_dir(bundle_dir: str | os.PathLike, trust: TrustPolicy = NO_KEYS, *, graph: bool = True,
               report: Report | None = None) -> Report:
    """The bundle layer's file checks, then (``graph``) the session, graph ⇄ config and golden self-test;
    never raises for a bad bundle (see ``report.ok``)."""
    bundle_dir = Path(bundle_dir)
    report = report if report is not None else Report(str(bundle_dir), bundle_dir.name)
    reader.verify(bundle_dir, trust, report=report)
    if not graph:
        return report
    if not report.ok:
        report.add("graph", SKIP, "not checked: an earlier check failed")
        return report
    _check_graph(bundle_dir, trust, report)
    return report


def _check_graph(bundle_dir: Path, trust: TrustPolicy, report: Report) -> None:
    from ..predictor import Predictor
    from ..session import RuntimeSettings, SessionFactory

    try:
        factory = SessionFactory(RuntimeSettings(intra_op_threads=1, optimization="basic", share_weights=False))
        predictor = Predictor.load(bundle_dir, factory, trust)
    except BundleError as exc:
        report.fail("graph", exc)
        return
    config = predictor.config
    report.add("graph", OK, f"{config.model_file}: inputs, outputs, types and metadata agree with config.json")
    if not config.golden:
        return
    try:
        agreement = predictor.self_test()
        report.add("selftest", OK, f"golden sample: {100 * (agreement or 0):.2f}% of pixels agree")
    except Exception as exc:  # any failure of the golden run refuses the bundle; the reason is reported
        error = exc if isinstance(exc, BundleError) else BundleError(f"{type(exc).__name__}: {exc}")
        report.fail("selftest", error)
    finally:
        predictor.close()


def verify(path: str | os.PathLike, trust: TrustPolicy = NO_KEYS, *, graph: bool = True) -> Report:
    """Verify a bundle directory or a packed archive (unpacked into a temporary directory).

    With keys in ``trust`` an archive whose own manifest is not validly signed is not unpacked at all.
    """
    path = Path(path)
    if path.is_dir():
        return verify_dir(path, trust, graph=graph)
    report = Report(str(path))
    if not path.exists():
        raise ArchiveError(f"{path}: no such file or directory")
    with tempfile.TemporaryDirectory(prefix="m2fp-verify-") as tmp:
        try:
            bundle = unpack(path, tmp, trust=trust)
        except SignatureError as exc:
            report.add("archive", SKIP, f"not unpacked: the signature over its {MANIFEST} was refused")
            report.fail("signature", exc)
            for name in ("manifest", "config", "weights", "graph"):
                report.add(name, SKIP, "not checked: the signature was refused")
            return report
        except ArchiveError as exc:
            report.fail("archive", exc)
            for name in ("manifest", "signature", "config", "weights", "graph"):
                report.add(name, SKIP, "not checked: the archive was refused")
            return report
        report.version = bundle.name
        files = [p for p in bundle.rglob("*") if p.is_file()]
        report.add("archive", OK, f"{len(files)} members under {bundle.name}/, no unsafe entries")
        return verify_dir(bundle, trust, graph=graph, report=report)


# ----------------------------------------------------------------------------------------- install
def install(source: str | os.PathLike, bundles: str | os.PathLike, *, force: bool = False,
            trust: TrustPolicy = NO_KEYS, model: str = MODEL,
            expect_identity: str | None = None, expect_version: str | None = None) -> Installed:
    """Install a packed archive (or a bundle directory) as ``<bundles>/<model>/<version>``.

    ``expect_version``: the version the caller asked for; a source holding another one is refused
    before anything is unpacked or replaced (ArchiveError, BundleError for a directory). With keys in
    ``trust`` an archive's signature is checked on its own manifest before its files are extracted.
    Raises VersionExists (already installed, or installed concurrently), ArchiveError, OSError
    (e.g. ENOSPC) or VerificationFailed (``.report`` holds the checks); in every case nothing is left.
    """
    source = Path(source)
    store = BundleStore(bundles, model)
    if source.is_dir():
        version = source.name
        if not is_version_name(version):
            raise BundleError(f"{source}: the directory name {version!r} is not a version name like v1.2")
    elif source.exists():
        version = peek_version(source)
    else:
        raise ArchiveError(f"{source}: no such file or directory")
    if expect_version is not None and version != expect_version:
        error = BundleError if source.is_dir() else ArchiveError
        raise error(f"{source}: holds version {version}, not the requested {expect_version}; nothing installed")
    final = store.path(version)
    if final.exists() and not force:
        raise VersionExists(f"{model}/{version} is already installed; versions are immutable (use --force to replace)")
    with store.scratch(version) as stage:
        report = Report(str(source), version)
        if source.is_dir():
            bundle = _copy_bundle(source, stage)
            report.add("copy", OK, f"copied into {stage.name}/")
        else:
            try:
                bundle = unpack(source, stage, trust=trust)
            except SignatureError as exc:
                report.add("archive", SKIP, f"not unpacked: the signature over its {MANIFEST} was refused")
                report.fail("signature", exc)
                raise VerificationFailed(f"{version} not installed: signature: {exc}", report) from None
            report.add("archive", OK, f"unpacked into {stage.name}/, no unsafe entries"
                       + (", signature checked before extraction" if trust.required else ""))
        verify_dir(bundle, trust, report=report)
        if expect_identity is not None and report.bundle is not None:
            got = report.bundle.identity
            if got == expect_identity:
                report.add("identity", OK, f"content key {got[:12]}… is the one the server announced")
            else:
                report.add("identity", FAIL, f"content key {got[:12]}… but the server announced "
                                             f"{expect_identity[:12]}…")
        if not report.ok:
            failure = report.first_failure()
            raise VerificationFailed(f"{version} not installed: {failure.name if failure else '?'}: "
                                     f"{failure.detail if failure else 'no checks'}", report)
        replaced = store.publish(bundle, version, force=force)
    return Installed(version, final, report, replaced)


def _copy_bundle(src: Path, stage: Path) -> Path:
    """Copy the manifest's files and side files of ``src`` into ``stage/<version>`` (no links followed)."""
    manifest = reader.manifest_mod.read(src)
    dest = stage / src.name
    dest.mkdir()
    names = [MANIFEST] + ([SIGNATURE] if (src / SIGNATURE).is_file() else []) + sorted(manifest.files)
    for rel in names:
        p = src / rel
        if p.is_symlink() or not p.is_file():
            raise BundleError(f"{rel}: listed in {MANIFEST} but missing or not a regular file")
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        with open(p, "rb") as f:
            fd = os.open(dest / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                while chunk := f.read(1 << 20):
                    write_all(fd, chunk)
                os.fsync(fd)
            finally:
                os.close(fd)
    return dest


# ------------------------------------------------------------------------------ aliases, rm, list
def promote(bundles: str | os.PathLike, version: str, alias: str, *, trust: TrustPolicy = NO_KEYS,
            model: str = MODEL) -> Report:
    """Point ``alias`` at ``version`` in aliases.json (atomically) — only if the version verifies."""
    if not is_alias_name(alias) or alias == "auto":
        raise BundleError(f"{alias!r} is not an alias name (a lower-case word like latest or stable; not 'auto')")
    store = BundleStore(bundles, model)
    path = store.path(version)
    if not path.is_dir():
        raise BundleError(f"{model}/{version} is not installed in {store.root}")
    report = verify_dir(path, trust)
    if not report.ok:
        failure = report.first_failure()
        raise VerificationFailed(f"{version} does not verify ({failure.name}: {failure.detail}); "  # type: ignore[union-attr]
                                 f"{alias} not moved", report)
    store.set_alias(alias, version)
    return report


def load_routes_refs(routes_file: str | os.PathLike) -> dict[str, list[str]]:
    """Version → the places a routes file (TOML, or JSON by suffix) names it: weights, aliases, shadow.

    The file is read and validated as the server reads it (``runtime.routes_file``): one that the server
    would refuse cannot tell which versions it uses, and is a BundleError."""
    path = Path(routes_file)
    if not path.exists() and not path.is_symlink():
        raise BundleError(f"routes file {path}: not found")
    try:
        routes = load_routes(path)
    except RoutesError as exc:
        raise BundleError(f"routes file {path}: unreadable ({exc}); cannot tell which versions it uses") from None
    refs: dict[str, list[str]] = {}
    for v, w in routes.weights:
        refs.setdefault(v, []).append(f"routes file {path.name} → weights ({w:g})")
    for a, v in routes.aliases.items():
        refs.setdefault(v, []).append(f"routes file {path.name} → aliases → {a}")
    if routes.shadow is not None:
        refs.setdefault(routes.shadow.version, []).append(f"routes file {path.name} → shadow")
    return refs


def references(bundles: str | os.PathLike, version: str, routes_file: str | os.PathLike | None = None,
               model: str = MODEL) -> list[str]:
    store = BundleStore(bundles, model)
    refs = [f"{store.model}/aliases.json → {a}" for a, v in sorted(store.read_aliases().items()) if v == version]
    if routes_file is not None:
        refs += load_routes_refs(routes_file).get(version, [])
    return refs


def remove(bundles: str | os.PathLike, version: str, *, routes_file: str | os.PathLike | None = None,
           force: bool = False, model: str = MODEL) -> list[str]:
    """Remove an installed version (renamed away first, then deleted); returns the overridden references.

    Refused while aliases.json or the routes file names the version, unless ``force``; a forced
    removal also drops aliases.json entries that would point at nothing.
    """
    store = BundleStore(bundles, model)
    if not store.path(version).is_dir():
        raise BundleError(f"{model}/{version} is not installed in {store.root}")
    refs = references(bundles, version, routes_file, model)
    if refs and not force:
        raise VersionInUse(f"{version} is still in use ({'; '.join(refs)}); change those first or use --force")
    store.remove(version)
    store.update_aliases(lambda aliases: {a: v for a, v in aliases.items() if v != version})
    return refs


def list_versions(bundles: str | os.PathLike, trust: TrustPolicy = NO_KEYS, model: str = MODEL) -> list[dict]:
    """One row per installed version: channel, task, aliases, signature, size (no hashing: fast)."""
    from ..bundle import manifest as manifest_mod
    from ..bundle import signature

    store = BundleStore(bundles, model)
    aliases = store.read_aliases()
    rows = []
    for version in store.versions():
        path = store.dir / version
        row: dict[str, Any] = {"version": version, "aliases": sorted(a for a, v in aliases.items() if v == version),
                               "channel": None, "task": None, "created_at": None, "problem": None,
                               "bytes": None, "identity": None, "signed": "no"}
        try:
            cfg = BundleConfig.read(path)
            row.update(channel=cfg.channel, task=cfg.task, created_at=cfg.created_at)
        except BundleError as exc:
            row["problem"] = str(exc)
        try:
            manifest = manifest_mod.read(path)
            sig = signature.read_signature_bytes(path)
            row["bytes"] = manifest.total_bytes
            row["identity"] = reader.identity(manifest.raw, sig)
            if sig is not None:
                row["signed"] = "yes"
                if trust.required:
                    signature.check(manifest.raw, sig, trust)
                    row["signed"] = "verified"
        except SignatureError:
            row["signed"] = "WRONG"
        except BundleError as exc:
            row["problem"] = row["problem"] or str(exc)
        rows.append(row)
    return rows
