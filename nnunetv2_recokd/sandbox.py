"""An in-process nnU-Net sandbox: plans for any U-Net size, a temporary nnU-Net folder tree, a random
teacher, and batches shaped like nnU-Net's dataloader output.

Used by the step-cost benchmark (no data loading, no augmentation: only what distillation adds is
measured) and by the trainer-level tests.
"""

from __future__ import annotations

import json
import os
from copy import deepcopy
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

SANDBOX_DATASET = "Dataset991_Sandbox"


def unet_plans(features: Sequence[int], patch: Sequence[int], batch_size: int = 2,
               dataset_name: str = SANDBOX_DATASET) -> dict:
    """nnU-Net plans (3d_fullres, PlainConvUNet, stride 2 per stage) for the given channels and patch."""
    n, dim = len(features), len(patch)
    conv, norm = ("Conv3d", "InstanceNorm3d") if dim == 3 else ("Conv2d", "InstanceNorm2d")
    arch = {"n_stages": n, "features_per_stage": list(features), "conv_op": f"torch.nn.modules.conv.{conv}",
            "kernel_sizes": [[3] * dim] * n, "strides": [[1] * dim] + [[2] * dim] * (n - 1),
            "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.{norm}", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True}}
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    config = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
              "batch_size": batch_size, "patch_size": list(patch), "median_image_size_in_voxels": list(patch),
              "spacing": [1.0] * dim, "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
              "resampling_fn_data": "resample_data_or_seg_to_shape",
              "resampling_fn_seg": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": resampling,
              "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
              "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
              "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
              "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                               "arch_kwargs": arch,
                               "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
              "batch_dice": False}
    return {"dataset_name": dataset_name, "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": [1.0] * dim, "original_median_shape_after_transp": list(patch),
            "image_reader_writer": "SimpleITKIO", "transpose_forward": list(range(dim)),
            "transpose_backward": list(range(dim)), "experiment_planner_used": "ExperimentPlanner",
            "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": {"max": 1.0, "mean": 0.0, "median": 0.0,
                                                                  "min": -1.0, "percentile_00_5": -1.0,
                                                                  "percentile_99_5": 1.0, "std": 1.0}},
            "configurations": {"3d_fullres": config}}


def dataset_json(regions: bool = False, channels: int = 1) -> dict:
    """Labels background/organ/lesion; region-based: 'whole' = {1, 2} and 'core' = {2}. Channels x, x1, x2, ..."""
    names = {str(c): "x" if c == 0 else f"x{c}" for c in range(channels)}
    if regions:
        return {"channel_names": names, "labels": {"background": 0, "whole": [1, 2], "core": 2},
                "regions_class_order": [1, 2], "numTraining": 2, "file_ending": ".nii.gz"}
    return {"channel_names": names, "labels": {"background": 0, "organ": 1, "lesion": 2}, "numTraining": 2,
            "file_ending": ".nii.gz"}


def prepare_folders(root: Path, plans: dict, environ: Optional[dict] = None) -> None:
    """nnUNet_raw/preprocessed/results under root (set in `environ`, default os.environ) and a preprocessed
    data folder that nnU-Net's initialize() and do_split() can inspect (they only look at file names)."""
    environ = os.environ if environ is None else environ
    for name in ("raw", "preprocessed", "results"):
        (root / name).mkdir(parents=True, exist_ok=True)
        environ[f"nnUNet_{name}"] = str(root / name)
    data = root / "preprocessed" / plans["dataset_name"] / plans["configurations"]["3d_fullres"]["data_identifier"]
    data.mkdir(parents=True, exist_ok=True)
    for case in ("case_000", "case_001"):
        (data / f"{case}.b2nd").touch()
    # one fold of nnU-Net's split (trainers read it to check which cases the teacher was trained on)
    (data.parent / "splits_final.json").write_text(json.dumps([{"train": ["case_000"], "val": ["case_001"]}]))


