"""Tests of the shared CBAM block and of the shared-attention alignment term: hand-computed attention maps and loss
values, the collapse of the attended features that the relative error prevents, gradients, precision, shapes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nnunetv2_recokd.losses.attention import CBAM3D, AttentionAlignLoss

torch.set_num_threads(1)

DIMS = pytest.mark.parametrize("conv_dim", [2, 3])


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _identity_adapter(loss: AttentionAlignLoss) -> None:
    channels, conv_dim = loss.adapter.out_channels, loss.cbam.conv_dim
    with torch.no_grad():
        loss.adapter.weight.copy_(torch.eye(channels).reshape(channels, channels, *[1] * conv_dim))
        loss.adapter.bias.zero_()


def _zero(module: nn.Module) -> None:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.zero_()


def _spatial(conv_dim: int, size: int = 5) -> tuple[int, ...]:
    return (size,) * conv_dim


class _ScaledCBAM(nn.Module):
    """``alpha * cbam(x)``: the shrink of both attended features that a plain MSE would reward."""

    def __init__(self, cbam: CBAM3D, alpha: float) -> None:
        super().__init__()
        self.cbam = cbam
        self.conv_dim = cbam.conv_dim
        self.alpha = nn.Parameter(torch.tensor(alpha))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.cbam(x)


def _plain_mse(loss: AttentionAlignLoss, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    attended_s, attended_t = loss.attended(student, teacher)
    return (attended_s - attended_t).square().mean()


# --- CBAM3D -------------------------------------------------------------------------------------------------------


@DIMS
@pytest.mark.parametrize("kernel_size", [7, 3, 1])
def test_cbam_keeps_the_shape(conv_dim, kernel_size):
    torch.manual_seed(0)
    cbam = CBAM3D(16, conv_dim, kernel_size=kernel_size)
    x = torch.randn(2, 16, *(4, 5, 6)[:conv_dim])
    assert cbam(x).shape == x.shape
    assert cbam.channel_attention(x).shape == (2, 16, *[1] * conv_dim)
    assert cbam.spatial_attention(x).shape == (2, 1, *x.shape[2:])


@pytest.mark.parametrize(("channels", "ratio", "hidden"), [(16, 8, 2), (32, 8, 4), (4, 8, 1), (5, 1, 5), (9, 2, 4)])
def test_hidden_width(channels, ratio, hidden):
    cbam = CBAM3D(channels, ratio=ratio)
    assert cbam.hidden_channels == hidden
    assert cbam.channel_mlp[0].out_channels == hidden and cbam.channel_mlp[2].in_channels == hidden
    assert all(conv.bias is None for conv in (cbam.channel_mlp[0], cbam.channel_mlp[2], cbam.spatial_conv))


@DIMS
def test_channel_attention_by_hand(conv_dim):
    # C = 2, ratio 8 -> hidden 1. W1 = (1, 0.5), W2 = (1, -2)^T.
    # Sample 0: channel 0 = (1, 3), channel 1 = (2, -2) -> avg (2, 0), max (3, 2)
    #   -> W1 avg = 2, W1 max = 3 + 1 = 4 -> ReLU keeps both -> W2 (2 + 4) = (6, -12) -> sigmoid.
    # Sample 1: channel 0 = (-3, -1), channel 1 = (0, 0) -> avg (-2, 0), max (-1, 0) -> W1: -2, -1 -> ReLU 0 -> 0.5.
    cbam = CBAM3D(2, conv_dim)
    singletons = [1] * conv_dim
    with torch.no_grad():
        cbam.channel_mlp[0].weight.copy_(torch.tensor([[1.0, 0.5]]).reshape(1, 2, *singletons))
        cbam.channel_mlp[2].weight.copy_(torch.tensor([[1.0], [-2.0]]).reshape(2, 1, *singletons))
    x = torch.tensor([[[1.0, 3.0], [2.0, -2.0]], [[-3.0, -1.0], [0.0, 0.0]]]).reshape(2, 2, *[1] * (conv_dim - 1), 2)
    attention = cbam.channel_attention(x).flatten(1)
    assert attention[0].tolist() == pytest.approx([_sigmoid(6.0), _sigmoid(-12.0)], abs=1e-7)
    assert attention[1].tolist() == pytest.approx([0.5, 0.5], abs=1e-7)


@DIMS
def test_spatial_attention_by_hand(conv_dim):
    # Three voxels along the last axis: channel 0 = (1, 2, 3), channel 1 = (3, 0, -1)
    # -> channel mean (2, 1, 1), channel max (3, 2, 3). Kernel 3 (padding 1), all taps zero but:
    # centre tap 1 on the mean and -0.5 on the max -> (2 - 1.5, 1 - 1, 1 - 1.5) = (0.5, 0, -0.5);
    # the next voxel's tap 1 on the mean (zero padding past the end) adds (1, 1, 0) -> (1.5, 1, -0.5).
    cbam = CBAM3D(2, conv_dim, kernel_size=3)
    centre = (1,) * conv_dim
    next_voxel = (1,) * (conv_dim - 1) + (2,)
    with torch.no_grad():
        weight = cbam.spatial_conv.weight
        weight.zero_()
        weight[(0, 0, *centre)] = 1.0
        weight[(0, 1, *centre)] = -0.5
        weight[(0, 0, *next_voxel)] = 1.0
    y = torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, -1.0]]).reshape(1, 2, *[1] * (conv_dim - 1), 3)
    expected = [_sigmoid(1.5), _sigmoid(1.0), _sigmoid(-0.5)]
    assert cbam.spatial_attention(y).flatten().tolist() == pytest.approx(expected, abs=1e-7)


def test_default_kernel_is_seven_with_padding_three():
    cbam = CBAM3D(4)
    assert cbam.spatial_conv.kernel_size == (7, 7, 7) and cbam.spatial_conv.padding == (3, 3, 3)
    # A tap three voxels ahead still reaches inside a (1, 1, 4) volume: voxel 0 sees voxel 3.
    with torch.no_grad():
        cbam.spatial_conv.weight.zero_()
        cbam.spatial_conv.weight[0, 0, 3, 3, 6] = 1.0
    y = torch.tensor([0.0, 0.0, 0.0, 2.0]).reshape(1, 1, 1, 1, 4).expand(1, 4, 1, 1, 4)
    assert cbam.spatial_attention(y).flatten().tolist() == pytest.approx([_sigmoid(2.0), 0.5, 0.5, 0.5], abs=1e-7)


@DIMS
def test_forward_is_channel_then_spatial_attention(conv_dim):
    torch.manual_seed(1)
    cbam = CBAM3D(8, conv_dim, ratio=2, kernel_size=3)
    with torch.no_grad():
        for parameter in cbam.parameters():
            parameter.normal_(0, 1.0)
    x = torch.randn(2, 8, *_spatial(conv_dim, 4))
    refined = x * cbam.channel_attention(x)
    assert torch.allclose(cbam(x), refined * cbam.spatial_attention(refined), atol=1e-6)
    # Sequential: the spatial map is computed on the channel-refined feature, which differs from the map of x.
    assert not torch.allclose(cbam.spatial_attention(refined), cbam.spatial_attention(x), atol=1e-3)
    # Zero weights -> both maps are sigmoid(0) = 1/2 -> x / 4.
    _zero(cbam)
    assert torch.allclose(cbam(x), x / 4)


def test_cbam_rejects_wrong_input():
    cbam = CBAM3D(4)
    with pytest.raises(ValueError, match=r"\(B, 4, \*spatial\) with 3 spatial axes, got \(1, 3, 2, 2, 2\)"):
        cbam(torch.zeros(1, 3, 2, 2, 2))
    with pytest.raises(ValueError, match=r"got \(1, 4, 2, 2\)"):
        cbam(torch.zeros(1, 4, 2, 2))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"channels": 0}, "channels"), ({"channels": 2.5}, "channels"), ({"channels": True}, "channels"),
    ({"ratio": 0}, "ratio"), ({"ratio": 2.5}, "ratio"), ({"ratio": True}, "ratio"),
    ({"kernel_size": 0}, "kernel_size"), ({"kernel_size": 4}, "odd"), ({"kernel_size": 7.0}, "kernel_size"),
    ({"conv_dim": 1}, "conv_dim"), ({"conv_dim": 4}, "conv_dim"),
])
def test_invalid_options_raise(kwargs, match):
    cbam_kwargs = {"channels": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        CBAM3D(**cbam_kwargs)
    loss_kwargs = {"student_channels": 4, "teacher_channels": cbam_kwargs.pop("channels"), **cbam_kwargs}
    with pytest.raises(ValueError, match=match):
        AttentionAlignLoss(**loss_kwargs)


def test_invalid_student_channels_raise():
    with pytest.raises(ValueError, match="student_channels"):
        AttentionAlignLoss(0, 8)


# --- AttentionAlignLoss -------------------------------------------------------------------------------------------


@DIMS
def test_loss_by_hand(conv_dim):
    # Zero CBAM weights -> A = x / 4 in both branches, and the quarter cancels in the relative error.
    # Sample 0: teacher 1, student 3 -> mean d^2 / mean t^2 = 4 / 1 = 4.
    # Sample 1: teacher 2, student 3 -> 1 / 4. Mean over samples: (4 + 0.25) / 2 = 2.125
    # (a plain MSE of the attended features would give (4 + 1) / 2 / 16 = 0.15625).
    loss = AttentionAlignLoss(3, 3, conv_dim)
    _identity_adapter(loss)
    _zero(loss.cbam)
    spatial = _spatial(conv_dim, 3)
    teacher = torch.stack([torch.ones(3, *spatial), torch.full((3, *spatial), 2.0)])
    student = torch.full_like(teacher, 3.0)
    assert loss(student, teacher).item() == pytest.approx(2.125, abs=1e-6)
    assert _plain_mse(loss, student, teacher).item() == pytest.approx(0.15625, abs=1e-7)


@DIMS
def test_identical_adapted_student_and_teacher_give_zero(conv_dim):
    torch.manual_seed(2)
    loss = AttentionAlignLoss(4, 16, conv_dim)
    with torch.no_grad():
        for parameter in loss.cbam.parameters():
            parameter.normal_(0, 1.0)
    student = torch.randn(2, 4, *_spatial(conv_dim))
    with torch.no_grad():
        teacher = loss.adapter(student)  # the adapted student IS the teacher
    assert loss(student, teacher).item() == pytest.approx(0.0, abs=1e-12)
    assert loss(student, teacher + 0.5).item() > 1e-3  # sanity: a different teacher is not matched


@DIMS
def test_shrinking_both_attended_features_does_not_reduce_the_loss(conv_dim):
    # The degenerate optimum of a plain MSE: scale the shared CBAM's output by alpha -> 0 (its sigmoids -> 0).
    torch.manual_seed(3)
    loss = AttentionAlignLoss(4, 8, conv_dim)
    student, teacher = torch.randn(2, 4, *_spatial(conv_dim)), torch.randn(2, 8, *_spatial(conv_dim))
    reference = loss(student, teacher).item()
    reference_mse = _plain_mse(loss, student, teacher).item()
    cbam = loss.cbam
    for alpha in (0.5, 1e-2, 1e-4):
        loss.cbam = _ScaledCBAM(cbam, alpha)
        assert loss(student, teacher).item() == pytest.approx(reference, rel=1e-5)
        assert _plain_mse(loss, student, teacher).item() == pytest.approx(reference_mse * alpha**2, rel=1e-5)

    # No gradient along the shrink either (L is homogeneous of degree 0 in alpha and the denominator is not
    # detached), while a plain MSE pulls alpha down with d/d alpha = 2 MSE at alpha = 1.
    loss.cbam = _ScaledCBAM(cbam, 1.0)
    (grad_alpha,) = torch.autograd.grad(loss(student, teacher), [loss.cbam.alpha])
    assert abs(grad_alpha.item()) < 1e-5 * reference
    (grad_alpha_mse,) = torch.autograd.grad(_plain_mse(loss, student, teacher), [loss.cbam.alpha])
    assert grad_alpha_mse.item() == pytest.approx(2 * reference_mse, rel=1e-4)


def test_shrinking_only_the_student_does_not_give_zero():
    # A_s -> 0 with A_t fixed -> mean d^2 -> mean t^2 -> L -> 1, not 0.
    torch.manual_seed(4)
    loss = AttentionAlignLoss(8, 8)
    _identity_adapter(loss)
    teacher = torch.randn(2, 8, 4, 4, 4)
    assert loss(teacher * 1e-6, teacher).item() == pytest.approx(1.0, abs=1e-4)


def test_training_the_cbam_alone_does_not_collapse():
    # Adam on the CBAM alone (student, adapter and teacher fixed and unrelated): a plain MSE of the attended
    # features falls by orders of magnitude because the sigmoids go to 0; the relative error cannot.
    def train(relative: bool) -> tuple[float, float, float]:
        torch.manual_seed(5)
        loss = AttentionAlignLoss(4, 8)
        student, teacher = torch.randn(2, 4, 6, 6, 6), torch.randn(2, 8, 6, 6, 6)
        objective = loss if relative else (lambda s, t: _plain_mse(loss, s, t))
        start = objective(student, teacher).item()
        optimiser = torch.optim.Adam(loss.cbam.parameters(), lr=0.05)
        for _ in range(30):
            optimiser.zero_grad()
            objective(student, teacher).backward()
            optimiser.step()
        with torch.no_grad():
            teacher_rms = loss.attended(student, teacher)[1].square().mean().sqrt().item()
        return start, objective(student, teacher).item(), teacher_rms

    start, end, _ = train(relative=False)
    assert end < 1e-6 * start  # the hazard is real
    start, end, teacher_rms = train(relative=True)
    assert end > 0.5 * start
    assert teacher_rms > 0.1  # the attended teacher keeps its size (about 0.25 with fresh sigmoids near 1/2)


@DIMS
def test_gradients_reach_student_adapter_and_cbam_but_not_teacher(conv_dim):
    torch.manual_seed(6)
    loss = AttentionAlignLoss(4, 16, conv_dim, kernel_size=3)
    student = torch.randn(2, 4, *_spatial(conv_dim), requires_grad=True)
    teacher = torch.randn(2, 16, *_spatial(conv_dim), requires_grad=True)
    loss(student, teacher).backward()
    assert student.grad.abs().sum().item() > 0
    assert teacher.grad is None
    for name, parameter in loss.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum().item() > 0, name


@DIMS
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_finite_float32_loss(dtype, conv_dim):
    torch.manual_seed(7)
    loss = AttentionAlignLoss(4, 8, conv_dim)
    student = torch.randn(2, 4, *_spatial(conv_dim)).to(dtype)
    teacher = torch.randn(2, 8, *_spatial(conv_dim)).to(dtype)
    value = loss(student, teacher)
    assert value.dtype == torch.float32 and value.ndim == 0 and torch.isfinite(value)
    assert value.item() == pytest.approx(loss(student.float(), teacher.float()).item(), rel=1e-6)


def test_runs_in_float32_under_autocast():
    torch.manual_seed(8)
    loss = AttentionAlignLoss(4, 8)
    student, teacher = torch.randn(2, 4, 5, 5, 5), torch.randn(2, 8, 5, 5, 5)
    expected = loss(student, teacher).item()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        value = loss(student, teacher)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_double_module_computes_in_float64():
    torch.manual_seed(9)
    loss = AttentionAlignLoss(4, 8, conv_dim=2)
    student, teacher = torch.randn(2, 4, 5, 5), torch.randn(2, 8, 5, 5)
    expected = loss(student, teacher).item()
    value = loss.double()(student.double(), teacher.double())
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("student_shape", "teacher_shape"), [
    ((2, 4, 4, 4, 4), (2, 8, 4, 4, 2)),  # spatial shape
    ((2, 4, 4, 4, 4), (1, 8, 4, 4, 4)),  # batch
    ((2, 3, 4, 4, 4), (2, 8, 4, 4, 4)),  # student channels
    ((2, 4, 4, 4, 4), (2, 6, 4, 4, 4)),  # teacher channels
    ((2, 4, 4, 4), (2, 8, 4, 4)),  # 2D features for a 3D module
])
def test_mismatched_shapes_raise_with_both_shapes(student_shape, teacher_shape):
    loss = AttentionAlignLoss(4, 8)
    pattern = rf"student {student_shape} and teacher {teacher_shape}".replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=pattern):
        loss(torch.zeros(student_shape), torch.zeros(teacher_shape))
