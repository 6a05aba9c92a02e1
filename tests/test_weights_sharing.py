"""Identical tensors across loaded versions are held once (runtime/weights.py), safely.

Versions here are clones of the exported multi-human bundle; ``v3.0`` has one decoder tensor
changed (bytes and index entry), like a retrained head over the same backbone.
"""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from m2fpkit.runtime.bundle import weights_index
from m2fpkit.runtime.bundle.writer import seal as write_manifest
from m2fpkit.runtime.errors import BundleError, MalformedFile
from m2fpkit.runtime.predictor import Predictor
from m2fpkit.runtime.session import RuntimeSettings, SessionFactory
from m2fpkit.runtime.weights import WeightPool
from reference.bundles import clone_bundle

FAST = {"short_edge": 160}
HEAD = "sem_seg_head.predictor.transformer_cross_attention_layers.0.multihead_attn.out_proj.weight"


def change_tensor(bundle_dir: Path, name: str, *, update_index: bool = True) -> None:
    """Overwrite tensor ``name`` in the data file with other values; keep or update its index entry."""
    path = bundle_dir / "weights.json"
    index = json.loads(path.read_text())
    entry = next(t for t in index["tensors"] if t["name"] == name)
    with open(bundle_dir / index["data_file"], "r+b") as f:
        f.seek(entry["offset"])
        values = np.frombuffer(f.read(entry["length"]), dtype=entry["dtype"])
        new = (values[::-1] * np.float32(1.5)).astype(entry["dtype"]).tobytes()
        f.seek(entry["offset"])
        f.write(new)
    if update_index:
        entry["sha256"] = hashlib.sha256(new).hexdigest()
        path.write_text(json.dumps(index))
    write_manifest(bundle_dir)


@pytest.fixture(scope="module")
def versions(ms_multi, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shared_weights")
    out = {v: clone_bundle(ms_multi.bundle_dir, root, v, preprocess=FAST) for v in ("v1.0", "v2.0")}
    out["v3.0"] = clone_bundle(ms_multi.bundle_dir, root, "v3.0", preprocess=FAST,
                               then=lambda stage: change_tensor(stage, HEAD))
    return out


def load(path: Path, pool: WeightPool, **settings) -> Predictor:
    return Predictor.load(path, SessionFactory(RuntimeSettings(intra_op_threads=1, **settings), pool))


def tensors(p: Predictor) -> dict[str, object]:
    return dict(p.session.shared_weights)


def run(p: Predictor) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).standard_normal((1, 3, 160, 224), dtype=np.float32)
    return p.run(x)


def test_export_writes_an_index_of_every_external_tensor(ms_multi):
    config = ms_multi.config
    assert config.weights_index == "weights.json"
    data = (ms_multi.bundle_dir / "model.onnx.data").read_bytes()
    index = weights_index.parse((ms_multi.bundle_dir / config.weights_index).read_bytes(), "weights.json", len(data))
    assert len(index.tensors) > 50 and len({t.name for t in index.tensors}) == len(index.tensors)
    for t in index.tensors:
        assert hashlib.sha256(data[t.offset:t.offset + t.length]).hexdigest() == t.sha256, t.name
    assert sum(t.length for t in index.tensors) <= len(data)


def test_versions_share_identical_tensors_and_keep_their_own_results(versions):
    pool = WeightPool()
    loaded = {v: load(p, pool) for v, p in versions.items()}
    try:
        a, b, c = (tensors(loaded[v]) for v in ("v1.0", "v2.0", "v3.0"))
        assert a.keys() == b.keys() == c.keys() and HEAD in a
        assert all(a[n] is b[n] for n in a), "an identical clone maps nothing of its own"
        assert all(a[n] is c[n] for n in a if n != HEAD) and a[HEAD] is not c[HEAD]
        one = sum(t.nbytes for t in a.values())
        assert pool.stats() == {"tensors": len(a) + 1, "bytes": one + c[HEAD].nbytes}
        assert loaded["v1.0"].session.shared_bytes == one

        for v, p in versions.items():  # results equal those of a session with its own weights
            own = WeightPool()
            alone = load(p, own, share_weights=False)
            try:
                assert own.stats()["tensors"] == 0, "unshared tensors are not pooled"
                for got, want in zip(run(loaded[v]), run(alone)):
                    np.testing.assert_array_equal(got, want)
            finally:
                alone.close()
        assert not np.array_equal(run(loaded["v1.0"])[0], run(loaded["v3.0"])[0]), "the changed head counts"
    finally:
        for p in loaded.values():
            p.close()
    del loaded, a, b, c
    gc.collect()
    assert pool.stats() == {"tensors": 0, "bytes": 0}, "buffers outlived every session using them"


