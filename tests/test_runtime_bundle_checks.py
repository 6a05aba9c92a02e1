"""Bundle verification before load: every kind of damage is refused with a message naming the problem.

Bundles are cheap clones (:mod:`reference.bundles`) of the session's exported multi-human bundle.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from m2fpkit.runtime.bundle import reader
from m2fpkit.runtime.errors import BundleError
from m2fpkit.runtime.predictor import Predictor
from reference.bundles import CORRUPTIONS, clone_bundle, corrupt, graph_metadata, synthetic_png, write_clone

FAST = {"short_edge": 160}  # the graph's spatial axes are dynamic; small inputs keep the tests quick

#: kind → (caught by the file checks (reader.inspect) already?, fragments the message must contain)
EXPECTED: dict[str, tuple[bool, tuple[str, ...]]] = {
    "flip-byte": (True, ("model.onnx.data", "SHA-256", "does not match the manifest")),
    "truncate": (True, ("model.onnx.data", "size", "manifest says")),
    "missing-file": (True, ("model.onnx.data", "missing")),
    "extra-file": (True, ("not in manifest.json", "stray.txt")),
    "no-manifest": (True, ("manifest.json", "missing")),
    "config-not-json": (True, ("config.json", "not valid JSON")),
    "config-schema": (True, ("config.json → preprocess → mean", "3 numbers")),
    "config-task": (True, ("config.json → task", "many-humans")),
    "config-version": (True, ("config.json → version", "'v0.0'", "'v2.0'")),
    "extra-class": (False, ("model.onnx does not match config.json", "pred_logits", "m2fp.num_classes")),
    "input-name": (False, ("model.onnx does not match config.json", "input names", "pixels")),
    "graph-version": (False, ("model.onnx does not match config.json", "m2fp.version", "'v0.0'")),
    "onnx-garbage": (False, ("onnxruntime cannot load model.onnx",)),
    "weights-index": (True, ("weights.json → tensors[0]", "beyond the end of model.onnx.data")),
}


#: where loading says it differently: the loader hashes the weights data while streaming it (not up front)
AT_LOAD: dict[str, tuple[str, ...]] = {
    "flip-byte": ("model.onnx.data", "SHA-256", "manifest"),
}


def test_every_corruption_has_an_expectation():
    assert set(EXPECTED) == set(CORRUPTIONS)


@pytest.fixture(scope="module")
def source(ms_multi, tmp_path_factory) -> Path:
    """The exported multi-human bundle as a fast clone (short edge 160), shared by this module."""
    return clone_bundle(ms_multi.bundle_dir, tmp_path_factory.mktemp("checks_src"), "v0.1", preprocess=FAST)


def test_clone_is_a_complete_bundle_under_the_new_name(ms_multi, source, tmp_path):
    before = reader.inspect(ms_multi.bundle_dir).manifest
    path = clone_bundle(source, tmp_path, "v2.0-rc.1", channel="experimental", compatible_api=["1.0", "1.1"])
    assert path == tmp_path / "m2fp" / "v2.0-rc.1"
    assert sorted(p.name for p in path.parent.iterdir()) == ["v2.0-rc.1"], "staging directory left behind"
    config = reader.inspect(path).config
    assert (config.version, config.channel, config.compatible_api) == ("v2.0-rc.1", "experimental", ("1.0", "1.1"))
    meta = graph_metadata(path / "model.onnx")
    assert meta["m2fp.version"] == "v2.0-rc.1" and meta["m2fp.semver"] == "2.0.0-rc.1"
    assert meta["m2fp.num_classes"] == str(ms_multi.config.num_classes)
    # the weights are shared byte for byte, and the source is untouched
    assert (path / "model.onnx.data").read_bytes() == (ms_multi.bundle_dir / "model.onnx.data").read_bytes()
    assert reader.inspect(ms_multi.bundle_dir).manifest == before
    assert reader.inspect(ms_multi.bundle_dir).version == ms_multi.version
    with pytest.raises(FileExistsError):
        clone_bundle(source, tmp_path, "v2.0-rc.1")


def test_good_clone_loads_and_predicts(source, tmp_path):
    path = clone_bundle(source, tmp_path, "v2.0")
    predictor = Predictor.load(path)
    try:
        assert predictor.version == "v2.0"
        meta = predictor.session.get_modelmeta().custom_metadata_map
        assert meta["m2fp.version"] == "v2.0"
        pred = predictor.predict(synthetic_png(96, 128, seed=3))
        assert pred.version == "v2.0"
        assert pred.result.label_map.shape == (96, 128) and pred.result.label_map.dtype == np.uint8
        assert int(pred.result.label_map.max()) < predictor.config.num_classes
        assert pred.result.task == "multi-human"
    finally:
        predictor.close()


def test_clone_with_a_new_input_size_keeps_a_passing_golden_sample(ms_multi, source, tmp_path):
    """The export's golden label map is recomputed when a clone changes the preprocessing."""
    path = clone_bundle(source, tmp_path, "v2.0")
    predictor = Predictor.load(path)
    try:
        if ms_multi.config.golden is None:
            assert predictor.config.golden is None and predictor.self_test() is None
        else:
            assert predictor.config.golden == ms_multi.config.golden
            assert predictor.self_test() >= ms_multi.config.golden.min_agreement
    finally:
        predictor.close()


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_damaged_bundle_is_refused_with_a_named_reason(source, tmp_path, kind):
    path = clone_bundle(source, tmp_path, "v2.0", then=lambda stage: corrupt(stage, kind))
    by_files, fragments = EXPECTED[kind]
    if by_files:
        with pytest.raises(BundleError) as info:
            reader.inspect(path)
        for fragment in fragments:
            assert fragment in str(info.value), (kind, str(info.value))
    else:
        # files, hashes and config schema are fine: only the graph (or onnxruntime) can tell
        assert reader.inspect(path).version == "v2.0"
    with pytest.raises(BundleError) as info:
        Predictor.load(path)
    message = str(info.value)
    for fragment in AT_LOAD.get(kind, fragments):
        assert fragment in message, (kind, message)


def test_graph_metadata_left_at_the_source_version_is_caught(source, tmp_path):
    """A copy that renames config.json's version but not the graph's identity is not that version."""
    dest = tmp_path / "m2fp" / "v3.0"
    dest.parent.mkdir(parents=True)
    write_clone(source, dest, "v3.0", graph_metadata_too=False)
    assert reader.inspect(dest).version == "v3.0"
    with pytest.raises(BundleError, match=r"m2fp\.version='v0\.1' but config\.json says 'v3\.0'"):
        Predictor.load(dest)


def test_manifest_entry_leaving_the_bundle_is_refused(source, tmp_path):
    path = clone_bundle(source, tmp_path, "v2.0")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["../outside.txt"] = {"size": 1, "sha256": "0" * 64}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"manifest\.json → files: '\.\./outside\.txt' is not a plain path inside "
                                          r"the bundle"):
        Predictor.load(path)


def test_symlinked_file_is_refused(source, tmp_path):
    path = clone_bundle(source, tmp_path, "v2.0")
    outside = tmp_path / "config-outside.json"
    shutil.move(path / "config.json", outside)
    (path / "config.json").symlink_to(outside)
    with pytest.raises(BundleError, match=r"config\.json: listed in manifest\.json but a symbolic link, not a "
                                          r"regular file; refused"):
        reader.inspect(path)  # opened without following links
