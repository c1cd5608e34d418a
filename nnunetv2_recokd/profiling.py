"""Size and speed of a network on one patch: parameters, GFLOPs, inference latency."""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nnunetv2_recokd.student import count_parameters  # noqa: F401  (re-exported: size and speed in one place)


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


def inference_latency_ms(network: nn.Module, patch_size: Sequence[int], in_channels: int = 1, runs: int = 5,
                         device: torch.device = torch.device("cpu")) -> float:
    """Median milliseconds of one forward of one patch (batch 1, no grad, fp16 autocast on CUDA)."""
    network = network.to(device).eval()
    x = torch.randn(1, in_channels, *patch_size, device=device)
    times = []
    for i in range(runs + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
            network(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first run is a warm-up
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
