"""ReCo-KD (Region- and Context-aware KD, arXiv 2601.08301): MS-SARD + MS-CA on the encoder stages
that have deep-supervision targets, stage weights (2^(-3 alpha))^k, lambda warmed up linearly.

Each class is a name users type after -tr; what differs between them is only its defaults file,
trainer_configs/<class name>.json (width, which terms, which stages). The ablations reproduce the
paper's ablation table on a user's own data.
"""

from nnunetv2_recokd.trainers.base import nnUNetTrainerDistillBase


class nnUNetTrainerReCoKD(nnUNetTrainerDistillBase):
    """Width-1/4 student, MS-SARD + MS-CA over all encoder stages with deep-supervision targets."""


class nnUNetTrainerReCoKD_w2(nnUNetTrainerReCoKD):
    """Width-1/2 student (compare with nnUNetTrainerStudent_w2)."""


class nnUNetTrainerReCoKD_w8(nnUNetTrainerReCoKD):
    """Width-1/8 student (compare with nnUNetTrainerStudent_w8)."""


class nnUNetTrainerReCoKD_noSARD(nnUNetTrainerReCoKD):
    """Ablation: context alignment (MS-CA) only."""


class nnUNetTrainerReCoKD_noCA(nnUNetTrainerReCoKD):
    """Ablation: region distillation (MS-SARD) only."""


class nnUNetTrainerReCoKD_singleScale(nnUNetTrainerReCoKD):
    """Ablation: the highest-resolution encoder stage only."""
