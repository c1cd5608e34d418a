"""`nnunetv2_recokd report`: compare the teacher and our distilled students on the user's own data.

Everything comes from what nnU-Net already wrote into ``$nnUNet_results/<Dataset>``: one model folder
``<Trainer>__<plans>__<configuration>`` per trainer, with ``plans.json``, ``dataset.json`` and
``fold_<f>/validation/summary.json`` (written by nnU-Net's validation after training) plus the fold's
checkpoint. Per model we report the validation Dice per class and the mean foreground Dice exactly as
summary.json has them (no re-evaluation, so the numbers are nnU-Net's own), the parameter count of the saved
network, the student width recorded in plans.json and, optionally, the latency of one forward pass on one
patch of the configuration's patch size, with the network rebuilt exactly as ``nnUNetv2_predict`` rebuilds it.

Output: a Markdown table on stdout, and report.md, report.json and report.png in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional, Union

import torch

from nnunetv2_recokd.profiling import inference_latency_ms
from nnunetv2_recokd.unlabeled import TRAINING_CASES_FILE, min_agreement_note

TEACHER_TRAINER = "nnUNetTrainer"
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth")
NOT_VALIDATED = "not validated yet"
DEFAULT_OUT = "recokd_report"
REPORT_RUNTIME = "openvino"  # held-out cases are also timed on this CPU runtime (deploy extra) beside nnU-Net's
_BUFFER_SUFFIXES = ("running_mean", "running_var")  # BatchNorm statistics: stored floats, not parameters


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


def _role(trainer: str) -> str:
    """'teacher' for nnU-Net's stock trainer and our teacher trainer, 'student' for our other trainers,
    'reference' for any other trainer found (someone's own baseline: shown, never dropped)."""
    from nnunetv2_recokd.trainers import PUBLIC_TRAINERS

    if trainer in (TEACHER_TRAINER, "nnUNetTrainerTeacher"):
        return "teacher"
    return "student" if trainer in PUBLIC_TRAINERS else "reference"


def _sort_key(trainer: str) -> tuple[int, int, str]:
    """Teacher(s) first, then references, then our trainers in the order of PUBLIC_TRAINERS."""
    from nnunetv2_recokd.trainers import PUBLIC_TRAINERS

    order = {"teacher": 0, "reference": 1, "student": 2}[_role(trainer)]
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
def _region_key(key: str) -> tuple[int, ...]:
    """summary.json's key of a label ('1') or region ('(1, 2)') as a sorted tuple of label values."""
    from nnunetv2.evaluation.evaluate_predictions import key_to_label_or_region

    value = key_to_label_or_region(key)
    return tuple(sorted(value)) if isinstance(value, tuple) else (value,)


def class_names(dataset_json: dict) -> dict[tuple[int, ...], str]:
    """dataset.json "labels" (name -> value or list of values for regions) as label-values -> name."""
    names = {}
    for name, value in (dataset_json.get("labels") or {}).items():
        values = tuple(sorted(int(v) for v in value)) if isinstance(value, (list, tuple)) else (int(value),)
        names.setdefault(values, name)
    return names


def read_summary(path: Path, names: dict[tuple[int, ...], str]) -> dict[str, Any]:
    """Per-class Dice (keyed by class name where dataset.json has one), mean foreground Dice and case count,
    copied unchanged from nnU-Net's summary.json."""
    summary = json.loads(path.read_text())
    dice = {}
    for key, metrics in summary.get("mean", {}).items():
        try:
            label = names.get(_region_key(key), key)
        except ValueError:  # a key nnU-Net would never write: keep it as it is
            label = key
        dice[label] = metrics.get("Dice")
    return {"dice": dice, "mean_dice": summary.get("foreground_mean", {}).get("Dice"),
            "n_cases": len(summary.get("metric_per_case", []))}


def find_checkpoint(fold_folder: Path) -> Optional[Path]:
    """checkpoint_final.pth, else checkpoint_best.pth (a run stopped early), else None."""
    return next((fold_folder / c for c in CHECKPOINTS if (fold_folder / c).is_file()), None)


def count_checkpoint_parameters(checkpoint: Union[Path, dict]) -> int:
    """Number of parameters in ``network_weights``: floating tensors counted once per storage (decoder.encoder
    is the encoder, so its state-dict entries share the encoder's tensors), BatchNorm statistics left out."""
    loaded = checkpoint if isinstance(checkpoint, dict) else torch.load(checkpoint, map_location="cpu",
                                                                        weights_only=False)
    weights = loaded["network_weights"]
    seen, total = set(), 0
    for name, tensor in weights.items():
        if not torch.is_tensor(tensor) or not tensor.is_floating_point() or name.endswith(_BUFFER_SUFFIXES):
            continue
        key = (tensor.data_ptr(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel()
    return total


def student_width(plans: dict, configuration: str, trainer: str) -> float:
    """The width recorded in plans.json (``recokd_student``), else the trainer's shipped default, else 1."""
    from nnunetv2_recokd.config import SettingsError, default_settings
    from nnunetv2_recokd.student import PLANS_KEY

    spec = plans.get("configurations", {}).get(configuration, {}).get(PLANS_KEY) or {}
    if "width" in spec:
        return float(spec["width"])
    if _role(trainer) == "student":
        try:
            return float(default_settings(trainer).student_width)
        except SettingsError:
            pass
    return 1.0


# ----------------------------------------------------------------------------------- latency
def measure_latency(model_folder: Path, fold: str, checkpoint: Path, device: str, runs: int) -> float:
    """Median ms of one forward pass on one random patch (batch 1), the network rebuilt the way nnUNetv2_predict
    does (trainer class found by nnU-Net's own lookup, deep supervision off, eval mode, no grad)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    dev = torch.device(device)
    folds = (fold if fold == "all" else int(fold),)
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's notes on CPU devices and checkpoints
        predictor = nnUNetPredictor(device=dev, perform_everything_on_device=dev.type == "cuda", verbose=False,
                                    allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=folds,
                                                       checkpoint_name=checkpoint.name)
    net = predictor.network.to(dev).eval()
    decoder = getattr(getattr(net, "_orig_mod", net), "decoder", None)
    if decoder is not None and hasattr(decoder, "deep_supervision"):
        decoder.deep_supervision = False
    channels = determine_num_input_channels(predictor.plans_manager, predictor.configuration_manager,
                                            predictor.dataset_json)
    return inference_latency_ms(net, predictor.configuration_manager.patch_size, channels, runs=max(1, runs),
                                device=dev)


def _latency_or_reason(model_folder: Path, fold: str, checkpoint: Optional[Path], device: str,
                       runs: int) -> tuple[Optional[float], Optional[str]]:
    """(ms, None), or (None, why not): a missing trainer class (shim not installed) must not end the report."""
    if checkpoint is None:
        return None, "no checkpoint"
    try:
        return measure_latency(model_folder, fold, checkpoint, device, runs), None
    except BaseException as e:  # nnU-Net's trainer lookup imports every trainer module: anything can surface
        if isinstance(e, KeyboardInterrupt):
            raise
        hint = " (run `nnunetv2_recokd install`)" if "trainer" in str(e).lower() else ""
        first_line = (str(e).splitlines() or [""])[0][:200]
        return None, f"{type(e).__name__}: {first_line}{hint}"


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
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunetv2_recokd.inputs.channels import DATASET_KEY, student_input_files

    dev = torch.device(device)
    out.mkdir(parents=True, exist_ok=True)
    student_dataset = _read_json(model_folder / "dataset.json")
    if DATASET_KEY in student_dataset:  # a student that reads fewer channels: its files, under its numbers
        student_images = out.parent / f"{out.name}_inputs"
        student_input_files(images, student_images, student_dataset)
        images = student_images
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints per case
        predictor = nnUNetPredictor(use_mirroring=tta, device=dev, perform_everything_on_device=dev.type == "cuda",
                                    verbose=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=(fold if fold == "all"
                                                                                     else int(fold),),
                                                       checkpoint_name=checkpoint.name)
        start = time.perf_counter()
        predictor.predict_from_files_sequential(str(images), str(out), save_probabilities=False, overwrite=True)
        seconds = time.perf_counter() - start
        labels_manager = predictor.plans_manager.get_label_manager(predictor.dataset_json)
        compute_metrics_on_folder(str(labels), str(out), str(out / "summary.json"),
                                  predictor.plans_manager.image_reader_writer_class(),
                                  predictor.dataset_json["file_ending"],
                                  labels_manager.foreground_regions if labels_manager.has_regions
                                  else labels_manager.foreground_labels, labels_manager.ignore_label, num_processes=1)
    result = read_summary(out / "summary.json", class_names(predictor.dataset_json))
    result["seconds_per_case"] = seconds / max(1, result["n_cases"])
    result["runtime_seconds_per_case"], result["runtime"] = runtime_seconds_per_case(
        model_folder, fold, checkpoint, images, out.parent / f"{out.name}_{REPORT_RUNTIME}", tta)
    return result


def runtime_seconds_per_case(model_folder: Path, fold: str, checkpoint: Path, images: Path, out: Path,
                             tta: bool) -> tuple[Optional[float], Optional[str]]:
    """Seconds per case of the same prediction on the CPU with `nnunetv2_recokd predict`'s runtime (model load and
    compilation excluded, as for nnU-Net's predictor above), or (None, None) without the deploy extra."""
    from nnunetv2_recokd.deploy.modelfolder import DeployError, open_model_folder
    from nnunetv2_recokd.deploy.predictor import build_predictor, check_input_folder, predict_cases

    try:
        model = open_model_folder(model_folder, [fold], checkpoint.name)
        predictor = build_predictor(model, REPORT_RUNTIME, tta, 0.5)
    except DeployError:
        return None, None
    timings = predict_cases(predictor, check_input_folder(images, model.dataset_json), out, log=lambda m: None)
    return sum(t.total_s for t in timings) / max(1, len(timings)), REPORT_RUNTIME


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
    loaded = torch.load(checkpoint, map_location="cpu", weights_only=False) if checkpoint else {}
    summary_path = fold_folder / "validation" / "summary.json"
    row: dict[str, Any] = {"trainer": trainer, "role": _role(trainer), "model_folder": str(model_folder),
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
        row["latency_ms"], row["latency_note"] = _latency_or_reason(model_folder, fold, checkpoint, device, runs)
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
def _class_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Union of the class names of all rows, in order of first appearance."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row["dice"] if c not in columns]
    return columns


def _fmt(value: Optional[float], spec: str, missing: str = "-") -> str:
    if value is None:
        return missing
    return "nan" if isinstance(value, float) and math.isnan(value) else format(value, spec)


def _label(row: dict[str, Any]) -> str:
    return f"{row['trainer']} (teacher)" if row["trainer"] == TEACHER_TRAINER else row["trainer"]


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The comparison table: trainer, width, params (M), Dice per class, mean Dice, latency; notes below it."""
    classes = _class_columns(rows)
    header = ["trainer", "width", "params (M)", *[f"Dice {c}" for c in classes], "mean Dice", "latency (ms)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for row in rows:
        params = _fmt(row["params"] / 1e6 if row["params"] is not None else None, ".3f")
        mean = _fmt(row["mean_dice"], ".4f") if row["status"] == "validated" else NOT_VALIDATED
        leak = row.get("validation_optimistic")
        if leak and row["status"] == "validated":
            mean += " (optimistic)"
            folds = leak["teacher_fold"]
            if isinstance(folds, list):  # an ensemble of teachers (several folds)
                notes.append(f"- {row['trainer']}: validation OPTIMISTIC: its teachers (folds "
                             f"{', '.join(map(str, folds))}) were trained on {leak['cases']} of the {leak['of']} "
                             f"validation cases between them; held-out cases (imagesTs/labelsTs) give the honest Dice")
            else:
                notes.append(f"- {row['trainer']}: validation OPTIMISTIC: its teacher was trained on {leak['cases']} "
                             f"of the {leak['of']} validation cases (teacher fold {folds})")
        cases = row.get("training_cases")
        if cases:
            notes.append(f"- {row['trainer']}: trained on {cases['real']} cases with real labels and "
                         f"{cases['teacher_labelled']} labelled by the teacher (seg-loss weight "
                         f"{cases.get('teacher_label_weight', 1):g}{min_agreement_note(cases.get('min_agreement'))})")
            if cases.get("validation_teacher_labelled") and row["status"] == "validated":
                mean += " (vs teacher)"
                notes.append(f"- {row['trainer']}: {cases['validation_teacher_labelled']} of its "
                             f"{cases.get('validation')} validation cases are labelled by the teacher: its validation "
                             f"Dice is AGREEMENT WITH THE TEACHER, not accuracy")
        dice = [_fmt(row["dice"].get(c), ".4f") for c in classes]
        latency = _fmt(row["latency_ms"], ".1f", "n/a")
        lines.append("| " + " | ".join([_label(row), f"{row['width']:g}", params, *dice, mean, latency]) + " |")
        if row["latency_ms"] is None and row["latency_note"] and "--no-latency" not in row["latency_note"]:
            notes.append(f"- {row['trainer']}: latency n/a: {row['latency_note']}")
        if row["status"] == "validated":
            ckpt = row["checkpoint"] or "no checkpoint"
            notes.append(f"- {row['trainer']}: {row['n_cases']} validation cases, {ckpt}")
    return "\n".join(lines + ([""] + notes if notes else []) + _test_table(rows)) + "\n"


def _test_table(rows: list[dict[str, Any]]) -> list[str]:
    """Lines of the held-out table (Dice on imagesTs/labelsTs, seconds per case), empty when nothing was tested."""
    tested = [r for r in rows if r.get("test") or r.get("test_note")]
    if not tested:
        return []
    classes: list[str] = []
    for row in tested:
        classes += [c for c in (row["test"] or {}).get("dice", {}) if c not in classes]
    n_cases = max((row["test"] or {}).get("n_cases", 0) for row in tested)
    runtime = next((r["test"]["runtime"] for r in tested if r["test"] and r["test"].get("runtime")), None)
    header = ["trainer", *[f"Dice {c}" for c in classes], "mean Dice", "s / case"] + (
        [f"s / case, CPU {runtime}"] if runtime else [])
    lines = ["", f"Held-out cases (imagesTs/labelsTs, {n_cases} cases; nnU-Net's predictor and evaluation; not seen "
                 f"by any teacher or student):", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in tested:
        test = row["test"]
        if test is None:
            lines.append("| " + " | ".join([_label(row), *["-"] * (len(header) - 1)]) + " |")
            continue
        lines.append("| " + " | ".join([_label(row), *[_fmt(test["dice"].get(c), ".4f") for c in classes],
                                        _fmt(test["mean_dice"], ".4f"), _fmt(test["seconds_per_case"], ".2f"),
                                        *([_fmt(test.get("runtime_seconds_per_case"), ".2f")] if runtime else [])])
                     + " |")
    lines += [f"- {r['trainer']}: held-out cases not evaluated: {r['test_note']}" for r in tested if r["test_note"]]
    return lines


def plot(rows: list[dict[str, Any]], path: Union[str, Path]) -> None:
    """report.png: Dice per class per model (grouped bars) and latency per model with parameters annotated
    (parameter bars instead when no latency was measured). Agg canvas: no display, global backend untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    validated = [r for r in rows if r["status"] == "validated"]
    classes = _class_columns(validated) + ["mean"]
    width = 0.8 / max(1, len(validated))
    for i, row in enumerate(validated):
        values = [row["dice"].get(c) for c in classes[:-1]] + [row["mean_dice"]]
        xs = [k + (i - (len(validated) - 1) / 2) * width for k in range(len(classes))]
        left.bar(xs, [v if v is not None else math.nan for v in values], width, label=_label(row))
    left.set_xticks(range(len(classes)), classes)
    left.set_ylim(0, 1)
    left.set_ylabel("validation Dice (nnU-Net summary.json)")
    left.set_title("Dice per class" if validated else "Dice per class (no model validated yet)")
    if validated:
        left.legend(fontsize=7)
    _plot_cost(right, rows)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)


def _plot_cost(ax, rows: list[dict[str, Any]]) -> None:
    """Latency bars (or parameter bars without latency), each annotated with the parameter count."""
    timed = any(r["latency_ms"] is not None for r in rows)
    values = [(r["latency_ms"] if timed else (r["params"] or 0) / 1e6) for r in rows]
    xs = range(len(rows))
    ax.bar(xs, [v if v is not None else 0 for v in values], color="tab:gray")
    for x, row, value in zip(xs, rows, values):
        params = f"{row['params'] / 1e6:.3f} M" if row["params"] is not None else "no ckpt"
        text = params if value is not None else f"n/a\n{params}"
        ax.annotate(text, (x, value or 0), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), [r["trainer"].replace("nnUNetTrainer", "") or "nnUNetTrainer" for r in rows],
                  rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("latency per patch (ms)" if timed else "parameters (M)")
    ax.set_title("latency (parameters annotated)" if timed else "parameters (latency not measured)")


def write_outputs(rows: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> str:
    """report.md, report.json and report.png in `out`; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    heading = (f"# ReCo-KD report: {meta['dataset']} {meta['configuration']} fold {meta['fold']} ({meta['plans']})"
               f"\n\nDice: nnU-Net's validation summary.json of each model. Latency: one forward pass on one "
               f"patch {meta['patch_size']}, batch 1, {meta['device']}, median of {meta['runs']} runs.\n\n")
    text = heading + to_markdown(rows)
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    plot(rows, out / "report.png")
    return text


def _patch_size(rows: list[dict[str, Any]], configuration: str) -> Optional[list[int]]:
    for row in rows:
        cfg = _read_json(Path(row["model_folder"]) / "plans.json").get("configurations", {}).get(configuration, {})
        if "patch_size" in cfg:
            return list(cfg["patch_size"])
    return None


def main(args: argparse.Namespace) -> int:
    """`nnunetv2_recokd report DATASET ...`: collect, print, write report.md/json/png."""
    if args.device.startswith("cuda") and args.latency and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    name, root = results_root(args.dataset)
    out = Path(args.out) if args.out else root / DEFAULT_OUT
    test = test_set(name) if getattr(args, "test", True) else None
    tta = getattr(args, "tta", False)
    rows = collect_rows(name, args.configuration, str(args.fold), args.plans, args.latency, args.device, args.runs,
                        test, out / "test_predictions", tta)
    meta = {"dataset": name, "configuration": args.configuration, "fold": str(args.fold), "plans": args.plans,
            "device": args.device if args.latency else "latency not measured", "runs": args.runs,
            "patch_size": _patch_size(rows, args.configuration),
            "test_set": str(test[0]) if test else None, "test_tta": tta if test else None}
    text = write_outputs(rows, out, meta)
    print(text)
    print(f"written: {out / 'report.md'}, {out / 'report.json'}, {out / 'report.png'}")
    return 0

