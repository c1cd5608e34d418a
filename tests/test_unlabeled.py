"""Unlabeled scans (nnunetv2_recokd/unlabeled.py, `add-unlabeled`): splits, the per-sample seg-loss weight, the
labelling that resumes, and the refusals that come before anything is written."""

from __future__ import annotations

import json
import math
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


def test_headline_names_rows_of_another_budget_or_learning_rate_with_their_settings(tmp_path):
    """row_name / student_of strip unlabeled.sh's suffixes (_k<k>, _<epochs>x<iterations>, _lr<rate>) to find the row
    and say the settings; --block puts a pair into its own marked block (here the lr pair, 0.8281 / 0.8488: +0.0207)."""
    headline = _headline()
    assert headline.row_name("c_student_30x100_lr0.023") == \
        "(c) pseudo-labels alone, 20 labels + 146 teacher-labelled (30 x 100, initial lr 0.023)"
    assert headline.row_name("a_lr0.023") == "(a) control, 20 labels (initial lr 0.023)"
    assert headline.row_name("a") == "(a) control, 20 labels"
    assert headline.student_of("w8_a_30x100") == headline.ROW_STUDENTS["w8_a"]
    # SET="logit_temperature=1" (after LR's suffix): the setting named, the row's student found
    assert headline.split_row("b_logitkd_lr0.023+logit_temperature=1+logit_weight=0.25") == \
        ("b_logitkd", ["initial lr 0.023", "logit_temperature = 1", "logit_weight = 0.25"])
    assert headline.row_name("b_logitkd+logit_temperature=1").endswith("(logit_temperature = 1)")
    assert headline.student_of("b_logitkd+logit_temperature=1") == headline.ROW_STUDENTS["b_logitkd"]
    # K=5 (_k5, before the budget): 5 real labels, 166 - 5 = 161 teacher-labelled, the datasets 600 + 5 and 700 + 5
    assert headline.split_row("c_student_k5_30x100") == ("c_student", ["30 x 100"])
    assert [headline.labelled_k(r) for r in ("a_k5", "a", "a_k12_lr0.023+logit_weight=0.25")] == [5, 20, 12]
    assert headline.row_name("c_student_k5_lr0.023") == \
        "(c) pseudo-labels alone, 5 labels + 161 teacher-labelled (initial lr 0.023)"
    assert headline.student_of("a_k5") == "control (`nnUNetTrainerStudent`), 5 labelled cases (Dataset605)"
    assert headline.student_of("c_student_k5").startswith("control trainer on Dataset705: 5 labelled + 161 teacher")
    for row, dice in (("a_lr0.023", 0.8281), ("c_student_lr0.023", 0.8488)):
        (tmp_path / f"{row}_s0.json").write_text(json.dumps({"row": row, "seed": 0, "dice_mean": dice,
                                                                  "dice_per_class": {"1": dice}, "held_out_cases": 42}))
    page = tmp_path / "page.md"
    page.write_text("<!-- headline:start -->\nkept\n<!-- headline:end -->\n<!-- lr:start -->\n<!-- lr:end -->\n")
    headline.main([str(tmp_path), "--control", "a_lr0.023", "--treated", "c_student_lr0.023", "--block", "lr",
                   "--update", str(page)])
    text = page.read_text()
    assert "<!-- headline:start -->\nkept\n<!-- headline:end -->" in text
    assert "| (c) - (a), paired | +0.0207 | +0.0207 ± 0.0000 (n = 1) |" in text.split("<!-- lr:start -->")[1]


