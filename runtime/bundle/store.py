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
import fcntl
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import BundleError, MalformedFile, VersionExists
from . import jsonfile
from .atomic import exchange, fsync_dir, rename_noreplace, write_atomic
from .versions import SemVer, check_name, is_alias_name, is_version_name

log = logging.getLogger(__name__)

ALIASES = "aliases.json"
#: the model directory under a bundle root (the only model this project serves)
MODEL = "m2fp"
MAX_ALIASES_BYTES = 1 << 20


class BundleStore:
    """Versions of one model under a bundle root."""

    def __init__(self, root: str | os.PathLike, model: str = MODEL) -> None:
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
        """Alias → version from ``aliases.json``; never raises for its content.

        Missing: ``{}``. Unreadable, malformed (MalformedFile: too large, too deep, not JSON) or not an
        object: ``{}`` and one warning per state of the file (readers call this on every request).
        Entries that are not an alias name → version name are dropped.
        """
        path = self.dir / ALIASES

        def ignored(why: object) -> dict[str, str]:
            try:
                st = path.stat()
                state: tuple = (st.st_ino, st.st_size, st.st_mtime_ns, str(why))
            except OSError:
                state = (str(why),)
            if getattr(self, "_aliases_ignored", None) != state:
                self._aliases_ignored = state
                log.warning("%s ignored: %s", path, why)
            return {}

        try:
            raw = jsonfile.read(path, f"{self.model}/{ALIASES}", max_bytes=MAX_ALIASES_BYTES)
        except FileNotFoundError:
            return {}
        except (OSError, MalformedFile) as exc:
            return ignored(exc)
        if not isinstance(raw, dict):
            return ignored("expected an object of alias → version")
        return {k: v for k, v in raw.items()
                if isinstance(k, str) and isinstance(v, str) and is_alias_name(k) and is_version_name(v)}

    def write_aliases(self, aliases: dict[str, str]) -> None:
        for k, v in aliases.items():
            if not is_alias_name(k) or not is_version_name(v):
                raise BundleError(f"alias {k!r} → {v!r}: not an alias name and a version name")
        write_atomic(self.dir / ALIASES, jsonfile.dumps(aliases))

    def update_aliases(self, change: Callable[[dict[str, str]], dict[str, str]]) -> dict[str, str]:
        """Read, ``change`` and write aliases.json under a lock shared by every process; returns the result."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)  # the lock is on the directory: no lock file
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            current = self.read_aliases()
            wanted = change(dict(current))
            if wanted != current:
                self.write_aliases(wanted)
            return wanted
        finally:
            os.close(fd)

    def set_alias(self, alias: str, version: str) -> None:
        self.update_aliases(lambda aliases: {**aliases, alias: version})

    # -------------------------------------------------------------------------------- publishing
    @contextlib.contextmanager
    def scratch(self, version: str) -> Iterator[Path]:
        """An empty hidden directory next to the versions (same file system, ignored by readers), removed on exit."""
        self.dir.mkdir(parents=True, exist_ok=True)
        stage = self.dir / f".staging-{version}-{uuid.uuid4().hex[:8]}"
        stage.mkdir()
        try:
            yield stage
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def publish(self, src: Path, version: str, *, force: bool = False) -> bool:
        """Move the complete bundle ``src`` (on this file system) into place; True if it replaced one.

        Never merges into or silently replaces an existing directory: without ``force`` a version
        that appeared meanwhile wins; with it, the two directories are exchanged in one step.
        """
        final = self.path(version)
        try:
            rename_noreplace(src, final)
        except FileExistsError:
            if not force:
                raise VersionExists(f"{self.model}/{version} appeared meanwhile; not replaced") from None
            if exchange(src, final):
                shutil.rmtree(src, ignore_errors=True)  # now holds the old bundle
            else:
                old = final.with_name(f".replaced-{version}-{uuid.uuid4().hex[:8]}")
                os.rename(final, old)
                os.rename(src, final)
                shutil.rmtree(old, ignore_errors=True)
            fsync_dir(self.dir)
            return True
        fsync_dir(self.dir)
        return False

    def remove(self, version: str) -> None:
        """Remove a version by renaming it away first, so readers never see half of it."""
        final = self.path(version)
        if not final.is_dir():
            raise BundleError(f"{self.model}/{version} does not exist")
        gone = final.with_name(f".removed-{version}-{uuid.uuid4().hex[:8]}")
        os.rename(final, gone)
        shutil.rmtree(gone, ignore_errors=True)