def write_random_teacher(folder: Path, plans: dict, dataset: dict, seed: int = 0, folds: Sequence = (0,)) -> Path:
    """An nnU-Net model folder (plans.json, dataset.json, fold_<f>/checkpoint_final.pth for each of folds) with
    random weights (fold f seeded with seed + f)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    return _write_random_model(folder, plans, dataset, nnUNetTrainer, "nnUNetTrainer", folds, seed,
                               len(dataset["channel_names"]),
                               lambda fold: {"init_args": {"configuration": "3d_fullres"}})


def make_trainer(cls, plans: dict, dataset: dict, device: torch.device = torch.device("cpu"),
                 continue_training: bool = False):
    """Construct an nnU-Net trainer the way nnUNetv2_train does (continue_training: as with --c)."""
    plans = deepcopy(plans)
    plans["continue_training"] = continue_training
    return cls(plans=plans, configuration="3d_fullres", fold=0, dataset_json=dataset, device=device)


def make_batch(patch: Sequence[int], batch_size: int, n_targets: int, regions: bool = False, seed: int = 0,
               device: torch.device = torch.device("cpu"), channels: int = 1) -> dict:
    """data (B, channels, *patch) and the deep-supervision target list (stride 2 per level): an organ block with a
    lesion per sample, and a second lesion in every other sample (every channel shows it, under its own noise)."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.zeros(batch_size, 1, *patch)
    organ = tuple(slice(s // 5, s - s // 5) for s in patch)
    seg[(slice(None), slice(None), *organ)] = 1
    for b in range(batch_size):
        lo = [int(x) for x in np.array(patch) * (0.3 + 0.3 * (b % 2))]
        seg[(b, slice(None), *[slice(p, p + max(2, s // 6)) for p, s in zip(lo, patch)])] = 2
        if b % 2:
            lo2 = [s // 4 for s in patch]
            seg[(b, slice(None), *[slice(p, p + max(2, s // 8)) for p, s in zip(lo2, patch)])] = 2
    data = torch.randn(batch_size, channels, *patch, generator=g) + seg
    targets = [seg[(slice(None), slice(None), *[slice(None, None, 2 ** k)] * len(patch))] for k in range(n_targets)]
    if regions:  # nnU-Net's region targets: one binary channel per region
        targets = [torch.cat([(t > 0).float(), (t == 2).float()], 1) for t in targets]
    return {"data": data.to(device), "target": [t.to(device) for t in targets]}


def write_random_student(folder: Path, plans: dict, dataset: dict, trainer: str = "nnUNetTrainerReCoKD",
                         width: float = 0.25, min_channels: int = 8, folds: Sequence = (0,), seed: int = 0) -> Path:
    """A student model folder as our trainers leave it (plans.json recording the width, one checkpoint per fold
    naming the trainer), with random weights: fold f is seeded with seed + f."""
    from nnunetv2_recokd.student import PLANS_KEY
    from nnunetv2_recokd.trainers import nnUNetTrainerDistillBase

    plans = deepcopy(plans)
    plans["configurations"]["3d_fullres"][PLANS_KEY] = {"width": width, "min_channels": min_channels}
    channels = len(dataset["channel_names"])

    def extras(fold) -> dict:
        return {"current_epoch": 1, "optimizer_state": {"unused": 1}, "recokd": {"adapters": torch.zeros(1)},
                "init_args": {"configuration": "3d_fullres", "fold": fold, "plans": plans, "dataset_json": dataset}}
    return _write_random_model(folder, plans, dataset, nnUNetTrainerDistillBase, trainer, folds, seed, channels,
                               extras)


def _write_random_model(folder: Path, plans: dict, dataset: dict, trainer_class, trainer_name: str, folds: Sequence,
                        seed: int, channels: int, checkpoint_extras) -> Path:
    """plans.json, dataset.json and fold_<f>/checkpoint_final.pth with random weights of trainer_class's network
    (fold f seeded with seed + f, fold_all with seed + 99); checkpoint_extras(fold) adds keys to each checkpoint."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    pm = PlansManager(deepcopy(plans))
    heads = pm.get_label_manager(dataset).num_segmentation_heads
    for fold in folds:
        torch.manual_seed(seed + (fold if isinstance(fold, int) else 99))
        net = trainer_class.build_network_architecture(pm, pm.get_configuration("3d_fullres"), channels, heads, True)
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save({"network_weights": net.state_dict(), "trainer_name": trainer_name,
                    "inference_allowed_mirroring_axes": (0, 1, 2), **checkpoint_extras(fold)},
                   folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder
