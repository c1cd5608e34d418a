"""The README's "run it" command on its smallest setting: synthetic data through nnU-Net's own commands."""

from __future__ import annotations

import json
import subprocess
import sys

from nnunetv2_recokd.cli import demo


def test_demo_smallest_setting_writes_table_and_figure(tmp_path):
    out = tmp_path / "demo"
    # --warmup 0: the ReCo-KD terms act from the first step (a warm-up over 1 epoch keeps lambda at 0)
    cmd = [sys.executable, "-m", "nnunetv2_recokd.cli", "demo", "--out", str(out), "--device", "cpu",
           "--teacher-epochs", "1", "--student-epochs", "1", "--iterations", "4", "--num-train", "6",
           "--num-test", "2", "--warmup", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[1/8 " in proc.stdout and "[8/8 " in proc.stdout  # progress from the first to the last step
    assert str(out / "nnunet" / "results") in proc.stdout  # where it trains, said up front
    rows = json.loads((out / "table.json").read_text())["rows"]
    assert [r["trainer"] for r in rows] == ["nnUNetTrainerTeacher", "nnUNetTrainerStudent", "nnUNetTrainerReCoKD"]
    teacher, student, distilled = rows
    assert 12 < teacher["params"] / student["params"] < 20 and student["params"] == distilled["params"]
    assert teacher["gflops_per_patch"] > 8 * student["gflops_per_patch"]
    for r in rows:
        assert r["cases"] == 2 and r["evaluated_on"] == "held-out test cases" and r["seeds"] == [0]
        assert set(r["dice"]) == {"organ", "lesion"} and all(0 <= d <= 1 for d in r["dice"].values())
        assert r["latency_ms"] > 0
        # seconds per held-out case of the whole stock nnUNetv2_predict command and of our predict on the runtime
        assert r["stock_s_per_case"] > 0 and r["runtime_s_per_case"] > 0
    # distillation really added to the ReCo-KD student's loss; the control has no such term
    assert distilled["kd_weighted_per_epoch"][0] and min(distilled["kd_weighted_per_epoch"][0]) > 0
    assert student["kd_weighted_per_epoch"] == [[]]
    config = json.loads((out / "config_nnUNetTrainerReCoKD_seed0.json").read_text())
    assert config["seed"] == 0 and config["reco_warmup"] == 0.0
    table = (out / "table.md").read_text()
    assert f"{teacher['params'] / 1e6:.3f}" in table and "`nnUNetTrainerReCoKD`" in table
    assert "s / case, nnUNetv2_predict | s / case, openvino |" in table
    assert f"| {distilled['stock_s_per_case']:.2f} | {distilled['runtime_s_per_case']:.2f} |" in table
    assert (out / "figure.png").read_bytes()[:4] == b"\x89PNG"


def _row(trainer: str, organ: list[float], lesion: list[float]) -> dict:
    means = [(a + b) / 2 for a, b in zip(organ, lesion)]
    return {"model": trainer, "trainer": trainer, "seeds": list(range(len(organ))),
            "dice": {"organ": sum(organ) / len(organ), "lesion": sum(lesion) / len(lesion)},
            "dice_sd": {"organ": demo._spread(organ), "lesion": demo._spread(lesion)},
            "mean_dice": sum(means) / len(means), "mean_dice_sd": demo._spread(means), "evaluated_on": "held-out",
            "cases": 4, "params": 1e6, "gflops_per_patch": 1.0, "latency_ms": 10.0, "patch_size": [8, 8, 8],
            "device": "cpu"}


def test_table_gives_mean_and_sample_spread_over_seeds(tmp_path):
    rows = [_row("teacher", [0.9], [0.8]), _row("student", [0.5, 0.7, 0.9], [0.2, 0.4, 0.3])]
    demo.write_outputs(rows, tmp_path, 90.0)
    table = (tmp_path / "table.md").read_text()
    line = next(li for li in table.splitlines() if li.startswith("| student "))
    # organ: mean 0.7, sample sd 0.2; lesion: mean 0.3, sd 0.1; mean Dice per seed 0.35, 0.55, 0.6
    assert "| 0.700 ± 0.200 | 0.300 ± 0.100 | 0.500 ± 0.132 |" in line
    assert "| 0.900 | 0.800 |" in next(li for li in table.splitlines() if li.startswith("| teacher "))
    assert "1.5 min" in table and "standard deviation" in table
