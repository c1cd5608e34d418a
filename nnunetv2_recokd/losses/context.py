"""Global-context block and the direct transcription of context alignment (MS-CA) at one feature stage.

The trainers compute MS-CA in ``ReCoStageLoss`` (losses/reco.py), which owns the two blocks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from nnunetv2_recokd.losses._precision import at_least_float32, float32_region

__all__ = ["GlobalContextBlock", "context_alignment_direct"]


class GlobalContextBlock(nn.Module):
    """GCNet-style global context block (Cao et al., "GCNet: Non-local Networks Meet Squeeze-Excitation
    Networks and Beyond", 2019), as used by ReCo-KD's MS-CA (arXiv 2601.08301).

    ``context(F) = sum_v softmax_v(W_m F)(v) F(:, v)`` pools the feature into one C-vector per sample;
    ``transform(ctx) = W_2 ReLU(LayerNorm(W_1 ctx))`` with ``W_1: C -> max(1, int(C * ratio))`` and ``W_2``
    zero-initialised, so the block starts as the identity. ``W_m`` (GCNet's 1x1 conv C -> 1) and both
    transforms act on the channel axis only, so any number of spatial dimensions works. ``W_m`` has no bias:
    the softmax over voxels is shift invariant, so a bias would never receive a gradient.

    Args:
        channels: number of feature channels ``C`` (>= 1).
        ratio: bottleneck ratio of the transform (> 0); the hidden width is ``max(1, int(C * ratio))``.

    Inputs:
        features: ``(B, C, *spatial)`` for ``context`` and ``forward``; ``(B, C)`` for ``transform``.

    Returns:
        ``context``: ``(B, C)``; ``transform``: ``(B, C)``; ``forward``: ``F + transform(context(F))``
        broadcast over the spatial axes, ``(B, C, *spatial)``.

    Raises:
        ValueError: on ``channels < 1`` or ``ratio <= 0`` (in ``__init__``), or on inputs whose shape does not
            match ``(B, channels, *spatial)`` / ``(B, channels)``.
    """

    def __init__(self, channels: int, ratio: float = 0.5) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be an integer >= 1, got {channels!r}")
        if not (math.isfinite(ratio) and ratio > 0):
            raise ValueError(f"ratio must be a finite number > 0, got {ratio}")
        self.channels = channels
        self.hidden_channels = max(1, int(channels * ratio))
        self.attention_logits = nn.Linear(channels, 1, bias=False)  # W_m
        self.transform_layers = nn.Sequential(
            nn.Linear(channels, self.hidden_channels),
            nn.LayerNorm(self.hidden_channels),
            nn.ReLU(),
            nn.Linear(self.hidden_channels, channels),
        )
        nn.init.zeros_(self.transform_layers[-1].weight)
        nn.init.zeros_(self.transform_layers[-1].bias)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden_channels={self.hidden_channels}"

    def context(self, features: Tensor) -> Tensor:
        if features.ndim < 3 or features.shape[1] != self.channels:
            raise ValueError(
                f"features must have shape (B, {self.channels}, *spatial), got {tuple(features.shape)}"
            )
        weight = self.attention_logits.weight  # (1, C)
        flat = features.flatten(2).to(weight.dtype)  # (B, C, V), a view for float32 input
        # batched matmuls on the (B, C, V) layout: an einsum here would keep a permuted (B*V, C) copy for backward
        logits = torch.bmm(weight.unsqueeze(0).expand(flat.shape[0], -1, -1), flat).squeeze(1)  # (B, V)
        pooling = torch.softmax(logits, dim=1)
        return torch.bmm(flat, pooling.unsqueeze(2)).squeeze(2)

    def transform(self, context: Tensor) -> Tensor:
        if context.ndim != 2 or context.shape[1] != self.channels:
            raise ValueError(f"context must have shape (B, {self.channels}), got {tuple(context.shape)}")
        return self.transform_layers(context)

    def forward(self, features: Tensor) -> Tensor:
        shift = self.transform(self.context(features))
        return features + shift.reshape(*shift.shape, *([1] * (features.ndim - 2)))


def context_alignment_direct(adapted: Tensor, teacher: Tensor, student_block: GlobalContextBlock,
                             teacher_block: GlobalContextBlock) -> Tensor:
    """MS-CA at one stage computed directly on the adapted student (ReCo-KD, arXiv 2601.08301; GCNet, Cao et al.).

    The reference transcription of the paper's formula: the tests check ``ReCoStageLoss`` against it, and
    ``ReCoStageLoss.reference`` (the benchmark's "direct" side) calls it with the stage's two blocks. It keeps
    ``(B, C, V)`` temporaries alive for backward; training uses ``ReCoStageLoss.forward``.

    ``L_CA = MSE(F_s' + g_s(ctx_s(F_s')), F_t + g_t(ctx_t(F_t)))``, the mean over all ``B * C * V`` elements,
    with one trainable ``GlobalContextBlock`` per branch (the teacher backbone is frozen elsewhere, its block
    is not). With ``d = F_s' - F_t`` and the context shift ``delta = g_s - g_t`` ``(B, C)``,
    ``L_CA = mean (d + delta)^2`` with ``d + delta`` formed element by element: an expansion into
    ``sum d^2 + 2 sum delta sum d + V delta^2`` cancels where delta offsets the mean difference (tested in
    tests/losses/test_reco.py at offset 10, residual sd 1e-3: float32 value and gradients within 1e-2 of float64).
    Float32 (float64 inputs stay float64) with autocast off.

    Args:
        adapted: adapted student feature ``(B, C, *spatial)``.
        teacher: teacher feature ``(B, C, *spatial)``; detached here, the teacher block's parameters get a gradient.
        student_block: the student branch's context block, ``C`` channels.
        teacher_block: the teacher branch's context block, ``C`` channels.

    Returns:
        float32 0-d tensor (float64 for float64 features).

    Raises:
        ValueError: when student and teacher shapes differ or do not have the blocks' channel count (the message
            gives both shapes).
    """
    if adapted.shape != teacher.shape:
        raise ValueError(
            f"student and teacher features must have the same shape, got student {tuple(adapted.shape)} "
            f"and teacher {tuple(teacher.shape)}"
        )
    channels = student_block.channels
    if adapted.ndim < 3 or adapted.shape[1] != channels or teacher_block.channels != channels:
        raise ValueError(
            f"features must have shape (B, {channels}, *spatial) for blocks of {channels} and {teacher_block.channels} "
            f"channels, got student {tuple(adapted.shape)} and teacher {tuple(teacher.shape)}"
        )
    with float32_region(adapted.device):
        feat_s = at_least_float32(adapted)
        feat_t = at_least_float32(teacher.detach())
        shift_s = student_block.transform(student_block.context(feat_s))
        shift_t = teacher_block.transform(teacher_block.context(feat_t))
        delta = at_least_float32(shift_s - shift_t)  # (B, C)
        residual = (feat_s - feat_t).flatten(2) + delta.unsqueeze(2)  # (B, C, V), d + delta element by element
        return residual.square().mean()
