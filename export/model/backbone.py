"""DeepLab-stem ResNet (detectron2 DeepLab variant) returning res2..res5."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .config import BackboneConfig
from .layers import ConvNorm, make_norm

_BLOCKS_PER_STAGE = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
_STAGE_INDEX = {"res2": 2, "res3": 3, "res4": 4, "res5": 5}


class Bottleneck(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, mid_ch: int, *, stride: int, groups: int,
                 dilation: int, norm: str, stride_in_1x1: bool) -> None:
        super().__init__()
        self.out_channels = out_ch
        self.stride = stride
        self.shortcut = (
            ConvNorm(in_ch, out_ch, 1, stride=stride, bias=False, norm=make_norm(norm, out_ch))
            if in_ch != out_ch else None
        )
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = ConvNorm(in_ch, mid_ch, 1, stride=s1, bias=False, norm=make_norm(norm, mid_ch))
        self.conv2 = ConvNorm(mid_ch, mid_ch, 3, stride=s3, padding=dilation, dilation=dilation,
                              groups=groups, bias=False, norm=make_norm(norm, mid_ch))
        self.conv3 = ConvNorm(mid_ch, out_ch, 1, bias=False, norm=make_norm(norm, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        identity = self.shortcut(x) if self.shortcut is not None else x
        return F.relu(out + identity)


class DeepLabStem(nn.Module):
    """Three 3x3 convs (stride 2, 1, 1) and a 3x3/2 max-pool: stride 4."""

    def __init__(self, out_ch: int, norm: str) -> None:
        super().__init__()
        half = out_ch // 2
        self.conv1 = ConvNorm(3, half, 3, stride=2, padding=1, bias=False, norm=make_norm(norm, half))
        self.conv2 = ConvNorm(half, half, 3, padding=1, bias=False, norm=make_norm(norm, half))
        self.conv3 = ConvNorm(half, out_ch, 3, padding=1, bias=False, norm=make_norm(norm, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class DeepLabResNet(nn.Module):
    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        if cfg.depth not in _BLOCKS_PER_STAGE:
            raise ValueError(f"backbone.depth: unsupported {cfg.depth} (50, 101 or 152)")
        if cfg.res4_dilation not in (1, 2) or cfg.res5_dilation not in (1, 2, 4):
            raise ValueError("backbone.res4_dilation/res5_dilation: unsupported value")
        self.out_features = tuple(cfg.out_features)
        self.stem = DeepLabStem(cfg.stem_out_channels, cfg.norm)
        in_ch, out_ch = cfg.stem_out_channels, cfg.res2_out_channels
        mid_ch = cfg.num_groups * cfg.width_per_group
        self.channels: dict[str, int] = {}
        self.strides: dict[str, int] = {}
        self.stage_names: list[str] = []
        stride = 4
        last = max(_STAGE_INDEX[f] for f in self.out_features)
        for i, stage_idx in enumerate(range(2, last + 1)):
            dilation = {4: cfg.res4_dilation, 5: cfg.res5_dilation}.get(stage_idx, 1)
            n = _BLOCKS_PER_STAGE[cfg.depth][i]
            first_stride = 1 if i == 0 or dilation > 1 else 2
            if stage_idx == 5:
                if len(cfg.res5_multi_grid) != n:
                    raise ValueError(f"backbone.res5_multi_grid: expected {n} values")
                dilations = [dilation * g for g in cfg.res5_multi_grid]
            else:
                dilations = [dilation] * n
            blocks = []
            for b in range(n):
                blocks.append(Bottleneck(in_ch, out_ch, mid_ch, stride=first_stride if b == 0 else 1,
                                         groups=cfg.num_groups, dilation=dilations[b], norm=cfg.norm,
                                         stride_in_1x1=cfg.stride_in_1x1))
                in_ch = out_ch
            name = f"res{stage_idx}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            stride *= first_stride
            self.channels[name], self.strides[name] = out_ch, stride
            out_ch, mid_ch = out_ch * 2, mid_ch * 2

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(x)
        out: dict[str, torch.Tensor] = {}
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self.out_features:
                out[name] = x
        return out
