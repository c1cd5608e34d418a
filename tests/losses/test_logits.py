"""Logit distillation against values computed by hand."""

import math

import pytest
import torch

from nnunetv2_recokd.losses.logits import LogitKDLoss


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
