"""The parity gate's measured tolerance (``export.parity``): a graph passes when its error against PyTorch in
float64 stays within a stated factor of PyTorch float32's own error, and its label maps agree on the decisive
pixels.

What must pass: deep models whose heads are peaked as a trained model's are (the old fixed tolerance refused
them), and every seed of the README's random examples. What must fail: the right graph with one wrong constant,
or one wrong operator.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from benchmarks.parity_r101 import peak_heads  # the benchmark's r101 gets the same heads
from m2fpkit.export import build, onnx_export, parity, sources
from m2fpkit.export.model.m2fp import M2FP
from m2fpkit.export.model.m2fp import build as build_model
from m2fpkit.export.specs import VersionSpec
from reference import full_depth

#: what the README's random examples use (tests/test_readme_commands.py runs the exact one)
README_SEEDS = [("tiny", 1, "single-human"), ("tiny", 2, "single-human"), ("tiny", 1, "multi-human")]


def _copy_graph(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copyfile(src.with_name(name), dst_dir / name)
    return dst_dir / "model.onnx"


def _rewrite(path: Path, change) -> Path:
    """Load ``path`` with its weights, apply ``change`` to the ModelProto, save it back (external data)."""
    proto = onnx.load(str(path), load_external_data=True)
    change(proto)
    path.with_name(path.name + ".data").unlink()
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data")
    return path


def test_a_deep_model_with_trained_like_heads_passes(full_depth_graph, export_cache, tmp_path):
    """r101's depth at tiny widths with peaked heads (mask logits beyond |20| where random init stays within
    |3|, class logits 8× as spread): the graph's error is float32 rounding and the gate says so."""
    model = peak_heads(build_model(full_depth.config(), seed=full_depth.SEED), 8.0).eval()
    pre = dataclasses.replace(build.preprocess_for(model.config, {}), short_edge=320)
    sizes = build.parity_sizes(pre)
    with torch.no_grad():
        logits, masks = model(torch.from_numpy(parity.normalise(parity.synthetic_image(*sizes[0], seed=1))))
    assert float(masks.abs().max()) > 20 and float(logits.std()) > 3, "heads not peaked"
    path = tmp_path / "model.onnx"
    onnx_export.export_onnx(model, path, opset=18)  # the background trace of this architecture is in the cache
    report = parity.check(model, path, sizes, enforce=True)
    assert report["passed"] is True
    first = report["inputs"][0]
    assert first["reference"] == "float64 PyTorch"
    for name in ("pred_logits", "pred_masks"):
        assert 0 < first[name]["noise_rms"] and first[name]["noise_ratio"] <= parity.NOISE_FACTOR


@pytest.mark.parametrize(("preset", "seed", "task"), README_SEEDS)
def test_every_seed_of_the_readme_examples_exports(preset, seed, task, tmp_bundles):
    spec = VersionSpec(version="v9.9", source=f"random:{preset}?seed={seed}&task={task}", task=task)
    result = build.export_version(spec, tmp_bundles)
    assert result.config.parity["passed"] is True and result.config.parity["gate"] == "enforced"


@pytest.fixture
def graph(ms_multi, tmp_path) -> Path:
    """A copy of ms_multi's published graph, for a test to break."""
    return _copy_graph(ms_multi.bundle_dir / "model.onnx", tmp_path / "graph")


def _model_of(ms_multi) -> M2FP:
    """Our model with ms_multi's weights, read from its ModelScope directory as the export read them."""
    return sources.resolve(str(ms_multi.model_dir), task=None).build_model().eval()


def _check(ms_multi, path: Path) -> dict:
    return parity.check(_model_of(ms_multi), path, build.parity_sizes(ms_multi.config.preprocess), enforce=False)


def test_the_published_graph_passes(ms_multi, graph):
    """Control for the two below: the unbroken copy passes with the same model and sizes."""
    report = _check(ms_multi, graph)
    assert report["passed"] is True, report.get("failures")
    layers = _model_of(ms_multi).config.decoder.dec_layers
    for entry in report["inputs"]:  # the noise was measured and every masked-attention decision read
        assert entry["pred_masks"]["noise_rms"] > 0 and entry["attention"]["decisions"] == layers


def test_one_wrong_constant_is_refused(ms_multi, graph):
    """One mid-backbone convolution's weights 0.5 % too large: a small error, far above float32's rounding."""
    def scale_one(proto: onnx.ModelProto) -> None:
        inits = [t for t in proto.graph.initializer
                 if t.name.startswith("backbone.res4.") and t.name.endswith("conv2.weight")]
        assert inits, "no res4 conv2 weight in the graph"
        target = inits[0]
        array = onnx.numpy_helper.to_array(target) * np.float32(1.005)
        target.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), target.name))

    report = _check(ms_multi, _rewrite(graph, scale_one))
    assert report["passed"] is False
    assert any("pred_masks" in f or "pred_logits" in f for f in report["failures"]), report["failures"]


def test_one_wrong_operator_is_refused(ms_multi, graph):
    """One ReLU of the backbone turned into a leaky one (slope 0.01 below zero)."""
    def leak_one(proto: onnx.ModelProto) -> None:
        relus = [n for n in proto.graph.node if n.op_type == "Relu"]
        assert relus, "no Relu in the graph"
        node = relus[len(relus) // 2]
        node.op_type = "LeakyRelu"
        node.attribute.append(onnx.helper.make_attribute("alpha", 0.01))

    report = _check(ms_multi, _rewrite(graph, leak_one))
    assert report["passed"] is False
    with pytest.raises(parity.ParityError, match="rounding noise"):
        parity.check(_model_of(ms_multi), graph, build.parity_sizes(ms_multi.config.preprocess), enforce=True)
