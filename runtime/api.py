"""Blocking facade over :class:`~m2fpkit.runtime.registry.Registry` for scripts and notebooks.

``with Runtime("bundles") as rt: pred = rt.predict("latest", image_bytes)`` — the registry runs on
a private event loop in a background thread, so hot swaps and idle unloads keep working.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from .predictor import ImageLimits, Prediction
from .registry import Registry, RegistryOptions


class Runtime:
    def __init__(self, root: str | Path, options: RegistryOptions | None = None, *, model: str = "m2fp") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="m2fp-runtime", daemon=True)
        self._thread.start()
        self.registry: Registry = self._call(self._make(root, options, model))
        self._call(self.registry.start())

    @staticmethod
    async def _make(root, options, model) -> Registry:
        return Registry(root, options, model=model)

    def _call(self, coro) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def predict(self, version: str, data: bytes, limits: ImageLimits | None = None) -> Prediction:
        """Parse one encoded image with ``version`` (a version, ``latest`` or an alias)."""
        return self._call(self.registry.predict(version, data, limits))

    def resolve(self, version: str) -> str:
        return self._call(self._resolve(version))

    async def _resolve(self, version: str) -> str:
        return self.registry.resolve(version)

    def status(self) -> list[dict]:
        return self._call(self._status())

    async def _status(self) -> list[dict]:
        return self.registry.status()

    def rescan(self) -> None:
        self._call(self.registry.rescan())

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self.registry.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
