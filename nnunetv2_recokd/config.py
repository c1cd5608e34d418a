"""Typed distillation settings: shipped defaults from trainer_configs/, overrides from RECOKD_CONFIG.

trainer_configs/defaults.json holds every setting; a shipped trainer changes only what makes it what it is,
in trainer_configs/<class name>.json, and inherits the rest along its class hierarchy, as nnU-Net's own
variants change one attribute of their parent. A user overrides any subset of keys with a JSON file named by
the ``RECOKD_CONFIG`` environment variable. Unknown keys and wrong types are errors that name the valid
keys, raised before any training starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin

from nnunetv2_recokd.trainer_names import PUBLIC_TRAINERS, lineage

CONFIG_ENV = "RECOKD_CONFIG"
# the forms of the logit term (losses/logits.py LOGIT_FORMS; written out here: the losses import torch)
LOGIT_FORMS = ("hinton", "class_balanced", "cwd")
TEACHER_ENV = "RECOKD_TEACHER"
DEFAULTS_FILE = "defaults.json"


class SettingsError(ValueError):
    """A settings file is missing, unreadable, has unknown keys or values of the wrong type."""


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    """All knobs of the distillation trainers. Defaults: trainer_configs/defaults.json + <TrainerName>.json."""

    # nnU-Net schedule (set before nnU-Net's initialize(), which builds the lr scheduler)
    num_epochs: int
    num_iterations_per_epoch: int
    num_val_iterations_per_epoch: int
    save_every: int
    initial_lr: float
    grad_clip: float
    # None: unseeded, as nnU-Net. An int seeds Python, NumPy and torch (rank r: seed + r) before the networks and
    # the data loaders are built; augmentation is then reproducible with in-process augmentation (nnUNet_n_proc_DA=0)
    seed: Optional[int]
    # True: on the first step of every epoch, log the gradient norm of the seg loss and of each weighted
    # distillation part w.r.t. the student and the distillation modules (one extra backward per part)
    log_term_gradients: bool
    # torch threads of a training on the CPU (None: nnU-Net's choice, every core). nnUNetv2_train -device cpu sets
    # torch to os.cpu_count() threads whatever OMP_NUM_THREADS says, so two trainings side by side oversubscribe
    # the cores (measured: a 100-iteration Hippocampus epoch 568 s instead of ~130 s alone); 1 each for two
    cpu_threads: Optional[int]
    # teacher: None = nnUNet_results/<dataset>/<teacher_trainer>__<teacher_plans>__<configuration>/fold_<fold>;
    # a path (model folder, fold folder, checkpoint) or a list of paths: several teachers, one student
    teacher: Optional[Union[str, list[str]]]
    # folds of every teacher given as a model folder (the default location included): None = the student's fold,
    # "all" = every fold_<n> folder holding the teacher checkpoint, or a list of folds; one teacher per fold
    teacher_folds: Optional[Union[str, list[int]]]
    # per-teacher weights of the distillation terms and of the ensemble's averaged probabilities (None: equal),
    # one per teacher in the order they are listed; normalised to sum 1
    teacher_weights: Optional[list[float]]
    teacher_trainer: str
    teacher_plans: Optional[str]
    teacher_checkpoint: str
    # the teacher dataset's splits_final.json, for the leakage checks when that dataset's nnUNet_preprocessed folder is
    # not on this machine (None: nnUNet_preprocessed/<the teacher's plans dataset_name>/splits_final.json)
    teacher_splits: Optional[str]
    # True: accept a teacher that was trained on some of the student's validation cases (another fold, fold_all,
    # an ensemble of folds); the student's fold validation is then marked optimistic in the log and the report
    allow_leaky_teacher: bool
    # True: `--c` may continue with another teacher than the one the checkpoint was trained with
    allow_teacher_change: bool
    # the seg loss's weight on samples whose label the teacher made (a dataset of nnunetv2_recokd add-unlabeled):
    # 1 trains on them as on real labels (plain pseudo-labels), 0 lets the teacher reach the student through the
    # distillation terms only; real labels always weigh 1
    teacher_label_weight: float
    # student: nnU-Net's own plans with features_per_stage scaled (ReCo-KD: C' = max(C_min, C * width))
    student_width: float
    student_min_channels: int
    # the dataset channels the student reads (indices or dataset.json names, in the student's order; None: all).
    # The teacher reads every channel; the student's model folder describes only its own (inputs/channels.py)
    student_channels: Optional[list[Union[int, str]]]
    # modality dropout (REACT-KD): per sample and per student channel, the probability of blanking that channel of
    # the student's input during training (each channel at exactly this rate, never all of a sample; 0: off)
    modality_dropout: float
    # simulated low-dose CT for the student (REACT-KD; Zeng et al. 2015 transmission model, inputs/lowdose.py):
    # the fraction of samples degraded (0: off), the dose fraction or range [lo, hi] (log-uniform), full-dose
    # photons per 1 mm x 1 mm reading, electronic noise (counts), water (mm) standing in for the body around a patch,
    # and the channels (null: the student's CT-normalised channels)
    lowdose_probability: float
    lowdose_dose: list[float]
    lowdose_i0: float
    lowdose_electronic_noise: float
    lowdose_extra_water_mm: float
    lowdose_channels: Optional[list[Union[int, str]]]
    # logit distillation on the deep-supervision outputs (losses/logits.py): its form ("hinton": the per-voxel KL
    # over every voxel; "class_balanced": the per-voxel KL, every class of the teacher's argmax weighing the same;
    # "cwd": channel-wise distillation, a softmax over space per channel), weight, temperature and warm-up
    logit_form: str
    logit_weight: float
    logit_temperature: float
    logit_warmup: float
    # a diagnostic, not a method: > 0 replaces the teacher's logits at every deep-supervision level by
    # margin * onehot(label) (the teacher's forward is skipped); null: the teacher's own logits
    logit_oracle_margin: Optional[float]
    # ReCo-KD (MS-SARD + MS-CA) on encoder stages
    reco_weight: float
    reco_warmup: float
    reco_stages: Optional[list[int]]
    reco_stage_alpha: float
    sard_fg_weight: float
    sard_bg_weight: float
    sard_att_weight: float
    sard_temperature: float
    ca_weight: float
    ca_ratio: float
    # REACT-KD region-graph distillation
    graph_weight: float
    graph_warmup: float
    graph_stages: list[str]
    graph_lesion_labels: list[int]
    graph_min_component_voxels: int
    graph_background_node: bool
    graph_node_weight: float
    graph_edge_weight: float
    graph_gw_weight: float
    graph_gw_solver: str
    graph_gw_epsilon: float
    # shared attention alignment (REACT-KD's CBAM3D, one block shared by the adapted student and the teacher
    # feature, then a relative squared error) on the named stages (enc<k>/dec<k>); 0: off
    attention_weight: float
    attention_warmup: float
    attention_stages: list[str]

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # JSON accepts NaN and Infinity; they would surface as NaN losses
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise SettingsError(f"setting '{f.name}' must be a finite number, got {value!r}")
        positive = ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch", "save_every",
                    "initial_lr", "grad_clip", "student_width", "student_min_channels", "logit_temperature",
                    "sard_temperature", "ca_ratio")
        for name in positive:
            if not getattr(self, name) > 0:
                raise SettingsError(f"setting '{name}' must be > 0, got {getattr(self, name)!r}")
        non_negative = [f.name for f in dataclasses.fields(self) if f.name.endswith("_weight")]
        non_negative += ["graph_min_component_voxels", "graph_gw_epsilon"]
        for name in non_negative:
            if getattr(self, name) < 0:
                raise SettingsError(f"setting '{name}' must be >= 0, got {getattr(self, name)!r}")
        for name in ("logit_warmup", "reco_warmup", "graph_warmup", "attention_warmup"):
            if not 0 <= getattr(self, name) <= 1:
                raise SettingsError(f"setting '{name}' is a fraction of training and must be in [0, 1]")
        if self.student_width > 1:
            raise SettingsError(f"student_width must be in (0, 1], got {self.student_width}")
        if isinstance(self.teacher, list) and not self.teacher:
            raise SettingsError("setting 'teacher' is an empty list; give at least one teacher or null")
        if isinstance(self.teacher_folds, str) and self.teacher_folds != "all":
            raise SettingsError(f"setting 'teacher_folds' must be null, \"all\" or a list of folds, got "
                                f"{self.teacher_folds!r}")
        if isinstance(self.teacher_folds, list) and (not self.teacher_folds or
                                                     any(f < 0 for f in self.teacher_folds)):
            raise SettingsError(f"setting 'teacher_folds' must list folds >= 0, got {self.teacher_folds!r}")
        if self.teacher_weights is not None and (any(w < 0 for w in self.teacher_weights)
                                                 or not sum(self.teacher_weights) > 0):
            raise SettingsError(f"setting 'teacher_weights' must be >= 0 with a positive sum, got "
                                f"{self.teacher_weights!r}")
        if not 0 <= self.lowdose_probability <= 1:
            raise SettingsError(f"setting 'lowdose_probability' must be in [0, 1], got {self.lowdose_probability!r}")
        if not (1 <= len(self.lowdose_dose) <= 2 and 0 < self.lowdose_dose[0] <= self.lowdose_dose[-1] <= 1):
            raise SettingsError(f"setting 'lowdose_dose' must be [dose] or [lo, hi] with 0 < lo <= hi <= 1 (fractions "
                                f"of the scan's dose), got {self.lowdose_dose!r}")
        if not self.lowdose_i0 > 0 or self.lowdose_electronic_noise < 0 or self.lowdose_extra_water_mm < 0:
            raise SettingsError("settings 'lowdose_i0' must be > 0, 'lowdose_electronic_noise' and "
                                "'lowdose_extra_water_mm' >= 0")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise SettingsError(f"setting 'cpu_threads' must be null or >= 1, got {self.cpu_threads!r}")
        if not 0 <= self.modality_dropout < 1:
            raise SettingsError(f"setting 'modality_dropout' is a probability in [0, 1), got {self.modality_dropout!r}")
        if self.logit_form not in LOGIT_FORMS:
            raise SettingsError(f"setting 'logit_form' must be one of {', '.join(LOGIT_FORMS)}, got "
                                f"{self.logit_form!r}")
        if self.logit_oracle_margin is not None and not self.logit_oracle_margin > 0:
            raise SettingsError(f"setting 'logit_oracle_margin' must be null or > 0, got {self.logit_oracle_margin!r}")
        if self.graph_gw_solver not in ("exact", "entropic"):
            raise SettingsError(f"graph_gw_solver must be 'exact' or 'entropic', got {self.graph_gw_solver!r}")

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "DistillSettings":
        return dataclasses.replace(self, **changes)


def _check_type(name: str, value: Any, annotation: Any) -> Any:
    """Return value converted to the annotated type, or raise SettingsError."""
    origin = get_origin(annotation)
    if origin is Union:  # Optional[X], Union[X, list[Y]]
        if value is None and type(None) in get_args(annotation):
            return None
        inner = [a for a in get_args(annotation) if a is not type(None)]
        if len(inner) == 1:
            return _check_type(name, value, inner[0])
        for alternative in inner:
            try:
                return _check_type(name, value, alternative)
            except SettingsError:
                continue
        raise SettingsError(f"setting '{name}' must be one of {', '.join(_type_name(a) for a in inner)}, got "
                            f"{type(value).__name__} {value!r}")
    if origin is list:
        (item,) = get_args(annotation)
        if not isinstance(value, list):
            raise SettingsError(f"setting '{name}' must be a list of {item.__name__}, got {value!r}")
        return [_check_type(name, v, item) for v in value]
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, str, bool) and type(value) is annotation:
        return value
    raise SettingsError(f"setting '{name}' must be of type {getattr(annotation, '__name__', annotation)}, "
                        f"got {type(value).__name__} {value!r}")


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is list:
        return f"list of {get_args(annotation)[0].__name__}"
    return getattr(annotation, "__name__", str(annotation))


def _annotations() -> dict[str, Any]:
    import typing

    return typing.get_type_hints(DistillSettings)


def settings_from_dict(values: dict[str, Any], source: str) -> DistillSettings:
    """Build settings from a complete dict; `source` names the file in error messages."""
    valid = DistillSettings.keys()
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise SettingsError(f"{source}: unknown setting(s) {unknown}. Valid settings are: {', '.join(valid)}")
    missing = [k for k in valid if k not in values]
    if missing:
        raise SettingsError(f"{source}: missing setting(s) {missing}")
    hints = _annotations()
    return DistillSettings(**{k: _check_type(k, values[k], hints[k]) for k in valid})


def _read_json(path: Union[str, Path], what: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise SettingsError(f"{what} {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise SettingsError(f"{what} {path} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{what} {path} must hold a JSON object of settings, got {type(data).__name__}")
    return data


def _lineage(trainer: Union[str, type]) -> list[str]:
    """Class names from the most general to `trainer` itself (a class, or the name of one of our public trainers,
    walked up trainer_names.PARENTS: no trainer is imported, so the trainers can import this module)."""
    if isinstance(trainer, type):
        return [k.__name__ for k in reversed(trainer.__mro__)]
    try:
        return lineage(trainer)
    except KeyError:
        raise SettingsError(f"{trainer} is not one of our trainers; shipped trainers: "
                            f"{', '.join(PUBLIC_TRAINERS)}") from None


def _config_folder():
    return resources.files("nnunetv2_recokd.trainer_configs")


def shipped_config_names() -> list[str]:
    """Names of the trainers that ship a file of changes in trainer_configs/ (besides defaults.json)."""
    return sorted(p.name[:-5] for p in _config_folder().iterdir()
                  if p.name.endswith(".json") and p.name != DEFAULTS_FILE)


def _read_resource(name: str) -> dict[str, Any]:
    with resources.as_file(_config_folder() / name) as path:
        return _read_json(path, "defaults file")


def settings_layers(trainer: Union[str, type]) -> list[tuple[str, dict[str, Any]]]:
    """(source, values) in the order they apply: defaults.json, then the file of every class from the most
    general to `trainer` that ships one (trainer_configs/<class name>.json holds only what that class changes)."""
    layers = [(f"trainer_configs/{DEFAULTS_FILE}", _read_resource(DEFAULTS_FILE))]
    shipped = set(shipped_config_names())
    valid = set(DistillSettings.keys())
    for name in _lineage(trainer):
        if name in shipped:
            values = _read_resource(f"{name}.json")
            unknown = sorted(set(values) - valid)
            if unknown:
                raise SettingsError(f"trainer_configs/{name}.json: unknown setting(s) {unknown}")
            layers.append((f"trainer_configs/{name}.json", values))
    return layers


def default_settings(trainer: Union[str, type]) -> DistillSettings:
    """The shipped defaults of one trainer: defaults.json with the changes of each class along its hierarchy, so
    the usual nnU-Net idiom `class nnUNetTrainerReCoKD_250ep(nnUNetTrainerReCoKD)` inherits its parent's."""
    values: dict[str, Any] = {}
    layers = settings_layers(trainer)
    for _, layer in layers:
        values.update(layer)
    return settings_from_dict(values, " + ".join(source for source, _ in layers))


def resolve_settings(trainer: Union[str, type], environ: Optional[dict[str, str]] = None) -> DistillSettings:
    """Shipped defaults of `trainer` updated with the file named by RECOKD_CONFIG (if set)."""
    environ = os.environ if environ is None else environ
    settings = default_settings(trainer)
    override_path = environ.get(CONFIG_ENV)
    if not override_path:
        return settings
    overrides = _read_json(override_path, f"{CONFIG_ENV} file")
    return settings_from_dict({**settings.as_dict(), **overrides}, f"{CONFIG_ENV} file {override_path}")
