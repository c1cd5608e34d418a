"""Missing and degraded inputs through nnU-Net's own commands: a two-channel teacher (channels "main" and a CT-like
"CT"), a one-channel student of it, a student under modality dropout, one on simulated low-dose CT, one with shared
attention; plan, train, validate, predict (stock nnUNetv2_predict and ours), evaluate, evaluate-dose.

Short schedules (the checks are about what runs and what the model folders say, not about Dice); about two
minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_recokd.nnunet_commands import nnunet_command, run_logged
from nnunetv2_recokd.synthetic import write_dataset

DATASET_ID = 993
DATASET = "Dataset993_TwoChannels"


def _run(args: list[str], env: dict, log: Path) -> str:
    return run_logged(args, env, log, timeout=600)


def _model(root: Path, trainer: str) -> Path:
    return root / "res" / DATASET / f"{trainer}__nnUNetPlans__3d_fullres"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e_inputs")
    env = dict(os.environ)
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"), nnUNet_results=str(root / "res"),
               nnUNet_def_n_proc="1", nnUNet_compile="f", nnUNet_npp="0", nnUNet_nps="0", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1")
    env.pop("RECOKD_TEACHER", None)
    env.pop("RECOKD_CONFIG", None)
    _run(["nnunetv2_recokd", "install"], env, root / "install.log")
    write_dataset(root / "raw", DATASET_ID, "TwoChannels", num_train=8, num_test=2, size=32, seed=3, channels=2,
                  ct=True)
    _run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1"], env,
         root / "plan.log")
    env["nnUNet_n_proc_DA"] = "0"
    schedule = {"num_epochs": 1, "num_iterations_per_epoch": 4, "num_val_iterations_per_epoch": 1, "seed": 0}
    (root / "teacher.json").write_text(json.dumps(schedule))
    _run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", "nnUNetTrainerTeacher", "-device", "cpu"],
         {**env, "RECOKD_CONFIG": str(root / "teacher.json")}, root / "teacher.log")
    return root, env, {**schedule, "teacher_trainer": "nnUNetTrainerTeacher", "reco_warmup": 0.0}


def _train(root: Path, env: dict, trainer: str, settings: dict, name: str) -> str:
    (root / f"{name}.json").write_text(json.dumps(settings))
    return _run([nnunet_command("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-device",
                 "cpu"], {**env, "RECOKD_CONFIG": str(root / f"{name}.json")}, root / f"{name}.log")


def _labels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("*.nii.gz"))}


def test_one_channel_student_of_a_two_channel_teacher(workspace):
    root, env, settings = workspace
    log = _train(root, env, "nnUNetTrainerReCoKD", {**settings, "student_channels": ["main"]}, "one_channel")
    assert "reads channels ['main'] of ['main', 'CT']" in log
    model = _model(root, "nnUNetTrainerReCoKD")
    # the model folder describes the student's one channel; nnU-Net validated it on that channel
    dataset = json.loads((model / "dataset.json").read_text())
    plans = json.loads((model / "plans.json").read_text())
    assert dataset["channel_names"] == {"0": "main"}
    assert dataset["recokd_student_channels"] == {"0": {"dataset_channel": 0, "name": "main"}}
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["ZScoreNormalization"]
    assert list(plans["foreground_intensity_properties_per_channel"]) == ["0"]
    assert (model / "fold_0" / "validation" / "summary.json").is_file()
    weights = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                         weights_only=False)["network_weights"]
    assert weights["encoder.stages.0.0.convs.0.conv.weight"].shape[1] == 1

    # stock nnUNetv2_predict on the student's input folder (its one file per case)
    images = root / "raw" / DATASET / "imagesTs"
    _run(["nnunetv2_recokd", "student-inputs", "-i", str(images), "-o", str(root / "student_in"), "-m", str(model),
          "-f", "0"], env, root / "student_inputs.log")
    assert sorted(p.name for p in (root / "student_in").iterdir()) == ["case_008_0000.nii.gz", "case_009_0000.nii.gz"]
    _run([nnunet_command("nnUNetv2_predict"), "-i", str(root / "student_in"), "-o", str(root / "pred_stock"),
          "-d", str(DATASET_ID), "-tr", "nnUNetTrainerReCoKD", "-c", "3d_fullres", "-f", "0", "-device", "cpu",
          "--disable_tta", "-npp", "0", "-nps", "0"], env, root / "predict_stock.log")
    # ours takes the dataset's folder as it is and picks the student's channel; same labels
    _run(["nnunetv2_recokd", "predict", "-i", str(images), "-o", str(root / "pred_ours"), "-m", str(model), "-f", "0",
          "--runtime", "torch", "--disable_tta"], env, root / "predict_ours.log")
    stock, ours = _labels(root / "pred_stock"), _labels(root / "pred_ours")
    assert list(stock) == ["case_008.nii.gz", "case_009.nii.gz"] and list(ours) == list(stock)
    assert all(np.array_equal(stock[k], ours[k]) for k in stock)
    # report: the held-out cases reach the student as its one channel
    _run(["nnunetv2_recokd", "report", str(DATASET_ID), "--no-latency", "--out", str(root / "report")], env,
         root / "report.log")
    rows = {row["trainer"]: row for row in json.loads((root / "report" / "report.json").read_text())["rows"]}
    assert rows["nnUNetTrainerReCoKD"]["test"]["n_cases"] == 2
    # the stock export keeps the student's one channel
    _run(["nnunetv2_recokd", "export", "-m", str(model), "-f", "0", "-o", str(root / "exported")], env,
         root / "export.log")
    (exported,) = (root / "exported" / DATASET).iterdir()
    assert json.loads((exported / "dataset.json").read_text())["channel_names"] == {"0": "main"}
    _run([nnunet_command("nnUNetv2_evaluate_simple"), str(root / "raw" / DATASET / "labelsTs"),
          str(root / "pred_stock"), "-l", "1", "2"], env, root / "evaluate.log")
    assert (root / "pred_stock" / "summary.json").is_file()


def test_modality_dropout_student_segments_with_a_blank_channel(workspace):
    root, env, settings = workspace
    log = _train(root, env, "nnUNetTrainerReCoKD_modalityDropout", settings, "dropout")
    assert "modality dropout 0.25 per channel" in log
    model = _model(root, "nnUNetTrainerReCoKD_modalityDropout")
    assert json.loads((model / "dataset.json").read_text())["channel_names"] == {"0": "main", "1": "CT"}
    # the weak scan missing: a blank image in its place, as the README tells users to do
    images, blank_in = root / "raw" / DATASET / "imagesTs", root / "blank_in"
    blank_in.mkdir()
    for case in ("case_008", "case_009"):
        os.symlink(images / f"{case}_0000.nii.gz", blank_in / f"{case}_0000.nii.gz")
        weak = sitk.ReadImage(str(images / f"{case}_0001.nii.gz"))
        blank = sitk.GetImageFromArray(np.zeros_like(sitk.GetArrayFromImage(weak)))
        blank.CopyInformation(weak)
        sitk.WriteImage(blank, str(blank_in / f"{case}_0001.nii.gz"))
    _run([nnunet_command("nnUNetv2_predict"), "-i", str(blank_in), "-o", str(root / "pred_blank"), "-d",
          str(DATASET_ID), "-tr", "nnUNetTrainerReCoKD_modalityDropout", "-c", "3d_fullres", "-f", "0", "-device",
          "cpu", "--disable_tta", "-npp", "0", "-nps", "0"], env, root / "predict_blank.log")
    assert sorted(_labels(root / "pred_blank")) == ["case_008.nii.gz", "case_009.nii.gz"]


def test_low_dose_and_shared_attention_student_and_its_dose_table(workspace):
    # one training covers both (the suite's time): the shared-attention trainer on simulated low-dose inputs
    root, env, settings = workspace
    log = _train(root, env, "nnUNetTrainerReCoKD_CBAM", {**settings, "attention_warmup": 0.0,
                                                         "lowdose_probability": 0.5}, "lowdose_cbam")
    assert "simulated low dose on 1 CT channel(s) for 50% of samples" in log
    model = _model(root, "nnUNetTrainerReCoKD_CBAM")
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert any(".cbam." in k for k in checkpoint["recokd"]["distiller"])
    assert not any("cbam" in k for k in checkpoint["network_weights"])  # the deployed student is plain nnU-Net
    _run(["nnunetv2_recokd", "evaluate-dose", "-m", str(model), "-f", "0", "-i",
          str(root / "raw" / DATASET / "imagesTs"), "-l", str(root / "raw" / DATASET / "labelsTs"), "-o",
          str(root / "dose"), "--doses", "1.0", "0.25", "--disable_tta", "-device", "cpu"], env, root / "dose.log")
    table = json.loads((root / "dose" / "dose_table.json").read_text())
    assert sorted(float(row["dose"]) for row in table["rows"]) == [0.25, 1.0]
