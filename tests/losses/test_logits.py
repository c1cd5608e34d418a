"""Logit distillation against values computed by hand."""

import math

import pytest
import torch

from nnunetv2_recokd.losses.logits import (
    ChannelWiseKDLoss,
    ClassBalancedLogitKDLoss,
    LogitKDLoss,
    make_logit_loss,
    onehot_logits,
)


def _voxel(values):  # (B=1, C, 1, 1, 1)
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1, 1)


def test_softmax_kl_hand_computed():
    # p_t = softmax([ln 3, 0]) = [0.75, 0.25], p_s = [0.5, 0.5]
    # KL = 0.75 ln(0.75/0.5) + 0.25 ln(0.25/0.5) = 0.304099 - 0.173287 = 0.130812
    loss = LogitKDLoss(temperature=1.0)(_voxel([0.0, 0.0]), _voxel([math.log(3), 0.0]))
    assert loss.item() == pytest.approx(0.130812, abs=1e-5)
    # T = 2 on logits twice as large gives the same distributions, times T^2 = 4
    loss_t2 = LogitKDLoss(temperature=2.0)(_voxel([0.0, 0.0]), _voxel([2 * math.log(3), 0.0]))
    assert loss_t2.item() == pytest.approx(4 * 0.130812, abs=1e-4)
    assert loss.dtype == torch.float32


def test_sigmoid_binary_kl_hand_computed():
    # teacher p = sigmoid(0) = 0.5, student q = sigmoid(ln 3) = 0.75
    # KL = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = -0.202733 + 0.346574 = 0.143841 (one channel)
    loss = LogitKDLoss(1.0, sigmoid=True)(_voxel([math.log(3)]), _voxel([0.0]))
    assert loss.item() == pytest.approx(0.143841, abs=1e-5)


