"""One ReCo-KD stage (adapter + MS-SARD + MS-CA), the module the trainers use, without the adapted student at
full resolution.

The values are those of the direct formulas ``sard_direct`` (losses/sard.py) and ``context_alignment_direct``
(losses/context.py) applied to the adapted student ``A = W F_s + b`` (the stage's 1x1x1 adapter, C_s -> C_t);
:meth:`ReCoStageLoss.reference` computes them that way. The direct formulas keep several full-resolution
float32 tensors alive until backward (the adapted student, the difference, its square, the context-shifted
features, float32 copies of the teacher), about 4 GB at 128^3, batch 2, 32 channels. Here:

* Every full-resolution quantity both terms need is a per-channel or per-voxel reduction of
  ``A`` and ``d = A - F_t``: the weighted sums of squares ``sum_v w_jv d_cv^2`` (``M_fg S_t`` and
  ``M_bg S_t`` for MS-SARD), MS-CA's ``sum_v (d_cv + delta_c)^2`` and the means of ``|A|``.
  ``_StageReductions`` computes them in one pass over voxel chunks and recomputes each chunk in
  backward, so only (C_t, chunk) blocks ever exist and nothing full-size is saved but the inputs.
  The differences are formed explicitly, so small losses are as exact as in the direct formula.
* MS-CA's broadcast shift ``delta = g_s - g_t`` (B, C_t) is computed first and added to each chunk of
  ``d`` before squaring. An expansion into ``sum d^2 + 2 sum delta sum d + V delta^2`` would cancel where
  delta offsets the mean difference (where the trainable teacher-branch block pushes): tested at offset 10,
  residual sd 1e-3, float32 value and gradients within 1e-2 of a float64 computation
  (tests/losses/test_reco.py).
* The student context block's pooling logits ``W_m A_v`` are linear in ``F_s``, and its softmax
  weights sum to 1, so ``ctx_s = W (sum_v p_v F_s(v)) + b`` is pooled from the narrow student.
* Teacher features stay in their own dtype (fp16 under autocast); each chunk is converted to
  float32 where it is used.

Passes over the teacher feature per stage and step: one without gradient (its attention), one for
the reductions and, with MS-CA on, two for the teacher's context block; backward repeats the last
three.

References: ReCo-KD (arXiv 2601.08301), FGD (Yang et al., CVPR 2022), GCNet (Cao et al., 2019).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from nnunetv2_recokd.losses._precision import at_least_float32, float32_region
from nnunetv2_recokd.losses.context import GlobalContextBlock, context_alignment_direct
from nnunetv2_recokd.losses.sard import SARDConfig, attention_from_means, sard_direct

__all__ = ["ReCoStageLoss"]

_EPS = 1e-12
# elements of one chunk-sized temporary (64 MiB in float32); a stage smaller than this is one chunk
CHUNK_ELEMENTS = 1 << 24


def _voxel_slices(rows: int, voxels: int, budget: int) -> list[slice]:
    """Slices of the voxel axis such that a (rows, slice) temporary holds at most `budget` elements."""
    step = max(1, budget // max(1, rows))
    return [slice(start, min(start + step, voxels)) for start in range(0, voxels, step)]


def _contract_voxels(x: Tensor, t: Tensor, budget: int) -> Tensor:
    """``sum_v x[b, k, v] t[b, c, v]`` -> (B, K, C) in x's dtype, t converted one chunk at a time."""
    out = x.new_zeros(x.shape[0], x.shape[1], t.shape[1])
    for sl in _voxel_slices(t.shape[0] * t.shape[1], t.shape[2], budget):
        out.baddbmm_(x[:, :, sl], t[:, :, sl].to(x.dtype).transpose(1, 2))
    return out


def _mix_channels(u: Tensor, t: Tensor, budget: int) -> Tensor:
    """``sum_c u[b, k, c] t[b, c, v]`` -> (B, K, V) in u's dtype, t converted one chunk at a time."""
    out = u.new_empty(u.shape[0], u.shape[1], t.shape[2])
    for sl in _voxel_slices(t.shape[0] * t.shape[1], t.shape[2], budget):
        out[:, :, sl] = torch.bmm(u, t[:, :, sl].to(u.dtype))
    return out


