"""A tiny nnU-Net setup built in-process (no planning, no data loading) for trainer-level tests."""

from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path

import torch

DATASET = "Dataset991_Tiny"


def tiny_plans(features=(16, 32, 64), patch=(16, 16, 16)) -> dict:
    n = len(features)
    return {
        "dataset_name": DATASET,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": list(patch),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {"max": 1.0, "mean": 0.0, "median": 0.0, "min": -1.0,
                                                              "percentile_00_5": -1.0, "percentile_99_5": 1.0,
                                                              "std": 1.0}},
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres",
            "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2,
            "patch_size": list(patch),
            "median_image_size_in_voxels": list(patch),
            "spacing": [1.0, 1.0, 1.0],
            "normalization_schemes": ["ZScoreNormalization"],
            "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": n, "features_per_stage": list(features),
                    "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * n,
                    "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1), "n_conv_per_stage": [2] * n,
                    "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                    "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
            "batch_dice": False,
        }},
    }


def tiny_dataset_json(regions: bool = False) -> dict:
    if regions:
        labels = {"background": 0, "whole": [1, 2], "core": 2}
        return {"channel_names": {"0": "x"}, "labels": labels, "regions_class_order": [1, 2], "numTraining": 2,
                "file_ending": ".nii.gz"}
    return {"channel_names": {"0": "x"}, "labels": {"background": 0, "organ": 1, "lesion": 2}, "numTraining": 2,
            "file_ending": ".nii.gz"}


def setup_env(root: Path, monkeypatch, regions: bool = False, teacher: bool = True) -> tuple[dict, dict]:
    """nnUNet_* folders under root, a preprocessed folder nnU-Net can inspect, and a random full-width
    teacher model folder exported as RECOKD_TEACHER. Returns (plans, dataset_json)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans, dataset_json = tiny_plans(), tiny_dataset_json(regions)
    for name in ("raw", "preprocessed", "results"):
        (root / name).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(f"nnUNet_{name}", str(root / name))
    data = root / "preprocessed" / DATASET / "nnUNetPlans_3d_fullres"
    data.mkdir(parents=True)
    (data / "case_000.b2nd").write_bytes(b"")
    monkeypatch.delenv("RECOKD_CONFIG", raising=False)
    monkeypatch.delenv("RECOKD_TEACHER", raising=False)
    if teacher:
        folder = root / "teacher" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
        (folder / "fold_0").mkdir(parents=True)
        (folder / "plans.json").write_text(json.dumps(plans))
        (folder / "dataset.json").write_text(json.dumps(dataset_json))
        pm = PlansManager(deepcopy(plans))
        cm = pm.get_configuration("3d_fullres")
        heads = pm.get_label_manager(dataset_json).num_segmentation_heads
        torch.manual_seed(0)
        net = nnUNetTrainer.build_network_architecture(pm, cm, 1, heads, enable_deep_supervision=True)
        torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
                    "init_args": {"configuration": "3d_fullres"}}, folder / "fold_0" / "checkpoint_final.pth")
        monkeypatch.setenv("RECOKD_TEACHER", str(folder))
    return plans, dataset_json


def make_trainer(cls, plans: dict, dataset_json: dict):
    plans = deepcopy(plans)
    plans["continue_training"] = False
    return cls(plans=plans, configuration="3d_fullres", fold=0, dataset_json=dataset_json,
               device=torch.device("cpu"))


def tiny_batch(regions: bool = False, seed: int = 0) -> dict:
    """A batch as nnU-Net's dataloader gives it: data and the deep-supervision target list."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(2, 1, 16, 16, 16, generator=g)
    seg = torch.zeros(2, 1, 16, 16, 16)
    seg[:, :, 3:13, 3:13, 3:13] = 1
    seg[0, :, 5:8, 5:8, 5:8] = 2
    seg[1, :, 9:12, 9:12, 9:12] = 2
    seg[1, :, 4:6, 4:6, 10:12] = 2  # second lesion in sample 1
    data = data + seg
    targets = [seg, seg[:, :, ::2, ::2, ::2]]
    if regions:  # nnU-Net's region targets: one binary channel per region ("whole" = 1|2, "core" = 2)
        targets = [torch.cat([(t > 0).float(), (t == 2).float()], 1) for t in targets]
    return {"data": data, "target": targets}