def test_identical_logits_give_zero_and_valid_mask_excludes_voxels():
    z = torch.randn(2, 3, 4, 4, 4)
    assert LogitKDLoss(2.0)(z, z).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.zeros(1, 2, 1, 1, 2, requires_grad=True)
    teacher = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]]).view(1, 2, 1, 1, 2)  # voxel 0 differs, voxel 1 equal
    valid_first = torch.tensor([1.0, 0.0]).view(1, 1, 1, 1, 2)
    valid_second = torch.tensor([0.0, 1.0]).view(1, 1, 1, 1, 2)
    loss = LogitKDLoss(1.0)
    assert loss(student, teacher, valid_first).item() == pytest.approx(0.130812, abs=1e-5)
    assert loss(student, teacher, valid_second).item() == pytest.approx(0.0, abs=1e-7)
    nothing = loss(student, teacher, torch.zeros_like(valid_first))
    assert nothing.item() == 0.0
    loss(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_fp16_inputs_give_float32_and_shape_mismatch_raises():
    out = LogitKDLoss(2.0)(torch.randn(1, 3, 2, 2, 2).half(), torch.randn(1, 3, 2, 2, 2).half())
    assert out.dtype == torch.float32 and torch.isfinite(out)
    with pytest.raises(ValueError, match=r"\(1, 3, 2, 2, 2\).*\(1, 2, 2, 2, 2\)"):
        LogitKDLoss()(torch.zeros(1, 3, 2, 2, 2), torch.zeros(1, 2, 2, 2, 2))
    with pytest.raises(ValueError, match="temperature"):
        LogitKDLoss(0.0)


def _row(*voxels):  # (B=1, C, 1, 1, V): one column of logits per voxel
    return torch.tensor(voxels, dtype=torch.float32).T.reshape(1, -1, 1, 1, len(voxels))


def test_class_balanced_kl_weighs_each_teacher_class_equally():
    # teacher argmax: voxels 0, 1 class 0, voxel 2 class 1. Voxel KLs: 0.130812 (p_t [0.75, 0.25] vs [0.5, 0.5]),
    # 0 (equal), 0.130812 ([0.25, 0.75] vs [0.5, 0.5]). Per class: 0.065406 and 0.130812; their mean 0.098109.
    # Hinton's mean over voxels would be 0.087208.
    student = _row([0.0, 0.0], [math.log(3), 0.0], [0.0, 0.0])
    teacher = _row([math.log(3), 0.0], [math.log(3), 0.0], [0.0, math.log(3)])
    assert ClassBalancedLogitKDLoss(1.0)(student, teacher).item() == pytest.approx(0.098109, abs=1e-5)
    assert LogitKDLoss(1.0)(student, teacher).item() == pytest.approx(0.087208, abs=1e-5)
    # leaving voxel 2 out (not valid) leaves class 0 alone: 0.065406
    valid = torch.tensor([1.0, 1.0, 0.0]).view(1, 1, 1, 1, 3)
    assert ClassBalancedLogitKDLoss(1.0)(student, teacher, valid).item() == pytest.approx(0.065406, abs=1e-5)
    # no valid voxel: a finite zero with a gradient path
    s = student.clone().requires_grad_(True)
    nothing = ClassBalancedLogitKDLoss(1.0)(s, teacher, torch.zeros_like(valid))
    assert nothing.item() == 0.0 and nothing.requires_grad


def test_channel_wise_kd_hand_computed_and_invariant_to_a_constant_per_channel():
    # channel 0: teacher's spatial softmax over 2 positions of [ln 3, 0] = [0.75, 0.25], student's of [0, 0] =
    # [0.5, 0.5]: KL 0.130812; channel 1 equal in both: 0. Mean over (sample, channel): 0.065406.
    student = _row([0.0, 1.0], [0.0, 1.0])
    teacher = _row([math.log(3), 0.0], [0.0, 0.0])
    assert ChannelWiseKDLoss(1.0)(student, teacher).item() == pytest.approx(0.065406, abs=1e-5)
    # T = 2 on logits twice as large: the same distributions, times T^2
    assert ChannelWiseKDLoss(2.0)(2 * student, 2 * teacher).item() == pytest.approx(4 * 0.065406, abs=1e-4)
    # a constant added to a channel everywhere leaves its spatial distribution unchanged
    z = torch.randn(2, 3, 3, 4, 5)
    assert ChannelWiseKDLoss(1.0)(z + torch.tensor([1.0, -2.0, 5.0]).view(1, 3, 1, 1, 1), z).item() == \
        pytest.approx(0.0, abs=1e-6)


def test_channel_wise_kd_leaves_invalid_positions_out():
    # position 2 is invalid: channel 0 is [ln 3, 0] vs [0, 0] on the two valid positions (0.130812), whatever
    # position 2 holds; channel 1 equal; sample 1 has no valid position and is left out of the mean
    student = torch.cat([_row([0.0, 0.0], [0.0, 0.0], [-5.0, 3.0]), torch.zeros(1, 2, 1, 1, 3)])
    teacher = torch.cat([_row([math.log(3), 0.0], [0.0, 0.0], [5.0, -3.0]), torch.randn(1, 2, 1, 1, 3)])
    valid = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]).view(2, 1, 1, 1, 3)
    s = student.clone().requires_grad_(True)
    loss = ChannelWiseKDLoss(1.0)(s, teacher, valid)
    assert loss.item() == pytest.approx(0.065406, abs=1e-5)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad[1].abs().sum() == 0 and s.grad[0, :, ..., 2].abs().sum() == 0
    nothing = ChannelWiseKDLoss(1.0)(student, teacher, torch.zeros_like(valid))
    assert nothing.item() == 0.0


def test_ensemble_of_identical_teachers_equals_one_teacher_in_every_form():
    student, teacher = torch.randn(2, 3, 3, 4, 5), torch.randn(2, 3, 3, 4, 5)
    for loss in (ClassBalancedLogitKDLoss(2.0), ChannelWiseKDLoss(2.0)):
        assert loss(student, [teacher, teacher], weights=[0.3, 0.7]).item() == \
            pytest.approx(loss(student, teacher).item(), rel=1e-5)


def test_make_logit_loss_forms_and_errors():
    assert type(make_logit_loss("hinton", 2.0)) is LogitKDLoss
    assert make_logit_loss("hinton", 2.0, sigmoid=True).sigmoid
    assert isinstance(make_logit_loss("class_balanced", 2.0), ClassBalancedLogitKDLoss)
    assert isinstance(make_logit_loss("cwd", 1.0, sigmoid=True), ChannelWiseKDLoss)
    with pytest.raises(ValueError, match="region-based"):
        make_logit_loss("class_balanced", 2.0, sigmoid=True)
    with pytest.raises(ValueError, match="valid forms: hinton, class_balanced, cwd"):
        make_logit_loss("dice", 2.0)


def test_onehot_logits_of_the_oracle():
    target = torch.tensor([0, 2, 1, -1]).view(1, 1, 1, 1, 4)
    z = onehot_logits(target, 3, 5.0)
    assert z.shape == (1, 3, 1, 1, 4) and z.dtype == torch.float32
    assert z[0, :, 0, 0].T.tolist() == [[5.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 5.0, 0.0], [0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="label map"):
        onehot_logits(torch.zeros(1, 2, 1, 1, 4), 3, 5.0)
