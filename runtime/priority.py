"""Background CPU priority: work that must not slow the forward passes being served.

On a small box a served forward uses every core, and onnxruntime splits each of its operators evenly
across its threads: one more runnable thread (a bundle being hashed for a swap) stalls the whole
forward, not a core's share of it. :func:`run_in_background` runs a function in a fresh thread whose
scheduling priority is lowered (Linux: the thread's nice value, which Linux keeps per thread), so the
kernel gives such work the cores when served work leaves them idle, and barely any otherwise.

Invariant: the function must not create threads. A thread inherits its creator's priority and an
unprivileged process can never raise it again, so an engine's thread pool created there would serve
every later forward at background priority. Hashing, reading and parsing qualify; building an
onnxruntime or OpenVINO session does not.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

#: nice value added to a background thread: 19, the lowest (CFS weight 15 against 1024 at nice 0, ~1.5 % of a
#: contended core, so it still progresses). Measured in the swaps benchmark (fp32): served forwards during
#: swaps 0.77 s at +10 and 0.60 s at +19, against 0.54-0.57 s steady
BACKGROUND_NICE = 19


def lower_this_thread(delta: int = BACKGROUND_NICE) -> None:
    """Lower the calling thread's priority by ``delta`` (capped at nice 19; a no-op where unsupported).

    Called first thing in a program's main thread, it lowers the whole process: threads inherit it.
    """
    if sys.platform != "linux" or delta <= 0:  # elsewhere PRIO_PROCESS with a thread id names no thread
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + delta))
    except OSError as exc:  # a sandbox may forbid it: the work still runs, at normal priority
        log.debug("cannot lower the priority of a background thread: %s", exc)


def run_in_background(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on a new thread at background priority; its result, or its exception."""
    box: list[Any] = []

    def target() -> None:
        lower_this_thread()
        try:
            box.append((True, fn(*args, **kwargs)))
        except BaseException as exc:  # handed to the caller, raised on its own thread
            box.append((False, exc))

    thread = threading.Thread(target=target, name=f"m2fp-bg-{getattr(fn, '__name__', 'work')}", daemon=True)
    try:
        thread.start()
    except RuntimeError:  # no thread to spare: the work is still done, here and at the caller's priority
        log.warning("no thread for background work; running %s at normal priority", thread.name)
        return fn(*args, **kwargs)
    thread.join()
    ok, value = box.pop()
    if ok:
        return value
    try:
        raise value
    finally:
        # no cycle exception → traceback → this frame → exception: what the failed work built (a refused
        # bundle's tensors) is freed as soon as the caller drops the exception, not at the next GC
        del value
