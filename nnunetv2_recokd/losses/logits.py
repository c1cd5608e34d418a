"""Logit distillation on segmentation logits, in three forms (the `logit_form` setting):

- "hinton": Hinton et al., "Distilling the Knowledge in a Neural Network", 2015 (also REACT-KD's first objective):
  the per-voxel KL averaged over every voxel. On a small-foreground task most of it sits on background voxels.
- "class_balanced": the same per-voxel KL, averaged per class of the teacher's argmax and then over the classes
  present, so every class counts equally in a batch, as nnU-Net's Dice does.
- "cwd": channel-wise distillation (Shu et al., "Channel-Wise Knowledge Distillation for Dense Prediction",
  ICCV 2021): per sample and channel, a softmax over the spatial positions, KL between teacher and student, averaged
  over samples and channels; every channel (class) weighs the same by construction.

The distiller sums the chosen form over nnU-Net's deep-supervision outputs with nnU-Net's own deep-supervision
weights (make_logit_loss builds it from the settings).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_recokd.config import LOGIT_FORMS
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
        teachers = _checked(student, teacher, weights)
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
        return self.softmax_kl(student, self.teacher_log_probs(teachers, weights))

    def teacher_log_probs(self, teachers: Sequence[torch.Tensor], weights: Optional[Sequence[float]] = None
                          ) -> torch.Tensor:
        """log of the (weighted mean of the) teachers' softened probabilities, (B, C, *spatial) float32."""
        return _log_mean([F.log_softmax(z.detach().float() / self.temperature, 1) for z in teachers], weights)

    def softmax_kl(self, student: torch.Tensor, log_pt: torch.Tensor) -> torch.Tensor:
        """KL(p_t || softmax(z_s / T)) of every voxel, (B, 1, *spatial) float32, from the teachers' log_pt."""
        log_ps = F.log_softmax(student.float() / self.temperature, 1)
        return (log_pt.exp() * (log_pt - log_ps)).sum(1, keepdim=True)


def _log_mean(log_probs: list[torch.Tensor], weights: Optional[Sequence[float]]) -> torch.Tensor:
    """log(sum_i w_i exp(log_probs[i])) with w normalised to sum 1 (equal when None); one input is returned as is."""
    if len(log_probs) == 1:
        return log_probs[0]
    w = torch.tensor([1.0] * len(log_probs) if weights is None else [float(x) for x in weights],
                     dtype=log_probs[0].dtype, device=log_probs[0].device)
    log_w = (w / w.sum()).log().reshape(-1, *[1] * log_probs[0].ndim)
    return torch.logsumexp(torch.stack(log_probs) + log_w, 0)


class ClassBalancedLogitKDLoss(LogitKDLoss):
    """T^2 * mean over the classes present of (mean KL over the valid voxels the teacher assigns to that class).

    The per-voxel KL is LogitKDLoss's; the class of a voxel is the argmax of the teacher's (ensemble's) probabilities.
    With n_c valid voxels of class c and C' classes present in the batch, voxel v weighs 1 / (C' n_c(v)): each
    class contributes the same share whatever its size, as in nnU-Net's Dice (Hinton's form gives the background
    ~96 % of the weight on Hippocampus). Label maps only (softmax outputs).

    Args:
        temperature: softening temperature T > 0.

    Inputs / Returns / Raises: as LogitKDLoss (student (B, C, *spatial), teacher(s) of the same shape, valid
    (B, 1, *spatial) or None); a float32 0-d tensor, zero when student == teacher.
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__(temperature, sigmoid=False)

    def forward(self, student: torch.Tensor, teacher: Union[torch.Tensor, Sequence[torch.Tensor]],
                valid: Optional[torch.Tensor] = None, weights: Optional[Sequence[float]] = None) -> torch.Tensor:
        teachers = _checked(student, teacher, weights)
        t = self.temperature
        with float32_region(student.device):
            log_pt = self.teacher_log_probs(teachers, weights)  # once: the KL's target and the voxels' classes
            per_voxel = self.softmax_kl(student, log_pt)  # (B, 1, *spatial)
            classes = log_pt.argmax(1, keepdim=True)  # (B, 1, *spatial)
            weight = (torch.ones_like(per_voxel) if valid is None else valid.to(per_voxel.dtype)).flatten()
            n_classes = student.shape[1]
            counts = torch.zeros(n_classes, dtype=per_voxel.dtype, device=per_voxel.device)
            sums = torch.zeros_like(counts)
            counts.index_add_(0, classes.flatten(), weight)
            sums = sums.index_add(0, classes.flatten(), per_voxel.flatten() * weight)
            present = counts > 0
            per_class = sums[present] / counts[present]
            if per_class.numel() == 0:  # no valid voxel: a finite zero that keeps the graph
                return per_voxel.sum() * 0.0
            return per_class.mean() * t * t


class ChannelWiseKDLoss(nn.Module):
    """Channel-wise distillation (CWD; Shu et al., ICCV 2021) of segmentation logits.

        L = T^2 / (B C) * sum_{b, c} KL(softmax_x(z_t[b, c] / T) || softmax_x(z_s[b, c] / T))

    where softmax_x runs over the spatial positions x of one sample's channel: each channel becomes a distribution
    over where that class is, so a small structure's channel counts as much as the background's. Works on softmax and
    sigmoid (region) logits alike: it reads the raw logits. Several teachers: the target is the (weighted) mean of
    their spatial distributions. Voxels outside `valid` are left out of every softmax; a sample without a valid voxel
    is left out of the mean.

    Args:
        temperature: T > 0 (mmrazor's Cityscapes configuration of CWD on logits uses T = 1, loss weight 5).

    Inputs:
        student: (B, C, *spatial) logits. teacher: (B, C, *spatial) logits, or a sequence of them.
        valid: optional (B, 1, *spatial) mask of the voxels that count. weights: one weight >= 0 per teacher.

    Returns:
        float32 0-d tensor; zero when student == teacher (or differs from it by a constant per channel); a finite
        zero with a gradient path when no voxel is valid.

    Raises:
        ValueError: temperature <= 0, shape mismatch, not one weight per teacher.
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, student: torch.Tensor, teacher: Union[torch.Tensor, Sequence[torch.Tensor]],
                valid: Optional[torch.Tensor] = None, weights: Optional[Sequence[float]] = None) -> torch.Tensor:
        teachers = _checked(student, teacher, weights)
        t = self.temperature
        b, c = student.shape[:2]
        with float32_region(student.device):
            zs = student.float().reshape(b, c, -1) / t
            zts = [z.detach().float().reshape(b, c, -1) / t for z in teachers]
            if valid is None:
                keep = torch.ones(b, 1, zs.shape[-1], dtype=torch.bool, device=zs.device)
            else:
                keep = valid.reshape(b, 1, -1).bool()
            # masked positions get a very low logit: zero probability for both networks, no NaN from -inf - -inf
            low = torch.finfo(zs.dtype).min / 4

            def spatial_log_softmax(z: torch.Tensor) -> torch.Tensor:
                return F.log_softmax(z.masked_fill(~keep, low), -1)

            log_ps = spatial_log_softmax(zs)
            log_pt = _log_mean([spatial_log_softmax(z) for z in zts], weights)
            kl = torch.where(keep, log_pt.exp() * (log_pt - log_ps), torch.zeros_like(log_ps)).sum(-1)  # (B, C)
            samples = keep.flatten(1).any(1)  # (B,)
            if not bool(samples.any()):
                return zs.sum() * 0.0
            return kl[samples].mean() * t * t


