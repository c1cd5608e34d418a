"""Tests of MS-SARD at one stage: the direct formula (sard_direct) and the stage module (ReCoStageLoss) on
hand-computed values, SARDConfig's validation."""

from __future__ import annotations

import math

import pytest
import torch

from nnunetv2_recokd.losses import ReCoStageLoss, SARDConfig, region_masks, sard_direct

PATHS = pytest.mark.parametrize("path", ["direct", "stage"])


def _sard(path, student, teacher, mask_fg, mask_bg, config=SARDConfig()):
    """sard_direct, or the stage module with an identity adapter (so its input is the adapted feature)."""
    if path == "direct":
        return sard_direct(student, teacher, mask_fg, mask_bg, config)
    channels, conv_dim = student.shape[1], student.ndim - 2
    stage = ReCoStageLoss(channels, channels, conv_dim, sard=config)
    with torch.no_grad():
        stage.adapter.weight.copy_(torch.eye(channels).reshape(channels, channels, *[1] * conv_dim))
        stage.adapter.bias.zero_()
    return stage(student, teacher, mask_fg, mask_bg)


def _corner_target() -> torch.Tensor:
    """(1, 1, 4, 4, 4): class 1 on the 2x2x2 corner (8 voxels), background on the other 56 voxels."""
    target = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    target[0, 0, :2, :2, :2] = 1
    return target


def _reference_sard(student, teacher, mask_fg, mask_bg, temperature):
    """Slow, literal transcription of METHOD.md's MS-SARD formulas (no channel contraction trick)."""
    batch, channels = student.shape[:2]
    fs, ft = student.double().reshape(batch, channels, -1), teacher.double().reshape(batch, channels, -1)
    m_fg, m_bg = mask_fg.double().reshape(batch, 1, -1), mask_bg.double().reshape(batch, 1, -1)
    voxels = fs.shape[2]

    def attention(f):
        spatial = voxels * torch.softmax(f.abs().mean(1, keepdim=True) / temperature, dim=2)  # (B, 1, V)
        channel = channels * torch.softmax(f.abs().mean(2, keepdim=True) / temperature, dim=1)  # (B, C, 1)
        return spatial, channel

    s_t, ch_t = attention(ft)
    s_s, ch_s = attention(fs)
    sq = (fs - ft) ** 2
    fg = (m_fg * s_t * ch_t * sq).sum() / (channels * m_fg.sum())
    bg = (m_bg * s_t * ch_t * sq).sum() / (channels * m_bg.sum())
    att = (ch_s - ch_t).abs().mean() + (s_s - s_t).abs().mean()
    return fg, bg, att


