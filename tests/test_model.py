"""Our PyTorch M2FP: size of the presets, ModelScope's state-dict layout, configuration parsing."""

from __future__ import annotations

import copy

import pytest
import torch

from m2fpkit.export.model import config as mcfg
from m2fpkit.export.model.m2fp import build, count_parameters
from reference.modelscope_m2fp import build_modelscope_m2fp

TASKS = ("multi-human", "single-human")


def _modelscope_model(cfg: mcfg.M2FPConfig, tmp_path):
    ms_cfg = cfg.to_modelscope()
    ms_cfg["pretrained"] = False
    return build_modelscope_m2fp(tmp_path, ms_cfg)


# ------------------------------------------------------------------------------------- size

@pytest.mark.parametrize("task", TASKS)
def test_r101_has_63_1_million_parameters(task):
    cfg = mcfg.preset("r101", task)
    model = build(cfg)
    n = count_parameters(model)
    assert abs(n - 63.12e6) <= 0.01e6, n
    sd = model.state_dict()
    assert len(sd) == 928
    assert sum(k.endswith("num_batches_tracked") for k in sd) > 0
    # architecture facts the count rests on
    assert sum(k.startswith("backbone.res4.") and k.endswith(".conv1.weight") for k in sd) == 23
    assert len({k.split(".")[3] for k in sd if k.startswith("sem_seg_head.predictor.transformer_ffn_layers.")}) == 9
    assert sd["sem_seg_head.predictor.class_embed.weight"].shape == (len(cfg.classes) + 1, 256)
    assert sd["sem_seg_head.predictor.query_feat.weight"].shape == (100, 256)


