"""The public trainers: each class name is what a user types after ``nnUNetv2_train ... -tr``."""

from nnunetv2_recokd.trainers.base import nnUNetTrainerDistillBase
from nnunetv2_recokd.trainers.baselines import (
    nnUNetTrainerLogitKD,
    nnUNetTrainerStudent,
    nnUNetTrainerStudent_w2,
    nnUNetTrainerStudent_w8,
    nnUNetTrainerTeacher,
)

PUBLIC_TRAINERS = [
    "nnUNetTrainerStudent",
    "nnUNetTrainerStudent_w2",
    "nnUNetTrainerStudent_w8",
    "nnUNetTrainerLogitKD",
    "nnUNetTrainerTeacher",
]

__all__ = ["nnUNetTrainerDistillBase", *PUBLIC_TRAINERS]
