"""Unlabeled scans as training data: the teacher labels them, a derived nnU-Net dataset holds them.

nnU-Net trains on fully annotated cases only. A distillation trainer already runs the teacher on every batch, and the
teacher is the natural source of labels for scans nobody annotated (the recipe of the FLARE22 winner: a large
nnU-Net labels the unlabeled scans, a small one trains on them). ``add_unlabeled`` makes a new nnU-Net dataset

    $nnUNet_raw/Dataset<NEW>_<Name>/          imagesTr: the labelled dataset's images and the unlabeled ones (links)
                                             labelsTr: the real labels (links) and the teacher's labels (files)
                                             dataset.json: the teacher's, plus "recokd_unlabeled" (see DATASET_KEY)
    $nnUNet_preprocessed/Dataset<NEW>_<Name>/ preprocessed with the TEACHER's plans (same spacing, patch,
                                             normalisation: no re-planning), splits_final.json whose validation
                                             folds hold real labelled cases only

so that ``nnUNetv2_train NEW 3d_fullres 0 -tr nnUNetTrainerReCoKD`` trains on both, with the teacher found from the
dataset itself. Every loss part that needs a label (seg loss, MS-SARD masks, graph regions, nnU-Net's foreground
oversampling) reads the teacher's label where no real one exists. With no labelled dataset at all, every case is
teacher-labelled and the validation measures agreement with the teacher. With ``min_agreement``, the teacher's labels
hold nnU-Net's ignore label where its mirrorings disagree (nnunetv2_recokd/agreement.py).

Nothing half-written is left by a kill: the teacher's labels are written case by case (each file complete or
absent; a rerun of the same command labels only what is missing), the dataset is assembled in hidden staging
folders and moved into place at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from nnunetv2_recokd.deploy.modelfolder import DeployError, ModelFolder, open_model_folder

DATASET_KEY = "recokd_unlabeled"  # dataset.json: where the teacher-labelled cases and their teacher are recorded
STAGING = ".recokd_partial"  # hidden staging root under nnUNet_raw / nnUNet_preprocessed (never a Dataset<id>_ name)
REQUEST_FILE = "recokd_unlabeled_request.json"
TRAINING_CASES_FILE = "recokd_training_cases.json"  # fold folder: how many real and teacher-labelled cases trained it


class UnlabeledError(ValueError):
    """Inputs that cannot make a derived dataset; raised before anything is written."""


# ----------------------------------------------------------------------------------------------- reading a dataset
def teacher_labelled_cases(dataset_json: dict) -> set[str]:
    """The case identifiers whose labels the teacher made (empty for an ordinary nnU-Net dataset)."""
    return set((dataset_json.get(DATASET_KEY) or {}).get("teacher_labelled", []))


def dataset_teacher(dataset_json: dict) -> Optional[str]:
    """The teacher model folder that labelled a derived dataset (None for an ordinary dataset)."""
    return (dataset_json.get(DATASET_KEY) or {}).get("teacher")


def dataset_teacher_folds(dataset_json: dict) -> Optional[list]:
    """The folds of the teacher that labelled a derived dataset (None for an ordinary dataset)."""
    return (dataset_json.get(DATASET_KEY) or {}).get("teacher_folds")


def dataset_min_agreement(dataset_json: dict) -> Optional[float]:
    """The agreement of the teacher's mirrorings below which a derived dataset holds the ignore label (None: every
    teacher label kept)."""
    return (dataset_json.get(DATASET_KEY) or {}).get("min_agreement")


def min_agreement_note(min_agreement: Optional[float]) -> str:
    """How logs and reports name the filter of a derived dataset ("" when every teacher label was kept)."""
    if min_agreement is None:
        return ""
    return f"; ignore label where fewer than {min_agreement:g} of the teacher's mirrorings agreed"


def count_training_cases(train_cases: Sequence[str], dataset_json: dict) -> dict[str, int]:
    """How many of a fold's training cases carry real labels and how many the teacher's."""
    pseudo = teacher_labelled_cases(dataset_json)
    n_teacher = sum(c in pseudo for c in train_cases)
    return {"real": len(train_cases) - n_teacher, "teacher_labelled": n_teacher}


def derived_splits(real: Sequence[str], teacher_labelled: Sequence[str],
                   source_splits: Optional[list[dict]] = None, seed: int = 12345) -> list[dict]:
    """Cross-validation folds of a derived dataset: teacher-labelled cases train in every fold, never validate.

    Args:
        real: the cases with real labels.
        teacher_labelled: the cases the teacher labelled.
        source_splits: the labelled dataset's own splits_final.json (kept: the same validation cases as before);
            None draws nnU-Net's 5-fold split of the real cases (generate_crossval_split, seed 12345).
    With no real case, the teacher-labelled cases are split 5-fold: validation then measures agreement with the
    teacher.

    Raises:
        UnlabeledError: source splits naming cases the dataset lacks, or 1 real case (nothing to cross-validate).
    """
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    real, pseudo = sorted(real), sorted(teacher_labelled)
    if not real:
        return generate_crossval_split(pseudo, seed=seed, n_splits=min(5, len(pseudo)))
    if source_splits is None:
        if len(real) < 2:
            raise UnlabeledError(f"{len(real)} labelled case: at least 2 are needed for a validation fold")
        source_splits = generate_crossval_split(real, seed=seed, n_splits=min(5, len(real)))
    unknown = sorted({c for fold in source_splits for c in fold["train"] + fold["val"]} - set(real))
    if unknown:
        raise UnlabeledError(f"the labelled dataset's splits_final.json names {len(unknown)} case(s) it has no label "
                             f"for: {', '.join(unknown[:5])}")
    return [{"train": sorted(fold["train"]) + pseudo, "val": sorted(fold["val"])} for fold in source_splits]


# ----------------------------------------------------------------------------------------------- the request
@dataclasses.dataclass
class Request:
    """Everything the command was asked; a rerun with the same request resumes, another one is refused."""

    teacher: str
    folds: list
    tta: bool
    labelled_dataset: Optional[str]
    images: str
    dataset_id: int
    dataset_name: str
    min_agreement: Optional[float] = None  # teacher labels where fewer of its mirrorings agree become the ignore label
    min_case_agreement: Optional[float] = None  # a case is kept when the teacher's members agree on it this well

    @property
    def folder_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.dataset_name}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Inputs:
    """The checked inputs of one derived dataset (nothing written yet)."""

    request: Request
    teacher: ModelFolder
    labelled_raw: Optional[Path]  # the labelled dataset's raw folder
    real_cases: dict[str, tuple[list[str], str]]  # case -> (image files, label file)
    unlabeled_cases: dict[str, list[str]]  # case -> image files
    source_splits: Optional[list[dict]]
    raw_root: Path
    preprocessed_root: Path

    @property
    def raw_folder(self) -> Path:
        return self.raw_root / self.request.folder_name

    @property
    def preprocessed_folder(self) -> Path:
        return self.preprocessed_root / self.request.folder_name

    def staging(self, root: Path) -> Path:
        return root / STAGING / self.request.folder_name


def _roots() -> tuple[Path, Path]:
    raw, pre = os.environ.get("nnUNet_raw"), os.environ.get("nnUNet_preprocessed")
    if not raw or not pre:
        raise UnlabeledError("nnUNet_raw and nnUNet_preprocessed must be set (nnU-Net's folders, where the derived "
                             "dataset is written)")
    return Path(raw), Path(pre)


def _dataset_folder(root: Path, dataset: str) -> Optional[Path]:
    """Dataset<id>_<name> under root for an id or a full name (None when absent)."""
    if dataset.startswith("Dataset"):
        return root / dataset if (root / dataset).is_dir() else None
    if not dataset.isdigit():
        raise UnlabeledError(f"-d {dataset!r}: give a dataset id (4) or name (Dataset004_Hippocampus)")
    found = sorted(p for p in root.glob(f"Dataset{int(dataset):03d}_*") if p.is_dir())
    return found[0] if found else None


def _taken_by(root: Path, dataset_id: int) -> list[Path]:
    return sorted(p for p in root.glob(f"Dataset{dataset_id:03d}_*") if p.exists())


def _own_request(folder: Path) -> Optional[dict]:
    path = folder / REQUEST_FILE
    if not path.is_file():
        return None
    # requests written before min_agreement / min_case_agreement existed
    return {"min_agreement": None, "min_case_agreement": None, **json.loads(path.read_text())}


def check_inputs(teacher: Union[str, Path], images: Union[str, Path], dataset_id: int, dataset_name: str,
                 labelled: Optional[str] = None, folds: Optional[Sequence[Union[int, str]]] = None,
                 tta: bool = True, min_agreement: Optional[float] = None,
                 min_case_agreement: Optional[float] = None) -> Inputs:
    """Check every input before anything is written.

    min_agreement: where fewer than this fraction of the teacher's mirrorings agree with its label, the derived dataset
    holds nnU-Net's ignore label instead (nnunetv2_recokd/agreement.py); None keeps every teacher label.
    min_case_agreement: a teacher-labelled case is kept only when the teacher's folds (one fold: its mirrorings) agree
    on it with a mean pairwise Dice of at least this for every foreground label; None keeps every case.

    Raises:
        UnlabeledError / DeployError: the teacher is no model folder; the labelled dataset is missing or differs from
            the teacher's data (labels, channels, file ending); the images are misnamed, miss a channel or have another
            ending; a case name is taken by a labelled case; the new dataset id is taken by another dataset;
            min_agreement outside (0, 1], without mirroring, or for a region-based teacher.
    """
    raw_root, pre_root = _roots()
    if not 1 <= dataset_id <= 999:
        raise UnlabeledError(f"dataset id {dataset_id}: nnU-Net's ids are 1-999")
    if not dataset_name or not all(ch.isalnum() or ch in "-_" for ch in dataset_name):
        raise UnlabeledError(f"dataset name {dataset_name!r}: use letters, digits, - and _")
    model = open_model_folder(teacher, folds)
    tds = model.dataset_json
    if min_agreement is not None:
        _check_min_agreement(float(min_agreement), tta, tds)
        min_agreement = float(min_agreement)
    if min_case_agreement is not None:
        _check_min_case_agreement(float(min_case_agreement), tta, len(model.folds), min_agreement, tds)
        min_case_agreement = float(min_case_agreement)
    request = Request(str(model.path.resolve()), list(model.folds), bool(tta), None,
                      str(Path(images).resolve()), dataset_id, dataset_name, min_agreement, min_case_agreement)
    real_cases: dict[str, tuple[list[str], str]] = {}
    labelled_raw, source_splits = None, None
    if labelled is not None:
        labelled_raw = _dataset_folder(raw_root, str(labelled))
        if labelled_raw is None:
            raise UnlabeledError(f"labelled dataset {labelled!r} not found in nnUNet_raw ({raw_root})")
        request.labelled_dataset = labelled_raw.name
        ds = json.loads((labelled_raw / "dataset.json").read_text())
        problems = [f"{key}: teacher {tds.get(key)!r} vs labelled dataset {ds.get(key)!r}"
                    for key in ("labels", "channel_names", "file_ending", "regions_class_order")
                    if tds.get(key) != ds.get(key)]
        if problems:
            raise UnlabeledError(f"the teacher {model.path} was trained on other data than {labelled_raw.name}:\n  - "
                                 + "\n  - ".join(problems))
        from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

        real_cases = {k: (v["images"], v["label"])
                      for k, v in get_filenames_of_train_images_and_targets(str(labelled_raw), ds).items()}
        splits = pre_root / labelled_raw.name / "splits_final.json"
        if splits.is_file():
            source_splits = json.loads(splits.read_text())
    from nnunetv2_recokd.deploy.inputfolder import check_input_folder

    ending = tds["file_ending"]
    foreign = sorted(p.name for p in Path(images).glob("*") if p.is_file() and not p.name.startswith(".")
                     and not p.name.endswith(ending)) if Path(images).is_dir() else []
    if foreign:
        raise UnlabeledError(f"unlabeled images: {len(foreign)} file(s) in {images} do not end with {ending}, the "
                             f"teacher's file ending: {', '.join(foreign[:5])}; convert them (nnU-Net reads one "
                             f"format per dataset) or move them out")
    try:
        unlabeled = {Path(files[0]).name[:-len(ending) - 5]: files
                     for files in check_input_folder(images, tds)}
    except DeployError as e:
        raise UnlabeledError(f"unlabeled images: {e}") from None
    if labelled_raw is not None:
        _refuse_evaluation_images(labelled_raw, [f for files in unlabeled.values() for f in files])
    clash = sorted(set(unlabeled) & set(real_cases))
    if clash:
        raise UnlabeledError(f"{len(clash)} unlabeled case name(s) are labelled cases of {request.labelled_dataset} "
                             f"too ({', '.join(clash[:5])}); rename the unlabeled files (each case needs its own name)")
    inputs = Inputs(request, model, labelled_raw, real_cases, unlabeled, source_splits, raw_root, pre_root)
    for root in (raw_root, pre_root):
        for folder in _taken_by(root, dataset_id):
            if _own_request(folder) != request.as_dict():
                raise UnlabeledError(f"dataset id {dataset_id} is taken: {folder} exists. Choose another id, or "
                                     f"remove that dataset first")
    for root in (raw_root, pre_root):
        staged = _own_request(inputs.staging(root))
        if staged is not None and staged != request.as_dict():
            raise UnlabeledError(f"{inputs.staging(root)} holds an interrupted run with other inputs ({staged}); "
                                 f"rerun that command to finish it, or remove the folder")
    return inputs


def _refuse_evaluation_images(labelled_raw: Path, unlabeled_files: Sequence[str]) -> None:
    """Refuse unlabeled images that are images of the labelled dataset (imagesTr: its training and validation cases;
    imagesTs: its test cases): the same file (links resolved) or the same bytes under another name. A student
    trained on the teacher's label of its own evaluation scan would be scored on what it was taught.

    Raises:
        UnlabeledError: naming each such image and the labelled dataset's file it is.
    """
    known: dict[Path, Path] = {}  # resolved path -> the labelled dataset's file
    by_size: dict[int, list[Path]] = {}
    for sub in ("imagesTr", "imagesTs"):
        folder = labelled_raw / sub
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.is_file():
                known[f.resolve()] = f
                by_size.setdefault(f.stat().st_size, []).append(f)
    found = []
    for name in unlabeled_files:
        path = Path(name)
        same = known.get(path.resolve())
        if same is None:
            same = next((f for f in by_size.get(path.stat().st_size, []) if _same_bytes(path, f)), None)
        if same is not None:
            found.append(f"{path.name} is {same.parent.name}/{same.name}")
    if found:
        raise UnlabeledError(f"{len(found)} unlabeled image(s) are images of the labelled dataset "
                             f"{labelled_raw.name} ({'; '.join(found[:5])}{'; ...' if len(found) > 5 else ''}): the "
                             f"student would learn the teacher's labels of scans it is evaluated on. Remove them from "
                             f"-i; unlabeled scans must be scans no model is scored on")


def _same_bytes(a: Path, b: Path, chunk: int = 1 << 20) -> bool:
    """True when two files of equal size hold the same bytes."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def _check_min_case_agreement(threshold: float, tta: bool, n_folds: int, min_agreement: Optional[float],
                              teacher_dataset: dict) -> None:
    if not 0 < threshold <= 1:
        raise UnlabeledError(f"--min-case-agreement {threshold:g}: give the mean pairwise Dice the teacher's folds (or "
                             f"mirrorings) must reach on a case for every foreground label, in (0, 1] (e.g. 0.9)")
    if n_folds < 2 and not tta:
        raise UnlabeledError("--min-case-agreement compares the teacher's folds, or with one fold its mirrorings: this "
                             "teacher labels with one fold and no mirroring; leave mirroring on or give several folds")
    if min_agreement is not None:
        raise UnlabeledError("--min-case-agreement and --min-agreement cannot be combined yet; choose one (per case: "
                             "drop cases the teacher is unsure of; per voxel: ignore its unsure voxels)")
    if teacher_dataset.get("regions_class_order") is not None:
        raise UnlabeledError("--min-case-agreement is for label maps; this teacher predicts regions "
                             "(regions_class_order)")


