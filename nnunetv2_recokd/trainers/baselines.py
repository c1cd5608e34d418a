"""The control and the simplest distillation: the pipe every other method plugs into.

nnUNetTrainerStudent*: the narrow student trained alone (no teacher) -- the baseline every
distillation result is compared with, at the same width and schedule.
nnUNetTrainerLogitKD: Hinton logit distillation on the deep-supervision outputs.
Defaults: trainer_configs/<class name>.json.
"""

from nnunetv2_recokd.trainers.base import nnUNetTrainerDistillBase


class nnUNetTrainerStudent(nnUNetTrainerDistillBase):
    """Width-1/4 student, no distillation."""

    distill = False


class nnUNetTrainerStudent_w2(nnUNetTrainerStudent):
    """Width-1/2 student, no distillation."""


class nnUNetTrainerStudent_w8(nnUNetTrainerStudent):
    """Width-1/8 student, no distillation."""


class nnUNetTrainerLogitKD(nnUNetTrainerDistillBase):
    """Width-1/4 student with logit distillation (temperature T, nnU-Net's deep-supervision weights)."""


class nnUNetTrainerTeacher(nnUNetTrainerStudent):
    """Full-width nnU-Net network (plain nnUNetTrainer training) with the schedule taken from the settings.

    For short teacher trainings (tests, the demo) where stock nnU-Net's fixed 1000 epochs are too long.
    Its model folder is a valid teacher: point RECOKD_TEACHER or the `teacher_trainer` setting at it.
    """
