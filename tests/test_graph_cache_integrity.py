"""The export graph cache trusts only what this user traced: every entry carries an HMAC made with a
per-user key (``<cache>/.key``, 0600) when the graph was traced and checked before reuse; a cache
directory, key or entry that another user can write is refused (logged, traced again, not used).

The trace is a stand-in (a two-node graph whose parameter is a real model parameter), so these run in
well under a second each; ``tests/test_export_cli.py`` covers the real trace.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import onnx
import pytest
import torch

from m2fpkit.export import onnx_export
from m2fpkit.export.model import config as mcfg
from m2fpkit.export.model.m2fp import build as build_model

PARAM = "sem_seg_head.predictor.class_embed.bias"


@pytest.fixture
def traced(monkeypatch) -> list[int]:
    """Replace the trace by a two-node graph (``Identity`` of one real parameter, ``Relu`` of the image);
    counts the traces."""
    calls: list[int] = []

    def fake_trace(model, **kwargs):
        import onnx_ir as ir

        calls.append(1)
        bias = model.state_dict()[PARAM]
        value = ir.Value(name=PARAM, shape=ir.Shape(bias.shape), type=ir.TensorType(ir.DataType.FLOAT),
                         const_value=ir.Tensor(bias.numpy(force=True), name=PARAM))
        image = ir.Value(name=onnx_export.INPUT, shape=ir.Shape([1, 3, 32, 32]), type=ir.TensorType(ir.DataType.FLOAT))
        logits = ir.node("Identity", [value], num_outputs=1)
        logits.outputs[0].name = "pred_logits"
        masks = ir.node("Relu", [image], num_outputs=1)  # on the input: survives the optimisation
        masks.outputs[0].name = "pred_masks"
        g = ir.Graph([image], [*logits.outputs, *masks.outputs], nodes=[logits, masks], initializers=[value],
                     opset_imports={"": 18})
        return torch.onnx.ONNXProgram(ir.Model(g, ir_version=10), None)

    monkeypatch.setattr(onnx_export, "_trace", fake_trace)
    return calls


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv(onnx_export.CACHE_ENV, str(path))
    return path


@pytest.fixture(scope="module")
def model():
    return build_model(mcfg.preset("tiny"), seed=1)


def export(model, tmp_path: Path, opset: int = 18) -> onnx.ModelProto:
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir(exist_ok=True)
    onnx_export.export_onnx(model, out, opset=opset)
    return onnx.load(str(out))


def op_types(graph: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in graph.graph.node]


def the_entry(cache: Path) -> Path:
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    return entry


def test_a_poisoned_entry_is_not_reused(traced, cache, model, tmp_path, caplog):
    """A valid graph that is not the one traced (here: Neg instead of Relu) is refused and traced again."""
    assert op_types(export(model, tmp_path)) == ["Relu"] and len(traced) == 1
    graph_file = the_entry(cache) / "graph.onnx"
    poisoned = onnx.load(str(graph_file))
    (relu,) = [n for n in poisoned.graph.node if n.op_type == "Relu"]
    relu.op_type = "Neg"
    onnx.save(poisoned, str(graph_file))
    with caplog.at_level("WARNING", logger="m2fpkit.export.onnx_export"):
        assert op_types(export(model, tmp_path)) == ["Relu"]
    assert len(traced) == 2 and "integrity" in caplog.text
    assert op_types(export(model, tmp_path)) == ["Relu"] and len(traced) == 2  # stored anew, reused


def test_a_changed_byte_is_not_reused(traced, cache, model, tmp_path, caplog):
    export(model, tmp_path)
    graph_file = the_entry(cache) / "graph.onnx"
    data = bytearray(graph_file.read_bytes())
    data[-1] ^= 0x01
    graph_file.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="m2fpkit.export.onnx_export"):
        assert op_types(export(model, tmp_path)) == ["Relu"]
    assert len(traced) == 2


def test_an_entry_moved_under_another_key_is_not_reused(traced, cache, model, tmp_path):
    """The digest covers the entry's key: a genuine graph of one architecture cannot stand in for another."""
    export(model, tmp_path, opset=18)
    entry = the_entry(cache)
    other = onnx_export.cache_key(model, opset=19, example_hw=(256, 320))
    entry.rename(cache / other)
    export(model, tmp_path, opset=19)
    assert len(traced) == 2