def _check_min_agreement(min_agreement: float, tta: bool, teacher_dataset: dict) -> None:
    if not 0 < min_agreement <= 1:
        raise UnlabeledError(f"--min-agreement {min_agreement:g}: give the fraction of the teacher's mirrorings that "
                             f"must agree with its label, in (0, 1] (e.g. 0.75: 6 of 8)")
    if not tta:
        raise UnlabeledError("--min-agreement compares the labels of the teacher's mirrorings: leave mirroring on "
                             "(drop --disable_tta)")
    if teacher_dataset.get("regions_class_order") is not None:
        raise UnlabeledError("--min-agreement is for label maps; this teacher predicts regions "
                             "(regions_class_order), whose ignore label nnU-Net keeps in another form")


def ignore_label_of(dataset_json: dict) -> int:
    """The dataset's ignore label, or the value nnU-Net requires for a new one (the highest label + 1)."""
    labels = dataset_json["labels"]
    if "ignore" in labels:
        return int(labels["ignore"])
    return max(int(v) for v in labels.values()) + 1


# ----------------------------------------------------------------------------------------------- labelling
def label_cases(inputs: Inputs, output: Path, device: str = "cpu", log: Callable[[str], None] = print,
                num_threads: Optional[int] = None, part_id: int = 0, num_parts: int = 1,
                runtime: Optional[str] = None) -> int:
    """The teacher's segmentation of the unlabeled cases of one part (every case with one part; part i of N: the
    sorted cases i, i + N, ...) into `output` (nnU-Net's prediction: every requested fold, mirroring unless
    disabled). Cases whose label exists are skipped (a rerun resumes); returns how many were labelled now.

    runtime: the teacher's runtime on the CPU ("openvino", "torch"; None: OpenVINO where installed, else PyTorch).
    With several parts each labels into its own folder beside `output` (nnU-Net's predictor clears its staging folder
    when it starts) and moves every finished label into `output`, one complete file at a time."""
    from nnunetv2_recokd.deploy.predictor import build_predictor, predict_cases

    ending = inputs.teacher.dataset_json["file_ending"]
    share = sorted(inputs.unlabeled_cases)[part_id::num_parts]
    target = output if num_parts == 1 else output.parent / f".{output.name}.part{part_id}of{num_parts}"
    if target != output:
        _move_labels(target, output, ending)  # finished labels of an interrupted run of this part
    todo = [inputs.unlabeled_cases[case] for case in share if not (output / f"{case}{ending}").is_file()]
    done = len(share) - len(todo)
    what = "unlabeled cases" if num_parts == 1 else f"cases of part {part_id} of {num_parts}"
    if not todo:
        log(f"all {len(share)} {what} are labelled already")
        return 0
    log(f"the teacher labels {len(todo)} case(s)" + (f" of part {part_id} of {num_parts}" if num_parts > 1 else "")
        + (f" ({done} done before)" if done else "")
        + f": {inputs.teacher.describe()}, mirroring {'on' if inputs.request.tta else 'off'}, {device}")
    if device == "cpu":
        from nnunetv2_recokd.deploy.runtime import require_runtime

        if runtime is None:
            try:  # OpenVINO runs nnU-Net networks several times faster than PyTorch on a CPU (README, deployment)
                require_runtime("openvino")
                runtime = "openvino"
            except DeployError:
                runtime = "torch"
        predictor = build_predictor(inputs.teacher, runtime, inputs.request.tta, 0.5, threads=num_threads)
    else:
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's note on CPU devices, printed for any CPU run
            predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=inputs.request.tta,
                                        perform_everything_on_device=True, device=torch.device(device),
                                        allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(inputs.teacher.path), inputs.teacher.folds,
                                                       inputs.teacher.checkpoint_name)
    counter = iter(range(done + 1, len(share) + 1))
    hooks = {}
    if inputs.request.min_case_agreement is not None:
        hooks = _case_agreement_hooks(predictor, output, log)
    t = inputs.request.min_agreement
    if t is not None:
        from nnunetv2_recokd.agreement import mirrorings, predict_with_agreement, write_label_with_ignore

        ignore = ignore_label_of(inputs.teacher.dataset_json)
        votes = len(mirrorings(predictor.allowed_mirroring_axes))  # check_inputs: mirroring is on
        log(f"voxels where fewer than {t:g} of the teacher's {votes} mirrorings agree with its label get the ignore "
            f"label {ignore}")

        def export(prediction, properties: dict, output_truncated: str) -> str:
            n = write_label_with_ignore(*prediction, t, ignore, properties, predictor, output_truncated)
            return (f"{n['ignored']} voxels ignored, {n['ignored_foreground']} of the {n['foreground']} teacher "
                    f"foreground voxels")
        hooks = {"predict": lambda data: predict_with_agreement(predictor, data), "export": export}
    target.mkdir(parents=True, exist_ok=True)
    predict_cases(predictor, todo, target, overwrite=False,
                  log=lambda m: log(f"[{next(counter)}/{len(share)}] {m}"), **hooks)
    for name in ("dataset.json", "plans.json"):  # predict_cases describes its output folder; labelsTr holds labels
        (target / name).unlink(missing_ok=True)
    if target != output:
        _move_labels(target, output, ending)
        shutil.rmtree(target, ignore_errors=True)
    return len(todo)


