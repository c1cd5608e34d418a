"""Fixtures shared by test modules.

one_torch_thread: tiny networks run fastest on one thread (thread start-up and contention dominate), and a busy
machine does not stall them. smallest_demo: the smallest demo, run once per session, is also the trained workspace
of the end-to-end tests (its synthetic Dataset990, nnU-Net's plans and preprocessing, and its trained teacher), so
the suite plans and trains that teacher once (suite time).

Under `-n 2` (the README's test command, pytest-xdist; pyproject sets --dist loadgroup): each module is one group,
so its module fixtures are built once, on one worker; the modules on the smallest demo's workspace are one group,
run first: the longest (about half the suite's serial time), it starts at once while the other worker takes the
rest."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

# the smallest setting of the README's demo command (its default story: 2 labelled cases, here 2 teacher-labelled
# scans); --num-train 10 / --num-test 2 are the end-to-end tests' cases
SMALLEST = ["--device", "cpu", "--teacher-epochs", "1", "--student-epochs", "1", "--iterations", "4", "--num-train",
            "10", "--num-test", "2", "--unlabeled", "2", "--warmup", "0"]


DEMO_GROUP = "smallest_demo"


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    """One xdist group per module, the smallest demo's modules together and first (see the module docstring)."""
    def group(item) -> str:
        return DEMO_GROUP if DEMO_GROUP in item.fixturenames else item.nodeid.split("::")[0]

    items.sort(key=lambda item: group(item) != DEMO_GROUP)  # stable: collection order otherwise
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))


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
