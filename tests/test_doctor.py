"""`nnunetv2_recokd doctor`: discovery of every trainer and the teacher a dataset would use."""

import json
import shutil

import pytest
from nnunetv2.utilities import find_objects

from nnunetv2_recokd import cli, sandbox
from nnunetv2_recokd.trainers import PUBLIC_TRAINERS
from tests.tiny_nnunet import PATCH, setup_env


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


def test_doctor_accepts_a_teacher_from_another_dataset_with_the_same_data(tmp_path, monkeypatch, capsys):
    _setup(tmp_path, monkeypatch, teacher_dataset_name="Dataset123_Other")
    cli.main(["doctor", "-d", sandbox.SANDBOX_DATASET])
    out = capsys.readouterr().out
    assert "matches the student's data" in out and "Dataset123_Other" in out


def test_doctor_says_where_it_looked_for_a_missing_teacher(tmp_path, monkeypatch, capsys):
    _setup(tmp_path, monkeypatch)
    monkeypatch.setenv("RECOKD_TEACHER", str(tmp_path / "nowhere"))
    assert cli.main(["doctor", "-d", sandbox.SANDBOX_DATASET]) == 1
    out = capsys.readouterr().out
    assert str(tmp_path / "nowhere" / "fold_0" / "checkpoint_final.pth") in out and "RECOKD_TEACHER" in out


def test_doctor_loads_the_teacher_weights_strictly(tmp_path, monkeypatch, capsys):
    folder = _setup(tmp_path, monkeypatch)
    # weights of a narrower network under plans that describe the full-width one: same data, wrong checkpoint
    narrow = sandbox.write_random_teacher(tmp_path / "narrow", sandbox.unet_plans((8, 16, 32), PATCH),
                                          sandbox.dataset_json())
    shutil.copy(narrow / "fold_0" / "checkpoint_final.pth", folder / "fold_0" / "checkpoint_final.pth")
    assert cli.main(["doctor", "-d", sandbox.SANDBOX_DATASET]) == 1
    out = capsys.readouterr().out
    assert "does not fit the network built from" in out and "size mismatch" in out and "more lines)" in out
    assert "matches the student's data" not in out and "M parameters" not in out


def test_doctor_describes_the_loaded_teacher(tmp_path, monkeypatch, capsys):
    _setup(tmp_path, monkeypatch)
    cli.main(["doctor", "-d", sandbox.SANDBOX_DATASET])
    out = capsys.readouterr().out
    described = [line for line in out.splitlines() if "M parameters" in line]
    assert len(described) == 1 and "trainer nnUNetTrainer" in described[0] and "configuration 3d_fullres" in out
    assert out.index("M parameters") < out.index("matches the student's data")


def test_doctor_names_a_configuration_missing_from_the_students_plans(tmp_path, monkeypatch, capsys):
    _setup(tmp_path, monkeypatch)
    assert cli.main(["doctor", "-d", sandbox.SANDBOX_DATASET, "-c", "3d_lowres"]) == 1  # no exception
    out = capsys.readouterr().out
    assert "configuration '3d_lowres' is not in the student's plans" in out and "(available: 3d_fullres)" in out
    assert "matches" not in out


def test_doctor_names_a_configuration_missing_from_the_teachers_plans(tmp_path, monkeypatch, capsys):
    folder = _setup(tmp_path, monkeypatch)
    (tmp_path / "preprocessed" / sandbox.SANDBOX_DATASET / "nnUNetPlans.json").unlink()  # not preprocessed yet
    monkeypatch.setenv("RECOKD_TEACHER", str(folder))
    assert cli.main(["doctor", "-d", sandbox.SANDBOX_DATASET, "-c", "3d_lowres"]) == 1
    out = capsys.readouterr().out
    assert f"configuration '3d_lowres' is not in the teacher's plans {folder / 'plans.json'}" in out


def test_doctor_without_preprocessed_plans_still_loads_the_teacher(tmp_path, monkeypatch, capsys):
    _setup(tmp_path, monkeypatch)
    (tmp_path / "preprocessed" / sandbox.SANDBOX_DATASET / "nnUNetPlans.json").unlink()
    cli.main(["doctor", "-d", sandbox.SANDBOX_DATASET])
    out = capsys.readouterr().out
    assert "M parameters" in out and "not checked" in out and "matches the student's data" not in out


def test_doctor_lets_ctrl_c_through_the_trainer_lookup(monkeypatch):
    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(find_objects, "recursive_find_trainer_class_by_name", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["doctor"])


def test_doctor_reports_a_trainer_module_that_exits(monkeypatch, capsys):
    def exits(name):
        raise SystemExit(2)  # what a trainer module calling sys.exit at import does inside nnU-Net's lookup

    monkeypatch.setattr(find_objects, "recursive_find_trainer_class_by_name", exits)
    assert cli.main(["doctor"]) == 1
    listed = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("nnUNetTrainer")]
    assert len(listed) == len(PUBLIC_TRAINERS)  # the doctor went on past the exiting module
    assert all("NOT discoverable (a module imported by nnU-Net's lookup called sys.exit(2))" in x for x in listed)


def test_doctor_checks_every_fold_teacher_of_an_ensemble_trainer(tmp_path, monkeypatch, capsys):
    folder = _setup(tmp_path, monkeypatch)
    shutil.copytree(folder / "fold_0", folder / "fold_1")
    shutil.copytree(folder / "fold_0", folder / "fold_2")
    narrow = sandbox.write_random_teacher(tmp_path / "narrow", sandbox.unet_plans((8, 16, 32), PATCH),
                                          sandbox.dataset_json())
    shutil.copy(narrow / "fold_0" / "checkpoint_final.pth", folder / "fold_2" / "checkpoint_final.pth")
    code = cli.main(["doctor", "-d", sandbox.SANDBOX_DATASET, "-tr", "nnUNetTrainerReCoKD_ensemble"])
    out = capsys.readouterr().out
    assert code == 1
    for fold in (0, 1, 2):  # every fold listed, the broken one named, the others still described
        assert str(folder / f"fold_{fold}" / "checkpoint_final.pth") in out
    assert out.count("M parameters") == 2 and "does not fit the network built from" in out
    assert "matches the student's data" not in out


def test_doctor_finds_the_teacher_a_derived_dataset_names(tmp_path, monkeypatch, capsys):
    folder = _setup(tmp_path, monkeypatch, teacher_dataset_name="Dataset004_Original")
    elsewhere = tmp_path / "downloaded" / folder.name
    shutil.move(str(folder), str(elsewhere))  # not at nnU-Net's default location
    pre = tmp_path / "preprocessed" / sandbox.SANDBOX_DATASET
    dataset = json.loads((pre / "dataset.json").read_text())
    (pre / "dataset.json").write_text(json.dumps({**dataset, "recokd_unlabeled": {"teacher": str(elsewhere)}}))
    cli.main(["doctor", "-d", sandbox.SANDBOX_DATASET])
    out = capsys.readouterr().out
    assert f"checkpoint {elsewhere / 'fold_0' / 'checkpoint_final.pth'} (from the dataset's dataset.json" in out
    assert "matches the student's data" in out