CASE_AGREEMENT = "case_agreement"  # beside labelsTr: <case>.json, the teacher's members' agreement on each case


def _case_agreement_hooks(predictor, output: Path, log: Callable[[str], None]) -> dict:
    """predict_cases hooks that label with the teacher's members one at a time (agreement.predict_with_members) and
    write each case's agreement (mean pairwise Dice per foreground label) beside labelsTr, before its label."""
    from nnunetv2.inference.export_prediction import export_prediction_from_logits

    from nnunetv2_recokd.agreement import pairwise_dice, predict_with_members

    folder = output.parent / CASE_AGREEMENT
    folder.mkdir(parents=True, exist_ok=True)
    foreground = predictor.plans_manager.get_label_manager(predictor.dataset_json).foreground_labels

    def export(prediction, properties: dict, output_truncated: str) -> str:
        logits, votes, members = prediction
        agreement = pairwise_dice(votes, foreground)
        case = Path(output_truncated).name
        tmp = folder / f".{case}.json.tmp"
        tmp.write_text(json.dumps({"members": members, "dice": {str(k): v for k, v in agreement.items()}}))
        os.replace(tmp, folder / f"{case}.json")
        export_prediction_from_logits(logits, properties, predictor.configuration_manager, predictor.plans_manager,
                                      predictor.dataset_json, output_truncated, False)
        return f"agreement of its {members}: " + ", ".join(f"{k}: {v:.3f}" for k, v in agreement.items())

    return {"predict": lambda data: predict_with_members(predictor, data), "export": export}


