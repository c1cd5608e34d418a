"""Making our trainers visible to nnU-Net: install / uninstall the shim, ext-path, doctor."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Optional

SHIM_NAME = "nnunetv2_recokd_trainers.py"
_MAX_ERROR_LINES = 12  # of a teacher error the doctor prints
SHIM_MARKER = "# written by `nnunetv2_recokd install`; remove with `nnunetv2_recokd install --uninstall`\n"


def add_parsers(sub) -> None:
    p = sub.add_parser("install", help="make our trainers visible to nnU-Net (writes a shim module into nnU-Net's "
                                       "trainer folder)")
    p.add_argument("--uninstall", action="store_true", help="remove the shim again")

    sub.add_parser("ext-path", help="print the folder to export as nnUNet_extTrainer (alternative to install)")

    p = sub.add_parser("doctor", help="check nnU-Net, trainer discovery and the teacher that would be used")
    p.add_argument("-d", "--dataset", help="dataset name or ID, to also check its teacher")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-f", "--fold", default="0")
    p.add_argument("-tr", "--trainer", default="nnUNetTrainerLogitKD", help="whose settings to resolve")
    p.add_argument("-p", "--plans", default="nnUNetPlans")


def install_main(args: argparse.Namespace) -> int:
    return install(uninstall=args.uninstall)


def ext_path_main(args: argparse.Namespace) -> int:
    return print_ext_path()


def doctor_main(args: argparse.Namespace) -> int:
    return doctor(args.dataset, args.configuration, args.fold, args.trainer, args.plans)


def ext_folder() -> Path:
    """The folder that holds only our shim module: the one to export as nnUNet_extTrainer."""
    return Path(__file__).resolve().parent.parent / "nnunet_ext"


def nnunet_trainer_folder() -> Path:
    spec = importlib.util.find_spec("nnunetv2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("nnU-Net v2 is not installed in this Python environment (pip install nnunetv2)")
    return Path(list(spec.submodule_search_locations)[0]) / "training" / "nnUNetTrainer"


def shim_path() -> Path:
    return nnunet_trainer_folder() / SHIM_NAME


def install(uninstall: bool = False) -> int:
    target = shim_path()
    if uninstall:
        if not target.exists():
            print(f"nothing to remove: {target} does not exist")
            return 0
        if SHIM_MARKER not in target.read_text():
            print(f"refusing to remove {target}: it was not written by nnunetv2_recokd install", file=sys.stderr)
            return 1
        target.unlink()
        print(f"removed {target}")
        return 0
    source = (ext_folder() / SHIM_NAME).read_text()
    try:  # written whole, then renamed: a process importing nnU-Net's trainers meanwhile never reads half a file
        partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        partial.write_text(SHIM_MARKER + source)
        os.replace(partial, target)
    except OSError as e:
        print(f"cannot write {target} ({e}).\nEither run this with write access to the nnU-Net installation, or "
              f"use nnU-Net's external trainer route instead:\n  export nnUNet_extTrainer={ext_folder()}",
              file=sys.stderr)
        return 1
    print(f"installed {target}\nnnU-Net now finds our trainers, e.g. "
          f"nnUNetv2_train DATASET 3d_fullres 0 -tr nnUNetTrainerLogitKD\n"
          f"undo with: nnunetv2_recokd install --uninstall")
    return 0


def print_ext_path() -> int:
    print(ext_folder())
    return 0


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "(not installed as a distribution)"


def _trainer_status(name: str) -> str:
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        cls = recursive_find_trainer_class_by_name(name)
    except Exception as e:  # nnU-Net's lookup imports every trainer module; any error of theirs can surface here
        return f"NOT discoverable ({type(e).__name__}: {_first_line(e)})"
    except SystemExit as e:  # nnU-Net's own lookup never exits, but a trainer module it imports may call sys.exit
        return f"NOT discoverable (a module imported by nnU-Net's lookup called sys.exit({e.code!r}))"
    return f"ok ({cls.__module__})"


def _first_line(error: BaseException) -> str:
    lines = str(error).splitlines()
    return lines[0][:160] if lines else ""


def doctor(dataset: Optional[str], configuration: str, fold: str, trainer: str, plans: str) -> int:
    from nnunetv2_recokd.trainers import PUBLIC_TRAINERS

    import torch

    print(f"nnunetv2 {_version('nnunetv2')}, nnunetv2-recokd {_version('nnunetv2-recokd')}, "
          f"torch {torch.__version__} (CUDA available: {torch.cuda.is_available()})")
    shim = shim_path()
    ext = os.environ.get("nnUNet_extTrainer", "")
    print(f"shim in nnU-Net's trainer folder: {'yes' if shim.exists() else 'no'} ({shim})")
    print(f"nnUNet_extTrainer: {ext or '(not set)'}" + ("  <- our ext-path" if str(ext_folder()) in ext else ""))
    if not shim.exists() and str(ext_folder()) not in ext:
        print("  -> run `nnunetv2_recokd install`, or `export nnUNet_extTrainer=$(nnunetv2_recokd ext-path)`")
    print("trainers, as nnU-Net's own lookup sees them:")
    found_all = True
    for name in PUBLIC_TRAINERS:
        status = _trainer_status(name)
        found_all &= status.startswith("ok")
        print(f"  {name:32s} {status}")
    if dataset is not None:
        found_all &= _doctor_teacher(dataset, configuration, fold, trainer, plans)
    return 0 if found_all else 1


def _doctor_teacher(dataset: str, configuration: str, fold: str, trainer: str, plans: str) -> bool:
    """Find the teacher, build it from its own plans, load its weights strictly and check it against the
    student's preprocessed plans; print what is wrong, never a traceback for a user's mistake. True when
    nothing is wrong (a teacher that loads but has no preprocessed student data to be compared with counts as
    fine: nnUNetv2_plan_and_preprocess has not run yet)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    import torch

    from nnunetv2_recokd.config import SettingsError, resolve_settings
    from nnunetv2_recokd.teacher import TeacherError, load_teacher, resolve_teachers

    try:
        dataset_name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:
        print(f"dataset {dataset}: {e}")
        return False
    try:
        settings = resolve_settings(trainer)
    except SettingsError as e:
        print(f"settings of {trainer}: {e}")
        return False
    if fold != "all" and not fold.isdigit():
        print(f"fold {fold!r}: must be a number or 'all'")
        return False
    fold_value = fold if fold == "all" else int(fold)
    print(f"teacher for {dataset_name} {configuration} fold {fold} ({trainer}):")

    preprocessed = os.environ.get("nnUNet_preprocessed")
    student_plans_file = Path(preprocessed or "") / dataset_name / f"{plans}.json"
    student = None
    if preprocessed and student_plans_file.is_file():
        student = _plans_and_dataset(student_plans_file, configuration, "the student's")
        if student is None:
            return False
    from nnunetv2_recokd.unlabeled import dataset_teacher

    # a derived dataset (add-unlabeled) names its teacher in dataset.json, as the trainers read it
    dataset_json = Path(preprocessed or "") / dataset_name / "dataset.json"
    named = dataset_teacher(json.loads(dataset_json.read_text())) if dataset_json.is_file() else None
    try:
        locations = resolve_teachers(settings.teacher, settings.teacher_folds, dataset_name, configuration,
                                     fold_value, settings.teacher_trainer, settings.teacher_plans or plans,
                                     settings.teacher_checkpoint, dataset_teacher=named)
    except TeacherError as e:
        _print_error(e)
        return False
    ok = True
    for location in locations:  # one, or several teachers (teacher list, teacher_folds): each checked
        print(f"  checkpoint {location.checkpoint} (from {location.source})")
        try:
            if student is None:
                # no student data to compare with: still build the teacher and load its weights strictly, checked
                # against its own plans (which match themselves)
                student_like = _plans_and_dataset(location.model_folder / "plans.json", configuration,
                                                  "the teacher's")
                if student_like is None:
                    return False
                teacher = load_teacher(location, *student_like, configuration, torch.device("cpu"))
            else:
                teacher = load_teacher(location, *student, configuration, torch.device("cpu"))
        except TeacherError as e:
            _print_error(e)
            ok = False
            continue
        print(f"  {teacher.describe()}")
        for note in teacher.notes:
            print(f"  note: {note}")
    if not ok:
        return False
    if student is None:
        print(f"  (no preprocessed plans at {student_plans_file}: the teacher loads, but whether it fits the "
              f"student's data is not checked; run nnUNetv2_plan_and_preprocess first)")
    else:
        print(f"  matches the student's data ({student_plans_file})")
    return True


def _print_error(error: Exception) -> None:
    lines = str(error).splitlines()
    if len(lines) > _MAX_ERROR_LINES:  # torch lists every mismatched tensor of a checkpoint that does not fit
        lines = lines[:_MAX_ERROR_LINES] + [f"... ({len(lines) - _MAX_ERROR_LINES} more lines)"]
    print("  " + "\n  ".join(lines))


def _plans_and_dataset(plans_file: Path, configuration: str, whose: str) -> Optional[tuple[dict, dict]]:
    """(plans, dataset.json next to them) when both read and the plans have `configuration`; else print one
    line saying why and return None."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    try:
        plans, dataset = load_json(str(plans_file)), load_json(str(plans_file.parent / "dataset.json"))
    except (OSError, ValueError) as e:
        print(f"  {whose} plans {plans_file} or the dataset.json next to them unreadable ({type(e).__name__}: "
              f"{_first_line(e)})")
        return None
    available = list(plans.get("configurations", {}))
    if configuration not in available:
        print(f"  configuration {configuration!r} is not in {whose} plans {plans_file} "
              f"(available: {', '.join(available)})")
        return None
    return plans, dataset
