"""Unlabeled scans (nnunetv2_recokd/unlabeled.py, `add-unlabeled`): splits, the per-sample seg-loss weight, the
labelling that resumes, and the refusals that come before anything is written."""

from __future__ import annotations

import json
import sys
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_recokd import sandbox
from nnunetv2_recokd.trainers import nnUNetTrainerReCoKD, nnUNetTrainerStudent
from nnunetv2_recokd.unlabeled import (
    DATASET_KEY,
    STAGING,
    UnlabeledError,
    check_inputs,
    count_training_cases,
    derived_splits,
    label_cases,
)
from tests.tiny_nnunet import make_trainer, setup_env, tiny_batch


# ------------------------------------------------------------------------------------------------------- splits
def test_teacher_labelled_cases_train_in_every_fold_and_validate_in_none():
    real = [f"r{i}" for i in range(7)]
    pseudo = [f"u{i}" for i in range(4)]
    splits = derived_splits(real, pseudo)
    assert len(splits) == 5
    assert sorted(c for fold in splits for c in fold["val"]) == real  # nnU-Net's 5 folds over the real cases
    for fold in splits:
        assert set(pseudo) <= set(fold["train"]) and not set(pseudo) & set(fold["val"])
        assert set(fold["train"]) | set(fold["val"]) == set(real) | set(pseudo)


def test_the_labelled_datasets_own_split_is_kept():
    source = [{"train": ["a", "b"], "val": ["c"]}, {"train": ["c"], "val": ["a", "b"]}]
    assert derived_splits(["a", "b", "c"], ["u"], source) == [{"train": ["a", "b", "u"], "val": ["c"]},
                                                              {"train": ["c", "u"], "val": ["a", "b"]}]
    with pytest.raises(UnlabeledError, match="no label for: z"):
        derived_splits(["a", "b", "c"], ["u"], [{"train": ["a"], "val": ["z"]}])


def test_without_labelled_cases_the_teacher_labelled_ones_are_cross_validated():
    splits = derived_splits([], ["u0", "u1", "u2"])
    assert len(splits) == 3 and sorted(c for fold in splits for c in fold["val"]) == ["u0", "u1", "u2"]


def test_training_cases_are_counted_by_label_source():
    dataset = {DATASET_KEY: {"teacher_labelled": ["u0", "u1"]}}
    assert count_training_cases(["a", "u0", "b", "u1", "u1"], dataset) == {"real": 2, "teacher_labelled": 3}


# ------------------------------------------------------------------------------------------- seg-loss weight
@pytest.fixture
def tiny(tmp_path, monkeypatch):
    return setup_env(tmp_path, monkeypatch)


def _derived(tiny, pseudo: list[str], weight: float, tmp_path, monkeypatch):
    plans, dataset = tiny
    (tmp_path / "w.json").write_text(json.dumps({"teacher_label_weight": weight}))
    monkeypatch.setenv("RECOKD_CONFIG", str(tmp_path / "w.json"))
    trainer = make_trainer(nnUNetTrainerStudent, plans, {**dataset, DATASET_KEY: {"teacher_labelled": pseudo}})
    trainer.initialize()
    return trainer


@pytest.mark.parametrize("weight", [0.0, 0.25, 1.0])
def test_seg_loss_weighs_teacher_labelled_samples(tiny, tmp_path, monkeypatch, weight):
    trainer = _derived(tiny, ["u"], weight, tmp_path, monkeypatch)
    batch = tiny_batch()  # 2 samples; plans: batch_dice False, so nnU-Net's loss is the mean of per-sample losses
    out = trainer.network(batch["data"])
    per_sample = [trainer.loss([o[i:i + 1] for o in out], [t[i:i + 1] for t in batch["target"]]).item()
                  for i in range(2)]
    seg = trainer._seg_loss(out, batch["target"], np.array(["real", "u"])).item()
    # hand-computed: (1 * L_real + w * L_teacher) / 2
    assert seg == pytest.approx((per_sample[0] + weight * per_sample[1]) / 2, rel=1e-5)
    whole = trainer.loss(out, batch["target"]).item()
    assert trainer._seg_loss(out, batch["target"], np.array(["real", "real2"])).item() == pytest.approx(whole)
    if weight == 1.0:
        assert seg == pytest.approx(whole, rel=1e-6)


