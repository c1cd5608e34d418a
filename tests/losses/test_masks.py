"""Tests for nnunetv2_recokd.losses.masks.region_masks."""

from __future__ import annotations

import pytest
import torch

from nnunetv2_recokd.losses import region_masks


def _corner_label_map(dtype: torch.dtype = torch.long) -> torch.Tensor:
    """(1, 1, 4, 4, 4): class 1 on the 2x2x2 corner (8 voxels), background on the other 56."""
    target = torch.zeros(1, 1, 4, 4, 4, dtype=dtype)
    target[0, 0, :2, :2, :2] = 1
    return target


def test_two_class_4x4x4_by_hand():
    mask_fg, mask_bg = region_masks(_corner_label_map())
    assert mask_fg.shape == (1, 1, 4, 4, 4) and mask_bg.shape == (1, 1, 4, 4, 4)
    assert mask_fg.dtype == torch.float32 and mask_bg.dtype == torch.float32
    # Class 1 has N_1 = 8 voxels -> 1/8 = 0.125 each; background N_0 = 64 - 8 = 56 -> 1/56 each.
    assert torch.all(mask_fg[0, 0, :2, :2, :2] == 0.125)
    assert mask_fg.sum().item() == pytest.approx(1.0)
    assert torch.count_nonzero(mask_fg).item() == 8
    assert mask_bg[0, 0, 3, 3, 3].item() == pytest.approx(1 / 56)
    assert mask_bg[0, 0, 0, 0, 0].item() == 0.0
    assert torch.count_nonzero(mask_bg).item() == 56
    assert mask_bg.sum().item() == pytest.approx(1.0)


def test_size_normalisation_small_and_large_class_each_weigh_one():
    # 10x10x10 = 1000 voxels: class 1 = 8 voxels (2x2x2), class 2 = 800 voxels (slices 2..9), background 192.
    target = torch.zeros(1, 1, 10, 10, 10)
    target[0, 0, 2:] = 2
    target[0, 0, :2, :2, :2] = 1
    mask_fg, mask_bg = region_masks(target)
    labels = target[0, 0]
    assert (labels == 2).sum().item() == 800 and (labels == 0).sum().item() == 192
    assert mask_fg[0, 0][labels == 1].sum().item() == pytest.approx(1.0)
    assert mask_fg[0, 0][labels == 2].sum().item() == pytest.approx(1.0)
    assert mask_fg[0, 0, 0, 0, 0].item() == pytest.approx(1 / 8)
    assert mask_fg[0, 0, 5, 5, 5].item() == pytest.approx(1 / 800)
    assert mask_fg.sum().item() == pytest.approx(2.0)
    assert mask_bg[0, 0, 0, 9, 9].item() == pytest.approx(1 / 192)
    assert mask_bg.sum().item() == pytest.approx(1.0)


def test_counts_are_per_sample():
    target = torch.zeros(2, 1, 4, 4, 4, dtype=torch.int16)
    target[0, 0, :2, :2, :2] = 1  # sample 0: N_1 = 8, N_0 = 56
    target[1, 0, 0, 0, :] = 1  # sample 1: N_1 = 4, N_0 = 60
    mask_fg, mask_bg = region_masks(target)
    assert mask_fg[0, 0, 0, 0, 0].item() == pytest.approx(1 / 8)
    assert mask_fg[1, 0, 0, 0, 0].item() == pytest.approx(1 / 4)
    assert mask_bg[0, 0, 3, 3, 3].item() == pytest.approx(1 / 56)
    assert mask_bg[1, 0, 3, 3, 3].item() == pytest.approx(1 / 60)
    assert mask_fg.flatten(1).sum(1).tolist() == pytest.approx([1.0, 1.0])


def test_float_targets_are_rounded():
    # nnU-Net may hand over float targets after resampling; 0.9999 must count as class 1, 0.0001 as background.
    target = _corner_label_map(torch.float32) * 0.9998 + 0.0001  # 0.9999 on class 1, 0.0001 elsewhere
    mask_fg, mask_bg = region_masks(target)
    assert torch.count_nonzero(mask_fg).item() == 8
    assert mask_fg.max().item() == pytest.approx(0.125)
    assert mask_bg.max().item() == pytest.approx(1 / 56)


def test_empty_classes_and_background_only_patch():
    # Labels {0, 3} only: classes 1 and 2 are absent and must not create NaN or weight.
    target = torch.zeros(1, 1, 4, 4, 4)
    target[0, 0, 0] = 3  # 16 voxels
    mask_fg, mask_bg = region_masks(target)
    assert torch.isfinite(mask_fg).all() and torch.isfinite(mask_bg).all()
    assert mask_fg[0, 0, 0, 0, 0].item() == pytest.approx(1 / 16)
    assert mask_fg.sum().item() == pytest.approx(1.0)
    assert mask_bg[0, 0, 1, 0, 0].item() == pytest.approx(1 / 48)

    mask_fg, mask_bg = region_masks(torch.zeros(2, 1, 4, 4, 4))
    assert mask_fg.abs().sum().item() == 0.0
    assert torch.allclose(mask_bg, torch.full_like(mask_bg, 1 / 64))


