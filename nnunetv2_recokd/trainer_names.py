"""The public trainer names (what a user types after ``nnUNetv2_train ... -tr``), importable without importing
the trainers themselves (and with them nnU-Net's trainer module): the prediction command reads them to build a
student from its plans alone."""

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
