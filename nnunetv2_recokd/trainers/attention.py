"""Shared attention alignment (REACT-KD's CBAM3D, Sec. II-F), as an ablation over ReCo-KD.

One CBAM3D block per stage is shared by the adapted student feature and the teacher feature; a relative squared
error then matches the two attended features (losses/attention.py). The block lives in the distiller: the
deployed student is the plain nnU-Net network. Defaults: trainer_configs/<class name>.json.
"""

from nnunetv2_recokd.trainers.recokd import nnUNetTrainerReCoKD


class nnUNetTrainerReCoKD_CBAM(nnUNetTrainerReCoKD):
    """ReCo-KD plus shared-attention alignment on enc1 and enc2 (compare with nnUNetTrainerReCoKD)."""
