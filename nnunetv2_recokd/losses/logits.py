"""Logit distillation (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015).

Also REACT-KD's first objective. Applied per voxel to segmentation logits; the distiller sums it
over nnU-Net's deep-supervision outputs with nnU-Net's own deep-supervision weights.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_recokd.losses._precision import float32_region


class LogitKDLoss(nn.Module):
    """T^2 * mean over voxels of KL(softmax(z_t / T) || softmax(z_s / T)).

    With ``sigmoid=True`` (nnU-Net region-based training) each channel is an independent binary
    distribution and the binary KL is averaged over channels and voxels.

    Args:
        temperature: softening temperature T > 0.
        sigmoid: use the per-channel binary form.

    Inputs:
        student: (B, C, *spatial) logits, any float dtype.
        teacher: (B, C, *spatial) logits (no gradient needed).
        valid: optional (B, 1, *spatial) mask of voxels that count (e.g. not the ignore label).

    Returns:
        float32 0-d tensor. Zero when student == teacher; a finite zero with a gradient path when no
        voxel is valid.

    Raises:
        ValueError: temperature <= 0 or shape mismatch.
    """

    def __init__(self, temperature: float = 1.0, sigmoid: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.sigmoid = sigmoid

    def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        if student.shape != teacher.shape:
            raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} "
                             f"must have the same shape")
        t = self.temperature
        with float32_region(student.device):
            zs = student.float() / t
            zt = teacher.detach().float() / t
            if self.sigmoid:
                # binary KL per channel, written with log-sigmoids for stability
                ls_s, ls_t = F.logsigmoid(zs), F.logsigmoid(zt)
                lns_s, lns_t = F.logsigmoid(-zs), F.logsigmoid(-zt)
                pt = torch.sigmoid(zt)
                per_voxel = (pt * (ls_t - ls_s) + (1 - pt) * (lns_t - lns_s)).mean(1, keepdim=True)
            else:
                log_ps = F.log_softmax(zs, 1)
                log_pt = F.log_softmax(zt, 1)
                per_voxel = (log_pt.exp() * (log_pt - log_ps)).sum(1, keepdim=True)
            if valid is None:
                return per_voxel.mean() * t * t
            weight = valid.to(per_voxel.dtype)
            return (per_voxel * weight).sum() / weight.sum().clamp_min(1.0) * t * t
