"""Multi-scale deformable-attention pixel decoder (Mask2Former's MSDeformAttnPixelDecoder).

Written for export: every size is read from a tensor shape, the deformable attention is the
pure-PyTorch ``grid_sample`` formulation (ONNX ``GridSample``), and nothing depends on data.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .config import EncoderConfig
from .layers import ConvNorm, sine_position_encoding

N_POINTS = 4  # sampling points per head and level; fixed in M2FP


def deformable_attention(value: torch.Tensor, shapes: list[tuple[int, int]], grids: torch.Tensor,
                         weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable attention, the Deformable-DETR formula.

    value ``[B, S, heads, d]`` (levels concatenated); grids ``[L, B·heads, Q, P, 2]``, the sampling
    locations already as ``grid_sample`` coordinates (``2 * loc - 1``); weights ``[L, B·heads, 1, Q, P]``.
    Returns ``[B, Q, heads * d]``. Each level is bilinearly sampled with ``grid_sample(align_corners=False,
    padding zeros)`` and its samples are summed with the attention weights level by level: the levels'
    samples are never stacked into one ``[B·heads, d, Q, L·P]`` tensor (at r101 sizes ~100 MB per layer).
    Level-major grids and weights make each level's slice one contiguous block.
    """
    b, _, heads, d = value.shape
    q = grids.shape[2]
    out: torch.Tensor | None = None
    start = 0
    for level, (h, w) in enumerate(shapes):
        v = value[:, start:start + h * w].flatten(2).transpose(1, 2).reshape(b * heads, d, h, w)
        start = start + h * w
        sampled = F.grid_sample(v, grids[level], mode="bilinear", padding_mode="zeros", align_corners=False)
        term = (sampled * weights[level]).sum(-1)
        out = term if out is None else out + term
    assert out is not None, "at least one level"
    return out.view(b, heads * d, q).transpose(1, 2).contiguous()


