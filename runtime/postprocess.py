"""Raw graph outputs → :class:`ParseResult`, reproducing ModelScope's M2FP postprocessing in numpy.

Geometry (both tasks): mask logits are bilinearly upsampled to the padded input, cropped to the
un-padded extent (and to ``crop_box``), then resized to the original image, exactly as ModelScope
does, but only for what is needed:

- multi-human: ModelScope takes the top-k (query, class) pairs of ``softmax(cls)[:, :-1]`` with
  ``torch.topk(sorted=False)``, whose order (libstdc++ ``nth_element``) decides the output order; it
  is reproduced here. A pair whose class probability cannot pass its threshold is dropped before any
  mask is upsampled (score = class prob × mean sigmoid over positive pixels ≤ class prob). Each mask
  is upsampled once (its positive crop is kept for pasting, within a budget of
  :data:`_PASTE_CACHE_MAPS` full-size maps); pasting and person assignment work inside each mask's
  positive bounding box: outside it ``sigmoid(mask) * score ≤ 0.5`` (score ≤ 1) pastes nothing.
- single-human: sigmoid is applied to the upsampled masks, so the einsum runs at input resolution,
  in chunks of queries, on the image area only; the C class maps are resized one at a time.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np

from .bundle.config import BundleConfig
from .preprocess import Prepared
from .resize import resize_float
from .result import Instance, ParseResult, Person

log = logging.getLogger(__name__)

_QUERY_CHUNK = 16
#: upsampled mask crops kept between scoring and pasting, in full-size float32 maps (else recomputed)
_PASTE_CACHE_MAPS = 2

Box = tuple[slice, slice]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(x: np.ndarray, inplace: bool = False) -> np.ndarray:
    out = np.negative(x, out=x if inplace else None)
    with np.errstate(over="ignore"):  # exp(-x) → inf for x ≪ 0 gives exactly sigmoid 0, as intended
        np.exp(out, out=out)
    out += 1.0
    return np.reciprocal(out, out=out)


# ------------------------------------------------------------------------ torch.topk(sorted=False)

def _partition(v: np.ndarray, ix: np.ndarray, lo: int, hi: int) -> int:
    """libstdc++ median-of-3 + unguarded Hoare partition of ``v[lo:hi]`` for a descending order."""
    a, b, c = lo + 1, lo + (hi - lo) // 2, hi - 1
    if v[a] > v[b]:
        m = b if v[b] > v[c] else (c if v[a] > v[c] else a)
    else:
        m = a if v[a] > v[c] else (c if v[b] > v[c] else b)
    v[[lo, m]], ix[[lo, m]] = v[[m, lo]], ix[[m, lo]]
    pivot = v[lo]
    # the left scan stops on values <= pivot, the right scan on values >= pivot; the i-th stops pair up
    left = lo + 1 + np.flatnonzero(~(v[lo + 1:hi] > pivot))
    right = (lo + np.flatnonzero(~(pivot > v[lo:hi])))[::-1]
    n = min(len(left), len(right))
    swaps = int(np.count_nonzero(left[:n] < right[:n]))
    if swaps:
        li, ri = left[:swaps], right[:swaps]
        v[li], v[ri] = v[ri].copy(), v[li].copy()
        ix[li], ix[ri] = ix[ri].copy(), ix[li].copy()
    cut = int(left[swaps]) if swaps < len(left) else hi
    return min(cut, int(right[swaps - 1])) if swaps else cut


def topk_unsorted(values: np.ndarray, k: int) -> np.ndarray:
    """Indices in the order ``torch.topk(values, k, sorted=False)`` returns them on CPU."""
    v = np.array(values, dtype=np.float32).ravel()
    n = v.size
    ix = np.arange(n)
    lo, hi = 0, n
    if k * 64 > n:  # torch uses nth_element here; otherwise partial_sort (a sorted prefix)
        depth = 2 * (n.bit_length() - 1)
        while hi - lo > 3 and depth > 0:
            depth -= 1
            cut = _partition(v, ix, lo, hi)
            lo, hi = (cut, hi) if cut <= k - 1 else (lo, cut)
        if hi - lo > 3:
            log.debug("top-k: introselect depth limit reached; tie order may differ from torch")
    order = lo + np.argsort(-v[lo:hi], kind="stable")
    ix[lo:hi] = ix[order]
    return ix[:k]


# ------------------------------------------------------------------------------------- geometry

def _to_original(low: np.ndarray, prepared: Prepared) -> np.ndarray:
    """HxW[xC] map at mask resolution → original image size, through the padded input as ModelScope."""
    x0, y0, x1, y1 = prepared.content_box
    up = resize_float(low, prepared.padded_hw)[y0:y1, x0:x1]
    return resize_float(up, prepared.original_hw)


def _argmax_maps(maps: np.ndarray, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Label map (uint8) and winning value of ``maps`` [h, w, C] bilinearly resized to ``hw``.

    Channels are resized one at a time; ties go to the lowest class, as ``argmax`` does.
    """
    best = resize_float(np.ascontiguousarray(maps[:, :, 0]), hw)
    labels = np.zeros(best.shape, dtype=np.uint8)
    for c in range(1, maps.shape[2]):
        cur = resize_float(np.ascontiguousarray(maps[:, :, c]), hw)
        better = cur > best
        labels[better] = c
        np.maximum(best, cur, out=best)
    return labels, best


