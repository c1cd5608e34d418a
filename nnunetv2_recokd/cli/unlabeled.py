"""`nnunetv2_recokd add-unlabeled`: the teacher labels unlabeled scans; a derived nnU-Net dataset holds them beside the
labelled cases (nnunetv2_recokd/unlabeled.py), ready for `nnUNetv2_train NEW CONFIGURATION FOLD -tr <our trainer>`."""

from __future__ import annotations

import argparse
import sys

from nnunetv2_recokd.cli.common import cuda_available


def add_parsers(sub) -> None:
    p = sub.add_parser("add-unlabeled", help="let a trained teacher label unlabeled scans and make a new nnU-Net "
                                             "dataset of the labelled and the teacher-labelled cases, preprocessed "
                                             "with the teacher's plans")
    p.add_argument("-i", required=True, help="folder of unlabeled images, named as nnU-Net's imagesTr "
                                             "(<case>_0000<ending>, one file per channel of the dataset)")
    p.add_argument("-t", "--teacher", required=True,
                   help="the teacher's model folder <Trainer>__<plans>__<configuration> (one trained here or "
                        "elsewhere); its plans are the derived dataset's")
    p.add_argument("-d", default=None, help="the labelled dataset (id or name in nnUNet_raw) whose cases join the "
                                            "teacher-labelled ones; leave out to train on teacher labels alone")
    p.add_argument("--id", type=int, required=True, help="the new dataset's id (must be free)")
    p.add_argument("--name", default=None, help="the new dataset's name (default: <labelled name>Unlabeled, or "
                                               "Unlabeled)")
    p.add_argument("-f", nargs="+", default=None,
                   help="teacher folds that label (default: every numbered fold, as nnUNetv2_predict)")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring when the teacher labels (faster)")
    p.add_argument("--min-agreement", type=float, default=None, metavar="FRACTION",
                   help="write nnU-Net's ignore label where fewer than this fraction of the teacher's mirrorings agree "
                        "with its label (e.g. 0.75: 6 of 8), so no loss trains on those voxels; default: keep every "
                        "teacher label")
    p.add_argument("--min-case-agreement", type=float, default=None, metavar="DICE",
                   help="keep a teacher-labelled case only when the teacher's folds (one fold: its mirrorings) agree "
                        "on it with a mean pairwise Dice of at least this for every foreground label (e.g. 0.9); "
                        "the dropped cases and their agreement are listed in the derived dataset.json and the log")
    p.add_argument("-num_parts", type=int, default=1,
                   help="split the labelling into this many parts, run as separate commands at once (a SLURM array, "
                        "several GPUs or machines sharing the folders), as nnUNetv2_predict's -num_parts; the part "
                        "that labels the last case assembles and preprocesses the dataset")
    p.add_argument("-part_id", type=int, default=0, help="which part this command labels: 0 .. num_parts - 1")
    p.add_argument("-device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("-np", type=int, default=2, help="processes for nnU-Net's preprocessing")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the teacher's runtime (default: all)")


def main(args: argparse.Namespace) -> int:
    from nnunetv2_recokd.deploy.modelfolder import DeployError
    from nnunetv2_recokd.unlabeled import UnlabeledError, add_unlabeled, check_inputs

    name = args.name
    if name is None:
        name = "Unlabeled" if args.d is None else f"{_labelled_name(args.d)}Unlabeled"
    device = args.device or ("cuda" if cuda_available() else "cpu")
    try:
        inputs = check_inputs(args.teacher, args.i, args.id, name, args.d, args.f, tta=not args.disable_tta,
                              min_agreement=args.min_agreement, min_case_agreement=args.min_case_agreement)
    except (UnlabeledError, DeployError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not (args.num_parts >= 1 and 0 <= args.part_id < args.num_parts):
        print(f"error: -part_id {args.part_id} with -num_parts {args.num_parts}: give 0 <= part_id < num_parts",
              file=sys.stderr)
        return 1
    folder = add_unlabeled(inputs, device=device, num_processes=args.np, log=lambda m: print(m, flush=True),
                           num_threads=args.threads, part_id=args.part_id, num_parts=args.num_parts)
    if folder is None:  # this part is done; another part assembles the dataset
        return 0
    fold_hint = ("validation folds hold labelled cases only" if inputs.real_cases else
                 "no labelled case: validation measures agreement with the teacher")
    print(f"done ({fold_hint}). Train a student on it, the teacher is found from the dataset:\n"
          f"  nnUNetv2_train {args.id} {inputs.teacher.configuration} 0 -tr nnUNetTrainerReCoKD\n"
          f"  ({folder.name}; the control on the same data: -tr nnUNetTrainerStudent)")
    return 0


def _labelled_name(dataset: str) -> str:
    import os
    from pathlib import Path

    from nnunetv2_recokd.unlabeled import _dataset_folder

    folder = _dataset_folder(Path(os.environ.get("nnUNet_raw", ".")), dataset)
    return folder.name.split("_", 1)[1] if folder is not None else "Dataset"
