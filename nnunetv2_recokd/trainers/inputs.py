"""Missing and degraded inputs (REACT-KD): students trained to segment without some scans or from noisier ones
(modality dropout; simulated low-dose CT, on the student's CT-normalised channels).

The teacher always reads the full, clean input; only the student's view changes (inputs/). Which channels the
student reads is dataset-specific, so it is the `student_channels` setting (RECOKD_CONFIG) of any trainer;
the classes here fix what is the same for every dataset. Defaults: trainer_configs/<class name>.json.
"""

from nnunetv2_recokd.trainers.baselines import nnUNetTrainerStudent
from nnunetv2_recokd.trainers.recokd import nnUNetTrainerReCoKD


class nnUNetTrainerReCoKD_modalityDropout(nnUNetTrainerReCoKD):
    """ReCo-KD with modality dropout: each of the student's channels blanked with p = 0.25 per sample."""


class nnUNetTrainerStudent_modalityDropout(nnUNetTrainerStudent):
    """The control: the student alone under the same modality dropout."""


class nnUNetTrainerReCoKD_lowDose(nnUNetTrainerReCoKD):
    """ReCo-KD with simulated low-dose CT for the student: half the samples at a dose of 0.1-0.5 of the scan's."""


class nnUNetTrainerStudent_lowDose(nnUNetTrainerStudent):
    """The control: the student alone on the same simulated low-dose inputs."""
