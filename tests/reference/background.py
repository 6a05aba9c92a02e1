"""What the test run builds on a core the (mostly single-threaded) tests leave idle, once per run.

``python -m reference.background DIR [STEP...]`` (from ``tests/``, with the run's ``$M2FP_EXPORT_CACHE``;
:func:`start` starts it once for all the run's processes)
makes the steps asked for (default: all), in the order the suite first needs them, each published by an atomic
rename so a reader sees all or nothing:

1. ``DIR/demo_bundles``: the demo versions of ``export/versions.toml`` and their aliases (``demo_root``). It
   traces the single-human architecture; the multi-human one is traced by the main process for ``ms_multi``
   at the same time (the graph cache's lock makes whoever comes second reuse it).
2. ``DIR/uncached``: ``tiny`` multi-human with seed 102 exported with the cache off — a fresh trace, which
   ``tests/test_export_cli.py`` compares byte for byte with a cached export of the same model.
3. ``DIR/full_depth``: the full-depth graph (:mod:`reference.full_depth`) through the cache.

A failed step writes ``DIR/<step>.failed`` with the traceback and the later steps still run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from reference import shared

STEPS = ("demo_bundles", "uncached", "full_depth")
#: in the builder's directory: its pid, and the file it holds an ``flock`` on while it runs
PID, ALIVE = "pid", "alive.lock"
#: the seed of the uncached export
UNCACHED_SEED = 102


def start(base: Path, steps: list[str]) -> None:
    """Start the builder for ``steps`` in ``base`` unless a process of this run already did (one thread, through
    the run's graph cache; not niced: the tests that need its work run last and wait for it). While it runs it
    holds an ``flock`` on ``base/alive.lock`` (taken before it starts, handed down), which is how every process
    of the run tells it is alive (:func:`alive`)."""
    base.mkdir(parents=True, exist_ok=True)
    with shared.locked(base / ".start.lock"):
        if (base / PID).exists():
            return
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        fd = os.open(base / ALIVE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with open(base / "log.txt", "wb") as log:  # a file, not a pipe: nobody reads it until the end
                proc = subprocess.Popen([sys.executable, "-m", "reference.background", str(base), *steps],
                                        cwd=Path(__file__).parent.parent, env=env, stdout=log,
                                        stderr=subprocess.STDOUT, pass_fds=(fd,))
        finally:
            os.close(fd)  # the child's copy keeps the lock
        (base / PID).write_text(str(proc.pid))


def alive(base: Path) -> bool:
    return shared.held(base / ALIVE)


def stop(base: Path) -> None:
    """Kill the builder if it still runs (the run's last process calls it at the session's end)."""
    pid = base / PID
    if pid.exists() and alive(base):
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid.read_text()), signal.SIGKILL)


def wait_for(base: Path, step: str, timeout: float = 900.0) -> Path:
    """``base/step`` once published; raises RuntimeError with the step's failure, or if the builder died first."""
    deadline = time.monotonic() + timeout
    while True:
        if (base / step).exists():
            return base / step
        failed = base / f"{step}.failed"
        if failed.exists():
            raise RuntimeError(f"background step {step} failed:\n{failed.read_text(errors='replace')[-3000:]}")
        if not alive(base):
            if (base / step).exists():  # published just before it exited
                return base / step
            raise RuntimeError(f"the background builder exited before {step}, or was not asked for it "
                               f"(log: {base / 'log.txt'})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"background step {step} not done after {timeout:.0f} s")
        time.sleep(0.2)


def step(base: Path | None, name: str) -> Path:
    """What the run's builder (``conftest._background``: its directory) made for step ``name``; fails the calling
    test, with the builder's log, if it could not."""
    import pytest

    if base is None:
        pytest.fail(f"{name} asked for, but no collected test named a fixture the background builder serves")
    try:
        return wait_for(base, name)
    except RuntimeError as exc:
        log = (base / "log.txt").read_text(errors="replace")[-2000:]
        pytest.fail(f"{exc}\n--- background log ---\n{log}")


def _demo_bundles(out: Path) -> None:
    from m2fpkit.export import build, specs
    from server_fixtures import DEMO_VERSIONS

    sf = specs.load()
    # single-human first: the main process traces the multi-human architecture for ms_multi meanwhile
    for version in sorted(DEMO_VERSIONS, key=lambda v: sf.get(v).task != "single-human"):
        build.export_version(sf.get(version), out)
    build.update_aliases(out, sf.aliases)


def _uncached(out: Path) -> None:
    from m2fpkit.export import onnx_export
    from m2fpkit.export.model import config as mcfg
    from m2fpkit.export.model.m2fp import build

    os.environ[onnx_export.CACHE_ENV] = "off"
    try:
        out.mkdir()
        onnx_export.export_onnx(build(mcfg.preset("tiny"), seed=UNCACHED_SEED), out / "model.onnx", opset=18)
    finally:
        os.environ.pop(onnx_export.CACHE_ENV)


def _full_depth(out: Path) -> None:
    from reference import full_depth

    out.mkdir()
    full_depth.export(out / "model.onnx")


def main(base: Path, wanted: list[str]) -> int:
    cache = os.environ.get("M2FP_EXPORT_CACHE")
    failed = 0
    for step, make in zip(STEPS, (_demo_bundles, _uncached, _full_depth)):
        if step not in wanted:
            continue
        tmp = base / f".{step}.tmp"
        try:
            make(tmp)
            tmp.rename(base / step)
        except Exception:
            failed += 1
            (base / f"{step}.failed").write_text(traceback.format_exc())
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            if cache is not None:
                os.environ["M2FP_EXPORT_CACHE"] = cache
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:] or list(STEPS)))
