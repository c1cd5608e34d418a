"""Pure-tensor distillation losses; nothing here imports nnU-Net.

``ReCoStageLoss`` is the module of one ReCo-KD stage (adapter, MS-SARD, MS-CA); ``sard_direct`` and
``context_alignment_direct`` are the direct transcriptions of its formulas, for tests and the benchmark.
"""

from nnunetv2_recokd.losses.context import GlobalContextBlock, context_alignment_direct
from nnunetv2_recokd.losses.graph import RegionGraphLoss, extract_regions
from nnunetv2_recokd.losses.logits import LogitKDLoss
from nnunetv2_recokd.losses.masks import region_masks
from nnunetv2_recokd.losses.reco import ReCoStageLoss
from nnunetv2_recokd.losses.sard import SARDConfig, attention_from_means, sard_direct

__all__ = [
    "GlobalContextBlock",
    "LogitKDLoss",
    "ReCoStageLoss",
    "RegionGraphLoss",
    "SARDConfig",
    "attention_from_means",
    "context_alignment_direct",
    "extract_regions",
    "region_masks",
    "sard_direct",
]
