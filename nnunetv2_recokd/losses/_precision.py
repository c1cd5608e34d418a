"""Every distillation term is computed in float32, also inside nnU-Net's fp16 autocast."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def float32_region(device: torch.device) -> Iterator[None]:
    """Autocast off on ``device`` and float32 matmuls at full precision (no TF32) until the block ends.

    Full precision matters: the moment-based ReCo-KD terms subtract large sums (losses/reco.py), which
    TF32's 10-bit mantissa would swamp. The previous matmul precision is restored on exit.
    """
    is_available = getattr(torch.amp, "is_autocast_available", None)  # added in torch 2.4
    known = is_available(device.type) if is_available is not None else device.type in ("cpu", "cuda")
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device_type=device.type, enabled=False) if known else contextlib.nullcontext():
            yield
    finally:
        torch.set_float32_matmul_precision(precision)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """float32, or float64 left as it is (tests check the formulas in double precision)."""
    return x if x.dtype == torch.float64 else x.float()