@PATHS
def test_uniform_attention_by_hand(path):
    # Teacher F_t = 1 everywhere (B=1, C=2, 4x4x4): mean_c |F_t| = 1 at every voxel -> softmax uniform -> S_t = 1;
    # mean_v |F_t| = 1 for both channels -> Ch_t = 1. The student flips some signs (|F_s| = 1 too, so S_s = Ch_s = 1
    # and L_att = 0) which makes d = F_s - F_t = -2 there, d^2 = 4, and 0 elsewhere.
    teacher = torch.ones(1, 2, 4, 4, 4)
    student = teacher.clone()
    student[0, 0, 0, :2, 0] = -1  # 2 foreground voxels, channel 0 ...
    student[0, 1, 1, 0, :2] = -1  # ... and 2 more foreground voxels, channel 1
    student[0, 1, 3, :, :] = -1  # 16 background voxels, channel 1
    mask_fg, mask_bg = region_masks(_corner_target())
    losses = _sard(path, student, teacher, mask_fg, mask_bg, SARDConfig(temperature=0.5))
    # L_fg = sum M_fg * 1 * 1 * d^2 / (C * sum M_fg) = (4 elements * 1/8 * 4) / (2 * 1) = 1.0
    # L_bg = (16 elements * 1/56 * 4) / (2 * 1) = 64/112 = 4/7
    assert losses["fg"].item() == pytest.approx(1.0, abs=1e-6)
    assert losses["bg"].item() == pytest.approx(4 / 7, abs=1e-6)
    assert losses["att"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["sard"].item() == pytest.approx(1.0 + 4 / 7, abs=1e-6)

    weighted = _sard(path, student, teacher, mask_fg, mask_bg,
                     SARDConfig(temperature=0.5, fg_weight=2.0, bg_weight=3.0, att_weight=5.0))
    assert weighted["sard"].item() == pytest.approx(2.0 + 12 / 7, abs=1e-6)


# Non-uniform teacher attention, T = 0.5. Teacher: (x, x) on the 8 foreground voxels, (z, 0) on the 56 background
# voxels, with x = 1.5 ln 2 + (2/7) ln 3 ~= 1.353610 and z = (4/7) ln 3 ~= 0.627778.
#   spatial: mean_c |F_t| / T = 2x = 3 ln 2 + (4/7) ln 3 (fg) and z = (4/7) ln 3 (bg) -> exp ratio fg:bg = 8:1
#            softmax = 8/120 (fg), 1/120 (bg) -> S_t = 64 * that = 64/15 ~= 4.266667 (fg), 8/15 ~= 0.533333 (bg)
#   channel: mean_v |F_t0| - mean_v |F_t1| = 56 z / 64 = 0.5 ln 3 -> /T = ln 3 -> softmax (3/4, 1/4)
#            -> Ch_t = 2 * (3/4, 1/4) = (1.5, 0.5)
_X = 1.5 * math.log(2) + (2 / 7) * math.log(3)
_Z = (4 / 7) * math.log(3)


def _non_uniform_teacher() -> torch.Tensor:
    teacher = torch.zeros(1, 2, 4, 4, 4)
    teacher[0, 0] = _Z
    teacher[0, :, :2, :2, :2] = _X
    return teacher


@PATHS
def test_non_uniform_attention_sign_flipped_student_by_hand(path):
    # Student = -teacher: same |F| -> same attention -> L_att = 0; d = -2 F_t, d^2 = 4 F_t^2.
    #   fg voxel: Ch_t . d^2 = 1.5 * 4x^2 + 0.5 * 4x^2 = 8x^2; * S_t (64/15) * M_fg (1/8), 8 voxels, / (C=2 * 1)
    #             -> L_fg = (64/15) * 8x^2 / 2 = 256 x^2 / 15 ~= 31.270571
    #   bg voxel: 1.5 * 4z^2 + 0.5 * 0 = 6z^2; * 8/15, mask sums to 1, / 2 -> L_bg = 24 z^2 / 15 = 1.6 z^2 ~= 0.630569
    teacher = _non_uniform_teacher()
    mask_fg, mask_bg = region_masks(_corner_target())
    losses = _sard(path, -teacher, teacher, mask_fg, mask_bg, SARDConfig(temperature=0.5))
    assert losses["fg"].item() == pytest.approx(256 * _X**2 / 15, rel=1e-5)
    assert losses["fg"].item() == pytest.approx(31.270571, abs=1e-4)
    assert losses["bg"].item() == pytest.approx(1.6 * _Z**2, rel=1e-5)
    assert losses["bg"].item() == pytest.approx(0.630569, abs=1e-5)
    assert losses["att"].item() == pytest.approx(0.0, abs=1e-5)


@PATHS
def test_non_uniform_attention_uniform_student_by_hand(path):
    # Student = 1 everywhere: S_s = 1, Ch_s = 1.
    #   L_att = mean|Ch_s - Ch_t| + mean|S_s - S_t| = (0.5 + 0.5)/2 + (8 * 49/15 + 56 * 7/15) / 64
    #         = 0.5 + (784/15) / 64 = 0.5 + 49/60 = 79/60 ~= 1.316667
    #   L_fg: d = (1 - x, 1 - x) -> Ch_t . d^2 = 2 (1 - x)^2
    #         -> L_fg = (64/15) * 2 (1 - x)^2 / 2 = (64/15)(1 - x)^2 ~= 0.533504
    #   L_bg: d = (1 - z, 1) -> Ch_t . d^2 = 1.5 (1 - z)^2 + 0.5
    #         -> L_bg = (8/15) * (1.5 (1 - z)^2 + 0.5) / 2 ~= 0.188753
    teacher = _non_uniform_teacher()
    student = torch.ones_like(teacher)
    mask_fg, mask_bg = region_masks(_corner_target())
    losses = _sard(path, student, teacher, mask_fg, mask_bg, SARDConfig(temperature=0.5))
    assert losses["att"].item() == pytest.approx(79 / 60, rel=1e-5)
    assert losses["fg"].item() == pytest.approx(64 / 15 * (1 - _X) ** 2, rel=1e-5)
    assert losses["fg"].item() == pytest.approx(0.533504, abs=1e-5)
    assert losses["bg"].item() == pytest.approx(8 / 15 * (1.5 * (1 - _Z) ** 2 + 0.5) / 2, rel=1e-5)
    assert losses["bg"].item() == pytest.approx(0.188753, abs=1e-5)
    assert losses["sard"].item() == pytest.approx(
        79 / 60 + 64 / 15 * (1 - _X) ** 2 + 4 / 15 * (1.5 * (1 - _Z) ** 2 + 0.5), rel=1e-5
    )
    # weights 2, 3, 5: 2 * 0.533504 + 3 * 0.188753 + 5 * 79/60 ~= 8.216600
    weighted = _sard(path, student, teacher, mask_fg, mask_bg,
                     SARDConfig(temperature=0.5, fg_weight=2.0, bg_weight=3.0, att_weight=5.0))
    assert weighted["sard"].item() == pytest.approx(
        5 * 79 / 60 + 2 * 64 / 15 * (1 - _X) ** 2 + 3 * 4 / 15 * (1.5 * (1 - _Z) ** 2 + 0.5), rel=1e-5
    )


@PATHS
@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_matches_literal_reference_in_value_and_gradient(temperature, path):
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 5, 6, 7)
    student = torch.randn(2, 5, 5, 6, 7, requires_grad=True)
    mask_fg, mask_bg = region_masks(torch.randint(0, 4, (2, 1, 5, 6, 7)))
    config = SARDConfig(temperature, fg_weight=0.3, bg_weight=0.7, att_weight=1.9)
    losses = _sard(path, student, teacher, mask_fg, mask_bg, config)
    fg, bg, att = _reference_sard(student, teacher, mask_fg, mask_bg, temperature)
    assert losses["fg"].item() == pytest.approx(fg.item(), rel=1e-5)
    assert losses["bg"].item() == pytest.approx(bg.item(), rel=1e-5)
    assert losses["att"].item() == pytest.approx(att.item(), rel=1e-5)
    (grad,) = torch.autograd.grad(losses["sard"], student)
    (grad_ref,) = torch.autograd.grad(0.3 * fg + 0.7 * bg + 1.9 * att, student)
    assert torch.allclose(grad.double(), grad_ref.double(), atol=1e-6, rtol=1e-4)
    assert grad.abs().max().item() > 1e-4


