"""The live routing table: loaded from the routes file, hot-reloaded, changed by admins, rolled back.

Invariant: every change goes through :meth:`RoutesState.apply`, which hands the registry one
:class:`~m2fpkit.runtime.registry.RouteOverlay` (alias overrides, pinned versions, the table for the
last-known-good record); a refused change leaves the routes in force untouched, is logged with its
reason and counted by source in :attr:`RoutesState.refusals` (``m2fp_routes_refused_total``). Nothing a
routes file holds can stop the watcher: any failure to read or apply it is a refusal, and the next
edit is read again. The file is read off the event loop (a regular file only: ``runtime.routes_file``).

Versions the routes name that this server does not have (weights, aliases, shadow) are accepted with a
warning naming them — a routes file may be deployed before the bundles it names are pulled — while the
admin API, a person at a prompt, refuses them (404): a weighted version that is missing gets no traffic
(its buckets go to the others), a missing shadow version is not run (``m2fp_shadow_runs_total`` counts
those as ``dropped``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

from m2fpkit.runtime.registry import Registry, RouteOverlay
from m2fpkit.runtime.routes_file import Routes, RoutesError, brief_key, load_routes, parse_routes

log = logging.getLogger(__name__)
HISTORY = 20
#: where refused routes came from (the label values of ``m2fp_routes_refused_total``)
SOURCES = ("file", "admin", "last-known-good")


class RoutesState:
    def __init__(self, registry: Registry, path: Path | None) -> None:
        self.registry, self.path = registry, path
        self.current = Routes()
        self._history: list[Routes] = []
        #: refused routes by source, since start
        self.refusals: dict[str, int] = dict.fromkeys(SOURCES, 0)

    def apply(self, routes: Routes, *, remember: bool = True) -> Routes:
        """Make ``routes`` the routes in force (the registry first: if it refuses, nothing changed here)."""
        pinned = routes.weighted_versions() | ({routes.shadow.version} if routes.shadow else set())
        self.registry.apply_routes(RouteOverlay(aliases=routes.aliases, pinned=frozenset(pinned),
                                                routes=routes.to_dict()))
        if remember and routes != self.current:
            self._history = (self._history + [self.current])[-HISTORY:]
        self.current = routes
        log.info("routes: %s", routes.to_dict())
        missing = self.missing(routes)
        if missing:
            log.warning("routes (%s) name versions this server does not have: %s", routes.source, "; ".join(missing))
        return routes

    def missing(self, routes: Routes) -> list[str]:
        """Where ``routes`` names a version the registry does not list (``weights → v9.9``), at most 20."""
        known = set(self.registry.versions())
        where = [f"weights → {brief_key(v)}" for v, _ in routes.weights if v not in known]
        where += [f"aliases → {a} → {brief_key(v)}" for a, v in routes.aliases.items() if v not in known]
        if routes.shadow is not None and routes.shadow.version not in known:
            where.append(f"shadow → {brief_key(routes.shadow.version)} (shadow runs are not made)")
        return where[:20] + ([f"… {len(where) - 20} more"] if len(where) > 20 else [])

    def refuse(self, source: str, reason: str) -> None:
        """Record a refused change of the routes from ``source``: logged with its reason, counted."""
        self.refusals[source] = self.refusals.get(source, 0) + 1
        log.error("routes refused (%s), the routes in force stay: %s", source, reason)

    async def reload(self) -> Routes:
        """Re-read the routes file (off the event loop); a broken file raises RoutesError and leaves the current
        routes in place."""
        if self.path is None:
            raise RoutesError("no routes file configured (start with --routes FILE)")
        try:
            routes = await asyncio.to_thread(load_routes, self.path)
        except RoutesError as exc:
            self.refuse("file", str(exc))
            raise
        except Exception as exc:  # whatever the file holds, it is a refusal, never a crash of the caller
            log.exception("reading the routes file %s failed", self.path)
            self.refuse("file", f"{self.path}: unreadable ({type(exc).__name__})")
            raise RoutesError(f"{self.path}: could not be read as routes") from exc
        return self.apply(routes)

    def restore_last_known_good(self) -> bool:
        """Apply the routes recorded in the last-known-good state, if any and valid; True if applied."""
        state = self.registry.last_known_good
        if state is None or not state.routes:
            return False
        raw = {k: v for k, v in state.routes.items() if k != "source"}
        try:
            routes = parse_routes(raw, "last-known-good")
        except RoutesError as exc:
            self.refuse("last-known-good", str(exc))
            return False
        self.apply(dataclasses.replace(routes, source="last-known-good"))
        return True

    def set_weights(self, weights: dict[str, object]) -> Routes:
        """The routes in force with new weights (validated like a routes file); RoutesError naming the key."""
        raw = self.current.to_dict()
        raw["weights"] = weights
        raw.pop("source", None)
        try:
            routes = parse_routes(raw, "admin weights")
        except RoutesError as exc:
            self.refuse("admin", str(exc))
            raise
        return self.apply(dataclasses.replace(routes, source="admin"))

    def rollback(self) -> Routes:
        if not self._history:
            raise RoutesError("no earlier routing to roll back to")
        previous = self._history.pop()
        return self.apply(previous, remember=False)

    async def watch(self, stop: asyncio.Event) -> None:
        """Reload when the routes file changes; keep the old routes if the new file is broken.

        Every failure of a reload is caught here (and the watch loop catches anything else), so a later
        valid edit always applies."""
        if self.path is None:
            return
        from m2fpkit.runtime.watcher import watch

        target = self.path.resolve()

        async def changed() -> None:
            try:
                await self.reload()
            except RoutesError:  # logged and counted by reload
                return
            except Exception as exc:  # applying valid routes failed (the registry refused): keep watching
                log.exception("routes file change could not be applied")
                self.refuse("file", f"could not be applied ({type(exc).__name__})")
                return
            await self.registry.rescan()

        await watch(target.parent, lambda _c, p: Path(p).resolve() == target, changed, stop, recursive=False,
                    debounce=200)
