"""Shared fixtures.

Session fixtures (built once, read-only — copy a bundle with ``shutil.copytree`` before changing it):

``reference_bundles_root``
    One bundle root shared by both reference cases (``<root>/m2fp/v9.0`` and ``<root>/m2fp/v9.1``).
``ms_multi`` / ``ms_single``
    A :class:`reference.cases.ReferenceCase`: ModelScope's own ``M2FP`` class (``tiny`` preset,
    multi-human / single-human) with seeded random weights (``ms_model``, eval mode), those weights as
    a ModelScope model directory (``model_dir``) and the bundle ``export_version`` made of it
    (``bundle_dir`` = ``bundles_root/m2fp/v9.0`` resp. ``v9.1``, ``config`` its ``BundleConfig``).
    Each costs one tiny export (~20 s when its architecture is not in the export cache yet, else ~5 s).

``export_cache`` (autouse)
    ``$M2FP_EXPORT_CACHE`` for the session, empty at its start: an architecture is traced once
    (~20 s), every later export of it applies its own weights to the cached graph.
``full_depth_graph`` / ``uncached_tiny_export`` / ``demo_root`` (server_fixtures)
    Built by a background process (``reference.background``) that starts with the session's first test
    when a collected test asks for one of them, on the otherwise idle second core: the full-depth graph
    (``r101``'s depth at ``tiny``'s widths), a fresh uncached ``tiny`` export, the demo bundle root.

Function fixtures:

``tmp_bundles``
    An empty bundle root (``tmp_path / "bundles"``, not created yet).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from reference import background
from reference.bundles import clone_bundle
from reference.cases import ReferenceCase, make_case
from reference.modelscope_pipeline import Reference, reference, torch_threads

# Execution plans: the suite runs the reference plan (onnxruntime fp32) unless a test asks for another.
# With OpenVINO installed, ``auto`` builds and times every engine at each load — seconds per load, for
# tests that are not about plans. tests/test_plans.py (and its server process) pass ``auto`` explicitly.
os.environ.setdefault("M2FP_PLAN", "fp32")


def pytest_configure(config: pytest.Config) -> None:
    logging.getLogger("m2fpkit").setLevel(logging.INFO)


@pytest.fixture(scope="session", autouse=True)
def export_cache(tmp_path_factory: pytest.TempPathFactory):
    """One ONNX graph cache for the session (``onnx_export.CACHE_ENV``; subprocesses inherit it): an
    architecture is traced once, every export still runs its parity gate against PyTorch."""
    from m2fpkit.export.onnx_export import CACHE_ENV

    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("export_cache"))
    yield Path(os.environ[CACHE_ENV])
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before


#: the background builder's step (``reference.background``) behind each fixture it serves
BACKGROUND_FIXTURES = {"demo_root": "demo_bundles", "uncached_tiny_export": "uncached",
                       "full_depth_graph": "full_depth"}


@pytest.fixture(scope="session", autouse=True)
def _background(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                export_cache: Path) -> Iterator[tuple[subprocess.Popen, Path] | None]:
    """The background builder, started at the session's first test with the steps the collected tests need:
    niced, one thread, through the session's graph cache; killed at the end if still running."""
    used = set().union(*(getattr(item, "fixturenames", ()) for item in request.session.items))
    steps = [step for fixture, step in BACKGROUND_FIXTURES.items() if fixture in used]
    if not steps:
        yield None
        return
    base = tmp_path_factory.mktemp("background")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(base / "log.txt", "wb") as log:  # a file, not a pipe: nobody reads it until the end
        proc = subprocess.Popen(["nice", "-n", "10", sys.executable, "-m", "reference.background", str(base),
                                 *steps], cwd=Path(__file__).parent, env=env, stdout=log, stderr=subprocess.STDOUT)
    yield proc, base
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.fixture(scope="session")
def full_depth_graph(_background: tuple[subprocess.Popen, Path] | None) -> Path:
    return background.step(_background, "full_depth") / "model.onnx"


@pytest.fixture(scope="session")
def uncached_tiny_export(_background: tuple[subprocess.Popen, Path] | None) -> Path:
    """``tiny`` multi-human, seed ``reference.background.UNCACHED_SEED``, exported with the graph cache off."""
    return background.step(_background, "uncached") / "model.onnx"


@pytest.fixture(scope="session")
def reference_bundles_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reference_bundles")


@pytest.fixture(scope="session")
def ms_multi(tmp_path_factory: pytest.TempPathFactory, reference_bundles_root: Path) -> ReferenceCase:
    return make_case("multi-human", tmp_path_factory.mktemp("ms_multi"), reference_bundles_root)


@pytest.fixture(scope="session")
def ms_single(tmp_path_factory: pytest.TempPathFactory, reference_bundles_root: Path) -> ReferenceCase:
    return make_case("single-human", tmp_path_factory.mktemp("ms_single"), reference_bundles_root)


@pytest.fixture
def tmp_bundles(tmp_path: Path) -> Path:
    return tmp_path / "bundles"


@pytest.fixture(scope="session")
def fast_multi_src(ms_multi: ReferenceCase, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ms_multi``'s bundle cloned as v0.1 with a 160-px short edge (fast registry/swap tests)."""
    return clone_bundle(ms_multi.bundle_dir, tmp_path_factory.mktemp("fast_multi"), "v0.1",
                        preprocess={"short_edge": 160})


@pytest.fixture(scope="session")
def fast_single_src(ms_single: ReferenceCase, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ms_single``'s bundle cloned as v0.2 with a 96x128 canvas."""
    return clone_bundle(ms_single.bundle_dir, tmp_path_factory.mktemp("fast_single"), "v0.2",
                        preprocess={"canvas": [96, 128]})


@pytest.fixture
def one_torch_thread():
    """Tiny models run fastest on one torch thread (no OpenMP barriers per small op)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def ref_multi(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """Our tiny multi-human M2FP and ModelScope's model + pipeline with the same lively weights (no export)."""
    return reference("multi-human", tmp_path_factory.mktemp("ref_multi"))


@pytest.fixture(scope="session")
def ref_single(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return reference("single-human", tmp_path_factory.mktemp("ref_single"))
