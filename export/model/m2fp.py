"""The M2FP network: backbone → pixel decoder → masked-attention decoder.

State-dict keys are ModelScope's ``M2FP`` keys, so a ModelScope checkpoint loads with ``strict=True``.
The forward takes a normalised RGB batch padded to a multiple of 32 and returns
``pred_logits [B, Q, C+1]`` and ``pred_masks [B, Q, H/4, W/4]`` (logits).
"""

from __future__ import annotations

import torch
from torch import nn

from .backbone import DeepLabResNet
from .config import M2FPConfig
from .decoder import MaskedTransformerDecoder
from .pixel_decoder import PixelDecoder

SIZE_DIVISIBILITY = 32


class SemSegHead(nn.Module):
    def __init__(self, cfg: M2FPConfig, channels: dict[str, int], strides: dict[str, int]) -> None:
        super().__init__()
        self.pixel_decoder = PixelDecoder(cfg.encoder, channels, strides)
        self.predictor = MaskedTransformerDecoder(cfg.decoder, in_channels=cfg.encoder.conv_dim)

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        mask_features, multi_scale = self.pixel_decoder(features)
        return self.predictor(multi_scale, mask_features)


class M2FP(nn.Module):
    def __init__(self, cfg: M2FPConfig) -> None:
        super().__init__()
        self.config = cfg
        self.backbone = DeepLabResNet(cfg.backbone)
        feats = cfg.encoder.in_features
        missing = [f for f in feats if f not in self.backbone.channels]
        if missing:
            raise ValueError(f"encoder.in_features: {missing} not produced by the backbone")
        self.sem_seg_head = SemSegHead(cfg, self.backbone.channels, self.backbone.strides)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sem_seg_head(self.backbone(image))


def build(cfg: M2FPConfig, seed: int | None = None) -> M2FP:
    """Build the network in eval mode; with ``seed``, weights and BN statistics are seeded random."""
    if seed is not None:
        torch.manual_seed(seed)
    model = M2FP(cfg)
    if seed is not None:
        randomize_batchnorm(model, seed)
    return model.eval()


def randomize_batchnorm(model: nn.Module, seed: int) -> None:
    """Give BatchNorm layers non-trivial statistics and affine terms, like a trained model has."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                assert m.running_mean is not None and m.running_var is not None  # track_running_stats
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