def test_a_session_still_running_keeps_its_buffers_after_close(versions):
    pool = WeightPool()
    p = load(versions["v1.0"], pool)
    session, before = p.session, run(p)
    p.close()
    del p
    gc.collect()
    assert pool.stats()["tensors"] > 0
    out = session.run(["pred_logits"], {"image": np.random.default_rng(0).standard_normal((1, 3, 160, 224),
                                                                                             dtype=np.float32)})
    np.testing.assert_array_equal(out[0], before[0])
    del session
    gc.collect()
    assert pool.stats()["tensors"] == 0


def test_an_index_that_mislabels_a_tensor_cannot_borrow_another_versions_weights(versions, tmp_path):
    """Bytes changed but the index still claims the original hash: a match by hash is checked by content."""
    liar = clone_bundle(versions["v1.0"], tmp_path, "v4.0",
                        then=lambda stage: change_tensor(stage, HEAD, update_index=False))
    pool = WeightPool()
    honest = load(versions["v1.0"], pool)
    try:
        with pytest.raises(BundleError, match=r"weights\.json: tensor .*out_proj\.weight.* does not match its sha256"):
            load(liar, pool)
    finally:
        honest.close()


def test_settings_can_turn_sharing_off(versions):
    pool = WeightPool()
    p, q = (load(versions[v], pool, share_weights=False) for v in ("v1.0", "v2.0"))
    try:
        assert pool.stats()["tensors"] == 0
        a, b = tensors(p), tensors(q)
        assert a.keys() == b.keys() and all(a[n] is not b[n] for n in a), "each session holds its own copy"
    finally:
        p.close()
        q.close()


GOOD = {"name": "w", "offset": 0, "length": 16, "dtype": "float32", "shape": [2, 2], "sha256": "0" * 64}


def _parse(tensors: list[dict], **extra) -> weights_index.WeightsIndex:
    raw = json.dumps({"format": 1, "data_file": "model.onnx.data", "tensors": tensors, **extra}).encode()
    return weights_index.parse(raw, "weights.json", 64)


@pytest.mark.parametrize("tensors, extra, fragment", [
    ([GOOD | {"offset": 56}], {}, "weights.json → tensors[0]: bytes 56+16 lie beyond the end of model.onnx.data"),
    ([GOOD | {"length": 12}], {}, "tensors[0] → length: 12 bytes does not fit float32 [2, 2]"),
    ([GOOD, GOOD], {}, "tensors[1] → name: 'w' is listed twice"),
    ([GOOD | {"dtype": "complex64"}], {}, "tensors[0] → dtype: 'complex64' is not one of"),
    ([GOOD | {"shape": [2, -2]}], {}, "tensors[0] → shape: expected at most 8 non-negative integers"),
    ([GOOD | {"offset": -1}], {}, "offset and length must be non-negative integers"),
    ([GOOD | {"sha256": "abc"}], {}, "tensors[0] → sha256: expected 64 lower-case hex digits"),
    ([GOOD, GOOD | {"name": "v", "offset": 8}], {}, "tensors 'w' and 'v' overlap in model.onnx.data"),
    ([GOOD], {"format": 2}, "weights.json → format: this runtime reads weights index format 1"),
    ([GOOD], {"data_file": "../model.onnx.data"}, "weights.json → data_file: '../model.onnx.data' is not a plain path"),
    ([GOOD], {"data_file": "manifest.json"}, "weights.json → data_file: manifest.json describes the manifest"),
])
def test_a_malformed_index_is_refused_with_its_key_path(tensors, extra, fragment):
    with pytest.raises(MalformedFile) as info:
        _parse(tensors, **extra)
    assert fragment in str(info.value)


def test_an_index_that_is_not_json_is_refused():
    with pytest.raises(MalformedFile, match="weights.json: not valid JSON"):
        weights_index.parse(b"{", "weights.json")