def test_ignore_label_is_excluded_from_masks_and_counts():
    target = _corner_label_map()
    target[0, 0, 0, 0, 0] = 4  # one class-1 voxel becomes ignore -> N_1 = 7
    target[0, 0, 3] = 4  # 16 background voxels become ignore -> N_0 = 56 - 16 = 40
    mask_fg, mask_bg = region_masks(target, ignore_label=4)
    assert mask_fg[0, 0, 0, 0, 0].item() == 0.0 and mask_bg[0, 0, 0, 0, 0].item() == 0.0
    assert mask_fg[0, 0, 1, 1, 1].item() == pytest.approx(1 / 7)
    assert mask_bg[0, 0, 2, 3, 3].item() == pytest.approx(1 / 40)
    assert mask_bg[0, 0, 3].abs().sum().item() == 0.0
    assert mask_fg.sum().item() == pytest.approx(1.0) and mask_bg.sum().item() == pytest.approx(1.0)


def test_all_ignore_patch_gives_zero_masks():
    target = torch.full((1, 1, 4, 4, 4), 2.0)
    mask_fg, mask_bg = region_masks(target, ignore_label=2)
    assert torch.isfinite(mask_fg).all() and torch.isfinite(mask_bg).all()
    assert mask_fg.abs().sum().item() == 0.0 and mask_bg.abs().sum().item() == 0.0


def test_regions_by_hand():
    # Two nested regions as in nnU-Net region training: A = 2x2x2 corner (8 voxels), B = 2 voxels inside A.
    target = torch.zeros(1, 2, 4, 4, 4)
    target[0, 0, :2, :2, :2] = 1
    target[0, 1, 0, 0, :2] = 1
    mask_fg, mask_bg = region_masks(target, has_regions=True)
    # Voxels in B: max(1/8, 1/2) = 0.5; voxels only in A: 1/8; background = 56 voxels in no region -> 1/56.
    assert mask_fg[0, 0, 0, 0, 0].item() == pytest.approx(0.5)
    assert mask_fg[0, 0, 0, 0, 1].item() == pytest.approx(0.5)
    assert mask_fg[0, 0, 1, 1, 1].item() == pytest.approx(0.125)
    assert mask_fg.sum().item() == pytest.approx(2 * 0.5 + 6 * 0.125)
    assert mask_bg[0, 0, 0, 0, 0].item() == 0.0
    assert mask_bg[0, 0, 3, 3, 3].item() == pytest.approx(1 / 56)
    assert mask_bg.sum().item() == pytest.approx(1.0)


def test_regions_with_ignore_channel_by_hand():
    # Channels: region A, region B, ignore mask (last, nnU-Net convention).
    target = torch.zeros(1, 3, 4, 4, 4)
    target[0, 0, :2, :2, :2] = 1  # A: 8 voxels
    target[0, 1, 3, 3, 3] = 1  # B: 1 voxel, but it is ignored below -> empty region
    target[0, 2, 0, 0, 0] = 1  # ignore one voxel of A -> N_A = 7
    target[0, 2, 3, 3, :] = 1  # ignore 4 more voxels (background and B) -> N_bg = 64 - 8 - 4 = 52
    mask_fg, mask_bg = region_masks(target, ignore_label=5, has_regions=True)
    assert mask_fg[0, 0, 0, 0, 0].item() == 0.0 and mask_bg[0, 0, 0, 0, 0].item() == 0.0
    assert mask_fg[0, 0, 1, 1, 1].item() == pytest.approx(1 / 7)
    assert mask_fg[0, 0, 3, 3, 3].item() == 0.0 and mask_bg[0, 0, 3, 3, 3].item() == 0.0
    assert mask_bg[0, 0, 2, 2, 2].item() == pytest.approx(1 / 52)
    assert mask_fg.sum().item() == pytest.approx(1.0) and mask_bg.sum().item() == pytest.approx(1.0)
    assert torch.isfinite(mask_fg).all() and torch.isfinite(mask_bg).all()


def test_regions_all_ignored_is_finite_zero():
    target = torch.zeros(1, 2, 3, 3, 3)
    target[:, 1] = 1
    mask_fg, mask_bg = region_masks(target, ignore_label=9, has_regions=True)
    assert mask_fg.abs().sum().item() == 0.0 and mask_bg.abs().sum().item() == 0.0


def test_two_dimensional_targets():
    target = torch.zeros(1, 1, 4, 4)
    target[0, 0, 0, :2] = 1
    mask_fg, mask_bg = region_masks(target)
    assert mask_fg.shape == (1, 1, 4, 4)
    assert mask_fg[0, 0, 0, 0].item() == pytest.approx(0.5)
    assert mask_bg[0, 0, 3, 3].item() == pytest.approx(1 / 14)


def test_invalid_targets_raise():
    with pytest.raises(ValueError, match="has_regions"):
        region_masks(torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="non-negative"):
        region_masks(torch.full((1, 1, 2, 2, 2), -1))
    with pytest.raises(ValueError, match=r"\(B, C, \*spatial\)"):
        region_masks(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="ignore channel"):
        region_masks(torch.zeros(1, 1, 2, 2, 2), ignore_label=1, has_regions=True)
    # A negative ignore label is fine: those voxels are simply ignored.
    mask_fg, _ = region_masks(torch.tensor([[[[1, -1]]]]), ignore_label=-1)
    assert mask_fg.flatten().tolist() == [1.0, 0.0]
