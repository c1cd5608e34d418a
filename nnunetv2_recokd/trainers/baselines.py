"""The control and the simplest distillation: the pipe every other method plugs into.

nnUNetTrainerStudent*: the narrow student trained alone (no teacher) -- the baseline every
distillation result is compared with, at the same width and schedule.
nnUNetTrainerLogitKD*: logit distillation on the deep-supervision outputs, in one of three forms (the logit_form
setting; losses/logits.py): Hinton's per-voxel KL, its class-balanced version, channel-wise distillation.
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


class nnUNetTrainerLogitKD_CB(nnUNetTrainerLogitKD):
    """Logit distillation with the class-balanced KL: every class of the teacher's argmax weighs the same."""


class nnUNetTrainerLogitKD_CWD(nnUNetTrainerLogitKD):
    """Channel-wise logit distillation (Shu et al., ICCV 2021): per class channel, where the teacher puts it."""


class nnUNetTrainerTeacher(nnUNetTrainerStudent):
    """Full-width nnU-Net network (plain nnUNetTrainer training) with the schedule taken from the settings.

    For short teacher trainings (tests, the demo) where stock nnU-Net's fixed 1000 epochs are too long.
    Its model folder is a valid teacher: point RECOKD_TEACHER or the `teacher_trainer` setting at it.
    """
