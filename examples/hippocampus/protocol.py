"""Does the teacher pay? The Hippocampus protocol of issues #20 and #35 as data: one table of datasets, one of rows.

Every row is one student (or teacher) recipe: the dataset it trains on, the trainer, the teacher, the settings that
are not the trainer's defaults, the budget and the cases it is scored on. Every row is trained and scored the same
way: nnUNetv2_train (seeded, resumable with --c, a checkpoint every epoch), nnUNetv2_predict_from_modelfolder
(mirroring on, as nnU-Net's validation) on held-out cases no model of that row trained on, nnUNetv2_evaluate_folder,
mean foreground Dice. Each run's score file (WORK/scores/<row>_s<seed>.json) records the row's fields and the
trainer's fully resolved settings read back from its final checkpoint, so tables read fields, never names.

    python examples/hippocampus/protocol.py --rows a c_student --seeds 0 1 2 [--parallel] [--work DIR]
    python examples/hippocampus/protocol.py --list            # the rows and datasets
    python examples/hippocampus/protocol.py --rows a --plan   # what would run, without running it

A failed training, prediction or evaluation fails the whole command (exit 1) after the other rows finished, naming
each failed row and its log. A model retrained after it was scored (its checkpoint_final.pth newer than the
prediction's summary.json) is predicted and scored again.

Environment: SHARED (default: ../shared beside the repository). Held out: fold 0's 42 validation cases (rows on
Dataset104 and the datasets built from it), 21 of them (rows u_*). Timing on the 2-core CPU (issue #20): the control
takes ~140 s per 100-iteration epoch alone with 2 threads, ~172 s side by side with one thread each; ReCo-KD ~1.6x
that; logit KD with the teacher's forward on every batch ~340 s alone.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parents[1]
SHARED_TEACHER = "teachers/Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres"  # under SHARED
SOURCE = "data/Dataset004_Hippocampus"  # under SHARED
PROTOCOL_BUDGET = (15, 100)  # epochs x iterations of every row unless it says otherwise
TEACHER_SEED = 0  # a row that teaches other rows (a teacher row, a dataset's labeller) serves them with this seed


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A training dataset of the protocol.

    kind "labelled": k real labelled cases of fold 0's training split (drawn with seed 0) plus fold 0's validation
        cases (few_labels.py); `unlabeled` names which other cases go into its unlabeled folder (train-rest: the
        other fold-0 training cases, which the shared teacher was trained on; val-half: half of fold 0's validation
        cases, which no model saw; the other half stays as validation).
    kind "derived": the labelled dataset `labelled` (or none) plus its unlabeled folder, labelled by `teacher`
        (nnunetv2_recokd add-unlabeled; `flags` added); `teacher` is "shared" or the name of a row whose model
        folder is the teacher.
    kind "all-unlabeled": every fold-0 training case, unlabeled, labelled by the shared teacher.
    kind "full": Dataset004 itself (every case labelled), planned and preprocessed by nnU-Net.
    """

    id: int
    name: str
    kind: str
    k: Optional[int] = None
    unlabeled: str = "train-rest"
    labelled: Optional[str] = None
    teacher: str = "shared"
    flags: tuple[str, ...] = ()

    @property
    def folder_name(self) -> str:
        return f"Dataset{self.id:03d}_{self.name}"


DATASETS = {d.name: d for d in [
    Dataset(104, "HippoK20", "labelled", k=20),
    Dataset(204, "HippoK20Unlabeled", "derived", labelled="HippoK20"),
    Dataset(214, "HippoK20UnlabeledAgree", "derived", labelled="HippoK20", flags=("--min-agreement", "1")),
    Dataset(105, "HippoK20Half", "labelled", k=20, unlabeled="val-half"),
    Dataset(205, "HippoK20HalfUnlabeled", "derived", labelled="HippoK20Half"),
    Dataset(605, "HippoK5", "labelled", k=5),
    Dataset(705, "HippoK5Unlabeled", "derived", labelled="HippoK5"),
    Dataset(304, "HippoAllUnlabeled", "all-unlabeled"),
    # self-training (issue #35, item 2): the other 146 fold-0 training cases labelled by a teacher trained on the same
    # 20 labelled cases only (row teacher_k20): no model sees a label beyond the 20
    Dataset(224, "HippoK20SelfTaught", "derived", labelled="HippoK20", teacher="teacher_k20"),
    Dataset(4, "Hippocampus", "full"),
]}


