"""Size and speed of a network on one patch: parameters, GFLOPs, inference latency."""

from __future__ import annotations

import math
import statistics
import time
from typing import Sequence

import torch
from torch import nn

from nnunetv2_recokd.student import count_parameters  # noqa: F401  (re-exported: size and speed in one place)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def conv_gflops(network: nn.Module, patch_size: Sequence[int], in_channels: int = 1) -> float:
    """GFLOPs (2 x multiply-accumulates) of the convolutions for one forward of one patch.

    Convolutions dominate a U-Net's cost; norms and activations (a few FLOPs per voxel) are left out.
    """
    total = 0

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            # each input voxel is spread over the kernel into out_channels
            macs = inputs[0].numel() * module.out_channels * math.prod(module.kernel_size) // module.groups
        else:
            macs = output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
        total += 2 * macs

    handles = [m.register_forward_hook(hook) for m in network.modules() if isinstance(m, _CONVS)]
    try:
        was_training = network.training
        network.eval()
        with torch.no_grad():
            network(torch.zeros(1, in_channels, *patch_size, device=next(network.parameters()).device))
        network.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return total / 1e9


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
