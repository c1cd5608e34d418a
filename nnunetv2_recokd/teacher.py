"""Find, load, check and freeze the teacher: an ordinary nnU-Net model folder trained before.

Where the teacher comes from, first match wins:
1. ``RECOKD_TEACHER`` (environment): a model folder, a fold folder or a checkpoint file;
2. the ``teacher`` setting (RECOKD_CONFIG or trainer_configs/), same forms;
3. nnU-Net's conventional location for the same dataset, configuration and fold:
   ``$nnUNet_results/<Dataset>/<teacher_trainer>__<teacher_plans>__<configuration>/fold_<fold>/<teacher_checkpoint>``.

The teacher network is rebuilt from ITS OWN plans.json and checkpoint (so a ResEnc teacher can teach a
plain student); what must match the student is the data it sees and predicts: dataset, labels, input
channels, preprocessing (spacing, normalisation, resampling, transpose, preprocessor, CT statistics) and the
strides that put features and deep-supervision outputs at the same resolutions. The preprocessed data identifier
is not compared: it names a folder, and two plans presets write the same data under different names (nnU-Net's ResEnc
planners name their 3d_lowres data after their own plans, e.g. nnUNetResEncUNetMPlans_3d_lowres next to
nnUNetPlans_3d_lowres, and -overwrite_plans_name renames every configuration's).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from nnunetv2_recokd.config import TEACHER_ENV


class TeacherError(RuntimeError):
    """The teacher is missing, unreadable or does not fit the student's data."""


@dataclasses.dataclass
class TeacherLocation:
    checkpoint: Path
    model_folder: Path
    source: str  # where the path came from, for the log


