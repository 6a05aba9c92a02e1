"""What the registry looks like at one instant, as typed, frozen values.

Invariant: a :class:`RegistrySnapshot` is built in one pass on the event loop thread and never changes
afterwards; whoever renders it (``/api/versions``, ``/readyz``, metrics, :class:`~m2fpkit.runtime.api.Runtime`)
adds its own fields — such as the server's routing weight — to a fresh dict from :meth:`VersionStatus.to_dict`,
never to the snapshot.
"""

from __future__ import annotations

import dataclasses
import time
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..bundle.versions import SemVer
from .lifecycle import Slot, State
from .names import Names


@dataclass(frozen=True)
class VersionStatus:
    version: str
    state: State
    #: why the version cannot be used; None when fine
    reason: str | None
    #: why newer content on disk was refused while the loaded one keeps serving
    update_error: str | None
    channel: str | None
    task: str | None
    compatible_api: tuple[str, ...]
    semver: str
    created_at: str | None
    notes: str | None
    #: random-init weights, not a trained checkpoint (``BundleConfig.random_weights``); None without a config
    random_weights: bool | None
    #: what to tell a user about those weights (``BundleConfig.weights_note``), None for a trained checkpoint
    weights_note: str | None
    #: aliases naming this version (``latest`` included when it resolves here)
    aliases: tuple[str, ...]
    pinned: bool
    loaded: bool
    in_flight: int
    requests: int
    last_used_seconds_ago: float | None
    load_seconds: float | None
    memory_bytes: int
    shared_weight_bytes: int
    #: the execution plan the loaded content serves with and its evidence (``PlanChoice.to_dict``)
    plan: dict[str, Any] | None = None
    #: the runtime's verdict on the golden sample (``GoldenVerdict.to_dict``: degenerate, reason, classes);
    #: None without a golden sample (or before it could be read)
    golden: dict[str, Any] | None = None
    #: content key of the bundle ``config`` describes (``bundle.reader.identity``: what grades are keyed by);
    #: None before its bundle verified
    identity: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A new JSON-ready dict (the caller may add to it)."""
        out = dataclasses.asdict(self)
        out.update(state=self.state.value, compatible_api=list(self.compatible_api), aliases=list(self.aliases))
        return out


@dataclass(frozen=True)
class RegistrySnapshot:
    versions: tuple[VersionStatus, ...]
    latest: str | None
    aliases: Mapping[str, str]
    #: ``"on"`` or ``"off: <reason>"`` (no paths)
    last_known_good: str

    def get(self, version: str) -> VersionStatus | None:
        return next((s for s in self.versions if s.version == version), None)

    def states(self) -> dict[str, State]:
        return {s.version: s.state for s in self.versions}

    def ready(self) -> list[str]:
        """Versions that answer requests now, oldest first."""
        return [s.version for s in self.versions if s.state is State.READY]

    def to_dict(self) -> dict[str, Any]:
        return {"versions": [s.to_dict() for s in self.versions], "latest": self.latest,
                "aliases": dict(self.aliases), "last_known_good": self.last_known_good}


def version_status(slot: Slot, aliases: list[str], pinned: bool, now: float) -> VersionStatus:
    c, active = slot.config, slot.active
    return VersionStatus(
        version=slot.name, state=slot.state, reason=slot.reason, update_error=slot.update_error,
        channel=c.channel if c else None, task=c.task if c else None,
        compatible_api=tuple(c.compatible_api) if c else (), semver=str(SemVer.parse(slot.name)),
        created_at=c.created_at if c else None, notes=c.notes if c else None,
        random_weights=c.random_weights if c else None, weights_note=c.weights_note if c else None,
        aliases=tuple(sorted(set(aliases))), pinned=pinned, loaded=active is not None,
        in_flight=slot.in_flight, requests=slot.requests,
        last_used_seconds_ago=round(now - slot.last_used, 1) if slot.last_used else None,
        load_seconds=round(active.load_seconds, 3) if active else None,
        memory_bytes=active.memory_bytes if active else 0,
        shared_weight_bytes=active.shared_bytes if active else 0,
        plan=active.predictor.plan.to_dict() if active and active.predictor.plan else None,
        golden=slot.golden.to_dict() if slot.golden else None, identity=slot.identity or None)


def snapshot(slots: Mapping[str, Slot], names: Names, last_known_good: str) -> RegistrySnapshot:
    """The status of every slot (draining removed ones included), with latest, aliases and pins."""
    aliases, latest, pinned = names.aliases(), names.latest(), names.pinned()
    now = time.monotonic()
    versions = []
    for name in sorted(slots, key=SemVer.parse):
        named = [a for a, v in aliases.items() if v == name and a != "latest"] + (["latest"] if name == latest else [])
        versions.append(version_status(slots[name], named, name in pinned, now))
    return RegistrySnapshot(tuple(versions), latest, types.MappingProxyType(aliases), last_known_good)
