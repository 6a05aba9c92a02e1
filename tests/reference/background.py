"""What the test session builds on the core the (mostly single-threaded) suite leaves idle.

``python -m reference.background DIR [STEP...]`` (from ``tests/``, with the session's ``$M2FP_EXPORT_CACHE``)
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

import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

STEPS = ("demo_bundles", "uncached", "full_depth")
#: the seed of the uncached export
UNCACHED_SEED = 102


def wait_for(base: Path, step: str, alive, timeout: float = 900.0) -> Path:
    """``base/step`` once published; raises RuntimeError with the step's failure, or if the builder died first.

    ``alive()`` says whether the background process still runs."""
    deadline = time.monotonic() + timeout
    while True:
        if (base / step).exists():
            return base / step
        failed = base / f"{step}.failed"
        if failed.exists():
            raise RuntimeError(f"background step {step} failed:\n{failed.read_text(errors='replace')[-3000:]}")
        if not alive():
            if (base / step).exists():  # published just before it exited
                return base / step
            raise RuntimeError(f"the background builder exited before {step}, or was not asked for it "
                               f"(log: {base / 'log.txt'})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"background step {step} not done after {timeout:.0f} s")
        time.sleep(0.2)


def step(built: tuple[subprocess.Popen, Path] | None, name: str) -> Path:
    """What the session's builder (``conftest._background``: process, directory) made for step ``name``;
    fails the calling test, with the builder's log, if it could not."""
    import pytest

    if built is None:
        pytest.fail(f"{name} asked for, but no collected test named a fixture the background builder serves")
    proc, base = built
    try:
        return wait_for(base, name, lambda: proc.poll() is None)
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
