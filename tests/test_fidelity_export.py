"""Fidelity of the export, for both variants, against ModelScope's OWN M2FP class.

(a) a ModelScope directory loads into our network with exactly ModelScope's keys;
(b) PyTorch (ours) == PyTorch (ModelScope) within 1e-5, on sizes that are not multiples of 32 fed
    through ModelScope's own forward (which normalises and pads internally);
(c) onnxruntime on the published bundle == ModelScope within 1e-4;
(d) the bundle's config.json records the parity gate's figures, and they passed.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import onnxruntime as ort
import pytest
import torch

from m2fpkit.export import parity, sources
from m2fpkit.export.build import parity_sizes
from m2fpkit.export.model import config as mcfg
from m2fpkit.export.model.m2fp import build, count_parameters
from m2fpkit.runtime.bundle import reader
from reference.cases import CASE_VERSIONS, normalise_and_pad, sample_image
from reference.modelscope_m2fp import build_modelscope_m2fp, modelscope_forward

CASES = ["ms_multi", "ms_single"]
TORCH_ATOL = 1e-5
ONNX_ATOL = 1e-4
#: (height, width): none of the first three is a multiple of 32 on either side
TORCH_SIZES = [(161, 97), (250, 333), (517, 389), (320, 320)]
ONNX_SIZES = [(200, 300), (320, 320), (517, 389), (512, 384)]


@pytest.fixture(params=CASES)
def case(request):
    return request.getfixturevalue(request.param)


@functools.lru_cache(maxsize=4)
def _session(onnx_path: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=4)
def _ours(model_dir: str):
    return sources.load_modelscope_dir(model_dir).build_model()


def _assert_nontrivial(logits: torch.Tensor, masks: torch.Tensor, tol: float) -> None:
    """The reference outputs carry information far above the tolerance they are compared with."""
    assert float(logits.std()) > max(0.1, 1e3 * tol)
    assert float(masks.std()) > max(0.1, 1e3 * tol)
    # queries disagree with each other (not one answer broadcast over all queries)
    assert float(logits[0].std(0).mean()) > max(0.05, 500 * tol)
    assert float(masks[0].std(0).mean()) > max(0.05, 500 * tol)
    # mask logits of both signs: the masked attention masks something, and not everything
    neg = float((masks < 0).float().mean())
    assert 0.005 < neg < 0.995, neg
    # several classes win somewhere
    assert len(torch.unique(logits[0].argmax(-1))) >= 3


# ------------------------------------------------------------------------------- (a) key match

def test_modelscope_dir_loads_with_exact_keys(case):
    ck = sources.load_modelscope_dir(case.model_dir)
    assert ck.kind == "dir"
    assert ck.config == mcfg.preset("tiny", case.task)
    expected = build(ck.config).state_dict()
    assert set(ck.state_dict) == set(expected)  # num_batches_tracked included: nothing to ignore here
    sources.check_keys(expected, ck.state_dict)
    fresh = build(ck.config)
    result = fresh.load_state_dict(ck.state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    model = ck.build_model()
    assert not model.training
    ref = case.ms_model.state_dict()
    ours = model.state_dict()
    assert set(ours) == set(ref)
    for k, v in ref.items():
        assert torch.equal(ours[k], v), k


def test_modelscope_loader_reads_the_same_dir(case):
    """ModelScope's own loader (pretrained=True) gets the weights we compare against from model_dir."""
    import json
    model_cfg = json.loads((case.model_dir / "configuration.json").read_text())["model"]
    assert model_cfg["pretrained"] is True
    loaded = build_modelscope_m2fp(case.model_dir, model_cfg)
    ref = case.ms_model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert torch.equal(got[k], v), k


def test_reference_weights_are_randomised(case):
    sd = case.ms_model.state_dict()
    bn_var = sd["backbone.stem.conv1.norm.running_var"]
    assert not torch.allclose(bn_var, torch.ones_like(bn_var))
    assert float(sd["sem_seg_head.predictor.class_embed.bias"].abs().max()) > 0
    assert not case.ms_model.training


# ---------------------------------------------------------------- (b) ours == ModelScope, PyTorch