@PATHS
def test_student_equal_teacher_gives_zero(path):
    torch.manual_seed(1)
    teacher = torch.randn(2, 4, 6, 6, 6)
    mask_fg, mask_bg = region_masks(torch.randint(0, 3, (2, 1, 6, 6, 6)))
    losses = _sard(path, teacher.clone(), teacher, mask_fg, mask_bg)
    for key in ("fg", "bg", "att", "sard"):
        assert losses[key].item() == 0.0, key


@PATHS
def test_background_only_patch_has_finite_zero_fg_with_graph(path):
    torch.manual_seed(2)
    student = torch.randn(1, 3, 4, 4, 4, requires_grad=True)
    teacher = torch.randn(1, 3, 4, 4, 4)
    mask_fg, mask_bg = region_masks(torch.zeros(1, 1, 4, 4, 4))
    losses = _sard(path, student, teacher, mask_fg, mask_bg)
    assert losses["fg"].item() == 0.0
    assert losses["fg"].requires_grad  # a 0 that is part of the graph, not a detached constant
    assert losses["bg"].item() > 0.1
    losses["sard"].backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum().item() > 0


@PATHS
def test_all_ignore_patch_is_finite(path):
    torch.manual_seed(3)
    student = torch.randn(1, 3, 4, 4, 4, requires_grad=True)
    teacher = torch.randn(1, 3, 4, 4, 4)
    mask_fg, mask_bg = region_masks(torch.full((1, 1, 4, 4, 4), 7), ignore_label=7)
    losses = _sard(path, student, teacher, mask_fg, mask_bg)
    assert losses["fg"].item() == 0.0 and losses["bg"].item() == 0.0
    assert losses["fg"].requires_grad and losses["bg"].requires_grad
    assert math.isfinite(losses["att"].item()) and losses["att"].item() > 0
    losses["sard"].backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@PATHS