def test_a_batch_of_teacher_labels_at_weight_zero_trains_through_distillation_only(tiny, tmp_path, monkeypatch):
    plans, dataset = tiny
    (tmp_path / "w.json").write_text(json.dumps({"teacher_label_weight": 0.0, "reco_warmup": 0.0}))
    monkeypatch.setenv("RECOKD_CONFIG", str(tmp_path / "w.json"))
    trainer = make_trainer(nnUNetTrainerReCoKD, plans, {**dataset, DATASET_KEY: {"teacher_labelled": ["u0", "u1"]}})
    trainer.initialize()
    out = trainer.train_step({**tiny_batch(), "keys": np.array(["u0", "u1"])})
    assert out["seg_loss"] == 0 and out["kd_total_weighted"] > 0 and out["grad_norm_student"] > 0


# ----------------------------------------------------------------------------------------- inputs and labelling
def _world(tmp_path: Path, monkeypatch, n_labelled: int = 3, n_unlabeled: int = 2):
    """nnUNet_raw with a labelled Dataset991_Sandbox, a folder of unlabeled images and a random teacher."""
    from nnunetv2_recokd.synthetic import make_case

    plans, dataset = sandbox.unet_plans((8, 16), (16, 16, 16)), sandbox.dataset_json()
    env: dict = {}
    sandbox.prepare_folders(tmp_path, plans, env)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    raw = Path(env["nnUNet_raw"]) / sandbox.SANDBOX_DATASET
    rng = np.random.default_rng(0)
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_labelled):
        image, label = make_case(rng, 20, 0.2)
        sitk.WriteImage(sitk.GetImageFromArray(image), str(raw / "imagesTr" / f"case_{i:03d}_0000.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(label.astype(np.uint8)), str(raw / "labelsTr" / f"case_{i:03d}.nii.gz"))
    (raw / "dataset.json").write_text(json.dumps({**dataset, "numTraining": n_labelled}))
    images = tmp_path / "unlabeled"
    images.mkdir()
    for i in range(n_unlabeled):
        image, _ = make_case(rng, 20, 0.2)
        sitk.WriteImage(sitk.GetImageFromArray(image), str(images / f"scan_{i:03d}_0000.nii.gz"))
    teacher = sandbox.write_random_teacher(tmp_path / "teacher" / "nnUNetTrainer__nnUNetPlans__3d_fullres", plans,
                                           dataset)
    return teacher, images, raw


def test_labelling_resumes_without_redoing_finished_cases(tmp_path, monkeypatch):
    teacher, images, _ = _world(tmp_path, monkeypatch, n_unlabeled=3)
    inputs = check_inputs(teacher, images, 500, "Derived", labelled="991", tta=False)
    out = tmp_path / "labels"
    done = []
    assert label_cases(inputs, out, log=done.append) == 3
    assert sorted(p.name for p in out.iterdir()) == ["scan_000.nii.gz", "scan_001.nii.gz", "scan_002.nii.gz"]
    first = (out / "scan_000.nii.gz").stat().st_mtime_ns
    (out / "scan_001.nii.gz").unlink()  # killed before this case was written
    log: list[str] = []
    assert label_cases(inputs, out, log=log.append) == 1
    assert "(2 done before)" in log[0] and any("[3/3] scan_001" in m for m in log)
    assert (out / "scan_000.nii.gz").stat().st_mtime_ns == first  # finished cases are not redone
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "scan_001.nii.gz")))
    assert label.shape == (20, 20, 20) and set(np.unique(label)) <= {0, 1, 2}


def _wrong_channels(images: Path) -> None:
    for f in images.iterdir():
        f.rename(f.with_name(f.name.replace("_0000", "_0001")))


@pytest.mark.parametrize("change, message", [
    (_wrong_channels, "unlabeled images:"),
    (lambda images: (images / "scan_000_0000.nii.gz").rename(images / "scan_000_0000.nii"), "unlabeled images:"),
    (lambda images: (images / "scan_000_0000.nii.gz").rename(images / "case_000_0000.nii.gz"),
     "are labelled cases of Dataset991_Sandbox"),
])
def test_bad_unlabeled_images_are_refused_before_anything_is_written(tmp_path, monkeypatch, change, message):
    teacher, images, raw = _world(tmp_path, monkeypatch)
    change(images)
    with pytest.raises(UnlabeledError, match=message):
        check_inputs(teacher, images, 500, "Derived", labelled="991")
    assert sorted(p.name for p in raw.parent.iterdir()) == [sandbox.SANDBOX_DATASET]


def test_a_teacher_of_other_labels_and_a_taken_id_are_refused(tmp_path, monkeypatch):
    teacher, images, raw = _world(tmp_path, monkeypatch)
    other = json.loads((raw / "dataset.json").read_text())
    other["labels"] = {"background": 0, "organ": 1}
    (raw / "dataset.json").write_text(json.dumps(other))
    with pytest.raises(UnlabeledError, match="labels: teacher"):
        check_inputs(teacher, images, 500, "Derived", labelled="991")
    with pytest.raises(UnlabeledError, match="dataset id 991 is taken"):
        check_inputs(teacher, images, 991, "Derived")
    assert not (raw.parent / STAGING).exists()


