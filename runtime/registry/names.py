"""Names → versions: exact versions, aliases, ``latest``, the client's API filter, and the pinned set.

Aliases are the store's ``aliases.json``, overridden by the server's :class:`RouteOverlay`; an alias
whose target is not usable falls back to the target recorded in the last-known-good state, if that one is
usable (an alias named nowhere any more is not brought back). ``latest`` is the ``latest`` alias if it
names a usable (and API-compatible) version, else the newest *ready* release by semver, else the newest
usable one (pre-releases only when there is nothing else). Under a client's API filter, ``latest`` never
falls back to an *experimental* version (an explicit ``latest`` alias is the operator's choice and is
kept): a client asking for API 2.0 gets 409 naming the experimental versions that declare it, to be
asked for by name. An unknown name's error lists the names that exist.

Invariants: resolution reads the slot table, ``aliases.json``, the overlay and the last-known-good
aliases and changes nothing (it never loads); a name resolves only to a usable version, compatible with
the client's API when one is given, or raises the matching :class:`~m2fpkit.runtime.errors.VersionError`.
The overlay is the one interface through which the server changes names; it is replaced whole.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..bundle.config import BundleConfig
from ..bundle.store import BundleStore
from ..bundle.versions import SemVer, check_name, is_version_name
from ..errors import IncompatibleAPI, UnknownVersion, VersionUnavailable
from .lifecycle import Slot


@dataclass(frozen=True)
class RouteOverlay:
    """What the server's routing table adds to the store's names (replaced whole on every change).

    ``aliases`` override ``aliases.json``; ``pinned`` versions are kept loaded (weighted and shadow
    versions); ``routes`` is the table itself, recorded with the last-known-good state.
    """

    aliases: Mapping[str, str] = field(default_factory=dict)
    pinned: frozenset[str] = frozenset()
    routes: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "aliases", types.MappingProxyType(dict(self.aliases)))
        object.__setattr__(self, "pinned", frozenset(self.pinned))
        object.__setattr__(self, "routes", types.MappingProxyType(dict(self.routes)))


class Names:
    """Name resolution over a slot table; see the module docstring."""

    def __init__(self, store: BundleStore, slots: Mapping[str, Slot], *, preload: Iterable[str] = (),
                 fallback: Callable[[], Mapping[str, str]] = dict) -> None:
        self.store = store
        self.slots = slots
        self.preload = frozenset(preload)
        #: alias → version of the last-known-good state
        self.fallback = fallback
        self.overlay = RouteOverlay()

    # -------------------------------------------------------------------------------- lookups
    def config(self, version: str) -> BundleConfig | None:
        slot = self.slots.get(version)
        return slot.config if slot else None

    def is_ready(self, version: str) -> bool:
        slot = self.slots.get(version)
        return bool(slot and slot.ready)

    def is_usable(self, version: str) -> bool:
        slot = self.slots.get(version)
        return bool(slot and slot.usable)

    def compatible(self, version: str, api: str | None) -> bool:
        """True without an API, else when the version's config declares ``api``."""
        if api is None:
            return True
        config = self.config(version)
        return config is not None and api in config.compatible_api

    def experimental(self, version: str) -> bool:
        config = self.config(version)
        return config is not None and config.channel == "experimental"

    def versions(self) -> list[str]:
        """Listed versions (not removed), oldest first by semver."""
        return sorted((n for n, s in self.slots.items() if not s.removed), key=SemVer.parse)

    # -------------------------------------------------------------------------------- aliases
    def aliases(self) -> dict[str, str]:
        """Alias → version: aliases.json, overridden by the overlay, dangling ones repaired from last-known-good
        (an alias that is no longer named anywhere stays gone)."""
        out = {**self.store.read_aliases(), **self.overlay.aliases}
        for alias, old in self.fallback().items():
            if alias in out and not self.is_usable(out[alias]) and self.is_usable(old):
                out[alias] = old
        return out

    def latest(self, api: str | None = None) -> str | None:
        """Where ``latest`` points for a client speaking ``api`` (any client when None); None if nowhere."""
        target = self.aliases().get("latest")
        if target and self.is_usable(target) and self.compatible(target, api):
            return target
        usable = [n for n, s in self.slots.items() if s.usable and self.compatible(n, api)
                  and (api is None or not self.experimental(n))]
        ready = [n for n in usable if self.slots[n].active is not None]
        return _newest_release(ready or usable)

    def resolve(self, name: str, api: str | None = None) -> str:
        """The version ``name`` (a version, ``latest`` or an alias) stands for; raises a VersionError."""
        check_name(name)
        if name == "latest":
            target = self.latest(api)
            if target is not None:
                return target
            if api is not None and self.latest() is not None:
                experimental = [n for n in self.versions() if self.is_usable(n) and self.compatible(n, api)]
                hint = (f" outside the experimental channel ({', '.join(experimental)} does: ask for it by name)"
                        if experimental else "")
                raise IncompatibleAPI(f"no available version declares API {api!r} compatible{hint}")
            raise VersionUnavailable("no versions yet" if not self.slots else "no version is available")
        target = name if is_version_name(name) else self.aliases().get(name)
        if target is None:
            raise UnknownVersion(f"no version or alias named {name!r}; {self.available()}")
        slot = self.slots.get(target)
        if slot is None or slot.removed:
            via = f" (alias {name!r})" if target != name else ""
            raise UnknownVersion(f"version {target!r} does not exist{via}; {self.available()}")
        if not slot.usable:
            raise VersionUnavailable(f"version {target} failed: {slot.reason}")
        if not self.compatible(target, api):
            declared = ", ".join(slot.config.compatible_api) if slot.config else "?"
            raise IncompatibleAPI(f"{target} is compatible with API {declared}, not {api!r}")
        return target

    def available(self, limit: int = 20) -> str:
        """The names a client may use, for an error message: listed versions, then aliases (bounded)."""
        def listing(names: list[str]) -> str:
            return ", ".join(names[:limit]) + (f", … ({len(names) - limit} more)" if len(names) > limit else "")
        versions = self.versions()
        if not versions:
            return "no versions yet"
        aliases = sorted({"latest", *self.aliases()})
        return f"available versions: {listing(versions)}; aliases: {listing(aliases)}"

    # --------------------------------------------------------------------------------- pinned
    def pinned(self) -> set[str]:
        """Versions kept loaded: latest and the release about to become latest, alias targets, the
        overlay's pinned versions and the preload list."""
        pins = set(self.preload) | set(self.overlay.pinned) | set(self.aliases().values())
        newest = _newest_release([n for n, s in self.slots.items() if s.usable])
        pins.update(v for v in (self.latest(), newest) if v)
        return {p for p in pins if p in self.slots}


def _newest_release(names: list[str]) -> str | None:
    """The newest release by semver; the newest pre-release when there is no release."""
    releases = [n for n in names if not SemVer.parse(n).prerelease] or names
    return max(releases, key=SemVer.parse) if releases else None
