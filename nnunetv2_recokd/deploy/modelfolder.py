"""A trained nnU-Net model folder, read the way nnUNetv2_predict reads it.

``<Trainer>__<plans>__<configuration>/`` holds plans.json, dataset.json and fold_<f>/<checkpoint>. The predictor
takes the trainer name and the configuration from the first fold's checkpoint and rebuilds the network from the
plans with that trainer class; a student of ours carries its width in plans.json (``recokd_student``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from nnunetv2_recokd.student import PLANS_KEY

Fold = Union[int, str]
DEFAULT_CHECKPOINT = "checkpoint_final.pth"


class DeployError(RuntimeError):
    """The model folder, its checkpoints, the input files or the runtime cannot be used; the message says why
    and what to do."""


@dataclasses.dataclass
class ModelFolder:
    path: Path
    plans: dict
    dataset_json: dict
    folds: list[Fold]
    checkpoint_name: str
    trainer_name: str
    configuration: str
    mirroring_axes: Optional[tuple[int, ...]]

    def checkpoint_path(self, fold: Fold) -> Path:
        return self.path / f"fold_{fold}" / self.checkpoint_name

    def read_checkpoint(self, fold: Fold) -> dict[str, Any]:
        return torch.load(self.checkpoint_path(fold), map_location="cpu", weights_only=False)

    @property
    def is_student(self) -> bool:
        """True when the plans carry the width of an nnunetv2-recokd student for this configuration."""
        return PLANS_KEY in self.plans["configurations"].get(self.configuration, {})

    @property
    def dataset_name(self) -> str:
        return self.plans["dataset_name"]

    def describe(self) -> str:
        return (f"{self.path} (trainer {self.trainer_name}, configuration {self.configuration}, folds "
                f"{', '.join(map(str, self.folds))}, {self.checkpoint_name})")


def parse_folds(folds: Optional[Sequence[Union[str, int]]]) -> Optional[list[Fold]]:
    if folds is None:
        return None
    return [f if f == "all" else int(f) for f in folds]


def available_folds(path: Path, checkpoint_name: str) -> list[Fold]:
    """fold_<f> sub-folders holding the checkpoint, numbered folds first, fold_all last."""
    found = []
    for sub in path.glob("fold_*"):
        name = sub.name[len("fold_"):]
        if (sub / checkpoint_name).is_file() and (name == "all" or re.fullmatch(r"\d+", name)):
            found.append(name if name == "all" else int(name))
    return sorted(found, key=lambda f: (f == "all", f if f != "all" else 0))


def open_model_folder(path: Union[str, Path], folds: Optional[Sequence[Union[str, int]]] = None,
                      checkpoint_name: str = DEFAULT_CHECKPOINT) -> ModelFolder:
    """Read a model folder and check that every requested fold has the checkpoint.

    Args:
        path: the ``<Trainer>__<plans>__<configuration>`` folder.
        folds: folds to use; None: every numbered fold_<f> that has the checkpoint, as nnUNetv2_predict's
            auto-detection (fold_all is left out: it is used only when named, -f all).
        checkpoint_name: file name inside each fold folder.

    Raises:
        DeployError: not a model folder, a requested fold without the checkpoint (the checkpoints it does have are
            named), or no fold with the checkpoint at all.
    """
    path = Path(path)
    missing = [name for name in ("plans.json", "dataset.json") if not (path / name).is_file()]
    if not path.is_dir() or missing:
        what = "missing " + ", ".join(missing) if path.is_dir() else "no such folder"
        raise DeployError(f"{path} is not an nnU-Net model folder ({what}); "
                          "give the <Trainer>__<plans>__<configuration> folder that nnUNetv2_train wrote")
    requested = parse_folds(folds)
    if requested is None:
        found = available_folds(path, checkpoint_name)
        requested = [f for f in found if f != "all"]
        if not requested:
            others = sorted({p.name for p in path.glob("fold_*/*.pth")})
            raise DeployError(f"no numbered fold of {path} has {checkpoint_name}"
                              + ("; it has fold_all, which is used only when named (-f all), as nnUNetv2_predict does"
                                 if "all" in found else
                                 f"; checkpoints found: {', '.join(others)} (choose one with -chk)" if others else
                                 "; train it first (nnUNetv2_train), or name another folder"))
    problems = []
    for fold in requested:
        checkpoint = path / f"fold_{fold}" / checkpoint_name
        if not checkpoint.is_file():
            others = sorted(p.name for p in checkpoint.parent.glob("*.pth"))
            problems.append(f"fold {fold}: {checkpoint} does not exist"
                            + (f" (this fold has {', '.join(others)}: choose one with -chk)" if others else
                               " (this fold was not trained, or its training has not finished)"))
    if problems:
        raise DeployError("missing checkpoint(s):\n  " + "\n  ".join(problems))
    plans = json.loads((path / "plans.json").read_text())
    dataset_json = json.loads((path / "dataset.json").read_text())
    first = torch.load(path / f"fold_{requested[0]}" / checkpoint_name, map_location="cpu", weights_only=False)
    try:
        trainer_name, configuration = first["trainer_name"], first["init_args"]["configuration"]
    except (KeyError, TypeError):
        raise DeployError(f"{path / f'fold_{requested[0]}' / checkpoint_name} is not an nnU-Net checkpoint "
                          "(no trainer_name / init_args)") from None
    axes = first.get("inference_allowed_mirroring_axes")
    return ModelFolder(path, plans, dataset_json, requested, checkpoint_name, trainer_name, configuration,
                       tuple(axes) if axes is not None else None)


def model_folder_from_ids(dataset: str, trainer: str, plans: str, configuration: str) -> Path:
    """nnUNetv2_predict's -d/-tr/-p/-c to $nnUNet_results/<Dataset>/<trainer>__<plans>__<configuration>."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    try:
        return Path(get_output_folder(dataset, trainer, plans, configuration))
    except (RuntimeError, TypeError) as e:  # unknown dataset, nnUNet_results unset
        raise DeployError(f"cannot locate the model folder of dataset {dataset!r}: {e}") from None
