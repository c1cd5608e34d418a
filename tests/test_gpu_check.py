"""examples/gpu_check.sh in its CPU rehearsal (GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1): every part runs end to end
and lands in one JSON; a failed or stopped part keeps the others. About a minute and a half on 2 CPU cores."""

from __future__ import annotations

import json
import os
import subprocess
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch

from nnunetv2_recokd import cli
from nnunetv2_recokd.evaluation import benchmark, gpu_check

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "gpu_check.sh"


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "result" / "gpu_check.json"
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_QUICK": "1",
           # the run must ignore the caller's nnU-Net folders and distillation settings
           "nnUNet_raw": "/nonexistent/raw", "nnUNet_results": "/nonexistent/results", "RECOKD_CONFIG": "/nonexistent"}
    env.pop("OUT", None)
    start = time.time()
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=600)
    return proc, json.loads(out.read_text()) if out.is_file() else None, time.time() - start


def test_every_part_is_ok_and_recorded_with_the_environment(rehearsal):
    proc, report, seconds = rehearsal
    assert report is not None, proc.stdout + proc.stderr
    statuses = {name: part["status"] for name, part in report["parts"].items()}
    assert proc.returncode == 0, (statuses, {k: v.get("error") for k, v in report["parts"].items()})
    assert list(report["parts"]) == gpu_check.QUICK.parts() == ["benchmark/tiny", "teachers/tiny", "lowdose",
                                                                   "training"]
    assert set(statuses.values()) == {"ok"}
    assert report["mode"] == "quick" and report["requested_device"] == "cpu"
    assert report["versions"]["torch"] == torch.__version__
    assert report["versions"]["nnunetv2"] == metadata.version("nnunetv2")
    assert report["device_name"].startswith("CPU")
    assert report["work"] is None  # the temporary nnU-Net folders are gone
    for part in report["parts"].values():
        assert 0 < part["seconds"] <= part["limit_s"]
    assert sum(p["seconds"] for p in report["parts"].values()) < report["seconds"] < seconds
    print({name: round(part["seconds"], 1) for name, part in report["parts"].items()}, f"total {seconds:.0f} s")


def test_benchmark_part_times_every_distillation_trainer_against_its_floor(rehearsal):
    result = rehearsal[1]["parts"]["benchmark/tiny"]["result"]
    rows = {r["trainer"]: r for r in result["rows"]}
    assert sorted(rows) == sorted(benchmark.distillation_trainers())
    assert list(rows)[:4] == list(benchmark.DEFAULT_TRAINERS)  # kept first when a GPU run hits its limit
    for name, row in rows.items():
        assert row["ms_per_step"] > 0 and row["floor_ms"] > 0
        assert row["ratio_to_floor"] == pytest.approx(row["ms_per_step"] / row["floor_ms"])
        assert row["peak_gib"] is None and row["meets_targets"] is None  # CPU: no made-up memory figure
        # modality dropout blanks one of several channels: its own run on a two-channel copy, with its own floor
        assert row["channels"] == (2 if "modalityDropout" in name else 1)
    assert rows["nnUNetTrainerReCoKD_modalityDropout"]["floor_ms"] != rows["nnUNetTrainerReCoKD"]["floor_ms"]
    assert result["skipped"]["peak_memory"] == gpu_check.NO_CUDA
    assert result["runs"][0]["reco_terms"]["ours_ms"] > 0 and result["runs"][0]["graph_terms"]["ms"] > 0
    assert "| nnUNetTrainerReCoKD_CBAM |" in result["markdown"]


def test_teachers_part_distils_from_1_2_and_5_teachers(rehearsal):
    result = rehearsal[1]["parts"]["teachers/tiny"]["result"]
    assert sorted((r["trainer"], r["teachers"]) for r in result["rows"]) == sorted(
        (t, n) for t in gpu_check.ENSEMBLE_TRAINERS for n in (1, 2, 5))
    for run in result["runs"]:
        for row in run["trainers"]:
            assert row["teachers_loaded"] == row["teachers"]  # the trainer really held N teachers
            assert row["ratio_to_floor"] > 0
        forwards = {f["teachers"]: f["teacher_forward_ms"] for f in run["floors"]}
        assert forwards[5] > forwards[1] > 0  # five teacher forwards cost more than one


