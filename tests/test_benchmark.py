"""The step-cost benchmark runs end to end on a tiny U-Net and reports consistent numbers."""

import os

from nnunetv2_recokd import sandbox
from nnunetv2_recokd.cli import benchmark


def test_benchmark_tiny_setting_reports_ratios_and_latency():
    def ours(env):
        return {k: v for k, v in env.items() if k.startswith(("nnUNet_", "RECOKD_"))}

    env_before = ours(os.environ)
    plans = sandbox.unet_plans((32, 64, 128), (16, 16, 16), batch_size=2)  # student [8, 16, 32]
    import torch

    result = benchmark.run_setting("tiny", plans, ["nnUNetTrainerLogitKD", "nnUNetTrainerReCoKDGraph"],
                                   torch.device("cpu"), steps=1, warmup=0)
    assert ours(os.environ) == env_before  # the sandbox's nnUNet_* variables do not leak
    assert [r["trainer"] for r in result["trainers"]] == ["nnUNetTrainerLogitKD", "nnUNetTrainerReCoKDGraph"]
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
    text = benchmark.to_markdown([result])
    assert "| nnUNetTrainerReCoKDGraph |" in text and "n/a (CPU)" in text and "| direct |" in text
    assert "Region-graph terms alone on dec0, dec1" in text


def test_terms_only_skips_the_training_steps():
    plans = sandbox.unet_plans((16, 32, 64), (8, 8, 8), batch_size=2)
    import torch

    result = benchmark.run_setting("tiny", plans, ["nnUNetTrainerReCoKD"], torch.device("cpu"), steps=1, warmup=0,
                                   terms_only=True)
    assert result["trainers"] == [] and "floor_ms" not in result
    assert result["reco_terms"]["ours_ms"] > 0 and result["graph_terms"]["ms"] > 0
    text = benchmark.to_markdown([result])
    assert "| ours |" in text and "ratio to floor" not in text
