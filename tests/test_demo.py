"""The README's "run it" command on its smallest setting: synthetic data through nnU-Net's own commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunetv2_recokd import cli
from nnunetv2_recokd import demo
from nnunetv2_recokd.evaluation import spread


def test_demo_smallest_setting_writes_table_and_figure(smallest_demo):
    out, proc = smallest_demo
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[1/12 " in proc.stdout and "[12/12 " in proc.stdout  # progress from the first to the last step
    assert str(out / "nnunet" / "results") in proc.stdout  # where it trains, said up front
    rows = json.loads((out / "table.json").read_text())["rows"]
    # the default story: a control on 2 labelled cases, the control trainer and ReCo-KD on those 2 + 2 scans the
    # teacher labelled
    assert [(r["model"], r["trainer"]) for r in rows] == [
        ("teacher", "nnUNetTrainerTeacher"), ("student, 2 labels", "nnUNetTrainerStudent"),
        ("student, 2 labels + 2 teacher-labelled", "nnUNetTrainerStudent"),
        ("ReCo-KD student, 2 labels + 2 teacher-labelled", "nnUNetTrainerReCoKD")]
    teacher, student, pseudo, distilled = rows
    derived = out / "nnunet" / "raw" / "Dataset992_SyntheticLesionsFew2Unlabeled2"
    assert len(list((derived / "labelsTr").iterdir())) == 4  # 2 real + 2 teacher-labelled
    assert len(list((out / "nnunet" / "raw" / "Dataset991_SyntheticLesionsFew2" / "labelsTr").iterdir())) == 2
    assert 12 < teacher["params"] / student["params"] < 20 and student["params"] == distilled["params"]
    assert teacher["gflops_per_patch"] > 8 * student["gflops_per_patch"]
    for r in rows:
        assert r["cases"] == 2 and r["evaluated_on"] == "held-out test cases" and r["seeds"] == [0]
        assert set(r["dice"]) == {"organ", "lesion"} and all(0 <= d <= 1 for d in r["dice"].values())
        assert r["latency_ms"] > 0
        # seconds per held-out case of the whole stock nnUNetv2_predict command and of our predict on the runtime
        assert r["stock_s_per_case"] > 0 and r["runtime_s_per_case"] > 0
    # distillation really added to the ReCo-KD student's loss; the control has no such term
    assert distilled["kd_weighted_per_epoch"][0] and min(distilled["kd_weighted_per_epoch"][0]) > 0
    assert student["kd_weighted_per_epoch"] == pseudo["kd_weighted_per_epoch"] == [[]]
    config = json.loads((out / "config_nnUNetTrainerReCoKD_derived_seed0.json").read_text())
    assert config["seed"] == 0 and config["reco_warmup"] == 0.0 and config["teacher_folds"] == [0]
    table = (out / "table.md").read_text()
    assert f"{teacher['params'] / 1e6:.3f}" in table and "`nnUNetTrainerReCoKD`" in table
    assert "s / case, nnUNetv2_predict | s / case, openvino |" in table
    assert f"| {distilled['stock_s_per_case']:.2f} | {distilled['runtime_s_per_case']:.2f} |" in table
    assert (out / "figure.png").read_bytes()[:4] == b"\x89PNG"
    assert "ensemble" not in json.loads((out / "table.json").read_text()) and "--ensemble" not in table  # flag off


def test_demo_ensemble_flag_reaches_main_and_is_checked(monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match="--ensemble takes 0"):  # before anything is written or trained
        demo.run(str(tmp_path / "x"), "cpu", None, 1, 1, 1, 6, 2, ensemble=1)
    assert not (tmp_path / "x").exists()
    seen = {}
    monkeypatch.setattr(demo, "run", lambda *args, **kwargs: seen.update(kwargs) or 0)
    assert cli.main(["demo", "--device", "cpu", "--ensemble", "2"]) == 0 and seen["ensemble"] == 2
    assert cli.main(["demo", "--device", "cpu"]) == 0 and seen["ensemble"] == 0  # off by default


def test_demo_ensemble_story_on_the_smallest_demo(smallest_demo, monkeypatch):
    """--ensemble 2 after the smallest demo's steps (the same calls main makes, continuing from its folders):
    teacher fold 1, one student distilled from folds 0 and 1, the extra table. The four held-out evaluations are
    the smallest demo's own code path (nnUNetv2_predict, the runtime, nnUNetv2_evaluate_folder: tested above), so
    here they return fixed scores (suite time: each costs three nnU-Net command starts)."""
    out, proc = smallest_demo
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    evaluated = []

    def scores(self, tag, trainer, model_folder, env, folds=(0,), tta=False, runtime=True):
        evaluated.append((trainer, list(folds), tta, runtime, Path(model_folder).name))
        return {"dice": {"organ": 0.9, "lesion": 0.5}, "mean_dice": 0.7, "cases": 2,
                "evaluated_on": "held-out test cases", "stock_s_per_case": 1.5,
                **({"runtime_s_per_case": 0.5} if runtime else {})}

    monkeypatch.setattr(demo.Evaluation, "held_out_scores", scores)
    progress = demo.Progress(2 + demo.ensemble_steps(2))
    setup = demo.prepare(str(out), "cpu", None, 10, 2, None, progress, varied=True)  # same data: no re-planning
    story = demo.ensemble_story(setup, progress, 2, seed=0, student_epochs=1, iterations=4, warmup=0.0)
    main = json.loads((out / "table.json").read_text())
    demo.write_outputs(main["rows"], out, main["minutes"] * 60, story)

    written = json.loads((out / "table.json").read_text())
    assert written["rows"] == main["rows"] and written["ensemble"]["folds"] == [0, 1]
    rows = written["ensemble"]["rows"]
    assert [(r["trainer"], r["folds"], r["tta"]) for r in rows] == [
        ("nnUNetTrainerTeacher", [0, 1], True), ("nnUNetTrainerTeacher", [0], True),
        ("nnUNetTrainerLogitKD_ensemble", [0], False), ("nnUNetTrainerLogitKD_ensemble", [0], True)]
    assert [r["forwards_per_patch"] for r in rows] == [16, 8, 1, 8]  # folds x 2^3 mirrorings
    for r in rows:
        assert r["cases"] == 2 and r["evaluated_on"] == "held-out test cases" and r["stock_s_per_case"] > 0
        assert set(r["dice"]) == {"organ", "lesion"} and all(0 <= d <= 1 for d in r["dice"].values())
    assert rows[2]["runtime_s_per_case"] > 0 and all("runtime_s_per_case" not in r for r in rows[:2] + rows[3:])
    assert rows[0]["params"] == 2 * rows[1]["params"] and rows[1]["params"] > 12 * rows[2]["params"]
    assert rows[0]["gflops_per_patch"] == 2 * rows[1]["gflops_per_patch"]
    assert [e[:4] for e in evaluated] == [("nnUNetTrainerTeacher", [0, 1], True, False),
                                          ("nnUNetTrainerTeacher", [0], True, False),
                                          ("nnUNetTrainerLogitKD_ensemble", [0], False, True),
                                          ("nnUNetTrainerLogitKD_ensemble", [0], True, False)]

    student = out / "nnunet" / "results" / "students_seed0" / "Dataset990_SyntheticLesions" / \
        "nnUNetTrainerLogitKD_ensemble__nnUNetPlans__3d_fullres"
    recorded = torch.load(student / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    teachers = recorded["recokd"]["teacher"]  # one student, both fold teachers of the demo's teacher
    assert [t.split("/")[-2:] for t in teachers] == [["fold_0", "checkpoint_final.pth"],
                                                     ["fold_1", "checkpoint_final.pth"]]
    assert all("nnUNetTrainerTeacher__nnUNetPlans__3d_fullres" in t for t in teachers)
    assert recorded["recokd"]["teacher_saw_validation_cases"]["cases"] > 0  # fold 1 trained on fold 0's validation
    config = json.loads((out / "config_nnUNetTrainerLogitKD_ensemble_seed0.json").read_text())
    assert config["teacher_folds"] == [0, 1] and config["seed"] == 0

    table = (out / "table.md").read_text()
    assert table.startswith("| model | trainer | seeds |")  # the usual table first, unchanged
    assert "### Teacher fold ensemble vs one distilled student (--ensemble 2)" in table
    assert ("| inference | trainer | folds | TTA | forwards / patch | Dice organ | Dice lesion | mean Dice "
            "| params (M) | GFLOPs / patch, all forwards | s / case, nnUNetv2_predict | s / case, openvino |") in table
    assert "| teacher, 2-fold ensemble + TTA (nnU-Net's default) | `nnUNetTrainerTeacher` | 0, 1 | on | 16 |" in table
    assert f"| {rows[2]['stock_s_per_case']:.2f} | {rows[2]['runtime_s_per_case']:.2f} |" in table
    assert "optimistic" in table and "honest" in table


def _row(trainer: str, organ: list[float], lesion: list[float]) -> dict:
    means = [(a + b) / 2 for a, b in zip(organ, lesion)]
    return {"model": trainer, "trainer": trainer, "seeds": list(range(len(organ))),
            "dice": {"organ": sum(organ) / len(organ), "lesion": sum(lesion) / len(lesion)},
            "dice_sd": {"organ": spread(organ), "lesion": spread(lesion)},
            "mean_dice": sum(means) / len(means), "mean_dice_sd": spread(means), "evaluated_on": "held-out",
            "cases": 4, "params": 1e6, "gflops_per_patch": 1.0, "latency_ms": 10.0, "patch_size": [8, 8, 8],
            "device": "cpu"}


def test_table_gives_mean_and_sample_spread_over_seeds(tmp_path):
    rows = [_row("teacher", [0.9], [0.8]), _row("student", [0.5, 0.7, 0.9], [0.2, 0.4, 0.3])]
    demo.write_outputs(rows, tmp_path, 90.0)
    table = (tmp_path / "table.md").read_text()
    line = next(li for li in table.splitlines() if li.startswith("| student "))
    # organ: mean 0.7, sample sd 0.2; lesion: mean 0.3, sd 0.1; mean Dice per seed 0.35, 0.55, 0.6
    assert "| 0.700 ± 0.200 | 0.300 ± 0.100 | 0.500 ± 0.132 |" in line
    assert "| 0.900 | 0.800 |" in next(li for li in table.splitlines() if li.startswith("| teacher "))
    assert "1.5 min" in table and "standard deviation" in table


def test_the_caption_names_exactly_the_timed_columns(tmp_path):
    """Seconds per case: the caption lists the commands whose columns are there, and says how to get the runtime's
    column when it is missing."""
    both = [{**_row(m, [0.9], [0.8]), "stock_s_per_case": 2.5, "runtime_s_per_case": 0.25} for m in ("a", "b")]
    demo.write_outputs(both, tmp_path, 60.0)
    table = (tmp_path / "table.md").read_text()
    assert "| s / case, nnUNetv2_predict | s / case, openvino |" in table and "| 2.50 | 0.25 |" in table
    assert "`nnUNetv2_predict -device cpu` and `nnunetv2_recokd predict --runtime openvino` (CPU)" in table
    assert "not timed" not in table
    stock_only = [{k: v for k, v in r.items() if k != "runtime_s_per_case"} for r in both]
    demo.write_outputs(stock_only, tmp_path, 60.0)
    table = (tmp_path / "table.md").read_text()
    assert "s / case, openvino" not in table and "--runtime openvino` (CPU)" not in table
    assert "TTA off, `nnUNetv2_predict -device cpu`; on small cases (the synthetic ones)" in table
    assert "was not timed" in table and "pip install openvino onnx" in table


def test_the_varied_set_keeps_the_easy_cases_and_varies_what_a_few_cases_cannot_cover(tmp_path):
    """varied=False draws the original cases (same random stream); varied=True gives each case its own contrast
    (the lesion brighter or darker than the organ), and unlabeled scans are new images with nnU-Net's names."""
    from nnunetv2_recokd.synthetic import make_case, write_unlabeled_images

    easy = make_case(np.random.default_rng(0), 24, 0.15)
    again = make_case(np.random.default_rng(0), 24, 0.15, varied=False)
    assert np.array_equal(easy[0], again[0]) and np.array_equal(easy[1], again[1])
    rng = np.random.default_rng(0)
    signs = set()
    for _ in range(12):
        image, label = make_case(rng, 24, 0.15, varied=True)
        assert set(np.unique(label)) <= {0, 1, 2} and (label == 1).any()
        if (label == 2).any():
            signs.add(np.sign(image[label == 2].mean() - image[label == 1].mean()))
    assert signs == {-1.0, 1.0}  # both contrasts occur
    folder = write_unlabeled_images(tmp_path / "scans", 3, size=16, varied=True)
    assert sorted(p.name for p in folder.iterdir()) == [f"scan_{i:03d}_0000.nii.gz" for i in range(3)]


