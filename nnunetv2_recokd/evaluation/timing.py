"""Clocks of the measurements: wall time of a block, seconds per case, the median of timed calls (with CUDA
synchronisation and peak memory), and the machine the figures were measured on.

Demo, report, benchmark, benchmark-predict, gpu-check and predict time through these helpers, so a "seconds per
case" or a "ms per step" means the same in every table. (Progress lines and time budgets keep a plain wall clock;
deploy/predictor.py splits each case's time into preprocessing, network and export itself.)
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Optional


class Stopwatch:
    """Wall time of a block: ``with Stopwatch() as watch: ...`` then ``watch.seconds``. Read while the block runs,
    ``seconds`` is the time so far."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self._end: Optional[float] = None

    def __enter__(self) -> "Stopwatch":
        self.start, self._end = time.perf_counter(), None
        return self

    def __exit__(self, *exc) -> None:
        self._end = time.perf_counter()

    @property
    def seconds(self) -> float:
        return (self._end if self._end is not None else time.perf_counter()) - self.start


def seconds_per_case(seconds: float, cases: int) -> float:
    """Wall time over the cases it covered (at least one case, so an empty folder gives the wall time)."""
    return seconds / max(1, cases)


def sync(device) -> None:
    """Wait for the device's queued work (CUDA); nothing elsewhere."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device, steps: int, warmup: int) -> tuple[float, Optional[float]]:
    """Median milliseconds per call of fn over `steps` timed calls after `warmup` untimed ones (the device
    synchronised around each), and peak CUDA memory (GiB) over the timed calls (None off CUDA)."""
    import torch

    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        gc.collect()  # objects of earlier measurements held in reference cycles would otherwise count in this peak
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1000)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return statistics.median(times), peak


def peak_above_current(fn: Callable[[], None], device) -> Optional[float]:
    """CUDA: peak MiB allocated during fn() above what was allocated before it; None elsewhere."""
    if device.type != "cuda":
        return None
    import torch

    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def device_name(device) -> str:
    """The device a step was timed on: the GPU's name, or the CPU with its cores and torch's threads."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads)"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def machine() -> str:
    """The machine whole commands were timed on: CPU model, cores, torch and its threads."""
    import torch

    return f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def cpu_cores() -> str:
    """The CPU as platform names it, with its cores (gpu-check's environment record)."""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
