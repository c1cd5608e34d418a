"""`nnunetv2_recokd report`: parsing of a results folder made here, and the table's numbers against the
summary.json and checkpoints they came from.

The fake $nnUNet_results/Dataset992_Report holds what nnU-Net would have written after training: per model
folder plans.json, dataset.json, fold_0/checkpoint_final.pth and fold_0/validation/summary.json (Dice values
written by hand, so any re-computation or rounding in the report would show).
"""

from __future__ import annotations

import json
import math
from copy import deepcopy
from pathlib import Path

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_recokd import sandbox
from nnunetv2_recokd.cli import main as cli_main
from nnunetv2_recokd.evaluation import report
from nnunetv2_recokd.evaluation.summary import class_names, read_summary
from nnunetv2_recokd.evaluation.tables import NOT_VALIDATED, report_table
from nnunetv2_recokd.student import build_student_network

DATASET = "Dataset992_Report"
STUDENT_SPEC = {"width": 0.25, "min_channels": 8}
# per trainer: (Dice organ, Dice lesion, foreground mean, number of validation cases)
DICE = {"nnUNetTrainer": (0.912345, 0.701234, 0.8067895, 3),
        "nnUNetTrainerStudent": (0.854321, 0.612345, 0.733333, 3),
        "nnUNetTrainerReCoKD": (0.887766, 0.655443, 0.7716045, 3)}


def _summary(organ: float, lesion: float, mean: float, n_cases: int) -> dict:
    """A summary.json in nnU-Net's format (keys as save_summary_json writes them)."""
    per_case = [{"metrics": {"1": {"Dice": organ, "IoU": 0.5}, "2": {"Dice": lesion, "IoU": 0.5}},
                 "prediction_file": f"case_{i}.nii.gz", "reference_file": f"gt_{i}.nii.gz"} for i in range(n_cases)]
    return {"foreground_mean": {"Dice": mean, "IoU": 0.5},
            "mean": {"1": {"Dice": organ, "IoU": 0.5, "n_ref": 10}, "2": {"Dice": lesion, "IoU": 0.5, "n_ref": 3}},
            "metric_per_case": per_case}


def _write_model(results: Path, trainer: str, width: float, validated: bool = True) -> int:
    """One model folder as nnUNetv2_train leaves it; returns the parameter count of the saved network."""
    plans = sandbox.unet_plans((16, 32, 64), (16, 16, 16), dataset_name=DATASET)
    if width < 1:
        plans["configurations"]["3d_fullres"]["recokd_student"] = dict(STUDENT_SPEC)
    dataset = sandbox.dataset_json()
    folder = results / DATASET / f"{trainer}__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    pm = PlansManager(deepcopy(plans))
    torch.manual_seed(0)
    net = build_student_network(pm.get_configuration("3d_fullres"), 1, 3, True, width, 8)
    torch.save({"network_weights": net.state_dict(), "trainer_name": trainer,
                "init_args": {"configuration": "3d_fullres"}}, folder / "fold_0" / "checkpoint_final.pth")
    if validated:
        (folder / "fold_0" / "validation").mkdir()
        (folder / "fold_0" / "validation" / "summary.json").write_text(json.dumps(_summary(*DICE[trainer])))
    return sum(p.numel() for p in net.parameters())


