"""Log flood control: a repeated warning or error is written at most ``burst`` times per ``interval``.

Invariant: what clients can trigger over and over (asyncio's "socket.accept() out of system resource"
with its traceback, refused connections, cut heads) never grows the log faster than ``burst`` records
per ``interval`` per kind of record — a kind being (logger, level, message template, exception type). The
last record let through says that more are being suppressed; the first one of the next interval says how
many were. Records below WARNING (the access log) pass untouched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

#: records of one kind written per interval
BURST = 5
#: seconds
INTERVAL = 60.0
#: kinds remembered at most (the oldest intervals are forgotten first)
MAX_KINDS = 1000


@dataclass
class _Window:
    start: float
    written: int = 0
    suppressed: int = 0


class RateLimit(logging.Filter):
    """A handler filter applying the invariant above (thread-safe: records come from worker threads too)."""

    def __init__(self, burst: int = BURST, interval: float = INTERVAL, level: int = logging.WARNING,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst, self.interval, self.level, self.clock = burst, interval, level, clock
        self._windows: dict[tuple, _Window] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level:
            return True
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
        kind = (record.name, record.levelno, str(record.msg)[:200], exc)
        now = self.clock()
        with self._lock:
            window = self._windows.get(kind)
            if window is None or now - window.start >= self.interval:
                suppressed = window.suppressed if window else 0
                if window is None and len(self._windows) >= MAX_KINDS:
                    self._forget(now)
                window = self._windows[kind] = _Window(now)
                if suppressed:
                    self._note(record, f"[{suppressed} more like this suppressed in the previous "
                                       f"{self.interval:g} s]")
            if window.written >= self.burst:
                window.suppressed += 1
                return False
            window.written += 1
            if window.written == self.burst:
                self._note(record, f"[more like this in the next {self.interval - (now - window.start):.0f} s "
                                   "are suppressed]")
            return True

    def _forget(self, now: float) -> None:
        for kind in [k for k, w in self._windows.items() if now - w.start >= self.interval]:
            del self._windows[kind]
        while len(self._windows) >= MAX_KINDS:
            del self._windows[next(iter(self._windows))]

    @staticmethod
    def _note(record: logging.LogRecord, text: str) -> None:
        """Append ``text`` to the message (args stay args: the note has no % of its own)."""
        record.msg = f"{record.msg} {text.replace('%', '%%')}" if record.args else f"{record.msg} {text}"
