"""Logit distillation (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015).

Also REACT-KD's first objective. Applied per voxel to segmentation logits; the distiller sums it
over nnU-Net's deep-supervision outputs with nnU-Net's own deep-supervision weights.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_recokd.losses._precision import float32_region


class LogitKDLoss(nn.Module):
    """T^2 * mean over voxels of KL(softmax(z_t / T) || softmax(z_s / T)).

    With ``sigmoid=True`` (nnU-Net region-based training) each channel is an independent binary
    distribution and the binary KL is averaged over channels and voxels.

    Several teachers (an ensemble, e.g. nnU-Net's folds): the target distribution is the (weighted) mean of the
    teachers' softened probabilities, p_t = sum_i w_i softmax(z_i / T) (sigmoid per channel in region mode), as
    nnU-Net's ensembling averages probabilities; log p_t is formed as a logsumexp of the teachers' log-
    probabilities, so one teacher, or identical teachers, give exactly the single-teacher value.

    Args:
        temperature: softening temperature T > 0.
        sigmoid: use the per-channel binary form.

    Inputs:
        student: (B, C, *spatial) logits, any float dtype.
        teacher: (B, C, *spatial) logits (no gradient needed), or a sequence of them (an ensemble).
        weights: one weight >= 0 per teacher of an ensemble (normalised here); None: equal.
        valid: optional (B, 1, *spatial) mask of voxels that count (e.g. not the ignore label).

    Returns:
        float32 0-d tensor. Zero when student == teacher; a finite zero with a gradient path when no
        voxel is valid.

    Raises:
        ValueError: temperature <= 0, shape mismatch, or as many weights as teachers missing.
    """

    def __init__(self, temperature: float = 1.0, sigmoid: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.sigmoid = sigmoid

    def forward(self, student: torch.Tensor, teacher: Union[torch.Tensor, Sequence[torch.Tensor]],
                valid: Optional[torch.Tensor] = None, weights: Optional[Sequence[float]] = None) -> torch.Tensor:
        teachers = [teacher] if torch.is_tensor(teacher) else list(teacher)
        if not teachers:
            raise ValueError("no teacher logits given")
        for z in teachers:
            if student.shape != z.shape:
                raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(z.shape)} "
                                 f"must have the same shape")
        if weights is not None and len(weights) != len(teachers):
            raise ValueError(f"{len(weights)} teacher weights for {len(teachers)} teachers")
        t = self.temperature
        with float32_region(student.device):
            per_voxel = self.per_voxel(student, teachers, weights)
            if valid is None:
                return per_voxel.mean() * t * t
            weight = valid.to(per_voxel.dtype)
            return (per_voxel * weight).sum() / weight.sum().clamp_min(1.0) * t * t

    def per_voxel(self, student: torch.Tensor, teachers: Sequence[torch.Tensor],
                  weights: Optional[Sequence[float]] = None) -> torch.Tensor:
        """The KL of every voxel, (B, 1, *spatial) float32, before the T^2 factor and the mean (shapes checked by
        forward; call it inside forward's float32 region or on float32 inputs)."""
        t = self.temperature
        zs = student.float() / t
        zts = [z.detach().float() / t for z in teachers]
        if self.sigmoid:
            # binary KL per channel, written with log-sigmoids for stability
            ls_s, lns_s = F.logsigmoid(zs), F.logsigmoid(-zs)
            ls_t = _log_mean([F.logsigmoid(z) for z in zts], weights)
            lns_t = _log_mean([F.logsigmoid(-z) for z in zts], weights)
            return (ls_t.exp() * (ls_t - ls_s) + lns_t.exp() * (lns_t - lns_s)).mean(1, keepdim=True)
        log_ps = F.log_softmax(zs, 1)
        log_pt = _log_mean([F.log_softmax(z, 1) for z in zts], weights)
        return (log_pt.exp() * (log_pt - log_ps)).sum(1, keepdim=True)


def _log_mean(log_probs: list[torch.Tensor], weights: Optional[Sequence[float]]) -> torch.Tensor:
    """log(sum_i w_i exp(log_probs[i])) with w normalised to sum 1 (equal when None); one input is returned as is."""
    if len(log_probs) == 1:
        return log_probs[0]
    w = torch.tensor([1.0] * len(log_probs) if weights is None else [float(x) for x in weights],
                     dtype=log_probs[0].dtype, device=log_probs[0].device)
    log_w = (w / w.sum()).log().reshape(-1, *[1] * log_probs[0].ndim)
    return torch.logsumexp(torch.stack(log_probs) + log_w, 0)