def make_logit_loss(form: str, temperature: float, sigmoid: bool = False) -> Callable[..., torch.Tensor]:
    """The logit term of one form (see the module docstring) at temperature T.

    Raises:
        ValueError: an unknown form, or the class-balanced form on region (sigmoid) outputs, which have no
            per-voxel class.
    """
    if form == "hinton":
        return LogitKDLoss(temperature, sigmoid=sigmoid)
    if form == "class_balanced":
        if sigmoid:
            raise ValueError("logit_form 'class_balanced' needs label maps (softmax outputs); this dataset is "
                             "region-based: use logit_form 'cwd' or 'hinton'")
        return ClassBalancedLogitKDLoss(temperature)
    if form == "cwd":
        return ChannelWiseKDLoss(temperature)
    raise ValueError(f"unknown logit_form {form!r}; valid forms: {', '.join(LOGIT_FORMS)}")


def onehot_logits(target: torch.Tensor, n_classes: int, margin: float) -> torch.Tensor:
    """Logits of an oracle teacher that is certain of the label: margin * onehot(target).

    A diagnostic (the `logit_oracle_margin` setting): distilling these instead of a real teacher's logits tells the
    term's form apart from the teacher's knowledge. Labels outside 0..n_classes-1 (nnU-Net's ignore label) get all-zero
    logits; the logit term leaves those voxels out anyway.

    Args:
        target: (B, 1, *spatial) label map (integer-valued, any dtype).
        n_classes: C, the number of output channels.
        margin: m > 0, the logit of the labelled class over every other class.

    Returns:
        (B, C, *spatial) float32 logits.

    Raises:
        ValueError: a target with more than one channel (region-based training has no single label per voxel).
    """
    if target.shape[1] != 1:
        raise ValueError(f"oracle logits need a label map (B, 1, *spatial), got {tuple(target.shape)} (region-based "
                         f"targets have no single label per voxel)")
    labels = target.long()
    inside = (labels >= 0) & (labels < n_classes)
    onehot = torch.zeros((target.shape[0], n_classes, *target.shape[2:]), dtype=torch.float32, device=target.device)
    onehot.scatter_(1, labels.clamp(0, n_classes - 1), 1.0)
    return onehot * inside * float(margin)


def _checked(student: torch.Tensor, teacher: Union[torch.Tensor, Sequence[torch.Tensor]],
             weights: Optional[Sequence[float]]) -> list[torch.Tensor]:
    """The teachers as a list, after checking shapes and the number of weights (LogitKDLoss's rules)."""
    teachers = [teacher] if torch.is_tensor(teacher) else list(teacher)
    if not teachers:
        raise ValueError("no teacher logits given")
    for z in teachers:
        if student.shape != z.shape:
            raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(z.shape)} "
                             f"must have the same shape")
    if weights is not None and len(weights) != len(teachers):
        raise ValueError(f"{len(weights)} teacher weights for {len(teachers)} teachers")
    return teachers
