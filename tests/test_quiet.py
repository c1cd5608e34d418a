"""No console notes a user cannot act on: nnU-Net's predictor prints "perform_everything_on_device=True is only
supported for cuda devices!" for every CPU predictor, whatever it is given; our commands that build one keep it out."""

from __future__ import annotations

from nnunetv2_recokd import sandbox
from nnunetv2_recokd.evaluation import load_inference_network


def test_the_demo_and_the_report_build_their_networks_on_the_cpu_silently(tmp_path, capsys):
    folder = sandbox.write_random_student(tmp_path / "nnUNetTrainerReCoKD__nnUNetPlans__3d_fullres",
                                          sandbox.unet_plans((8, 16, 32), (16, 16, 16)), sandbox.dataset_json())
    network, patch, channels = load_inference_network(folder, device="cpu")
    assert list(patch) == [16, 16, 16] and network is not None and channels == 1
    out = capsys.readouterr()
    assert "cuda" not in out.out + out.err
