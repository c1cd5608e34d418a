"""REACT-KD's region-graph distillation (RGD) for segmentation: nodes are ground-truth regions (one per
present class, one per connected component of lesion classes), node features by masked average
pooling, node + edge + Gromov-Wasserstein terms. Defaults: trainer_configs/<class name>.json.
"""

from nnunetv2_recokd.trainers.base import nnUNetTrainerDistillBase
from nnunetv2_recokd.trainers.recokd import nnUNetTrainerReCoKD


class nnUNetTrainerReCoKDGraph(nnUNetTrainerReCoKD):
    """ReCo-KD plus region-graph distillation on decoder stages dec0 and dec1."""


class nnUNetTrainerGraphKD(nnUNetTrainerDistillBase):
    """Region-graph distillation alone (with nnU-Net's segmentation loss), for ablation."""
