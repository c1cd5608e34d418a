"""The public trainers: each class name is what a user types after ``nnUNetv2_train ... -tr``."""

from nnunetv2_recokd.trainers.attention import nnUNetTrainerReCoKD_CBAM
from nnunetv2_recokd.trainers.base import nnUNetTrainerDistillBase
from nnunetv2_recokd.trainers.baselines import (
    nnUNetTrainerLogitKD,
    nnUNetTrainerLogitKD_CB,
    nnUNetTrainerLogitKD_CWD,
    nnUNetTrainerStudent,
    nnUNetTrainerStudent_w2,
    nnUNetTrainerStudent_w8,
    nnUNetTrainerTeacher,
)
from nnunetv2_recokd.trainers.ensemble import nnUNetTrainerLogitKD_ensemble, nnUNetTrainerReCoKD_ensemble
from nnunetv2_recokd.trainer_names import PUBLIC_TRAINERS
from nnunetv2_recokd.trainers.inputs import (
    nnUNetTrainerReCoKD_lowDose,
    nnUNetTrainerReCoKD_modalityDropout,
    nnUNetTrainerStudent_lowDose,
    nnUNetTrainerStudent_modalityDropout,
)
from nnunetv2_recokd.trainers.graph import nnUNetTrainerGraphKD, nnUNetTrainerReCoKDGraph
from nnunetv2_recokd.trainers.recokd import (
    nnUNetTrainerReCoKD,
    nnUNetTrainerReCoKD_noCA,
    nnUNetTrainerReCoKD_noSARD,
    nnUNetTrainerReCoKD_singleScale,
    nnUNetTrainerReCoKD_w2,
    nnUNetTrainerReCoKD_w8,
)

__all__ = ["nnUNetTrainerDistillBase", *PUBLIC_TRAINERS]  # the -tr names in trainer_names.py