def test_unlabeled_images_that_are_the_labelled_datasets_images_are_refused(tmp_path, monkeypatch):
    """A link to a labelled training/validation image, or a byte copy of a test image under another name: the student
    would be trained on the teacher's labels of scans it is scored on."""
    teacher, images, raw = _world(tmp_path, monkeypatch)
    (images / "scan_009_0000.nii.gz").symlink_to(raw / "imagesTr" / "case_001_0000.nii.gz")
    with pytest.raises(UnlabeledError, match=r"1 unlabeled image\(s\) are images of the labelled dataset "
                                             r"Dataset991_Sandbox \(scan_009_0000.nii.gz is imagesTr/case_001_0000"):
        check_inputs(teacher, images, 500, "Derived", labelled="991")
    (images / "scan_009_0000.nii.gz").unlink()
    (raw / "imagesTs").mkdir()
    shutil.copy(images / "scan_001_0000.nii.gz", raw / "imagesTs" / "test_000_0000.nii.gz")
    with pytest.raises(UnlabeledError, match="scan_001_0000.nii.gz is imagesTs/test_000_0000.nii.gz"):
        check_inputs(teacher, images, 500, "Derived", labelled="991")
    (raw / "imagesTs" / "test_000_0000.nii.gz").unlink()
    check_inputs(teacher, images, 500, "Derived", labelled="991")  # none of them: accepted


def _fake_preprocess(inputs, raw, pre, dataset_json, num_processes, log):
    """unlabeled._preprocess without nnU-Net's preprocessing (a subprocess of several seconds): the splits and the
    dataset.json it writes, and the raw folder it was handed."""
    from nnunetv2_recokd.unlabeled import derived_splits

    (pre / "dataset.json").write_text(json.dumps(dataset_json))
    (pre / "splits_final.json").write_text(json.dumps(
        derived_splits(list(inputs.real_cases), list(inputs.unlabeled_cases), inputs.source_splits)))
    (pre / "preprocessed_from.txt").write_text(str(raw))


def _label_times(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((folder / "labelsTr").glob("scan_*"))}


def _no_labelling(*args, **kwargs):
    raise AssertionError("the teacher labelled again")


def test_a_rerun_after_the_preprocessed_folder_was_removed_keeps_every_label(tmp_path, monkeypatch):
    """Once relabelled every case and then failed on the existing raw folder, losing that run's labels; now it
    preprocesses the raw dataset again from its own labels, also into another nnUNet_preprocessed."""
    import os

    from nnunetv2_recokd import unlabeled

    teacher, images, raw = _world(tmp_path, monkeypatch)
    monkeypatch.setattr(unlabeled, "_preprocess", _fake_preprocess)
    raw_final = unlabeled.add_unlabeled(check_inputs(teacher, images, 500, "Derived", labelled="991", tta=False),
                                        num_processes=1, log=lambda m: None)
    labels = _label_times(raw_final)
    assert len(labels) == 2
    pre_final = Path(os.environ["nnUNet_preprocessed"]) / raw_final.name
    shutil.rmtree(pre_final)
    monkeypatch.setattr(unlabeled, "label_cases", _no_labelling)
    log: list[str] = []
    again = unlabeled.add_unlabeled(check_inputs(teacher, images, 500, "Derived", labelled="991", tta=False),
                                    num_processes=1, log=log.append)
    assert again == raw_final and _label_times(raw_final) == labels
    assert (pre_final / "splits_final.json").is_file()
    assert (pre_final / "preprocessed_from.txt").read_text() == str(raw_final)  # the finished raw dataset's labels
    assert "preprocessing it again (the labels are kept)" in log[0]
    assert not (raw.parent / STAGING).exists() and not (pre_final.parent / STAGING).exists()
    other = tmp_path / "other_preprocessed"  # another nnUNet_preprocessed, the same raw dataset
    other.mkdir()
    monkeypatch.setenv("nnUNet_preprocessed", str(other))
    unlabeled.add_unlabeled(check_inputs(teacher, images, 500, "Derived", labelled="991", tta=False),
                            num_processes=1, log=lambda m: None)
    assert (other / raw_final.name / "splits_final.json").is_file() and _label_times(raw_final) == labels


