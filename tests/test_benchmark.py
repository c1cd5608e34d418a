"""The step-cost benchmark runs end to end on a tiny U-Net and reports consistent numbers."""

import builtins
import json
import os
from pathlib import Path

import pytest

from nnunetv2_recokd import cli, sandbox
from nnunetv2_recokd.evaluation import benchmark
from nnunetv2_recokd.evaluation.tables import benchmark_table


def test_benchmark_tiny_setting_reports_ratios_and_latency():
    def ours(env):
        return {k: v for k, v in env.items() if k.startswith(("nnUNet_", "RECOKD_"))}

    env_before = ours(os.environ)
    plans = sandbox.unet_plans((32, 64, 128), (16, 16, 16), batch_size=2)  # student [8, 16, 32]
    import torch

    trainers = ["nnUNetTrainerLogitKD", "nnUNetTrainerReCoKDGraph", "nnUNetTrainerReCoKD_lowDose"]
    result = benchmark.run_setting("tiny", plans, trainers, torch.device("cpu"), steps=1, warmup=0)
    assert ours(os.environ) == env_before  # the sandbox's nnUNet_* variables do not leak
    # the low-dose trainer needs a CT channel: the benchmark's plans get one (a copy; the input plans unchanged)
    assert [r["trainer"] for r in result["trainers"]] == trainers
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["ZScoreNormalization"]
    assert benchmark.as_ct_plans(plans)["configurations"]["3d_fullres"]["normalization_schemes"] == ["CTNormalization"]
    for row in result["trainers"]:
        assert row["ms_per_step"] > 0 and row["ratio_to_floor"] == row["ms_per_step"] / result["floor_ms"]
        assert row["peak_gib"] is None  # CPU: no peak memory figure rather than a made-up one
    assert result["teacher_params"] > 10 * result["student_params"] > 0
    reco = result["reco_terms"]
    assert reco["stages"] == 2 and reco["ours_ms"] > 0 and reco["direct_ms"] > 0
    # the direct formulas keep the adapted student, differences and squares (float32, 32 channels at 16^3) for
    # backward: more than one (2, 32, 16, 16, 16) float32 tensor; ours keeps per-voxel and per-channel sums only
    assert reco["direct_saved_mib"] > 2 * 32 * 16 ** 3 * 4 / 2 ** 20 > reco["ours_saved_mib"]
    assert reco["ours_peak_mib"] is None
    graph = result["graph_terms"]
    # dec0 at 16^3 and dec1 at 8^3 of make_batch's target: organ, one lesion (two in sample 1), background node
    assert graph["stages"] == ["dec0", "dec1"] and graph["ms"] > 0
    assert graph["nodes_per_graph"][:2] == [3, 4]
    text = benchmark_table([result])
    assert "| nnUNetTrainerReCoKDGraph |" in text and "n/a (CPU)" in text and "| direct |" in text
    assert "Region-graph terms alone on dec0, dec1" in text


def test_terms_only_skips_the_training_steps():
    plans = sandbox.unet_plans((16, 32, 64), (8, 8, 8), batch_size=2)
    import torch

    result = benchmark.run_setting("tiny", plans, ["nnUNetTrainerReCoKD"], torch.device("cpu"), steps=1, warmup=0,
                                   terms_only=True)
    assert result["trainers"] == [] and "floor_ms" not in result
    assert result["reco_terms"]["ours_ms"] > 0 and result["graph_terms"]["ms"] > 0
    text = benchmark_table([result])
    assert "| ours |" in text and "ratio to floor" not in text


HIPPOCAMPUS_PLANS = (Path(__file__).resolve().parents[2] / "shared" / "teachers" / "Dataset004_Hippocampus" /
                     "nnUNetTrainer__nnUNetPlans__3d_fullres" / "plans.json")


def test_default_setting_is_built_in_and_needs_no_file(tmp_path, monkeypatch):
    # an installed user: no repository around the package, so no ../shared/teachers either
    monkeypatch.chdir(tmp_path)
    args = cli.build_parser().parse_args(["benchmark"])
    assert args.setting == ["hippocampus"] and args.plans is None
    with monkeypatch.context() as m:  # any file read while resolving the default setting fails the test
        m.setattr(builtins, "open", lambda file, *a, **k: pytest.fail(f"opened {file}"))
        m.setattr(Path, "read_text", lambda self, *a, **k: pytest.fail(f"read {self}"))
        catalogue = benchmark.settings_catalogue(args.plans)
        plans = {name: catalogue[name]() for name in args.setting}
    cfg = plans["hippocampus"]["configurations"]["3d_fullres"]
    assert cfg["patch_size"] == [40, 56, 40] and cfg["batch_size"] == 7
    assert cfg["architecture"]["arch_kwargs"]["features_per_stage"] == [32, 64, 128, 256]


@pytest.mark.skipif(not HIPPOCAMPUS_PLANS.is_file(), reason="the Hippocampus teacher's plans are not checked out")
def test_hippocampus_setting_is_the_architecture_of_nnunets_hippocampus_plans():
    real = json.loads(HIPPOCAMPUS_PLANS.read_text())["configurations"]["3d_fullres"]
    ours = benchmark.settings_catalogue(None)["hippocampus"]()["configurations"]["3d_fullres"]
    for key in ("patch_size", "batch_size", "architecture"):
        assert ours[key] == real[key], key


