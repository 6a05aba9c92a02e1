"""Small building blocks shared by the M2FP modules (state-dict layout kept ModelScope's)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F


class ConvNorm(nn.Conv2d):
    """Conv2d with an optional ``norm`` child and activation (detectron2's layout: ``x.weight``, ``x.norm.*``)."""

    def __init__(self, *args, norm: nn.Module | None = None,
                 activation: Callable[[torch.Tensor], torch.Tensor] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "BN":
        return nn.BatchNorm2d(channels)
    if kind == "GN":
        return nn.GroupNorm(32, channels)
    raise ValueError(f"backbone.norm: unsupported {kind!r} (BN or GN)")


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (keys ``layers.N``)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


def sine_position_encoding(x: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """Normalised 2-D sine encoding of ``x``'s spatial grid, ``[B, 2*num_feats, H, W]``.

    Depends only on the shape of ``x``; computed with the same float operations as Mask2Former's
    ``PositionEmbeddingSine(normalize=True)`` so both give identical values.
    """
    b, _, h, w = x.shape
    scale, eps = 2 * math.pi, 1e-6
    ones = torch.ones((1, h, w), dtype=x.dtype, device=x.device)  # float64 for the parity gate's reference
    y_embed = ones.cumsum(1, dtype=x.dtype)
    x_embed = ones.cumsum(2, dtype=x.dtype)
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=x.dtype, device=x.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
    return pos.expand(b, -1, -1, -1)
