"""Verify, install, promote, remove and list bundles in a bundle root.

**Verify** runs every check and reports each one (``ok`` / ``FAIL`` / ``skip``): the archive's
safety (for a tar), the manifest (every file's size and SHA-256, no unlisted file), the config
(schema via :class:`BundleConfig`, version = directory name, model file present), the graph (an
onnxruntime session of ``model.onnx`` checked against ``config.json`` by ``check_graph``), the golden
self-test when the bundle carries one, and the Ed25519 signature. With public keys configured a
missing or wrong signature fails; without, the signature is reported but not required.

**Install** unpacks into ``<root>/m2fp/.staging-<version>-<random>/<version>/`` (a dot-directory:
version scans and the server's watcher ignore it), verifies there, then publishes with one
``renameat2(RENAME_NOREPLACE)``: of two concurrent installs of one version exactly one rename
succeeds, the other fails with :class:`VersionExists` and removes its staging copy. A failure at
any point — a bad archive, a failed check, a full disk — removes the staging directory, so nothing
partial is ever visible under a version name. ``force`` replaces an installed version by swapping
the two directories atomically (``BundleStore``'s exchange).
"""

from __future__ import annotations

import json
import os
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bundle import BundleConfig
from ..errors import BundleError
from ..lkg import manifest_sha256
from ..manifest import MANIFEST, read_manifest, verify_manifest
from ..store import BundleStore, VersionExists
from ..versions import is_alias_name, is_version_name
from . import MODEL, ArchiveError, SignatureError, VerificationFailed, VersionInUse
from .pack import SIGNATURE, peek_version, unpack, write_all
from .signing import PublicKeys, public_keys, read_signature, verify_signature

OK, FAIL, SKIP = "ok", "FAIL", "skip"


@dataclass
class Check:
    name: str
    status: str
    detail: str


@dataclass
class Report:
    """Every check run on one bundle (a directory or an archive) and its result."""

    subject: str
    version: str | None = None
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.status != FAIL for c in self.checks)

    def add(self, name: str, status: str, detail: str) -> Check:
        check = Check(name, status, detail)
        self.checks.append(check)
        return check

    def first_failure(self) -> Check | None:
        return next((c for c in self.checks if c.status == FAIL), None)

    def render(self) -> str:
        lines = [f"{self.subject}" + (f" → {self.version}" if self.version else "")]
        lines += [f"  {c.status:<4}  {c.name:<10} {c.detail}" for c in self.checks]
        failure = self.first_failure()
        lines.append("verified" if self.ok else f"NOT verified: {failure.name if failure else 'no checks'}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "version": self.version, "ok": self.ok,
                "checks": [{"name": c.name, "status": c.status, "detail": c.detail} for c in self.checks]}


@dataclass(frozen=True)
class Installed:
    version: str
    path: Path
    report: Report
    replaced: bool


# ------------------------------------------------------------------------------------------ verify
def verify_dir(bundle_dir: str | os.PathLike, keys: PublicKeys | None = None, *, graph: bool = True,
               report: Report | None = None) -> Report:
    """Run every check on a bundle directory; never raises for a bad bundle (see ``report.ok``)."""
    bundle_dir = Path(bundle_dir)
    report = report or Report(str(bundle_dir), bundle_dir.name)
    trusted = public_keys(keys)  # a missing key file is an error of the command, not of the bundle
    config = None
    try:
        manifest = verify_manifest(bundle_dir)
        size = sum(e["size"] for e in manifest["files"].values())
        report.add("manifest", OK, f"{len(manifest['files'])} files, {size / 2**20:.1f} MB, sizes and SHA-256 match")
    except BundleError as exc:
        report.add("manifest", FAIL, str(exc))
    if report.ok:
        try:
            config = BundleConfig.read(bundle_dir)
            if config.version != bundle_dir.name:
                raise BundleError(f"config.json → version: {config.version!r} but the directory is {bundle_dir.name!r}")
            if not (bundle_dir / config.model_file).is_file():
                raise BundleError(f"config.json → model_file: {config.model_file} is missing")
            report.add("config", OK, f"schema {config.schema_version}, {config.task}, {config.num_classes} classes, "
                                     f"channel {config.channel}, API {', '.join(config.compatible_api)}")
        except BundleError as exc:
            report.add("config", FAIL, str(exc))
    else:
        report.add("config", SKIP, "not checked: the manifest failed")
    if config is not None and graph:
        _check_graph(bundle_dir, config, report)
    elif graph:
        report.add("graph", SKIP, "not checked: an earlier check failed")
    _check_signature(bundle_dir, trusted, report)
    return report


