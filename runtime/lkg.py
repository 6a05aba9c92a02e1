"""Last-known-good state of an edge box: the version set and routing it last served successfully.

``<state dir>/.lkg.json`` — the state directory is the server's ``--state-dir`` (``$M2FP_STATE_DIR``),
else the store directory (e.g. ``bundles/m2fp``, next to ``aliases.json``) when it is writable; where it
is, or why there is none, is decided by :mod:`m2fpkit.runtime.registry.recovery`. A dot-file, so
watchers and version scans ignore it::

    {"schema": 1, "recorded_at": "2026-11-25T12:00:00Z",
     "versions": {"v1.0": "<content key of v1.0>", "v1.2": "…"},
     "aliases": {"latest": "v1.2", "stable": "v1.0"},
     "routes": {"weights": {"v1.2": 90, "v1.0": 10}, …}}

A version is identified by its content key (``bundle.reader.identity``: the manifest's SHA-256, plus the
signature's when signed): the manifest pins the hash of every other file, so an unchanged key plus a
passing verification means the very bundle that was recorded. :meth:`LastKnownGood.intact` tells which
recorded versions are still on disk unchanged (cheap: one small file per version; the registry still
verifies before loading).

The file is written atomically (temporary file, fsync, rename, fsync of the directory), so a crash
leaves the previous record or the new one, never half of either. :func:`load` never raises for a
missing or damaged file (a FIFO, a link or anything but a regular file included: ``bundle.regular``): it
returns None and logs why, because boot must go on without it. Blocking: the registry calls it off the
event loop.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bundle import jsonfile
from .bundle.atomic import write_atomic
from .bundle.reader import identity_of
from .bundle.versions import is_alias_name, is_version_name
from .errors import BundleError, MalformedFile

log = logging.getLogger(__name__)

LKG = ".lkg.json"
SCHEMA = 1


_IDENTITY = re.compile(r"[0-9a-f]{64}(-[0-9a-f]{16})?")
MAX_BYTES = 4 << 20


@dataclass(frozen=True)
class LastKnownGood:
    versions: dict[str, str]
    aliases: dict[str, str] = field(default_factory=dict)
    routes: dict[str, Any] = field(default_factory=dict)
    recorded_at: str = ""

    def intact(self, store_dir: str | os.PathLike) -> dict[str, str | None]:
        """For each recorded version: None if its bundle under ``store_dir`` (the model directory) has the
        recorded content key, else why not."""
        out: dict[str, str | None] = {}
        for version, digest in self.versions.items():
            path = Path(store_dir) / version
            try:
                now = identity_of(path)
            except BundleError as exc:
                out[version] = "missing" if not path.is_dir() else str(exc)
                continue
            out[version] = None if now == digest else "content changed since it was recorded"
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "recorded_at": self.recorded_at, "versions": dict(self.versions),
                "aliases": dict(self.aliases), "routes": self.routes}


def _check(versions: Any, aliases: Any, routes: Any) -> None:
    if not isinstance(versions, dict) or not all(
            isinstance(v, str) and is_version_name(v) and isinstance(d, str) and _IDENTITY.fullmatch(d)
            for v, d in versions.items()):
        raise ValueError("versions: expected {version name: content key (bundle.reader.identity)}")
    if not isinstance(aliases, dict) or not all(
            isinstance(a, str) and is_alias_name(a) and isinstance(v, str) and is_version_name(v)
            for a, v in aliases.items()):
        raise ValueError("aliases: expected {alias name: version name}")
    if not isinstance(routes, dict):
        raise ValueError("routes: expected an object")


def record(state_dir: str | os.PathLike, versions: dict[str, str], aliases: dict[str, str],
           routes: dict[str, Any]) -> None:
    """Atomically write ``<state_dir>/.lkg.json`` (creating the directory); ValueError for malformed input,
    OSError when it cannot be written."""
    _check(versions, aliases, routes)
    store = Path(state_dir)
    store.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    state = LastKnownGood(dict(versions), dict(aliases), json.loads(json.dumps(routes)), now)
    write_atomic(store / LKG, jsonfile.dumps(state.to_dict()))


def load(state_dir: str | os.PathLike) -> LastKnownGood | None:
    """The recorded state, or None when there is none or it is unreadable (logged)."""
    path = Path(state_dir) / LKG
    try:
        raw = jsonfile.read(path, LKG, max_bytes=MAX_BYTES, follow_links=False)
    except FileNotFoundError:
        return None
    except (OSError, MalformedFile) as exc:
        log.warning("%s ignored: unreadable (%s)", path, exc)
        return None
    try:
        if not isinstance(raw, dict):
            raise ValueError("expected an object")
        if raw.get("schema") != SCHEMA:
            raise ValueError(f"schema {raw.get('schema')!r}, this runtime reads {SCHEMA}")
        versions, aliases, routes = raw.get("versions"), raw.get("aliases", {}), raw.get("routes", {})
        _check(versions, aliases, routes)
    except ValueError as exc:
        log.warning("%s ignored: %s", path, exc)
        return None
    return LastKnownGood(dict(versions or {}), dict(aliases), routes, str(raw.get("recorded_at", "")))