class _TeacherProduct(torch.autograd.Function):
    """``_contract_voxels(x, t)`` (contract=True) or ``_mix_channels(x, t)``, differentiable in x only.

    t is a constant (the frozen teacher's feature). The two products are each other's transpose, so the
    backward of one is the other applied to the incoming gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor, t: Tensor, budget: int, contract: bool) -> Tensor:
        ctx.save_for_backward(t)
        ctx.budget, ctx.contract = budget, contract
        return (_contract_voxels if contract else _mix_channels)(x, t, budget)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (t,) = ctx.saved_tensors
        transpose = _mix_channels if ctx.contract else _contract_voxels
        return transpose(grad.contiguous(), t, ctx.budget), None, None, None


class _StageReductions(torch.autograd.Function):
    """Reductions of the adapted student ``A = W s + b`` and of ``d = A - t``, one voxel chunk at a time.

    Inputs: s (B, C_s, V), weight (C_t, C_s), bias (C_t) [differentiable]; t (B, C_t, V) and voxel
    weights (B, J, V) [constants]; shift (B, C_t) or None [differentiable: MS-CA's context shift delta];
    budget (elements of one (C_t, chunk) block); with_abs (False: the two |A| means are left at zero, for a
    stage without the attention term).
    Outputs: ``sum_v w_jv d_cv^2`` (B, J, C_t), ``sum_v (d_cv + delta_c)^2`` (B, C_t; zeros without a shift),
    ``mean_c |A_cv|`` (B, V) and ``mean_v |A_cv|`` (B, C_t). ``d + delta`` is formed element by element, so
    MS-CA stays exact when delta offsets the mean difference (no cancellation of expanded sums). Backward
    recomputes A and d per chunk from the saved inputs and skips the parts of the gradient whose outputs were
    not used (their gradients arrive as None, not as zeros).
    """

    @staticmethod
    def forward(ctx, s: Tensor, weight: Tensor, bias: Tensor, t: Tensor, weights: Tensor, shift: Optional[Tensor],
                budget: int, with_abs: bool):
        ctx.set_materialize_grads(False)
        batch, _, voxels = s.shape
        channels = weight.shape[0]
        squares = s.new_zeros(batch, weights.shape[1], channels)
        shifted = s.new_zeros(batch, channels)
        abs_over_channels = s.new_zeros(batch, voxels)
        abs_over_voxels = s.new_zeros(batch, channels)
        for b in range(batch):
            for sl in _voxel_slices(channels, voxels, budget):
                adapted = torch.addmm(bias.unsqueeze(1), weight, s[b, :, sl])  # (C_t, v)
                if with_abs:
                    magnitude = adapted.abs()
                    abs_over_channels[b, sl] = magnitude.mean(dim=0)
                    abs_over_voxels[b] += magnitude.sum(dim=1)
                diff = adapted.sub_(t[b, :, sl])  # promotes an fp16 chunk, no copy
                if shift is not None:
                    shifted[b] += (diff + shift[b].unsqueeze(1)).square_().sum(dim=1)
                if weights.shape[1]:
                    squares[b] += weights[b, :, sl] @ diff.square_().t()  # (J, v) @ (v, C_t)
        ctx.save_for_backward(s, weight, bias, t, weights, shift)
        ctx.budget = budget
        return squares, shifted, abs_over_channels, abs_over_voxels / voxels

    @staticmethod
    def backward(ctx, g_squares, g_shifted, g_abs_channels, g_abs_voxels):
        s, weight, bias, t, weights, shift = ctx.saved_tensors
        batch, _, voxels = s.shape
        channels = weight.shape[0]
        grad_s = torch.empty_like(s)
        grad_w = torch.zeros_like(weight)
        grad_b = torch.zeros_like(bias)
        use_shift = shift is not None and g_shifted is not None
        grad_shift = torch.zeros_like(shift) if use_shift else None
        for b in range(batch):
            if g_abs_voxels is not None:
                abs_per_channel = (g_abs_voxels[b] / voxels).unsqueeze(1)  # (C_t, 1)
            for sl in _voxel_slices(channels, voxels, ctx.budget):
                chunk = s[b, :, sl]
                adapted = torch.addmm(bias.unsqueeze(1), weight, chunk)  # (C_t, v)
                sign = adapted.sign() if g_abs_channels is not None or g_abs_voxels is not None else None
                diff = adapted.sub_(t[b, :, sl])
                grad_adapted = torch.zeros_like(diff)
                if g_squares is not None and weights.shape[1]:  # d/dA sum_jc g_jc sum_v w_jv d_cv^2
                    grad_adapted.addcmul_(torch.mm(2 * g_squares[b].t(), weights[b, :, sl]), diff)
                if use_shift:  # d/dA and d/d delta of sum_c g_c sum_v (d_cv + delta_c)^2
                    residual = (diff + shift[b].unsqueeze(1)).mul_(2 * g_shifted[b].unsqueeze(1))
                    grad_adapted += residual
                    grad_shift[b] += residual.sum(dim=1)
                if sign is not None:  # d/dA of the means of |A|
                    if g_abs_voxels is not None:
                        grad_adapted.addcmul_(sign, abs_per_channel)
                    if g_abs_channels is not None:
                        grad_adapted.addcmul_(sign, g_abs_channels[b, sl].unsqueeze(0), value=1.0 / channels)
                grad_s[b, :, sl] = weight.t() @ grad_adapted
                grad_w.addmm_(grad_adapted, chunk.t())
                grad_b += grad_adapted.sum(dim=1)
        return grad_s, grad_w, grad_b, None, None, grad_shift, None, None


@torch.no_grad()
def _teacher_abs_means(t: Tensor, dtype: torch.dtype, budget: int) -> tuple[Tensor, Tensor]:
    """Means of ``|t|`` over channels (B, V) and over voxels (B, C) in ``dtype``, chunk by chunk."""
    batch, channels, voxels = t.shape
    over_channels = torch.empty(batch, voxels, dtype=dtype, device=t.device)
    over_voxels = torch.zeros(batch, channels, dtype=dtype, device=t.device)
    for b in range(batch):
        for sl in _voxel_slices(channels, voxels, budget):
            magnitude = t[b, :, sl].abs()  # (C, v), exact in the teacher's dtype; sums accumulate in `dtype`
            over_channels[b, sl] = magnitude.mean(dim=0, dtype=dtype)
            over_voxels[b] += magnitude.sum(dim=1, dtype=dtype)
    return over_channels, over_voxels / voxels


class ReCoStageLoss(nn.Module):
    """MS-SARD and MS-CA of one encoder stage (ReCo-KD, arXiv 2601.08301): the stage's one module.

    It owns the stage's trainable parts: ``adapter`` (1x1(x1) conv C_s -> C_t) and, with MS-CA on,
    ``student_block`` and ``teacher_block`` (the ``GlobalContextBlock`` of each branch; None with MS-CA off).
    Values equal ``sard_direct`` and ``context_alignment_direct`` applied to ``adapter(student)``, which
    :meth:`reference` computes that way (slowly, at full resolution) for tests and the benchmark; see the
    module docstring for how :meth:`forward` avoids the full-resolution float32 temporaries.

    Args:
        student_channels: C_s of the raw student feature (>= 1).
        teacher_channels: C_t of the teacher feature; the adapter maps C_s -> C_t (>= 1).
        conv_dim: 2 or 3, dimensionality of the adapter convolution (its weights are what is trained).
        sard: the MS-SARD temperature and weights, or None to switch MS-SARD off.
        ca_ratio: bottleneck ratio of the two context blocks (> 0), or None to switch MS-CA off.
        chunk_elements: float32 elements of one chunk-sized temporary.

    Inputs:
        student: raw student feature ``(B, C_s, *spatial)``, any float dtype.
        teacher: teacher feature ``(B, C_t, *spatial)``, any float dtype; never receives a gradient.
        mask_fg / mask_bg: ``(B, 1, *spatial)`` from ``region_masks``; may be None when the fg and bg
            weights are 0.

    Returns:
        ``{'fg', 'bg', 'att', 'sard'}`` (raw terms and the weighted MS-SARD total) when MS-SARD is on, and
        ``'ca'`` when MS-CA is on: float32 0-d tensors.

    Raises:
        ValueError: both terms off, bad channel counts, conv_dim or ca_ratio (in ``__init__``); shape mismatches
            or a missing mask (in ``forward``).
        TypeError: ``sard`` is neither None nor a ``SARDConfig``.
    """

    def __init__(self, student_channels: int, teacher_channels: int, conv_dim: int = 3,
                 sard: Optional[SARDConfig] = None, ca_ratio: Optional[float] = None,
                 chunk_elements: int = CHUNK_ELEMENTS) -> None:
        super().__init__()
        if sard is None and ca_ratio is None:
            raise ValueError("a ReCo-KD stage needs MS-SARD, MS-CA or both")
        if sard is not None and not isinstance(sard, SARDConfig):
            raise TypeError(f"sard must be a SARDConfig or None, got {type(sard).__name__}")
        if conv_dim not in (2, 3):
            raise ValueError(f"conv_dim must be 2 or 3, got {conv_dim}")
        if min(int(student_channels), int(teacher_channels)) < 1:
            raise ValueError(f"channel counts must be >= 1, got {student_channels} and {teacher_channels}")
        conv = nn.Conv3d if conv_dim == 3 else nn.Conv2d
        self.adapter = conv(int(student_channels), int(teacher_channels), kernel_size=1, bias=True)
        self.sard = sard
        self.ca_ratio = ca_ratio
        self.student_block: Optional[GlobalContextBlock] = None
        self.teacher_block: Optional[GlobalContextBlock] = None
        if ca_ratio is not None:
            self.student_block = GlobalContextBlock(int(teacher_channels), ca_ratio)
            self.teacher_block = GlobalContextBlock(int(teacher_channels), ca_ratio)
        self.chunk_elements = int(chunk_elements)

    def extra_repr(self) -> str:
        return f"sard={self.sard}, ca_ratio={self.ca_ratio}, chunk_elements={self.chunk_elements}"

    def forward(self, student: Tensor, teacher: Tensor, mask_fg: Optional[Tensor] = None,
                mask_bg: Optional[Tensor] = None) -> dict[str, Tensor]:
        self._check(student, teacher, mask_fg, mask_bg)
        budget = self.chunk_elements
        out: dict[str, Tensor] = {}
        with float32_region(student.device):
            s = at_least_float32(student).flatten(2)  # (B, C_s, V): the only float32 copy, of the narrow student
            t = teacher.detach().flatten(2)  # (B, C_t, V), left in its own dtype
            batch, channels, voxels = t.shape
            weight = self.adapter.weight.flatten(1)  # (C_t, C_s)
            bias = self.adapter.bias

            # voxel weights of MS-SARD's sums of squares: M_fg S_t and M_bg S_t
            weights, names = [], []
            sard = self.sard
            if sard is not None:
                spatial_t, channel_t = attention_from_means(*_teacher_abs_means(t, s.dtype, budget), sard.temperature)
                for name, mask, w in (("fg", mask_fg, sard.fg_weight), ("bg", mask_bg, sard.bg_weight)):
                    if w > 0:
                        weights.append(mask.detach().to(s.dtype).flatten(1) * spatial_t)
                        names.append(name)
            stacked = torch.stack(weights, dim=1) if weights else s.new_zeros(batch, 0, voxels)  # (B, J, V)
            with_abs = sard is not None and sard.att_weight > 0
            # MS-CA's context shift delta = g_s - g_t (B, C_t) first: the reductions add it to d element by element
            delta = self._context_shift(s, t, weight, bias) if self.ca_ratio is not None else None
            squares, shifted, abs_over_channels, abs_over_voxels = _StageReductions.apply(
                s, weight, bias, t, stacked, delta, budget, with_abs)
            per_channel = dict(zip(names, squares.unbind(1)))  # name -> (B, C_t)

            if sard is not None:
                zero = s.sum() * 0.0
                for name, mask in (("fg", mask_fg), ("bg", mask_bg)):
                    if name in per_channel:
                        region = (per_channel[name] * channel_t).sum()
                        out[name] = region / (channels * mask.detach().to(s.dtype).sum()).clamp_min(_EPS)
                    else:
                        out[name] = zero
                if with_abs:
                    spatial_s, channel_s = attention_from_means(abs_over_channels, abs_over_voxels, sard.temperature)
                    out["att"] = (channel_s - channel_t).abs().mean() + (spatial_s - spatial_t).abs().mean()
                else:
                    out["att"] = zero
                out["sard"] = sard.fg_weight * out["fg"] + sard.bg_weight * out["bg"] + sard.att_weight * out["att"]

            if self.ca_ratio is not None:
                out["ca"] = shifted.sum() / (batch * channels * voxels)
        return out

    def _context_shift(self, s: Tensor, t: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """``g_s(ctx_s(W s + b)) - g_t(ctx_t(t))`` (B, C_t) without the adapted student.

        The student block's pooling logits ``W_m (W s_v + b)`` are linear in s, and its softmax weights sum to 1,
        so ``ctx_s = W (sum_v p_v s_v) + b``.
        """
        student_block, teacher_block = self.student_block, self.teacher_block
        w_m = student_block.attention_logits.weight  # (1, C_t)
        logits_s = torch.matmul(w_m @ weight, s).squeeze(1) + w_m @ bias  # (B, V)
        pooled_s = torch.bmm(s, torch.softmax(logits_s, dim=1).unsqueeze(2)).squeeze(2)  # (B, C_s)
        context_s = pooled_s @ weight.t() + bias

        w_t = teacher_block.attention_logits.weight.unsqueeze(0).expand(t.shape[0], -1, -1)  # (B, 1, C_t)
        logits_t = _TeacherProduct.apply(w_t, t, self.chunk_elements, False)  # (B, 1, V)
        pooling_t = torch.softmax(logits_t, dim=2)
        context_t = _TeacherProduct.apply(pooling_t, t, self.chunk_elements, True).squeeze(1)  # (B, C_t)
        return student_block.transform(context_s) - teacher_block.transform(context_t)

    def reference(self, student: Tensor, teacher: Tensor, mask_fg: Optional[Tensor] = None,
                  mask_bg: Optional[Tensor] = None) -> dict[str, Tensor]:
        """The same values from the direct formulas (``sard_direct``, ``context_alignment_direct``) on the
        full-resolution adapted student: slow, for tests and the benchmark's direct-vs-ours comparison."""
        self._check(student, teacher, mask_fg, mask_bg)
        out: dict[str, Tensor] = {}
        with float32_region(student.device):
            adapted = self.adapter(at_least_float32(student))
            if self.sard is not None:
                zeros = torch.zeros_like(adapted[:, :1])
                out.update(sard_direct(adapted, teacher, zeros if mask_fg is None else mask_fg,
                                       zeros if mask_bg is None else mask_bg, self.sard))
            if self.ca_ratio is not None:
                out["ca"] = context_alignment_direct(adapted, teacher, self.student_block, self.teacher_block)
        return out

    def _check(self, student: Tensor, teacher: Tensor, mask_fg: Optional[Tensor], mask_bg: Optional[Tensor]) -> None:
        if student.ndim != self.adapter.weight.ndim or teacher.ndim != student.ndim:
            raise ValueError(f"features must have shape (B, C, *spatial) with {self.adapter.weight.ndim - 2} spatial "
                             f"axes, got student {tuple(student.shape)} and teacher {tuple(teacher.shape)}")
        if (student.shape[0], *student.shape[2:]) != (teacher.shape[0], *teacher.shape[2:]) or (
                student.shape[1] != self.adapter.in_channels or teacher.shape[1] != self.adapter.out_channels):
            raise ValueError(f"expected student (B, {self.adapter.in_channels}, *spatial) and teacher "
                             f"(B, {self.adapter.out_channels}, *spatial) of one batch and spatial shape, got "
                             f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)}")
        if self.sard is not None:
            expected = (student.shape[0], 1, *student.shape[2:])
            for name, mask, w in (("mask_fg", mask_fg, self.sard.fg_weight), ("mask_bg", mask_bg, self.sard.bg_weight)):
                if w > 0 and (mask is None or tuple(mask.shape) != expected):
                    raise ValueError(f"{name} must have shape {expected} to match features {tuple(student.shape)}, "
                                     f"got {None if mask is None else tuple(mask.shape)}")