def test_a_rerun_after_a_kill_during_preprocessing_keeps_every_label(tmp_path, monkeypatch):
    from nnunetv2_recokd import unlabeled

    teacher, images, raw = _world(tmp_path, monkeypatch)
    preprocess = _fake_preprocess

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while preprocessing")

    monkeypatch.setattr(unlabeled, "_preprocess", killed)
    with pytest.raises(KeyboardInterrupt):
        unlabeled.add_unlabeled(check_inputs(teacher, images, 500, "Derived", labelled="991", tta=False),
                                num_processes=1, log=lambda m: None)
    staged = raw.parent / STAGING / "Dataset500_Derived"
    labels = _label_times(staged)
    assert len(labels) == 2  # the teacher's labels, kept in staging
    monkeypatch.setattr(unlabeled, "_preprocess", preprocess)
    monkeypatch.setattr(unlabeled, "label_cases", lambda inputs, out, *a, **k: unlabeled.__dict__["_count"](out))
    monkeypatch.setattr(unlabeled, "_count", lambda out: len(list(out.glob("scan_*"))), raising=False)
    raw_final = unlabeled.add_unlabeled(check_inputs(teacher, images, 500, "Derived", labelled="991", tta=False),
                                        num_processes=1, log=lambda m: None)
    assert _label_times(raw_final) == labels  # the same files, moved into place, never rewritten