def _check_graph(bundle_dir: Path, config: BundleConfig, report: Report) -> None:
    from ..session import RuntimeSettings, SessionFactory
    from ..verify import check_graph

    try:
        factory = SessionFactory(RuntimeSettings(intra_op_threads=1, optimization="basic"))
        session = factory.create(bundle_dir / config.model_file, config.weights_index)
        check_graph(config, session)
    except BundleError as exc:
        report.add("graph", FAIL, str(exc)[:500])
        return
    report.add("graph", OK, f"{config.model_file}: inputs, outputs, types and metadata agree with config.json")
    if not config.golden:
        return
    from ..predictor import Predictor

    try:
        agreement = Predictor(bundle_dir, config, session).self_test()
        report.add("selftest", OK, f"golden sample: {100 * (agreement or 0):.2f}% of pixels agree")
    except Exception as exc:  # any failure of the golden run refuses the bundle; the reason is reported
        report.add("selftest", FAIL, str(exc) if isinstance(exc, BundleError) else f"{type(exc).__name__}: {exc}")


def _check_signature(bundle_dir: Path, trusted: list, report: Report) -> None:
    if trusted:
        try:
            kid = verify_signature(bundle_dir, trusted)
            report.add("signature", OK, f"Ed25519 over {MANIFEST}, trusted key {kid}")
        except SignatureError as exc:
            report.add("signature", FAIL, str(exc))
        return
    if not (bundle_dir / SIGNATURE).exists():
        report.add("signature", SKIP, "unsigned (no public key configured, not required)")
        return
    try:
        kid, _ = read_signature(bundle_dir)
        report.add("signature", SKIP, f"signed by key {kid}; not checked (no public key configured)")
    except SignatureError as exc:
        report.add("signature", SKIP, f"{exc}; not checked (no public key configured)")


def verify(path: str | os.PathLike, keys: PublicKeys | None = None, *, graph: bool = True) -> Report:
    """Verify a bundle directory or a packed archive (unpacked into a temporary directory)."""
    path = Path(path)
    if path.is_dir():
        return verify_dir(path, keys, graph=graph)
    trusted = public_keys(keys)
    report = Report(str(path))
    if not path.exists():
        raise ArchiveError(f"{path}: no such file or directory")
    with tempfile.TemporaryDirectory(prefix="m2fp-verify-") as tmp:
        try:
            bundle = unpack(path, tmp)
        except ArchiveError as exc:
            report.add("archive", FAIL, str(exc))
            for name in ("manifest", "config", "graph", "signature"):
                report.add(name, SKIP, "not checked: the archive was refused")
            return report
        report.version = bundle.name
        files = [p for p in bundle.rglob("*") if p.is_file()]
        report.add("archive", OK, f"{len(files)} members under {bundle.name}/, no unsafe entries")
        return verify_dir(bundle, trusted, graph=graph, report=report)


# ----------------------------------------------------------------------------------------- install
def install(source: str | os.PathLike, bundles: str | os.PathLike, *, force: bool = False,
            keys: PublicKeys | None = None, model: str = MODEL,
            expect_manifest_sha256: str | None = None) -> Installed:
    """Install a packed archive (or a bundle directory) as ``<bundles>/<model>/<version>``.

    Raises VersionExists (already installed, or installed concurrently), ArchiveError, OSError
    (e.g. ENOSPC) or VerificationFailed (``.report`` holds the checks); in every case nothing is left.
    """
    source = Path(source)
    trusted = public_keys(keys)
    store = BundleStore(bundles, model)
    if source.is_dir():
        version = source.name
        if not is_version_name(version):
            raise BundleError(f"{source}: the directory name {version!r} is not a version name like v1.2")
    elif source.exists():
        version = peek_version(source)
    else:
        raise ArchiveError(f"{source}: no such file or directory")
    final = store.path(version)
    if final.exists() and not force:
        raise VersionExists(f"{model}/{version} is already installed; versions are immutable (use --force to replace)")
    with store.scratch(version) as stage:
        report = Report(str(source), version)
        if source.is_dir():
            bundle = _copy_bundle(source, stage)
            report.add("copy", OK, f"copied into {stage.name}/")
        else:
            bundle = unpack(source, stage)
            report.add("archive", OK, f"unpacked into {stage.name}/, no unsafe entries")
        verify_dir(bundle, trusted, report=report)
        if expect_manifest_sha256 is not None:
            got = manifest_sha256(bundle)
            if got == expect_manifest_sha256:
                report.add("identity", OK, f"{MANIFEST} SHA-256 {got[:12]}… is the one the server announced")
            else:
                report.add("identity", FAIL, f"{MANIFEST} SHA-256 {got[:12]}… but the server announced "
                                             f"{expect_manifest_sha256[:12]}…")
        if not report.ok:
            failure = report.first_failure()
            raise VerificationFailed(f"{version} not installed: {failure.name if failure else '?'}: "
                                     f"{failure.detail if failure else 'no checks'}", report)
        replaced = store.publish(bundle, version, force=force)
    return Installed(version, final, report, replaced)


