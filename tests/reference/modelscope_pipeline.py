"""Run ModelScope's own human-parsing pipeline steps on tiny random models, next to ours.

``ImageHumanParsingPipeline.__init__`` reads ``configuration.json`` through ``modelscope.fileio``
(needs PyYAML) and importing ``modelscope.pipelines`` pulls ``modelscope.msdatasets`` (needs the
``datasets`` package); neither is used by the pipeline's ``preprocess``/``forward``/``postprocess``.
So the ``msdatasets`` module gets a stand-in when ``datasets`` is absent, and the pipeline object is
made without ``__init__``, holding just its ``model``: every step that runs is ModelScope's code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.machinery
import importlib.util
import json
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2fpkit.export.model import config as mcfg
from m2fpkit.export.model import m2fp
from m2fpkit.runtime.bundle.config import BundleConfig, Postprocess, Preprocess, TensorSpec
from m2fpkit.runtime.palette import palette_for

from .modelscope_m2fp import build_modelscope_m2fp, install_stand_ins


@contextlib.contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Tiny models run fastest on one thread (no OpenMP barriers per small op), above all on a busy box."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _stand_in_msdatasets() -> None:
    if "modelscope.msdatasets" in sys.modules or importlib.util.find_spec("datasets") is not None:
        return
    mod = types.ModuleType("modelscope.msdatasets")
    mod.__spec__ = importlib.machinery.ModuleSpec("modelscope.msdatasets", loader=None, is_package=True)
    mod.__path__ = []  # type: ignore[attr-defined]
    mod.MsDataset = type("MsDataset", (), {})  # type: ignore[attr-defined]
    sys.modules["modelscope.msdatasets"] = mod


def modelscope_pipeline(model: Any) -> Any:
    """ModelScope's ``ImageHumanParsingPipeline`` around ``model`` (its ``__init__`` skipped)."""
    install_stand_ins()
    _stand_in_msdatasets()
    from modelscope.pipelines.cv.image_human_parsing_pipeline import ImageHumanParsingPipeline
    pipe = ImageHumanParsingPipeline.__new__(ImageHumanParsingPipeline)
    pipe.model = model
    return pipe


@dataclass
class ModelScopeRun:
    tensor: np.ndarray  # the normalised, padded input ModelScope's model saw
    image_size: tuple[int, int]  # size before the /32 padding
    crop_box: list[int] | None
    logits: np.ndarray
    masks: np.ndarray
    output: dict[str, list]  # the pipeline's result: masks, labels, scores
    label_map: np.ndarray  # argmax of ModelScope's semantic map (sem_seg, or the pasted part probabilities)


def run_pipeline(pipe: Any, rgb: np.ndarray, min_size: int = 640, max_size: int = 1333) -> ModelScopeRun:
    """``preprocess → model.forward → model.postprocess → pipeline.postprocess`` on an RGB array."""
    from PIL import Image
    model = pipe.model
    inputs = pipe.preprocess(Image.fromarray(rgb), min_size=min_size, max_size=max_size)
    with torch.no_grad():
        raw = model.forward(inputs)
        logits = raw["outputs"]["pred_logits"].numpy().copy()
        masks = raw["outputs"]["pred_masks"].numpy().copy()
        tensor = raw["images"].tensor.numpy().copy()
        image_size = tuple(int(x) for x in raw["images"].image_sizes[0])
        result = model.postprocess(raw)
        output = pipe.postprocess(result)
    pred = result["eval_result"][0]
    semantic = pred["sem_seg"] if "sem_seg" in pred else pred["parsing"]["semantic_outputs"]
    label_map = semantic.argmax(dim=0).numpy().astype(np.uint8)
    crop = inputs["batched_inputs"][0].get("crop_box")
    crop_box = None if crop is None else [int(c) for c in crop]
    return ModelScopeRun(tensor, image_size, crop_box, logits, masks, output, label_map)  # type: ignore[arg-type]


def modelscope_input(pipe: Any, rgb: np.ndarray, min_size: int = 640,
                     max_size: int = 1333) -> tuple[np.ndarray, tuple[int, int], list[int] | None]:
    """The tensor ModelScope's model feeds its backbone: pipeline preprocess, then the model's own
    normalisation and ``ImageList.from_tensors`` (the first lines of ``M2FP.forward``)."""
    from modelscope.models.cv.image_instance_segmentation.maskdino_swin import ImageList
    from PIL import Image
    model = pipe.model
    inputs = pipe.preprocess(Image.fromarray(rgb), min_size=min_size, max_size=max_size)
    item = inputs["batched_inputs"][0]
    image = (item["image"] - model.pixel_mean) / model.pixel_std
    images = ImageList.from_tensors([image], model.size_divisibility)
    crop = item.get("crop_box")
    return (images.tensor.numpy(), tuple(int(x) for x in images.image_sizes[0]),  # type: ignore[return-value]
            None if crop is None else [int(c) for c in crop])


