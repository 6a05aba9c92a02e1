"""The demo versions' training (``m2fpkit.export.train``): the Hungarian matcher against brute force, the set
loss at and away from its minimum, the auxiliary taps leaving the network untouched, a few training steps
whose loss falls, and the committed demo weights loading through the export's source path with strict keys."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from m2fpkit.export import sources, specs
from m2fpkit.export.model import config as mcfg
from m2fpkit.export.model.m2fp import M2FP, build
from m2fpkit.export.source_types import DirSource, check_keys
from m2fpkit.export.train import data
from m2fpkit.export.train.loop import Recipe, Trainer
from m2fpkit.export.train.matcher import assign, match
from m2fpkit.export.train.set_loss import LossWeights, prediction_loss
from m2fpkit.export.train.taps import DecoderTaps
from m2fpkit.export.train.weights_dir import LOG_FILE
from m2fpkit.runtime.figures import CIHP_PARSING


# ------------------------------------------------------------------------------------------ matcher
def _brute_force(cost: np.ndarray) -> float:
    """The least total cost over every one-to-one assignment of min(Q, T) pairs."""
    q, t = cost.shape
    if q <= t:
        return min(sum(cost[i, c] for i, c in enumerate(cols)) for cols in itertools.permutations(range(t), q))
    return min(sum(cost[r, j] for j, r in enumerate(rows)) for rows in itertools.permutations(range(q), t))


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 5)),
              elements=st.floats(-10, 10, allow_nan=False, width=32)))
def test_the_assignment_is_the_cheapest_of_all_permutations(cost: np.ndarray):
    rows, cols = assign(cost)
    assert len(rows) == len(cols) == min(cost.shape)
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    assert list(rows) == sorted(rows)
    assert cost[rows, cols].sum() == pytest.approx(_brute_force(cost), abs=1e-9)


@pytest.mark.parametrize("bad", [np.zeros(3), np.array([[0.0, np.nan]]), np.array([[np.inf]])])
def test_assign_refuses_a_cost_that_is_no_finite_matrix(bad: np.ndarray):
    with pytest.raises(ValueError, match="cost"):
        assign(bad)


def _perfect(classes: torch.Tensor, masks: torch.Tensor, queries: int, n_classes: int,
             order: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and mask logits in which query ``order[k]`` predicts target ``k`` exactly, others "no object"."""
    logits = torch.full((queries, n_classes + 1), -20.0)
    logits[:, n_classes] = 20.0
    mask_logits = torch.full((queries, *masks.shape[1:]), -20.0)
    for k, q in enumerate(order):
        logits[q] = -20.0
        logits[q, classes[k]] = 20.0
        mask_logits[q] = torch.where(masks[k] > 0.5, 20.0, -20.0)
    return logits, mask_logits