class FrozenTeacher(nn.Module):
    """A network that is always in eval mode, never has gradients and never records autograd history.

    ``train()`` cannot switch it back to training mode (dropout, instance-norm statistics stay fixed).
    Forward runs under torch.no_grad() rather than inference_mode because its outputs feed losses.
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self.network.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    def forward(self, x: torch.Tensor):
        with torch.no_grad():
            return self.network(x)

    def encode(self, x: torch.Tensor):
        """Encoder only (stage hooks still fire): all that encoder-feature terms need, at a fraction of the cost
        (the decoder and its deep-supervision heads are most of a U-Net's FLOPs)."""
        with torch.no_grad():
            return self.network.encoder(x)


def default_teacher_folder(results_root: Union[str, Path], dataset_name: str, configuration: str,
                           teacher_trainer: str, teacher_plans: str) -> Path:
    return Path(results_root) / dataset_name / f"{teacher_trainer}__{teacher_plans}__{configuration}"


def _fold_folder_name(fold: Union[int, str]) -> str:
    return f"fold_{fold}"


def locate_teacher(path: Optional[str], source: str, fold: Union[int, str], checkpoint_name: str) -> TeacherLocation:
    """Turn a model folder, fold folder or checkpoint file into (checkpoint, model folder)."""
    p = Path(path).expanduser()
    if p.is_file():
        checkpoint = p
    elif (p / checkpoint_name).is_file() or p.name.startswith("fold_"):  # a fold folder
        checkpoint = p / checkpoint_name
    else:  # a model folder
        checkpoint = p / _fold_folder_name(fold) / checkpoint_name
    model_folder = checkpoint.parent.parent if checkpoint.parent.name.startswith("fold_") else checkpoint.parent
    if not checkpoint.is_file():
        raise TeacherError(
            f"No teacher checkpoint found: looked for {checkpoint} (teacher from {source}).\n"
            f"Train the teacher first (nnUNetv2_train <dataset> <configuration> {fold}) or point "
            f"{TEACHER_ENV} at a model folder, a fold folder or a checkpoint file, e.g.\n"
            f"  export {TEACHER_ENV}=$nnUNet_results/<Dataset>/nnUNetTrainer__nnUNetPlans__3d_fullres")
    for name in ("plans.json", "dataset.json"):
        if not (model_folder / name).is_file():
            raise TeacherError(f"Teacher model folder {model_folder} has no {name}; a teacher must be an nnU-Net "
                               f"model folder (plans.json, dataset.json, fold_X/{checkpoint.name})")
    return TeacherLocation(checkpoint=checkpoint, model_folder=model_folder, source=source)


def resolve_teacher(setting: Optional[str], dataset_name: str, configuration: str, fold: Union[int, str],
                    teacher_trainer: str, teacher_plans: str, checkpoint_name: str,
                    environ: Optional[Mapping[str, str]] = None) -> TeacherLocation:
    """Where the teacher is: RECOKD_TEACHER, else the `teacher` setting, else nnU-Net's conventional folder."""
    environ = os.environ if environ is None else environ
    if environ.get(TEACHER_ENV):
        return locate_teacher(environ[TEACHER_ENV], f"${TEACHER_ENV}", fold, checkpoint_name)
    if setting:
        return locate_teacher(setting, "the 'teacher' setting", fold, checkpoint_name)
    results = environ.get("nnUNet_results")
    if not results:
        raise TeacherError(f"nnUNet_results is not set, so the default teacher location is unknown; set "
                           f"nnUNet_results or {TEACHER_ENV}")
    folder = default_teacher_folder(results, dataset_name, configuration, teacher_trainer, teacher_plans)
    return locate_teacher(str(folder), "nnU-Net's default location", fold, checkpoint_name)


def resolve_teachers(setting: Union[str, list[str], None], folds: Union[str, list[int], None], dataset_name: str,
                     configuration: str, fold: Union[int, str], teacher_trainer: str, teacher_plans: str,
                     checkpoint_name: str, environ: Optional[Mapping[str, str]] = None,
                     dataset_teacher: Optional[str] = None) -> list[TeacherLocation]:
    """Every teacher, in order: RECOKD_TEACHER (several paths separated by os.pathsep), else the `teacher` setting
    (a path or a list), else the teacher that labelled a derived dataset (`dataset_teacher`, from its dataset.json:
    nnunetv2_recokd add-unlabeled), else nnU-Net's conventional folder. `folds` (the teacher_folds setting) turns
    each entry that is a model folder into one teacher per fold: "all" takes every fold_<n> folder holding the
    checkpoint, a list names them; None takes the student's fold, as for one teacher.

    Raises:
        TeacherError: listing every entry that could not be found (all at once), or the same checkpoint twice.
    """
    environ = os.environ if environ is None else environ
    if environ.get(TEACHER_ENV):
        entries = [(p, f"${TEACHER_ENV}") for p in environ[TEACHER_ENV].split(os.pathsep) if p]
    elif setting:
        entries = [(p, "the 'teacher' setting") for p in ([setting] if isinstance(setting, str) else setting)]
    elif dataset_teacher:
        entries = [(dataset_teacher, "the dataset's dataset.json (the teacher that labelled its unlabeled cases)")]
    else:
        results = environ.get("nnUNet_results")
        if not results:
            raise TeacherError(f"nnUNet_results is not set, so the default teacher location is unknown; set "
                               f"nnUNet_results or {TEACHER_ENV}")
        folder = default_teacher_folder(results, dataset_name, configuration, teacher_trainer, teacher_plans)
        entries = [(str(folder), "nnU-Net's default location")]
    locations, problems = [], []
    for path, source in entries:
        for entry_fold in _entry_folds(Path(path).expanduser(), folds, fold, checkpoint_name, problems, source):
            try:
                locations.append(locate_teacher(path, source, entry_fold, checkpoint_name))
            except TeacherError as e:
                problems.append(str(e))
    seen: dict[str, str] = {}
    for location in locations:
        key = os.path.realpath(location.checkpoint)
        if key in seen:
            problems.append(f"teacher {location.checkpoint} is listed twice; each teacher must be listed once")
        seen[key] = str(location.checkpoint)
    if problems:
        raise TeacherError(problems[0] if len(problems) == 1 else f"{len(problems)} teachers cannot be used:\n- "
                           + "\n- ".join(p.replace("\n", "\n  ") for p in problems))
    return locations


def _entry_folds(path: Path, folds: Union[str, list[int], None], student_fold: Union[int, str],
                 checkpoint_name: str, problems: list[str], source: str) -> list[Union[int, str]]:
    """The folds one teacher entry stands for: only a model folder expands to several."""
    if folds is None or path.is_file() or (path / checkpoint_name).is_file() or path.name.startswith("fold_"):
        return [student_fold]
    if isinstance(folds, list):
        return list(folds)
    found = sorted(int(p.name[5:]) for p in path.glob("fold_*") if p.name[5:].isdigit()
                   and (p / checkpoint_name).is_file())
    if not found:
        problems.append(f"teacher_folds is \"all\" but {path} (from {source}) holds no fold_<n>/{checkpoint_name}; "
                        f"train the teacher's folds first (nnUNetv2_train <dataset> <configuration> <fold>)")
    return found


def read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise TeacherError(f"Teacher checkpoint {path} is unreadable ({type(e).__name__}: {e}). Use the "
                           f"checkpoint_final.pth that nnUNetv2_train wrote.") from e
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise TeacherError(f"Teacher checkpoint {path} is not an nnU-Net checkpoint (no 'network_weights').")
    return checkpoint


def check_compatible(teacher_plans: dict, teacher_dataset: dict, teacher_cfg: str,
                     student_plans: dict, student_dataset: dict, student_cfg: str) -> None:
    """Raise TeacherError naming every way the teacher's data differs from the student's."""
    t_pm, s_pm = PlansManager(teacher_plans), PlansManager(student_plans)
    t, s = t_pm.get_configuration(teacher_cfg), s_pm.get_configuration(student_cfg)
    problems = []

    def differ(what: str, a: Any, b: Any) -> None:
        if a != b:
            problems.append(f"{what}: teacher {a!r} vs student {b!r}")

    # the dataset's name is not compared: a teacher trained on another copy of the data (elsewhere, or the dataset a
    # derived one of add-unlabeled came from) teaches as well when labels, channels and preprocessing agree
    # nnU-Net's ignore label names no output channel: a student whose dataset marks unsure voxels with it (e.g.
    # add-unlabeled --min-agreement) learns the same classes as a teacher without one
    differ("labels", _without_ignore(teacher_dataset.get("labels")), _without_ignore(student_dataset.get("labels")))
    differ("regions_class_order", teacher_dataset.get("regions_class_order"),
           student_dataset.get("regions_class_order"))
    t_channels = teacher_dataset.get("channel_names", teacher_dataset.get("modality"))
    s_channels = student_dataset.get("channel_names", student_dataset.get("modality"))
    differ("input channels", t_channels, s_channels)
    differ("input channels as nnU-Net counts them (determine_num_input_channels; a cascade stage adds the "
           "previous stage's segmentation)", determine_num_input_channels(t_pm, t, teacher_dataset),
           determine_num_input_channels(s_pm, s, student_dataset))
    # what nnU-Net's preprocessing of a case depends on (not the data identifier: module docstring)
    differ("spacing", [float(x) for x in t.spacing], [float(x) for x in s.spacing])
    differ("normalisation", t.normalization_schemes, s.normalization_schemes)
    differ("use_mask_for_norm", t.use_mask_for_norm, s.use_mask_for_norm)
    differ("transpose_forward", t_pm.transpose_forward, s_pm.transpose_forward)
    differ("preprocessor", t.preprocessor_name, s.preprocessor_name)
    for key in _RESAMPLING:
        differ(key, _as_json(t.configuration.get(key)), _as_json(s.configuration.get(key)))
    differ("strides (pool_op_kernel_sizes)", [list(x) for x in t.pool_op_kernel_sizes],
           [list(x) for x in s.pool_op_kernel_sizes])
    problems += _ct_statistics_differences(teacher_plans, student_plans, s.normalization_schemes)
    if problems:
        raise TeacherError("The teacher was trained on different data than this student:\n  - "
                           + "\n  - ".join(problems)
                           + "\nUse a teacher trained on the same dataset with the same preprocessing "
                             f"(set {TEACHER_ENV} to its model folder).")


def _without_ignore(labels: Optional[dict]) -> Optional[dict]:
    return None if labels is None else {k: v for k, v in labels.items() if k != "ignore"}


_CT_STATISTICS = ("mean", "std", "percentile_00_5", "percentile_99_5")
# resampling of images (what the network reads) and of segmentations (what the teacher was trained to predict)
_RESAMPLING = ("resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_seg", "resampling_fn_seg_kwargs")


def _as_json(value: Any) -> Any:
    """Tuples and lists compare equal (plans written by nnU-Net's planner hold tuples before saving, lists after)."""
    return json.loads(json.dumps(value))


def _ct_statistics_differences(teacher_plans: dict, student_plans: dict, schemes: list[str]) -> list[str]:
    """CT normalisation clips and scales with the dataset's foreground intensity statistics: a teacher planned
    on other statistics sees other input values for the same scan."""
    problems = []
    t_props = teacher_plans.get("foreground_intensity_properties_per_channel") or {}
    s_props = student_plans.get("foreground_intensity_properties_per_channel") or {}
    for channel, scheme in enumerate(schemes):
        if scheme != "CTNormalization":
            continue
        t, s = t_props.get(str(channel), {}), s_props.get(str(channel), {})
        for key in _CT_STATISTICS:
            a, b = t.get(key), s.get(key)
            if a is None or b is None or not math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-6):
                problems.append(f"CT normalisation statistic {key} of channel {channel}: teacher {a!r} vs "
                                f"student {b!r}")
    return problems