#: weights that make the tiny models' outputs non-trivial (several classes, humans, pasted parts)
SETTINGS: dict[str, dict[str, Any]] = {
    "multi-human": {"seed": 1, "cls_scale": 6.0, "mask_scale": 8.0, "class_bias": {20: 4.0}},
    "single-human": {"seed": 1, "query_scale": 30.0, "cls_scale": 8.0, "mask_scale": 24.0},
}


@dataclass
class Reference:
    ours: torch.nn.Module
    theirs: Any
    cfg: mcfg.M2FPConfig
    pipe: Any


def reference(task: str, tmp: Path) -> Reference:
    """Our tiny model and ModelScope's model + pipeline, with :data:`SETTINGS` weights."""
    settings = dict(SETTINGS[task])
    ours, theirs, cfg = tiny_models(task, settings.pop("seed"), tmp, **settings)
    return Reference(ours, theirs, cfg, modelscope_pipeline(theirs))


def tiny_models(task: str, seed: int, tmp: Path, *, canvas: tuple[int, int] = (112, 150),
                query_scale: float = 10.0, cls_scale: float = 4.0, mask_scale: float = 8.0,
                class_bias: dict[int, float] | None = None) -> tuple[torch.nn.Module, Any, mcfg.M2FPConfig]:
    """Our tiny M2FP and ModelScope's, with the same strongly randomised weights.

    Queries, class and mask heads are scaled so that queries differ, class probabilities are
    peaked and masks have both signs, as in a trained model; ``class_bias`` favours some classes
    (e.g. the human class); ``canvas`` is the single-human ``[width, height]``.
    """
    cfg = dataclasses.replace(mcfg.preset("tiny", task), single_human_size=canvas)
    ours = m2fp.build(cfg, seed=seed)
    with torch.no_grad():
        pred = ours.sem_seg_head.predictor
        pred.query_feat.weight.mul_(query_scale)  # queries that differ from each other
        pred.query_embed.weight.mul_(query_scale)
        pred.class_embed.weight.mul_(cls_scale)
        pred.class_embed.bias.mul_(cls_scale)
        pred.mask_embed.layers[-1].weight.mul_(mask_scale)
        for c, b in (class_bias or {}).items():
            pred.class_embed.bias[c] += b
    ms_cfg = cfg.to_modelscope()
    ms_cfg["pretrained"] = False
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "configuration.json").write_text(json.dumps({"framework": "pytorch", "model": ms_cfg}))
    theirs = build_modelscope_m2fp(tmp, ms_cfg)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours.eval(), theirs.eval(), cfg


def bundle_config(cfg: mcfg.M2FPConfig, *, short_edge: int = 640, max_size: int = 1333) -> BundleConfig:
    """A runtime :class:`BundleConfig` describing ``cfg`` (preprocessing as ModelScope's pipeline)."""
    single = cfg.single_human
    pre = (Preprocess(resize="center-canvas", canvas=tuple(cfg.single_human_size))  # type: ignore[arg-type]
           if single else Preprocess(short_edge=short_edge, max_size=max_size))
    q = cfg.decoder.num_queries
    return BundleConfig(
        name="tiny", version="v0.1", created_at="2024-01-01T00:00:00Z", task=cfg.task, backbone="tiny",
        classes=cfg.classes, palette=tuple(palette_for(cfg.classes)), num_queries=q,
        inputs=(TensorSpec("image", "float32", (1, 3, "height", "width")),),
        outputs=(TensorSpec("pred_logits", "float32", (1, q, len(cfg.classes) + 1)),
                 TensorSpec("pred_masks", "float32", (1, q, "h4", "w4"))),
        compatible_api=("1.0",), preprocess=pre, postprocess=Postprocess(),
        human_class=None if single else cfg.num_parsing)


def our_outputs(model: torch.nn.Module, tensor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        logits, masks = model(torch.from_numpy(tensor))
    return logits.numpy(), masks.numpy()


def synthetic_image(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth colourful RGB image with a few sharp-edged shapes (uint8)."""
    import cv2
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(6):
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        r = int(rng.integers(max(2, min(h, w) // 12), max(3, min(h, w) // 4)))
        cv2.circle(img, (x, y), r, tuple(int(c) for c in rng.integers(0, 256, 3)), -1)
    return img
