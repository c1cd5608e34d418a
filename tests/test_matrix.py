"""Every configuration, plans preset and label type, through nnU-Net's own code (issue 19, part 2).

One cell = one trainer on one (dataset label type, configuration, plans): nnU-Net trains it (1 epoch x 1 iteration, 1
validation iteration, then nnU-Net's full validation of the fold), stock nnU-Net's predictor predicts the held-out
case, `nnunetv2_recokd export` writes the stock model folder that stock nnU-Net predicts without this package, and
`nnunetv2_recokd predict` predicts the case again. A combination that cannot work must be refused before nnU-Net
builds its data loaders, with a message that names the reason. docs/configurations.md renders CELLS as tables
(test_docs_table_is_this_matrix keeps them equal).

Cost (the whole suite must stay within 15 minutes on 2 CPU cores; this file takes under 2 of them, measured in
docs/configurations.md):
- three tiny synthetic datasets, one per label type (the same 5 training cases of 24^3 and one held-out case),
  each fingerprinted, planned and preprocessed once by nnU-Net's planning API; the fingerprint samples 10^5
  foreground voxels instead of 10^8 (the percentiles of 10^8 samples take ~10 s whatever the dataset's size);
- 3d_lowres and 3d_cascade_fullres are written into the plans as nnU-Net's planner writes them for images much
  larger than the patch (add_lowres_and_cascade): planning them needs images several times the patch, and every
  3d_fullres cell would then pay for many sliding-window positions in validation and prediction;
- teachers are random-weight nnU-Net model folders (what a student learns is not under test here), except where
  nnU-Net needs a trained stage: a cascade cell trains its trainer's 3d_lowres stage on fold "all" first (nnU-Net
  reads the previous stage's segmentation of every training case from that stage's predicted_next_stage folder,
  which the validation of fold "all" writes for every case);
- everything runs in this process: nnU-Net's entry functions are called directly (run_training, nnUNetPredictor,
  the planning API) with nnU-Net's spawn pools replaced by thread pools (thread_pools(): a spawned worker
  re-imports torch and nnU-Net, 2-3 s each, several per training and prediction);
- cells in one row share the student's architecture, so the OpenVINO runtime of `nnunetv2_recokd predict` runs in
  one column (ReCoKD) and the others use its torch runtime; progress.png (1.3 s of matplotlib per training) is drawn
  only in the label-map 3d_fullres default row; --c resumes one distilled cell per row (Cell.resume).
Separate processes: test_cascade_through_nnunet_commands resumes a cascade student with the real `nnUNetv2_train
--c`, and test_exports_predicted_by_stock_nnunet_without_this_package runs nnUNetv2_predict's code on every export in
an interpreter where nnunetv2_recokd cannot be imported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import subprocess
import sys
from copy import deepcopy
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_recokd.nnunet_commands import run_logged
from nnunetv2_recokd.synthetic import write_dataset
from tests.tiny_nnunet import BLOCKER

SIZE = 24  # voxels per axis: the fullres patch is the whole image, one sliding-window position per case
CASES = 5  # nnU-Net's 5-fold split needs 5 training cases; fold 0 validates one of them
TEST_CASE = "case_005"
DATASETS = {"map": (981, "MatrixLabelMap"), "regions": (982, "MatrixRegions"), "ignore": (983, "MatrixIgnore")}
RESENC = "nnUNetResEncUNetMPlans"
PLAIN = "nnUNetPlans"
SCHEDULE = {"num_epochs": 1, "num_iterations_per_epoch": 1, "num_val_iterations_per_epoch": 1, "save_every": 1,
            "seed": 0, "reco_warmup": 0.0, "graph_warmup": 0.0}  # no warm-up: the terms act on the only step

KD = ("nnUNetTrainerLogitKD", "nnUNetTrainerReCoKD", "nnUNetTrainerReCoKDGraph")
CORE = ("nnUNetTrainerStudent",) + KD
OPENVINO_TRAINER = "nnUNetTrainerReCoKD"
PLOTTED_ROW = "map / 3d_fullres / default"
GRAPH_NEEDS_LABEL_MAPS = "region-graph distillation needs label maps"


@dataclasses.dataclass(frozen=True)
class Cell:
    labels: str  # "map" (label map), "regions", "ignore"
    configuration: str
    trainer: str
    plans: str = PLAIN  # the student's plans
    teacher_plans: Optional[str] = None  # None: the student's
    refused: Optional[str] = None  # a refused cell: what its message must say
    settings: tuple = ()  # extra RECOKD_CONFIG entries, as (key, value) pairs
    teacher: Optional[str] = None  # a RECOKD_TEACHER override: "<plans>/<configuration>" of a random teacher
    resume: bool = False  # also --c: one more epoch from the checkpoint, distillation modules restored
    why: str = ""  # what the cell shows, for the docs table

    @property
    def plans_kind(self) -> str:
        return "resenc" if self.plans == RESENC else "resenc-teacher" if self.teacher_plans == RESENC else "default"

    @property
    def row(self) -> str:
        return f"{self.labels} / {self.configuration} / {self.plans_kind}"

    @property
    def id(self) -> str:
        short = self.trainer.removeprefix("nnUNetTrainer")
        return f"{self.labels}-{self.configuration}-{self.plans_kind}-{short}" + ("-refused" if self.refused else "")

    @property
    def fold(self):
        return "all" if self.configuration == "3d_lowres" else 0


def _row(labels: str, configuration: str, trainers=CORE, resume: Optional[str] = None, **kwargs) -> list[Cell]:
    cells = []
    for trainer in trainers:
        refused = GRAPH_NEEDS_LABEL_MAPS if labels == "regions" and "Graph" in trainer else None
        cells.append(Cell(labels, configuration, trainer, refused=refused, resume=trainer == resume, **kwargs))
    return cells


def _cells() -> list[Cell]:
    graph, reco = "nnUNetTrainerReCoKDGraph", "nnUNetTrainerReCoKD"
    cells = (_row("map", "3d_fullres", resume=graph) + _row("map", "2d", resume=graph)
             + _row("map", "3d_lowres", resume=graph) + _row("map", "3d_cascade_fullres"))
    # a ResEnc teacher for a plain student: nnU-Net names the 3d_lowres data after the plans
    # (nnUNetResEncUNetMPlans_3d_lowres vs nnUNetPlans_3d_lowres), the preprocessing is the same
    cells += _row("map", "3d_fullres", KD, teacher_plans=RESENC) + _row("map", "3d_lowres", KD, teacher_plans=RESENC)
    cells += _row("map", "3d_fullres", plans=RESENC, resume=graph)  # ResEnc teacher, ResEnc student
    for labels in ("regions", "ignore"):
        cells += _row(labels, "3d_fullres", resume=reco) + _row(labels, "2d")
    # fold ensembles and the input trainers (the label-map dataset has two channels, the second one CT)
    cells += [Cell("map", "3d_fullres", t) for t in (
        "nnUNetTrainerReCoKD_ensemble", "nnUNetTrainerLogitKD_ensemble", "nnUNetTrainerStudent_modalityDropout",
        "nnUNetTrainerReCoKD_modalityDropout", "nnUNetTrainerStudent_lowDose", "nnUNetTrainerReCoKD_lowDose")]
    # combinations that cannot work: refused before training, saying why
    cells += [
        Cell("regions", "3d_fullres", "nnUNetTrainerReCoKD_modalityDropout",
             refused="needs at least two input channels", why="one input channel"),
        Cell("regions", "3d_fullres", "nnUNetTrainerReCoKD_lowDose", refused="CT", why="no CT channel"),
        Cell("map", "2d", "nnUNetTrainerReCoKD", teacher=f"{PLAIN}/3d_fullres", refused="spacing",
             why="a 3d_fullres teacher for a 2d student (RECOKD_TEACHER)"),
        Cell("map", "3d_cascade_fullres", "nnUNetTrainerReCoKD", settings=(("student_channels", [0]),),
             refused="student_channels cannot be used with a cascade stage", why="student_channels on a cascade"),
    ]
    return cells


CELLS = _cells()


# ----------------------------------------------------------------------------------------------- fixtures
@contextlib.contextmanager
def thread_pools() -> Iterator[None]:
    """nnU-Net's multiprocessing.get_context("spawn").Pool as a thread pool: same code, no worker start-up."""
    real = multiprocessing.get_context

    class ThreadContext:
        def __init__(self, context):
            self._context = context

        def Pool(self, processes: Optional[int] = None, *args, **kwargs) -> ThreadPool:  # noqa: N802 (stdlib name)
            return ThreadPool(processes or 1)

        def __getattr__(self, name):
            return getattr(self._context, name)

    def get_context(method=None):
        context = real(method)
        return ThreadContext(context) if method == "spawn" else context

    multiprocessing.get_context = get_context
    try:
        yield
    finally:
        multiprocessing.get_context = real