# -------------------------------------------------------------------------------- single-human

def _single_human(logits: np.ndarray, masks: np.ndarray, prepared: Prepared, cfg: BundleConfig) -> ParseResult:
    probs = _softmax(logits)[:, :-1]
    x0, y0, x1, y1 = prepared.content_box
    sem = np.zeros(((y1 - y0) * (x1 - x0), probs.shape[1]), dtype=np.float32)
    for q0 in range(0, masks.shape[0], _QUERY_CHUNK):
        chunk = np.ascontiguousarray(masks[q0:q0 + _QUERY_CHUNK].transpose(1, 2, 0))
        up = resize_float(chunk, prepared.padded_hw)[y0:y1, x0:x1]
        sem += _sigmoid(up.reshape(-1, up.shape[2]), inplace=True) @ probs[q0:q0 + _QUERY_CHUNK]
    labels, best = _argmax_maps(sem.reshape(y1 - y0, x1 - x0, -1), prepared.original_hw)
    n_cls = probs.shape[1]
    counts = np.bincount(labels.ravel(), minlength=n_cls)
    # at a pixel labelled c the winning value is sem[c]: ModelScope's per-class sum of sigmoid(sem[c])
    sums = np.bincount(labels.ravel(), weights=_sigmoid(best, inplace=True).ravel(), minlength=n_cls)
    instances = tuple(
        Instance(int(c), cfg.classes[c], float(sums[c] / (counts[c] + 1)), labels == c)
        for c in np.flatnonzero(counts))
    return ParseResult(cfg.task, cfg.classes, labels, instances)


# --------------------------------------------------------------------------------- multi-human

def _box(mask: np.ndarray) -> Box | None:
    """Bounding box of a boolean mask's true pixels (None when it has none)."""
    x, y, w, h = cv2.boundingRect(mask.view(np.uint8))
    return (slice(y, y + h), slice(x, x + w)) if w and h else None


def _query_mask(low: np.ndarray, prepared: Prepared) -> tuple[np.float32, np.ndarray, np.ndarray]:
    """ModelScope's mask score (mean sigmoid over positive pixels), binary mask and mask logits, at
    original size."""
    full = _to_original(low, prepared)
    binary = full > 0
    positive = full[binary]
    total = _sigmoid(positive, inplace=True).sum(dtype=np.float64)
    return np.float32(total / (positive.size + 1e-6)), binary, full


def _positive_crop(low: np.ndarray, prepared: Prepared) -> tuple[Box, np.ndarray] | None:
    """The mask logits at original size, cropped to where they are positive (None: nowhere)."""
    full = _to_original(low, prepared)
    box = _box(full > 0)
    return None if box is None else (box, full[box])


def _paste_labels(masks: np.ndarray, q: np.ndarray, lab: np.ndarray, score: np.ndarray, n_cat: int,
                  thr: float, prepared: Prepared, crops: dict[int, tuple[Box, np.ndarray] | None]) -> np.ndarray:
    """Argmax of ModelScope's ``paste_instance_to_semseg_probs`` (its parsing semantic output).

    Per category, instances scoring at least ``thr`` are pasted in ascending score order where
    ``sigmoid(mask) * score > 0.5`` and averaged; one category map at a time is kept in memory and only
    the union of its instances' positive boxes is touched (elsewhere the map is 0, which never beats the
    running maximum: ties go low). ``crops`` holds masks already upsampled (by query); others are
    upsampled here.
    """
    hw = prepared.original_hw
    best = np.zeros(hw, dtype=np.float32)
    labels = np.zeros(hw, dtype=np.uint8)
    acc = np.zeros(hw, dtype=np.float32)
    times = np.zeros(hw, dtype=np.float32)
    for c in range(n_cat):
        sel = np.flatnonzero((lab == c) & (score >= np.float32(thr)))
        y0, x0, y1, x1 = hw[0], hw[1], 0, 0
        for i in sel[np.argsort(score[sel], kind="stable")]:
            query = int(q[i])
            crop = crops[query] if query in crops else _positive_crop(masks[query], prepared)
            if crop is None:
                continue
            box, logits = crop
            p = _sigmoid(logits)
            p *= score[i]
            hit = p > 0.5
            a, t = acc[box], times[box]
            np.add(a, p, out=a, where=hit)
            t += hit
            y0, x0 = min(y0, box[0].start), min(x0, box[1].start)
            y1, x1 = max(y1, box[0].stop), max(x1, box[1].stop)
        if y1 <= y0:
            continue  # an all-zero category map never beats the running maximum (ties go low)
        union = (slice(y0, y1), slice(x0, x1))
        a, t, b = acc[union], times[union], best[union]
        a /= np.maximum(t, 1.0)
        better = a > b
        labels[union][better] = c
        np.maximum(b, a, out=b)
        a[...] = 0.0
        t[...] = 0.0
    return labels


