"""Teacher, student and model folder must agree, or the run stops before training (and says what to do)."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from nnunetv2_recokd.config import SettingsError
from nnunetv2_recokd.teacher import (
    LoadedTeacher,
    TeacherError,
    TeacherLocation,
    check_compatible,
    find_leakage,
    labeller_leakage,
    teacher_splits,
)
from nnunetv2_recokd.trainers import nnUNetTrainerReCoKD, nnUNetTrainerStudent, nnUNetTrainerStudent_w8
from nnunetv2_recokd.unlabeled import DATASET_KEY
from tests.tiny_nnunet import make_trainer, setup_env, tiny_batch

CFG = "3d_fullres"


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    return setup_env(tmp_path, monkeypatch)


def _config(tmp_path: Path, monkeypatch, **values) -> None:
    path = tmp_path / "override.json"
    path.write_text(json.dumps(values))
    monkeypatch.setenv("RECOKD_CONFIG", str(path))


def _teacher_of_fold(tmp_path: Path, monkeypatch, fold, summary_cases=None) -> Path:
    """Copy the tiny random teacher into a model folder whose checkpoint says it was trained on `fold`."""
    import os

    source = Path(os.environ["RECOKD_TEACHER"])
    folder = tmp_path / "other_teacher" / source.name
    shutil.copytree(source, folder)
    checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
    checkpoint["init_args"]["fold"] = fold
    (folder / f"fold_{fold}").mkdir(exist_ok=True)
    torch.save(checkpoint, folder / f"fold_{fold}" / "checkpoint_final.pth")
    if summary_cases is not None:
        (folder / f"fold_{fold}" / "validation").mkdir()
        (folder / f"fold_{fold}" / "validation" / "summary.json").write_text(json.dumps({"metric_per_case": [
            {"reference_file": f"/raw/labelsTr/{c}.nii.gz", "prediction_file": f"/x/{c}.nii.gz"}
            for c in summary_cases]}))
    monkeypatch.setenv("RECOKD_TEACHER", str(folder / f"fold_{fold}"))
    return folder


def _two_fold_split(plans: dict) -> None:
    """case_000 / case_001 swap roles between fold 0 and fold 1 (the sandbox writes fold 0 only)."""
    import os

    splits = [{"train": ["case_000"], "val": ["case_001"]}, {"train": ["case_001"], "val": ["case_000"]}]
    path = Path(os.environ["nnUNet_preprocessed"]) / plans["dataset_name"] / "splits_final.json"
    path.write_text(json.dumps(splits))


# --------------------------------------------------------------------------------- one width per model folder
def test_a_second_width_in_one_model_folder_is_refused(tiny, tmp_path, monkeypatch):
    first = make_trainer(nnUNetTrainerStudent, *tiny)
    first.initialize()
    folder = Path(first.output_folder_base)
    (folder / "plans.json").write_text(json.dumps(first.plans_manager.plans))  # what nnU-Net's on_train_start does
    first.save_checkpoint(str(folder / "fold_0" / "checkpoint_final.pth"))

    _config(tmp_path, monkeypatch, student_width=0.5)
    with pytest.raises(SettingsError) as e:
        make_trainer(nnUNetTrainerStudent, *tiny).initialize()
    msg = str(e.value)
    assert "0.25" in msg and "0.5" in msg and str(folder) in msg and "fold_0" in msg
    assert "nnUNetv2_predict" in msg  # why: one network for every fold

    _config(tmp_path, monkeypatch, student_width=0.25)  # the recorded width trains on
    make_trainer(nnUNetTrainerStudent, *tiny).initialize()


def test_a_second_set_of_input_channels_in_one_model_folder_is_refused(tmp_path, monkeypatch):
    from tests.test_inputs import _two_channel_setup

    plans, dataset = _two_channel_setup(tmp_path, monkeypatch, {"student_channels": ["ct"]})
    first = make_trainer(nnUNetTrainerStudent, plans, dataset)
    first.initialize()
    folder = Path(first.output_folder_base)
    (folder / "plans.json").write_text(json.dumps(first.plans_manager.plans))
    first.save_checkpoint(str(folder / "fold_0" / "checkpoint_final.pth"))
    _config(tmp_path, monkeypatch, student_channels=None)  # same width, every channel
    with pytest.raises(SettingsError) as e:
        make_trainer(nnUNetTrainerStudent, plans, dataset).initialize()
    assert "reading ['ct']" in str(e.value) and "reading every channel" in str(e.value)
    _config(tmp_path, monkeypatch, student_channels=["ct"])  # the recorded channels train on
    make_trainer(nnUNetTrainerStudent, plans, dataset).initialize()


def test_checkpoint_names_the_teacher_by_its_absolute_path(tiny, tmp_path, monkeypatch):
    import os

    teacher = Path(os.environ["RECOKD_TEACHER"])
    monkeypatch.chdir(teacher.parent)
    monkeypatch.setenv("RECOKD_TEACHER", teacher.name)  # relative to the working directory of this run
    trainer = make_trainer(nnUNetTrainerReCoKD, *tiny)
    trainer.initialize()
    path = Path(trainer.output_folder) / "checkpoint_latest.pth"
    trainer.save_checkpoint(str(path))
    saved = torch.load(path, weights_only=False)["recokd"]["teacher"]
    assert Path(saved).is_absolute() and Path(saved) == (teacher / "fold_0" / "checkpoint_final.pth").resolve()
    monkeypatch.chdir(tmp_path)  # --c from elsewhere, the teacher named by its absolute path
    monkeypatch.setenv("RECOKD_TEACHER", str(teacher))
    resumed = make_trainer(nnUNetTrainerReCoKD, *tiny, continue_training=True)
    resumed.load_checkpoint(str(path))
    assert resumed.current_epoch == 1


def test_a_model_folder_without_checkpoints_takes_any_width(tiny, tmp_path, monkeypatch):
    first = make_trainer(nnUNetTrainerStudent, *tiny)
    folder = Path(first.output_folder_base)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(first.plans_manager.plans))  # a run that died before saving
    make_trainer(nnUNetTrainerStudent_w8, *tiny).initialize()  # its own folder anyway
    _config(tmp_path, monkeypatch, student_width=0.5)
    make_trainer(nnUNetTrainerStudent, *tiny).initialize()


# --------------------------------------------------------------------------------- the teacher's split
def _loaded(tmp_path: Path, fold, summary_cases=None) -> LoadedTeacher:
    folder = tmp_path / "t" / f"fold_{fold}"
    folder.mkdir(parents=True, exist_ok=True)
    if summary_cases is not None:
        (folder / "validation").mkdir()
        (folder / "validation" / "summary.json").write_text(json.dumps({"metric_per_case": [
            {"reference_file": f"/gt/{c}.nii.gz"} for c in summary_cases]}))
    location = TeacherLocation(checkpoint=folder / "checkpoint_final.pth", model_folder=folder.parent, source="test")
    return LoadedTeacher(network=None, location=location, plans={}, dataset_json={"file_ending": ".nii.gz"},
                         configuration=CFG, trainer_name="nnUNetTrainer", notes=[], fold=fold)


SPLITS = [{"train": ["b", "c", "d"], "val": ["a"]}, {"train": ["a", "c", "d"], "val": ["b"]},
          {"train": ["a", "b", "d"], "val": ["c", "d"]}]


def test_same_fold_teacher_saw_none_of_the_validation_cases(tmp_path):
    assert find_leakage(_loaded(tmp_path, 1), 1, ["b"], SPLITS) is None


def test_other_fold_teacher_saw_the_validation_cases(tmp_path):
    leak = find_leakage(_loaded(tmp_path, 2), 0, ["a"], SPLITS)
    assert leak.cases == ["a"] and leak.n_validation == 1 and leak.teacher_fold == 2
    assert "fold 2" in leak.describe() and "splits_final.json" in leak.source


def test_fold_all_teacher_saw_everything(tmp_path):
    leak = find_leakage(_loaded(tmp_path, "all"), 2, ["c", "d"], SPLITS)
    assert leak.cases == ["c", "d"] and "fold_all" in leak.source


def test_fold_all_teacher_with_its_validation_summary_saw_everything(tmp_path):
    # nnUNetv2_train D C all validates on its own training cases and writes their summary: no case was held out
    leak = find_leakage(_loaded(tmp_path, "all", summary_cases=["a", "b", "c", "d"]), 2, ["c", "d"], SPLITS)
    assert leak is not None and leak.cases == ["c", "d"] and "fold_all" in leak.source


def test_the_teachers_own_validation_summary_wins_over_the_split(tmp_path):
    # trained elsewhere with another split: its summary says it held out a and b
    teacher = _loaded(tmp_path, 2, summary_cases=["a", "b"])
    assert find_leakage(teacher, 0, ["a"], SPLITS) is None
    assert find_leakage(teacher, 2, ["c", "d"], SPLITS).cases == ["c", "d"]


def test_unknown_teacher_split_counts_as_seen_unless_same_fold_of_the_same_dataset(tmp_path):
    assert find_leakage(_loaded(tmp_path, 7), 0, ["a"], SPLITS).cases == ["a"]  # no fold 7 in the splits
    # the same fold of the same dataset: the same random split as the student's
    assert find_leakage(_loaded(tmp_path, 7), 7, ["a"], SPLITS, same_dataset=True) is None
    # a teacher of another dataset (e.g. the student's is a derived dataset): its fold 7 says nothing
    assert find_leakage(_loaded(tmp_path, 7), 7, ["a"], None).cases == ["a"]
    assert find_leakage(_loaded(tmp_path, None), 0, ["a"], SPLITS).cases == ["a"]


def test_the_teachers_split_is_its_own_datasets_or_the_setting_never_the_students(tmp_path, monkeypatch):
    pre = tmp_path / "pre"
    (pre / "DatasetT").mkdir(parents=True)
    (pre / "DatasetT" / "splits_final.json").write_text(json.dumps(SPLITS))
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    splits, source = teacher_splits({"dataset_name": "DatasetT"})
    assert splits == SPLITS and source == str(pre / "DatasetT" / "splits_final.json")
    splits, why = teacher_splits({"dataset_name": "DatasetGone"})
    assert splits is None and "no splits_final.json of the teacher's dataset DatasetGone" in why
    own = tmp_path / "teacher_splits.json"  # the setting wins: a teacher whose dataset is not on this machine
    own.write_text(json.dumps([{"train": ["a"], "val": ["b", "c", "d"]}]))
    assert teacher_splits({"dataset_name": "DatasetT"}, own) == ([{"train": ["a"], "val": ["b", "c", "d"]}], str(own))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(TeacherError, match="expected nnU-Net's splits_final.json"):
        teacher_splits({}, tmp_path / "bad.json")
    with pytest.raises(TeacherError, match="not a readable splits_final.json"):
        teacher_splits({}, tmp_path / "missing.json")


def _labeller(tmp_path: Path, folds: list, summary: dict = None) -> Path:
    """A teacher model folder (plans naming DatasetT, dataset.json, fold folders) that labelled a dataset."""
    folder = tmp_path / "labeller"
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps({"dataset_name": "DatasetT"}))
    (folder / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz"}))
    for fold in folds:
        (folder / f"fold_{fold}").mkdir()
    for fold, cases in (summary or {}).items():
        (folder / f"fold_{fold}" / "validation").mkdir()
        (folder / f"fold_{fold}" / "validation" / "summary.json").write_text(json.dumps({"metric_per_case": [
            {"reference_file": f"/gt/{c}.nii.gz"} for c in cases]}))
    return folder


def test_the_teacher_folds_that_labelled_a_dataset_must_not_have_trained_on_its_validation(tmp_path, monkeypatch):
    pre = tmp_path / "pre"
    (pre / "DatasetT").mkdir(parents=True)
    (pre / "DatasetT" / "splits_final.json").write_text(json.dumps(SPLITS))  # the TEACHER's split
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    folder = _labeller(tmp_path, [0, 1, 2])
    assert labeller_leakage(folder, [0], 0, ["a"]) is None  # fold 0 held out a
    leak = labeller_leakage(folder, [0, 1, 2], 0, ["a"])  # folds 1 and 2 trained on a
    assert leak.cases == ["a"] and leak.teacher_fold == [1, 2]
    assert labeller_leakage(folder, [2], 2, ["c", "d"]) is None and labeller_leakage(folder, [0], "all", ["a"]) is None
    # the teacher's split unknown: every validation case counts as seen
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "elsewhere"))
    assert labeller_leakage(folder, [0], 0, ["a"]).cases == ["a"]
    # a fold's validation summary says what it held out, whatever the split
    summarised = _labeller(tmp_path / "s", [1], summary={1: ["a", "b"]})
    assert labeller_leakage(summarised, [1], 0, ["a"]) is None


def test_student_fold_all_has_no_held_out_validation_to_protect(tmp_path):
    assert find_leakage(_loaded(tmp_path, 1), "all", ["a", "b", "c", "d"], SPLITS) is None


def test_trainer_refuses_a_teacher_of_another_fold(tiny, tmp_path, monkeypatch):
    _two_fold_split(tiny[0])
    _teacher_of_fold(tmp_path, monkeypatch, 1)
    with pytest.raises(TeacherError) as e:
        make_trainer(nnUNetTrainerReCoKD, *tiny).initialize()
    msg = str(e.value)
    assert "case_001" in msg and "fold 1" in msg and "allow_leaky_teacher" in msg


def test_allowed_leaky_teacher_marks_the_validation_optimistic(tiny, tmp_path, monkeypatch):
    _two_fold_split(tiny[0])
    _teacher_of_fold(tmp_path, monkeypatch, 1)
    _config(tmp_path, monkeypatch, allow_leaky_teacher=True)
    trainer = make_trainer(nnUNetTrainerReCoKD, *tiny)
    trainer.initialize()
    source = str(Path(os.environ["nnUNet_preprocessed"]) / tiny[0]["dataset_name"] / "splits_final.json")
    assert trainer._leakage == {"cases": 1, "of": 1, "teacher_fold": 1, "source": f"{source}, fold 1"}
    assert "OPTIMISTIC" in Path(trainer.log_file).read_text()
    path = tmp_path / "ckpt.pth"
    trainer.save_checkpoint(str(path))
    assert torch.load(path, weights_only=False)["recokd"]["teacher_saw_validation_cases"]["cases"] == 1


def test_a_dataset_labelled_by_teacher_folds_that_saw_the_validation_is_refused_even_for_the_control(
        tiny, tmp_path, monkeypatch):
    """add-unlabeled's teacher_folds read back: labels made by teacher fold 1, which trained on case_001, would carry
    fold 0's validation case into any student of fold 0, the control trainer's too."""
    _two_fold_split(tiny[0])
    plans, dataset = tiny
    labeller = os.environ["RECOKD_TEACHER"]  # a model folder of the same dataset: its split is the two-fold one

    def derived(folds):
        return {**dataset, DATASET_KEY: {"teacher": labeller, "teacher_folds": folds, "teacher_labelled": ["u0"]}}

    make_trainer(nnUNetTrainerStudent, plans, derived([0])).initialize()  # the student's own fold labelled: fine
    with pytest.raises(TeacherError) as e:
        make_trainer(nnUNetTrainerStudent, plans, derived([0, 1])).initialize()
    assert "folds 0, 1" in str(e.value) and "case_001" in str(e.value) and "add-unlabeled ... -f 0" in str(e.value)
    _config(tmp_path, monkeypatch, allow_leaky_teacher=True)
    trainer = make_trainer(nnUNetTrainerStudent, plans, derived([0, 1]))
    trainer.initialize()
    assert trainer._leakage["cases"] == 1 and trainer._leakage["teacher_fold"] == 1
    assert "OPTIMISTIC" in Path(trainer.log_file).read_text()


def test_teacher_whose_summary_holds_out_the_students_cases_is_accepted(tiny, tmp_path, monkeypatch):
    _two_fold_split(tiny[0])
    _teacher_of_fold(tmp_path, monkeypatch, 1, summary_cases=["case_001"])
    trainer = make_trainer(nnUNetTrainerReCoKD, *tiny)
    trainer.initialize()
    assert trainer._leakage is None


# --------------------------------------------------------------------------------- inputs
def _cascade_plans(plans: dict) -> dict:
    plans = copy.deepcopy(plans)
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": CFG, "previous_stage": "3d_lowres"}
    plans["configurations"]["3d_lowres"] = {"inherits_from": CFG, "data_identifier": "nnUNetPlans_3d_lowres",
                                            "next_stage": "3d_cascade_fullres"}
    return plans


def test_cascade_student_with_a_fullres_teacher_is_refused(tiny):
    plans, dataset = tiny
    with pytest.raises(TeacherError) as e:
        check_compatible(plans, dataset, CFG, _cascade_plans(plans), dataset, "3d_cascade_fullres")
    msg = str(e.value)
    assert "determine_num_input_channels" in msg and "teacher 1 vs student 3" in msg  # 1 channel + 2 labels


def test_ct_statistics_must_match(tiny):
    plans, dataset = tiny
    ct = copy.deepcopy(plans)
    ct["configurations"][CFG]["normalization_schemes"] = ["CTNormalization"]
    other = copy.deepcopy(ct)
    other["foreground_intensity_properties_per_channel"]["0"]["percentile_99_5"] = 1500.0
    check_compatible(ct, dataset, CFG, copy.deepcopy(ct), dataset, CFG)
    with pytest.raises(TeacherError) as e:
        check_compatible(other, dataset, CFG, ct, dataset, CFG)
    assert "percentile_99_5" in str(e.value) and "1500.0" in str(e.value)
    # z-score normalisation does not use the dataset statistics: they may differ
    plain = copy.deepcopy(plans)
    plain["foreground_intensity_properties_per_channel"]["0"]["percentile_99_5"] = 1500.0
    check_compatible(plain, dataset, CFG, plans, dataset, CFG)


# --------------------------------------------------------------------------------- resume
def _checkpoint(tiny, tmp_path) -> str:
    trainer = make_trainer(nnUNetTrainerReCoKD, *tiny)
    trainer.initialize()
    trainer.train_step(tiny_batch())
    path = str(tmp_path / "ckpt.pth")
    trainer.save_checkpoint(path)
    return path


def test_resume_with_another_teacher_names_both(tiny, tmp_path, monkeypatch):
    import os

    path = _checkpoint(tiny, tmp_path)
    original = torch.load(path, weights_only=False)["recokd"]["teacher"]
    other = tmp_path / "copy_of_teacher"
    shutil.copytree(os.environ["RECOKD_TEACHER"], other)
    monkeypatch.setenv("RECOKD_TEACHER", str(other))
    with pytest.raises(TeacherError) as e:
        make_trainer(nnUNetTrainerReCoKD, *tiny, continue_training=True).load_checkpoint(path)
    assert original in str(e.value) and str(other / "fold_0" / "checkpoint_final.pth") in str(e.value)
    assert "allow_teacher_change" in str(e.value)

    _config(tmp_path, monkeypatch, allow_teacher_change=True)
    resumed = make_trainer(nnUNetTrainerReCoKD, *tiny, continue_training=True)
    resumed.load_checkpoint(path)
    assert resumed.current_epoch == 1 and "another teacher" in Path(resumed.log_file).read_text()


@pytest.mark.parametrize("change,named", [
    ({"ca_weight": 0.0}, "ca_weight: 1.0 in the checkpoint, 0.0 now"),
    ({"reco_stages": [0]}, "reco_stages: None in the checkpoint, [0] now"),
    ({"graph_weight": 0.1, "graph_stages": ["dec1"]}, "graph_weight: 0.0 in the checkpoint, 0.1 now"),
    ({"ca_ratio": 0.25}, "ca_ratio: 0.5 in the checkpoint, 0.25 now"),
])
def test_resume_after_a_module_changing_setting_names_it(tiny, tmp_path, monkeypatch, change, named):
    path = _checkpoint(tiny, tmp_path)
    _config(tmp_path, monkeypatch, **change)
    with pytest.raises(SettingsError) as e:
        make_trainer(nnUNetTrainerReCoKD, *tiny, continue_training=True).load_checkpoint(path)
    assert named in str(e.value) and "--c" in str(e.value)


def test_resume_after_a_weight_change_continues_and_logs_it(tiny, tmp_path, monkeypatch):
    path = _checkpoint(tiny, tmp_path)
    _config(tmp_path, monkeypatch, reco_weight=0.02)  # same modules, other weight: fine
    resumed = make_trainer(nnUNetTrainerReCoKD, *tiny, continue_training=True)
    resumed.load_checkpoint(path)
    assert "reco_weight: 0.01 -> 0.02" in Path(resumed.log_file).read_text()
