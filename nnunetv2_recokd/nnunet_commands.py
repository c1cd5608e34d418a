"""nnU-Net's console scripts (nnUNetv2_train, nnUNetv2_predict, ...) run as the user runs them, each with its
output in a log: the demo and gpu-check drive nnU-Net through these, so what they measure is what a user gets."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional


def nnunet_command(name: str) -> str:
    """Path of an installed console script (nnUNetv2_train, ...), next to this Python first."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: is nnU-Net v2 installed in this environment?")
    return found


# the lines of a command's log that are echoed while it runs: nnU-Net's epochs, add-unlabeled's cases
PROGRESS_LINE = re.compile(r"(?:^|: )(Epoch \d+)$|^(\[\d+/\d+\] \S+)")


def run_logged(args: list[str], env: dict, log: Path, timeout: Optional[int] = None,
               label: Optional[str] = None, poll_seconds: float = 2.0) -> str:
    """Run an nnU-Net command with its output in `log`; on failure raise with the log's tail. With `label`, every
    epoch nnU-Net starts and every case add-unlabeled labels is echoed as it appears, with the elapsed time
    ("    teacher: Epoch 3 (1 min 12 s)"), so minutes of training never pass in silence."""
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen([nnunet_command(args[0]), *args[1:]], env=env, stdout=f, stderr=subprocess.STDOUT)
        seen = 0
        while True:
            try:
                proc.wait(timeout=poll_seconds)
                finished = True
            except subprocess.TimeoutExpired:
                finished = False
            if timeout is not None and time.time() - start > timeout:
                proc.kill()
                proc.wait()
                raise subprocess.TimeoutExpired(args, timeout)
            if label is not None:
                lines = log.read_text(errors="replace").splitlines()
                for line in lines[seen:] if finished else lines[seen:-1]:  # a last line may still be written
                    match = PROGRESS_LINE.search(line.strip())
                    if match:
                        print(f"    {label}: {match.group(1) or match.group(2)} ({elapsed(time.time() - start)})",
                              flush=True)
                seen = len(lines) if finished else max(seen, len(lines) - 1)
            if finished:
                break
    text = log.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed (exit {proc.returncode}); last lines of {log}:\n"
                           f"{text[-3000:]}")
    return text


def elapsed(seconds: float) -> str:
    """'1 min 12 s', or '12 s' under a minute."""
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"
