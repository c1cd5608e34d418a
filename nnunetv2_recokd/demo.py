"""`nnunetv2_recokd demo`: the whole protocol with nnU-Net's own commands, on data that needs no download.

Default story (synthetic data, --few-labels 2 --unlabeled 12): can a teacher make up for missing labels?
1. a synthetic dataset (the varied set: organ with small lesions, each case its own contrast; 10 labelled training
   cases, 4 held-out test cases)
2. nnUNetv2_plan_and_preprocess
3. nnUNetv2_train: the teacher (full width, fold 0 of the labelled cases), into a results folder of the demo's own
   (the user's nnUNet_results is never touched unless --results points there)
4. Dataset991 = K of the labelled cases; `nnunetv2_recokd add-unlabeled`: the teacher labels M new scans into
   Dataset992 = those K + the M teacher-labelled scans
5. per seed (seeded: the same command gives the same table): the plain student on Dataset991 (the control), the same
   control trainer on Dataset992 (pseudo-labels alone) and the ReCo-KD student on Dataset992, fold "all"
6. nnUNetv2_predict on the held-out cases and nnUNetv2_evaluate_folder
7. a table (Markdown and JSON) of per-class Dice (mean and spread over the seeds), parameters, GFLOPs per patch,
   inference latency and seconds per case (stock nnU-Net; `nnunetv2_recokd predict` on OpenVINO), and a figure
--few-labels 0 (and --dataset ID, an existing nnU-Net dataset): the earlier story on the easy set, the teacher, the
plain student control and the ReCo-KD student all on the labelled cases (fold 0; --dataset: scored on
imagesTs/labelsTs when the dataset has them, else nnU-Net's fold validation).
--ensemble N (off by default): the teacher's folds 1..N-1 (same schedule), ONE student distilled from the fold
ensemble (nnUNetTrainerLogitKD_ensemble, on the labelled cases) and an extra table on the held-out cases: the fold
ensemble with TTA (nnU-Net's default inference), one teacher fold with TTA, and the student (TTA off and on; also
through `nnunetv2_recokd predict --runtime openvino`): Dice per class, seconds per case
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

from nnunetv2_recokd.evaluation.figures import demo_figure
from nnunetv2_recokd.evaluation.networks import load_checkpoint, training_record
from nnunetv2_recokd.evaluation.rows import inference_row, model_row
from nnunetv2_recokd.evaluation.summary import read_dice, summary_mean_dice, validation_summary
from nnunetv2_recokd.evaluation.tables import ensemble_table, models_table
from nnunetv2_recokd.evaluation.timing import Stopwatch, seconds_per_case
from nnunetv2_recokd.nnunet_commands import nnunet_command, run_logged
from nnunetv2_recokd.synthetic import write_dataset, write_unlabeled_images

SYNTHETIC_ID = 990
PLANS_DONE = ".recokd_demo_preprocessed"  # marks a dataset the demo preprocessed (beside, not inside, its data)
SYNTHETIC_SET = "synthetic_set.json"  # in OUT/nnunet: which synthetic set Dataset990 holds (story, size, cases)
TEACHER = "nnUNetTrainerTeacher"
MODELS = (("teacher", TEACHER), ("student", "nnUNetTrainerStudent"), ("ReCo-KD student", "nnUNetTrainerReCoKD"))
# the demo's distillation settings on top of the trainers' defaults (the control ignores them); see README
DEMO_RUNTIME = "openvino"  # the CPU runtime of `nnunetv2_recokd predict` timed beside stock nnUNetv2_predict
# --ensemble: logit KD against the mean of the fold teachers' softened probabilities, i.e. the student is trained
# towards what the fold ensemble predicts (the inference it replaces), from the first step (no warm-up)
ENSEMBLE_STUDENT = "nnUNetTrainerLogitKD_ensemble"
# --few-labels K: the teacher (fold 0 of all labelled cases) labels M new scans; students train on K labelled cases
# (Dataset991) or on those K + the M teacher-labelled scans (Dataset992, made by `add-unlabeled`), fold "all"
FEW_LABEL_ID, DERIVED_ID = 991, 992
FEW_LABEL_STUDENTS = (("student, {k} labels", "nnUNetTrainerStudent", "few"),
                      ("student, {k} labels + {m} teacher-labelled", "nnUNetTrainerStudent", "derived"),
                      ("ReCo-KD student, {k} labels + {m} teacher-labelled", "nnUNetTrainerReCoKD", "derived"))
MAX_FOLDS = 5  # nnU-Net's 5-fold split
# The default story (synthetic data): K = 2 labelled cases, M = 12 new scans the teacher labels, on the varied set of
# 32^3 cases (a 32^3 patch costs a third of a 48^3 one, so the teacher gets the 160 iterations the harder set needs
# and the whole run stays under 10 minutes on 2 CPU cores). --few-labels 0 (or --dataset): the easy 48^3 set, every
# model on all labels, the shorter schedules. Tuned on 2 CPU cores (docs/usage.md#the-demo): with 4 x 20 / 5 x 20
# student iterations neither student learned the lesion at all; 20 x 20 separates them.
FEW_LABELS, UNLABELED = 2, 12
SIZE = {True: 32, False: 48}  # keyed by "the few-label story"
TEACHER_EPOCHS = {True: 8, False: 3}
STUDENT_EPOCHS = {True: 20, False: 4}


def runtime_available(runtime: str) -> bool:
    """True when the optional deploy extra provides this runtime (the demo then also times it)."""
    from nnunetv2_recokd.deploy.modelfolder import DeployError
    from nnunetv2_recokd.deploy.runtime import require_runtime

    try:
        require_runtime(runtime)
    except DeployError:
        return False
    return True


DEMO_DISTILLATION: dict = {"log_term_gradients": True}


class Progress:
    def __init__(self, total_steps: int):
        self.start, self.total, self.done = time.time(), total_steps, 0

    def step(self, what: str) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total} | {time.time() - self.start:6.0f} s] {what}", flush=True)


def student_settings(epochs: int, iterations: int, seed: int, teacher_folder: Path,
                     warmup: Optional[float] = None) -> dict:
    """RECOKD_CONFIG of the demo's students: the short schedule, the seed, the teacher the demo trained and,
    when given, the warm-up fraction of the distillation terms (else the trainers' defaults)."""
    values = {"num_epochs": epochs, "num_iterations_per_epoch": iterations, "num_val_iterations_per_epoch": 2,
              "save_every": max(1, epochs), "seed": seed, "teacher": str(teacher_folder), **DEMO_DISTILLATION}
    if warmup is not None:
        values.update(reco_warmup=warmup, graph_warmup=warmup)
    return values


def story_defaults(dataset: Optional[str], few_labels: Optional[int], teacher_epochs: Optional[int],
                   student_epochs: Optional[int]) -> tuple[int, int, int]:
    """(K, teacher epochs, student epochs) with None replaced: K = FEW_LABELS on synthetic data and 0 with --dataset;
    the epochs of that story (TEACHER_EPOCHS / STUDENT_EPOCHS)."""
    if few_labels is None:
        few_labels = FEW_LABELS if dataset is None else 0
    story = bool(few_labels)
    return (few_labels, TEACHER_EPOCHS[story] if teacher_epochs is None else teacher_epochs,
            STUDENT_EPOCHS[story] if student_epochs is None else student_epochs)


def run(out: str, device: str, dataset: Optional[str], teacher_epochs: Optional[int],
         student_epochs: Optional[int], iterations: int, num_train: int, num_test: int, seed: int = 0, seeds: int = 1,
         results: Optional[str] = None, warmup: Optional[float] = None, ensemble: int = 0,
         few_labels: Optional[int] = None, unlabeled: int = UNLABELED) -> int:
    """The demo (module docstring); None takes the story's default (story_defaults)."""
    few_labels, teacher_epochs, student_epochs = story_defaults(dataset, few_labels, teacher_epochs, student_epochs)
    if seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    if few_labels and dataset is not None:
        raise SystemExit("--few-labels is a story on the synthetic data; with --dataset use add-unlabeled on your own "
                         "scans (docs/unlabeled.md)")
    if few_labels and not 2 <= few_labels < num_train:
        raise SystemExit(f"--few-labels takes 0 (off) or 2..{num_train - 1} (fewer than --num-train), got {few_labels}")
    if few_labels and unlabeled < 1:
        raise SystemExit("--few-labels needs --unlabeled scans (at least 1)")
    if ensemble and not 2 <= ensemble <= MAX_FOLDS:
        raise SystemExit(f"--ensemble takes 0 (off) or a number of fold teachers from 2 to {MAX_FOLDS} (nnU-Net's "
                         f"{MAX_FOLDS}-fold split), got {ensemble}")
    students = [m for m in MODELS if m[1] != TEACHER]
    if few_labels:
        students = [(label.format(k=few_labels, m=unlabeled), trainer, which)
                    for label, trainer, which in FEW_LABEL_STUDENTS]
    else:
        students = [(label, trainer, "labelled") for label, trainer in students]
    # data, planning, teacher training and evaluation, (few labels: the k-label and the derived dataset,) then per
    # seed one training and one evaluation per student
    progress = Progress(4 + (2 if few_labels else 0) + 2 * len(students) * seeds + ensemble_steps(ensemble))
    setup = prepare(out, device, dataset, num_train, num_test, results, progress, varied=bool(few_labels))
    if ensemble and not setup.evaluation.held_out:
        raise SystemExit(f"--ensemble needs held-out cases: {setup.folder} has no imagesTs and labelsTs (the fold "
                         f"validation of a student distilled from every fold is optimistic)")
    out_dir, env, train_env, logs = setup.out_dir, setup.env, setup.train_env, setup.logs
    results_root, dataset_id, name, evaluation = setup.results_root, setup.dataset_id, setup.name, setup.evaluation

    teacher_cfg = out_dir / "config_teacher.json"
    teacher_cfg.write_text(json.dumps({"num_epochs": teacher_epochs, "num_iterations_per_epoch": iterations,
                                       "num_val_iterations_per_epoch": 2, "save_every": max(1, teacher_epochs),
                                       "seed": seed}))
    run_logged(["nnUNetv2_train", dataset_id, "3d_fullres", "0", "-tr", TEACHER, "-device", device],
               {**train_env, "RECOKD_CONFIG": str(teacher_cfg)}, logs / f"train_{TEACHER}.log", label="teacher")
    teacher_folder = setup.teacher_folder
    progress.step(f"trained the teacher ({TEACHER}, {teacher_epochs} x {iterations} iterations, seed {seed})")
    runs = {TEACHER: [evaluation.run(TEACHER, teacher_folder, env, seed)]}
    progress.step(f"evaluated the teacher on {runs[TEACHER][0]['evaluated_on']}")

    datasets = {"labelled": (dataset_id, name, "0")}  # where each student trains: id, name, fold
    if few_labels:
        datasets.update(few_label_datasets(setup, progress, few_labels, unlabeled))

    for k in range(seeds):
        student_seed = seed + k
        seed_env = {**env, "nnUNet_results": str(results_root / f"students_seed{student_seed}")}
        for label, trainer, which in students:
            data_id, data_name, fold = datasets[which]
            tag = f"{trainer}_{which}" if few_labels else trainer
            cfg = out_dir / f"config_{tag}_seed{student_seed}.json"
            values = student_settings(student_epochs, iterations, student_seed, teacher_folder, warmup)
            if fold == "all":  # every case trains, none validates: the held-out test cases are the measure; the
                values.update(allow_leaky_teacher=True, teacher_folds=[0])  # teacher is the demo's fold 0
            cfg.write_text(json.dumps(values))
            run_logged(["nnUNetv2_train", data_id, "3d_fullres", fold, "-tr", trainer, "-device", device],
                       {**train_env, **seed_env, "RECOKD_CONFIG": str(cfg)},
                       logs / f"train_{tag}_seed{student_seed}.log", label=f"{label}, seed {student_seed}")
            progress.step(f"trained {label} ({trainer}, {student_epochs} x {iterations} iterations, "
                          f"seed {student_seed})")
            model_folder = Path(seed_env["nnUNet_results"]) / data_name / f"{trainer}__nnUNetPlans__3d_fullres"
            runs.setdefault(label, []).append(evaluation.run(tag, model_folder, seed_env, student_seed, fold,
                                                             data_id))
            progress.step(f"evaluated {label} (seed {student_seed})")

    runs["teacher"] = runs.pop(TEACHER)
    rows = [model_row(label, trainer, runs[label], device)
            for label, trainer in [("teacher", TEACHER), *[(label, trainer) for label, trainer, _ in students]]]
    story = (ensemble_story(setup, progress, ensemble, seed, student_epochs, iterations, warmup)
             if ensemble else None)
    write_outputs(rows, out_dir, time.time() - progress.start, story)
    return 0


@dataclasses.dataclass
class Setup:
    """What the steps after planning share: folders, nnU-Net's environments, the dataset, the evaluation."""

    out_dir: Path
    device: str
    env: dict  # nnUNetv2_predict / evaluate
    train_env: dict  # nnUNetv2_train (in-process augmentation on the CPU: seeded runs repeat)
    results_root: Path
    logs: Path
    dataset_id: str
    folder: Path  # the raw dataset
    pre: Path  # its preprocessed folder
    evaluation: "Evaluation"

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def teacher_folder(self) -> Path:
        return self.results_root / self.name / f"{TEACHER}__nnUNetPlans__3d_fullres"


def prepare(out: str, device: str, dataset: Optional[str], num_train: int, num_test: int, results: Optional[str],
            progress: Progress, varied: bool = False) -> Setup:
    """Environment, data (synthetic, or --dataset) and nnU-Net's planning and preprocessing (skipped when the
    plans exist): the first two steps of the demo."""
    out_dir = Path(out).resolve()
    work = out_dir / "nnunet"
    env = dict(os.environ)
    if dataset is None:
        env.update(nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"))
    for key in ("nnUNet_raw", "nnUNet_preprocessed"):
        if not env.get(key):
            raise SystemExit(f"--dataset needs {key} set (the folders of your nnU-Net installation)")
    # never train into the user's own nnUNet_results unless told to: the demo's models are short-schedule ones
    results_root = Path(results).resolve() if results else work / "results"
    env["nnUNet_results"] = str(results_root)
    env.update(nnUNet_compile=env.get("nnUNet_compile", "f" if device == "cpu" else "t"), PYTHONUNBUFFERED="1")
    if device == "cpu":
        env.update(nnUNet_def_n_proc=env.get("nnUNet_def_n_proc", "1"), nnUNet_npp="0", nnUNet_nps="0")
    env.pop("RECOKD_TEACHER", None)
    env.pop("RECOKD_CONFIG", None)
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"models are trained into {results_root}" + (" (your nnUNet_results is not touched)"
                                                       if dataset is not None and not results else ""), flush=True)

    if dataset is None:
        dataset_id = str(SYNTHETIC_ID)
        synthetic_set = {"varied": varied, "size": SIZE[varied], "num_train": num_train, "num_test": num_test}
        drop_stale_synthetic(work, synthetic_set)
        folder = write_dataset(work / "raw", SYNTHETIC_ID, num_train=num_train, num_test=num_test,
                               size=SIZE[varied], lesion_radius=0.15, seed=0, varied=varied)
        (work / SYNTHETIC_SET).write_text(json.dumps(synthetic_set))
        progress.step(f"synthetic dataset written: {folder} ({num_train} training, {num_test} held-out cases)")
    else:
        dataset_id = dataset
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

        try:
            folder = Path(env["nnUNet_raw"]) / maybe_convert_to_dataset_name(dataset)
        except RuntimeError as e:
            raise SystemExit(f"dataset {dataset} not found: {e}") from None
        progress.step(f"using dataset {folder}")
    pre = Path(env["nnUNet_preprocessed"]) / folder.name
    if not (pre / "nnUNetPlans.json").is_file():
        run_logged(["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", "3d_fullres", "-np", "1"], env,
                   logs / "plan.log")
    progress.step(f"planned and preprocessed ({pre})")

    train_env = {**env, "nnUNet_n_proc_DA": env.get("nnUNet_n_proc_DA", "0" if device == "cpu" else "")}
    if not train_env["nnUNet_n_proc_DA"]:
        train_env.pop("nnUNet_n_proc_DA")
    evaluation = Evaluation(folder, pre, dataset_id, device, env, logs, out_dir)
    return Setup(out_dir, device, env, train_env, results_root, logs, dataset_id, folder, pre, evaluation)


def drop_stale_synthetic(work: Path, wanted: dict) -> None:
    """An output folder reused with another synthetic set (the other story, other --num-train/--num-test): remove
    the old set's raw and preprocessed folders, so planning runs again instead of reusing plans and data of other
    cases (the models are retrained by every run anyway)."""
    marker = work / SYNTHETIC_SET
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return
    for root in ("raw", "preprocessed"):
        for data_id in (SYNTHETIC_ID, FEW_LABEL_ID, DERIVED_ID):  # and the few-label datasets made from it
            for folder in (work / root).glob(f"Dataset{data_id}_*"):
                shutil.rmtree(folder)
    marker.unlink(missing_ok=True)


def few_label_datasets(setup: Setup, progress: Progress, k: int, m: int) -> dict:
    """--few-labels K: Dataset991 = the first K labelled cases (links), preprocessed with the teacher's plans (no
    re-planning: the student and the teacher must see the same spacing, patch and normalisation); M new scans
    without labels; `nnunetv2_recokd add-unlabeled` with the teacher's fold 0 makes Dataset992 = the K cases + the
    M scans labelled by the teacher. Returns {"few": (id, name, fold), "derived": (...)}, fold "all" (K is too few
    for a validation split; the held-out test cases are the measure). Skipped where already done."""
    s = setup
    few = f"Dataset{FEW_LABEL_ID}_{s.name.split('_', 1)[1]}Few{k}"
    derived = f"Dataset{DERIVED_ID}_{s.name.split('_', 1)[1]}Few{k}Unlabeled{m}"
    raw, pre = Path(s.env["nnUNet_raw"]), Path(s.env["nnUNet_preprocessed"])
    for stale in raw.glob(f"Dataset{FEW_LABEL_ID}_*"), raw.glob(f"Dataset{DERIVED_ID}_*"):
        for folder in stale:  # another K or M from an earlier run in the same output folder
            if folder.name not in (few, derived):
                shutil.rmtree(folder)
                shutil.rmtree(pre / folder.name, ignore_errors=True)
    if not (pre / few / f"{PLANS_DONE}").is_file():
        cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (s.folder / "imagesTr").glob("*_0000.nii.gz"))[:k]
        for sub in ("imagesTr", "labelsTr"):
            shutil.rmtree(raw / few / sub, ignore_errors=True)
            (raw / few / sub).mkdir(parents=True)
        for case in cases:
            os.symlink(s.folder / "imagesTr" / f"{case}_0000.nii.gz", raw / few / "imagesTr" / f"{case}_0000.nii.gz")
            os.symlink(s.folder / "labelsTr" / f"{case}.nii.gz", raw / few / "labelsTr" / f"{case}.nii.gz")
        dataset_json = {**json.loads((s.folder / "dataset.json").read_text()), "numTraining": k}
        (raw / few / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
        (pre / few).mkdir(parents=True, exist_ok=True)
        plans = {**json.loads((s.pre / "nnUNetPlans.json").read_text()), "dataset_name": few}
        (pre / few / "nnUNetPlans.json").write_text(json.dumps(plans, indent=2))
        (pre / few / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
        # no fingerprint extraction (only planning reads it, nothing is planned here): the source dataset's, beside
        fingerprint = s.pre / "dataset_fingerprint.json"
        if fingerprint.is_file():
            shutil.copy(fingerprint, pre / few / "dataset_fingerprint.json")
        run_logged(["nnUNetv2_preprocess", "-d", str(FEW_LABEL_ID), "-c", "3d_fullres", "-np", "1"], s.env,
                   s.logs / "preprocess_few.log")
        (pre / few / PLANS_DONE).touch()
    progress.step(f"{few}: {k} of the labelled cases, preprocessed with the teacher's plans")
    if not (pre / derived / "splits_final.json").is_file():
        shutil.rmtree(s.out_dir / "nnunet" / "unlabeled", ignore_errors=True)  # no scans of an earlier, larger M
        scans = write_unlabeled_images(s.out_dir / "nnunet" / "unlabeled", m, size=SIZE[True], lesion_radius=0.15,
                                       seed=1, varied=True)
        run_logged(["nnunetv2_recokd", "add-unlabeled", "-i", str(scans), "-t", str(s.teacher_folder), "-f", "0",
                    "-d", str(FEW_LABEL_ID), "--id", str(DERIVED_ID), "--name", derived.split("_", 1)[1],
                    "-device", s.device, "-np", "1"], s.env, s.logs / "add_unlabeled.log", label="teacher labels")
    progress.step(f"{derived}: the {k} labelled cases + {m} new scans labelled by the teacher (add-unlabeled)")
    return {"few": (str(FEW_LABEL_ID), few, "all"), "derived": (str(DERIVED_ID), derived, "all")}


def ensemble_steps(n_folds: int) -> int:
    """Progress steps of --ensemble N: N-1 teacher folds, the student, four evaluations (0 when off)."""
    return n_folds + 4 if n_folds else 0


def ensemble_story(setup: Setup, progress: Progress, n_folds: int, seed: int, student_epochs: int, iterations: int,
                   warmup: Optional[float] = None) -> dict:
    """--ensemble N, after the usual steps (the teacher's fold 0 exists): train the teacher's folds 1..N-1 with the
    teacher's schedule and seed (config_teacher.json), distil all N folds into one student (fold 0, the students'
    schedule and first seed), then predict and score the held-out cases four ways: the fold ensemble with TTA
    (nnU-Net's default inference), teacher fold 0 with TTA, the student without and with TTA."""
    s = setup
    folds = list(range(n_folds))
    teacher_cfg = s.out_dir / "config_teacher.json"
    for k in folds[1:]:
        run_logged(["nnUNetv2_train", s.dataset_id, "3d_fullres", str(k), "-tr", TEACHER, "-device", s.device],
                   {**s.train_env, "RECOKD_CONFIG": str(teacher_cfg)}, s.logs / f"train_{TEACHER}_fold{k}.log")
        progress.step(f"trained teacher fold {k} of {n_folds} ({TEACHER}, same schedule and seed as fold 0)")
    student_env = {**s.env, "nnUNet_results": str(s.results_root / f"students_seed{seed}")}
    cfg = s.out_dir / f"config_{ENSEMBLE_STUDENT}_seed{seed}.json"
    # the demo's teacher model folder, one teacher per fold (the trainer's own default is every fold found)
    cfg.write_text(json.dumps({**student_settings(student_epochs, iterations, seed, s.teacher_folder, warmup),
                               "teacher_folds": folds}))
    run_logged(["nnUNetv2_train", s.dataset_id, "3d_fullres", "0", "-tr", ENSEMBLE_STUDENT, "-device", s.device],
               {**s.train_env, **student_env, "RECOKD_CONFIG": str(cfg)},
               s.logs / f"train_{ENSEMBLE_STUDENT}_seed{seed}.log")
    student_folder = Path(student_env["nnUNet_results"]) / s.name / f"{ENSEMBLE_STUDENT}__nnUNetPlans__3d_fullres"
    progress.step(f"trained the ensemble student ({ENSEMBLE_STUDENT} from teacher folds "
                  f"{', '.join(map(str, folds))}, {student_epochs} x {iterations} iterations, seed {seed})")

    ways = [(f"teacher, {n_folds}-fold ensemble + TTA (nnU-Net's default)", TEACHER, s.teacher_folder, folds, True,
             s.env, False),
            ("teacher, fold 0 + TTA", TEACHER, s.teacher_folder, [0], True, s.env, False),
            ("ensemble student", ENSEMBLE_STUDENT, student_folder, [0], False, student_env, True),
            ("ensemble student + TTA", ENSEMBLE_STUDENT, student_folder, [0], True, student_env, False)]
    rows = []
    for label, trainer, folder, use, tta, env, runtime in ways:
        tag = f"ensemble_{trainer}_folds{''.join(map(str, use))}_{'tta' if tta else 'notta'}"
        result = s.evaluation.held_out_scores(tag, trainer, folder, env, use, tta, runtime)
        rows.append(inference_row(label, trainer, folder, use, tta, result, s.device))
        progress.step(f"evaluated {label} on the held-out cases")
    checkpoint = load_checkpoint(student_folder / "fold_0" / "checkpoint_final.pth").get("recokd") or {}
    validation = summary_mean_dice(validation_summary(student_folder, 0))
    return {"folds": folds, "student_trainer": ENSEMBLE_STUDENT, "student_folder": str(student_folder),
            "teachers": checkpoint.get("teacher"), "student_fold0_validation_mean_dice": validation,
            "teacher_saw_validation_cases": checkpoint.get("teacher_saw_validation_cases"), "rows": rows}


class Evaluation:
    """Predict the held-out cases with nnUNetv2_predict and score them with nnUNetv2_evaluate_folder (synthetic
    data, or a --dataset with imagesTs/labelsTs), else read nnU-Net's fold-0 validation."""

    def __init__(self, folder: Path, pre: Path, dataset_id: str, device: str, env: dict, logs: Path, out: Path):
        self.images, self.labels = folder / "imagesTs", folder / "labelsTs"
        self.pre, self.dataset_id, self.device, self.logs, self.out = pre, dataset_id, device, logs, out
        self.held_out = self.images.is_dir() and self.labels.is_dir()

    def run(self, tag: str, model_folder: Path, env: dict, seed: Optional[int] = None, fold: str = "0",
            dataset_id: Optional[str] = None) -> dict:
        """Score one trained model (tag: the trainer, or a name for its predictions); dataset_id: the dataset it
        trained on (default: the demo's)."""
        trainer = model_folder.name.split("__")[0]
        tag = tag if seed is None else f"{tag}_seed{seed}"
        if self.held_out:
            result = self.held_out_scores(tag, trainer, model_folder, env, (fold,), dataset_id=dataset_id)
        else:
            result = {**read_dice(validation_summary(model_folder, fold), model_folder),
                      "evaluated_on": f"fold {fold} validation"}
        checkpoint = model_folder / f"fold_{fold}" / "checkpoint_final.pth"
        return {**result, "seed": seed, "model_folder": str(model_folder), "fold": fold,
                **training_record(checkpoint)}

    def held_out_scores(self, tag: str, trainer: str, model_folder: Path, env: dict, folds: Sequence = (0,),
                        tta: bool = False, runtime: bool = True, dataset_id: Optional[str] = None) -> dict:
        """Predict the held-out cases with nnUNetv2_predict (these folds, TTA on or off), time the whole command
        per case, also time `nnunetv2_recokd predict --runtime openvino` when `runtime` and the deploy extra is
        installed, and score the stock predictions with nnUNetv2_evaluate_folder."""
        pred = self.out / "predictions" / tag
        use = [str(f) for f in folds]
        no_tta = [] if tta else ["--disable_tta"]
        cases = len(list(self.images.glob("*_0000.*")))
        with Stopwatch() as stock:
            run_logged(["nnUNetv2_predict", "-i", str(self.images), "-o", str(pred), "-d",
                        dataset_id or self.dataset_id, "-c", "3d_fullres", "-tr", trainer, "-f", *use, "-device",
                        self.device, *no_tta, "-npp", "1", "-nps", "1"], env, self.logs / f"predict_{tag}.log")
        timing = {"stock_s_per_case": seconds_per_case(stock.seconds, cases)}
        if runtime and runtime_available(DEMO_RUNTIME):  # the same cases through our predict on the CPU runtime
            with Stopwatch() as ours:
                run_logged([nnunet_command("nnunetv2_recokd"), "predict", "-i", str(self.images), "-o",
                            str(self.out / "predictions_runtime" / tag), "-m", str(model_folder), "-f", *use,
                            *no_tta, "--runtime", DEMO_RUNTIME], env, self.logs / f"predict_runtime_{tag}.log")
            timing["runtime_s_per_case"] = seconds_per_case(ours.seconds, cases)
        run_logged(["nnUNetv2_evaluate_folder", str(self.labels), str(pred), "-djfile",
                    str(self.pre / "dataset.json"), "-pfile", str(self.pre / "nnUNetPlans.json")], env,
                   self.logs / f"evaluate_{tag}.log")
        return {**read_dice(pred / "summary.json", model_folder), "evaluated_on": "held-out test cases", **timing}


def write_outputs(rows: list[dict], out_dir: Path, seconds: float, ensemble: Optional[dict] = None) -> None:
    """table.md (evaluation/tables.py's models_table, and ensemble_table with --ensemble), table.json and
    figure.png (evaluation/figures.py's demo_figure) in out_dir; the table is printed too."""
    classes = list(rows[0]["dice"])
    table = models_table(rows, seconds, DEMO_RUNTIME)
    if ensemble is not None:
        table += "\n" + ensemble_table(ensemble, DEMO_RUNTIME)
    (out_dir / "table.md").write_text(table)
    (out_dir / "table.json").write_text(json.dumps({"rows": rows, "minutes": seconds / 60,
                                                    **({"ensemble": ensemble} if ensemble is not None else {})},
                                                   indent=1))
    demo_figure(rows, classes, out_dir / "figure.png")
    print(table)
    print(f"written: {out_dir / 'table.md'}, {out_dir / 'table.json'}, {out_dir / 'figure.png'}")
