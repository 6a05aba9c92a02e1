"""What a parse returns: instances (ModelScope's list), persons, a label map and a person map."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np


@dataclass(frozen=True, eq=False)
class Instance:
    """One mask: a body part or a whole human (multi-human), or a class region (single-human)."""

    class_id: int
    class_name: str
    score: float
    #: HxW bool at the original image size
    mask: np.ndarray
    #: the person this part (or human) belongs to, when known
    person_id: int | None = None

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.mask))


@dataclass(frozen=True, eq=False)
class Person:
    """A detected human (multi-human only); ids count from 1 in descending score order."""

    id: int
    score: float
    mask: np.ndarray
    parts: tuple[Instance, ...] = ()


@dataclass(frozen=True, eq=False)
class ParseResult:
    """The parse of one image, everything at the original image size.

    ``instances`` is ModelScope's pipeline output, in its order: for multi-human the part instances
    then the human instances (each in ModelScope's top-k order); for single-human one region per
    class present, in ascending class id. ``label_map`` holds class ids (uint8); ``person_map``
    (multi-human only) holds person ids (uint16, 0 = nobody).
    """

    task: str
    classes: tuple[str, ...]
    label_map: np.ndarray
    instances: tuple[Instance, ...]
    persons: tuple[Person, ...] = ()
    person_map: np.ndarray | None = None

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.label_map.shape[0]), int(self.label_map.shape[1])

    def to_modelscope(self) -> dict[str, list[Any]]:
        """ModelScope's pipeline output: ``{"masks": [0/1 float HxW], "labels": [name], "scores": [float]}``."""
        dtype = np.float64 if self.task == "single-human" else np.float32  # as ModelScope returns them
        return {
            "masks": [inst.mask.astype(dtype) for inst in self.instances],
            "labels": [inst.class_name for inst in self.instances],
            "scores": [float(inst.score) for inst in self.instances],
        }

    def overlay(self, rgb: np.ndarray, palette: Sequence[Sequence[int]], alpha: float = 0.5,
                max_side: int | None = None) -> np.ndarray:
        """Class colours blended over ``rgb`` (HxWx3 uint8, original size); background left as is.

        With ``max_side`` the overlay is drawn at :func:`bounded_hw` (longest side at most ``max_side``,
        never enlarged): the image is area-averaged down and the label map sampled at pixel centres, so
        the blend costs the output's pixels, not the original's. The label map itself is not changed.
        """
        if rgb.shape[:2] != self.label_map.shape or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"image is {rgb.shape}, the parse is {self.label_map.shape}")
        if len(palette) < int(self.label_map.max(initial=0)) + 1:
            raise ValueError(f"palette has {len(palette)} colours, the label map uses more")
        labels: np.ndarray = self.label_map
        img: np.ndarray = np.ascontiguousarray(rgb, dtype=np.uint8)
        hw = bounded_hw(self.hw, max_side)
        if hw != self.hw:
            size = (hw[1], hw[0])
            img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
            labels = cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST_EXACT)
        lut = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
        colours = lut[labels]
        blended = cv2.addWeighted(img, 1.0 - alpha, colours, alpha, 0.0)
        return np.where((labels != 0)[:, :, None], blended, img)


def bounded_hw(hw: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """``(h, w)`` scaled so its longest side is at most ``max_side`` (aspect kept, each side ≥ 1, never
    enlarged); ``None`` keeps the size."""
    h, w = int(hw[0]), int(hw[1])
    if max_side is None or max(h, w) <= max_side:
        return h, w
    if max_side < 1:
        raise ValueError(f"max_side must be at least 1, got {max_side}")
    scale = max_side / max(h, w)
    return (max_side, max(1, round(w * scale))) if h >= w else (max(1, round(h * scale)), max_side)
