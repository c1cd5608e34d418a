"""Fixtures shared by test modules.

one_torch_thread: tiny networks run fastest on one thread (thread start-up and contention dominate), and a busy
machine does not stall them. smallest_demo: the smallest demo, run once per session, is also the trained workspace
of the end-to-end tests (its synthetic Dataset990, nnU-Net's plans and preprocessing, and its trained teacher), so
the suite plans and trains that teacher once (suite time)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

# the smallest setting of the README's demo command (its default story: 2 labelled cases, here 2 teacher-labelled
# scans); --num-train 10 / --num-test 2 are the end-to-end tests' cases
SMALLEST = ["--device", "cpu", "--teacher-epochs", "1", "--student-epochs", "1", "--iterations", "4", "--num-train",
            "10", "--num-test", "2", "--unlabeled", "2", "--warmup", "0"]


@pytest.fixture(scope="session")
def smallest_demo(tmp_path_factory):
    """(output folder, completed process) of `nnunetv2_recokd demo` on its smallest setting."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    # --warmup 0: the ReCo-KD terms act from the first step (a warm-up over 1 epoch keeps lambda at 0)
    cmd = [sys.executable, "-m", "nnunetv2_recokd.cli", "demo", "--out", str(out), *SMALLEST]
    return out, subprocess.run(cmd, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (nnU-Net's predictor never raises the count), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
