"""The README's "run it" command on its smallest setting: synthetic data through nnU-Net's own commands."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_smallest_setting_writes_table_and_figure(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "nnunetv2_recokd.cli", "demo", "--out", str(out), "--device", "cpu",
           "--teacher-epochs", "1", "--student-epochs", "1", "--iterations", "4", "--num-train", "6",
           "--num-test", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[1/8 " in proc.stdout and "[8/8 " in proc.stdout  # progress from the first to the last step
    rows = json.loads((out / "table.json").read_text())
    assert [r["trainer"] for r in rows] == ["nnUNetTrainerTeacher", "nnUNetTrainerStudent", "nnUNetTrainerReCoKD"]
    teacher, student, distilled = rows
    assert 12 < teacher["params"] / student["params"] < 20 and student["params"] == distilled["params"]
    assert teacher["gflops_per_patch"] > 8 * student["gflops_per_patch"]
    for r in rows:
        assert r["cases"] == 2 and r["evaluated_on"] == "held-out test cases"
        assert set(r["dice"]) == {"organ", "lesion"} and all(0 <= d <= 1 for d in r["dice"].values())
        assert r["latency_ms"] > 0
    table = (out / "table.md").read_text()
    assert f"{teacher['params'] / 1e6:.3f}" in table and "`nnUNetTrainerReCoKD`" in table
    assert (out / "figure.png").read_bytes()[:4] == b"\x89PNG"