def test_low_precision_inputs_give_float32_loss(dtype, path):
    torch.manual_seed(4)
    student = torch.randn(2, 4, 5, 5, 5).to(dtype)
    teacher = torch.randn(2, 4, 5, 5, 5).to(dtype)
    mask_fg, mask_bg = region_masks(torch.randint(0, 3, (2, 1, 5, 5, 5)))
    losses = _sard(path, student, teacher, mask_fg.to(dtype), mask_bg.to(dtype))
    expected = sard_direct(student.float(), teacher.float(), mask_fg, mask_bg)
    for key in ("fg", "bg", "att", "sard"):
        assert losses[key].dtype == torch.float32 and losses[key].ndim == 0
        assert torch.isfinite(losses[key])
        # Masks like 1/56 are not exact in half precision; the features are the same values.
        assert losses[key].item() == pytest.approx(expected[key].item(), rel=1e-2)


@PATHS
def test_runs_in_float32_under_autocast(path):
    torch.manual_seed(5)
    student, teacher = torch.randn(2, 8, 6, 6, 6), torch.randn(2, 8, 6, 6, 6)
    mask_fg, mask_bg = region_masks(torch.randint(0, 3, (2, 1, 6, 6, 6)))
    expected = sard_direct(student, teacher, mask_fg, mask_bg)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        losses = _sard(path, student, teacher, mask_fg, mask_bg)
    for key in ("fg", "bg", "att", "sard"):
        assert losses[key].dtype == torch.float32
        assert losses[key].item() == pytest.approx(expected[key].item(), rel=1e-6)


def test_gradient_reaches_student_and_adapter_but_not_teacher():
    torch.manual_seed(6)
    adapter = torch.nn.Conv3d(3, 5, kernel_size=1)
    raw_student = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 5, 4, 4, 4)
    mask_fg, mask_bg = region_masks(torch.randint(0, 2, (2, 1, 4, 4, 4)))
    losses = sard_direct(adapter(raw_student), teacher, mask_fg, mask_bg)
    losses["sard"].backward()
    assert raw_student.grad.abs().sum().item() > 0
    assert adapter.weight.grad.abs().sum().item() > 0
    assert teacher.grad is None


@PATHS
def test_teacher_feature_is_detached_even_if_it_requires_grad(path):
    # A teacher run outside no_grad must still receive no gradient from the distillation loss.
    torch.manual_seed(7)
    student = torch.randn(1, 3, 4, 4, 4, requires_grad=True)
    teacher = torch.randn(1, 3, 4, 4, 4, requires_grad=True)
    mask_fg, mask_bg = region_masks(torch.randint(0, 2, (1, 1, 4, 4, 4)))
    _sard(path, student, teacher, mask_fg, mask_bg)["sard"].backward()
    assert teacher.grad is None
    assert student.grad.abs().sum().item() > 0


@PATHS
def test_two_dimensional_features(path):
    # Uniform teacher as in the 4x4x4 case, now 2D (B=1, C=2, 4x4): fg = 2 voxels (1/2 each), bg = 14 (1/14 each).
    target = torch.zeros(1, 1, 4, 4)
    target[0, 0, 0, :2] = 1
    teacher = torch.ones(1, 2, 4, 4)
    student = teacher.clone()
    student[0, 0, 0, 0] = -1  # one fg element, d^2 = 4 -> L_fg = 4 * 1/2 / (2 * 1) = 1.0
    losses = _sard(path, student, teacher, *region_masks(target))
    assert losses["fg"].item() == pytest.approx(1.0, abs=1e-6)
    assert losses["bg"].item() == 0.0


def test_shape_mismatch_raises_with_both_shapes():
    loss = sard_direct
    mask = torch.zeros(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match=r"\(1, 3, 4, 4, 4\).*\(1, 2, 4, 4, 4\)"):
        loss(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4), mask, mask)
    with pytest.raises(ValueError, match=r"mask_bg.*\(1, 1, 4, 4, 4\).*\(1, 1, 4, 4, 3\)"):
        loss(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4), mask, torch.zeros(1, 1, 4, 4, 3))
    with pytest.raises(ValueError, match=r"mask_fg.*\(1, 3, 4, 4, 4\)"):
        loss(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4), mask)


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": 0.0}, {"temperature": -1.0}, {"temperature": float("nan")}, {"fg_weight": -0.1},
     {"bg_weight": -1.0}, {"att_weight": float("inf")}],
)
def test_invalid_options_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SARDConfig(**kwargs)


def test_config_is_frozen_and_keeps_the_authors_defaults():
    config = SARDConfig()
    assert (config.temperature, config.fg_weight, config.bg_weight, config.att_weight) == (0.5, 1.0, 1.0, 1.0)
    with pytest.raises(AttributeError):
        config.temperature = 1.0