def test_setting_plans_without_plans_file_says_it_needs_one():
    with pytest.raises(SystemExit, match="--setting plans needs --plans FILE"):
        cli.main(["benchmark", "--setting", "plans"])


def test_plans_file_problems_are_clear(tmp_path):
    with pytest.raises(SystemExit, match="file not found"):
        cli.main(["benchmark", "--setting", "plans", "--plans", str(tmp_path / "nope.json")])
    (tmp_path / "p.json").write_text(json.dumps({"configurations": {"2d": {}}}))
    with pytest.raises(SystemExit, match="3d_fullres"):
        cli.main(["benchmark", "--setting", "plans", "--plans", str(tmp_path / "p.json")])
    with pytest.raises(SystemExit, match="only read by --setting plans"):
        cli.main(["benchmark", "--plans", str(tmp_path / "p.json")])


def test_plans_setting_reads_the_given_file(tmp_path):
    plans = sandbox.unet_plans((8, 16), (8, 8, 8), dataset_name="Dataset004_Hippocampus")
    (tmp_path / "nnUNetPlans.json").write_text(json.dumps(plans))
    read = benchmark.settings_catalogue(str(tmp_path / "nnUNetPlans.json"))["plans"]()
    assert read["configurations"] == plans["configurations"] and read["dataset_name"] == sandbox.SANDBOX_DATASET


def test_unknown_trainer_names_the_valid_ones():
    with pytest.raises(SystemExit) as raised:
        cli.main(["benchmark", "--trainers", "nnUNetTrainerReCoKD", "nnUNetTrainerNope"])
    message = str(raised.value)
    assert "nnUNetTrainerNope" in message and "nnUNetTrainerReCoKD" in message and "nnUNetTrainerGraphKD" in message
    assert "nnUNetTrainerReCoKD_noCA" in message and "nnUNetTrainerStudent" not in message
    # a trainer that does no distillation has nothing to benchmark
    with pytest.raises(SystemExit, match="unknown --trainers nnUNetTrainerStudent;"):
        cli.main(["benchmark", "--trainers", "nnUNetTrainerStudent"])


def test_benchmark_with_several_teachers_has_a_floor_per_teacher_count():
    import torch

    plans = sandbox.unet_plans((16, 32, 64), (8, 8, 8), batch_size=2)
    result = benchmark.run_setting("tiny", plans, ["nnUNetTrainerLogitKD", "nnUNetTrainerReCoKD"],
                                   torch.device("cpu"), steps=1, warmup=0, teachers=[1, 3])
    assert [f["teachers"] for f in result["floors"]] == [1, 3]
    assert result["floor_ms"] == result["floors"][0]["floor_ms"]  # top-level keys: the first count
    assert [(r["teachers"], r["trainer"]) for r in result["trainers"]] == [
        (1, "nnUNetTrainerLogitKD"), (1, "nnUNetTrainerReCoKD"),
        (3, "nnUNetTrainerLogitKD"), (3, "nnUNetTrainerReCoKD")]
    for row in result["trainers"]:
        floor = next(f for f in result["floors"] if f["teachers"] == row["teachers"])
        assert row["ratio_to_floor"] == row["ms_per_step"] / floor["floor_ms"]
    text = benchmark_table([result])
    assert "| 3 | nnUNetTrainerReCoKD |" in text and "3 teacher(s)" in text
    with pytest.raises(SystemExit, match="--teachers"):
        benchmark.run_setting("tiny", plans, ["nnUNetTrainerReCoKD"], torch.device("cpu"), 1, 0, teachers=[0])



def test_modality_dropout_runs_on_a_two_channel_copy_and_rows_arrive_as_they_are_timed():
    import torch

    plans = sandbox.unet_plans((16, 32, 64), (8, 8, 8), batch_size=2)
    seen = []
    result = benchmark.run_setting("tiny", plans, ["nnUNetTrainerReCoKD_modalityDropout", "nnUNetTrainerReCoKD"],
                                   torch.device("cpu"), steps=1, warmup=0, terms=False,
                                   on_row=lambda partial: seen.append([r["trainer"] for r in partial["trainers"]]))
    assert result["channels"] == 2 and plans["configurations"]["3d_fullres"]["normalization_schemes"] == [
        "ZScoreNormalization"]  # a copy: the given plans keep their one channel
    assert seen == [["nnUNetTrainerReCoKD_modalityDropout"],
                    ["nnUNetTrainerReCoKD_modalityDropout", "nnUNetTrainerReCoKD"]]
    assert all(r["teachers_loaded"] == 1 and r["ms_per_step"] > 0 for r in result["trainers"])
    assert "reco_terms" not in result and "graph_terms" not in result  # terms=False: the steps only
    two = benchmark.with_channels(plans, 2)
    assert two["configurations"]["3d_fullres"]["use_mask_for_norm"] == [False, False]
    assert set(two["foreground_intensity_properties_per_channel"]) == {"0", "1"}