def test_headline_imports_the_scripts_scores_and_tables_every_row(tmp_path):
    """--import copies WORK/scores (an empty file of an interrupted scoring skipped, the teacher's absolute path made
    relative to the shared folder); the table of every row sits between its own marks, sorted by row and seed."""
    headline = _headline()
    work, scores = tmp_path / "work_scores", tmp_path / "scores"
    work.mkdir(), scores.mkdir()
    for row, seed, dice in (("c_recokd", 0, 0.84), ("a", 1, 0.82), ("a", 0, 0.8256), ("w8_a_30x100", 0, 0.7),
                            ("c_student_lr0.023", 0, 0.5), ("b_logitkd+logit_weight=0.25", 0, 0.6)):
        (work / f"{row}_s{seed}.json").write_text(json.dumps({
            "row": row, "seed": seed, "dice_mean": dice, "dice_per_class": {"1": dice + 0.01, "2": dice - 0.01},
            "held_out_cases": 42, "training_cases": {"real": 20, "teacher": "/work/shared/teachers/T/F"},
            "epochs": 30 if row.endswith("30x100") else 15, "iterations": 100,
            **({"initial_lr": 0.023} if "_lr" in row else {})}))
    (work / "u_c_s0.json").write_text("")
    assert headline.import_scores(work, scores) == ["a_s0.json", "a_s1.json", "b_logitkd+logit_weight=0.25_s0.json",
                                                    "c_recokd_s0.json", "c_student_lr0.023_s0.json",
                                                    "w8_a_30x100_s0.json"]
    assert json.loads((scores / "a_s0.json").read_text())["training_cases"]["teacher"] == "../shared/teachers/T/F"
    rows = headline.rows_markdown(scores).splitlines()
    assert len(rows) == 8 and rows[2].startswith("| a | 0 | control") and rows[5].startswith("| c_recokd | 0 |")
    assert "| 15 x 100 | 0.8256 | 1: 0.8356, 2: 0.8156 | 42 |" in rows[2]
    # a row run with SET's settings: the column says them too
    assert "| 15 x 100, logit_weight = 0.25 | 0.6000 |" in rows[4]
    # a row run at another budget or learning rate: the same student, its own budget
    assert rows[6].startswith("| c_student_lr0.023 | 0 | control trainer on Dataset204: 20 labelled + 146 "
                              "teacher-labelled (pseudo-labels alone) | 15 x 100, initial lr 0.023 | 0.5000 |")
    assert rows[7].startswith("| w8_a_30x100 | 0 | control, width 1/8, 20 labelled cases (Dataset104) | 30 x 100 |")
    page = tmp_path / "page.md"
    page.write_text(f"{headline.MARK_START}\nold\n{headline.MARK_END}\nmid\n{headline.ROWS_START}\nold\n"
                    f"{headline.ROWS_END}\nend\n")
    assert headline.main([str(scores), "--update", str(page)]) == 0
    text = page.read_text()
    assert "old" not in text and "| (c) - (a), paired | +0.0144 | - |" in text
    assert f"{headline.ROWS_START}\n{headline.rows_markdown(scores)}{headline.ROWS_END}\nend\n" in text


def _plan(tmp_path, **settings):
    """examples/hippocampus/unlabeled.sh with PLAN=1 (prints its resolved settings, writes nothing) and `settings`."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "examples" / "hippocampus" / "unlabeled.sh"
    env = {"PATH": "/usr/bin:/bin", "PLAN": "1", "SHARED": str(tmp_path / "shared"), "WORK": str(tmp_path / "work"),
           **settings}
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)


@pytest.mark.parametrize("parallel, threads", [("0", "every core"), ("1", "1")])
def test_the_hippocampus_script_runs_past_its_settings(tmp_path, parallel, threads):
    """examples/hippocampus/unlabeled.sh under `set -e`: without PARALLEL=1 it once stopped silently at its THREADS
    line (a failing `[ ]` inside the assignment). PLAN=1 prints the resolved settings and writes nothing."""
    done = _plan(tmp_path, PARALLEL=parallel, ROWS="a c_recokd")
    assert done.returncode == 0, done.stderr
    assert f"rows: a c_recokd | seeds: 0 | k 20 | 15 x 100 iterations | initial lr 0.01 | device cpu |" \
           f" parallel {parallel} |" \
           f" torch threads per training: {threads} |" in done.stdout
    assert not (tmp_path / "work").exists()


def test_the_hippocampus_script_names_rows_of_another_budget_apart(tmp_path):
    """EPOCHS=30: rows are saved as <row>_30x100, so a longer run neither resumes nor re-scores the 15 x 100 model
    of the same row (the script skips training where checkpoint_final exists); LR=0.023 likewise as <row>_lr0.023;
    the protocol's budget and learning rate keep the names."""
    longer = _plan(tmp_path, ROWS="w8_a", EPOCHS="30")
    assert longer.returncode == 0, longer.stderr
    assert "| 30 x 100 iterations |" in longer.stdout
    assert "rows are saved as <row>_30x100 (not the protocol's k = 20, 15 x 100 iterations at learning rate 0.01)" \
        in longer.stdout
    faster = _plan(tmp_path, ROWS="c_student", LR="0.023")  # another learning rate: named apart too
    assert faster.returncode == 0, faster.stderr
    assert "| initial lr 0.023 |" in faster.stdout and "rows are saved as <row>_lr0.023 " in faster.stdout
    both = _plan(tmp_path, ROWS="c_student", LR="0.02", EPOCHS="30")
    assert "rows are saved as <row>_30x100_lr0.02 " in both.stdout
    protocol = _plan(tmp_path, ROWS="w8_a")
    assert protocol.returncode == 0 and "rows are saved as" not in protocol.stdout
    assert not (tmp_path / "work").exists()


