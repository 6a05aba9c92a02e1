"""The runtime and the server never import torch (nor Pillow), and every module imports on its own.

Each check runs in a fresh interpreter (``subprocess.run([sys.executable, "-c", ...])``): this test
process has torch loaded already (the reference fixtures need it), so ``sys.modules`` here proves nothing.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from reference.bundles import clone_bundle, synthetic_png

LIGHT_PACKAGES = ("m2fpkit.runtime", "m2fpkit.server")
ALL_PACKAGES = (*LIGHT_PACKAGES, "m2fpkit.export")
FORBIDDEN = ("torch", "PIL")
SUBPROCESS_TIMEOUT = 300


def modules_of(package: str) -> list[str]:
    """The package and every module and subpackage under it."""
    pkg = importlib.import_module(package)
    return [package, *sorted(m.name for m in pkgutil.walk_packages(pkg.__path__, package + "."))]


def run_python(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=SUBPROCESS_TIMEOUT)


def _loaded(prefixes: tuple[str, ...]) -> str:
    """Python source of an expression listing the loaded modules under ``prefixes``."""
    return (f"sorted(m for m in sys.modules if any(m == p or m.startswith(p + '.') for p in {prefixes!r}))")


SMOKE = textwrap.dedent("""
    import asyncio, importlib, json, pkgutil, sys

    import m2fpkit.runtime
    import m2fpkit.server

    imported = []
    for name in ("m2fpkit.runtime", "m2fpkit.server"):
        pkg = importlib.import_module(name)
        for info in pkgutil.walk_packages(pkg.__path__, name + "."):
            importlib.import_module(info.name)
            imported.append(info.name)
    exported = [getattr(m2fpkit.runtime, n).__name__ for n in m2fpkit.runtime.__all__]

    from m2fpkit.runtime import Predictor, Registry, RegistryOptions

    root, bundle, image_path = sys.argv[1:4]
    image = open(image_path, "rb").read()

    async def serve_one():
        async with Registry(root, RegistryOptions(watch=True, idle_ttl=5)) as reg:
            pred = await reg.predict("latest", image)
            return pred.version, pred.result.label_map.shape

    version, shape = asyncio.run(serve_one())
    predictor = Predictor.load(bundle)
    direct = predictor.predict(image)
    predictor.close()
    print(json.dumps({
        "imported": imported, "exported": exported, "version": version, "shape": list(shape),
        "direct": [direct.version, list(direct.result.label_map.shape)],
        "forbidden": LOADED,
    }))
""").replace("LOADED", _loaded(FORBIDDEN))


def test_runtime_and_server_run_a_prediction_without_torch_or_pillow(ms_multi, tmp_path):
    root = tmp_path / "bundles"
    bundle = clone_bundle(ms_multi.bundle_dir, root, "v1.0", preprocess={"short_edge": 160})
    image = tmp_path / "image.png"
    image.write_bytes(synthetic_png(96, 128, seed=2))
    proc = run_python(SMOKE, str(root), str(bundle), str(image), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["forbidden"] == [], f"imported by the runtime or the server: {out['forbidden']}"
    assert out["version"] == "v1.0" and out["shape"] == [96, 128]
    assert out["direct"] == ["v1.0", [96, 128]]
    expected = [m for p in LIGHT_PACKAGES for m in modules_of(p)[1:]]
    assert sorted(out["imported"]) == sorted(expected)
    assert {"m2fpkit.runtime.registry", "m2fpkit.runtime.registry.core", "m2fpkit.runtime.registry.lifecycle",
            "m2fpkit.runtime.roots", "m2fpkit.runtime.watcher", "m2fpkit.server.app"} <= set(out["imported"])
    assert len(out["exported"]) == len(importlib.import_module("m2fpkit.runtime").__all__)


EACH_MODULE = textwrap.dedent("""
    import contextlib, importlib, io, json, sys
    report = {}
    for name in sys.argv[1:]:
        for loaded in [m for m in sys.modules if m == "m2fpkit" or m.startswith("m2fpkit.")]:
            del sys.modules[loaded]  # each module imports as if first: none of ours is loaded before it
        err, before = io.StringIO(), set(LOADED)
        try:
            with contextlib.redirect_stderr(err):
                importlib.import_module(name)
        except BaseException as exc:
            report[name] = {"error": repr(exc)}
            continue
        report[name] = {"stderr": err.getvalue(), "forbidden": sorted({m.split(".")[0] for m in set(LOADED) - before})}
    print(json.dumps(report))
""").replace("LOADED", _loaded(FORBIDDEN))


@pytest.mark.parametrize("package", ALL_PACKAGES)
def test_every_module_imports_cleanly_on_its_own(package, tmp_path):
    """Each module imported with none of the project's modules loaded before it (one fresh interpreter per
    package; third-party modules stay loaded between two imports); runtime and server ones must not pull in
    torch (the interpreter of those packages never imports it, so any module that did would be named)."""
    names = modules_of(package)
    assert len(names) > 1
    proc = run_python(EACH_MODULE, *names, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(report) == sorted(names)
    problems = [f"{name}: {entry['error']}" for name, entry in report.items() if "error" in entry]
    if package in LIGHT_PACKAGES:
        problems += [f"{name}: wrote to stderr on import:\n{entry['stderr'][-2000:]}"
                     for name, entry in report.items() if entry.get("stderr", "").strip()]
        problems += [f"{name}: imports {entry['forbidden']}"
                     for name, entry in report.items() if entry.get("forbidden")]
    assert problems == [], "\n\n".join(problems)


LIGHT_CLI = textwrap.dedent("""
    import json, sys
    import m2fpkit.runtime.roots, m2fpkit.runtime.delivery.cli, m2fpkit.export.cli
    print(json.dumps(LOADED))
""").replace("LOADED", _loaded(("torch", "PIL", "numpy", "onnxruntime", "cv2")))


def test_the_bundle_root_rule_and_the_light_clis_import_nothing_heavy(tmp_path):
    """Every CLI reads the bundle-root rule (``runtime/roots.py``) before parsing its arguments; it, and the
    ``m2fp-bundle`` and ``m2fp-export`` command modules, load no numpy, onnxruntime, OpenCV or torch."""
    proc = run_python(LIGHT_CLI, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
