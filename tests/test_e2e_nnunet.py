"""One real round trip through nnU-Net's own commands, as a user runs them, on a synthetic dataset.

the smallest demo's workspace (tests/conftest.py: nnU-Net's plan_and_preprocess and a short teacher training, done
once for the suite) -> ReCo-KD + region-graph student (every distillation module:
adapters, context blocks, graph projectors; terms active from the first step), killed with SIGKILL and resumed
with --c (restored state checked bit for bit against the checkpoint through nnU-Net's own resume code) ->
--val -> nnUNetv2_predict with no teacher present -> nnUNetv2_evaluate_folder (the plain student control trains
through nnU-Net in tests/test_matrix.py and never looks for a teacher: tests/test_trainer.py).
Takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_recokd.nnunet_commands import nnunet_command, run_logged
from nnunetv2_recokd.evaluation import count_checkpoint_parameters

DATASET_ID = 990
DATASET = "Dataset990_SyntheticLesions"
TEACHER_FOLDER = "nnUNetTrainerTeacher__nnUNetPlans__3d_fullres"


def _run(args: list[str], env: dict, log: Path) -> str:
    return run_logged(args, env, log, timeout=600)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, smallest_demo):
    """The smallest demo's nnU-Net folders (tests/conftest.py: Dataset990 planned and preprocessed, the teacher
    nnUNetTrainerTeacher trained on fold 0) as raw/, pre/ and res/ of this module's root."""
    out, proc = smallest_demo
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    root = tmp_path_factory.mktemp("e2e")
    for name, target in (("raw", "raw"), ("pre", "preprocessed"), ("res", "results")):
        (root / name).symlink_to(out / "nnunet" / target)
    assert (root / "res" / DATASET / TEACHER_FOLDER / "fold_0" / "checkpoint_final.pth").is_file()
    env = dict(os.environ)
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"), nnUNet_results=str(root / "res"),
               nnUNet_def_n_proc="1", nnUNet_compile="f", nnUNet_npp="0", nnUNet_nps="0", PYTHONUNBUFFERED="1",
               nnUNet_n_proc_DA="0")  # training only: in-process augmentation (it breaks plan_and_preprocess)
    env.pop("RECOKD_TEACHER", None)
    env.pop("RECOKD_CONFIG", None)
    # the students find their teacher at nnU-Net's conventional location, named by teacher_trainer
    # no warm-up: the distillation terms act from the first step (a warm-up over 4 epochs would keep them ~0)
    (root / "student.json").write_text(json.dumps({"num_epochs": 4, "num_iterations_per_epoch": 10,
                                                   "num_val_iterations_per_epoch": 1, "save_every": 1, "seed": 0,
                                                   "teacher_trainer": "nnUNetTrainerTeacher", "reco_warmup": 0.0,
                                                   "graph_warmup": 0.0, "log_term_gradients": True}))
    env["RECOKD_CONFIG"] = str(root / "student.json")
    return root, env


def _results(root: Path, trainer: str) -> Path:
    return root / "res" / DATASET / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"


TRAINER = "nnUNetTrainerReCoKDGraph"