def _teacher_builder(trainer_name: str):
    """build_network_architecture of the teacher's trainer class (nnU-Net's lookup), else nnU-Net's default."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    if trainer_name in ("nnUNetTrainer", None):
        return nnUNetTrainer.build_network_architecture, None
    try:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        return recursive_find_trainer_class_by_name(trainer_name).build_network_architecture, None
    except Exception as e:  # lookup imports every trainer module; a broken optional one must not stop us
        note = (f"teacher trainer class {trainer_name} could not be looked up ({type(e).__name__}: {e}); "
                f"building the teacher with nnU-Net's default build_network_architecture from its plans")
        return nnUNetTrainer.build_network_architecture, note


@dataclasses.dataclass
class LoadedTeacher:
    network: FrozenTeacher
    location: TeacherLocation
    plans: dict
    dataset_json: dict
    configuration: str
    trainer_name: str
    notes: list[str]
    fold: Union[int, str, None] = None  # the fold it was trained on: init_args, else the fold_X folder name

    @property
    def arch_kwargs(self) -> dict:
        return PlansManager(self.plans).get_configuration(self.configuration).network_arch_init_kwargs

    def describe(self) -> str:
        n_params = sum(p.numel() for p in self.network.parameters())
        return (f"teacher {self.location.checkpoint} (from {self.location.source}; trainer {self.trainer_name}, "
                f"plans {self.plans.get('plans_name')}, configuration {self.configuration}, "
                f"{n_params / 1e6:.2f} M parameters)")


def load_teacher(location: TeacherLocation, student_plans: dict, student_dataset: dict, student_cfg: str,
                 device: torch.device) -> LoadedTeacher:
    """Build the teacher from its own plans, load its weights strictly, check it fits, freeze it."""
    teacher_plans = load_json(str(location.model_folder / "plans.json"))
    teacher_dataset = load_json(str(location.model_folder / "dataset.json"))
    checkpoint = read_checkpoint(location.checkpoint)
    configuration = (checkpoint.get("init_args") or {}).get("configuration", student_cfg)
    if configuration not in teacher_plans.get("configurations", {}):
        raise TeacherError(f"Teacher plans {location.model_folder / 'plans.json'} have no configuration "
                           f"{configuration!r}")
    check_compatible(teacher_plans, teacher_dataset, configuration, student_plans, student_dataset, student_cfg)

    plans_manager = PlansManager(teacher_plans)
    cfg_manager = plans_manager.get_configuration(configuration)
    trainer_name = checkpoint.get("trainer_name", "nnUNetTrainer")
    build, note = _teacher_builder(trainer_name)
    network = build(plans_manager, cfg_manager,
                    determine_num_input_channels(plans_manager, cfg_manager, teacher_dataset),
                    plans_manager.get_label_manager(teacher_dataset).num_segmentation_heads,
                    enable_deep_supervision=True)
    weights = {k[7:] if k.startswith("module.") else k: v for k, v in checkpoint["network_weights"].items()}
    try:
        network.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise TeacherError(f"Teacher checkpoint {location.checkpoint} does not fit the network built from "
                           f"{location.model_folder / 'plans.json'}: {e}") from e
    notes = [note] if note else []
    if teacher_plans.get("dataset_name") != student_plans.get("dataset_name"):
        notes.append(f"the teacher was trained on {teacher_plans.get('dataset_name')}, this student trains on "
                     f"{student_plans.get('dataset_name')}: labels, channels and preprocessing agree")
    return LoadedTeacher(network=FrozenTeacher(network).to(device), location=location, plans=teacher_plans,
                         dataset_json=teacher_dataset, configuration=configuration, trainer_name=trainer_name,
                         notes=notes, fold=checkpoint_fold(checkpoint, location.checkpoint))


def load_teachers(locations: list[TeacherLocation], student_plans: dict, student_dataset: dict, student_cfg: str,
                  device: torch.device) -> list[LoadedTeacher]:
    """load_teacher for each location; every teacher is checked and all problems are raised at once."""
    teachers, problems = [], []
    for location in locations:
        try:
            teachers.append(load_teacher(location, student_plans, student_dataset, student_cfg, device))
        except TeacherError as e:
            problems.append(str(e) if len(locations) == 1 else f"teacher {location.checkpoint}: {e}")
    if problems:
        raise TeacherError(problems[0] if len(problems) == 1 else f"{len(problems)} of {len(locations)} teachers "
                           f"cannot be used:\n- " + "\n- ".join(p.replace("\n", "\n  ") for p in problems))
    return teachers


def checkpoint_fold(checkpoint: dict, path: Path) -> Union[int, str, None]:
    """The fold a checkpoint was trained on: nnU-Net's init_args, else its fold_X folder, else None."""
    fold = (checkpoint.get("init_args") or {}).get("fold")
    if fold is None and path.parent.name.startswith("fold_"):
        fold = path.parent.name[len("fold_"):]
    if isinstance(fold, str) and fold.isdigit():
        fold = int(fold)
    return fold