def _multi_human(logits: np.ndarray, masks: np.ndarray, prepared: Prepared, cfg: BundleConfig) -> ParseResult:
    pp, human = cfg.postprocess, cfg.human_class
    if human is None:
        raise ValueError("a multi-human bundle needs human_class")
    probs = _softmax(logits)[:, :-1]
    n_cls = probs.shape[1]
    top = topk_unsorted(probs, min(pp.topk, probs.size))
    q, lab, cls = top // n_cls, top % n_cls, probs.ravel()[top]
    is_human = lab == human
    h_thr, p_thr = np.float32(pp.human_score_threshold), np.float32(pp.part_score_threshold)
    part_cand = ~is_human & (lab != 0) & (cls >= p_thr)
    human_cand = is_human & (cls > h_thr)
    paste_cand = ~is_human & (cls >= np.float32(pp.instance_paste_threshold))
    need = part_cand | human_cand | paste_cand
    mask_score = np.zeros(len(top), dtype=np.float32)
    binary: dict[int, np.ndarray] = {}
    boxes: dict[int, Box | None] = {}
    crops: dict[int, tuple[Box, np.ndarray] | None] = {}
    budget = _PASTE_CACHE_MAPS * int(np.prod(prepared.original_hw))  # float32 values
    for query in np.unique(q[need]):
        ms, b, full = _query_mask(masks[query], prepared)
        mask_score[q == query] = ms
        query = int(query)
        box = _box(b)
        if (q[part_cand | human_cand] == query).any():
            binary[query], boxes[query] = b, box
        if (q[paste_cand] == query).any():
            size = 0 if box is None else full[box].size
            if size <= budget:
                crops[query] = None if box is None else (box, full[box].copy())
                budget -= size
        del full
    score = (cls * mask_score).astype(np.float32)
    kept_parts = np.flatnonzero(part_cand & (score >= p_thr) & (score > 0))
    kept_humans = np.flatnonzero(human_cand & (score > h_thr))

    labels = _paste_labels(masks, q, np.where(is_human, -1, lab), score, human,
                           pp.instance_paste_threshold, prepared, crops)
    del crops

    # persons: ids by descending score; overlapping pixels go to the higher-scoring person
    by_score = kept_humans[np.argsort(-score[kept_humans], kind="stable")]
    person_of = {int(i): pid for pid, i in enumerate(by_score, start=1)}
    person_map = np.zeros(labels.shape, dtype=np.uint16)
    for i in by_score[::-1]:
        box = boxes[int(q[i])]
        if box is not None:
            person_map[box][binary[int(q[i])][box]] = person_of[int(i)]
    owner: dict[int, int | None] = {}  # per query: the person its mask overlaps most
    for query in {int(q[i]) for i in kept_parts}:
        box = boxes[query]
        owned = person_map[box][binary[query][box]] if box is not None else np.zeros(0, np.uint16)
        hits = np.bincount(owned, minlength=len(by_score) + 1)
        hits[0] = 0
        owner[query] = int(hits.argmax()) if hits.max() > 0 else None
    part_owner = {int(i): owner[int(q[i])] for i in kept_parts}

    def instance(i: int, pid: int | None) -> Instance:
        return Instance(int(lab[i]), cfg.classes[int(lab[i])], float(score[i]), binary[int(q[i])], pid)

    parts = [instance(int(i), part_owner[int(i)]) for i in kept_parts]
    humans = [instance(int(i), person_of[int(i)]) for i in kept_humans]
    persons = tuple(
        Person(pid, float(score[i]), binary[int(q[i])], tuple(p for p in parts if p.person_id == pid))
        for pid, i in enumerate(by_score, start=1))
    return ParseResult(cfg.task, cfg.classes, labels, tuple(parts + humans), persons, person_map)


def postprocess(logits: np.ndarray, masks: np.ndarray, prepared: Prepared, cfg: BundleConfig) -> ParseResult:
    """``pred_logits [1, Q, C+1]`` and ``pred_masks [1, Q, Hp/4, Wp/4]`` (logits) → :class:`ParseResult`."""
    logits = np.asarray(logits, dtype=np.float32)
    masks = np.asarray(masks, dtype=np.float32)
    if logits.ndim != 3 or masks.ndim != 4 or logits.shape[0] != 1 or masks.shape[0] != 1:
        raise ValueError(f"expected batch-1 outputs, got logits {logits.shape} and masks {masks.shape}")
    if logits.shape[1] != masks.shape[1] or logits.shape[2] != cfg.num_classes + 1:
        raise ValueError(f"logits {logits.shape} and masks {masks.shape} do not fit "
                         f"{cfg.num_classes} classes + no-object")
    if cfg.task == "single-human":
        return _single_human(logits[0], masks[0], prepared, cfg)
    return _multi_human(logits[0], masks[0], prepared, cfg)