def case_agreements(raw: Path, cases: Sequence[str]) -> dict[str, dict[str, float]]:
    """{case: {label: mean pairwise Dice}} of the teacher-labelled cases, from the files beside labelsTr.

    Raises:
        RuntimeError: a labelled case without its agreement (labelled by an older version of this command).
    """
    out, missing = {}, []
    for case in cases:
        path = raw / CASE_AGREEMENT / f"{case}.json"
        if path.is_file():
            out[case] = json.loads(path.read_text())["dice"]
        else:
            missing.append(case)
    if missing:
        raise RuntimeError(f"{len(missing)} teacher-labelled case(s) have no recorded agreement "
                           f"({', '.join(missing[:3])}); remove their labels from {raw / 'labelsTr'} and rerun to "
                           f"label them again")
    return out


def _move_labels(source: Path, output: Path, ending: str) -> None:
    """Move the finished label files of a part's folder into `output` (each rename is atomic)."""
    if not source.is_dir():
        return
    for f in sorted(source.glob(f"*{ending}")):
        if f.is_file():
            os.replace(f, output / f.name)


# ----------------------------------------------------------------------------------------------- the dataset
def _link(source: Union[str, Path], target: Path) -> None:
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(Path(source).resolve())


def derived_dataset_json(inputs: Inputs, dropped: Optional[dict] = None) -> dict:
    tds = inputs.teacher.dataset_json
    keep = {k: tds[k] for k in ("channel_names", "labels", "file_ending", "regions_class_order",
                                "overwrite_image_reader_writer") if k in tds}
    if inputs.request.min_agreement is not None:  # nnU-Net's ignore label marks where the teacher's mirrorings disagree
        keep["labels"] = {**tds["labels"], "ignore": ignore_label_of(tds)}
    return {**keep, "numTraining": len(inputs.real_cases) + len(inputs.unlabeled_cases),
            "name": inputs.request.dataset_name,
            "description": f"{len(inputs.real_cases)} labelled case(s)"
                           + (f" of {inputs.request.labelled_dataset}" if inputs.request.labelled_dataset else "")
                           + f" and {len(inputs.unlabeled_cases)} case(s) labelled by the teacher "
                             f"{inputs.request.teacher} (nnunetv2_recokd add-unlabeled)",
            DATASET_KEY: {"teacher": inputs.request.teacher, "teacher_folds": inputs.request.folds,
                          "tta": inputs.request.tta, "min_agreement": inputs.request.min_agreement,
                          "labelled_dataset": inputs.request.labelled_dataset,
                          "real_labelled": len(inputs.real_cases),
                          "teacher_labelled": sorted(inputs.unlabeled_cases),
                          **({} if dropped is None else {
                              "min_case_agreement": inputs.request.min_case_agreement,
                              "dropped_cases": dropped})}}