def test_distillation_kill_resume_predict_evaluate(workspace):
    root, env = workspace
    train = [nnunet_command("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"]
    out = _results(root, TRAINER)
    latest = out / "checkpoint_latest.pth"

    # 1. start, wait for the first periodic checkpoint, kill -9 mid-training
    with open(root / "kd_killed.log", "w") as log:
        proc = subprocess.Popen(train, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 400
        while not latest.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert latest.exists(), (root / "kd_killed.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    saved = root / "killed_checkpoint.pth"
    shutil.copy(latest, saved)
    killed = torch.load(saved, weights_only=False)
    killed_at = killed["current_epoch"]
    assert 1 <= killed_at < 4
    assert not (out / "checkpoint_final.pth").exists()
    modules = {k.split(".")[0] for k in killed["recokd"]["distiller"]}
    assert modules == {"reco", "graph"}, modules

    # 2. nnU-Net's own --c path restores the distiller, both optimizer groups and the grad scaler bit for bit
    check = subprocess.run([sys.executable, str(Path(__file__).parent / "resume_check.py"), str(DATASET_ID),
                            "3d_fullres", "0", TRAINER, str(saved)], env=env, capture_output=True, text=True,
                           timeout=300)
    assert check.returncode == 0 and f"RESUMED-BITWISE {killed_at}" in check.stdout, check.stdout + check.stderr

    # 3. nnUNetv2_train --c continues from the saved epoch and finishes the 4 epochs
    text = _run(["nnUNetv2_train", *train[1:], "--c"], env, root / "kd_resumed.log")
    assert f"Restored checkpoint at epoch {killed_at} with distillation modules" in text
    assert "Loaded teacher" in text and TEACHER_FOLDER in text
    final = torch.load(out / "checkpoint_final.pth", weights_only=False)
    assert final["current_epoch"] == 4 and final["trainer_name"] == TRAINER
    logged = final["logging"]
    for key in ("train_losses", "train_kd_total_weighted", "train_kd_sard_fg", "epoch_start_timestamps"):
        assert len(logged[key]) == 4, key
        assert logged[key][:killed_at] == killed["logging"][key][:killed_at], key  # continued, not restarted
    # the terms were active from the first epoch: distillation really added to the loss
    assert all(v > 0 for v in logged["train_kd_total_weighted"]), logged["train_kd_total_weighted"]
    for key in ("train_kd_sard_fg", "train_kd_ca", "train_kd_graph_node", "train_grad_norm_distiller",
                "train_grad_first_step_sard_fg_student"):
        assert all(np.isfinite(logged[key])) and max(logged[key]) > 0, (key, logged[key])
    assert (out / "progress.png").stat().st_size > 10_000

    # 4. the student has ~1/16 of the teacher's parameters; the checkpoint holds the student only
    teacher_ckpt = root / "res" / DATASET / TEACHER_FOLDER / "fold_0" / "checkpoint_final.pth"
    ratio = count_checkpoint_parameters(teacher_ckpt) / count_checkpoint_parameters(out / "checkpoint_final.pth")
    assert 12 < ratio < 20, ratio
    plans = json.loads((out.parent / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["recokd_student"]["width"] == 0.25

    # 5. --val reruns nnU-Net's validation from the final checkpoint
    _run(["nnUNetv2_train", *train[1:], "--val"], env, root / "kd_val.log")
    assert (out / "validation" / "summary.json").exists()

    # 6. stock nnUNetv2_predict and nnUNetv2_evaluate_folder, with the teacher gone
    shutil.move(str(root / "res" / DATASET / TEACHER_FOLDER), str(root / "teacher_moved_away"))
    try:
        pred = root / "pred_kd"
        _run(["nnUNetv2_predict", "-i", str(root / "raw" / DATASET / "imagesTs"), "-o", str(pred), "-d",
              str(DATASET_ID), "-c", "3d_fullres", "-tr", TRAINER, "-f", "0", "-device", "cpu",
              "--disable_tta", "-npp", "1", "-nps", "1"], env, root / "predict.log")
    finally:
        shutil.move(str(root / "teacher_moved_away"), str(root / "res" / DATASET / TEACHER_FOLDER))
    cases = sorted(p.name for p in pred.glob("*.nii.gz"))
    assert cases == ["case_010.nii.gz", "case_011.nii.gz"]
    for case in cases:
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / case)))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "raw" / DATASET / "labelsTs" / case)))
        assert seg.shape == ref.shape == (32, 32, 32)  # the demo's default (varied) set
    pre = root / "pre" / DATASET
    _run(["nnUNetv2_evaluate_folder", str(root / "raw" / DATASET / "labelsTs"), str(pred), "-djfile",
          str(pre / "dataset.json"), "-pfile", str(pre / "nnUNetPlans.json")], env, root / "evaluate.log")
    summary = json.loads((pred / "summary.json").read_text())
    organ = summary["mean"]["1"]["Dice"]
    # chance level: the organ fills ~11% of the volume, so a random or constant guess scores < 0.2
    assert organ > 0.6, summary["mean"]


ENSEMBLE = "nnUNetTrainerReCoKD_ensemble"


