"""Shared attention alignment (issue #12): one trainable CBAM block applied to the adapted student feature and to
the teacher feature before a feature-matching term.

REACT-KD (section II-F) shares a CBAM3D (Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018)
between teacher and student so that both attend alike; its public code puts the block in the teacher only. Here
ONE block is genuinely shared: :class:`AttentionAlignLoss` owns it, with the stage's adapter, so it lives in the
distiller and never in the deployed student.

References:
    [1] Woo, Park, Lee, Kweon, "CBAM: Convolutional Block Attention Module", ECCV 2018.
    [2] REACT-KD: Region-Aware Cross-modal Topological Knowledge Distillation, section II-F
        (https://github.com/Kinetics-JOJO/REACT-KD).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nnunetv2_recokd.losses._precision import at_least_float32, float32_region

__all__ = ["AttentionAlignLoss", "CBAM3D"]

# floor of a sample's attended-teacher mean square; below it the loss is no longer scale invariant
_EPS = 1e-12


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_conv_dim(conv_dim: object) -> int:
    if isinstance(conv_dim, bool) or conv_dim not in (2, 3):
        raise ValueError(f"conv_dim must be 2 or 3, got {conv_dim!r}")
    return int(conv_dim)


class CBAM3D(nn.Module):
    """Convolutional Block Attention Module [1] for 3D (or 2D) features, as REACT-KD's CBAM3D [2].

    ``forward(x) = (x * M_c(x)) * M_s(x * M_c(x))``: channel attention first, spatial attention on the
    channel-refined feature (CBAM's sequential order), with

    * ``M_c(x) = sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))`` ``(B, C, 1, ...)``, pooling over all spatial
      axes; ``MLP`` = 1x1(x1) conv ``C -> max(1, C // ratio)``, ReLU, 1x1(x1) conv back to ``C``, shared by both
      pooled descriptors;
    * ``M_s(y) = sigmoid(conv_k([mean_c(y), max_c(y)]))`` ``(B, 1, *spatial)``, a ``k^3`` (``k^2`` in 2D)
      convolution with zero padding ``k // 2`` over the channel mean and max, so the spatial shape is kept.

    No convolution has a bias, as in REACT-KD and the common CBAM implementations: in a block trained by a
    matching loss a bias would be a free knob that scales every attention map at once.

    Args:
        channels: number of feature channels ``C`` (>= 1).
        conv_dim: 3 for ``(B, C, D, H, W)`` features, 2 for ``(B, C, H, W)`` (nnU-Net's 2d configurations).
        ratio: reduction ratio ``r`` of the channel MLP (integer >= 1); hidden width ``max(1, C // r)``.
        kernel_size: spatial attention kernel ``k`` (odd integer >= 1; CBAM uses 7, padding 3).

    Inputs:
        x: ``(B, C, *spatial)`` with ``conv_dim`` spatial axes.

    Returns:
        ``forward``: the refined feature ``(B, C, *spatial)``.
        ``channel_attention(x)``: ``M_c(x)`` ``(B, C, 1, ...)`` (one singleton per spatial axis), in (0, 1).
        ``spatial_attention(y)``: ``M_s(y)`` ``(B, 1, *spatial)``, in (0, 1); ``forward`` calls it on
        ``y = x * M_c(x)``, not on ``x``.

    Raises:
        ValueError: on invalid ``channels``, ``conv_dim``, ``ratio`` or ``kernel_size`` (in ``__init__``), or on
            an input that is not ``(B, channels, *spatial)`` with ``conv_dim`` spatial axes.
    """

    def __init__(self, channels: int, conv_dim: int = 3, ratio: int = 8, kernel_size: int = 7) -> None:
        super().__init__()
        self.channels = _check_int("channels", channels, 1)
        self.conv_dim = _check_conv_dim(conv_dim)
        self.ratio = _check_int("ratio", ratio, 1)
        self.kernel_size = _check_int("kernel_size", kernel_size, 1)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (padding kernel_size // 2 keeps the shape), got {kernel_size}")
        self.hidden_channels = max(1, channels // ratio)
        conv = nn.Conv3d if self.conv_dim == 3 else nn.Conv2d
        self.channel_mlp = nn.Sequential(
            conv(channels, self.hidden_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            conv(self.hidden_channels, channels, kernel_size=1, bias=False),
        )
        self.spatial_conv = conv(2, 1, kernel_size=kernel_size, padding=kernel_size // 2, bias=False)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, conv_dim={self.conv_dim}, hidden_channels={self.hidden_channels}, "
                f"kernel_size={self.kernel_size}")

    def _check(self, x: Tensor) -> None:
        if x.ndim != self.conv_dim + 2 or x.shape[1] != self.channels:
            raise ValueError(f"features must have shape (B, {self.channels}, *spatial) with {self.conv_dim} spatial "
                             f"axes, got {tuple(x.shape)}")

    def channel_attention(self, x: Tensor) -> Tensor:
        self._check(x)
        singletons = [1] * self.conv_dim
        flat = x.flatten(2)
        pooled = torch.cat([flat.mean(dim=2), flat.amax(dim=2)])  # (2B, C): both descriptors through one MLP call
        logits = self.channel_mlp(pooled.reshape(*pooled.shape, *singletons))
        average, maximum = logits.chunk(2)
        return torch.sigmoid(average + maximum)

    def spatial_attention(self, y: Tensor) -> Tensor:
        self._check(y)
        descriptors = torch.cat([y.mean(dim=1, keepdim=True), y.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.spatial_conv(descriptors))

    def forward(self, x: Tensor) -> Tensor:
        refined = x * self.channel_attention(x)
        return refined * self.spatial_attention(refined)


class AttentionAlignLoss(nn.Module):
    """Shared-attention feature matching at one stage (REACT-KD's shared CBAM3D [2], CBAM [1]).

    ``A_s = CBAM(W F_s + b)`` and ``A_t = CBAM(F_t)`` with ONE trainable :class:`CBAM3D` on the teacher's
    channels (``cbam``) and the stage's ``adapter`` ``W, b`` (1x1(x1) conv ``C_s -> C_t``, PyTorch's default
    initialisation, as the adapters of ``ReCoStageLoss``). The term is the per-sample relative squared error

        ``L = 1/B sum_b  mean_{c,v} (A_s - A_t)^2  /  max(mean_{c,v} A_t^2, eps)``

    i.e. the MSE between the attended features measured in units of the attended teacher's energy, averaged
    over the batch. It is 0 exactly when ``A_s = A_t``.

    Why the denominator: the CBAM is trained by this term, and with a plain MSE it has a degenerate optimum:
    driving its sigmoids towards 0 shrinks both attended features and the MSE (by the square of the shrink)
    without the student learning anything. ``L`` is homogeneous of degree 0 in a common scale of ``A_s`` and
    ``A_t``, so shrinking both does not change its value, and because the gradient flows through the
    denominator, its gradient along that direction is exactly 0 (Euler), so nothing pushes the block there.
    Two alternatives were rejected: stopping the denominator's gradient keeps the value invariant but leaves a
    gradient ``2 L / alpha`` towards shrinking (growing as alpha -> 0), so the sigmoids drift into saturation;
    L2-normalising each voxel over channels cancels the spatial attention map (one scalar per voxel), which would
    then get no gradient at all. Shrinking only the student (``A_s -> 0``) gives ``L -> 1``, not 0.
    Not prevented (inherent to an attention block trained by the matching term): the block can still re-weight
    voxels and channels towards those where student and teacher already agree.

    The attention maps are computed from each branch's own feature, so matching the attended features also
    aligns the student's attention with the teacher's. The teacher feature is detached; gradients reach the
    student feature, the adapter and the CBAM (through both branches). Computed in float32 with autocast off
    (float64 when the module is ``.double()``).

    Args:
        student_channels: ``C_s`` of the raw student feature (>= 1).
        teacher_channels: ``C_t`` of the teacher feature, and the CBAM's channels (>= 1).
        conv_dim: 2 or 3, spatial dimensionality of the features.
        ratio: CBAM channel-MLP reduction ratio (integer >= 1; REACT-KD uses 8).
        kernel_size: CBAM spatial-attention kernel (odd integer >= 1; CBAM uses 7).

    Inputs:
        student: raw student feature ``(B, C_s, *spatial)``, any float dtype.
        teacher: teacher feature ``(B, C_t, *spatial)``, same ``B`` and spatial shape, any float dtype.

    Returns:
        float32 0-d tensor (float64 for a ``.double()`` module).

    Raises:
        ValueError: on invalid options (in ``__init__``); on features whose channel counts, number of spatial axes,
            batch size or spatial shape do not match (the message gives both shapes).
    """

    def __init__(self, student_channels: int, teacher_channels: int, conv_dim: int = 3, ratio: int = 8,
                 kernel_size: int = 7) -> None:
        super().__init__()
        _check_int("student_channels", student_channels, 1)
        _check_int("teacher_channels", teacher_channels, 1)
        conv_dim = _check_conv_dim(conv_dim)
        conv = nn.Conv3d if conv_dim == 3 else nn.Conv2d
        self.adapter = conv(student_channels, teacher_channels, kernel_size=1, bias=True)
        self.cbam = CBAM3D(teacher_channels, conv_dim, ratio, kernel_size)

    def attended(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        """``(A_s, A_t)``, both ``(B, C_t, *spatial)`` in the computation dtype; ``A_t`` depends on the CBAM's
        parameters but not on the teacher tensor's graph."""
        self._check(student, teacher)
        dtype = torch.float64 if self.adapter.weight.dtype == torch.float64 else torch.float32
        with float32_region(student.device):
            adapted = self.adapter(at_least_float32(student).to(dtype))
            return self.cbam(adapted), self.cbam(at_least_float32(teacher.detach()).to(dtype))

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        attended_s, attended_t = self.attended(student, teacher)
        with float32_region(student.device):
            error = (attended_s - attended_t).square().flatten(1).mean(dim=1)  # (B,)
            energy = attended_t.square().flatten(1).mean(dim=1)  # (B,), not detached: see the class docstring
            return (error / energy.clamp_min(_EPS)).mean()

    def _check(self, student: Tensor, teacher: Tensor) -> None:
        conv_dim = self.cbam.conv_dim
        c_s, c_t = self.adapter.in_channels, self.adapter.out_channels
        if (student.ndim != conv_dim + 2 or teacher.ndim != conv_dim + 2 or student.shape[1] != c_s
                or teacher.shape[1] != c_t or student.shape[0] != teacher.shape[0]
                or student.shape[2:] != teacher.shape[2:]):
            raise ValueError(f"expected student (B, {c_s}, *spatial) and teacher (B, {c_t}, *spatial) with "
                             f"{conv_dim} spatial axes, one batch size and one spatial shape, got student "
                             f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}")
