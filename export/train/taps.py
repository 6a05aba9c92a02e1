"""Training-only: every decoder layer's prediction, for Mask2Former's auxiliary losses.

The exported forward returns only the last layer's ``(pred_logits, pred_masks)``. :class:`DecoderTaps` adds
forward hooks (never a change to the network) that keep the pixel decoder's mask features and the query state
after each decoder layer but the last, and applies the network's own heads (``decoder_norm``,
``class_embed``, ``mask_embed``) to them and to the learnt initial queries, as Mask2Former's decoder does
when it predicts before each layer. Removing the taps (``close``, or leaving the ``with`` block) leaves the
model exactly as it was.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..model.m2fp import M2FP


class DecoderTaps:
    """Hooks on ``model`` that collect the auxiliary predictions of each forward (see the module)."""

    def __init__(self, model: M2FP) -> None:
        self._pred = model.sem_seg_head.predictor
        self._mask_features: torch.Tensor | None = None
        self._states: list[torch.Tensor] = []
        layers = list(self._pred.transformer_ffn_layers)
        self._handles = [model.sem_seg_head.pixel_decoder.register_forward_hook(self._keep_features)]
        self._handles += [layer.register_forward_hook(self._keep_state) for layer in layers[:-1]]

    def _keep_features(self, module: nn.Module, args: Any, output: tuple[torch.Tensor, Any]) -> None:
        self._mask_features = output[0]
        self._states = []

    def _keep_state(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self._states.append(output)

    def _heads(self, state: torch.Tensor, mask_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[Q, B, C]`` decoder state → class logits ``[B, Q, C+1]`` and mask logits ``[B, Q, h, w]``."""
        x = self._pred.decoder_norm(state).transpose(0, 1)
        masks = torch.matmul(self._pred.mask_embed(x), mask_features.flatten(2)).unflatten(2, mask_features.shape[2:])
        return self._pred.class_embed(x), masks

    def auxiliary(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The predictions of the last forward before each decoder layer (initial queries first)."""
        if self._mask_features is None:
            raise RuntimeError("no forward pass since the taps were set")
        b = self._mask_features.shape[0]
        initial = self._pred.query_feat.weight.unsqueeze(1).expand(-1, b, -1)
        return [self._heads(s, self._mask_features) for s in [initial, *self._states]]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> DecoderTaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