def _targets(seed: int, n: int = 4, side: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` disjoint binary masks (horizontal bands) with distinct classes."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randperm(20, generator=g)[:n]
    masks = torch.zeros(n, side, side)
    for k in range(n):
        masks[k, k * side // n:(k + 1) * side // n] = 1
    return classes, masks


def test_match_finds_the_queries_that_predict_each_target():
    classes, masks = _targets(0)
    order = [7, 2, 9, 0]
    logits, mask_logits = _perfect(classes, masks, queries=10, n_classes=21, order=order)
    rows, cols = match(logits, mask_logits.flatten(1), classes, masks.flatten(1))
    assert dict(zip(rows.tolist(), cols.tolist())) == {q: k for k, q in enumerate(order)}


def test_an_image_without_targets_matches_nothing():
    rows, cols = match(torch.zeros(5, 22), torch.zeros(5, 16), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 16))
    assert len(rows) == len(cols) == 0


# ------------------------------------------------------------------------------------------ set loss
def _sample(classes: torch.Tensor, masks: torch.Tensor) -> data.Sample:
    return data.Sample(torch.zeros(3, 4 * masks.shape[1], 4 * masks.shape[2]), classes, masks)


def test_the_loss_is_near_zero_for_a_perfect_prediction_and_large_for_wrong_ones():
    classes, masks = _targets(1)
    target = [_sample(classes, masks)]
    logits, mask_logits = _perfect(classes, masks, queries=10, n_classes=21, order=[3, 1, 4, 5])
    perfect = prediction_loss(logits[None], mask_logits[None], target)
    assert perfect.total.item() < 1e-3
    assert min(perfect.cls.item(), perfect.mask.item(), perfect.dice.item()) >= 0
    wrong_class = logits.clone()
    wrong_class[[3, 1, 4, 5]] = wrong_class[[3, 1, 4, 5]].roll(1, dims=1)  # right masks, wrong classes
    shifted = mask_logits.roll(1, dims=1)  # right classes, masks one row off
    for lg, mk in ((wrong_class, mask_logits), (logits, shifted), (torch.zeros_like(logits), mask_logits * 0)):
        assert prediction_loss(lg[None], mk[None], target).total.item() > 1.0


def test_the_no_object_weight_scales_the_loss_of_unmatched_queries():
    classes, masks = _targets(2, n=1)
    logits, mask_logits = _perfect(classes, masks, queries=6, n_classes=21, order=[0])
    logits[1:, -1] = -20.0
    logits[1:, 5] = 20.0  # five unmatched queries claim a class instead of "no object"
    light = prediction_loss(logits[None], mask_logits[None], [_sample(classes, masks)], LossWeights(no_object=0.1))
    heavy = prediction_loss(logits[None], mask_logits[None], [_sample(classes, masks)], LossWeights(no_object=0.5))
    assert heavy.cls.item() > light.cls.item() > 1.0
    assert heavy.mask.item() == pytest.approx(light.mask.item())


# ------------------------------------------------------------------------------------------ targets
def test_segments_are_background_each_part_class_and_each_person():
    labels = np.array([[0, 2, 2, 0], [0, 13, 14, 0], [0, 13, 5, 5]], np.uint8)
    humans = np.array([[0, 1, 1, 0], [0, 1, 1, 0], [0, 1, 2, 2]], np.uint8)
    classes, masks = data.segments(labels, humans, human_class=20, n_parsing=20)
    assert classes.tolist() == [0, 2, 5, 13, 14, 20, 20]
    assert (masks[0] == (labels == 0)).all() and (masks[-1] == (humans == 2)).all()
    assert masks.sum(axis=(1, 2)).tolist() == [5, 2, 2, 2, 1, 5, 2]
    single, _ = data.segments(labels, None, human_class=None, n_parsing=20)
    assert single.tolist() == [0, 2, 5, 13, 14]


def test_mirroring_swaps_left_and_right_classes():
    pairs = data.flip_pairs(CIHP_PARSING)
    assert {(CIHP_PARSING[a], CIHP_PARSING[b]) for a, b in pairs} == {
        ("Left-arm", "Right-arm"), ("Left-leg", "Right-leg"), ("Left-shoe", "Right-shoe")}


def test_a_sample_is_the_runtime_input_with_masks_on_the_stride_4_grid():
    cfg = mcfg.preset("tiny", "multi-human")
    from m2fpkit.export.build import preprocess_for
    pre = preprocess_for(cfg, {})
    aug = data.Augment(scale=(96, 128), crop=(128, 160))
    s = data.sample(5, cfg, pre, aug)
    assert s.image.shape == (3, 128, 160) and s.masks.shape[1:] == (32, 40)
    assert len(s.classes) == len(s.masks) and float(s.masks.min()) >= 0 and float(s.masks.max()) <= 1
    assert torch.equal(data.sample(5, cfg, pre, aug).masks, s.masks)  # seeded


# ------------------------------------------------------------------------------------------ taps
def test_the_taps_read_each_layer_and_leave_the_network_as_it_was(one_thread):
    model = build(mcfg.preset("tiny", "multi-human"), seed=0)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        before = model(x)
        with DecoderTaps(model) as taps:
            during = model(x)
            aux = taps.auxiliary()
        after = model(x)
    assert len(aux) == model.config.decoder.dec_layers
    assert all(lg.shape == before[0].shape and mk.shape == before[1].shape for lg, mk in aux)
    for out in (during, after):
        assert all(torch.equal(a, b) for a, b in zip(before, out))
    assert not any(m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------------------------------ training
@pytest.fixture
def one_thread():
    """Training runs with one thread, as ``make train-demo`` does (two threads on a busy box crawl)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_few_training_steps_lower_the_loss(one_thread):
    recipe = Recipe(name="smoke", task="multi-human", steps=24, checkpoints={}, seed=5, batch=1, lr=2e-3,
                    warmup=3, cycle=2, preprocess={"short_edge": 128, "max_size": 192},
                    augment=data.Augment(scale=(96, 128), crop=None, flip=False))
    trainer = Trainer(recipe, log_every=1)
    trainer.run()
    losses = [row[1] for row in trainer.history]
    assert len(losses) == recipe.steps
    assert np.mean(losses[-6:]) < 0.8 * np.mean(losses[:6])


# ------------------------------------------------------------------------------------------ demo weights
def _demo_dirs() -> list[tuple[str, specs.VersionSpec]]:
    return [(v, s) for v, s in specs.load().versions.items() if isinstance(sources.parse(s.source), DirSource)]


def test_the_demo_versions_are_trained_weights_in_the_repository():
    demo = dict(_demo_dirs())
    assert {"v1.0", "v1.1", "v1.2", "v2.0-beta"} <= set(demo)
    root = Path(specs.DEFAULT_SPECS).resolve().parent
    for spec in demo.values():
        assert Path(spec.source).is_relative_to(root)


@pytest.mark.parametrize("version", ["v1.0", "v1.1", "v1.2", "v2.0-beta"])
def test_the_committed_demo_weights_load_with_strict_keys(version: str):
    spec = specs.load().get(version)
    ck = sources.resolve(spec.source, task=spec.task)
    assert ck.kind == "dir" and ck.config.task == spec.task and ck.state_dict is not None
    check_keys(M2FP(ck.config).state_dict(), ck.state_dict)
    assert ck.config == mcfg.preset("tiny", ck.config.task)
    log = json.loads((Path(spec.source) / LOG_FILE).read_text())
    assert log["version"] == version and log["loss"] and log["step"] == log["loss"][-1][0]


def test_a_relative_directory_source_is_relative_to_the_spec_file(tmp_path: Path, monkeypatch):
    (tmp_path / "specs").mkdir()
    spec_file = tmp_path / "specs" / "versions.toml"
    spec_file.write_text('[versions."v1.0"]\nsource = "weights/v1.0"\n\n[versions."v1.1"]\nsource = "random:tiny"\n')
    monkeypatch.chdir(tmp_path)
    loaded = specs.load(spec_file)
    assert loaded.get("v1.0").source == str(tmp_path / "specs" / "weights" / "v1.0")
    assert loaded.get("v1.1").source == "random:tiny"
