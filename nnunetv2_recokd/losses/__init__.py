"""Pure-tensor distillation losses; nothing here imports nnU-Net."""

from nnunetv2_recokd.losses.context import ContextAlignmentLoss, GlobalContextBlock
from nnunetv2_recokd.losses.graph import RegionGraphLoss, extract_regions
from nnunetv2_recokd.losses.logits import LogitKDLoss
from nnunetv2_recokd.losses.masks import region_masks
from nnunetv2_recokd.losses.sard import SARDLoss

__all__ = [
    "ContextAlignmentLoss",
    "GlobalContextBlock",
    "LogitKDLoss",
    "RegionGraphLoss",
    "SARDLoss",
    "extract_regions",
    "region_masks",
]