def test_fold_ensemble_student_trains_predicts_and_is_marked_optimistic(workspace):
    """Two short fold teachers (fold 0 from the fixture, fold 1 here) distilled into one student by the shipped
    ensemble trainer: both teachers loaded, the leak named at start, per-teacher modules saved, then nnUNetv2_predict
    / nnUNetv2_evaluate_folder on the held-out cases. (Suite time: --c of per-teacher modules is tested in
    test_ensemble.py, `report`'s optimistic mark in test_report.py, its held-out table in test_deploy.py.)"""
    root, env = workspace
    # a second fold teacher: the demo's --ensemble story (tests/test_demo.py, same workspace) trains it when it runs
    # first; else a short one here (the suite's time budget: what matters is that it exists)
    if not (root / "res" / DATASET / TEACHER_FOLDER / "fold_1" / "checkpoint_final.pth").is_file():
        (root / "teacher_fold1.json").write_text(json.dumps({"num_epochs": 1, "num_iterations_per_epoch": 10,
                                                             "num_val_iterations_per_epoch": 1, "seed": 1}))
        teacher_env = {**env, "RECOKD_CONFIG": str(root / "teacher_fold1.json")}
        _run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "1", "-tr", "nnUNetTrainerTeacher", "-device", "cpu"],
             teacher_env, root / "teacher_fold1.log")
    settings = {"num_epochs": 1, "num_iterations_per_epoch": 10, "num_val_iterations_per_epoch": 1, "seed": 0,
                "teacher_trainer": "nnUNetTrainerTeacher", "reco_warmup": 0.0}
    (root / "ensemble.json").write_text(json.dumps(settings))
    ens_env = {**env, "RECOKD_CONFIG": str(root / "ensemble.json")}
    train = ["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", ENSEMBLE, "-device", "cpu"]
    text = _run(train, ens_env, root / "ensemble.log")
    assert "Loaded teacher 1 of 2" in text and "Loaded teacher 2 of 2" in text
    assert "the teacher (fold 1) was trained on 2 of the student's 2 validation cases" in text
    assert "OPTIMISTIC" in text
    out = _results(root, ENSEMBLE)
    first = torch.load(out / "checkpoint_final.pth", weights_only=False)
    teachers = first["recokd"]["teacher"]
    assert [Path(t).parent.name for t in teachers] == ["fold_0", "fold_1"]
    modules = {k.split(".")[1] for k in first["recokd"]["distiller"]}
    stages = {m for m in modules if "_teacher" not in m}
    assert "enc0" in stages and modules == stages | {f"{m}_teacher1" for m in stages}  # per-teacher modules
    assert first["recokd"]["teacher_saw_validation_cases"]["cases"] == 2
    assert first["logging"]["train_kd_total_weighted"][0] > 0

    pred = root / "pred_ensemble"
    _run(["nnUNetv2_predict", "-i", str(root / "raw" / DATASET / "imagesTs"), "-o", str(pred), "-d",
          str(DATASET_ID), "-c", "3d_fullres", "-tr", ENSEMBLE, "-f", "0", "-device", "cpu", "--disable_tta",
          "-npp", "1", "-nps", "1"], env, root / "predict_ensemble.log")
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == ["case_010.nii.gz", "case_011.nii.gz"]
    pre = root / "pre" / DATASET
    _run(["nnUNetv2_evaluate_folder", str(root / "raw" / DATASET / "labelsTs"), str(pred), "-djfile",
          str(pre / "dataset.json"), "-pfile", str(pre / "nnUNetPlans.json")], env, root / "evaluate_ensemble.log")
    summary = json.loads((pred / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 2 and summary["mean"]["1"]["Dice"] > 0.3, summary["mean"]



def test_fold_all_teacher_is_refused_before_training(workspace):
    """nnUNetv2_train D C all validates on its own training cases and writes their summary: a student distilled
    from it has no held-out validation, so nnUNetv2_train stops before training. The fold_all teacher is the
    fixture's fold-0 teacher re-saved as nnU-Net saves fold all (init_args fold 'all', the folder fold_all, a
    validation summary naming every training case): the refusal reads only those, and training one costs the suite
    a training plus a validation of every case. Without the summary: tests/test_consistency.py."""
    root, env = workspace
    teacher = root / "res" / DATASET / TEACHER_FOLDER
    fold_all = teacher / "fold_all"
    (fold_all / "validation").mkdir(parents=True, exist_ok=True)
    checkpoint = torch.load(teacher / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    checkpoint["init_args"]["fold"] = "all"
    torch.save(checkpoint, fold_all / "checkpoint_final.pth")
    training = sorted(p.name for p in (root / "raw" / DATASET / "labelsTr").glob("*.nii.gz"))
    (fold_all / "validation" / "summary.json").write_text(json.dumps({"metric_per_case": [
        {"reference_file": str(root / "pre" / DATASET / "gt_segmentations" / name), "metrics": {}}
        for name in training]}))
    log = root / "student_of_fold_all.log"
    with open(log, "w") as f:
        proc = subprocess.run([nnunet_command("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr",
                               "nnUNetTrainerLogitKD", "-device", "cpu"], env={**env, "RECOKD_TEACHER": str(fold_all)},
                              stdout=f, stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert proc.returncode != 0, text[-2000:]
    assert "the teacher (fold all) was trained on 2 of the student's 2 validation cases" in text
    assert "fold_all (trained on every case)" in text and "Epoch 0" not in text
    shutil.rmtree(fold_all)  # the other tests of this workspace see fold 0 (and 1) only


def test_unlabeled_scans_through_nnunets_commands(workspace):
    """add-unlabeled with the trained teacher: 2 new scans become teacher-labelled training cases of a new dataset,
    with nnU-Net's ignore label where the teacher's mirrorings disagree (--min-agreement 1); the held-out scans, which
    the student is scored on, are refused as unlabeled input; ReCo-KD trains on it with the original dataset's teacher
    and no flags, continues with --c, predicts and is evaluated by nnU-Net's commands; then the label-free variant
    (teacher labels only, all of them kept)."""
    import SimpleITK as sitk

    from nnunetv2_recokd.synthetic import write_unlabeled_images

    root, env = workspace
    env = {k: v for k, v in env.items() if k != "RECOKD_CONFIG"}
    teacher = root / "res" / DATASET / TEACHER_FOLDER
    images = root / "raw" / DATASET / "imagesTs"
    add = ["nnunetv2_recokd", "add-unlabeled", "-t", str(teacher), "-d", str(DATASET_ID), "--id", "993", "-f", "0",
           "--min-agreement", "1", "-device", "cpu", "-np", "1"]
    refused = subprocess.run(add + ["-i", str(images)], env=env, capture_output=True, text=True)
    assert refused.returncode == 1 and "are images of the labelled dataset" in refused.stderr
    size = sitk.ReadImage(str(next(images.iterdir()))).GetSize()[0]
    scans = write_unlabeled_images(root / "new_scans", 2, size=size, seed=7, varied=True, prefix="case_u")
    text = _run(add + ["-i", str(scans)], env, root / "add.log")
    assert "[2/2] case_u_001" in text and "10 labelled + 2 teacher-labelled cases" in text
    derived = root / "raw" / "Dataset993_SyntheticLesionsUnlabeled"
    ignore = json.loads((derived / "dataset.json").read_text())["labels"]["ignore"]
    assert ignore == 3  # background, organ, lesion: nnU-Net's ignore label is the highest + 1
    assert sorted(p.name for p in (derived / "labelsTr").iterdir())[-2:] == ["case_u_000.nii.gz", "case_u_001.nii.gz"]
    splits = json.loads((root / "pre" / derived.name / "splits_final.json").read_text())
    assert all({"case_u_000", "case_u_001"} <= set(f["train"]) and not {"case_u_000", "case_u_001"} & set(f["val"])
               for f in splits)

    settings = {"num_epochs": 1, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 1, "seed": 0,
                "reco_warmup": 0.0}
    (root / "derived.json").write_text(json.dumps(settings))
    kd_env = {**env, "RECOKD_CONFIG": str(root / "derived.json")}
    train = ["nnUNetv2_train", "993", "3d_fullres", "0", "-tr", "nnUNetTrainerReCoKD", "-device", "cpu"]
    text = _run(train, kd_env, root / "derived_train.log")
    assert "the dataset's dataset.json" in text and TEACHER_FOLDER in text  # the teacher found from the dataset
    assert "training cases: 8 with real labels, 2 labelled by the teacher" in text
    assert "ignore label where fewer than 1 of the teacher's mirrorings agreed" in text
    out = root / "res" / derived.name / "nnUNetTrainerReCoKD__nnUNetPlans__3d_fullres" / "fold_0"
    assert json.loads((out / "recokd_training_cases.json").read_text())["teacher_labelled"] == 2
    (root / "derived.json").write_text(json.dumps({**settings, "num_epochs": 2}))
    text = _run([*train, "--c"], kd_env, root / "derived_resumed.log")
    assert "Restored checkpoint at epoch 1 with distillation modules" in text
    pred = root / "pred_derived"
    _run(["nnUNetv2_predict", "-i", str(images), "-o", str(pred), "-d", "993", "-c", "3d_fullres", "-tr",
          "nnUNetTrainerReCoKD", "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env,
         root / "predict_derived.log")
    pre = root / "pre" / derived.name
    _run(["nnUNetv2_evaluate_folder", str(root / "raw" / DATASET / "labelsTs"), str(pred), "-djfile",
          str(pre / "dataset.json"), "-pfile", str(pre / "nnUNetPlans.json")], env, root / "evaluate_derived.log")
    assert len(json.loads((pred / "summary.json").read_text())["metric_per_case"]) == 2

    # no labels at all: the teacher's labels alone; validation is agreement with the teacher and says so
    _run(["nnunetv2_recokd", "add-unlabeled", "-i", str(images), "-t", str(teacher), "--id", "994", "-f", "0",
          "--disable_tta", "-device", "cpu", "-np", "1"], env, root / "add_label_free.log")
    text = _run(["nnUNetv2_train", "994", "3d_fullres", "0", "-tr", "nnUNetTrainerStudent", "-device", "cpu"],
                {**env, "RECOKD_CONFIG": str(root / "derived.json")}, root / "label_free.log")
    assert "training cases: 0 with real labels, 1 labelled by the teacher" in text
    assert "AGREEMENT WITH THE TEACHER" in text
