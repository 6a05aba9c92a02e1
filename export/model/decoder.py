"""Masked-attention transformer decoder (Mask2Former's MultiScaleMaskedTransformerDecoder)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .config import DecoderConfig
from .layers import MLP, ConvNorm, sine_position_encoding

N_LEVELS = 3  # Mask2Former always attends round-robin over three scales


class _AttentionLayer(nn.Module):
    """Post-norm attention block; ``attr`` is ModelScope's module name (``self_attn``/``multihead_attn``)."""

    def __init__(self, d_model: int, nhead: int, attr: str, pre_norm: bool) -> None:
        super().__init__()
        setattr(self, attr, nn.MultiheadAttention(d_model, nhead, dropout=0.0))
        self._attr = attr
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return getattr(self, self._attr)(q, k, value=v, attn_mask=mask, need_weights=False)[0]


class SelfAttentionLayer(_AttentionLayer):
    def __init__(self, d_model: int, nhead: int, pre_norm: bool) -> None:
        super().__init__(d_model, nhead, "self_attn", pre_norm)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            t = self.norm(tgt)
            return tgt + self.attend(t + query_pos, t + query_pos, t, None)
        q = tgt + query_pos
        return self.norm(tgt + self.attend(q, q, tgt, None))


class CrossAttentionLayer(_AttentionLayer):
    def __init__(self, d_model: int, nhead: int, pre_norm: bool) -> None:
        super().__init__(d_model, nhead, "multihead_attn", pre_norm)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                query_pos: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            t = self.norm(tgt)
            return tgt + self.attend(t + query_pos, memory + pos, memory, mask)
        return self.norm(tgt + self.attend(tgt + query_pos, memory + pos, memory, mask))


class FFNLayer(nn.Module):
    def __init__(self, d_model: int, dim_ff: int, pre_norm: bool) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_ff)
        self.linear2 = nn.Linear(dim_ff, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            return tgt + self.linear2(F.relu(self.linear1(self.norm(tgt))))
        return self.norm(tgt + self.linear2(F.relu(self.linear1(tgt))))


class MaskedTransformerDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, in_channels: int) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.num_heads = cfg.nheads
        self.num_queries = cfg.num_queries
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(d, cfg.nheads, cfg.pre_norm) for _ in range(cfg.dec_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(d, cfg.nheads, cfg.pre_norm) for _ in range(cfg.dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(d, cfg.dim_feedforward, cfg.pre_norm) for _ in range(cfg.dec_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.query_feat = nn.Embedding(cfg.num_queries, d)
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        self.level_embed = nn.Embedding(N_LEVELS, d)
        self.input_proj = nn.ModuleList(
            ConvNorm(in_channels, d, kernel_size=1)
            if in_channels != d or cfg.enforce_input_project else nn.Sequential()
            for _ in range(N_LEVELS)
        )
        self.class_embed = nn.Linear(d, cfg.num_classes + 1)
        self.mask_embed = MLP(d, d, cfg.mask_dim, 3)
        self.num_pos_feats = d // 2
        #: None when serving or exporting. The parity gate sets it to see each layer's mask logits and choose
        #: which pixels the layer hides (``export.parity``): (logits, hidden) → hidden, once per layer in order.
        self.attention_hook: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def _mask_embedding(self, output: torch.Tensor) -> torch.Tensor:
        """``[Q, B, C]`` decoder state → ``[B, Q, mask_dim]`` per-query mask embeddings."""
        return self.mask_embed(self.decoder_norm(output).transpose(0, 1))

    def _attention_mask(self, embedding: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Additive mask ``[B·heads, Q, h·w]``: −inf where a query may not look, 0 elsewhere.

        Mask2Former resizes each query's stride-4 mask logits to the level size, hides pixels whose
        probability is < 0.5 and re-opens rows that would hide everything. The resize is linear per
        channel, so resizing the mask features once per level (``features``) and projecting them gives
        the same logits without a stride-4 projection per layer. The rule runs on ``[B, Q, h·w]`` and is
        only broadcast over the heads at the end.
        """
        logits = torch.matmul(embedding, features.flatten(2))
        m = logits.sigmoid() < 0.5
        if self.attention_hook is not None:
            m = self.attention_hook(logits, m)
        m = m & ~m.all(-1, keepdim=True)
        bias = torch.zeros_like(m, dtype=embedding.dtype).masked_fill(m, float("-inf"))
        return bias.unsqueeze(1).expand(-1, self.num_heads, -1, -1).flatten(0, 1)

    def forward(self, feats: list[torch.Tensor], mask_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sizes = [(f.shape[2], f.shape[3]) for f in feats]
        src, pos = [], []
        for i, f in enumerate(feats):
            pos.append(sine_position_encoding(f, self.num_pos_feats).flatten(2).permute(2, 0, 1))
            src.append((self.input_proj[i](f).flatten(2) + self.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
        b = src[0].shape[1]
        # a broadcast, not a copy: the graph gets an Expand at every width (onnxscript folds a Tile of
        # these constants at tiny widths but not at r101's, which left r101 with an operator kind tiny lacks)
        query_pos = self.query_embed.weight.unsqueeze(1).expand(-1, b, -1)
        output = self.query_feat.weight.unsqueeze(1).expand(-1, b, -1)
        level_features: dict[int, torch.Tensor] = {}  # mask features resized to a level, made once
        for i in range(len(self.transformer_ffn_layers)):
            level = i % N_LEVELS
            if level not in level_features:
                level_features[level] = F.interpolate(mask_features, size=sizes[level], mode="bilinear",
                                                      align_corners=False)
            attn_mask = self._attention_mask(self._mask_embedding(output), level_features[level])
            output = self.transformer_cross_attention_layers[i](output, src[level], attn_mask, pos[level], query_pos)
            output = self.transformer_self_attention_layers[i](output, query_pos)
            output = self.transformer_ffn_layers[i](output)
        x = self.decoder_norm(output).transpose(0, 1)
        # a plain MatMul: onnxruntime's Einsum runs the same product ~1.5× slower
        masks = torch.matmul(self.mask_embed(x), mask_features.flatten(2)).unflatten(2, mask_features.shape[2:])
        return self.class_embed(x), masks
