"""Training samples drawn by the figure generator: the graph input exactly as the runtime prepares it, with
M2FP's targets for it.

Invariants: :func:`sample` is a pure function of its arguments (a seed gives the same arrays); the input is
``runtime.preprocess.prepare`` of the scene (the serving path), cropped to a fixed size when asked; a target
mask is the share of each stride-4 cell that the segment covers, so targets sit on the grid of the mask
logits (``pred_masks`` is at stride 4) and need no upsampling of the prediction.

Targets (:func:`segments`), as M2FP's data mapper builds them, except for parts: one Background segment, one
``Human`` segment per person (multi-human), and one segment per *part class present in the image* — M2FP's
parts are per person (a Face per person), which 20 queries cannot hold for four people; the runtime's
multi-human postprocess pastes part instances per class and assigns each to the person it overlaps most, so
one segment per class parses the same label map.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from m2fpkit.runtime import figures
from m2fpkit.runtime.bundle.config import Preprocess
from m2fpkit.runtime.preprocess import prepare

from ..model.config import M2FPConfig

#: the target label of pixels that belong to no segment (the canvas and /32 padding around the image)
NONE = 255
#: ``pred_masks`` is at stride 4 of the input
MASK_STRIDE = 4


@dataclass(frozen=True)
class Augment:
    """How training scenes vary. Sizes are pixels; ``crop`` is ``(height, width)``, multiples of 32."""

    #: multi-human: the drawn scene's short side in pixels (the runtime resizes it to ``short_edge`` anyway,
    #: so this only sets how blurred the picture is); single-human: the scene's size relative to the canvas
    #: (below 1: padded around as the runtime does, above: downscaled)
    scale: tuple[float, float] = (200, 480)
    #: width / height of a multi-human scene
    aspect: tuple[float, float] = (0.75, 1.6)
    #: mirror half of the scenes (Left-* and Right-* classes swap)
    flip: bool = True
    #: a random window of the prepared input (multi-human), None for the whole input
    crop: tuple[int, int] | None = (512, 512)
    #: people per multi-human scene, None for the generator's default (2-4)
    people: tuple[int, int] | None = None


@dataclass(frozen=True)
class Sample:
    """One training item: ``image`` ``[3, H, W]`` as the graph takes it, ``classes`` ``[T]`` and ``masks``
    ``[T, H/4, W/4]`` (coverage in [0, 1]) of its target segments."""

    image: torch.Tensor
    classes: torch.Tensor
    masks: torch.Tensor


def flip_pairs(classes: tuple[str, ...]) -> list[tuple[int, int]]:
    """Class-id pairs a mirror image swaps: ``Left-x`` with ``Right-x``."""
    return [(i, classes.index("Right-" + name[5:])) for i, name in enumerate(classes)
            if name.startswith("Left-") and "Right-" + name[5:] in classes]


def segments(labels: np.ndarray, humans: np.ndarray | None, human_class: int | None, n_parsing: int,
             stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(classes [T], masks [T, H/stride, W/stride])``: a segment per parsing class present in ``labels``
    (Background included; :data:`NONE` is no class) and, with ``human_class``, one per person id > 0 of
    ``humans``; a mask value is the share of its ``stride`` × ``stride`` cell the segment covers (float32;
    0 or 1 at stride 1). ``H`` and ``W`` must be multiples of ``stride``."""
    h, w = labels.shape
    ch, cw = h // stride, w // stride
    cell = ((np.arange(h) // stride)[:, None] * cw + (np.arange(w) // stride)[None, :]).ravel()

    def coverage(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
        """``[len(wanted), ch, cw]``: pixels of each wanted id in each cell."""
        slot = np.full(256, len(wanted), np.int64)  # ids not wanted count in a spare slot, dropped below
        slot[wanted] = np.arange(len(wanted))
        k = len(wanted) + 1
        counts = np.bincount(cell * k + slot[ids.ravel()], minlength=ch * cw * k).reshape(ch * cw, k)
        return counts[:, :-1].T.reshape(len(wanted), ch, cw)

    present = np.flatnonzero(np.bincount(labels.ravel(), minlength=256)[:n_parsing])
    classes, parts = [int(c) for c in present], [coverage(labels, present)]
    if human_class is not None and humans is not None:
        persons = np.flatnonzero(np.bincount(humans.ravel(), minlength=256)[1:]) + 1
        classes += [human_class] * len(persons)
        parts.append(coverage(humans, persons))
    masks = np.concatenate(parts).astype(np.float32) / stride ** 2
    return np.asarray(classes, np.int64), masks


def _scene_size(rng: np.random.Generator, task: str, pre: Preprocess, aug: Augment) -> tuple[int, int]:
    lo, hi = figures.MIN_SIDE, figures.MAX_SIDE
    if task == "single-human":
        h, w = figures.size_for(pre.resize, pre.canvas, (512, 384))
        s = rng.uniform(*aug.scale)
        return min(max(int(h * s), lo), hi), min(max(int(w * s), lo), hi)
    short = rng.uniform(*aug.scale)
    aspect = rng.uniform(*aug.aspect)
    if aspect >= 1:
        return min(max(int(short), lo), hi), min(max(int(short * aspect), lo), hi)
    return min(max(int(short / aspect), lo), hi), min(max(int(short), lo), hi)


def _frame(labels: np.ndarray, prepared_hw: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """A label map moved onto the input tensor's grid: resized (nearest) into ``box``, :data:`NONE` around."""
    out = np.full(prepared_hw, NONE, np.uint8)
    x0, y0, x1, y1 = box
    out[y0:y1, x0:x1] = cv2.resize(labels, (x1 - x0, y1 - y0), interpolation=cv2.INTER_NEAREST)
    return out


def sample(seed: int, cfg: M2FPConfig, pre: Preprocess, aug: Augment) -> Sample:
    """The training item of ``seed``: scene ``seed`` of the generator, augmented by a stream of its own."""
    rng = np.random.default_rng([seed, 1])  # not the scene's own stream (``default_rng(seed)``)
    h, w = _scene_size(rng, cfg.task, pre, aug)
    people = None
    if aug.people is not None and cfg.task == "multi-human":
        people = int(rng.integers(aug.people[0], aug.people[1] + 1))
    sc = figures.scene(seed, h, w, task=cfg.task, people=people)
    rgb, labels, humans = sc.image, sc.labels, sc.humans
    if aug.flip and rng.random() < 0.5:
        rgb, labels, humans = rgb[:, ::-1].copy(), labels[:, ::-1].copy(), humans[:, ::-1].copy()
        swapped = labels.copy()
        for a, b in flip_pairs(cfg.classes):
            swapped[labels == a] = b
            swapped[labels == b] = a
        labels = swapped
    prepared = prepare(rgb, pre)
    image = prepared.tensor[0]
    framed = _frame(labels, prepared.padded_hw, prepared.content_box)
    people_map = _frame(humans, prepared.padded_hw, prepared.content_box) if not cfg.single_human else None
    if people_map is not None:
        people_map[people_map == NONE] = 0
    if aug.crop is not None and not cfg.single_human:
        image, framed, people_map = _crop(rng, image, framed, people_map, aug.crop, pre.pad_value)
    human = None if cfg.single_human else cfg.num_parsing
    classes, cells = segments(framed, people_map, human, cfg.num_parsing, stride=MASK_STRIDE)
    keep = cells.sum(axis=(1, 2)) >= 1.0  # at least one stride-4 cell's worth of pixels
    return Sample(torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(classes[keep]),
                  torch.from_numpy(np.ascontiguousarray(cells[keep])))


def _crop(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray, humans: np.ndarray | None,
          size: tuple[int, int], pad_value: float) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A random ``size`` window of the input and its maps; padded (no segment) where the input is smaller."""
    ch, cw = size
    h, w = labels.shape
    ph, pw = max(ch, h), max(cw, w)
    if (ph, pw) != (h, w):
        grown = np.full((3, ph, pw), pad_value, np.float32)
        grown[:, :h, :w] = image
        image = grown
        labels = np.pad(labels, ((0, ph - h), (0, pw - w)), constant_values=NONE)
        humans = None if humans is None else np.pad(humans, ((0, ph - h), (0, pw - w)))
    y, x = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    win = (slice(y, y + ch), slice(x, x + cw))
    return image[:, win[0], win[1]], labels[win], None if humans is None else humans[win]


def batch(items: list[Sample], pad_value: float = 0.0) -> tuple[torch.Tensor, list[Sample]]:
    """Stack the images of ``items`` into ``[B, 3, H, W]``, padding bottom/right to the largest (no segment
    there); returns the batch and the items with their masks padded to match."""
    h = max(int(s.image.shape[1]) for s in items)
    w = max(int(s.image.shape[2]) for s in items)
    images = torch.full((len(items), 3, h, w), pad_value, dtype=torch.float32)
    out = []
    for i, s in enumerate(items):
        sh, sw = int(s.image.shape[1]), int(s.image.shape[2])
        images[i, :, :sh, :sw] = s.image
        masks = torch.zeros((len(s.classes), h // MASK_STRIDE, w // MASK_STRIDE))
        masks[:, :sh // MASK_STRIDE, :sw // MASK_STRIDE] = s.masks
        out.append(Sample(images[i], s.classes, masks))
    return images, out
