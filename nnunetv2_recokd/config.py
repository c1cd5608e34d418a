"""Typed distillation settings: shipped defaults from trainer_configs/, overrides from RECOKD_CONFIG.

Every shipped trainer has one JSON file in trainer_configs/ named after the class (the defaults a user
gets with ``-tr <name>``). A user overrides any subset of keys with a JSON file named by the
``RECOKD_CONFIG`` environment variable. Unknown keys and wrong types are errors that name the valid
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

CONFIG_ENV = "RECOKD_CONFIG"
TEACHER_ENV = "RECOKD_TEACHER"


class SettingsError(ValueError):
    """A settings file is missing, unreadable, has unknown keys or values of the wrong type."""


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    """All knobs of the distillation trainers. Defaults live in trainer_configs/<TrainerName>.json."""

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
    # teacher: None = nnUNet_results/<dataset>/<teacher_trainer>__<teacher_plans>__<configuration>/fold_<fold>
    teacher: Optional[str]
    teacher_trainer: str
    teacher_plans: Optional[str]
    teacher_checkpoint: str
    # student: nnU-Net's own plans with features_per_stage scaled (ReCo-KD: C' = max(C_min, C * width))
    student_width: float
    student_min_channels: int
    # Hinton logit distillation on the deep-supervision outputs
    logit_weight: float
    logit_temperature: float
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
        for name in ("reco_warmup", "graph_warmup"):
            if not 0 <= getattr(self, name) <= 1:
                raise SettingsError(f"setting '{name}' is a fraction of training and must be in [0, 1]")
        if self.student_width > 1:
            raise SettingsError(f"student_width must be in (0, 1], got {self.student_width}")
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
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in get_args(annotation) if a is not type(None)]
        return _check_type(name, value, inner)
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


def shipped_config_names() -> list[str]:
    """Names of the trainers that have a defaults file in trainer_configs/."""
    folder = resources.files("nnunetv2_recokd.trainer_configs")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def default_settings(trainer_name: str) -> DistillSettings:
    """The shipped defaults of one trainer (trainer_configs/<trainer_name>.json)."""
    resource = resources.files("nnunetv2_recokd.trainer_configs") / f"{trainer_name}.json"
    if not resource.is_file():
        raise SettingsError(f"no defaults file trainer_configs/{trainer_name}.json; shipped trainers: "
                            f"{', '.join(shipped_config_names())}")
    with resources.as_file(resource) as path:
        return settings_from_dict(_read_json(path, "defaults file"), f"trainer_configs/{trainer_name}.json")


def resolve_settings(trainer_name: str, environ: Optional[dict[str, str]] = None) -> DistillSettings:
    """Shipped defaults of `trainer_name` updated with the file named by RECOKD_CONFIG (if set)."""
    environ = os.environ if environ is None else environ
    settings = default_settings(trainer_name)
    override_path = environ.get(CONFIG_ENV)
    if not override_path:
        return settings
    overrides = _read_json(override_path, f"{CONFIG_ENV} file")
    return settings_from_dict({**settings.as_dict(), **overrides}, f"{CONFIG_ENV} file {override_path}")