def test_few_labels_is_refused_where_it_cannot_run(tmp_path):
    common = dict(out=str(tmp_path / "d"), device="cpu", teacher_epochs=1, student_epochs=1, iterations=1,
                  num_test=1)
    with pytest.raises(SystemExit, match="--few-labels is a story on the synthetic data"):
        demo.run(dataset="4", num_train=8, few_labels=3, **common)
    with pytest.raises(SystemExit, match="2..7"):
        demo.run(dataset=None, num_train=8, few_labels=8, **common)
    with pytest.raises(SystemExit, match="--unlabeled"):
        demo.run(dataset=None, num_train=8, few_labels=3, unlabeled=0, **common)
    assert not (tmp_path / "d").exists()  # refused before anything is written


def test_each_story_has_its_own_defaults_and_the_user_overrides_them():
    assert demo.story_defaults(None, None, None, None) == (2, 8, 20)  # synthetic: the few-label story
    assert demo.story_defaults("4", None, None, None) == (0, 3, 4)  # --dataset: every model on all labels
    assert demo.story_defaults(None, 0, None, None) == (0, 3, 4)  # --few-labels 0: the easy set
    assert demo.story_defaults(None, 3, 1, None) == (3, 1, 20)
    assert demo.SIZE == {True: 32, False: 48}


