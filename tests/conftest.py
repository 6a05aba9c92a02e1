"""Shared fixtures.

Session fixtures (built once, read-only — copy a bundle with ``shutil.copytree`` before changing it):

``reference_bundles_root``
    One bundle root shared by both reference cases (``<root>/m2fp/v9.0`` and ``<root>/m2fp/v9.1``).
``ms_multi`` / ``ms_single``
    A :class:`reference.cases.ReferenceCase`: ModelScope's own ``M2FP`` class (``tiny`` preset,
    multi-human / single-human) with seeded random weights (``ms_model``, eval mode), those weights as
    a ModelScope model directory (``model_dir``) and the bundle ``export_version`` made of it
    (``bundle_dir`` = ``bundles_root/m2fp/v9.0`` resp. ``v9.1``, ``config`` its ``BundleConfig``).
    Each costs one tiny export (~45 s on 2 cores).

Function fixtures:

``tmp_bundles``
    An empty bundle root (``tmp_path / "bundles"``, not created yet).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from reference.cases import ReferenceCase, make_case


def pytest_configure(config: pytest.Config) -> None:
    logging.getLogger("m2fpkit").setLevel(logging.INFO)


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