def test_the_hippocampus_script_takes_another_k_into_datasets_and_rows_of_its_own(tmp_path):
    """K=5: the rows that depend on k are named <row>_k5 and use Dataset605 / Dataset705, never the k = 20 datasets
    (which a WORK may already hold); rows that exist for k = 20 only, or do not depend on k, and a K that is not a
    case count stop the script before it writes anything."""
    done = _plan(tmp_path, ROWS="a c_student", K="5", EPOCHS="20")
    assert done.returncode == 0, done.stderr
    assert "| k 5 | 20 x 100 iterations |" in done.stdout and "rows are saved as <row>_k5_20x100 (" in done.stdout
    assert "datasets: Dataset605_HippoK5 (k = 5 labelled + the held-out cases), Dataset705_HippoK5Unlabeled" \
        in done.stdout
    assert "datasets:" not in _plan(tmp_path, ROWS="a").stdout
    for rows in ("a d", "c_agree", "u_a"):
        refused = _plan(tmp_path, ROWS=rows, K="5")
        assert refused.returncode == 2 and "runs with the protocol's k = 20 only" in refused.stderr
    assert _plan(tmp_path, K="5").returncode == 2  # the default rows include d and e
    for bad in ("0", "five", "100"):
        refused = _plan(tmp_path, ROWS="a", K=bad)
        assert refused.returncode == 2 and f"K: '{bad}' is not a number of labelled cases" in refused.stderr
    assert not (tmp_path / "work").exists()


def test_the_hippocampus_script_passes_trainer_settings_and_names_the_rows_by_them(tmp_path):
    """SET="name=value ..." goes into every row's config (JSON values) and names the rows <row>+name=value after the
    budget and learning-rate suffixes; anything but name=value stops the script before it writes anything."""
    done = _plan(tmp_path, ROWS="b_logitkd", LR="0.023", SET="logit_temperature=1 logit_weight=0.25")
    assert done.returncode == 0, done.stderr
    assert "rows are saved as <row>_lr0.023+logit_temperature=1+logit_weight=0.25 " in done.stdout
    assert 'settings added to every row\'s config: {"initial_lr": 0.023, "logit_temperature": 1, ' \
           '"logit_weight": 0.25}' in done.stdout
    for bad in ("logit_temperature", "=1", "a=b=c", "Logit=1"):
        refused = _plan(tmp_path, ROWS="b_logitkd", SET=bad)
        assert refused.returncode == 2 and f"SET: '{bad}' is not name=value" in refused.stderr
    assert not (tmp_path / "work").exists()


def test_every_row_of_the_hippocampus_script_is_described_in_the_results_tables(tmp_path):
    """Every row unlabeled.sh runs by default (PLAN=1 prints them) has its student described in headline.py, which
    writes the results pages' table of every row: a new row cannot land in the tables unnamed."""
    done = _plan(tmp_path)
    assert done.returncode == 0, done.stderr
    rows = done.stdout.split("rows: ", 1)[1].split(" | ", 1)[0].split()
    assert {"a", "b", "b_logitkd", "c_logitkd", "c_student"} <= set(rows)
    assert sorted(set(rows) - set(_headline().ROW_STUDENTS)) == []


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