@dataclasses.dataclass
class Leakage:
    """Which of the student's validation cases the teacher was trained on."""

    cases: list[str]  # student validation cases in the teacher's training set
    n_validation: int  # the student's validation cases
    teacher_fold: Union[int, str, None, list]  # a list: the folds of several leaking teachers
    source: str  # how the teacher's held-out cases were determined

    def describe(self) -> str:
        shown = ", ".join(self.cases[:5]) + (", ..." if len(self.cases) > 5 else "")
        if isinstance(self.teacher_fold, list):  # several teachers (combined_leakage)
            return (f"the teachers of folds {', '.join(map(str, self.teacher_fold))} were trained on "
                    f"{len(self.cases)} of the student's {self.n_validation} validation cases between them ({shown}; "
                    f"teachers' held-out cases from {self.source})")
        return (f"the teacher (fold {self.teacher_fold}) was trained on {len(self.cases)} of the student's "
                f"{self.n_validation} validation cases ({shown}; teacher's held-out cases from {self.source})")

    def as_dict(self) -> dict[str, Any]:
        return {"cases": len(self.cases), "of": self.n_validation, "teacher_fold": self.teacher_fold,
                "source": self.source}


def teacher_splits(plans: dict, splits_file: Optional[Union[str, Path]] = None) -> tuple[Optional[list[dict]], str]:
    """The teacher's OWN cross-validation split (never the student's: a student's split re-drawn for another dataset
    says nothing about what the teacher was trained on): the file given (the `teacher_splits` setting), else the
    splits_final.json of the dataset the teacher's plans name, under nnUNet_preprocessed. (None, why) when neither
    exists.

    Raises:
        TeacherError: a given file that does not exist or is no list of folds.
    """
    if splits_file is not None:
        path = Path(splits_file)
        try:
            splits = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise TeacherError(f"teacher_splits {path}: not a readable splits_final.json ({e})") from None
        if not isinstance(splits, list) or not all(isinstance(f, dict) and "val" in f for f in splits):
            raise TeacherError(f"teacher_splits {path}: expected nnU-Net's splits_final.json, a list of "
                               f"{{\"train\": [...], \"val\": [...]}} folds")
        return splits, str(path)
    name = plans.get("dataset_name")
    root = os.environ.get("nnUNet_preprocessed")
    if name and root and (Path(root) / name / "splits_final.json").is_file():
        path = Path(root) / name / "splits_final.json"
        return json.loads(path.read_text()), str(path)
    return None, (f"no splits_final.json of the teacher's dataset {name} under nnUNet_preprocessed ({root}) and no "
                  f"teacher_splits setting")


