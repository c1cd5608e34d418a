"""One student from many teachers: nnU-Net's fold ensemble distilled into one narrow network.

nnU-Net's default inference runs every fold's model (with mirroring); these trainers distil all folds of the
teacher found at the default location (teacher_folds "all") into one width-1/4 student, so inference is one
pass of a ~16x cheaper network. Every fold teacher but the student's own was trained on the student's
validation cases, so allow_leaky_teacher is on: the log and `nnunetv2_recokd report` mark the fold validation
optimistic, and Dice on held-out cases (imagesTs/labelsTs) is the honest measure.
Defaults: trainer_configs/<class name>.json.
"""

from nnunetv2_recokd.trainers.baselines import nnUNetTrainerLogitKD
from nnunetv2_recokd.trainers.recokd import nnUNetTrainerReCoKD


class nnUNetTrainerReCoKD_ensemble(nnUNetTrainerReCoKD):
    """ReCo-KD from every fold of the default teacher: per-teacher adapters and context blocks, equal weights."""


class nnUNetTrainerLogitKD_ensemble(nnUNetTrainerLogitKD):
    """Logit KD against the fold ensemble: the mean of the fold teachers' softened probabilities."""