def test_a_reused_output_folder_with_another_synthetic_set_is_planned_again(tmp_path):
    """Dataset990 (and the few-label datasets made from it) of another set are removed before the new set is
    written, so nnU-Net's planning runs again; the same set keeps its preprocessed data."""
    work = tmp_path / "nnunet"
    folders = [work / root / f"Dataset{i}_X" for root in ("raw", "preprocessed") for i in (990, 991, 992)]
    for f in folders + [work / "raw" / "Dataset004_Other"]:
        f.mkdir(parents=True)
    easy = {"varied": False, "size": 48, "num_train": 10, "num_test": 4}
    (work / demo.SYNTHETIC_SET).write_text(json.dumps(easy))
    demo.drop_stale_synthetic(work, easy)
    assert all(f.is_dir() for f in folders)  # same set: kept
    demo.drop_stale_synthetic(work, {**easy, "varied": True, "size": 32})
    assert not any(f.exists() for f in folders) and (work / "raw" / "Dataset004_Other").is_dir()
    assert not (work / demo.SYNTHETIC_SET).exists()


def test_run_logged_echoes_each_epoch_and_labelled_case_with_the_elapsed_time(tmp_path, capsys):
    """The demo's long steps print a line per nnU-Net epoch and per case add-unlabeled labels while they run (a
    stand-in command writes nnU-Net's and add-unlabeled's lines 0.3 s apart); other lines stay in the log only."""
    import sys as _sys

    from nnunetv2_recokd.nnunet_commands import run_logged

    script = tmp_path / "fake.py"
    script.write_text("import time\n"
                      "for line in ['2026-12-08 00:00:01.0: Epoch 0', 'train_loss 1.2',"
                      " '2026-12-08 00:00:02.0: Epoch 1', '[1/2] scan_000: 1.0 s', '[2/2] scan_001: 1.0 s', 'done']:\n"
                      "    print(line, flush=True); time.sleep(0.3)\n")
    text = run_logged([_sys.executable, str(script)], {}, tmp_path / "log.txt", label="teacher", poll_seconds=0.1)
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in out] == ["    teacher: Epoch 0", "    teacher: Epoch 1",
                                                     "    teacher: [1/2] scan_000:", "    teacher: [2/2] scan_001:"]
    assert all(line.endswith(" s)") for line in out) and "train_loss 1.2" in text
    run_logged([_sys.executable, str(script)], {}, tmp_path / "quiet.txt", poll_seconds=0.1)  # no label: silent
    assert capsys.readouterr().out == ""
