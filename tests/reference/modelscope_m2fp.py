"""Build ModelScope's own ``M2FP`` class (and pipeline) on a CPU box without mmcv/timm/torchvision.

ModelScope's M2FP imports three packages only for code it does not run on CPU:
``mmcv.ops.multi_scale_deform_attn`` (compiled CUDA kernel; on CPU ModelScope falls back to the
pure-PyTorch formula), ``timm.models.layers`` (Swin backbone) and ``torchvision.models.vgg``
(a colourisation loss network). Stand-ins for exactly those are installed here. The pipeline also
uses ``torchvision.transforms.Resize``/``ToTensor`` on PIL images; their stand-ins do what
torchvision does for a PIL input: ``PIL.Image.resize((w, h), BILINEAR)`` and HWC uint8 → CHW / 255.
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def _module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    mod.__path__ = []  # type: ignore[attr-defined]
    for k, v in attrs.items():
        setattr(mod, k, v)
    sys.modules[name] = mod
    return mod


def deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights):
    """Deformable-DETR's documented CPU formula (grid_sample per level, weighted sum)."""
    bs, _, heads, dims = value.shape
    _, nq, _, nl, npnt, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes]
    per_level = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        v = per_level[lvl].flatten(2).transpose(1, 2).reshape(bs * heads, dims, int(h), int(w))
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(bs * heads, 1, nq, nl * npnt)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(bs, heads * dims, nq)
    return out.transpose(1, 2).contiguous()


class _NoCudaKernel:
    @staticmethod
    def apply(*args, **kwargs):
        raise RuntimeError("no compiled deformable-attention kernel on CPU")


class _Resize:
    def __init__(self, size):
        self.size = size

    def __call__(self, img):
        from PIL import Image
        h, w = self.size
        return img.resize((w, h), Image.BILINEAR)


class _ToTensor:
    def __call__(self, img):
        arr = np.asarray(img, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().div(255)


class _Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


def install_stand_ins() -> None:
    if "mmcv.ops.multi_scale_deform_attn" not in sys.modules:
        _module("mmcv")
        _module("mmcv.ops")
        _module("mmcv.ops.multi_scale_deform_attn",
                MultiScaleDeformableAttnFunction=_NoCudaKernel,
                multi_scale_deformable_attn_pytorch=deform_attn_reference)
    if "timm" not in sys.modules:
        _module("timm")
        _module("timm.models")
        _module("timm.models.layers", DropPath=torch.nn.Identity, to_2tuple=lambda x: (x, x),
                trunc_normal_=torch.nn.init.trunc_normal_)
    if "torchvision" not in sys.modules:
        _module("torchvision")
        _module("torchvision.models")
        _module("torchvision.models.vgg", vgg16=None, vgg19=None, VGG=torch.nn.Module,
                VGG16_Weights=None, VGG19_Weights=None)
        _module("torchvision.transforms", Resize=_Resize, ToTensor=_ToTensor, Compose=_Compose)
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    import modelscope.utils.import_utils as iu
    iu._timm_available = True
    iu._torchvision_available = True


def build_modelscope_m2fp(model_dir: str | Path, model_cfg: dict[str, Any]):
    """ModelScope's ``M2FP`` built from a ``configuration.json["model"]`` dict (weights from the dir if pretrained)."""
    install_stand_ins()
    from modelscope.models.cv.image_human_parsing.m2fp_net import M2FP
    kwargs = json.loads(json.dumps(model_cfg))
    kwargs.pop("type", None)
    return M2FP(str(model_dir), **kwargs).eval()


def build_modelscope_pipeline(model):
    """ModelScope's ``ImageHumanParsingPipeline`` around an already built model."""
    install_stand_ins()
    from modelscope.pipelines.cv.image_human_parsing_pipeline import ImageHumanParsingPipeline
    return ImageHumanParsingPipeline(model=model, device="cpu")


def modelscope_forward(model, image_chw_0_255: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw ``pred_logits, pred_masks`` from ModelScope's forward on one RGB CHW 0-255 image."""
    h, w = image_chw_0_255.shape[-2:]
    with torch.no_grad():
        out = model.forward({"batched_inputs": [{"image": image_chw_0_255, "height": h, "width": w}]})
    return out["outputs"]["pred_logits"], out["outputs"]["pred_masks"]