def held_out_cases(fold_folder: Path, fold: Union[int, str, None], file_ending: str,
                   splits: Optional[list[dict]], splits_source: str = "splits_final.json"
                   ) -> tuple[Optional[list[str]], str]:
    """The cases a model's fold was NOT trained on, and where that comes from; (None, why) when it cannot be told.

    A fold_all model first: it was trained on every case, and nnU-Net's fold `all` validates on its own training
    cases, so its validation summary names no held-out case. Then the fold's own validation summary (the cases
    nnU-Net validated it on: exactly its held-out set), else that fold of the model's own split (`splits`, see
    teacher_splits).
    """
    if fold == "all":
        return [], "fold_all (trained on every case)"
    summary = fold_folder / "validation" / "summary.json"
    if summary.is_file():
        try:
            per_case = json.loads(summary.read_text()).get("metric_per_case", [])
            names = [Path(c["reference_file"]).name for c in per_case]
            cases = [n[:-len(file_ending)] if file_ending and n.endswith(file_ending) else n for n in names]
            return cases, str(summary)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an unreadable summary: fall back to the split
    if isinstance(fold, int) and splits is not None and 0 <= fold < len(splits):
        return list(splits[fold]["val"]), f"{splits_source}, fold {fold}"
    if fold is None:
        return None, "the teacher checkpoint names no fold"
    if splits is None:
        return None, splits_source
    return None, f"{splits_source} has no fold {fold}"