def test_the_key_is_private_and_created_once(traced, cache, model, tmp_path):
    export(model, tmp_path)
    key = cache / onnx_export.KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) >= 32
    assert stat.S_IMODE(cache.stat().st_mode) & 0o077 == 0
    before = key.read_bytes()
    export(model, tmp_path)
    assert key.read_bytes() == before and len(traced) == 1


@pytest.mark.parametrize("weakness", ["cache dir o+w", "cache dir g+w", "key file readable", "key owned by another",
                                      "entry o+w", "entry owned by another"])
def test_a_cache_others_can_write_is_refused(traced, cache, model, tmp_path, caplog, weakness):
    export(model, tmp_path)
    entry = the_entry(cache)
    key = cache / onnx_export.KEY_FILE
    if weakness.endswith("owned by another") and os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    if weakness == "cache dir o+w":
        cache.chmod(0o707)
    elif weakness == "cache dir g+w":
        cache.chmod(0o770)
    elif weakness == "key file readable":
        key.chmod(0o644)
    elif weakness == "key owned by another":
        os.chown(key, 4242, 4242)
    elif weakness == "entry o+w":
        entry.chmod(0o757)
    else:
        os.chown(entry / "graph.onnx", 4242, 4242)
    listing = sorted(p.name for p in cache.iterdir())
    with caplog.at_level("WARNING", logger="m2fpkit.export.onnx_export"):
        assert op_types(export(model, tmp_path)) == ["Relu"]
    assert len(traced) == 2 and "refused" in caplog.text
    assert sorted(p.name for p in cache.iterdir()) == listing  # nothing written into a refused cache


def test_graph_cache_survives_damage_and_an_unwritable_directory(traced, cache, model, tmp_path, monkeypatch,
                                                                  caplog):
    """A damaged entry is a miss (traced again, the entry stored anew); a cache that cannot be
    written costs only the trace; old entries beyond CACHE_KEEP are pruned, the most recently used kept."""
    graph = tmp_path / "graph.onnx"
    onnx_export.export_onnx(model, graph, opset=18)
    entry = the_entry(cache)
    (entry / "graph.onnx").write_bytes(b"\x00not a graph")
    with caplog.at_level("WARNING", logger="m2fpkit.export.onnx_export"):
        onnx_export.export_onnx(model, graph, opset=18)
    assert len(traced) == 2 and "integrity" in caplog.text
    onnx_export.export_onnx(model, graph, opset=18)
    assert len(traced) == 2  # the damaged entry was replaced by a good one

    caplog.clear()
    (blocked := tmp_path / "blocked").write_text("a file where the cache directory should be")
    monkeypatch.setenv(onnx_export.CACHE_ENV, str(blocked / "cache"))
    with caplog.at_level("WARNING", logger="m2fpkit.export.onnx_export"):
        onnx_export.export_onnx(model, graph, opset=18)
    assert len(traced) == 3 and "export cache" in caplog.text

    monkeypatch.setenv(onnx_export.CACHE_ENV, str(cache))
    monkeypatch.setattr(onnx_export, "CACHE_KEEP", 2)
    os.utime(entry, (1, 1))  # the first entry is the oldest ...
    onnx_export.export_onnx(model, graph, opset=15)
    onnx_export.export_onnx(model, graph, opset=18)  # ... until it is used again
    assert len(traced) == 4
    onnx_export.export_onnx(model, graph, opset=16)
    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert len(traced) == 5 and entry.exists() and len(entries) == 2  # the opset-15 one went

    def read_only(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(onnx_export.os, "utime", read_only)  # a cache on a read-only volume is still read
    onnx_export.export_onnx(model, graph, opset=18)
    assert len(traced) == 5 and entry.exists()
