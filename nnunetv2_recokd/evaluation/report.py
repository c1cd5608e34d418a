"""`nnunetv2_recokd report`: compare the teacher and our distilled students on the user's own data.

Everything comes from what nnU-Net already wrote into ``$nnUNet_results/<Dataset>``: one model folder
``<Trainer>__<plans>__<configuration>`` per trainer, with ``plans.json``, ``dataset.json`` and
``fold_<f>/validation/summary.json`` (written by nnU-Net's validation after training) plus the fold's
checkpoint. Per model we report the validation Dice per class and the mean foreground Dice exactly as
summary.json has them (no re-evaluation, so the numbers are nnU-Net's own), the parameter count of the saved
network, the student width recorded in plans.json and, optionally, the latency of one forward pass on one
patch of the configuration's patch size, with the network rebuilt exactly as ``nnUNetv2_predict`` rebuilds it.

Output: a Markdown table on stdout, and report.md, report.json and report.png in ``--out``
(evaluation/tables.py's report_document, evaluation/figures.py's report_figure).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any, Optional

from nnunetv2_recokd.evaluation.figures import report_figure
from nnunetv2_recokd.evaluation.networks import (
    count_checkpoint_parameters,
    find_checkpoint,
    latency_or_reason,
    load_checkpoint,
)
from nnunetv2_recokd.evaluation.summary import (
    class_names,
    predict_and_score,
    read_summary,
    validation_summary,
)
from nnunetv2_recokd.evaluation.tables import NOT_VALIDATED, TEACHER_TRAINER, report_document
from nnunetv2_recokd.evaluation.timing import seconds_per_case
from nnunetv2_recokd.trainer_names import PUBLIC_TRAINERS
from nnunetv2_recokd.unlabeled import TRAINING_CASES_FILE

DEFAULT_OUT = "recokd_report"
REPORT_RUNTIME = "openvino"  # held-out cases are also timed on this CPU runtime (deploy extra) beside nnU-Net's


# ----------------------------------------------------------------------------------- locating the folders
def results_root(dataset: str) -> tuple[str, Path]:
    """Resolve DATASET (name or ID) and return (dataset name, $nnUNet_results/<name>).

    Raises:
        SystemExit: nnUNet_results unset, dataset unknown, or its results folder missing (the message says which
            path was looked at), so that a wrong environment never ends in a traceback.
    """
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    results = os.environ.get("nnUNet_results")
    if not results:
        raise SystemExit("nnUNet_results is not set; it must point to the folder that holds nnU-Net's trained "
                         "models (the one nnUNetv2_train wrote into)")
    try:
        name = str(maybe_convert_to_dataset_name(dataset))
    except (RuntimeError, ValueError, AssertionError) as e:
        raise SystemExit(f"dataset {dataset!r} not found: {e}") from None
    root = Path(results) / name
    if not root.is_dir():
        raise SystemExit(f"no results folder for {name}: {root} does not exist. nnUNet_results ({results}) must "
                         f"point to the trained models, and the teacher must have been trained there first "
                         f"(nnUNetv2_train {name} 3d_fullres 0)")
    return name, root


def role(trainer: str) -> str:
    """'teacher' for nnU-Net's stock trainer and our teacher trainer, 'student' for our other trainers,
    'reference' for any other trainer found (someone's own baseline: shown, never dropped)."""
    if trainer in (TEACHER_TRAINER, "nnUNetTrainerTeacher"):
        return "teacher"
    return "student" if trainer in PUBLIC_TRAINERS else "reference"


def _sort_key(trainer: str) -> tuple[int, int, str]:
    """Teacher(s) first, then references, then our trainers in the order of PUBLIC_TRAINERS."""
    order = {"teacher": 0, "reference": 1, "student": 2}[role(trainer)]
    index = PUBLIC_TRAINERS.index(trainer) if trainer in PUBLIC_TRAINERS else -1
    return order, 0 if trainer == TEACHER_TRAINER else 1 + index, trainer


def find_model_folders(root: Path, configuration: str, plans: str, fold: str) -> list[tuple[str, Path]]:
    """(trainer, model folder) for every ``<trainer>__<plans>__<configuration>`` folder that has ``fold_<fold>``.

    Raises:
        SystemExit: none found; the message lists the folders that do exist, so a wrong -c/-p/-f is obvious.
    """
    suffix = f"__{plans}__{configuration}"
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name.endswith(suffix) and len(folder.name) > len(suffix) and (folder / f"fold_{fold}").is_dir():
            found.append((folder.name[:-len(suffix)], folder))
    if not found:
        existing = sorted(f"{p.name}/" + ",".join(sorted(q.name for q in p.glob("fold_*"))) for p in root.iterdir()
                          if p.is_dir())
        raise SystemExit(f"no results folder *{suffix}/fold_{fold} in {root}. Folders there: "
                         f"{'; '.join(existing) or '(none)'}. Train the teacher first (nnUNetv2_train "
                         f"{root.name} {configuration} {fold}) or pass the -c/-p/-f the models were trained with")
    return sorted(found, key=lambda item: _sort_key(item[0]))


# ----------------------------------------------------------------------------------- reading one model folder
def student_width(plans: dict, configuration: str, trainer: str) -> float:
    """The width recorded in plans.json (``recokd_student``), else the trainer's shipped default, else 1."""
    from nnunetv2_recokd.config import SettingsError, default_settings
    from nnunetv2_recokd.student import PLANS_KEY

    spec = plans.get("configurations", {}).get(configuration, {}).get(PLANS_KEY) or {}
    if "width" in spec:
        return float(spec["width"])
    if role(trainer) == "student":
        try:
            return float(default_settings(trainer).student_width)
        except SettingsError:
            pass
    return 1.0


# ----------------------------------------------------------------------------------- held-out cases
def test_set(dataset_name: str) -> Optional[tuple[Path, Path]]:
    """($nnUNet_raw/<Dataset>/imagesTs, labelsTs) when nnUNet_raw is set and both folders hold files, else None."""
    raw = os.environ.get("nnUNet_raw")
    if not raw:
        return None
    images, labels = Path(raw) / dataset_name / "imagesTs", Path(raw) / dataset_name / "labelsTs"
    if images.is_dir() and labels.is_dir() and any(images.iterdir()) and any(labels.iterdir()):
        return images, labels
    return None


def evaluate_test_set(model_folder: Path, fold: str, checkpoint: Path, images: Path, labels: Path, out: Path,
                      device: str, tta: bool) -> dict[str, Any]:
    """Predict imagesTs with nnU-Net's own predictor (the model's fold, mirroring only with `tta`), score the
    predictions against labelsTs with nnU-Net's own evaluation (summary.json in `out`), and time the prediction:
    per-class Dice, mean foreground Dice, case count and seconds per case (preprocessing and export included)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunetv2_recokd.inputs.channels import DATASET_KEY, student_input_files

    dev = torch.device(device)
    out.mkdir(parents=True, exist_ok=True)
    student_dataset = _read_json(model_folder / "dataset.json")
    if DATASET_KEY in student_dataset:  # a student that reads fewer channels: its files, under its numbers
        student_images = out.parent / f"{out.name}_inputs"
        student_input_files(images, student_images, student_dataset)
        images = student_images
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's notes on CPU devices and checkpoints
        predictor = nnUNetPredictor(use_mirroring=tta, device=dev, perform_everything_on_device=dev.type == "cuda",
                                    verbose=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=(fold if fold == "all"
                                                                                     else int(fold),),
                                                       checkpoint_name=checkpoint.name)
    result, seconds = predict_and_score(predictor, images, out, labels)
    result["seconds_per_case"] = seconds_per_case(seconds, result["n_cases"])
    result["runtime_seconds_per_case"], result["runtime"] = runtime_seconds_per_case(
        model_folder, fold, checkpoint, images, out.parent / f"{out.name}_{REPORT_RUNTIME}", tta)
    return result


def runtime_seconds_per_case(model_folder: Path, fold: str, checkpoint: Path, images: Path, out: Path,
                             tta: bool) -> tuple[Optional[float], Optional[str]]:
    """Seconds per case of the same prediction on the CPU with `nnunetv2_recokd predict`'s runtime (model load and
    compilation excluded, as for nnU-Net's predictor above), or (None, None) without the deploy extra."""
    from nnunetv2_recokd.deploy.inputfolder import check_input_folder
    from nnunetv2_recokd.deploy.modelfolder import DeployError, open_model_folder
    from nnunetv2_recokd.deploy.predictor import build_predictor, predict_cases

    try:
        model = open_model_folder(model_folder, [fold], checkpoint.name)
        predictor = build_predictor(model, REPORT_RUNTIME, tta, 0.5)
    except DeployError:
        return None, None
    timings = predict_cases(predictor, check_input_folder(images, model.dataset_json), out, log=lambda m: None)
    return seconds_per_case(sum(t.total_s for t in timings), len(timings)), REPORT_RUNTIME


# ----------------------------------------------------------------------------------- the rows
def collect_row(trainer: str, model_folder: Path, configuration: str, fold: str, latency: bool, device: str,
                runs: int, test: Optional[tuple[Path, Path]] = None, test_out: Optional[Path] = None,
                tta: bool = False) -> dict[str, Any]:
    """One model: its role, width, parameters, Dice from summary.json (or 'not validated yet'), latency and, with
    `test` (imagesTs, labelsTs), Dice and seconds per case on the held-out cases (predictions in test_out)."""
    fold_folder = model_folder / f"fold_{fold}"
    plans = _read_json(model_folder / "plans.json")
    dataset_json = _read_json(model_folder / "dataset.json")
    checkpoint = find_checkpoint(fold_folder)
    loaded = load_checkpoint(checkpoint) if checkpoint else {}
    summary_path = validation_summary(model_folder, fold)
    row: dict[str, Any] = {"trainer": trainer, "role": role(trainer), "model_folder": str(model_folder),
                           "fold": fold, "width": student_width(plans, configuration, trainer),
                           "checkpoint": checkpoint.name if checkpoint else None,
                           "params": count_checkpoint_parameters(loaded) if checkpoint else None,
                           # the teacher was trained on some of the validation cases (allow_leaky_teacher)
                           "validation_optimistic": (loaded.get("recokd") or {}).get("teacher_saw_validation_cases"),
                           # a derived dataset (add-unlabeled): how many real and teacher-labelled cases trained it
                           "training_cases": _read_json(fold_folder / TRAINING_CASES_FILE) or None,
                           "status": "validated" if summary_path.is_file() else NOT_VALIDATED,
                           "dice": {}, "mean_dice": None, "n_cases": 0, "latency_ms": None, "latency_note": None}
    if summary_path.is_file():
        row.update(read_summary(summary_path, class_names(dataset_json)))
    if latency:
        row["latency_ms"], row["latency_note"] = latency_or_reason(model_folder, fold, checkpoint, device, runs)
    else:
        row["latency_note"] = "not measured (--no-latency)"
    row["test"], row["test_note"] = None, None
    if test is not None and checkpoint is not None:
        try:
            row["test"] = evaluate_test_set(model_folder, fold, checkpoint, *test, test_out / trainer, device, tta)
        except Exception as e:  # one model that cannot predict (trainer class not found) must not end the report
            row["test_note"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    return row


def _read_json(path: Path) -> dict:
    """A JSON file, or {} when absent (a half-copied folder still gets a row)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def collect_rows(dataset: str, configuration: str = "3d_fullres", fold: str = "0", plans: str = "nnUNetPlans",
                 latency: bool = True, device: str = "cpu", runs: int = 5, test: Optional[tuple[Path, Path]] = None,
                 test_out: Optional[Path] = None, tta: bool = False) -> list[dict[str, Any]]:
    """One row per model folder of the dataset (teacher first, then references, then our trainers); with `test`
    (imagesTs, labelsTs) each model is also predicted and scored on the held-out cases, into test_out/<trainer>."""
    _, root = results_root(dataset)
    return [collect_row(trainer, folder, configuration, str(fold), latency, device, runs, test, test_out, tta)
            for trainer, folder in find_model_folders(root, configuration, plans, str(fold))]


# ----------------------------------------------------------------------------------- output
def write_outputs(rows: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> str:
    """report.md, report.json and report.png in `out`; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = report_document(rows, meta)
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    report_figure(rows, out / "report.png")
    return text


def patch_size(rows: list[dict[str, Any]], configuration: str) -> Optional[list[int]]:
    """The configuration's patch size from the first model folder whose plans.json has it."""
    for row in rows:
        cfg = _read_json(Path(row["model_folder"]) / "plans.json").get("configurations", {}).get(configuration, {})
        if "patch_size" in cfg:
            return list(cfg["patch_size"])
    return None


def run(dataset: str, configuration: str = "3d_fullres", fold: str = "0", plans: str = "nnUNetPlans",
        out: Optional[str] = None, latency: bool = True, device: str = "cpu", runs: int = 5, test: bool = True,
        tta: bool = False) -> tuple[str, Path]:
    """The report: collect every model's row, write report.md/json/png into `out` (default:
    $nnUNet_results/<Dataset>/recokd_report). Returns (the Markdown, the output folder)."""
    name, root = results_root(dataset)
    out_dir = Path(out) if out else root / DEFAULT_OUT
    held_out = test_set(name) if test else None
    rows = collect_rows(name, configuration, str(fold), plans, latency, device, runs, held_out,
                        out_dir / "test_predictions", tta)
    meta = {"dataset": name, "configuration": configuration, "fold": str(fold), "plans": plans,
            "device": device if latency else "latency not measured", "runs": runs,
            "patch_size": patch_size(rows, configuration),
            "test_set": str(held_out[0]) if held_out else None, "test_tta": tta if held_out else None}
    return write_outputs(rows, out_dir, meta), out_dir