@dataclasses.dataclass(frozen=True)
class Row:
    """One recipe: `trainer` on `dataset` (fold `fold`), scored on `held_out`'s fold-0 validation cases.

    k: real labelled cases the student had. teacher: "shared" (the fold-0 teacher in SHARED), a row name (that row's
    model folder), or None (the trainer's default: none, or the teacher a derived dataset names). settings: trainer
    settings that are not the trainer's shipped defaults (RECOKD_CONFIG). description: what the student is.
    """

    name: str
    dataset: str
    trainer: str
    description: str
    k: int = 20
    held_out: str = "HippoK20"
    fold: str = "0"
    teacher: Optional[str] = None
    settings: dict = dataclasses.field(default_factory=dict)
    epochs: int = PROTOCOL_BUDGET[0]
    iterations: int = PROTOCOL_BUDGET[1]
    label: str = ""  # the results pages' short name ("(a) control, 20 labels"); empty: the row's name

    @property
    def title(self) -> str:
        """The short name with what is not the protocol's: "(a) control, 20 labels (initial lr 0.023)"."""
        extra = notes(self.settings, self.epochs, self.iterations)
        return f"{self.label or self.name}" + (f" ({', '.join(extra)})" if extra else "")


def notes(settings: dict, epochs: int, iterations: int) -> list[str]:
    """A run's budget and settings where they are not the protocol's, in words: ["30 x 100", "initial lr 0.023"]."""
    out = [f"{epochs} x {iterations}"] if (epochs, iterations) != PROTOCOL_BUDGET else []
    for key, value in settings.items():
        out.append(f"initial lr {value:g}" if key == "initial_lr" else f"{key} = {value:g}"
                   if isinstance(value, (int, float)) else f"{key} = {value}")
    return out