def test_two_parts_label_at_once_and_one_of_them_assembles_the_dataset(tmp_path, monkeypatch):
    """-num_parts 2 in two processes at once on one nnUNet_raw: each labels its share (sorted cases 0, 2 / 1, 3), the
    one that finds every case labelled assembles and preprocesses the dataset, the other says so and exits 0."""
    import os
    import subprocess

    teacher, images, raw = _world(tmp_path, monkeypatch, n_unlabeled=4)
    command = ["nnunetv2_recokd", "add-unlabeled", "-i", str(images), "-t", str(teacher), "-d", "991", "--id", "500",
               "--name", "Derived", "--disable_tta", "-device", "cpu", "-np", "1", "--threads", "1", "-num_parts", "2"]
    parts = [subprocess.Popen(command + ["-part_id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=os.environ.copy()) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in parts]
    assert [p.returncode for p in parts] == [0, 0], outputs
    derived = raw.parent / "Dataset500_Derived"
    assert sorted(p.name for p in (derived / "labelsTr").glob("scan_*")) == [f"scan_{i:03d}.nii.gz" for i in range(4)]
    assert (Path(os.environ["nnUNet_preprocessed"]) / derived.name / "splits_final.json").is_file()
    assembled = [out for out in outputs if "preprocessed with the teacher's plans" in out]
    assert len(assembled) == 1, outputs  # the dataset is assembled and preprocessed once
    for i, out in enumerate(outputs):  # each part labelled its own share, nothing of the other's
        assert "the teacher labels 2 case(s) of part" in out
        mine = [f"scan_{c:03d}" for c in range(i, 4, 2)]
        theirs = [f"scan_{c:03d}" for c in range(1 - i, 4, 2)]
        assert all(c in out for c in mine) and not any(f"] {c}" in out for c in theirs), out
    assert not (raw.parent / STAGING).exists()


def test_a_part_id_outside_the_parts_is_refused(tmp_path, monkeypatch):
    from nnunetv2_recokd import unlabeled

    teacher, images, _ = _world(tmp_path, monkeypatch)
    with pytest.raises(UnlabeledError, match="part ids run from 0 to num_parts - 1"):
        unlabeled.add_unlabeled(check_inputs(teacher, images, 500, "Derived", labelled="991"), part_id=2, num_parts=2)


def _headline():
    """examples/hippocampus/headline.py, loaded from its file (examples/ is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "hippocampus" / "headline.py"
    spec = importlib.util.spec_from_file_location("_headline_under_test", path)
    headline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(headline)
    return headline


def test_headline_pairs_the_rows_by_seed_with_hand_computed_numbers(tmp_path):
    """examples/hippocampus/headline.py: (a) 0.80, 0.82, 0.81 and (c) 0.83, 0.86 on seeds 0-2 / 0-1 -> pairs seeds 0
    and 1 only: differences +0.03 and +0.04, mean +0.035, sample sd 0.00707; seed 2 listed, not paired."""
    headline = _headline()
    for row, values in (("a", [0.80, 0.82, 0.81]), ("c_recokd", [0.83, 0.86])):
        for seed, dice in enumerate(values):
            (tmp_path / f"{row}_s{seed}.json").write_text(json.dumps({"row": row, "seed": seed, "dice_mean": dice}))
    (tmp_path / "a_extra_s0.json").write_text(json.dumps({"row": "a_extra", "seed": 0, "dice_mean": 0.1}))  # not a
    control, treated = headline.load(tmp_path, "a"), headline.load(tmp_path, "c_recokd")
    assert control == {0: 0.80, 1: 0.82, 2: 0.81}
    result = headline.paired(control, treated)
    assert result["seeds"] == [0, 1]
    assert result["difference"]["mean"] == pytest.approx(0.035)
    assert result["difference"]["sd"] == pytest.approx(0.0070711, abs=1e-6)
    assert result["control"]["mean"] == pytest.approx(0.81) and result["treated"]["mean"] == pytest.approx(0.845)
    table = headline.to_markdown("a", "c_recokd", control, treated)
    assert "| (a) control, 20 labels | 0.8000 | 0.8200 | 0.8100 | 0.8100 ± 0.0141 (n = 2) |" in table
    assert "| (c) - (a), paired | +0.0300 | +0.0400 | - | +0.0350 ± 0.0071 (n = 2) |" in table
    page = tmp_path / "page.md"  # --update: only the lines between the marks change
    page.write_text(f"before\n{headline.MARK_START}\nold table\n{headline.MARK_END}\nafter\n")
    headline.update(page, table)
    assert page.read_text() == f"before\n{headline.MARK_START}\n{table}{headline.MARK_END}\nafter\n"
    with pytest.raises(SystemExit, match="no <!-- headline:start -->"):
        headline.update(tmp_path / "a_s0.json", table)


def test_headline_names_rows_by_the_protocol_table_and_puts_a_pair_into_its_block(tmp_path):
    """row_title: the protocol table's label and what is not the protocol's (budget, settings), from the row's fields;
    --block puts a pair into its own marked block (here the lr pair, 0.8281 / 0.8488: +0.0207)."""
    headline = _headline()
    assert headline.row_title("a_lr0.023") == "(a) control, 20 labels (initial lr 0.023)"
    assert headline.row_title("a") == "(a) control, 20 labels"
    assert headline.row_title("c_student_k5") == "(c) pseudo-labels alone, 5 labels + 161 teacher-labelled"
    assert headline.row_title("w8_a_30x100") == "w8_a_30x100 (30 x 100)"
    assert headline.row_title("b_logitkd+logit_temperature=1") == \
        "b_logitkd+logit_temperature=1 (logit_temperature = 1)"
    assert headline.row_title("not_a_row") == "not_a_row" and headline.tag("b") == "b" and headline.tag("a_k5") == "(a)"
    for row, dice in (("a_lr0.023", 0.8281), ("c_student_lr0.023", 0.8488)):
        (tmp_path / f"{row}_s0.json").write_text(json.dumps({
            "row": row, "seed": 0, "dice_mean": dice, "dice_per_class": {"1": dice}, "held_out_cases": 42,
            "epochs": 15, "iterations": 100, "row_settings": {"initial_lr": 0.023}, "trainer": "T", "dataset": "D"}))
    page = tmp_path / "page.md"
    page.write_text("<!-- headline:start -->\nkept\n<!-- headline:end -->\n<!-- lr:start -->\n<!-- lr:end -->\n")
    headline.main([str(tmp_path), "--control", "a_lr0.023", "--treated", "c_student_lr0.023", "--block", "lr",
                   "--update", str(page)])
    text = page.read_text()
    assert "<!-- headline:start -->\nkept\n<!-- headline:end -->" in text
    assert "| (c) - (a), paired | +0.0207 | +0.0207 ± 0.0000 (n = 1) |" in text.split("<!-- lr:start -->")[1]


def test_headline_imports_the_protocols_scores_and_tables_every_row_from_their_fields(tmp_path):
    """--import copies WORK/scores (an empty file of an interrupted scoring skipped, the teacher's absolute path made
    relative to the shared folder); the table of every row sits between its own marks, sorted by row and seed, its
    budget and settings read from each file's fields (a name says nothing)."""
    headline = _headline()
    work, scores = tmp_path / "work_scores", tmp_path / "scores"
    work.mkdir(), scores.mkdir()
    for row, seed, dice, epochs, settings in (
            ("c_recokd", 0, 0.84, 15, {}), ("a", 1, 0.82, 15, {}), ("a", 0, 0.8256, 15, {}),
            ("w8_a_30x100", 0, 0.7, 30, {}), ("c_student_lr0.023", 0, 0.5, 15, {"initial_lr": 0.023}),
            ("b_logitkd+logit_weight=0.25", 0, 0.6, 15, {"logit_weight": 0.25}), ("new_row", 0, 0.3, 15, {})):
        (work / f"{row}_s{seed}.json").write_text(json.dumps({
            "row": row, "seed": seed, "dice_mean": dice, "dice_per_class": {"1": dice + 0.01, "2": dice - 0.01},
            "held_out_cases": 42, "training_cases": {"real": 20, "teacher": "/work/shared/teachers/T/F"},
            "epochs": epochs, "iterations": 100, "row_settings": settings, "trainer": "nnUNetTrainerX",
            "dataset": "Dataset999_X"}))
    (work / "u_c_s0.json").write_text("")
    assert headline.import_scores(work, scores) == ["a_s0.json", "a_s1.json", "b_logitkd+logit_weight=0.25_s0.json",
                                                    "c_recokd_s0.json", "c_student_lr0.023_s0.json", "new_row_s0.json",
                                                    "w8_a_30x100_s0.json"]
    assert json.loads((scores / "a_s0.json").read_text())["training_cases"]["teacher"] == "../shared/teachers/T/F"
    rows = headline.rows_markdown(scores).splitlines()
    assert len(rows) == 9 and rows[2].startswith("| a | 0 | control") and rows[5].startswith("| c_recokd | 0 |")
    assert "| 15 x 100 | 0.8256 | 1: 0.8356, 2: 0.8156 | 42 |" in rows[2]
    assert "| 15 x 100, logit_weight = 0.25 | 0.6000 |" in rows[4]
    assert rows[6].startswith("| c_student_lr0.023 | 0 | control trainer on Dataset204: 20 labelled + 146 "
                              "teacher-labelled (pseudo-labels alone) | 15 x 100, initial lr 0.023 | 0.5000 |")
    assert rows[7].startswith("| new_row | 0 | `nnUNetTrainerX` on Dataset999_X | 15 x 100 | 0.3000 |")
    assert rows[8].startswith("| w8_a_30x100 | 0 | control, width 1/8, 20 labelled cases | 30 x 100 |")
    page = tmp_path / "page.md"
    page.write_text(f"{headline.MARK_START}\nold\n{headline.MARK_END}\nmid\n{headline.ROWS_START}\nold\n"
                    f"{headline.ROWS_END}\nend\n")
    assert headline.main([str(scores), "--update", str(page)]) == 0
    text = page.read_text()
    assert "old" not in text and "| (c) - (a), paired | +0.0144 | - |" in text
    assert f"{headline.ROWS_START}\n{headline.rows_markdown(scores)}{headline.ROWS_END}\nend\n" in text


def _protocol():
    """examples/hippocampus/protocol.py, loaded from its file (examples/ is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "hippocampus" / "protocol.py"
    spec = importlib.util.spec_from_file_location("_protocol_under_test", path)
    protocol = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = protocol  # its dataclasses look their module up there
    spec.loader.exec_module(protocol)
    return protocol


def test_every_committed_score_is_a_row_of_the_protocol_table_with_the_same_fields():
    """The committed score files and the protocol's table agree field by field (trainer, dataset, k, budget,
    settings): every number on the results pages comes from a row the driver can run again."""
    protocol = _protocol()
    scores = Path(__file__).resolve().parents[1] / "docs" / "results" / "unlabeled_hippocampus_scores"
    files = sorted(scores.glob("*_s*.json"))
    assert len(files) >= 30
    for path in files:
        record = json.loads(path.read_text())
        row = protocol.ROWS[record["row"]]
        assert path.name == f"{row.name}_s{record['seed']}.json"
        assert (record["trainer"], record["dataset"], record["fold"], record["k"], record["epochs"],
                record["iterations"], record["row_settings"], record["teacher"]) == \
            (row.trainer, protocol.DATASETS[row.dataset].folder_name, row.fold, row.k, row.epochs, row.iterations,
             row.settings, row.teacher), path.name
        if record["settings"] is not None:  # runs of the driver: the trainer's own resolved settings agree too
            assert {k: record["settings"][k] for k in row.settings} == row.settings
            assert record["settings"]["seed"] == record["seed"]
            assert (record["settings"]["num_epochs"], record["settings"]["num_iterations_per_epoch"]) == \
                (row.epochs, row.iterations)


def test_protocol_plan_prints_each_runs_config_and_writes_nothing(tmp_path, capsys):
    protocol = _protocol()
    work = tmp_path / "work"
    assert protocol.main(["--rows", "b_logitkd_oracle", "a", "--seeds", "0", "2", "--parallel", "--plan",
                          "--work", str(work)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and out[0].startswith("b_logitkd_oracle seed 0: nnUNetTrainerLogitKD on Dataset104_HippoK20")
    oracle = json.loads(out[0].split("config ", 1)[1])
    assert oracle["logit_oracle_margin"] == 17.5 and oracle["cpu_threads"] == 1 and oracle["seed"] == 0
    assert oracle["teacher"].endswith("teachers/Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres")
    # the leakage checks read the shared teacher's own split, written into WORK when rows run
    assert oracle["teacher_splits"] == str(work / "splits_Dataset004_Hippocampus.json")
    control = json.loads(out[3].split("config ", 1)[1])
    assert control == {"num_epochs": 15, "num_iterations_per_epoch": 100, "num_val_iterations_per_epoch": 5,
                       "save_every": 1, "seed": 2, "cpu_threads": 1}
    assert not work.exists()
    with pytest.raises(SystemExit):
        protocol.main(["--rows", "a", "no_such_row", "--plan"])
    assert "unknown rows ['no_such_row']; valid rows: a, a_lr0.023" in capsys.readouterr().err


def test_protocol_trains_a_teacher_row_before_the_rows_it_teaches(tmp_path, capsys):
    """Self-training (issue #35, item 2): teacher_k20 labels Dataset224 and teaches s_recokd; it is trained first,
    once (its seed-0 model serves every student seed), and named in the plan."""
    protocol = _protocol()
    rows = [protocol.ROWS[r] for r in ("s_student", "s_recokd", "a")]
    assert [r.name for r in protocol.teacher_rows(rows)] == ["teacher_k20"]
    assert protocol.teacher_rows([protocol.ROWS["c_recokd"], protocol.ROWS["b"]]) == []  # the shared teacher
    assert protocol.main(["--rows", "s_recokd", "--seeds", "0", "1", "--plan", "--work", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "first teacher_k20 seed 0 (it teaches these rows or labels their dataset)"
    teacher = json.loads(out[2].split("config ", 1)[1])["teacher"]  # seed 1's student: the seed-0 teacher
    assert teacher == str(tmp_path / "results_teacher_k20" / "s0" / "Dataset104_HippoK20"
                          / "nnUNetTrainerTeacher__nnUNetPlans__3d_fullres")
    paths = protocol.Paths(tmp_path, tmp_path / "shared")
    with pytest.raises(RuntimeError, match="labelled by row teacher_k20's model, which is not trained: python "
                                           "protocol.py --rows teacher_k20"):
        (tmp_path / "preprocessed" / "Dataset104_HippoK20").mkdir(parents=True)
        (tmp_path / "preprocessed" / "Dataset104_HippoK20" / ".recokd_3d_fullres_done").touch()
        protocol.prepare(paths, "HippoK20SelfTaught", "cpu")


def test_protocol_fails_loudly_naming_each_failed_row_after_the_others_ran(tmp_path, monkeypatch, capsys):
    protocol = _protocol()
    ran = []

    def fake(paths, row, seed, device, threads):
        ran.append((row.name, seed, threads))
        if row.name == "b":
            raise RuntimeError("nnUNetv2_train 104 exited with 1 (log: L)")
        return {}

    monkeypatch.setattr(protocol, "prepare", lambda *a: None)
    monkeypatch.setattr(protocol, "held_out_images", lambda *a: None)
    monkeypatch.setattr(protocol, "train_and_score", fake)
    assert protocol.main(["--rows", "a", "b", "--seeds", "0", "1", "--parallel", "--work", str(tmp_path)]) == 1
    assert sorted(ran) == [("a", 0, 1), ("a", 1, 1), ("b", 0, 1), ("b", 1, 1)]
    err = capsys.readouterr().err
    assert "FAILED rows:\n  b seed 0: nnUNetv2_train 104 exited with 1 (log: L)\n  b seed 1: " in err
    ran.clear()
    assert protocol.main(["--rows", "a", "--work", str(tmp_path)]) == 0 and ran == [("a", 0, None)]


def test_protocol_scores_a_run_with_its_resolved_settings_and_rescores_a_retrained_model(tmp_path, monkeypatch):
    """train_and_score with nnU-Net's commands stood in for: the score file holds the row's fields and the settings
    read back from the checkpoint (SHARED's paths made relative); a model retrained after its scoring is predicted
    and scored again, an unchanged one is not."""
    import os
    import time

    protocol = _protocol()
    shared = tmp_path / "shared"
    paths = protocol.Paths(tmp_path / "work", shared)
    row = protocol.ROWS["b_logitkd_oracle"]
    commands = []

    def fake_run(command, log, env=None):
        commands.append(command[0])
        if command[0] == "nnUNetv2_train":
            config = json.loads(Path(env["RECOKD_CONFIG"]).read_text())
            fold = protocol.model_folder(paths, row, 0) / "fold_0"
            fold.mkdir(parents=True)
            torch.save({"recokd": {"settings": {**config, "initial_lr": 0.01}}}, fold / "checkpoint_final.pth")
        elif command[0] == "nnUNetv2_predict_from_modelfolder":
            Path(command[command.index("-o") + 1]).mkdir(parents=True)
        elif command[0] == "nnUNetv2_evaluate_folder":
            (Path(command[2]) / "summary.json").write_text(json.dumps({
                "foreground_mean": {"Dice": 0.5}, "mean": {"1": {"Dice": 0.6}, "2": {"Dice": 0.4}},
                "metric_per_case": [{}, {}]}))

    monkeypatch.setattr(protocol, "run", fake_run)
    monkeypatch.setattr(protocol, "held_out_images", lambda paths, name: tmp_path / "held_out")
    record = protocol.train_and_score(paths, row, 0, "cpu", 1)
    assert commands == ["nnUNetv2_train", "nnUNetv2_predict_from_modelfolder", "nnUNetv2_evaluate_folder"]
    assert record["dice_mean"] == 0.5 and record["k"] == 20 and record["row_settings"] == {"logit_oracle_margin": 17.5}
    assert record["settings"]["logit_oracle_margin"] == 17.5 and record["settings"]["cpu_threads"] == 1
    assert record["settings"]["teacher"] == ("../shared/teachers/Dataset004_Hippocampus/"
                                             "nnUNetTrainer__nnUNetPlans__3d_fullres")
    assert json.loads((paths.scores / "b_logitkd_oracle_s0.json").read_text()) == record
    commands.clear()
    protocol.train_and_score(paths, row, 0, "cpu", 1)  # trained and scored: nothing runs again
    assert commands == []
    final = protocol.model_folder(paths, row, 0) / "fold_0" / "checkpoint_final.pth"
    later = time.time() + 10
    os.utime(final, (later, later))  # retrained after its scoring
    protocol.train_and_score(paths, row, 0, "cpu", 1)
    assert commands == ["nnUNetv2_predict_from_modelfolder", "nnUNetv2_evaluate_folder"]


def test_logit_terms_check_splits_a_term_by_the_voxels_labels():
    """examples/hippocampus/logit_terms_check.py's helpers, hand-computed: a per-voxel term [1, 2, 3, 4] on labels
    [0, 0, 1, 2] lies 3/10, 3/10, 4/10 on labels 0, 1, 2; the gradient on each voxel's own-class logit, summed per
    label: label 0 -> channel 0 at voxels 0-1 (1 + 2), label 1 -> channel 1 at voxel 2 (30), label 2 -> 400."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "hippocampus" / "logit_terms_check.py"
    spec = importlib.util.spec_from_file_location("_logit_terms_check_under_test", path)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    target = torch.tensor([0, 0, 1, 2]).reshape(1, 1, 4)
    shares = check.per_class_shares(torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 4), target, 3)
    assert shares == pytest.approx([0.3, 0.3, 0.4])
    grad = torch.tensor([[1.0, 2, 3, 4], [10, 20, 30, 40], [100, 200, 300, 400]]).reshape(1, 3, 4)
    assert check.own_logit_gradient(grad, target, 3) == pytest.approx([3.0, 30.0, 400.0])
    # confusion: labels [0, 0, 1, 2] predicted [0, 1, 1, 1] -> row 0 half 0 half 1, rows 1 and 2 all class 1
    rows = check.confusion(torch.tensor([0, 1, 1, 1]).reshape(1, 1, 4), target, 3)
    assert rows == [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
    # softened probabilities at T = 2 per label: logits [0, 2 ln 3] -> [1/4, 3/4], [0, 0] -> [1/2, 1/2]; both
    # voxels labelled 1 -> row 1 is their mean [3/8, 5/8]; label 0 is absent -> zeros
    logits = torch.tensor([[0.0, 0.0], [2 * math.log(3), 0.0]]).reshape(1, 2, 2)
    probs = check.mean_probabilities(logits, torch.tensor([1, 1]).reshape(1, 1, 2), 2, 2.0)
    assert probs[0] == [0.0, 0.0] and probs[1] == pytest.approx([0.375, 0.625])


def test_logit_continue_check_keeps_the_voxels_near_the_foreground():
    """examples/hippocampus/logit_continue_check.py's mask: one foreground voxel at index 3 of 7, radius 1 -> voxels
    2-4; radius 0 -> the foreground alone; no foreground -> nothing."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "hippocampus" / "logit_continue_check.py"
    spec = importlib.util.spec_from_file_location("_logit_continue_check_under_test", path)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    target = torch.zeros(1, 1, 1, 1, 7)
    target[..., 3] = 2
    assert check.near_foreground(target, 1).flatten().tolist() == [False, False, True, True, True, False, False]
    assert check.near_foreground(target, 0).flatten().tolist() == [False, False, False, True, False, False, False]
    assert not check.near_foreground(torch.zeros(1, 1, 1, 1, 7), 2).any()
