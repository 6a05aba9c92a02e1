"""The live routing table: loaded from the routes file, hot-reloaded, changed by admins, rolled back.

Invariant: every change goes through :meth:`RoutesState.apply`, which hands the registry one
:class:`~m2fpkit.runtime.registry.RouteOverlay` (alias overrides, pinned versions, the table for the
last-known-good record); a refused change leaves the routes in force untouched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

from m2fpkit.runtime.registry import Registry, RouteOverlay

from .routing import Routes, RoutesError, load_routes, parse_routes

log = logging.getLogger(__name__)
HISTORY = 20


class RoutesState:
    def __init__(self, registry: Registry, path: Path | None) -> None:
        self.registry, self.path = registry, path
        self.current = Routes()
        self._history: list[Routes] = []

    def apply(self, routes: Routes, *, remember: bool = True) -> Routes:
        if remember and routes != self.current:
            self._history = (self._history + [self.current])[-HISTORY:]
        self.current = routes
        pinned = routes.weighted_versions() | ({routes.shadow.version} if routes.shadow else set())
        self.registry.apply_routes(RouteOverlay(aliases=routes.aliases, pinned=frozenset(pinned),
                                                routes=routes.to_dict()))
        log.info("routes: %s", routes.to_dict())
        return routes

    def reload(self) -> Routes:
        """Re-read the routes file; a broken file raises and leaves the current routes in place."""
        if self.path is None:
            raise RoutesError("no routes file configured (start with --routes FILE)")
        return self.apply(load_routes(self.path))

    def restore_last_known_good(self) -> bool:
        """Apply the routes recorded in the last-known-good state, if any and valid; True if applied."""
        state = self.registry.last_known_good
        if state is None or not state.routes:
            return False
        raw = {k: v for k, v in state.routes.items() if k != "source"}
        try:
            routes = parse_routes(raw, "last-known-good")
        except RoutesError as exc:
            log.error("last-known-good routes refused: %s", exc)
            return False
        self.apply(dataclasses.replace(routes, source="last-known-good"))
        return True

    def set_weights(self, weights: dict[str, float]) -> Routes:
        raw = self.current.to_dict()
        raw["weights"] = weights
        raw.pop("source", None)
        return self.apply(dataclasses.replace(parse_routes(raw, "admin weights"), source="admin"))

    def rollback(self) -> Routes:
        if not self._history:
            raise RoutesError("no earlier routing to roll back to")
        previous = self._history.pop()
        return self.apply(previous, remember=False)

    async def watch(self, stop: asyncio.Event) -> None:
        """Reload when the routes file changes; keep the old routes if the new file is broken."""
        if self.path is None:
            return
        from m2fpkit.runtime.watcher import watch

        target = self.path.resolve()

        async def changed() -> None:
            try:
                self.reload()
            except RoutesError as exc:
                log.error("routes file change ignored: %s", exc)
                return
            await self.registry.rescan()

        await watch(target.parent, lambda _c, p: Path(p).resolve() == target, changed, stop, recursive=False,
                    debounce=200)
