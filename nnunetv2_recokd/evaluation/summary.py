"""Dice as nnU-Net's evaluation writes it: summary.json read back per class, and nnU-Net's own scoring of a folder.

Every command that reports a Dice reads it here (demo, report, evaluate-dose, gpu-check): the numbers are copied
unchanged from the summary.json nnU-Net wrote (its validation after training, or nnUNetv2_evaluate_folder /
compute_metrics_on_folder on predictions), never computed again.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Optional, Union

from nnunetv2_recokd.evaluation.timing import Stopwatch

SUMMARY = "summary.json"


def validation_summary(model_folder: Union[str, Path], fold: Union[str, int]) -> Path:
    """Where nnU-Net's validation after training writes its summary: <model folder>/fold_<f>/validation/."""
    return Path(model_folder) / f"fold_{fold}" / "validation" / SUMMARY


def region_key(key: str) -> tuple[int, ...]:
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


def read_summary(path: Union[str, Path], names: dict[tuple[int, ...], str]) -> dict[str, Any]:
    """Per-class Dice (keyed by class name where dataset.json has one), mean foreground Dice and case count,
    copied unchanged from nnU-Net's summary.json."""
    summary = json.loads(Path(path).read_text())
    dice = {}
    for key, metrics in summary.get("mean", {}).items():
        try:
            label = names.get(region_key(key), key)
        except ValueError:  # a key nnU-Net would never write: keep it as it is
            label = key
        dice[label] = metrics.get("Dice")
    return {"dice": dice, "mean_dice": summary.get("foreground_mean", {}).get("Dice"),
            "n_cases": len(summary.get("metric_per_case", []))}


def read_dice(summary_file: Union[str, Path], model_folder: Union[str, Path]) -> dict[str, Any]:
    """read_summary with the class names of the model folder's dataset.json, the case count under "cases" (the
    demo's table keys)."""
    dataset_json = json.loads((Path(model_folder) / "dataset.json").read_text())
    result = read_summary(summary_file, class_names(dataset_json))
    return {"dice": result["dice"], "mean_dice": result["mean_dice"], "cases": result["n_cases"]}


def summary_mean_dice(path: Union[str, Path]) -> Optional[float]:
    """The mean foreground Dice of a summary.json; None when the file is missing or unreadable."""
    try:
        summary = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return summary.get("foreground_mean", {}).get("Dice")


def score_predictions(predictor, labels: Union[str, Path], predictions: Union[str, Path]) -> dict[str, Any]:
    """nnU-Net's compute_metrics_on_folder of `predictions` against `labels` with an initialized nnUNetPredictor's
    labels, reader and file ending (summary.json written into `predictions`); read back with read_summary."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder

    predictions = Path(predictions)
    manager = predictor.plans_manager.get_label_manager(predictor.dataset_json)
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints per case
        compute_metrics_on_folder(str(labels), str(predictions), str(predictions / SUMMARY),
                                  predictor.plans_manager.image_reader_writer_class(),
                                  predictor.dataset_json["file_ending"],
                                  manager.foreground_regions if manager.has_regions else manager.foreground_labels,
                                  manager.ignore_label, num_processes=1)
    return read_summary(predictions / SUMMARY, class_names(predictor.dataset_json))


def predict_and_score(predictor, images: Union[str, Path], predictions: Union[str, Path],
                      labels: Union[str, Path]) -> tuple[dict[str, Any], float]:
    """An initialized nnUNetPredictor's prediction of `images` into `predictions` (nnU-Net's own pipeline, in this
    process), scored against `labels` by score_predictions: (Dice per class, mean foreground Dice, case count) and
    the prediction's wall seconds (preprocessing and export included, scoring not)."""
    predictions = Path(predictions)
    predictions.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()), Stopwatch() as watch:  # nnU-Net prints per case
        predictor.predict_from_files_sequential(str(images), str(predictions), save_probabilities=False,
                                                overwrite=True)
    return score_predictions(predictor, labels, predictions), watch.seconds