_LOGIT = "nnUNetTrainerLogitKD"
_A, _C = "(a) control, 20 labels", "(c) pseudo-labels alone, 20 labels + 146 teacher-labelled"
ROWS = {r.name: r for r in [
    Row("a", "HippoK20", "nnUNetTrainerStudent", "control (`nnUNetTrainerStudent`), 20 labelled cases (Dataset104)",
        label=_A),
    Row("a_lr0.023", "HippoK20", "nnUNetTrainerStudent", "control, 20 labelled cases (Dataset104)",
        settings={"initial_lr": 0.023}, label=_A),
    Row("a_k5", "HippoK5", "nnUNetTrainerStudent", "control (`nnUNetTrainerStudent`), 5 labelled cases (Dataset605)",
        k=5, held_out="HippoK5", label="(a) control, 5 labels"),
    Row("b", "HippoK20", "nnUNetTrainerReCoKD", "`nnUNetTrainerReCoKD`, the 20 labelled cases only (Dataset104)",
        teacher="shared"),
    Row("b_logitkd", "HippoK20", _LOGIT, "`nnUNetTrainerLogitKD` (Hinton, T = 2), the 20 labelled cases only",
        teacher="shared"),
    Row("b_logitkd+logit_temperature=1", "HippoK20", _LOGIT, "Hinton logit KD at T = 1, the 20 labelled cases only",
        teacher="shared", settings={"logit_temperature": 1.0}),
    Row("b_logitkd+logit_weight=0.25", "HippoK20", _LOGIT, "Hinton logit KD at weight 0.25, the 20 labelled cases",
        teacher="shared", settings={"logit_weight": 0.25}),
    Row("b_logitkd_oracle", "HippoK20", _LOGIT,
        "Hinton logit KD (T = 2) against an oracle: 17.5 * onehot(label) in place of the teacher's logits (17.5: the "
        "teacher's median background margin), the 20 labelled cases only", teacher="shared",
        settings={"logit_oracle_margin": 17.5}),
    Row("b_logitkd_cb", "HippoK20", "nnUNetTrainerLogitKD_CB",
        "class-balanced logit KD (`nnUNetTrainerLogitKD_CB`, T = 2), the 20 labelled cases only", teacher="shared"),
    Row("b_logitkd_cwd", "HippoK20", "nnUNetTrainerLogitKD_CWD",
        "channel-wise logit KD (`nnUNetTrainerLogitKD_CWD`, T = 1), the 20 labelled cases only", teacher="shared"),
    Row("c_student", "HippoK20Unlabeled", "nnUNetTrainerStudent",
        "control trainer on Dataset204: 20 labelled + 146 teacher-labelled (pseudo-labels alone)", label=_C),
    Row("c_student_lr0.023", "HippoK20Unlabeled", "nnUNetTrainerStudent",
        "control trainer on Dataset204: 20 labelled + 146 teacher-labelled (pseudo-labels alone)",
        settings={"initial_lr": 0.023}, label=_C),
    Row("c_student_k5", "HippoK5Unlabeled", "nnUNetTrainerStudent",
        "control trainer on Dataset705: 5 labelled + 161 teacher-labelled (pseudo-labels alone)", k=5,
        held_out="HippoK5", label="(c) pseudo-labels alone, 5 labels + 161 teacher-labelled"),
    Row("c_recokd", "HippoK20Unlabeled", "nnUNetTrainerReCoKD",
        "`nnUNetTrainerReCoKD` on Dataset204 (pseudo-labels + MS-SARD/MS-CA with the teacher)",
        label="(c) ReCo-KD, 20 labels + 146 teacher-labelled"),
    Row("c_logitkd", "HippoK20Unlabeled", _LOGIT, "`nnUNetTrainerLogitKD` on Dataset204 (pseudo-labels + logit KD)"),
    Row("c_agree", "HippoK20UnlabeledAgree", "nnUNetTrainerStudent",
        "control trainer on Dataset214: Dataset204's teacher labels, ignored where its 8 mirrorings are not "
        "unanimous (`--min-agreement 1`)"),
    Row("d", "HippoAllUnlabeled", "nnUNetTrainerStudent",
        "zero labels: all 166 fold-0 training cases teacher-labelled (Dataset304, fold all)", k=0, fold="all"),
    Row("e", "Hippocampus", "nnUNetTrainerStudent", "control, all 166 labelled cases (Dataset004)", k=166),
    Row("u_a", "HippoK20Half", "nnUNetTrainerStudent",
        "control, 20 labelled cases (Dataset105; held out: 21 of fold 0's validation cases)", held_out="HippoK20Half"),
    Row("u_c", "HippoK20HalfUnlabeled", "nnUNetTrainerStudent",
        "control trainer on Dataset205: 20 labelled + 21 scans the teacher never saw, teacher-labelled",
        held_out="HippoK20Half"),
    Row("teacher_k20", "HippoK20", "nnUNetTrainerTeacher",
        "full-width nnU-Net teacher (`nnUNetTrainerTeacher`) trained on the 20 labelled cases only (Dataset104)",
        label="full-width teacher, 20 labels"),
    Row("s_student", "HippoK20SelfTaught", "nnUNetTrainerStudent",
        "control trainer on Dataset224: 20 labelled + 146 labelled by teacher_k20 (self-training: no label beyond "
        "the 20)", label="(s) self-training, pseudo-labels alone"),
    Row("s_recokd", "HippoK20SelfTaught", "nnUNetTrainerReCoKD",
        "`nnUNetTrainerReCoKD` on Dataset224 with teacher_k20 as the teacher (self-training + MS-SARD/MS-CA)",
        teacher="teacher_k20", label="(s) self-training + ReCo-KD"),
    Row("s_logitkd_cwd", "HippoK20SelfTaught", "nnUNetTrainerLogitKD_CWD",
        "`nnUNetTrainerLogitKD_CWD` on Dataset224 with teacher_k20 as the teacher (self-training + channel-wise "
        "logit KD)", teacher="teacher_k20", label="(s) self-training + CWD"),
    Row("u_recokd", "HippoK20HalfUnlabeled", "nnUNetTrainerReCoKD",
        "`nnUNetTrainerReCoKD` on Dataset205 (20 labelled + 21 scans the teacher never saw, teacher-labelled) with the "
        "shared teacher", held_out="HippoK20Half", teacher="shared"),
    Row("w8_a", "HippoK20", "nnUNetTrainerStudent_w8", "control, width 1/8, 20 labelled cases (Dataset104)"),
    Row("w8_c", "HippoK20Unlabeled", "nnUNetTrainerStudent_w8",
        "control trainer, width 1/8, on Dataset204 (pseudo-labels alone)"),
    Row("w8_a_30x100", "HippoK20", "nnUNetTrainerStudent_w8", "control, width 1/8, 20 labelled cases", epochs=30),
    Row("w8_c_30x100", "HippoK20Unlabeled", "nnUNetTrainerStudent_w8",
        "control trainer, width 1/8, on Dataset204 (pseudo-labels alone)", epochs=30),
]}


