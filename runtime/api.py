"""Blocking facade over :class:`~m2fpkit.runtime.registry.Registry` for scripts and notebooks.

``with Runtime() as rt: pred = rt.predict("latest", image_bytes)`` — the registry runs on a private
event loop in a background thread, so hot swaps and idle unloads keep working. The bundle root is the
one every CLI uses (``root``, else ``$M2FP_BUNDLES``, else ``./bundles``; it must exist) and the options
are the server's (:class:`~m2fpkit.runtime.registry.RegistryOptions`).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable
from typing import Any, TypeVar

from .bundle.store import MODEL
from .predictor import ImageLimits, Prediction
from .registry import Registry, RegistryOptions, RegistrySnapshot
from .roots import resolve_root

T = TypeVar("T")


class Runtime:
    def __init__(self, root: str | os.PathLike | None = None, options: RegistryOptions | None = None, *,
                 model: str = MODEL) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="m2fp-runtime", daemon=True)
        self._thread.start()
        self.registry: Registry = self._call(self._make(resolve_root(root), options, model))
        try:
            self._call(self.registry.start())
        except BaseException:
            self.close()
            raise

    @staticmethod
    async def _make(root, options, model) -> Registry:
        return Registry(root, options, model=model)

    def _call(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()  # type: ignore[arg-type]

    async def _on_loop(self, fn, *args: Any) -> Any:
        return fn(*args)

    def predict(self, version: str, data: bytes, limits: ImageLimits | None = None) -> Prediction:
        """Parse one encoded image with ``version`` (a version, ``latest`` or an alias)."""
        return self._call(self.registry.predict(version, data, limits))

    def resolve(self, version: str, api: str | None = None) -> str:
        return self._call(self._on_loop(self.registry.resolve, version, api))

    def status(self) -> RegistrySnapshot:
        return self._call(self._on_loop(self.registry.status))

    def rescan(self) -> None:
        self._call(self.registry.rescan())

    def close(self) -> None:
        if self._loop.is_running():
            if hasattr(self, "registry"):
                self._call(self.registry.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
