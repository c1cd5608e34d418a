"""One table row per model: Dice (mean and spread over seeds) beside the size and speed of the network
nnUNetv2_predict builds for the model folder (the demo's tables)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Sequence

from nnunetv2_recokd.evaluation.networks import (
    conv_gflops,
    count_parameters,
    inference_latency_ms,
    load_inference_network,
    mirror_passes,
)

TIMED_KEYS = ("stock_s_per_case", "runtime_s_per_case")  # seconds per case a row may carry, in column order


def spread(values: list[float]) -> float:
    """Sample standard deviation; 0 for a single value."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def model_row(label: str, trainer: str, runs: list[dict], device: str) -> dict:
    """One table row: Dice per class as mean and sample standard deviation over the seeds (nnU-Net's
    summary.json of each), size and speed of the network that nnUNetv2_predict builds for the model folder."""
    import torch

    classes = list(runs[0]["dice"])
    per_seed = {c: [r["dice"][c] for r in runs] for c in classes}
    means = [r["mean_dice"] for r in runs]
    net, patch, _ = load_inference_network(runs[0]["model_folder"], runs[0].get("fold", "0"), device=device)
    return {"model": label, "trainer": trainer, "seeds": [r["seed"] for r in runs],
            "dice": {c: statistics.mean(v) for c, v in per_seed.items()},
            "dice_sd": {c: spread(v) for c, v in per_seed.items()}, "dice_per_seed": per_seed,
            "mean_dice": statistics.mean(means), "mean_dice_sd": spread(means),
            "evaluated_on": runs[0]["evaluated_on"], "cases": runs[0]["cases"],
            "kd_weighted_per_epoch": [r["kd_weighted_per_epoch"] for r in runs],
            "params": count_parameters(net), "gflops_per_patch": conv_gflops(net, patch),
            "latency_ms": inference_latency_ms(net, patch, device=torch.device(device)), "patch_size": list(patch),
            "device": device, **{key: statistics.mean(r[key] for r in runs) for key in TIMED_KEYS
                                 if all(key in r for r in runs)}}


def inference_row(label: str, trainer: str, folder: Path, folds: Sequence[int], tta: bool, result: dict,
                  device: str) -> dict:
    """One way of predicting held-out cases (a fold ensemble or one model, TTA on or off): its scores (`result`),
    the forwards per patch position (folds x mirrorings), the weights it loads and the GFLOPs of all forwards."""
    net, patch, _ = load_inference_network(folder, device=device)
    forwards = len(folds) * (mirror_passes(folder / "fold_0" / "checkpoint_final.pth") if tta else 1)
    return {"model": label, "trainer": trainer, "folds": list(folds), "tta": tta, "forwards_per_patch": forwards,
            **result, "model_folder": str(folder), "params": len(folds) * count_parameters(net),
            "gflops_per_patch": forwards * conv_gflops(net, patch), "patch_size": list(patch), "device": device}