@pytest.mark.parametrize("hw", TORCH_SIZES, ids=[f"{h}x{w}" for h, w in TORCH_SIZES])
def test_pytorch_matches_modelscope(case, hw):
    h, w = hw
    img = sample_image(h, w, seed=7 * h + w)
    ref_logits, ref_masks = modelscope_forward(case.ms_model, img)  # ModelScope normalises and pads itself
    _assert_nontrivial(ref_logits, ref_masks, TORCH_ATOL)
    x = normalise_and_pad(img)
    assert x.shape[-2] % 32 == 0 and x.shape[-1] % 32 == 0
    with torch.no_grad():
        logits, masks = _ours(str(case.model_dir))(x)
    q = case.config.num_queries
    assert logits.shape == ref_logits.shape == (1, q, case.config.num_classes + 1)
    assert masks.shape == ref_masks.shape == (1, q, x.shape[-2] // 4, x.shape[-1] // 4)
    d_logits = float((logits - ref_logits).abs().max())
    d_masks = float((masks - ref_masks).abs().max())
    assert d_logits <= TORCH_ATOL, f"pred_logits max abs diff {d_logits:.3g} at {h}x{w}"
    assert d_masks <= TORCH_ATOL, f"pred_masks max abs diff {d_masks:.3g} at {h}x{w}"


def test_comparison_is_sensitive_to_the_padding(case):
    """Padding with 0 *before* normalising (the usual mistake) is caught by the tolerance."""
    h, w = TORCH_SIZES[1]
    img = sample_image(h, w, seed=11)
    ref_logits, ref_masks = modelscope_forward(case.ms_model, img)
    ph, pw = -(-h // 32) * 32, -(-w // 32) * 32
    padded_raw = torch.zeros(3, ph, pw)
    padded_raw[:, :h, :w] = img
    wrong = normalise_and_pad(padded_raw)
    with torch.no_grad():
        logits, masks = _ours(str(case.model_dir))(wrong)
    assert float((masks - ref_masks).abs().max()) > 100 * TORCH_ATOL
    assert float((logits - ref_logits).abs().max()) > 100 * TORCH_ATOL


def test_our_model_counts_match_modelscope(case):
    ours = _ours(str(case.model_dir))
    assert count_parameters(ours) == sum(p.numel() for p in case.ms_model.parameters())
    assert case.config.architecture["parameters"] == count_parameters(ours)


# --------------------------------------------------------------------- (c) ONNX == ModelScope

@pytest.mark.parametrize("hw", ONNX_SIZES, ids=[f"{h}x{w}" for h, w in ONNX_SIZES])
def test_onnx_matches_modelscope(case, hw):
    h, w = hw
    img = sample_image(h, w, seed=3 * h + w)
    ref_logits, ref_masks = modelscope_forward(case.ms_model, img)
    _assert_nontrivial(ref_logits, ref_masks, ONNX_ATOL)
    sess = _session(str(case.bundle_dir / case.config.model_file))
    assert [i.name for i in sess.get_inputs()] == [t.name for t in case.config.inputs]
    names = [o.name for o in sess.get_outputs()]
    assert names == ["pred_logits", "pred_masks"] == [t.name for t in case.config.outputs]
    x = normalise_and_pad(img).numpy()
    logits, masks = sess.run(names, {case.config.inputs[0].name: x})
    assert logits.shape == tuple(ref_logits.shape) and masks.shape == tuple(ref_masks.shape)
    d_logits = float(np.abs(logits - ref_logits.numpy()).max())
    d_masks = float(np.abs(masks - ref_masks.numpy()).max())
    assert d_logits <= ONNX_ATOL, f"pred_logits max abs diff {d_logits:.3g} at {h}x{w}"
    assert d_masks <= ONNX_ATOL, f"pred_masks max abs diff {d_masks:.3g} at {h}x{w}"
    agree = (parity.semantic_labels(logits, masks)
             == parity.semantic_labels(ref_logits.numpy(), ref_masks.numpy())).mean()
    assert agree >= 0.999


# ---------------------------------------------------------------------- (d) parity in config.json

def test_config_records_passed_parity(case):
    cfg = case.config
    rep = cfg.parity
    assert rep["passed"] is True
    assert rep["runtime"] == f"onnxruntime {ort.__version__}"
    tol = rep["tolerance"]
    assert tol == {"noise_factor": parity.NOISE_FACTOR, "quantile": parity.QUANTILE, "abs_floor": parity.ABS_FLOOR,
                   "threshold_factor": parity.THRESHOLD_FACTOR, "decisive_margin": parity.DECISIVE_MARGIN,
                   "label_slack": parity.LABEL_SLACK}
    sizes = [(e["height"], e["width"]) for e in rep["inputs"]]
    assert len(sizes) >= 3 and len(set(sizes)) == len(sizes)
    assert sizes == parity_sizes(cfg.preprocess)
    assert [e["reference"] for e in rep["inputs"]] == ["float64 PyTorch"] + ["float32 PyTorch"] * (len(sizes) - 1)
    for entry in rep["inputs"]:
        for name in ("pred_logits", "pred_masks"):
            fig = entry[name]
            assert 0 < fig["noise_rms"] <= fig["noise_quantile"]  # the floor was measured, not zero
            assert fig["noise_ratio"] <= fig["allowed_ratio"]
            assert fig["rms_error"] <= fig["allowed_ratio"] * fig["noise_rms"] + tol["abs_floor"] * fig["scale"]
        labels = entry["labels"]
        assert labels["decisive_pixels"] > 0 and labels["onnx_miss"] <= labels["fp32_miss"] + tol["label_slack"]
        attention = entry["attention"]  # every masked-attention decision read; any flip within rounding of 0
        assert attention["decisions"] == case_layers(case) and attention["worst_flip_logit"] <= attention[
            "allowed_flip_logit"]


def case_layers(case) -> int:
    return int(case.config.architecture["decoder"]["dec_layers"])


def test_bundle_describes_the_checkpoint(case):
    cfg = case.config
    assert case.bundle_dir == case.bundles_root / "m2fp" / CASE_VERSIONS[case.task]
    assert cfg.version == CASE_VERSIONS[case.task] and cfg.channel == "stable"
    assert cfg.task == case.task
    ms = mcfg.preset("tiny", case.task)
    assert cfg.classes == ms.classes and cfg.num_queries == ms.decoder.num_queries
    assert cfg.human_class == (20 if case.task == "multi-human" else None)
    assert cfg.preprocess.resize == ("shortest-edge" if case.task == "multi-human" else "center-canvas")
    assert cfg.source["kind"] == "dir"
    assert cfg.source["uri"] == str(case.model_dir.resolve())
    weights = (case.model_dir / "pytorch_model.pt").read_bytes()
    assert cfg.source["sha256"] == hashlib.sha256(weights).hexdigest()
    assert reader.inspect(case.bundle_dir).config == cfg  # files, hashes, config and weights index verify
    meta = _session(str(case.bundle_dir / cfg.model_file)).get_modelmeta().custom_metadata_map
    assert meta["m2fp.version"] == cfg.version and meta["m2fp.task"] == cfg.task
    assert meta["m2fp.source_sha256"] == cfg.source["sha256"]
