"""Global-context block and context-alignment loss (MS-CA) at one feature stage."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from nnunetv2_recokd.losses._precision import at_least_float32, float32_region

__all__ = ["GlobalContextBlock", "ContextAlignmentLoss"]


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


class ContextAlignmentLoss(nn.Module):
    """MS-CA: context alignment at one stage (ReCo-KD, arXiv 2601.08301), with GCNet blocks (Cao et al., 2019).

    ``L_CA = MSE(F_s + g_s(ctx_s(F_s)), F_t + g_t(ctx_t(F_t)))``, the mean over all ``B * C * V`` elements,
    with one trainable ``GlobalContextBlock`` per branch (the teacher backbone is frozen elsewhere, its block
    is not). With ``d = F_s - F_t`` and ``delta = a_s - a_t`` ``(B, C)``, ``L_CA = mean (d + delta)^2``, the
    sum formed element by element (an expansion into sums of d and delta would cancel where delta offsets
    the mean difference). The direct transcription of the formula, the reference for ``ReCoStageLoss``;
    O(voxels) time, two ``(B, C, V)`` temporaries, float32 with autocast off.

    Args:
        channels: channel count ``C`` of the (adapted) student and teacher features (>= 1).
        ratio: bottleneck ratio of both context blocks (> 0).

    Inputs:
        student: adapted student feature ``(B, C, *spatial)``.
        teacher: teacher feature ``(B, C, *spatial)``; it needs no gradient, the teacher block's parameters get one.

    Returns:
        float32 0-d tensor.

    Raises:
        ValueError: on invalid ``channels``/``ratio`` (in ``__init__``), or when student and teacher shapes differ
            or do not have ``channels`` channels (in ``forward``; the message gives both shapes).
    """

    def __init__(self, channels: int, ratio: float = 0.5) -> None:
        super().__init__()
        self.student_block = GlobalContextBlock(channels, ratio)
        self.teacher_block = GlobalContextBlock(channels, ratio)
        self.channels = channels

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        if student.shape != teacher.shape:
            raise ValueError(
                f"student and teacher features must have the same shape, got student {tuple(student.shape)} "
                f"and teacher {tuple(teacher.shape)}"
            )
        if student.ndim < 3 or student.shape[1] != self.channels:
            raise ValueError(
                f"features must have shape (B, {self.channels}, *spatial), got student {tuple(student.shape)} "
                f"and teacher {tuple(teacher.shape)}"
            )
        with float32_region(student.device):
            feat_s = at_least_float32(student)
            feat_t = at_least_float32(teacher.detach())
            shift_s = self.student_block.transform(self.student_block.context(feat_s))
            shift_t = self.teacher_block.transform(self.teacher_block.context(feat_t))
            delta = at_least_float32(shift_s - shift_t)  # (B, C)

            # d + delta formed element by element: exact where delta offsets the mean difference
            residual = (feat_s - feat_t).flatten(2) + delta.unsqueeze(2)  # (B, C, V)
            return residual.square().mean()
