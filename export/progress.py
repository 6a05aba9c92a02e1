"""Step-by-step progress of a long export (step, name, elapsed time) through ``logging``."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

log = logging.getLogger("m2fpkit.export")


class Progress:
    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.step = total, label, 0
        self.started = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.step += 1
        t0 = time.perf_counter()
        log.info("%s [%d/%d] %s …", self.label, self.step, self.total, name)
        yield
        log.info("%s [%d/%d] %s done in %.1f s (elapsed %.1f s)", self.label, self.step, self.total, name,
                 time.perf_counter() - t0, self.elapsed)