@pytest.fixture()
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, int]]:
    """$nnUNet_results with the teacher and two students; returns (results root, params per trainer)."""
    for name in ("raw", "preprocessed", "results"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(f"nnUNet_{name}", str(tmp_path / name))
    (tmp_path / "raw" / DATASET).mkdir()  # so that the ID 992 resolves
    params = {"nnUNetTrainer": _write_model(tmp_path / "results", "nnUNetTrainer", 1.0),
              "nnUNetTrainerStudent": _write_model(tmp_path / "results", "nnUNetTrainerStudent", 0.25),
              "nnUNetTrainerReCoKD": _write_model(tmp_path / "results", "nnUNetTrainerReCoKD", 0.25)}
    return tmp_path / "results", params


def test_rows_match_summary_and_checkpoints(results: tuple[Path, dict[str, int]]) -> None:
    root, params = results
    rows = report.collect_rows("992", latency=False)
    assert [r["trainer"] for r in rows] == ["nnUNetTrainer", "nnUNetTrainerStudent", "nnUNetTrainerReCoKD"]
    assert params["nnUNetTrainerStudent"] < params["nnUNetTrainer"] / 4  # the students really are narrow
    for row in rows:
        organ, lesion, mean, n_cases = DICE[row["trainer"]]
        summary = json.loads((Path(row["model_folder"]) / "fold_0" / "validation" / "summary.json").read_text())
        assert row["dice"] == {"organ": summary["mean"]["1"]["Dice"], "lesion": summary["mean"]["2"]["Dice"]}
        assert row["dice"] == {"organ": organ, "lesion": lesion}
        assert row["mean_dice"] == summary["foreground_mean"]["Dice"] == mean
        assert row["n_cases"] == n_cases and row["status"] == "validated"
        assert row["params"] == params[row["trainer"]]
        assert row["latency_ms"] is None
    assert [r["width"] for r in rows] == [1.0, 0.25, 0.25]
    assert [r["role"] for r in rows] == ["teacher", "student", "student"]


def test_markdown_json_png_written(results: tuple[Path, dict[str, int]], tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    root, params = results
    out = tmp_path / "report_out"
    assert cli_main(["report", DATASET, "--no-latency", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    text = (out / "report.md").read_text()
    for trainer, (organ, lesion, mean, _) in DICE.items():
        line = next(li for li in text.splitlines() if li.startswith(f"| {trainer} ") or
                    li.startswith(f"| {trainer} (teacher)"))
        for number in (f"{organ:.4f}", f"{lesion:.4f}", f"{mean:.4f}", f"{params[trainer] / 1e6:.3f}"):
            assert number in line, (number, line)
        assert line in printed
    assert "Dice organ" in text and "Dice lesion" in text and "nnUNetTrainer (teacher)" in text
    saved = json.loads((out / "report.json").read_text())
    assert saved["dataset"] == DATASET and saved["patch_size"] == [16, 16, 16]
    assert {r["trainer"]: r["mean_dice"] for r in saved["rows"]} == {t: v[2] for t, v in DICE.items()}
    assert (out / "report.png").stat().st_size > 1000


def test_default_out_folder_and_not_validated(results: tuple[Path, dict[str, int]]) -> None:
    root, params = results
    _write_model(root, "nnUNetTrainerLogitKD", 0.25, validated=False)
    (root / DATASET / "nnUNetTrainerStudent__nnUNetPlans__3d_fullres" / "fold_0" / "validation" /
     "summary.json").unlink()
    assert cli_main(["report", "992", "--no-latency"]) == 0
    out = root / DATASET / report.DEFAULT_OUT
    rows = {r["trainer"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert rows["nnUNetTrainerLogitKD"]["status"] == NOT_VALIDATED
    assert rows["nnUNetTrainerStudent"]["status"] == NOT_VALIDATED
    assert rows["nnUNetTrainerStudent"]["params"] == params["nnUNetTrainerStudent"]  # checkpoint still counted
    assert rows["nnUNetTrainerReCoKD"]["mean_dice"] == DICE["nnUNetTrainerReCoKD"][2]
    text = (out / "report.md").read_text()
    assert any(li.startswith("| nnUNetTrainerLogitKD ") and NOT_VALIDATED in li for li in text.splitlines())
    assert (out / "report.png").is_file()


def test_region_labels_and_unknown_reference(results: tuple[Path, dict[str, int]]) -> None:
    """Region keys ('(1, 2)') map to dataset.json's region names; a foreign trainer is a 'reference' row."""
    names = class_names(sandbox.dataset_json(regions=True))
    summary = {"foreground_mean": {"Dice": 0.5}, "mean": {"(1, 2)": {"Dice": 0.6}, "2": {"Dice": 0.4}},
               "metric_per_case": [{}]}
    path = results[0] / "summary.json"
    path.write_text(json.dumps(summary))
    assert read_summary(path, names) == {"dice": {"whole": 0.6, "core": 0.4}, "mean_dice": 0.5, "n_cases": 1}
    assert report.role("nnUNetTrainerSomeoneElse") == "reference"
    assert report.role("nnUNetTrainerTeacher") == "teacher"


def test_missing_dataset_results_and_configuration(results: tuple[Path, dict[str, int]], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit, match="dataset '993' not found"):
        cli_main(["report", "993", "--no-latency"])
    with pytest.raises(SystemExit, match=r"Dataset993_Nope.*does not exist.*nnUNet_results"):
        cli_main(["report", "Dataset993_Nope", "--no-latency"])
    with pytest.raises(SystemExit, match=r"no results folder \*__nnUNetPlans__2d/fold_0.*nnUNetTrainer__nnUNetPlans"):
        cli_main(["report", "992", "-c", "2d", "--no-latency"])
    with pytest.raises(SystemExit, match="fold_3"):
        cli_main(["report", "992", "-f", "3", "--no-latency"])
    monkeypatch.delenv("nnUNet_results")
    with pytest.raises(SystemExit, match="nnUNet_results is not set"):
        cli_main(["report", "992", "--no-latency"])


def test_latency_on_tiny_networks(results: tuple[Path, dict[str, int]]) -> None:
    """Networks rebuilt through nnU-Net's predictor; our trainers need the shim (else n/a with a reason)."""
    rows = {r["trainer"]: r for r in report.collect_rows(DATASET, latency=True, runs=2)}
    teacher = rows["nnUNetTrainer"]
    assert isinstance(teacher["latency_ms"], float) and teacher["latency_ms"] > 0 and not math.isnan(
        teacher["latency_ms"])
    for name in ("nnUNetTrainerStudent", "nnUNetTrainerReCoKD"):
        row = rows[name]
        assert (isinstance(row["latency_ms"], float) and row["latency_ms"] > 0) or \
               (row["latency_ms"] is None and row["latency_note"]), row
    assert "n/a" in report_table([{**rows["nnUNetTrainerStudent"], "latency_ms": None,
                                         "latency_note": "RuntimeError: trainer not found"}])


def test_a_leaky_teachers_student_is_marked_optimistic(results: tuple[Path, dict[str, int]]) -> None:
    root, _ = results
    path = root / DATASET / "nnUNetTrainerReCoKD__nnUNetPlans__3d_fullres" / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["recokd"] = {"teacher_saw_validation_cases": {"cases": 3, "of": 3, "teacher_fold": "all",
                                                             "source": "fold_all (trained on every case)"}}
    torch.save(checkpoint, path)
    rows = report.collect_rows("992", latency=False)
    assert [r["validation_optimistic"] is not None for r in rows] == [False, False, True]
    text = report_table(rows)
    line = next(li for li in text.splitlines() if li.startswith("| nnUNetTrainerReCoKD "))
    assert "0.7716 (optimistic)" in line
    assert "nnUNetTrainerReCoKD: validation OPTIMISTIC: its teacher was trained on 3 of the 3" in text
    assert "(optimistic)" not in next(li for li in text.splitlines() if li.startswith("| nnUNetTrainerStudent "))
    ensemble = {**rows[2], "validation_optimistic": {"cases": 3, "of": 3, "teacher_fold": [1, 2, 3, 4],
                                                     "source": "splits_final.json"}}
    text = report_table([ensemble])
    assert "0.7716 (optimistic)" in text and "its teachers (folds 1, 2, 3, 4) were trained on 3 of the 3" in text


def test_held_out_cases_are_found_only_with_images_and_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    folder = tmp_path / DATASET
    (folder / "imagesTs").mkdir(parents=True)
    (folder / "imagesTs" / "case_0000.nii.gz").touch()
    assert report.test_set(DATASET) is None  # no labelsTs: nothing to score against
    (folder / "labelsTs").mkdir()
    assert report.test_set(DATASET) is None  # empty labelsTs
    (folder / "labelsTs" / "case.nii.gz").touch()
    assert report.test_set(DATASET) == (folder / "imagesTs", folder / "labelsTs")
    monkeypatch.delenv("nnUNet_raw")
    assert report.test_set(DATASET) is None


def test_held_out_table_lists_dice_and_seconds_per_case():
    row = {"trainer": "nnUNetTrainerReCoKD", "role": "student", "width": 0.25, "params": 1000, "status": "validated",
           "dice": {"organ": 0.9}, "mean_dice": 0.9, "latency_ms": None, "latency_note": None, "checkpoint": "c",
           "n_cases": 2, "test": {"dice": {"organ": 0.81234, "lesion": 0.5}, "mean_dice": 0.65617, "n_cases": 4,
                                  "seconds_per_case": 1.234}, "test_note": None}
    failed = {**row, "trainer": "nnUNetTrainerStudent", "test": None, "test_note": "RuntimeError: no trainer"}
    text = report_table([row, failed])
    assert "Held-out cases (imagesTs/labelsTs, 4 cases" in text
    assert "| nnUNetTrainerReCoKD | 0.8123 | 0.5000 | 0.6562 | 1.23 |" in text
    assert "| nnUNetTrainerStudent | - | - | - | - |" in text
    assert "nnUNetTrainerStudent: held-out cases not evaluated: RuntimeError: no trainer" in text
    assert "Held-out" not in report_table([{**row, "test": None}])
    # with the deploy extra each model is also timed on the CPU runtime, in a column of its own
    timed = {**row, "test": {**row["test"], "runtime_seconds_per_case": 0.1234, "runtime": "openvino"}}
    text = report_table([timed, failed])
    assert "| mean Dice | s / case | s / case, CPU openvino |" in text
    assert "| nnUNetTrainerReCoKD | 0.8123 | 0.5000 | 0.6562 | 1.23 | 0.12 |" in text
    assert "| nnUNetTrainerStudent | - | - | - | - | - |" in text


def test_a_student_of_teacher_labelled_cases_says_how_many_and_what_its_validation_means(
        results: tuple[Path, dict[str, int]]) -> None:
    root, _ = results
    fold = root / DATASET / "nnUNetTrainerReCoKD__nnUNetPlans__3d_fullres" / "fold_0"
    (fold / "recokd_training_cases.json").write_text(json.dumps(
        {"real": 0, "teacher_labelled": 12, "validation_teacher_labelled": 3, "validation": 3,
         "teacher_label_weight": 0.5, "teacher": "/t"}))
    try:
        rows = {r["trainer"]: r for r in report.collect_rows("992", latency=False)}
        text = report_table(list(rows.values()))
    finally:
        (fold / "recokd_training_cases.json").unlink()
    assert rows["nnUNetTrainerReCoKD"]["training_cases"]["teacher_labelled"] == 12
    assert rows["nnUNetTrainerStudent"]["training_cases"] is None
    line = next(li for li in text.splitlines() if li.startswith("| nnUNetTrainerReCoKD "))
    assert "(vs teacher)" in line
    assert ("nnUNetTrainerReCoKD: trained on 0 cases with real labels and 12 labelled by the teacher (seg-loss "
            "weight 0.5)") in text
    assert "AGREEMENT WITH THE TEACHER" in text
    (fold / "recokd_training_cases.json").write_text(json.dumps(
        {"real": 8, "teacher_labelled": 4, "teacher_label_weight": 1.0, "min_agreement": 0.75}))
    try:
        text = report_table(report.collect_rows("992", latency=False))
    finally:
        (fold / "recokd_training_cases.json").unlink()
    assert ("trained on 8 cases with real labels and 4 labelled by the teacher (seg-loss weight 1; ignore label "
            "where fewer than 0.75 of the teacher's mirrorings agreed)") in text