def _copy_bundle(src: Path, stage: Path) -> Path:
    """Copy the manifest's files and side files of ``src`` into ``stage/<version>`` (no links followed)."""
    manifest = read_manifest(src)
    dest = stage / src.name
    dest.mkdir()
    names = [MANIFEST] + ([SIGNATURE] if (src / SIGNATURE).is_file() else []) + sorted(manifest["files"])
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
def promote(bundles: str | os.PathLike, version: str, alias: str, *, keys: PublicKeys | None = None,
            model: str = MODEL) -> Report:
    """Point ``alias`` at ``version`` in aliases.json (atomically) — only if the version verifies."""
    if not is_alias_name(alias) or alias == "auto":
        raise BundleError(f"{alias!r} is not an alias name (a lower-case word like latest or stable; not 'auto')")
    store = BundleStore(bundles, model)
    path = store.path(version)
    if not path.is_dir():
        raise BundleError(f"{model}/{version} is not installed in {store.root}")
    report = verify_dir(path, keys)
    if not report.ok:
        failure = report.first_failure()
        raise VerificationFailed(f"{version} does not verify ({failure.name}: {failure.detail}); "  # type: ignore[union-attr]
                                 f"{alias} not moved", report)
    store.set_alias(alias, version)
    return report


def load_routes_refs(routes_file: str | os.PathLike) -> dict[str, list[str]]:
    """Version → the places a routes file (TOML, or JSON by suffix) names it: weights, aliases, shadow."""
    path = Path(routes_file)
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except FileNotFoundError:
        raise BundleError(f"routes file {path}: not found") from None
    except (OSError, ValueError) as exc:  # TOMLDecodeError is a ValueError
        raise BundleError(f"routes file {path}: unreadable ({exc}); cannot tell which versions it uses") from None
    refs: dict[str, list[str]] = {}
    if not isinstance(raw, dict):
        raise BundleError(f"routes file {path}: expected a table")
    weights, aliases, shadow = raw.get("weights", {}), raw.get("aliases", {}), raw.get("shadow") or {}
    for v, w in (weights.items() if isinstance(weights, dict) else []):
        refs.setdefault(v, []).append(f"routes file {path.name} → weights ({w})")
    for a, v in (aliases.items() if isinstance(aliases, dict) else []):
        if isinstance(v, str):
            refs.setdefault(v, []).append(f"routes file {path.name} → aliases → {a}")
    if isinstance(shadow, dict) and isinstance(shadow.get("version"), str):
        refs.setdefault(shadow["version"], []).append(f"routes file {path.name} → shadow")
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


def list_versions(bundles: str | os.PathLike, keys: PublicKeys | None = None, model: str = MODEL) -> list[dict]:
    """One row per installed version: channel, task, aliases, signature, size (no hashing: fast)."""
    trusted = public_keys(keys)
    store = BundleStore(bundles, model)
    aliases = store.read_aliases()
    rows = []
    for version in store.versions():
        path = store.dir / version
        row: dict[str, Any] = {"version": version, "aliases": sorted(a for a, v in aliases.items() if v == version),
                               "channel": None, "task": None, "created_at": None, "problem": None}
        try:
            cfg = BundleConfig.read(path)
            row.update(channel=cfg.channel, task=cfg.task, created_at=cfg.created_at)
        except BundleError as exc:
            row["problem"] = str(exc)
        try:
            row["bytes"] = sum(e["size"] for e in read_manifest(path)["files"].values())
            row["manifest_sha256"] = manifest_sha256(path)
        except (BundleError, OSError) as exc:
            row["bytes"], row["manifest_sha256"] = None, None
            row["problem"] = row["problem"] or str(exc)
        if not (path / SIGNATURE).exists():
            row["signed"] = "no"
        elif not trusted:
            row["signed"] = "yes"
        else:
            try:
                verify_signature(path, trusted)
                row["signed"] = "verified"
            except SignatureError:
                row["signed"] = "WRONG"
        rows.append(row)
    return rows
