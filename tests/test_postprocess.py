"""``prepare`` + raw outputs + ``postprocess`` against ModelScope's pipeline, end to end.

ModelScope runs ``preprocess → forward → model.postprocess → pipeline.postprocess`` on the image;
we run ``prepare``, our PyTorch model (same weights) and ``postprocess`` on numpy outputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2fpkit.runtime import postprocess as post
from m2fpkit.runtime.postprocess import postprocess, topk_unsorted
from m2fpkit.runtime.preprocess import prepare
from m2fpkit.runtime.result import ParseResult
from reference.modelscope_pipeline import bundle_config, our_outputs, run_pipeline, synthetic_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0.5, b > 0.5
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def _compare(ref, rgb: np.ndarray, short: int = 640, longest: int = 1333) -> tuple[ParseResult, object]:
    cfg = bundle_config(ref.cfg, short_edge=short, max_size=longest)
    run = run_pipeline(ref.pipe, rgb, short, longest)
    prepared = prepare(rgb, cfg.preprocess)
    result = postprocess(*our_outputs(ref.ours, prepared.tensor), prepared, cfg)
    theirs, ours = run.output, result.to_modelscope()
    assert ours["labels"] == theirs["labels"]  # same instances, same order
    np.testing.assert_allclose(ours["scores"], theirs["scores"], atol=1e-3, rtol=0)
    for a, b in zip(ours["masks"], theirs["masks"]):
        assert a.shape == b.shape == rgb.shape[:2] and a.dtype == b.dtype
        assert _iou(a, b) >= 0.99
    assert result.label_map.shape == rgb.shape[:2] and result.label_map.dtype == np.uint8
    assert (result.label_map == run.label_map).mean() >= 0.99
    return result, run


@pytest.mark.parametrize(("hw", "short", "longest"), [
    ((120, 180), 160, 320),   # landscape upscale, 160x240
    ((200, 130), 160, 320),   # portrait: 246x160, height not a multiple of 32
    ((97, 301), 160, 320),    # long side clamped: 103x320
    ((400, 300), 160, 320),   # downscale
    ((45, 60), 640, 1333),    # the real settings: 640x853 padded to 640x864
])
def test_multi_human_matches_modelscope(ref_multi, hw, short, longest):
    rgb = synthetic_image(*hw, seed=hw[0] + 1)
    result, run = _compare(ref_multi, rgb, short, longest)
    labels = [i.class_name for i in result.instances]
    assert len(labels) >= 10 and len(set(labels)) >= 3  # not vacuous
    assert "Human" in labels and labels[-1] == "Human" and labels[0] != "Human"
    assert len(np.unique(result.label_map)) >= 2
    _check_persons(result)


def _check_persons(result: ParseResult) -> None:
    humans = [i for i in result.instances if i.class_name == "Human"]
    parts = [i for i in result.instances if i.class_name != "Human"]
    assert len(result.persons) == len(humans) >= 1
    assert [p.id for p in result.persons] == list(range(1, len(humans) + 1))
    assert [p.score for p in result.persons] == sorted((h.score for h in humans), reverse=True)
    pm = result.person_map
    assert pm is not None and pm.dtype == np.uint16 and pm.shape == result.label_map.shape
    assert np.array_equal(pm > 0, np.logical_or.reduce([h.mask for h in humans]))
    for person in result.persons:  # a pixel belongs to the best-scoring human covering it
        better = [p.mask for p in result.persons if p.id < person.id]
        expected = person.mask & ~np.logical_or.reduce(better) if better else person.mask
        assert np.array_equal(pm == person.id, expected)
    for part in parts:
        hits = np.bincount(pm[part.mask], minlength=len(humans) + 1)[1:]
        assert part.person_id == (int(hits.argmax()) + 1 if hits.max() > 0 else None)
    assert sum(len(p.parts) for p in result.persons) == sum(p.person_id is not None for p in parts) >= 1


@pytest.mark.parametrize("hw", [
    (150, 100),   # centred on the canvas
    (149, 111),   # ModelScope's no-canvas quirk
    (300, 180),   # portrait downscale
    (200, 400),   # landscape downscale
    (90, 60),     # small image, wide grey margins
])
def test_single_human_matches_modelscope(ref_single, hw):
    rgb = synthetic_image(*hw, seed=hw[0] + 3)
    result, run = _compare(ref_single, rgb)
    ids = [i.class_id for i in result.instances]
    assert ids == sorted(ids) and ids == list(np.unique(result.label_map))
    assert len(ids) >= 2  # several classes present
    for inst in result.instances:
        assert np.array_equal(inst.mask, result.label_map == inst.class_id)
    assert result.persons == () and result.person_map is None


def test_single_human_needs_sigmoid_before_the_einsum(ref_single):
    """sigmoid sits between the upsampling and the einsum: a low-resolution einsum would not match."""
    rgb = synthetic_image(150, 100, seed=153)
    result, run = _compare(ref_single, rgb)
    prepared = prepare(rgb, bundle_config(ref_single.cfg).preprocess)
    low = np.einsum("qc,qhw->hwc", post._softmax(run.logits[0])[:, :-1], post._sigmoid(run.masks[0]))
    shortcut = np.stack([post._to_original(np.ascontiguousarray(low[..., c]), prepared)
                         for c in range(low.shape[-1])]).argmax(0)
    assert (shortcut == run.label_map).mean() < 0.99  # the image discriminates the two
    assert (result.label_map == run.label_map).mean() >= 0.999


def test_overlay_and_modelscope_format(ref_multi):
    rgb = synthetic_image(120, 180, seed=121)
    cfg = bundle_config(ref_multi.cfg, short_edge=160, max_size=320)
    prepared = prepare(rgb, cfg.preprocess)
    result = postprocess(*our_outputs(ref_multi.ours, prepared.tensor), prepared, cfg)
    out = result.to_modelscope()
    assert set(out) == {"masks", "labels", "scores"}
    assert all(set(np.unique(m)) <= {0.0, 1.0} for m in out["masks"])
    assert all(isinstance(s, float) for s in out["scores"])
    vis = result.overlay(rgb, cfg.palette, alpha=0.5)
    bg = result.label_map == 0
    assert vis.dtype == np.uint8 and vis.shape == rgb.shape
    assert bg.any() and (~bg).any()
    assert np.array_equal(vis[bg], rgb[bg])
    colour = np.asarray(cfg.palette, float)[result.label_map[~bg]]
    assert np.abs(vis[~bg] - (rgb[~bg] * 0.5 + colour * 0.5)).max() <= 1
    with pytest.raises(ValueError):
        result.overlay(rgb[:10], cfg.palette)


@pytest.mark.parametrize(("n", "k"), [(420, 100), (2100, 100), (2100, 37), (7000, 100)])
@pytest.mark.parametrize("ties", [False, True])
def test_topk_order_is_torchs(n, k, ties):
    gen = torch.Generator().manual_seed(n + k)
    x = torch.softmax(torch.randn(n // 21, 22, generator=gen) * 4, -1)[:, :-1].flatten()
    if ties and k * 64 > n:  # partial_sort (k*64 <= n) orders ties its own way; M2FP never takes that path
        x = torch.round(x * 40) / 40
    expected = x.topk(k, sorted=False).indices.numpy()
    assert np.array_equal(topk_unsorted(x.numpy(), k), expected)
    assert not np.array_equal(expected, np.sort(expected))  # the order is not trivial


def _fake_outputs(q: int, confident: int, hw4: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((1, q, 22)).astype(np.float32)
    logits[0, :, 21] += 10.0                    # most queries say "no object"
    for i in range(confident):
        logits[0, i, [5, 9, 20][i % 3]] += 12.0  # a few confident parts and humans
    masks = (rng.standard_normal((1, q, *hw4)) * 4).astype(np.float32)
    return logits, masks


def test_only_candidate_masks_are_upsampled(ref_multi, monkeypatch):
    cfg = bundle_config(ref_multi.cfg, short_edge=160, max_size=320)
    prepared = prepare(synthetic_image(90, 120, seed=5), cfg.preprocess)
    hp, wp = prepared.padded_hw
    logits, masks = _fake_outputs(100, 4, (hp // 4, wp // 4), seed=0)
    calls = []
    real = post._to_original
    monkeypatch.setattr(post, "_to_original", lambda low, p: calls.append(low.shape) or real(low, p))
    # noise masks are positive all over the image: 3 full-size crops to keep for pasting
    monkeypatch.setattr(post, "_PASTE_CACHE_MAPS", 3)
    result = postprocess(logits, masks, prepared, cfg)
    assert len(result.instances) == 4
    # the 4 candidates' mask scores; the 3 parts pasted into the label map (score ≥ 0.5) reuse theirs
    assert len(calls) == 4
    assert all(len(shape) == 2 for shape in calls)  # one query at a time, never all Q
    # without room to keep the upsampled masks, the pasted ones are upsampled again: same result
    calls.clear()
    monkeypatch.setattr(post, "_PASTE_CACHE_MAPS", 0)
    again = postprocess(logits, masks, prepared, cfg)
    assert len(calls) == 4 + 3
    _same_result(again, result)


def _same_result(a: ParseResult, b: ParseResult) -> None:
    assert np.array_equal(a.label_map, b.label_map) and np.array_equal(a.person_map, b.person_map)
    assert [(i.class_id, i.score, i.person_id) for i in a.instances] == [
        (i.class_id, i.score, i.person_id) for i in b.instances]
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.instances, b.instances))


def _paste_everywhere(masks, q, lab, score, n_cat, thr, prepared):
    """ModelScope's ``paste_instance_to_semseg_probs`` argmax over the whole image (no boxes, no cache)."""
    maps = [np.zeros(prepared.original_hw, np.float32)]
    for c in range(1, n_cat):
        acc = np.zeros(prepared.original_hw, np.float32)
        times = np.zeros(prepared.original_hw, np.float32)
        sel = np.flatnonzero((lab == c) & (score >= np.float32(thr)))
        for i in sel[np.argsort(score[sel], kind="stable")]:
            p = post._sigmoid(post._to_original(masks[q[i]], prepared)) * score[i]
            np.add(acc, p, out=acc, where=p > 0.5)
            times += p > 0.5
        maps.append(acc / np.maximum(times, 1.0))
    return np.stack(maps).argmax(0).astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pasting_inside_positive_boxes_equals_pasting_everywhere(ref_multi, seed):
    """Pasting is confined to each mask's positive bounding box; over the whole image it gives the same map."""
    cfg = bundle_config(ref_multi.cfg, short_edge=160, max_size=320)
    prepared = prepare(synthetic_image(100, 150, seed=seed), cfg.preprocess)
    hp, wp = prepared.padded_hw
    rng = np.random.default_rng(seed)
    q = rng.permutation(30)[:12]
    lab = rng.integers(1, 6, 12)
    score = rng.uniform(0.45, 1.0, 12).astype(np.float32)
    yy, xx = np.mgrid[0:hp // 4, 0:wp // 4]
    masks = np.full((30, hp // 4, wp // 4), -5.0, np.float32)
    for k in q:  # blobs: positive on a disc, negative elsewhere
        cy, cx, r = rng.uniform(0, hp // 4), rng.uniform(0, wp // 4), rng.uniform(3, 12)
        masks[k] = 6 * (1 - np.hypot(yy - cy, xx - cx) / r)
    crops = {}
    got = post._paste_labels(masks, q, lab, score, 6, 0.5, prepared, crops)
    expected = _paste_everywhere(masks, q, lab, score, 6, 0.5, prepared)
    assert np.array_equal(got, expected)
    assert len(np.unique(got)) >= 3  # several categories won somewhere


def test_wrong_output_shapes_are_refused(ref_multi):
    cfg = bundle_config(ref_multi.cfg, short_edge=160, max_size=320)
    prepared = prepare(synthetic_image(64, 64, seed=1), cfg.preprocess)
    logits, masks = _fake_outputs(20, 2, (40, 40), seed=1)
    with pytest.raises(ValueError):
        postprocess(logits[:, :, :-1], masks, prepared, cfg)
    with pytest.raises(ValueError):
        postprocess(logits, masks[0], prepared, cfg)
