"""Size and speed of a network: parameters, GFLOPs and latency on one patch, the network nnUNetv2_predict builds
from a model folder, and what a fold's checkpoint records (parameters, mirroring axes, the distillation log)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nnunetv2_recokd.evaluation.timing import median_ms
from nnunetv2_recokd.student import count_parameters  # noqa: F401  (re-exported: size and speed in one place)

CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth")
_BUFFER_SUFFIXES = ("running_mean", "running_var")  # BatchNorm statistics: stored floats, not parameters


def conv_gflops(network: nn.Module, patch_size: Sequence[int], in_channels: int = 1) -> float:
    """GFLOPs of one forward of one patch (batch 1, eval mode, no grad), as torch's FlopCounterMode counts them.

    Counted: convolutions (transposed ones included), matrix multiplications and linear layers, each as
    2 x multiply-accumulates; biases, norms, activations and interpolation (a few FLOPs per voxel) are not.
    Convolutions dominate a U-Net's cost, hence the name. The network runs as configured (with deep
    supervision on, its extra 1x1x1 heads are counted too); its train/eval mode is restored afterwards.
    """
    was_training = network.training
    x = torch.zeros(1, in_channels, *patch_size, device=next(network.parameters()).device)
    counter = FlopCounterMode(display=False)
    try:
        network.eval()
        with torch.no_grad(), counter:
            network(x)
    finally:
        network.train(was_training)
    return counter.get_total_flops() / 1e9


def no_grad_forward(network: nn.Module, x: torch.Tensor) -> None:
    """One inference forward as nnU-Net's predictor runs it: no grad, fp16 autocast on CUDA."""
    with torch.no_grad(), torch.autocast(x.device.type, enabled=x.device.type == "cuda"):
        network(x)


def inference_latency_ms(network: nn.Module, patch_size: Sequence[int], in_channels: int = 1, runs: int = 5,
                         device: torch.device = torch.device("cpu")) -> float:
    """Median milliseconds of one forward of one patch (batch 1, no grad, fp16 autocast on CUDA), after one
    untimed warm-up forward."""
    network = network.to(device).eval()
    x = torch.randn(1, in_channels, *patch_size, device=device)
    return median_ms(lambda: no_grad_forward(network, x), device, runs, 1)[0]


def load_inference_network(model_folder: Union[str, Path], fold: str = "0",
                           checkpoint_name: str = "checkpoint_final.pth", device: str = "cpu"):
    """(network, patch size, input channels) of one fold of a model folder, rebuilt the way nnUNetv2_predict does
    (trainer class found by nnU-Net's own lookup, the fold's weights, deep supervision off, eval mode)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    dev = torch.device(device)
    # nnU-Net prints "perform_everything_on_device=True is only supported for cuda devices!" for every CPU
    # predictor, whatever it is given, and notes on checkpoints: nothing a user can act on
    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(device=dev, perform_everything_on_device=dev.type == "cuda", verbose=False,
                                    verbose_preprocessing=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=(fold if fold == "all"
                                                                                     else int(fold),),
                                                       checkpoint_name=checkpoint_name)
    net = predictor.network.to(dev).eval()
    decoder = getattr(getattr(net, "_orig_mod", net), "decoder", None)
    if decoder is not None and hasattr(decoder, "deep_supervision"):
        decoder.deep_supervision = False
    channels = determine_num_input_channels(predictor.plans_manager, predictor.configuration_manager,
                                            predictor.dataset_json)
    return net, predictor.configuration_manager.patch_size, channels


def model_folder_latency_ms(model_folder: Union[str, Path], fold: str, checkpoint: Path, device: str,
                            runs: int) -> float:
    """Median ms of one forward pass on one random patch (batch 1) of the network load_inference_network
    rebuilds."""
    net, patch, channels = load_inference_network(model_folder, fold, checkpoint.name, device)
    return inference_latency_ms(net, patch, channels, runs=max(1, runs), device=torch.device(device))


def latency_or_reason(model_folder: Path, fold: str, checkpoint: Optional[Path], device: str,
                      runs: int) -> tuple[Optional[float], Optional[str]]:
    """(ms, None), or (None, why not): a missing trainer class (shim not installed) must not end a report."""
    if checkpoint is None:
        return None, "no checkpoint"
    try:
        return model_folder_latency_ms(model_folder, fold, checkpoint, device, runs), None
    except BaseException as e:  # nnU-Net's trainer lookup imports every trainer module: anything can surface
        if isinstance(e, KeyboardInterrupt):
            raise
        hint = " (run `nnunetv2_recokd install`)" if "trainer" in str(e).lower() else ""
        first_line = (str(e).splitlines() or [""])[0][:200]
        return None, f"{type(e).__name__}: {first_line}{hint}"


def find_checkpoint(fold_folder: Path) -> Optional[Path]:
    """checkpoint_final.pth, else checkpoint_best.pth (a run stopped early), else None."""
    return next((fold_folder / c for c in CHECKPOINTS if (fold_folder / c).is_file()), None)


def load_checkpoint(checkpoint: Union[str, Path]) -> dict:
    """A checkpoint as nnU-Net saved it, on the CPU."""
    return torch.load(checkpoint, map_location="cpu", weights_only=False)


def count_checkpoint_parameters(checkpoint: Union[Path, dict]) -> int:
    """Number of parameters in ``network_weights``: floating tensors counted once per storage (decoder.encoder
    is the encoder, so its state-dict entries share the encoder's tensors), BatchNorm statistics left out."""
    loaded = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    weights = loaded["network_weights"]
    seen, total = set(), 0
    for name, tensor in weights.items():
        if not torch.is_tensor(tensor) or not tensor.is_floating_point() or name.endswith(_BUFFER_SUFFIXES):
            continue
        key = (tensor.data_ptr(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel()
    return total


def mirror_passes(checkpoint: Path) -> int:
    """Network forwards per patch with nnU-Net's mirroring (TTA): every combination of the allowed axes."""
    axes = load_checkpoint(checkpoint).get("inference_allowed_mirroring_axes")
    return 2 ** len(axes) if axes else 1


def training_record(checkpoint: Path) -> dict:
    """What distillation added during training: the weighted distillation total per epoch (nnU-Net's logger)."""
    logging = load_checkpoint(checkpoint).get("logging", {})
    return {"kd_weighted_per_epoch": [float(v) for v in logging.get("train_kd_total_weighted", [])]}