def teacher_held_out_cases(teacher: LoadedTeacher, splits: Optional[list[dict]],
                           splits_source: str = "splits_final.json") -> tuple[Optional[list[str]], str]:
    """held_out_cases of a loaded teacher (`splits`: the teacher's own split, see teacher_splits)."""
    return held_out_cases(teacher.location.checkpoint.parent, teacher.fold, teacher.dataset_json.get("file_ending", ""),
                          splits, splits_source)


def combined_leakage(leaks: list[Optional[Leakage]]) -> Optional[Leakage]:
    """One Leakage for several teachers: the union of the validation cases some teacher was trained on.
    A single leaking teacher is returned as it is (so one teacher reads exactly as before)."""
    present = [leak for leak in leaks if leak is not None]
    if len(present) <= 1:
        return present[0] if present else None
    cases = sorted(set().union(*(leak.cases for leak in present)))
    return Leakage(cases=cases, n_validation=present[0].n_validation,
                   teacher_fold=[leak.teacher_fold for leak in present],
                   source="; ".join(f"fold {leak.teacher_fold}: {leak.source}" for leak in present))


def find_leakage(teacher: LoadedTeacher, student_fold: Union[int, str], student_validation: list[str],
                 splits: Optional[list[dict]], splits_source: str = "splits_final.json",
                 same_dataset: bool = False) -> Optional[Leakage]:
    """The student's validation cases that the teacher was trained on (None: none, or the student has no
    held-out validation, fold 'all'). `splits` is the TEACHER's own split (teacher_splits). A teacher whose held-out
    cases cannot be told counts as having seen all, except the same fold of the same dataset (the same split)."""
    if student_fold == "all":
        return None
    held_out, source = teacher_held_out_cases(teacher, splits, splits_source)
    if held_out is None and same_dataset and teacher.fold == student_fold:
        return None
    seen = sorted(student_validation) if held_out is None else sorted(set(student_validation) - set(held_out))
    if not seen:
        return None
    return Leakage(cases=seen, n_validation=len(student_validation), teacher_fold=teacher.fold, source=source)


def labeller_leakage(model_folder: Union[str, Path], folds: Sequence[Union[int, str]], student_fold: Union[int, str],
                     student_validation: list[str], splits_file: Optional[Union[str, Path]] = None
                     ) -> Optional[Leakage]:
    """The student's validation cases that the teacher folds which LABELLED its dataset (add-unlabeled's
    `teacher_folds`) were trained on: the student learns from their labels, so what they saw reaches it too. The
    folds' held-out cases come from their validation summaries or the teacher's own split (teacher_splits); a fold
    whose held-out cases cannot be told counts as having seen every validation case."""
    if student_fold == "all":
        return None
    folder = Path(model_folder)
    plans = load_json(str(folder / "plans.json"))
    ending = load_json(str(folder / "dataset.json")).get("file_ending", "")
    splits, source = teacher_splits(plans, splits_file)
    leaks = []
    for fold in folds:
        fold = int(fold) if isinstance(fold, str) and fold.isdigit() else fold
        held_out, why = held_out_cases(folder / f"fold_{fold}", fold, ending, splits, source)
        seen = sorted(student_validation) if held_out is None else sorted(set(student_validation) - set(held_out))
        if seen:
            leaks.append(Leakage(cases=seen, n_validation=len(student_validation), teacher_fold=fold, source=why))
    return combined_leakage(leaks)