def _small_fingerprint_extractor():
    """nnU-Net's fingerprint extractor sampling 10^5 foreground voxels instead of 10^8 (the percentiles of 10^8
    samples per channel take ~10 s on this CPU whatever the dataset's size)."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    class SmallSampleFingerprintExtractor(DatasetFingerprintExtractor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.num_foreground_voxels_for_intensitystats = 1e5

    return SmallSampleFingerprintExtractor


def add_lowres_and_cascade(plans: dict, identifier_prefix: str) -> None:
    """3d_lowres (half the resolution, patch = the whole downsampled image) and 3d_cascade_fullres, as nnU-Net's
    planner writes them for images much larger than the patch (it drops 3d_lowres for images this small)."""
    fullres = plans["configurations"]["3d_fullres"]
    lowres = deepcopy(fullres)
    shape = [int(round(s / 2)) for s in fullres["median_image_size_in_voxels"]]
    lowres.update(data_identifier=f"{identifier_prefix}_3d_lowres", spacing=[2 * s for s in fullres["spacing"]],
                  median_image_size_in_voxels=shape, patch_size=[s - s % 4 for s in shape], batch_dice=False,
                  next_stage="3d_cascade_fullres")
    plans["configurations"]["3d_lowres"] = lowres
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}


def write_random_model(folder: Path, plans: dict, dataset: dict, configuration: str, folds=(0,), seed: int = 0) -> Path:
    """An nnU-Net model folder of nnUNetTrainer with random weights for any configuration (a cascade stage's input
    channels counted as nnU-Net counts them)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    manager = PlansManager(deepcopy(plans))
    cm = manager.get_configuration(configuration)
    for fold in folds:
        torch.manual_seed(seed + (fold if isinstance(fold, int) else 99))
        network = nnUNetTrainer.build_network_architecture(
            manager, cm, determine_num_input_channels(manager, cm, dataset),
            manager.get_label_manager(dataset).num_segmentation_heads, True)
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                    "init_args": {"configuration": configuration, "fold": fold},
                    "inference_allowed_mirroring_axes": tuple(range(len(cm.patch_size)))},
                   folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


