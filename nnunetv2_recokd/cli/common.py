"""What several command modules share, and nothing else: the model arguments (-m, or -d/-tr/-p/-c; -f; -chk) and
the model folder they name, the int8 calibration arguments, and whether CUDA is there (for a default device).
Not a command: tests/test_structure.py lets every command module import it."""

from __future__ import annotations

import argparse
from pathlib import Path


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def add_model_arguments(p: argparse.ArgumentParser, trainer_default: str = "nnUNetTrainerReCoKD") -> None:
    """-m MODEL_FOLDER, or nnUNetv2_predict's -d/-tr/-p/-c; -f; -chk."""
    p.add_argument("-m", "--model", help="model folder <Trainer>__<plans>__<configuration> (instead of -d/-tr/-p/-c)")
    p.add_argument("-d", help="dataset name or ID (with -tr/-p/-c: the folder in $nnUNet_results)")
    p.add_argument("-tr", default=trainer_default, help=f"trainer (default {trainer_default})")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-c", default="3d_fullres", help="configuration (default 3d_fullres)")
    p.add_argument("-f", nargs="+", default=None,
                   help="folds (default: every fold_<f> that has the checkpoint; several folds are ensembled)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name (default checkpoint_final.pth)")


def add_calibration_arguments(p: argparse.ArgumentParser) -> None:
    from nnunetv2_recokd.deploy.quantize import CALIBRATION_CASES

    p.add_argument("--calibration", help="int8: folder of images in nnU-Net's naming to calibrate every fold on (a few "
                                         "training cases; a student that reads fewer channels takes the dataset's "
                                         "layout too; default: $nnUNet_raw/<dataset>/imagesTr, each fold's own "
                                         "training cases per $nnUNet_preprocessed/<dataset>/splits_final.json)")
    p.add_argument("--calibration_cases", type=int, default=CALIBRATION_CASES,
                   help=f"int8: how many cases of the calibration folder are used (default {CALIBRATION_CASES})")


def resolve_model(args: argparse.Namespace):
    """The ModelFolder that add_model_arguments' arguments name.

    Raises:
        DeployError: neither -m nor -d given, or the folder not a model folder.
    """
    from nnunetv2_recokd.deploy.modelfolder import DeployError, model_folder_from_ids, open_model_folder

    if args.model:
        folder = Path(args.model)
    elif args.d:
        folder = model_folder_from_ids(args.d, args.tr, args.p, args.c)
    else:
        raise DeployError("name the model: -m MODEL_FOLDER, or -d DATASET [-tr TRAINER -p PLANS -c CONFIGURATION]")
    return open_model_folder(folder, args.f, args.chk)
