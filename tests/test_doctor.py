"""`nnunetv2_recokd doctor`: discovery of every trainer and the teacher a dataset would use."""

import json

from nnunetv2_recokd import cli, sandbox
from tests.tiny_nnunet import setup_env


def _setup(tmp_path, monkeypatch, teacher_dataset_name=sandbox.SANDBOX_DATASET):
    """Preprocessed plans for the student and a teacher at nnU-Net's default location."""
    plans, dataset = setup_env(tmp_path, monkeypatch, teacher=False)
    pre = tmp_path / "preprocessed" / sandbox.SANDBOX_DATASET
    (pre / "nnUNetPlans.json").write_text(json.dumps(plans))
    (pre / "dataset.json").write_text(json.dumps(dataset))
    folder = tmp_path / "results" / sandbox.SANDBOX_DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    return sandbox.write_random_teacher(folder, {**plans, "dataset_name": teacher_dataset_name}, dataset)


def test_doctor_reports_trainers_and_a_matching_teacher(tmp_path, monkeypatch, capsys):
    folder = _setup(tmp_path, monkeypatch)
    code = cli.main(["doctor", "-d", sandbox.SANDBOX_DATASET, "-c", "3d_fullres", "-f", "0"])
    out = capsys.readouterr().out
    assert "nnUNetTrainerReCoKD " in out and "nnunetv2" in out
    assert str(folder / "fold_0" / "checkpoint_final.pth") in out and "nnU-Net's default location" in out
    assert "matches the student's data" in out
    trainers_ok = all("ok (" in line for line in out.splitlines() if line.strip().startswith("nnUNetTrainer"))
    assert code == (0 if trainers_ok else 1)


def test_doctor_names_a_teacher_from_another_dataset(tmp_path, monkeypatch, capsys):
    _setup(tmp_path, monkeypatch, teacher_dataset_name="Dataset123_Other")
    assert cli.main(["doctor", "-d", sandbox.SANDBOX_DATASET]) == 1
    out = capsys.readouterr().out
    assert "dataset: teacher 'Dataset123_Other' vs student 'Dataset991_Sandbox'" in out


def test_doctor_says_where_it_looked_for_a_missing_teacher(tmp_path, monkeypatch, capsys):
    _setup(tmp_path, monkeypatch)
    monkeypatch.setenv("RECOKD_TEACHER", str(tmp_path / "nowhere"))
    assert cli.main(["doctor", "-d", sandbox.SANDBOX_DATASET]) == 1
    out = capsys.readouterr().out
    assert str(tmp_path / "nowhere" / "fold_0" / "checkpoint_final.pth") in out and "RECOKD_TEACHER" in out