@dataclasses.dataclass
class World:
    root: Path
    results: Path
    exports: dict  # cell id -> the exported model folder and what to predict with it (test_cell)

    def dataset_name(self, labels: str) -> str:
        number, name = DATASETS[labels]
        return f"Dataset{number:03d}_{name}"

    def raw(self, labels: str) -> Path:
        return self.root / "raw" / self.dataset_name(labels)

    def model(self, labels: str, trainer: str, plans: str, configuration: str) -> Path:
        return self.results / self.dataset_name(labels) / f"{trainer}__{plans}__{configuration}"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("matrix")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread is fastest, and the suite shares 2 cores
    with pytest.MonkeyPatch.context() as mp:
        for name in ("raw", "preprocessed", "results"):
            mp.setenv(f"nnUNet_{name}", str(root / name))
        for key, value in {"nnUNet_def_n_proc": "1", "nnUNet_compile": "f", "nnUNet_npp": "0", "nnUNet_nps": "0",
                           "RECOKD_CACHE": str(root / "onnx_cache")}.items():
            mp.setenv(key, value)
        mp.delenv("nnUNet_n_proc_DA", raising=False)  # 0 breaks nnU-Net's planning; set for training below
        for key in ("RECOKD_CONFIG", "RECOKD_TEACHER"):
            mp.delenv(key, raising=False)
        with thread_pools():
            _plan_and_preprocess(root)
        mp.setenv("nnUNet_n_proc_DA", "0")  # training: augmentation in this process
        world = World(root, root / "results", {})
        _write_teachers(world)
        with thread_pools():
            yield world
    torch.set_num_threads(threads)


