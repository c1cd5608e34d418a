"""Structure-aware region distillation (MS-SARD) at one feature stage: its settings, the attention formula and
the direct transcription of the loss.

The trainers compute MS-SARD in ``ReCoStageLoss`` (losses/reco.py), configured by ``SARDConfig``; both paths
share ``attention_from_means``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from nnunetv2_recokd.losses._precision import at_least_float32, float32_region

__all__ = ["SARDConfig", "attention_from_means", "sard_direct"]

_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class SARDConfig:
    """Settings of MS-SARD at one stage (ReCo-KD, arXiv 2601.08301; authors' defaults).

    Args:
        temperature: softmax temperature ``T`` of both attentions (finite, > 0).
        fg_weight: weight of the foreground region term (finite, >= 0).
        bg_weight: weight of the background region term (finite, >= 0).
        att_weight: weight of the attention term (finite, >= 0).

    Raises:
        ValueError: on a non-positive or non-finite temperature, or a negative or non-finite weight.
    """

    temperature: float = 0.5
    fg_weight: float = 1.0
    bg_weight: float = 1.0
    att_weight: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        for name in ("fg_weight", "bg_weight", "att_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def attention_from_means(over_channels: Tensor, over_voxels: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Spatial ``(B, V)`` and channel ``(B, C)`` attention from the means of ``|F|`` over channels and over voxels.

    ``S(v) = V * softmax_v(mean_c |F| / T)`` and ``Ch(c) = C * softmax_c(mean_v |F| / T)``, per sample, so both
    average to 1 and equal 1 everywhere when the activations are uniform. The one attention formula of both
    ``sard_direct`` and ``ReCoStageLoss``.
    """
    spatial = torch.softmax(over_channels / temperature, dim=1) * over_channels.shape[1]
    channel = torch.softmax(over_voxels / temperature, dim=1) * over_voxels.shape[1]
    return spatial, channel


def _attention(features: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Spatial ``(B, V)`` and channel ``(B, C)`` attention of float32 features ``(B, C, V)``."""
    magnitude = features.abs()
    return attention_from_means(magnitude.mean(dim=1), magnitude.mean(dim=2), temperature)


def sard_direct(adapted: Tensor, teacher: Tensor, mask_fg: Tensor, mask_bg: Tensor,
                config: SARDConfig = SARDConfig()) -> dict[str, Tensor]:
    """MS-SARD at one stage computed directly on the adapted student (ReCo-KD, arXiv 2601.08301).

    The reference transcription of the paper's formulas: the tests check ``ReCoStageLoss`` against it, and
    ``ReCoStageLoss.reference`` (the benchmark's "direct" side) calls it. It keeps the difference and its square
    at full resolution; training uses ``ReCoStageLoss.forward``.

    The region term follows FGD (Yang et al., "Focal and Global Knowledge Distillation for Detectors",
    CVPR 2022), extended to 3D with ReCo-KD's class-aware, size-normalised masks (see ``region_masks``).
    With teacher attention ``S_t`` (spatial) and ``Ch_t`` (channel), ``C`` channels and per-sample
    flattened voxels ``v``::

        L_fg  = sum_{b,c,v} M_fg S_t Ch_t (F_s' - F_t)^2 / (C * sum_{b,v} M_fg)     (L_bg likewise with M_bg)
        L_att = mean |Ch_s - Ch_t| + mean |S_s - S_t|
        sard  = fg_weight * L_fg + bg_weight * L_bg + att_weight * L_att

    where ``S(v) = V * softmax_v(mean_c |F| / T)`` and ``Ch(c) = C * softmax_c(mean_v |F| / T)`` per sample
    (``attention_from_means``). Everything is computed in float32 (float64 inputs stay float64) with autocast
    off. An all-zero mask gives a finite 0 that still belongs to the autograd graph. The teacher feature and its
    attention are detached.

    Args:
        adapted: adapted student feature ``(B, C, *spatial)``, already projected to the teacher's channels.
        teacher: teacher feature ``(B, C, *spatial)``.
        mask_fg: foreground mask ``(B, 1, *spatial)`` from ``region_masks``.
        mask_bg: background mask ``(B, 1, *spatial)`` from ``region_masks``.
        config: temperature and weights.

    Returns:
        ``{'fg', 'bg', 'att', 'sard'}`` (the raw terms and the weighted total): float32 0-d tensors (float64 for
        float64 features).

    Raises:
        ValueError: when student and teacher shapes differ, the features have no spatial axis, or a mask is not
            ``(B, 1, *spatial)`` (the message gives both shapes).
    """
    _check_shapes(adapted, teacher, mask_fg, mask_bg)
    with float32_region(adapted.device):
        feat_s = at_least_float32(adapted).flatten(2)  # (B, C, V)
        feat_t = at_least_float32(teacher.detach()).flatten(2)
        weight_fg = at_least_float32(mask_fg.detach()).flatten(1)  # (B, V)
        weight_bg = at_least_float32(mask_bg.detach()).flatten(1)
        channels = feat_s.shape[1]

        spatial_t, channel_t = _attention(feat_t, config.temperature)
        spatial_s, channel_s = _attention(feat_s, config.temperature)

        # one (B, V) map of attention-weighted squared error serves both regions
        diff = feat_s - feat_t
        voxel_error = torch.einsum("bcv,bc->bv", diff * diff, channel_t) * spatial_t

        # Empty mask: 0 * error / eps = 0, still attached to the graph.
        loss_fg = (voxel_error * weight_fg).sum() / (channels * weight_fg.sum()).clamp_min(_EPS)
        loss_bg = (voxel_error * weight_bg).sum() / (channels * weight_bg.sum()).clamp_min(_EPS)
        loss_att = (channel_s - channel_t).abs().mean() + (spatial_s - spatial_t).abs().mean()
        total = config.fg_weight * loss_fg + config.bg_weight * loss_bg + config.att_weight * loss_att
    return {"fg": loss_fg, "bg": loss_bg, "att": loss_att, "sard": total}


def _check_shapes(student: Tensor, teacher: Tensor, mask_fg: Tensor, mask_bg: Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher features must have the same shape, got student {tuple(student.shape)} "
            f"and teacher {tuple(teacher.shape)}"
        )
    if student.ndim < 3:
        raise ValueError(f"features must have shape (B, C, *spatial), got {tuple(student.shape)}")
    expected = (student.shape[0], 1, *student.shape[2:])
    for name, mask in (("mask_fg", mask_fg), ("mask_bg", mask_bg)):
        if tuple(mask.shape) != expected:
            raise ValueError(
                f"{name} must have shape {expected} to match features {tuple(student.shape)}, "
                f"got {name} {tuple(mask.shape)}"
            )