def test_lowdose_part_degrades_the_students_input_only_in_the_lowdose_trainers(rehearsal):
    result = rehearsal[1]["parts"]["lowdose"]["result"]
    rows = {r["trainer"]: r for r in result["settings"]["tiny"]["rows"]}
    assert sorted(rows) == sorted(t for pair in gpu_check.LOWDOSE_PAIRS for t in pair)
    for name, row in rows.items():
        low = name.endswith("_lowDose")
        assert row["input_degraded_every_step"] is low and row["input_degraded_any_step"] is low, name
        assert row["ms_per_step"] > 0 and row["loss_finite"] and row["steps_seen"] >= 2
        assert row["autocast_every_step"] is False and row["autocast_dtype"] is None  # CPU: no autocast, as nnU-Net
        assert row["output_dtype"] == "float32"
        if low:
            assert row["ratio_to_full_dose"] > 0
    assert result["skipped"]["cuda_autocast"].startswith(gpu_check.NO_CUDA)


def test_training_part_finishes_a_real_nnunetv2_train(rehearsal):
    result = rehearsal[1]["parts"]["training"]["result"]
    assert result["finished"] is True and result["exit_code"] == 0
    assert result["trainer"] == "nnUNetTrainerReCoKD" and result["nnUNet_compile"] == "unset"
    assert result["seconds"] > 0 and result["plan_seconds"] > 0
    assert len(result["epoch_seconds"]) == gpu_check.QUICK.train_epochs
    assert 0 <= result["validation_mean_dice"] <= 1
    assert isinstance(result["compile_log"], list)  # on a CPU nnU-Net does not compile and says nothing
    assert result["skipped"]["torch_compile"].startswith(gpu_check.NO_CUDA)


def test_a_failed_part_keeps_the_others(tmp_path):
    out = tmp_path / "gpu_check.json"
    code = gpu_check.run_all(out, "cpu", True, ["nope", "lowdose"], budget=300, keep_work=False)
    report = json.loads(out.read_text())
    assert code == 1
    assert report["parts"]["nope"]["status"] == "failed" and "unknown part nope" in report["parts"]["nope"]["error"]
    assert report["parts"]["lowdose"]["status"] == "ok"
    assert report["parts"]["lowdose"]["result"]["settings"]["tiny"]["rows"]


def _processes_with_environment(text: str) -> list[str]:
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if text.encode() in environ.read_bytes():
                found.append(environ.parent.name)
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_a_part_past_its_limit_is_stopped_with_its_children(tmp_path):
    env = gpu_check._child_env(tmp_path)  # every process of the part has tmp_path in its environment
    (tmp_path / "logs").mkdir()
    start = time.time()
    # 8 s: the part is then in nnUNetv2_plan_and_preprocess, a process of its own (with its worker processes)
    entry = gpu_check.run_child("training", "cpu", True, tmp_path, env, limit=8)
    assert time.time() - start < 40
    assert entry["status"] == "failed" and entry["error"].startswith("timed out after 8 s")
    assert entry["seconds"] >= 8 and entry["log_tail"] is not None
    # the part's whole session was stopped, the nnU-Net command it had started included
    left = _processes_with_environment(str(tmp_path))
    assert left == [], [Path(f"/proc/{pid}/status").read_text()[:300] for pid in left]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_stopping_the_script_stops_the_part_and_keeps_the_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_QUICK": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(["bash", str(SCRIPT), str(out), "--parts", "lowdose", "training"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob("gpu_check_*/lowdose")) and time.time() < deadline:
        time.sleep(0.1)  # the lowdose part has started (its work folder is made after its imports)
    proc.terminate()  # what a caller's time limit does to the command
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + 15, output
    report = json.loads(out.read_text())
    assert report["parts"]["lowdose"]["status"] == "failed" and report["parts"]["lowdose"]["stopped"] is True
    assert report["parts"]["training"]["status"] == "skipped"
    assert _processes_with_environment(str(tmp_path)) == []  # the part's processes went with it
    assert not list(tmp_path.glob("gpu_check_*"))  # and its work folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without CUDA")
def test_cuda_requested_without_cuda_still_writes_the_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    assert cli.main(["gpu-check", "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["cuda_available"] is False and report["parts"]
    assert all(p["status"] == "failed" and "no CUDA" in p["error"] for p in report["parts"].values())


def test_unknown_part_names_the_parts():
    with pytest.raises(SystemExit, match="benchmark/unet6_128"):
        cli.main(["gpu-check", "--parts", "nope"])