@pytest.mark.parametrize("task", TASKS)
def test_tiny_is_small_and_runs(task):
    cfg = mcfg.preset("tiny", task)
    model = build(cfg, seed=3)
    assert count_parameters(model) < 1_000_000
    with torch.no_grad():
        logits, masks = model(torch.randn(1, 3, 96, 128))
    q = cfg.decoder.num_queries
    assert logits.shape == (1, q, len(cfg.classes) + 1)
    assert masks.shape == (1, q, 96 // 4, 128 // 4)
    assert torch.isfinite(logits).all() and torch.isfinite(masks).all()


def test_classes_per_task():
    multi, single = mcfg.preset("tiny", "multi-human"), mcfg.preset("tiny", "single-human")
    assert multi.decoder.num_classes == 21 and multi.classes[20] == "Human" and multi.num_parsing == 20
    assert single.decoder.num_classes == 20 and "Human" not in single.classes
    assert multi.task == "multi-human" and single.task == "single-human"


# --------------------------------------------------------------------- ModelScope key layout

@pytest.mark.parametrize("preset", ["tiny", "r101"])
@pytest.mark.parametrize("task", TASKS)
def test_state_dict_keys_equal_modelscope(preset, task, tmp_path):
    cfg = mcfg.preset(preset, task)
    ours = build(cfg).state_dict()
    theirs = _modelscope_model(cfg, tmp_path).state_dict()
    only_ours, only_theirs = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    assert not only_ours and not only_theirs, (only_ours[:10], only_theirs[:10])
    shapes = [k for k in ours if tuple(ours[k].shape) != tuple(theirs[k].shape)]
    assert not shapes, shapes[:10]
    assert len(ours) == len(theirs)
    if preset == "r101":
        assert len(theirs) == 928


def test_modelscope_weights_load_strictly_into_ours(tmp_path):
    cfg = mcfg.preset("tiny", "multi-human")
    theirs = _modelscope_model(cfg, tmp_path)
    ours = build(cfg)
    result = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k


# --------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("preset", ["tiny", "r101"])
@pytest.mark.parametrize("task", TASKS)
def test_modelscope_config_round_trip(preset, task):
    cfg = mcfg.preset(preset, task)
    ms = cfg.to_modelscope()
    assert ms["type"] == "m2fp"
    assert ms["single_human"] is (task == "single-human")
    assert ms["decoder"]["num_classes"] == len(ms["classes"])
    assert mcfg.from_modelscope(ms) == cfg
    # the dict is plain JSON data and parsing does not change it
    import json
    assert json.loads(json.dumps(ms)) == ms
    before = copy.deepcopy(ms)
    mcfg.from_modelscope(ms)
    assert ms == before


def _ms(task: str = "multi-human") -> dict:
    return mcfg.preset("tiny", task).to_modelscope()


def _error(raw: dict) -> str:
    with pytest.raises(mcfg.ConfigError) as info:
        mcfg.from_modelscope(raw)
    return str(info.value)


def test_config_error_wrong_type_names_key_path():
    raw = _ms()
    raw["decoder"]["num_classes"] = "21"
    msg = _error(raw)
    assert "model.decoder.num_classes" in msg and "integer" in msg


def test_config_error_bool_is_not_an_integer():
    raw = _ms()
    raw["backbone"]["depth"] = True
    assert "model.backbone.depth" in _error(raw)


def test_config_error_class_count_mismatch_names_both_keys():
    raw = _ms()
    raw["classes"] = raw["classes"][:-1]
    msg = _error(raw)
    assert "decoder.num_classes" in msg and "classes" in msg
    assert "21" in msg and "20" in msg


@pytest.mark.parametrize("section", ["backbone", "encoder", "decoder", "classes"])
def test_config_error_missing_section(section):
    raw = _ms()
    del raw[section]
    msg = _error(raw)
    assert f"model.{section}" in msg and "missing" in msg


def test_config_error_list_expected():
    raw = _ms()
    raw["encoder"]["in_features"] = "res2"
    assert "model.encoder.in_features" in _error(raw)


def test_config_error_section_not_object():
    raw = _ms()
    raw["encoder"] = [1, 2]
    assert "model.encoder" in _error(raw)


def test_config_error_bad_canvas():
    raw = _ms("single-human")
    raw["input_single_human"] = {"sizes": [["wide", 512]]}
    assert "model.input_single_human.sizes" in _error(raw)


def test_config_error_bad_classes():
    raw = _ms()
    raw["classes"] = []
    assert "model.classes" in _error(raw)
    raw["classes"] = "Background"
    assert "model.classes" in _error(raw)


def test_config_error_path_prefix_is_the_callers():
    raw = _ms()
    raw["decoder"]["hidden_dim"] = 1.5
    with pytest.raises(mcfg.ConfigError, match=r"configuration\.json → model\.decoder\.hidden_dim"):
        mcfg.from_modelscope(raw, path="configuration.json → model")


def test_unknown_config_key_is_ignored_with_a_warning(caplog):
    raw = _ms()
    raw["decoder"]["some_future_option"] = 3
    assert mcfg.from_modelscope(raw) == mcfg.preset("tiny", "multi-human")
    assert any("decoder.some_future_option" in r.getMessage() for r in caplog.records)


def test_preset_errors():
    with pytest.raises(mcfg.ConfigError, match="preset"):
        mcfg.preset("r18")
    with pytest.raises(mcfg.ConfigError, match="task"):
        mcfg.preset("tiny", "crowd")


def test_modelscope_defaults_apply():
    raw = _ms("single-human")
    for key in ("single_human", "num_parsing", "input_single_human", "parsing_ins_score_thr"):
        del raw[key]
    cfg = mcfg.from_modelscope(raw)
    assert cfg.single_human is True  # ModelScope's own default
    assert cfg.single_human_size == (384, 512)
    assert cfg.num_parsing == len(cfg.classes)


# ------------------------------------------------------------------------------ the shallow preset

def test_tiny_is_the_shallowest_preset_modelscope_accepts(tmp_path):
    """Fewest blocks ModelScope's backbone builds, one decoder layer per level, fewer encoder layers."""
    from m2fpkit.export.model.decoder import N_LEVELS

    tiny, r101 = mcfg.preset("tiny"), mcfg.preset("r101")
    assert tiny.encoder.transformer_enc_layers < r101.encoder.transformer_enc_layers
    assert tiny.decoder.dec_layers == N_LEVELS < r101.decoder.dec_layers
    assert tiny.backbone.depth == 50 < r101.backbone.depth
    _modelscope_model(tiny, tmp_path / "ok")  # ModelScope's M2FP takes the preset as it is
    shallower = mcfg.M2FPConfig(backbone=mcfg.BackboneConfig(depth=18))
    with pytest.raises(KeyError):  # ModelScope's backbone knows depths 50, 101 and 152 only
        _modelscope_model(shallower, tmp_path / "shallower")


def _op_kinds(onnx_path) -> set[tuple[str, str]]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    assert not model.functions  # every node is in the main graph, so its op types are all there is
    return {(n.domain, n.op_type) for n in model.graph.node}


def test_tiny_graph_has_every_operator_kind_of_the_full_depth_graph(ms_multi, full_depth_graph):
    """Shallow is only a speed-up if nothing is left out: the tiny bundle's ONNX graph uses exactly the
    operator kinds of the full-depth one, so onnxruntime runs the same kernels on both."""
    tiny = _op_kinds(ms_multi.bundle_dir / "model.onnx")
    full = _op_kinds(full_depth_graph)
    assert tiny == full, {"only in full depth": sorted(full - tiny), "only in tiny": sorted(tiny - full)}
    assert len(tiny) > 20