def grid_terms(reference: torch.Tensor, shapes: list[tuple[int, int]], heads: int,
               points: int = N_POINTS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(base, scale)`` with ``grid = offsets * scale + base`` per column of ``sampling_offsets``.

    Deformable DETR samples at ``loc = reference + offset / (w, h)`` and ``grid_sample`` wants
    ``2 * loc - 1``: so ``scale = 2 / (w, h)`` of the column's level and ``base = 2 * reference - 1``.
    ``reference`` is ``[1, S, 2]``; ``base`` is ``[1, S, heads·L·P·2]`` (made once, shared by every
    layer), ``scale`` is ``[heads·L·P·2]``: plain last-axis broadcasts, cheap on every engine.
    """
    levels, s = len(shapes), reference.shape[1]
    sizes = torch.stack([torch.stack((reference.new_full((), w), reference.new_full((), h))) for h, w in shapes])
    scale = (2 / sizes).view(1, levels, 1, 2).expand(heads, levels, points, 2).reshape(-1)
    base = (2 * reference - 1).view(1, s, 1, 2).expand(1, s, heads * levels * points, 2).reshape(1, s, -1)
    return base, scale


class MSDeformAttn(nn.Module):
    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int = N_POINTS) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"encoder: conv_dim {d_model} is not divisible by transformer_nheads {n_heads}")
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._init()

    def _init(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, terms: tuple[torch.Tensor, torch.Tensor], value_in: torch.Tensor,
                shapes: list[tuple[int, int]]) -> torch.Tensor:
        """query/value_in ``[B, S, C]``; ``terms`` from :func:`grid_terms` for this module's heads.

        The linear layers see ``[B·S, C]`` (a 2-D matrix product takes its bias in the same kernel).
        """
        b, s, c = query.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        flat_q = query.reshape(b * s, c)
        value = self.value_proj(value_in.reshape(b * s, c)).view(b, s, heads, c // heads)
        base, scale = terms
        grids = self.sampling_offsets(flat_q).view(b, s, -1) * scale + base
        grids = grids.view(b, s, heads, levels, points * 2).permute(3, 0, 2, 1, 4)
        grids = grids.reshape(levels, b * heads, s, points, 2)
        weights = F.softmax(self.attention_weights(flat_q).view(b, s, heads, levels * points), -1)
        weights = weights.view(b, s, heads, levels, points).permute(3, 0, 2, 1, 4)
        weights = weights.reshape(levels, b * heads, 1, s, points)
        out = deformable_attention(value, shapes, grids, weights)
        return self.output_proj(out.view(b * s, c)).view(b, s, c)


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, n_levels: int, n_heads: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, terms: tuple[torch.Tensor, torch.Tensor],
                shapes: list[tuple[int, int]]) -> torch.Tensor:
        # 2-D ``[B·S, C]`` from the residual on: a matrix product takes its bias (and ReLU) in its own
        # kernel, and onnxruntime keeps the plain LayerNormalization, ~4× faster on CPU than the
        # SkipLayerNormalization it fuses a 3-D residual and norm into (r101, 640²: 26 ms vs 6 ms)
        b, s, c = src.shape
        flat = self.norm1(src.reshape(b * s, c) + self.self_attn(src + pos, terms, src, shapes).view(b * s, c))
        return self.norm2(flat + self.linear2(F.relu(self.linear1(flat)))).view(b, s, c)


class _Encoder(nn.Module):
    def __init__(self, layers: list[EncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


class DeformableEncoder(nn.Module):
    """Encoder-only deformable transformer over the flattened levels (keys ``level_embed``, ``encoder.layers.N``)."""

    def __init__(self, d_model: int, n_heads: int, n_layers: int, d_ffn: int, n_levels: int) -> None:
        super().__init__()
        self.encoder = _Encoder([EncoderLayer(d_model, d_ffn, n_levels, n_heads) for _ in range(n_layers)])
        self.n_heads = n_heads
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._init()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def reference_points(shapes: list[tuple[int, int]], like: torch.Tensor) -> torch.Tensor:
        """Centres of every cell of every level, normalised to [0, 1]: ``[1, S, 2]`` as (x, y)."""
        refs = []
        for h, w in shapes:
            ys = (torch.arange(h, dtype=like.dtype, device=like.device) + 0.5) / h
            xs = (torch.arange(w, dtype=like.dtype, device=like.device) + 0.5) / w
            ref_y = ys[:, None].expand(h, w).reshape(-1)
            ref_x = xs[None, :].expand(h, w).reshape(-1)
            refs.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(refs, 0)[None]

    def forward(self, srcs: list[torch.Tensor], pos: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        shapes = [(s.shape[2], s.shape[3]) for s in srcs]
        flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        flat_pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[i].view(1, 1, -1)
                              for i, p in enumerate(pos)], 1)
        terms = grid_terms(self.reference_points(shapes, flat), shapes, self.n_heads)
        out = flat
        for layer in self.encoder.layers:
            out = layer(out, flat_pos, terms, shapes)
        return out, shapes


class PixelDecoder(nn.Module):
    """Input projections + deformable encoder over res5..res3, one FPN level on res2, mask features."""

    def __init__(self, cfg: EncoderConfig, channels: dict[str, int], strides: dict[str, int]) -> None:
        super().__init__()
        feats = sorted(cfg.in_features, key=lambda f: strides[f])
        self.transformer_in_features = sorted(cfg.transformer_in_features, key=lambda f: strides[f])
        d = cfg.conv_dim
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels[f], d, kernel_size=1), nn.GroupNorm(32, d))
            for f in self.transformer_in_features[::-1]
        )
        for proj in self.input_proj:
            conv = proj[0]  # type: ignore[index]  # each projection is a Sequential(conv, norm)
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)
        n_levels = len(self.transformer_in_features)
        self.transformer = DeformableEncoder(d, cfg.transformer_nheads, cfg.transformer_enc_layers,
                                             cfg.transformer_dim_feedforward, n_levels)
        self.mask_features = ConvNorm(d, cfg.mask_dim, kernel_size=1)
        min_stride = min(strides[f] for f in self.transformer_in_features)
        n_fpn = int(math.log2(min_stride) - math.log2(cfg.common_stride))
        self.fpn_features = feats[:n_fpn][::-1]
        for i, f in enumerate(feats[:n_fpn]):
            self.add_module(f"adapter_{i + 1}", ConvNorm(channels[f], d, 1, bias=False, norm=nn.GroupNorm(32, d)))
            self.add_module(f"layer_{i + 1}", ConvNorm(d, d, 3, padding=1, bias=False, norm=nn.GroupNorm(32, d),
                                                       activation=F.relu))
        self.n_fpn = n_fpn
        self.num_pos_feats = d // 2

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns ``mask_features`` (stride 4) and the three multi-scale maps (low to high resolution)."""
        srcs, pos = [], []
        for proj, f in zip(self.input_proj, self.transformer_in_features[::-1]):
            x = features[f]
            srcs.append(proj(x))
            pos.append(sine_position_encoding(x, self.num_pos_feats))
        memory, shapes = self.transformer(srcs, pos)
        b = memory.shape[0]
        outs = []
        start = 0
        for h, w in shapes:
            outs.append(memory[:, start:start + h * w].transpose(1, 2).reshape(b, -1, h, w))
            start = start + h * w
        for i, f in enumerate(self.fpn_features):
            idx = self.n_fpn - i
            lateral = getattr(self, f"adapter_{idx}")(features[f])
            y = lateral + F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(getattr(self, f"layer_{idx}")(y))
        return self.mask_features(outs[-1]), outs[:3]
