"""The public trainer names (what a user types after ``nnUNetv2_train ... -tr``) and each one's parent class,
importable without importing the trainers themselves (and with them nnU-Net's trainer module): the prediction
command reads the names to build a student from its plans alone, and config.py walks PARENTS to stack each
trainer's shipped settings along its class hierarchy (tests/test_structure.py checks PARENTS against the classes)."""

PUBLIC_TRAINERS = (
    # in the order the report lists them
    "nnUNetTrainerStudent",
    "nnUNetTrainerStudent_w2",
    "nnUNetTrainerStudent_w8",
    "nnUNetTrainerTeacher",
    "nnUNetTrainerLogitKD",
    "nnUNetTrainerLogitKD_CB",
    "nnUNetTrainerLogitKD_CWD",
    "nnUNetTrainerReCoKD",
    "nnUNetTrainerReCoKD_w2",
    "nnUNetTrainerReCoKD_w8",
    "nnUNetTrainerReCoKD_noSARD",
    "nnUNetTrainerReCoKD_noCA",
    "nnUNetTrainerReCoKD_singleScale",
    "nnUNetTrainerReCoKDGraph",
    "nnUNetTrainerGraphKD",
    "nnUNetTrainerLogitKD_ensemble",
    "nnUNetTrainerReCoKD_ensemble",
    "nnUNetTrainerStudent_modalityDropout",
    "nnUNetTrainerReCoKD_modalityDropout",
    "nnUNetTrainerStudent_lowDose",
    "nnUNetTrainerReCoKD_lowDose",
    "nnUNetTrainerReCoKD_CBAM",
)

BASE_TRAINER = "nnUNetTrainerDistillBase"  # trainers/base.py: every public trainer derives from it
NNUNET_TRAINER = "nnUNetTrainer"  # nnU-Net's own trainer, the base's parent

# class name -> the name of its parent class (each of our trainers has exactly one)
PARENTS = {
    BASE_TRAINER: NNUNET_TRAINER,
    "nnUNetTrainerStudent": BASE_TRAINER,
    "nnUNetTrainerStudent_w2": "nnUNetTrainerStudent",
    "nnUNetTrainerStudent_w8": "nnUNetTrainerStudent",
    "nnUNetTrainerTeacher": "nnUNetTrainerStudent",
    "nnUNetTrainerLogitKD": BASE_TRAINER,
    "nnUNetTrainerLogitKD_CB": "nnUNetTrainerLogitKD",
    "nnUNetTrainerLogitKD_CWD": "nnUNetTrainerLogitKD",
    "nnUNetTrainerReCoKD": BASE_TRAINER,
    "nnUNetTrainerReCoKD_w2": "nnUNetTrainerReCoKD",
    "nnUNetTrainerReCoKD_w8": "nnUNetTrainerReCoKD",
    "nnUNetTrainerReCoKD_noSARD": "nnUNetTrainerReCoKD",
    "nnUNetTrainerReCoKD_noCA": "nnUNetTrainerReCoKD",
    "nnUNetTrainerReCoKD_singleScale": "nnUNetTrainerReCoKD",
    "nnUNetTrainerReCoKDGraph": "nnUNetTrainerReCoKD",
    "nnUNetTrainerGraphKD": BASE_TRAINER,
    "nnUNetTrainerLogitKD_ensemble": "nnUNetTrainerLogitKD",
    "nnUNetTrainerReCoKD_ensemble": "nnUNetTrainerReCoKD",
    "nnUNetTrainerStudent_modalityDropout": "nnUNetTrainerStudent",
    "nnUNetTrainerReCoKD_modalityDropout": "nnUNetTrainerReCoKD",
    "nnUNetTrainerStudent_lowDose": "nnUNetTrainerStudent",
    "nnUNetTrainerReCoKD_lowDose": "nnUNetTrainerReCoKD",
    "nnUNetTrainerReCoKD_CBAM": "nnUNetTrainerReCoKD",
}


def lineage(name: str) -> list[str]:
    """Class names from nnU-Net's trainer down to `name` (one of ours, by PARENTS); KeyError for any other name."""
    names = [name]
    while names[-1] in PARENTS:
        names.append(PARENTS[names[-1]])
    if len(names) == 1:
        raise KeyError(name)
    return names[::-1]
