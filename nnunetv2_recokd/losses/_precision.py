"""Every distillation term is computed in float32, also inside nnU-Net's fp16 autocast."""

from __future__ import annotations

import contextlib

import torch


def float32_region(device: torch.device) -> contextlib.AbstractContextManager:
    """Switch autocast off on ``device``; a no-op on device types that have no autocast (e.g. mps in old torch)."""
    is_available = getattr(torch.amp, "is_autocast_available", None)  # added in torch 2.4
    known = is_available(device.type) if is_available is not None else device.type in ("cpu", "cuda")
    if not known:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """float32, or float64 left as it is (tests check the formulas in double precision)."""
    return x if x.dtype == torch.float64 else x.float()
