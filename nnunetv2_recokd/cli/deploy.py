"""`nnunetv2_recokd export` and `nnunetv2_recokd predict`: the student where it runs.

export          a trained student model folder -> a stock nnU-Net model folder (plus its install zip, ONNX files)
predict         nnUNetv2_predict's options and pipeline, the network run by a CPU inference runtime
student-inputs  a folder in the dataset's layout -> the input folder of a student that reads fewer channels
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

from nnunetv2_recokd.cli.common import add_calibration_arguments, add_model_arguments, resolve_model
from nnunetv2_recokd.deploy.modelfolder import DeployError, ModelFolder
from nnunetv2_recokd.deploy.runtime import DEFAULT_RUNTIME, RUNTIMES
from nnunetv2_recokd.evaluation.timing import Stopwatch, seconds_per_case


def add_parsers(sub) -> None:
    p = sub.add_parser("export", help="turn a trained student model folder into a model folder stock nnU-Net "
                                      "predicts without this package (optionally its install zip and ONNX files)")
    add_model_arguments(p)
    p.add_argument("-o", "--out", help="results root to write <Dataset>/nnUNetTrainer__<plans>__<configuration> "
                                       "into (default: $nnUNet_results)")
    p.add_argument("--plans-name", help="plans name of the export (default: <plans>_<trainer without "
                                        "nnUNetTrainer>, e.g. nnUNetPlans_ReCoKD)")
    p.add_argument("--zip", help="also write the zip that nnUNetv2_install_pretrained_model_from_zip installs")
    p.add_argument("--onnx", action="store_true", help="also write fold_<f>/<checkpoint>.onnx per fold (input "
                                                       "'image' (N, C, *patch), output 'logits', no deep "
                                                       "supervision) and check it against PyTorch")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export of the same name")
    p.add_argument("--precision", choices=("f32", "int8"), default="f32",
                   help="int8: also write fold_<f>/<checkpoint>.int8.xml/.bin per fold, an int8 OpenVINO network "
                        "calibrated on a few of your cases, which `nnunetv2_recokd predict --precision int8` uses")
    add_calibration_arguments(p)

    p = sub.add_parser("predict", help="nnUNetv2_predict with the network run by a CPU inference runtime "
                                       "(nnU-Net's preprocessing, sliding window, mirroring, resampling, export)")
    p.add_argument("-i", required=True, help="input folder (<case>_0000.nii.gz ..., as for nnUNetv2_predict)")
    p.add_argument("-o", required=True, help="output folder")
    add_model_arguments(p)
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step as a fraction of the patch")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring (test-time augmentation)")
    p.add_argument("--save_probabilities", action="store_true")
    p.add_argument("--continue_prediction", action="store_true", help="skip cases whose output exists")
    p.add_argument("-prev_stage_predictions", help="a cascade stage (3d_cascade_fullres): the folder holding the "
                                                   "previous stage's (3d_lowres) segmentation of every case")
    p.add_argument("-npp", type=int, default=0, help="preprocessing worker processes (default 0: in this process, "
                                                     "no worker start-up; >0 uses nnU-Net's multiprocessing "
                                                     "pipeline)")
    p.add_argument("-nps", type=int, default=0, help="export worker processes (default 0: in this process)")
    p.add_argument("--runtime", default=DEFAULT_RUNTIME, choices=RUNTIMES,
                   help=f"network runtime (default {DEFAULT_RUNTIME}; torch = PyTorch as stock nnU-Net)")
    p.add_argument("--threads", type=int, help="runtime CPU threads (default: all cores)")
    p.add_argument("--precision", choices=("f32", "bf16", "int8"), default="f32",
                   help="f32 (default: PyTorch's logits to float32 rounding), bf16 or int8 (openvino only, opt-in: "
                        "faster; int8 is calibrated on a few of your cases, see docs/deployment.md for its measured "
                        "Dice against f32)")
    add_calibration_arguments(p)
    p.add_argument("--no-cache", action="store_true",
                   help="export each fold to ONNX afresh instead of reusing the cached export of the same checkpoint "
                        "($RECOKD_CACHE, default ~/.cache/nnunetv2_recokd)")
    p.add_argument("--timings", help="write the per-case timings (and the set-up time) as JSON here")
    p.add_argument("--verbose", action="store_true")

    p = sub.add_parser("student-inputs", help="link the channel files a student reads (student_channels) from a "
                                              "folder in the dataset's layout into an input folder for "
                                              "nnUNetv2_predict, numbered as the student's model folder expects")
    p.add_argument("-i", required=True, help="folder with the dataset's channel files (e.g. imagesTs)")
    p.add_argument("-o", required=True, help="the student's input folder to write (symbolic links)")
    add_model_arguments(p)


def export_main(args: argparse.Namespace) -> int:
    from nnunetv2_recokd.deploy.export import export_stock_model

    try:
        model = resolve_model(args)
        out = args.out or os.environ.get("nnUNet_results")
        if not out:
            raise DeployError("nnUNet_results is not set: give the results root to export into with -o")
        result = export_stock_model(model, out, args.plans_name, args.zip, args.onnx, args.overwrite,
                                    args.precision == "int8", args.calibration, args.calibration_cases)
    except DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {model.describe()}\n      -> {result.folder}")
    for f in result.onnx_files:
        print(f"ONNX: {f}")
    for f in result.int8_files:
        print(f"int8 (OpenVINO, for nnunetv2_recokd predict --precision int8): {f}")
    if result.onnx_max_difference is not None:
        print(f"ONNX vs PyTorch, max |logit difference| on a random patch: {result.onnx_max_difference:.2e}")
    if result.zip_file:
        print(f"zip: {result.zip_file} (nnUNetv2_install_pretrained_model_from_zip {result.zip_file})")
    print("predict it with stock nnU-Net (this package not needed):\n  "
          + (result.predict_command(model.dataset_name) if Path(out).resolve() ==
             Path(os.environ.get("nnUNet_results", "/nonexistent")).resolve() else
             f"nnUNetv2_predict_from_modelfolder -i INPUT -o OUTPUT -m {result.folder} -f "
             + " ".join(map(str, result.folds))))
    return 0


def dataset_layout(folder: str, model: ModelFolder) -> bool:
    """True when `folder` holds more channel files per case than a student that reads fewer channels needs (the
    dataset's layout: its channel files are then picked by inputs.channels.student_input_files)."""
    from nnunetv2_recokd.inputs.channels import holds_dataset_layout

    return holds_dataset_layout(folder, model.dataset_json)


def student_inputs_main(args: argparse.Namespace) -> int:
    from nnunetv2_recokd.inputs.channels import DATASET_KEY, ChannelError, student_input_files

    try:
        model = resolve_model(args)
        if DATASET_KEY not in model.dataset_json:
            raise DeployError(f"{model.path} reads every channel of its dataset: give nnUNetv2_predict the "
                              f"dataset's input folder as it is")
        cases = student_input_files(args.i, args.o, model.dataset_json)
    except (DeployError, ChannelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    channels = ", ".join(f"{e['name']} (dataset _{e['dataset_channel']:04d} -> _{int(k):04d})"
                         for k, e in sorted(model.dataset_json[DATASET_KEY].items(), key=lambda kv: int(kv[0])))
    print(f"{len(cases)} case(s) linked into {args.o}: {channels}")
    return 0


def predict_main(args: argparse.Namespace) -> int:
    from nnunetv2_recokd.deploy.inputfolder import check_file_endings, check_input_folder
    from nnunetv2_recokd.deploy.predictor import CaseFailures, build_predictor, predict_cases, previous_stage_files
    from nnunetv2_recokd.inputs.channels import ChannelError, student_input_files

    staging = None
    failures: dict[str, str] = {}
    try:
        model = resolve_model(args)
        check_file_endings(args.i, model.dataset_json["file_ending"])
        if dataset_layout(args.i, model):  # the dataset's files: hand the student its channels, renumbered
            staging = tempfile.TemporaryDirectory(prefix="recokd_student_inputs_")
            try:
                student_input_files(args.i, staging.name, model.dataset_json)
            except ChannelError as e:
                raise DeployError(str(e)) from None
            print(f"{args.i} holds the dataset's channels; the student reads "
                  f"{list(model.dataset_json['channel_names'].values())} of them")
            args.i = staging.name
        cases = check_input_folder(args.i, model.dataset_json)
        previous = previous_stage_files(model, cases, args.prev_stage_predictions)
        setup = Stopwatch()
        predictor = build_predictor(model, args.runtime, not args.disable_tta, args.step_size, args.threads,
                                    args.verbose, use_cache=not args.no_cache, precision=args.precision,
                                    calibration=args.calibration, calibration_cases=args.calibration_cases)
        print(f"{model.describe()}: {len(model.folds)} fold(s) on {args.runtime}"
              f"{'' if args.precision == 'f32' else ' ' + args.precision}, ready in "
              f"{setup.seconds:.1f} s; {len(cases)} case(s), TTA {'off' if args.disable_tta else 'on'}")
        if args.npp > 0 or args.nps > 0:
            cases, failures = readable_cases(cases, model, args)
            if cases:
                predictor.predict_from_files(cases, args.o, save_probabilities=args.save_probabilities,
                                             overwrite=not args.continue_prediction,
                                             num_processes_preprocessing=max(1, args.npp),
                                             num_processes_segmentation_export=max(1, args.nps),
                                             folder_with_segs_from_prev_stage=args.prev_stage_predictions)
        else:
            ready = setup.seconds
            try:
                timings = predict_cases(predictor, cases, args.o, args.save_probabilities,
                                        not args.continue_prediction, previous_stage=previous, keep_going=True)
            except CaseFailures as e:  # every other case was predicted
                timings, failures = e.timings, e.failures
            if timings:
                total = sum(t.total_s for t in timings)
                print(f"{len(timings)} case(s) in {total:.1f} s, "
                      f"{seconds_per_case(total, len(timings)):.2f} s per case")
            if args.timings:
                Path(args.timings).write_text(json.dumps(
                    {"runtime": args.runtime, "folds": model.folds, "tta": not args.disable_tta,
                     "setup_s": ready, "compile_s": predictor.compile_seconds,
                     "cases": [dataclasses.asdict(t) for t in timings], "failed": failures}, indent=1))
    except DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if staging is not None:
            staging.cleanup()
    if failures:
        listing = "\n  ".join(f"{case}: {why}" for case, why in failures.items())
        print(f"error: {len(failures)} case(s) could not be predicted; every other case was written to {args.o}:\n  "
              f"{listing}\nreplace (or remove) the failed cases' input files and rerun the same command with "
              f"--continue_prediction: only the missing cases are predicted", file=sys.stderr)
        return 1
    return 0


def readable_cases(cases: list[list[str]], model: ModelFolder,
                   args: argparse.Namespace) -> tuple[list[list[str]], dict[str, str]]:
    """For nnU-Net's worker pipeline (-npp/-nps), which stops at the first file it cannot read: (the cases whose
    files pass deploy/integrity.py's check, {case: why} for the others). With --continue_prediction, cases already
    predicted are passed on unchecked (nnU-Net skips them)."""
    from nnunetv2_recokd.deploy.integrity import CorruptInputError, check_image_file
    from nnunetv2_recokd.deploy.predictor import case_done

    ending = model.dataset_json["file_ending"]
    kept, failures = [], {}
    for files in cases:
        case = os.path.basename(files[0])[: -len(ending) - 5]
        extra = ([os.path.join(args.prev_stage_predictions, case + ending)] if args.prev_stage_predictions else [])
        if not (args.continue_prediction and case_done(Path(args.o), case, ending, args.save_probabilities)):
            try:
                for file in files + extra:
                    check_image_file(file)
            except CorruptInputError as e:
                failures[case] = str(e)
                print(f"{case}: FAILED, {e}")
                continue
        kept.append(files)
    return kept, failures
