"""Shared fixtures.

Session fixtures (built once per test run — under pytest-xdist by one process, the others wait and read the same
files, ``reference.shared`` — and read-only: copy a bundle with ``shutil.copytree`` before changing it):

``reference_bundles_root``
    One bundle root shared by both reference cases (``<root>/m2fp/v9.0`` and ``<root>/m2fp/v9.1``).
``ms_multi`` / ``ms_single``
    A :class:`reference.cases.ReferenceCase`: ModelScope's own ``M2FP`` class (``tiny`` preset,
    multi-human / single-human) with seeded random weights (``ms_model``, eval mode), those weights as
    a ModelScope model directory (``model_dir``) and the bundle ``export_version`` made of it
    (``bundle_dir`` = ``bundles_root/m2fp/v9.0`` resp. ``v9.1``, ``config`` its ``BundleConfig``).
    Each costs one tiny export (~20 s when its architecture is not in the export cache yet, else ~5 s).

``export_cache`` (autouse)
    ``$M2FP_EXPORT_CACHE`` for the run, empty at its start: an architecture is traced once
    (~20 s), every later export of it applies its own weights to the cached graph.
``full_depth_graph`` / ``uncached_tiny_export`` / ``demo_root`` (server_fixtures)
    Built by a background process (``reference.background``), one per run, that starts with the run's first
    test when a collected test asks for one of them, beside the tests (which run last the tests that need its
    work): the full-depth graph
    (``r101``'s depth at ``tiny``'s widths), a fresh uncached ``tiny`` export, the demo bundle root.

Function fixtures:

``tmp_bundles``
    An empty bundle root (``tmp_path / "bundles"``, not created yet).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from reference import background, shared
from reference.bundles import clone_bundle
from reference.cases import ReferenceCase, make_case
from reference.modelscope_pipeline import Reference, reference, torch_threads

# Execution plans: the suite runs the reference plan (onnxruntime fp32) unless a test asks for another.
# With OpenVINO installed, ``auto`` builds and times every engine at each load — seconds per load, for
# tests that are not about plans. tests/test_plans.py (and its server process) pass ``auto`` explicitly.
os.environ.setdefault("M2FP_PLAN", "fp32")


def pytest_configure(config: pytest.Config) -> None:
    logging.getLogger("m2fpkit").setLevel(logging.INFO)
    if shared.is_worker():  # workers share the cores: one OpenMP thread each (and in their subprocesses)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def export_cache(tmp_path_factory: pytest.TempPathFactory):
    """One ONNX graph cache for the run (``onnx_export.CACHE_ENV``; subprocesses and xdist workers share it), empty
    at its start: an architecture is traced once, every export still runs its parity gate against PyTorch."""
    from m2fpkit.export.onnx_export import CACHE_ENV

    before = os.environ.get(CACHE_ENV)
    cache = shared.run_dir(tmp_path_factory) / "export_cache"
    cache.mkdir(mode=0o700, exist_ok=True)
    os.environ[CACHE_ENV] = str(cache)
    yield cache
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before


#: the background builder's step (``reference.background``) behind each fixture it serves
BACKGROUND_FIXTURES = {"demo_root": "demo_bundles", "uncached_tiny_export": "uncached",
                       "full_depth_graph": "full_depth"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that need the background builder's work run last, in the order it makes it: until then the tests that
    need nothing from it keep the cores busy, instead of one waiting for it while others could run."""
    rank = {step: i + 1 for i, step in enumerate(background.STEPS)}

    def needs(item: pytest.Item) -> int:
        used = getattr(item, "fixturenames", ())
        return max((rank[step] for fixture, step in BACKGROUND_FIXTURES.items() if fixture in used), default=0)

    items.sort(key=needs)  # stable: within a rank, the collection's order


@pytest.fixture(scope="session", autouse=True)
def _background(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                export_cache: Path) -> Path | None:
    """The run's background builder (its directory), started by the first process of the run to get here with
    the steps the collected tests need; the run's last process kills it if it still runs
    (:func:`pytest_sessionfinish`)."""
    used = set().union(*(getattr(item, "fixturenames", ()) for item in request.session.items))
    steps = [step for fixture, step in BACKGROUND_FIXTURES.items() if fixture in used]
    if not steps:
        return None
    base = shared.run_dir(tmp_path_factory) / "background"
    background.start(base, steps)
    return base


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not shared.is_worker():  # the controller (or the only process) ends after every worker
        factory: pytest.TempPathFactory = session.config._tmp_path_factory  # type: ignore[attr-defined]
        background.stop(factory.getbasetemp() / "background")


@pytest.fixture(scope="session")
def full_depth_graph(_background: Path | None) -> Path:
    return background.step(_background, "full_depth") / "model.onnx"


@pytest.fixture(scope="session")
def uncached_tiny_export(_background: Path | None) -> Path:
    """``tiny`` multi-human, seed ``reference.background.UNCACHED_SEED``, exported with the graph cache off."""
    return background.step(_background, "uncached") / "model.onnx"


@pytest.fixture(scope="session")
def reference_bundles_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = shared.run_dir(tmp_path_factory) / "reference_bundles"
    root.mkdir(exist_ok=True)
    return root


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