def _plan_and_preprocess(root: Path) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiments,
        preprocess,
    )

    extractor = _small_fingerprint_extractor()
    for labels, (number, name) in DATASETS.items():
        two_channels = labels == "map"  # the input trainers need two channels, one of them CT
        write_dataset(root / "raw", number, name, num_train=CASES, num_test=1, size=SIZE, seed=0,
                      channels=2 if two_channels else 1, ct=two_channels, labels=labels)
        extract_fingerprint_dataset(number, extractor, num_processes=1, show_progress_bar=False, verbose=False)
        plan_experiments([number], "ExperimentPlanner")
        configurations = ["2d", "3d_fullres"]
        if labels == "map":
            plan_experiments([number], "nnUNetPlannerResEncM")
            folder = root / "preprocessed" / f"Dataset{number:03d}_{name}"
            for plans_name in (PLAIN, RESENC):
                plans = json.loads((folder / f"{plans_name}.json").read_text())
                add_lowres_and_cascade(plans, plans_name)
                (folder / f"{plans_name}.json").write_text(json.dumps(plans, indent=1))
            configurations.append("3d_lowres")
        preprocess([number], PLAIN, configurations, [1] * len(configurations), show_progress_bar=False)


def _write_teachers(world: World) -> None:
    """Random nnUNetTrainer teachers at nnU-Net's default location of every configuration that a cell distils."""
    for labels in DATASETS:
        pre = world.root / "preprocessed" / world.dataset_name(labels)
        dataset = json.loads((pre / "dataset.json").read_text())
        for plans_name in (PLAIN, RESENC) if labels == "map" else (PLAIN,):
            plans = json.loads((pre / f"{plans_name}.json").read_text())
            for configuration in plans["configurations"]:
                # lowres students train on fold "all" (the cascade needs the previous stage of every case);
                # fold 1 makes the fold ensemble
                folds = ("all",) if configuration == "3d_lowres" else (0, 1) if configuration == "3d_fullres" else (0,)
                write_random_model(world.model(labels, "nnUNetTrainer", plans_name, configuration), plans, dataset,
                                   configuration, folds)


# ----------------------------------------------------------------------------------------------- one cell
def _train(world: World, cell: Cell, monkeypatch, continue_training: bool = False, **extra) -> None:
    """nnUNetv2_train <dataset> <configuration> <fold> -tr <trainer> -p <plans> [--c] -device cpu, in this process."""
    from nnunetv2.run.run_training import run_training

    settings = {**SCHEDULE, **dict(cell.settings), **extra}
    if cell.teacher_plans:
        settings["teacher_plans"] = cell.teacher_plans
    config = world.root / "settings" / f"{cell.id}.json"
    config.parent.mkdir(exist_ok=True)
    config.write_text(json.dumps(settings))
    monkeypatch.setenv("RECOKD_CONFIG", str(config))
    if cell.teacher:
        plans, configuration = cell.teacher.split("/")
        monkeypatch.setenv("RECOKD_TEACHER", str(world.model(cell.labels, "nnUNetTrainer", plans, configuration)))
    run_training(world.dataset_name(cell.labels), cell.configuration, cell.fold, cell.trainer, cell.plans,
                 continue_training=continue_training, device=torch.device("cpu"))


def _cases(world: World, labels: str) -> list[list[str]]:
    """The held-out case as nnUNetv2_predict lists it (given as a list: nnU-Net would otherwise find the case files
    with a worker pool of its own, most of a one-case prediction's time)."""
    channels = len(json.loads((world.raw(labels) / "dataset.json").read_text())["channel_names"])
    return [[str(world.raw(labels) / "imagesTs" / f"{TEST_CASE}_{c:04d}.nii.gz") for c in range(channels)]]


