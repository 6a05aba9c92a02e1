"""The bundle store on disk: ``<root>/<model>/<version>/`` plus ``<root>/<model>/aliases.json``.

Publishing is crash-safe: a bundle is written into a dot-directory next to its final place and
renamed into place in one step, so a reader (a server, a file watcher) sees either no version or a
complete one. Replacing a version (``force``) swaps the two directories with ``renameat2
(RENAME_EXCHANGE)``: the version name never points at nothing or at half a bundle.

Aliases live in ``aliases.json`` (``{"latest": "v1.2"}``) rather than in symlinks, so they survive
``scp -r``, zip files and file systems without links; dot-files and anything that is not a version
name are ignored by readers.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import BundleError
from .versions import SemVer, check_name, is_alias_name, is_version_name

log = logging.getLogger(__name__)

ALIASES = "aliases.json"
DEFAULT_MODEL = "m2fp"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class VersionExists(BundleError):
    """The version is already published and versions are immutable (use force to replace)."""


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the call is unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: file system without exchange
        return False
    raise OSError(err, os.strerror(err), str(a))


class BundleStore:
    """Versions of one model under a bundle root."""

    def __init__(self, root: str | os.PathLike, model: str = DEFAULT_MODEL) -> None:
        self.root = Path(root)
        self.model = model
        self.dir = self.root / model

    def path(self, version: str) -> Path:
        check_name(version)
        if not is_version_name(version):
            raise BundleError(f"{version!r} is an alias, not a version")
        return self.dir / version

    def versions(self) -> list[str]:
        """Published version names, oldest first by semver (dot/staging dirs and links ignored)."""
        if not self.dir.is_dir():
            return []
        names = [p.name for p in self.dir.iterdir()
                 if is_version_name(p.name) and p.is_dir() and not p.is_symlink()]
        return sorted(names, key=SemVer.parse)

    # ---------------------------------------------------------------------------------- aliases
    def read_aliases(self) -> dict[str, str]:
        path = self.dir / ALIASES
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("%s unreadable, ignored: %s", path, exc)
            return {}
        if not isinstance(raw, dict):
            log.warning("%s: expected an object, ignored", path)
            return {}
        return {k: v for k, v in raw.items()
                if isinstance(k, str) and isinstance(v, str) and is_alias_name(k) and is_version_name(v)}

    def write_aliases(self, aliases: dict[str, str]) -> None:
        for k, v in aliases.items():
            if not is_alias_name(k) or not is_version_name(v):
                raise BundleError(f"alias {k!r} → {v!r}: not an alias name and a version name")
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{ALIASES}.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(aliases, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.dir / ALIASES)

    def set_alias(self, alias: str, version: str) -> None:
        aliases = self.read_aliases()
        aliases[alias] = version
        self.write_aliases(aliases)

    # -------------------------------------------------------------------------------- publishing
    @contextlib.contextmanager
    def staging(self, version: str, *, force: bool = False) -> Iterator[Path]:
        """Yield an empty hidden directory; on normal exit publish it as ``version``, else delete it."""
        final = self.path(version)
        if final.exists() and not force:
            raise VersionExists(f"{self.model}/{version} already exists; versions are immutable (use --force to replace)")
        self.dir.mkdir(parents=True, exist_ok=True)
        stage = self.dir / f".staging-{version}-{uuid.uuid4().hex[:8]}"
        stage.mkdir()
        try:
            yield stage
            self._publish(stage, final, force)
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)

    def _publish(self, stage: Path, final: Path, force: bool) -> None:
        if not final.exists():
            try:
                os.rename(stage, final)  # fails if final appeared meanwhile: never merge into it
                return
            except OSError as exc:
                if not final.exists():
                    raise
                if not force:
                    raise VersionExists(f"{final.name} appeared while exporting; not replaced") from exc
        if not force:
            raise VersionExists(f"{final.name} already exists")
        if _exchange(stage, final):
            shutil.rmtree(stage, ignore_errors=True)  # now holds the old bundle
            return
        old = final.with_name(f".replaced-{final.name}-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
        os.rename(stage, final)
        shutil.rmtree(old, ignore_errors=True)

    def remove(self, version: str) -> None:
        """Remove a version by renaming it away first, so readers never see half of it."""
        final = self.path(version)
        if not final.is_dir():
            raise BundleError(f"{self.model}/{version} does not exist")
        gone = final.with_name(f".removed-{version}-{uuid.uuid4().hex[:8]}")
        os.rename(final, gone)
        shutil.rmtree(gone, ignore_errors=True)
