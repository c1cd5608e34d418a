"""Class-aware, size-normalised foreground/background masks for region distillation.

ReCo-KD (arXiv 2601.08301), MS-SARD step 1, extending FGD (Yang et al., CVPR 2022) to 3D segmentation:
every present foreground class gets total weight 1 whatever its size, so small structures count as much
as large ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["region_masks"]


def region_masks(
    target: Tensor, ignore_label: int | None = None, has_regions: bool = False, num_classes: int | None = None
) -> tuple[Tensor, Tensor]:
    """Build the size-normalised foreground and background masks of one deep-supervision stage.

    Label maps: ``M_fg(b, v) = sum_c 1[y(b, v) = c] / N_{b,c}`` over the foreground classes ``c > 0`` present in
    sample ``b``, and ``M_bg(b, v) = 1[y(b, v) = 0] / N_{b,0}``. Region-based targets:
    ``M_fg(b, v) = max_r 1[y_r(b, v)] / N_{b,r}`` and the background is every voxel in no region.
    Voxels carrying the ignore label are excluded from both masks and from every count. An empty class adds
    nothing; an all-ignore or class-free sample gives zeros, never NaN.

    Cost is O(voxels): label maps are counted with one ``bincount`` over ``(sample, label)`` bins and the
    per-voxel weight is gathered back, so no ``(B, num_classes, *spatial)`` one-hot is built.

    Args:
        target: nnU-Net target at one stage. Label map: ``(B, 1, *spatial)`` of any dtype (floats are rounded).
            Region-based: ``(B, R, *spatial)`` binary channels; with ``ignore_label`` set, the last channel is
            nnU-Net's ignore mask and the regions are channels ``[:-1]``.
        ignore_label: the dataset's ignore label, or ``None``. In region mode only its presence matters.
        has_regions: whether ``target`` is region-based (multi-channel binary) rather than a label map.
        num_classes: number of labels (max label + 1) when known, e.g. from the dataset: skips the host sync
            that otherwise measures it (labels must then lie in ``[0, num_classes)`` besides the ignore label).

    Returns:
        ``(mask_fg, mask_bg)``, both float32 of shape ``(B, 1, *spatial)`` on ``target``'s device.

    Raises:
        ValueError: if ``target`` has fewer than 3 dimensions, a label map has more than one channel, a region
            target with an ignore channel has no other channel, or a label map holds negative labels that are
            not the ignore label.
    """
    if target.ndim < 3:
        raise ValueError(f"target must have shape (B, C, *spatial), got {tuple(target.shape)}")
    if has_regions:
        return _region_target_masks(target, ignore_label is not None)
    if target.shape[1] != 1:
        raise ValueError(
            f"a label-map target must have shape (B, 1, *spatial), got {tuple(target.shape)}; "
            "pass has_regions=True for region-based (multi-channel) targets"
        )
    return _label_map_masks(target, ignore_label, num_classes)


def _label_map_masks(target: Tensor, ignore_label: int | None, num_classes: int | None) -> tuple[Tensor, Tensor]:
    batch, spatial = target.shape[0], target.shape[2:]
    labels = target[:, 0]
    if labels.is_floating_point():
        labels = labels.round()
    labels = labels.long().reshape(batch, -1)  # (B, V)
    mask_shape = (batch, 1, *spatial)
    if labels.numel() == 0:
        empty = torch.zeros(mask_shape, dtype=torch.float32, device=target.device)
        return empty, empty.clone()

    valid = labels != ignore_label if ignore_label is not None else torch.ones_like(labels, dtype=torch.bool)
    if num_classes is None:
        # One host sync to size the bins; ignored voxels must not influence the range check.
        low, high = torch.stack(torch.aminmax(labels.masked_fill(~valid, 0))).tolist()
        if low < 0:
            raise ValueError(f"label maps must hold non-negative labels (besides the ignore label), found {low}")
        num_bins = high + 1
    else:  # known from the dataset: no host sync in the training loop
        num_bins = num_classes

    # Bin index b * num_bins + y; ignored voxels go to one extra trash bin whose weight is forced to 0.
    trash_bin = batch * num_bins
    offsets = torch.arange(batch, device=labels.device).unsqueeze(1) * num_bins
    bins = (labels + offsets).masked_fill_(~valid, trash_bin)
    flat_bins = bins.reshape(-1)  # scatter_add rather than bincount, which syncs with the host on CUDA
    counts = torch.zeros(trash_bin + 1, dtype=torch.float32, device=labels.device)
    counts.scatter_add_(0, flat_bins, torch.ones_like(flat_bins, dtype=torch.float32))
    inverse = torch.where(counts > 0, 1.0 / counts.clamp_min(1), 0.0)
    inverse[trash_bin] = 0.0
    weights = inverse[bins]  # (B, V): 1 / N of the voxel's own class, 0 where ignored

    mask_fg = torch.where(labels > 0, weights, 0.0).reshape(mask_shape)
    mask_bg = torch.where(labels == 0, weights, 0.0).reshape(mask_shape)
    return mask_fg, mask_bg


def _region_target_masks(target: Tensor, has_ignore_channel: bool) -> tuple[Tensor, Tensor]:
    batch, spatial = target.shape[0], target.shape[2:]
    mask_shape = (batch, 1, *spatial)
    if has_ignore_channel:
        if target.shape[1] < 2:
            raise ValueError(
                "a region target with an ignore channel needs at least one region channel before it, "
                f"got {tuple(target.shape)}"
            )
        valid = (target[:, -1:] <= 0.5).reshape(batch, -1)  # nnU-Net: last channel == 1 marks ignored voxels
        regions = target[:, :-1]
    else:
        valid = torch.ones((batch, target[0, 0].numel()), dtype=torch.bool, device=target.device)
        regions = target

    mask_fg = torch.zeros(valid.shape, dtype=torch.float32, device=target.device)
    in_any_region = torch.zeros_like(valid)
    # Regions are few (typically <= 4); looping keeps memory at O(voxels) instead of O(R * voxels).
    for channel in range(regions.shape[1]):
        active = (regions[:, channel] > 0.5).reshape(batch, -1) & valid
        count = active.sum(dim=1, keepdim=True)  # (B, 1)
        inverse = torch.where(count > 0, 1.0 / count.clamp_min(1).to(torch.float32), 0.0)
        mask_fg = torch.maximum(mask_fg, active * inverse)
        in_any_region |= active

    background = valid & ~in_any_region
    count_bg = background.sum(dim=1, keepdim=True)
    inverse_bg = torch.where(count_bg > 0, 1.0 / count_bg.clamp_min(1).to(torch.float32), 0.0)
    mask_bg = background * inverse_bg
    return mask_fg.reshape(mask_shape), mask_bg.reshape(mask_shape)
