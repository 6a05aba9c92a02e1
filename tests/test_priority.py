"""Background priority (runtime/priority.py): hashing a bundle yields the cores to served forwards, while
engine sessions — whose threads inherit their builder's priority for good — are built at normal priority.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.metadata
import os
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import pytest

from m2fpkit.runtime import priority
from m2fpkit.runtime.bundle import reader
from m2fpkit.runtime.predictor import Predictor
from m2fpkit.runtime.registry import Registry, RegistryOptions
from m2fpkit.runtime.session import RuntimeSettings, Session, SessionFactory
from m2fpkit.runtime.weights import WeightPool
from reference.bundles import clone_bundle, replace_bundle, synthetic_png

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="per-thread priority is Linux's")


MAIN = threading.main_thread()


def nice() -> int:
    """The calling thread's nice value (Linux keeps it per thread)."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def lowered(base: int) -> int:
    return min(19, base + priority.BACKGROUND_NICE)


def test_background_work_runs_lowered_and_leaves_the_caller_alone():
    base = nice()
    seen = priority.run_in_background(lambda a, b=0: (nice(), threading.current_thread() is not MAIN, a + b), 2, b=3)
    assert seen == (lowered(base), True, 5)
    assert nice() == base


def test_background_work_raises_its_exception_in_the_caller():
    def fails() -> None:
        raise KeyError("the bundle vanished")

    with pytest.raises(KeyError, match="the bundle vanished"):
        priority.run_in_background(fails)
    assert priority.run_in_background(lambda: None) is None


def test_a_failed_background_call_keeps_nothing_alive_once_its_exception_is_dropped():
    """No reference cycle through the exception: a refused bundle's tensors are freed at once, not at a GC."""
    class Tensors:
        pass

    built: list[weakref.ref] = []

    def fails() -> None:
        tensors = Tensors()  # a local of a frame in the exception's traceback
        built.append(weakref.ref(tensors))
        raise ValueError("changed on disk while loading")

    gc.disable()
    try:
        with pytest.raises(ValueError):
            priority.run_in_background(fails)
        assert built and built[0]() is None
    finally:
        gc.enable()


def test_background_work_still_runs_when_no_thread_can_be_started(monkeypatch):
    def refuse(self) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    assert priority.run_in_background(lambda: (threading.current_thread() is MAIN, nice())) == (True, nice())


def test_weights_are_hashed_in_the_background_and_the_session_built_at_normal_priority(ms_single, monkeypatch):
    seen: dict[str, int] = {}
    tensors, session_init = WeightPool.tensors, Session.__init__

    def spy_tensors(self, *args, **kwargs):
        seen["weights"] = nice()
        return tensors(self, *args, **kwargs)

    def spy_init(self, *args, **kwargs):
        seen["session"] = nice()
        session_init(self, *args, **kwargs)

    monkeypatch.setattr(WeightPool, "tensors", spy_tensors)
    monkeypatch.setattr(Session, "__init__", spy_init)
    base = nice()
    predictor = Predictor.load(ms_single.bundle_dir, SessionFactory(RuntimeSettings(intra_op_threads=1), WeightPool()))
    predictor.close()
    assert seen == {"weights": lowered(base), "session": base}


async def test_a_swap_inspects_in_the_background_and_closes_the_old_predictor_off_the_event_loop(
        fast_single_src: Path, tmp_path: Path, monkeypatch):
    root = tmp_path / "bundles"
    clone_bundle(fast_single_src, root, "v1.0")
    inspected: list[int] = []
    closed: list[str] = []
    inspect, close = reader.inspect, Predictor.close

    def spy_inspect(*args, **kwargs):
        inspected.append(nice())
        return inspect(*args, **kwargs)

    def spy_close(self: Predictor) -> None:
        closed.append(threading.current_thread().name)
        close(self)

    monkeypatch.setattr(reader, "inspect", spy_inspect)
    monkeypatch.setattr(Predictor, "close", spy_close)
    base = nice()
    reg = Registry(root, RegistryOptions(watch=False, idle_ttl=0))
    await reg.start()
    try:
        image = synthetic_png(96, 128, seed=7)
        await reg.predict("v1.0", image)
        replace_bundle(fast_single_src, root, "v1.0", notes="retrained")
        await reg.rescan()
        for _ in range(600):
            if reg.events["swaps"] == 1 and closed:
                break
            await asyncio.sleep(0.05)
        assert reg.events["swaps"] == 1
        swap_closes = list(closed)
    finally:
        await reg.close(drain_timeout=5)
    assert len(inspected) == 2 and set(inspected) == {lowered(base)}  # the first content and the new one
    assert swap_closes == ["m2fp-load_0"]


def test_m2fp_bundle_runs_at_background_priority():
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert scripts["m2fp-bundle"].value == "m2fpkit.runtime.delivery.cli:run"
    code = ("import os; from m2fpkit.runtime.delivery import cli; "
            "cli.main = lambda **kw: print(os.getpriority(os.PRIO_PROCESS, 0)); cli.run()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert int(out.stdout) == lowered(os.getpriority(os.PRIO_PROCESS, 0))