def add_unlabeled(inputs: Inputs, device: str = "cpu", num_processes: int = 2, log: Callable[[str], None] = print,
                  num_threads: Optional[int] = None, part_id: int = 0, num_parts: int = 1) -> Optional[Path]:
    """Label, assemble and preprocess the derived dataset (see the module docstring); returns its raw folder, or None
    when this part is done and other parts' cases are still unlabeled (or another part is assembling the dataset).
    A rerun of the same request resumes where it stopped.

    Sharding (nnUNetv2_predict's -num_parts / -part_id): part i labels the sorted unlabeled cases i, i + N, ...;
    parts may run at once on one nnUNet_raw (a SLURM array, several GPUs or machines). The part that finds every case
    labelled assembles and preprocesses the dataset, once: a lock (released by the system if its holder dies) keeps
    two parts from doing it together.
    """
    if not 0 <= part_id < num_parts:
        raise UnlabeledError(f"-part_id {part_id} with -num_parts {num_parts}: part ids run from 0 to num_parts - 1")
    raw_final, pre_final = inputs.raw_folder, inputs.preprocessed_folder
    if (raw_final / "dataset.json").is_file() and (pre_final / "splits_final.json").is_file():
        log(f"{raw_final} exists already (made by the same command): nothing to do")
        return raw_final
    raw, pre = inputs.staging(inputs.raw_root), inputs.staging(inputs.preprocessed_root)
    request = json.dumps(inputs.request.as_dict(), indent=1)
    if (raw_final / "dataset.json").is_file():
        with _assembly_lock(inputs) as held:
            if not held:
                log("another run is preprocessing this dataset now: nothing to do here")
                return None
            if not (pre_final / "splits_final.json").is_file():
                _preprocess_again(inputs, request, num_processes, log)
        return raw_final
    for folder in (raw, pre):
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / REQUEST_FILE, request)
    if not pre_final.exists():
        (raw / "imagesTr").mkdir(exist_ok=True)
        (raw / "labelsTr").mkdir(exist_ok=True)
        label_cases(inputs, raw / "labelsTr", device, log, num_threads, part_id, num_parts)
    with _assembly_lock(inputs) as held:
        if not held:
            log(f"part {part_id} of {num_parts}: done; another part is assembling the dataset now")
            return None
        if (raw_final / "dataset.json").is_file():  # another part assembled it while this one labelled
            log(f"{raw_final} was assembled by another part: nothing to do")
            return raw_final
        if not pre_final.exists():
            ending = inputs.teacher.dataset_json["file_ending"]
            missing = [c for c in sorted(inputs.unlabeled_cases) if not (raw / "labelsTr" / f"{c}{ending}").is_file()]
            if missing:
                log(f"part {part_id} of {num_parts}: done; {len(missing)} case(s) of other parts are not labelled yet "
                    f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): the part that labels the last "
                    f"one assembles and preprocesses the dataset (or rerun any part once they are all labelled)")
                return None
            kept, dropped = _drop_disagreed_cases(inputs, raw, ending, log)
            for case, (images, label) in inputs.real_cases.items():
                for image in images:
                    _link(image, raw / "imagesTr" / Path(image).name)
                _link(label, raw / "labelsTr" / f"{case}{ending}")
            for files in kept.unlabeled_cases.values():
                for image in files:
                    _link(image, raw / "imagesTr" / Path(image).name)
            dataset_json = derived_dataset_json(kept, dropped=dropped)
            (raw / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
            _preprocess(kept, raw, pre, dataset_json, num_processes, log)
            os.replace(pre, pre_final)
        os.replace(raw, raw_final)
        _remove_staging(inputs)
    log(f"{raw_final}: {len(inputs.real_cases)} labelled + {len(inputs.unlabeled_cases)} teacher-labelled cases; "
        f"preprocessed with the teacher's plans in {pre_final}")
    return raw_final


DROPPED_LABELS = "dropped_labelsTr"  # beside labelsTr: the teacher's labels of the cases --min-case-agreement dropped


def _drop_disagreed_cases(inputs: Inputs, raw: Path, ending: str, log: Callable[[str], None]
                          ) -> tuple[Inputs, Optional[dict]]:
    """The inputs without the teacher-labelled cases its members agree on less than min_case_agreement for some
    foreground label, and {case: agreement} of those dropped (None without --min-case-agreement); their labels move
    to dropped_labelsTr (kept for a look, out of nnU-Net's way). Logs each."""
    threshold = inputs.request.min_case_agreement
    if threshold is None:
        return inputs, None
    agreements = case_agreements(raw, sorted(inputs.unlabeled_cases))
    dropped = {c: a for c, a in agreements.items() if min(a.values(), default=1.0) < threshold}
    (raw / DROPPED_LABELS).mkdir(exist_ok=True)
    for case, agreement in sorted(dropped.items()):
        os.replace(raw / "labelsTr" / f"{case}{ending}", raw / DROPPED_LABELS / f"{case}{ending}")
        log(f"dropped {case}: the teacher's members agree on it with mean pairwise Dice "
            + ", ".join(f"{k}: {v:.3f}" for k, v in agreement.items()) + f" (below {threshold:g})")
    log(f"--min-case-agreement {threshold:g}: {len(agreements) - len(dropped)} of {len(agreements)} teacher-labelled "
        f"cases kept, {len(dropped)} dropped")
    kept = dataclasses.replace(inputs, unlabeled_cases={c: f for c, f in inputs.unlabeled_cases.items()
                                                        if c not in dropped})
    return kept, dropped


def _preprocess_again(inputs: Inputs, request: str, num_processes: int, log: Callable[[str], None]) -> None:
    """The raw dataset is complete (check_inputs found it made by the same request) but its preprocessed folder is
    gone, or this is another nnUNet_preprocessed: preprocess it again from its own labels, never relabel."""
    raw_final, pre_final = inputs.raw_folder, inputs.preprocessed_folder
    pre = inputs.staging(inputs.preprocessed_root)
    log(f"{raw_final} exists with the teacher's labels; {pre_final} does not: preprocessing it again "
        f"(the labels are kept)")
    pre.mkdir(parents=True, exist_ok=True)
    _write_atomic(pre / REQUEST_FILE, request)
    _preprocess(inputs, raw_final, pre, json.loads((raw_final / "dataset.json").read_text()), num_processes, log)
    os.replace(pre, pre_final)
    _remove_staging(inputs)


@contextlib.contextmanager
def _assembly_lock(inputs: Inputs):
    """An exclusive, non-blocking lock on this dataset's assembly (flock: the system releases it when its holder
    exits or is killed); yields whether this process holds it."""
    import fcntl

    lock = inputs.raw_root / STAGING / f"{inputs.request.folder_name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            lock.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)
            try:
                lock.parent.rmdir()  # the staging root, once nothing else is staged
            except OSError:
                pass


def _write_atomic(path: Path, text: str) -> None:
    """Write a file that concurrent readers see complete or not at all (parts write the same request at once)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _remove_staging(inputs: Inputs) -> None:
    """Remove what is left of this dataset's staging (a raw staging folder that holds nothing but the request after
    a re-preprocessing) and the staging roots when empty."""
    raw = inputs.staging(inputs.raw_root)
    if raw.is_dir() and not any(p.is_file() and p.name != REQUEST_FILE for p in raw.rglob("*")):
        shutil.rmtree(raw)
    for root in (inputs.raw_root, inputs.preprocessed_root):
        try:
            (root / STAGING).rmdir()
        except OSError:
            pass  # other staged datasets, or labels of an interrupted run kept for its rerun


def _preprocess(inputs: Inputs, raw: Path, pre: Path, dataset_json: dict, num_processes: int,
                log: Callable[[str], None]) -> None:
    """nnU-Net's own preprocessing (nnUNetv2_preprocess) of the staged dataset with the teacher's plans."""
    plans = json.loads((inputs.teacher.path / "plans.json").read_text())
    plans["dataset_name"] = inputs.request.folder_name
    plans_name = plans.get("plans_name", "nnUNetPlans")
    (pre / f"{plans_name}.json").write_text(json.dumps(plans, indent=1))
    (pre / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    fingerprint = inputs.teacher.path / "dataset_fingerprint.json"
    if fingerprint.is_file():  # nnU-Net copies it into every model folder; the teacher's describes the same data
        shutil.copy(fingerprint, pre / "dataset_fingerprint.json")
    splits = derived_splits(list(inputs.real_cases), list(inputs.unlabeled_cases), inputs.source_splits)
    (pre / "splits_final.json").write_text(json.dumps(splits, indent=1))
    log(f"preprocessing {len(inputs.real_cases) + len(inputs.unlabeled_cases)} cases with the teacher's plans "
        f"({plans_name}, configuration {inputs.teacher.configuration})")
    env = {**os.environ, "nnUNet_raw": str(raw.parent), "nnUNet_preprocessed": str(pre.parent)}
    command = [shutil.which("nnUNetv2_preprocess") or "nnUNetv2_preprocess", "-d", str(inputs.request.dataset_id),
               "-plans_name", plans_name, "-c", inputs.teacher.configuration, "-np", str(num_processes)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nnUNetv2_preprocess failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-2000:]}")