@dataclasses.dataclass
class Paths:
    work: Path
    shared: Path

    @property
    def raw(self) -> Path:
        return self.work / "raw"

    @property
    def preprocessed(self) -> Path:
        return self.work / "preprocessed"

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    @property
    def scores(self) -> Path:
        return self.work / "scores"

    @property
    def source(self) -> Path:
        return self.shared / SOURCE

    def teacher(self, teacher: Optional[str]) -> Optional[Path]:
        """The model folder of a teacher: the shared one, or a row's (its seed-0 model: one teacher serves every
        student seed)."""
        if teacher is None:
            return None
        if teacher == "shared":
            return self.shared / SHARED_TEACHER
        return model_folder(self, ROWS[teacher], TEACHER_SEED)


def model_folder(paths: Paths, row: Row, seed: int) -> Path:
    return (paths.work / f"results_{row.name}" / f"s{seed}" / DATASETS[row.dataset].folder_name
            / f"{row.trainer}__nnUNetPlans__3d_fullres")


def run(command: list[str], log: Path, env: Optional[dict] = None) -> None:
    """Run a command with its output appended to `log`; raise RuntimeError naming the log when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if code != 0:
        raise RuntimeError(f"{' '.join(command[:2])} exited with {code} (log: {log})")


# ------------------------------------------------------------------------------------------------------- datasets
def prepare(paths: Paths, name: str, device: str) -> Dataset:
    """Make a dataset (and the datasets it is built from) unless already made."""
    d = DATASETS[name]
    done = paths.preprocessed / d.folder_name / ".recokd_3d_fullres_done"
    if done.exists():
        return d
    paths.logs.mkdir(parents=True, exist_ok=True)
    if d.kind == "labelled":
        run([sys.executable, str(HERE / "few_labels.py"), str(paths.source), str(paths.raw), str(paths.preprocessed),
             d.folder_name, str(unlabeled_folder(paths, d)), "--k", str(d.k), "--seed", "0", "--unlabeled-cases",
             d.unlabeled], paths.logs / f"few_labels_{d.id}.log")
        out = paths.preprocessed / d.folder_name
        plans = json.loads((paths.shared / SHARED_TEACHER / "plans.json").read_text())  # the teacher's plans
        (out / "nnUNetPlans.json").write_text(json.dumps({**plans, "dataset_name": d.folder_name}, indent=1))
        shutil.copy(paths.raw / d.folder_name / "dataset.json", out / "dataset.json")
        run(["nnUNetv2_extract_fingerprint", "-d", str(d.id), "-np", "1"], paths.logs / f"fingerprint_{d.id}.log",
            nnunet_env(paths))
        run(["nnUNetv2_preprocess", "-d", str(d.id), "-c", "3d_fullres", "-np", "2"],
            paths.logs / f"preprocess_{d.id}.log", nnunet_env(paths))
    elif d.kind in ("derived", "all-unlabeled"):
        labelled = prepare(paths, d.labelled, device) if d.labelled else None
        images = unlabeled_folder(paths, labelled) if labelled else all_unlabeled_images(paths)
        teacher = paths.teacher(d.teacher)
        if not (teacher / "fold_0" / "checkpoint_final.pth").exists() and d.teacher != "shared":
            raise RuntimeError(f"dataset {d.folder_name} is labelled by row {d.teacher}'s model, which is not "
                               f"trained: python {Path(__file__).name} --rows {d.teacher}")
        command = ["nnunetv2_recokd", "add-unlabeled", "-i", str(images), "-t", str(teacher), "--id", str(d.id),
                   "--name", d.name, "-device", device, "-np", "2", "--threads", "2", *d.flags]
        if labelled:
            command += ["-d", str(labelled.id)]
        if not (paths.preprocessed / d.folder_name / "splits_final.json").exists():
            run(command, paths.logs / f"add_unlabeled_{d.id}.log", nnunet_env(paths))
    elif d.kind == "full":
        link = paths.raw / d.folder_name
        if not link.exists():
            paths.raw.mkdir(parents=True, exist_ok=True)
            link.symlink_to(paths.source)
        run(["nnUNetv2_plan_and_preprocess", "-d", str(d.id), "-c", "3d_fullres", "-np", "2"],
            paths.logs / f"plan_{d.id:03d}.log", nnunet_env(paths))
    else:
        raise ValueError(f"dataset {name}: unknown kind {d.kind!r}")
    done.parent.mkdir(parents=True, exist_ok=True)
    done.touch()
    return d


def unlabeled_folder(paths: Paths, d: Dataset) -> Path:
    """The unlabeled images that come with a labelled dataset (the shell script's folder names, kept: a work folder
    it made is reused)."""
    return paths.work / ("unlabeled_valhalf" if d.unlabeled == "val-half" else f"unlabeled_k{d.k}")


def all_unlabeled_images(paths: Paths) -> Path:
    """Links to every fold-0 training image (nnU-Net's own fold-0 split of Dataset004)."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    out = paths.work / "unlabeled_all"
    out.mkdir(parents=True, exist_ok=True)
    cases = sorted(f.name[:-7] for f in (paths.source / "labelsTr").iterdir() if f.name.endswith(".nii.gz"))
    for case in generate_crossval_split(cases, seed=12345, n_splits=5)[0]["train"]:
        target = out / f"{case}_0000.nii.gz"
        if not target.exists():
            target.symlink_to(paths.source / "imagesTr" / f"{case}_0000.nii.gz")
    return out


def held_out_images(paths: Paths, name: str) -> Path:
    """A folder of links to the fold-0 validation images of a labelled dataset."""
    d = DATASETS[name]
    out = paths.work / f"heldout_{d.folder_name}"
    if not out.is_dir():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for case in json.loads((paths.preprocessed / d.folder_name / "splits_final.json").read_text())[0]["val"]:
            (tmp / f"{case}_0000.nii.gz").symlink_to(paths.source / "imagesTr" / f"{case}_0000.nii.gz")
        tmp.rename(out)
    return out


def nnunet_env(paths: Paths) -> dict:
    return {"nnUNet_raw": str(paths.raw), "nnUNet_preprocessed": str(paths.preprocessed),
            "nnUNet_results": str(paths.work / "results"), "nnUNet_def_n_proc": "1", "nnUNet_compile": "f",
            "nnUNet_npp": "0", "nnUNet_nps": "0"}


# ----------------------------------------------------------------------------------------------------------- rows
def row_config(paths: Paths, row: Row, seed: int, threads: Optional[int]) -> dict:
    """The RECOKD_CONFIG of one run: the budget, a checkpoint every epoch (a killed run resumes), the seed, the
    row's settings, its teacher and the CPU threads."""
    config = {"num_epochs": row.epochs, "num_iterations_per_epoch": row.iterations,
              "num_val_iterations_per_epoch": 5, "save_every": 1, "seed": seed, **row.settings}
    if threads:
        config["cpu_threads"] = threads
    teacher = paths.teacher(row.teacher)
    if teacher is not None:
        config["teacher"] = str(teacher)
    dataset = DATASETS[row.dataset]
    if "shared" in (row.teacher, dataset.teacher if dataset.kind in ("derived", "all-unlabeled") else None):
        # the leakage checks read the teacher's own split; Dataset004 is not preprocessed in WORK (row e aside)
        config["teacher_splits"] = str(paths.work / SHARED_SPLITS)
    return config


SHARED_SPLITS = "splits_Dataset004_Hippocampus.json"


def write_shared_teacher_splits(paths: Paths) -> Path:
    """The shared teacher's own split (nnU-Net's 5-fold split of Dataset004, generate_crossval_split over the sorted
    case identifiers, seed 12345: what nnU-Net draws without a splits_final.json; the teacher is its fold 0)."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    out = paths.work / SHARED_SPLITS
    if not out.is_file():
        cases = sorted(f.name[:-7] for f in (paths.source / "labelsTr").iterdir() if f.name.endswith(".nii.gz"))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(generate_crossval_split(cases, seed=12345, n_splits=5), indent=1))
    return out


def train_and_score(paths: Paths, row: Row, seed: int, device: str, threads: Optional[int]) -> dict:
    """Train (or resume) one row's model, predict and evaluate the held-out cases, write and return its score."""
    dataset = DATASETS[row.dataset]
    model = model_folder(paths, row, seed)
    final = model / f"fold_{row.fold}" / "checkpoint_final.pth"
    log = paths.logs / f"{row.name}_s{seed}.log"
    env = nnunet_env(paths)
    if not final.exists():
        config = paths.work / f"config_{row.name}_s{seed}.json"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(json.dumps(row_config(paths, row, seed, threads)) + "\n")
        resume = ["--c"] if (model / f"fold_{row.fold}" / "checkpoint_latest.pth").exists() else []
        print(f"== {row.name} seed {seed}: train {row.trainer} on {dataset.folder_name} fold {row.fold} "
              f"({row.epochs} x {row.iterations}, {device}){', resumed' if resume else ''}", flush=True)
        train_env = {**env, "nnUNet_results": str(paths.work / f"results_{row.name}" / f"s{seed}"),
                     "RECOKD_CONFIG": str(config)}
        if device == "cpu":
            train_env["nnUNet_n_proc_DA"] = "0"
            if threads:
                train_env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        run(["nnUNetv2_train", str(dataset.id), "3d_fullres", row.fold, "-tr", row.trainer, "-device", device,
             *resume], log, train_env)
        if not final.exists():
            raise RuntimeError(f"training ended without {final} (log: {log})")
    pred = paths.work / f"pred_{row.name}_s{seed}"
    summary = pred / "summary.json"
    if summary.exists() and summary.stat().st_mtime < final.stat().st_mtime:
        print(f"== {row.name} seed {seed}: the model was retrained after it was scored; scoring it again", flush=True)
        shutil.rmtree(pred)
    if not summary.exists():
        run(["nnUNetv2_predict_from_modelfolder", "-i", str(held_out_images(paths, row.held_out)), "-o", str(pred),
             "-m", str(model), "-f", row.fold, "-device", device, "-npp", "1", "-nps", "1"],
            paths.logs / f"predict_{row.name}_s{seed}.log", env)
        run(["nnUNetv2_evaluate_folder", str(paths.source / "labelsTr"), str(pred), "--chill", "-djfile",
             str(model / "dataset.json"), "-pfile", str(model / "plans.json")],
            paths.logs / f"evaluate_{row.name}_s{seed}.log", env)
    record = score_record(paths, row, seed, json.loads(summary.read_text()), final)
    paths.scores.mkdir(parents=True, exist_ok=True)
    (paths.scores / f"{row.name}_s{seed}.json").write_text(json.dumps(record) + "\n")
    print(f"== {row.name} seed {seed}: {record['dice_mean']:.4f}", flush=True)
    return record


def score_record(paths: Paths, row: Row, seed: int, summary: dict, checkpoint: Optional[Path]) -> dict:
    """A run's score: the row's fields, nnU-Net's Dice on the held-out cases, and the settings the trainer ran with
    (read back from its checkpoint; paths under SHARED written relative to it, as committed)."""
    resolved = None
    if checkpoint is not None:
        import torch

        resolved = (torch.load(checkpoint, map_location="cpu", weights_only=False).get("recokd") or {}).get("settings")
    cases_file = checkpoint.parent / "recokd_training_cases.json" if checkpoint is not None else None
    cases = json.loads(cases_file.read_text()) if cases_file is not None and cases_file.exists() else None
    record = {"row": row.name, "seed": seed, "trainer": row.trainer, "dataset": DATASETS[row.dataset].folder_name,
              "fold": row.fold, "k": row.k, "teacher": row.teacher, "row_settings": row.settings,
              "epochs": row.epochs, "iterations": row.iterations,
              "initial_lr": float(resolved["initial_lr"]) if resolved else row.settings.get("initial_lr", 0.01),
              "dice_mean": summary["foreground_mean"]["Dice"],
              "dice_per_class": {k: v["Dice"] for k, v in summary["mean"].items()},
              "held_out_cases": len(summary["metric_per_case"]), "training_cases": cases, "settings": resolved}
    return json.loads(json.dumps(record).replace(str(paths.shared.resolve()) + "/", "../shared/")
                      .replace(str(paths.shared) + "/", "../shared/"))


def write_table(paths: Paths) -> str:
    """WORK/table.json and table.md: one line per row and seed."""
    records = [json.loads(p.read_text()) for p in sorted(paths.scores.glob("*_s*.json")) if p.stat().st_size]
    (paths.work / "table.json").write_text(json.dumps(records, indent=1))
    lines = ["| row | seed | trainer | dataset | fold | held-out cases | mean Dice | Dice per class |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        per = ", ".join(f"{k}: {v:.4f}" for k, v in r["dice_per_class"].items())
        lines.append(f"| {r['row']} | {r['seed']} | {r['trainer']} | {r['dataset']} | {r['fold']} | "
                     f"{r['held_out_cases']} | {r['dice_mean']:.4f} | {per} |")
    text = "\n".join(lines) + "\n"
    (paths.work / "table.md").write_text(text)
    return text


def teacher_rows(rows: list[Row]) -> list[Row]:
    """The rows whose model teaches `rows` (as their teacher, or as the labeller of their dataset), teachers of
    teachers first."""
    needed: list[Row] = []

    def visit(name: Optional[str]) -> None:
        if name is None or name == "shared" or ROWS[name] in needed:
            return
        teacher = ROWS[name]
        visit(teacher.teacher)
        visit(DATASETS[teacher.dataset].teacher if DATASETS[teacher.dataset].kind == "derived" else None)
        needed.append(teacher)

    for row in rows:
        visit(row.teacher)
        dataset = DATASETS[row.dataset]
        visit(dataset.teacher if dataset.kind == "derived" else None)
    return needed


def plan(paths: Paths, rows: list[Row], seeds: list[int], threads: Optional[int]) -> str:
    """What would run: each row's dataset, trainer, budget and config (nothing is written)."""
    out = [f"first {t.name} seed {TEACHER_SEED} (it teaches these rows or labels their dataset)"
           for t in teacher_rows(rows)]
    for row in rows:
        for seed in seeds:
            out.append(f"{row.name} seed {seed}: {row.trainer} on {DATASETS[row.dataset].folder_name} fold {row.fold} "
                       f"(k = {row.k}), held out: {DATASETS[row.held_out].folder_name}'s validation cases; config "
                       f"{json.dumps(row_config(paths, row, seed, threads))}")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=[], help="row names (--list shows them)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--work", type=Path, default=Path("hippocampus_unlabeled"))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--parallel", action="store_true",
                        help="the rows of a seed train side by side (one CPU thread each unless --threads)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per training on the CPU (the cpu_threads setting; default: 1 with "
                             "--parallel, else nnU-Net's choice, every core)")
    parser.add_argument("--list", action="store_true", help="print the rows and datasets, run nothing")
    parser.add_argument("--plan", action="store_true", help="print what would run, run nothing")
    args = parser.parse_args(argv)
    shared = Path(os.environ.get("SHARED", REPOSITORY.parent / "shared")).resolve()
    paths = Paths(args.work.resolve(), shared)
    if args.list:
        for row in ROWS.values():
            print(f"{row.name:32s} {row.trainer:28s} {row.dataset:24s} {row.description}")
        return 0
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown or not args.rows:
        parser.error(f"unknown rows {unknown}; valid rows: {', '.join(ROWS)}" if unknown else "name --rows")
    rows = [ROWS[r] for r in args.rows]
    threads = args.threads if args.threads is not None else (1 if args.parallel and args.device == "cpu" else None)
    if args.plan:
        print(plan(paths, rows, args.seeds, threads))
        return 0
    failed = []
    write_shared_teacher_splits(paths)
    for teacher in teacher_rows(rows):  # a row that teaches the others is trained (and scored) first
        try:
            train_and_score(paths, teacher, TEACHER_SEED, args.device, args.threads)
        except RuntimeError as e:
            print(f"FAILED row {teacher.name} seed {TEACHER_SEED}, the teacher of other rows: {e}", file=sys.stderr)
            return 1
    for name in dict.fromkeys([r.dataset for r in rows] + [r.held_out for r in rows]):
        prepare(paths, name, args.device)  # before any row runs: rows side by side share them
    for row in rows:
        held_out_images(paths, row.held_out)
    for seed in args.seeds:
        workers = len(rows) if args.parallel else 1
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            futures = {pool.submit(train_and_score, paths, row, seed, args.device, threads): row for row in rows}
            for future in concurrent.futures.as_completed(futures):
                if future.exception() is not None:
                    row = futures[future]
                    failed.append(f"{row.name} seed {seed}: {future.exception()}")
                    print(f"== FAILED {failed[-1]}", file=sys.stderr, flush=True)
    if paths.scores.exists():
        print(write_table(paths), end="")
    if failed:
        print("FAILED rows:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