def _stock_predict(model: Path, fold, out: Path, cases: list[list[str]], prev: Optional[Path] = None) -> None:
    """nnUNetv2_predict -f <fold> --disable_tta -npp 0 -nps 0 [-prev_stage_predictions] (its sequential path)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=False, device=torch.device("cpu"),
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), (fold,), "checkpoint_final.pth")
    out.mkdir(parents=True, exist_ok=True)  # nnUNetv2_predict makes it before predicting
    predictor.predict_from_files_sequential(cases, str(out), save_probabilities=False, overwrite=True,
                                            folder_with_segs_from_prev_stage=str(prev) if prev else None)


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _expected_labels(world: World, labels: str) -> set:
    """Values a prediction may hold: the dataset's labels (regions as their regions_class_order values), never the
    ignore label."""
    dataset = json.loads((world.raw(labels) / "dataset.json").read_text())
    if "regions_class_order" in dataset:
        return {0, *dataset["regions_class_order"]}
    return {v for k, v in dataset["labels"].items() if k != "ignore"}


def _check_prediction(world: World, cell: Cell, folder: Path) -> np.ndarray:
    files = sorted(p.name for p in folder.glob("*.nii.gz"))
    assert files == [f"{TEST_CASE}.nii.gz"], (cell.id, files)
    seg = _read(folder / files[0])
    assert seg.shape == (SIZE,) * 3, (cell.id, seg.shape)  # back in the raw image's geometry
    assert set(np.unique(seg).tolist()) <= _expected_labels(world, cell.labels), (cell.id, np.unique(seg))
    return seg


def _previous_stage(world: World, cell: Cell, monkeypatch) -> Path:
    """The 3d_lowres segmentation of the held-out case by the same trainer (what nnUNetv2_predict's
    -prev_stage_predictions names); trains that stage on fold all first when its cell has not run."""
    lowres = dataclasses.replace(cell, configuration="3d_lowres", settings=(), resume=False)
    folder = world.model(cell.labels, cell.trainer, cell.plans, "3d_lowres")
    if not (folder / "predicted_next_stage" / cell.configuration).is_dir():
        _train(world, lowres, monkeypatch)
    out = world.root / "predictions" / f"{lowres.id}-for-cascade"
    if not out.is_dir():
        _stock_predict(folder, "all", out, _cases(world, cell.labels))
    return out


def _refused(world: World, cell: Cell, monkeypatch) -> None:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    fold_dir = world.model(cell.labels, cell.trainer, cell.plans, cell.configuration) / f"fold_{cell.fold}"
    # another cell may have trained this model folder: its checkpoints must stay as they are
    before = {p: p.stat().st_mtime_ns for p in fold_dir.glob("checkpoint_*.pth")}
    loaders_built, get_dataloaders = [], nnUNetTrainer.get_dataloaders
    monkeypatch.setattr(nnUNetTrainer, "get_dataloaders", lambda self: loaders_built.append(1) or get_dataloaders(self))
    with pytest.raises(Exception) as raised:
        _train(world, cell, monkeypatch)
    assert cell.refused in str(raised.value), str(raised.value)
    assert not loaders_built, "refused only after nnU-Net had built the data loaders"
    assert {p: p.stat().st_mtime_ns for p in fold_dir.glob("checkpoint_*.pth")} == before


@pytest.mark.parametrize("cell", CELLS, ids=[c.id for c in CELLS])
def test_cell(world: World, cell: Cell, monkeypatch, capsys) -> None:
    monkeypatch.delenv("RECOKD_TEACHER", raising=False)
    if cell.refused:
        _refused(world, cell, monkeypatch)
        return
    if cell.row != PLOTTED_ROW:  # the same matplotlib code in every row (module docstring)
        from nnunetv2_recokd.trainers.progress import DistillLocalLogger

        monkeypatch.setattr(DistillLocalLogger, "plot_progress_png", lambda self, folder: None)
    model = world.model(cell.labels, cell.trainer, cell.plans, cell.configuration)
    fold_dir = model / f"fold_{cell.fold}"
    prev = _previous_stage(world, cell, monkeypatch) if cell.configuration == "3d_cascade_fullres" else None

    _train(world, cell, monkeypatch)
    first = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert first["trainer_name"] == cell.trainer and first["current_epoch"] == 1
    distiller = (first.get("recokd") or {}).get("distiller")
    assert (distiller is not None) == ("Student" not in cell.trainer), cell.trainer  # the controls distil nothing
    if distiller is not None:  # the teacher really added to the student's loss
        assert first["logging"]["train_kd_total_weighted"][0] > 0, first["logging"]
    assert (fold_dir / "validation" / "summary.json").is_file()
    assert json.loads((model / "plans.json").read_text())["configurations"][cell.configuration][
        "recokd_student"]["width"] == 0.25  # what nnUNetv2_predict rebuilds the student from
    if cell.row == PLOTTED_ROW:
        assert (fold_dir / "progress.png").stat().st_size > 10_000
    if cell.configuration == "3d_lowres":  # what a cascade stage trains on: the segmentation of every case
        assert len(list((model / "predicted_next_stage" / "3d_cascade_fullres").glob("*.b2nd"))) == CASES
    if cell.resume:
        _train(world, cell, monkeypatch, continue_training=True, num_epochs=2)
        final = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        assert final["current_epoch"] == 2 and set(final["recokd"]["distiller"]) == set(distiller)
        assert final["logging"]["train_losses"][0] == first["logging"]["train_losses"][0]  # continued, not restarted
        logs = "".join(p.read_text() for p in fold_dir.glob("training_log_*.txt"))
        assert "Restored checkpoint at epoch 1 with distillation modules" in logs

    cases = _cases(world, cell.labels)
    stock = world.root / "predictions" / cell.id
    _stock_predict(model, cell.fold, stock, cases, prev)
    seg = _check_prediction(world, cell, stock)

    from nnunetv2_recokd.cli import main
    from nnunetv2_recokd.deploy.export import export_stock_model
    from nnunetv2_recokd.deploy.modelfolder import open_model_folder

    # own root per cell: a ResEnc teacher's student trains in the plain student's model folder
    exported = export_stock_model(open_model_folder(model, [cell.fold]), world.root / "exported" / cell.id)
    world.exports[cell.id] = {"model": str(exported.folder), "fold": cell.fold, "cases": cases,
                              "prev": str(prev) if prev else None, "reference": str(stock / f"{TEST_CASE}.nii.gz")}

    ours = world.root / "predictions" / f"{cell.id}-recokd"
    runtime = "openvino" if cell.trainer == OPENVINO_TRAINER else "torch"
    args = ["predict", "-i", str(world.raw(cell.labels) / "imagesTs"), "-o", str(ours), "-m", str(model), "-f",
            str(cell.fold), "--disable_tta", "--runtime", runtime]
    if prev:
        args += ["-prev_stage_predictions", str(prev)]
    assert main(args) == 0, capsys.readouterr().err
    agreement = float((_check_prediction(world, cell, ours) == seg).mean())
    # torch: nnU-Net's own computation, identical; OpenVINO's float32 sums in another order (a tie may flip)
    assert agreement == 1.0 if runtime == "torch" else agreement > 0.99, (cell.id, runtime, agreement)


def test_cascade_through_nnunet_commands(world: World, monkeypatch, capsys) -> None:
    """The real command on the cascade: nnUNetv2_train --c continues the ReCo-KD cascade student (teacher reloaded,
    its previous stage's segmentations read from the 3d_lowres model folder, nnU-Net's own worker processes);
    `nnunetv2_recokd predict` refuses the cascade stage without the previous stage's segmentations. (The
    prediction with them is test_cell's, through nnUNetv2_predict's code in this process: a second command would
    add its ~10 s start-up for the argument parsing alone.)"""
    cell = next(c for c in CELLS if c.id == "map-3d_cascade_fullres-default-ReCoKD")
    model = world.model(cell.labels, cell.trainer, cell.plans, cell.configuration)
    _previous_stage(world, cell, monkeypatch)  # the 3d_lowres stage's predicted_next_stage, which --c trains on
    if not (model / "fold_0" / "checkpoint_final.pth").is_file():  # run on its own (-k)
        _train(world, cell, monkeypatch)
    config = world.root / "settings" / "cascade_cli.json"
    config.write_text(json.dumps({**SCHEDULE, "num_epochs": 2}))
    env = {**os.environ, "RECOKD_CONFIG": str(config), "PYTHONUNBUFFERED": "1"}
    env.pop("RECOKD_TEACHER", None)
    dataset = str(DATASETS["map"][0])
    logs = world.root / "logs"
    logs.mkdir(exist_ok=True)
    text = run_logged(["nnUNetv2_train", dataset, "3d_cascade_fullres", "0", "-tr", cell.trainer, "--c", "-device",
                       "cpu"], env, logs / "cascade_c.log", timeout=600)
    assert "Restored checkpoint at epoch 1 with distillation modules" in text
    final = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 2 and final["recokd"]["distiller"]

    assert (model / "fold_0" / "validation" / "summary.json").is_file()

    from nnunetv2_recokd.cli import main

    refused = world.root / "predictions" / "cascade-no-prev"
    assert main(["predict", "-i", str(world.raw("map") / "imagesTs"), "-o", str(refused), "-m", str(model), "-f",
                 "0", "--runtime", "torch"]) == 1
    assert "-prev_stage_predictions" in capsys.readouterr().err and not refused.exists()


# nnUNetv2_predict's code (predict_entry_point with -npp 0 -nps 0 runs predict_from_files_sequential) on every export
STOCK_PREDICT = '''
import json, os, sys, torch
torch.set_num_threads(1)
try:
    import nnunetv2_recokd  # noqa: F401
    sys.exit("nnunetv2_recokd is importable: the block failed")
except ModuleNotFoundError:
    pass
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
for cell, e in json.loads(open(sys.argv[1]).read()).items():
    predictor = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=False, device=torch.device("cpu"),
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(e["model"], (e["fold"],), "checkpoint_final.pth")
    os.makedirs(os.path.join(sys.argv[2], cell))
    predictor.predict_from_files_sequential(e["cases"], os.path.join(sys.argv[2], cell),
                                            folder_with_segs_from_prev_stage=e["prev"])
'''


def test_exports_predicted_by_stock_nnunet_without_this_package(world: World, tmp_path) -> None:
    """Every cell's export, predicted by stock nnU-Net in an interpreter where nnunetv2_recokd cannot be imported,
    gives exactly the labels its student's own model folder gave."""
    if not world.exports:
        pytest.skip("no cell of the matrix ran in this session (-k)")
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "sitecustomize.py").write_text(BLOCKER)
    (tmp_path / "exports.json").write_text(json.dumps(world.exports))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "blocked")}
    done = subprocess.run([sys.executable, "-c", STOCK_PREDICT, str(tmp_path / "exports.json"), str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for cell, export in world.exports.items():
        reference = _read(Path(export["reference"]))
        assert np.array_equal(_read(tmp_path / "out" / cell / f"{TEST_CASE}.nii.gz"), reference), cell


# ----------------------------------------------------------------------------------------------- the docs table
def matrix_tables() -> str:
    """docs/configurations.md's tables, from CELLS: the grid of the four main trainers, then every other cell."""
    def outcome(cell: Cell) -> str:
        text = f"refused ({cell.refused})" if cell.refused else "works + --c" if cell.resume else "works"
        return f"{text}: `{cell.id}`"

    rows: dict[str, dict[str, Cell]] = {}
    others = []
    for cell in CELLS:
        if cell.trainer in CORE and not cell.why:
            rows.setdefault(cell.row, {})[cell.trainer] = cell
        else:
            others.append(cell)
    short = [t.removeprefix("nnUNetTrainer") for t in CORE]
    lines = ["| dataset / configuration / plans | " + " | ".join(short) + " |", "|---" * (len(CORE) + 1) + "|"]
    for row, cells in rows.items():
        lines.append(f"| {row} | " + " | ".join(outcome(cells[t]) if t in cells else "n/a (no teacher)" if
                                                  row.endswith("resenc-teacher") else "not run" for t in CORE) + " |")
    lines += ["", "| trainer | dataset / configuration / plans | outcome |", "|---|---|---|"]
    for cell in others:
        lines.append(f"| {cell.trainer} | {cell.row}{f' ({cell.why})' if cell.why else ''} | {outcome(cell)} |")
    return "\n".join(lines) + "\n"


def test_docs_table_is_this_matrix() -> None:
    docs = (Path(__file__).parent.parent / "docs" / "configurations.md").read_text()
    assert matrix_tables() in docs, "docs/configurations.md: paste python -c 'from tests.test_matrix import " \
                                    "matrix_tables; print(matrix_tables())'"
