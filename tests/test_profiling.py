"""Parameters, GFLOPs and latency helpers used by the demo and the report."""

import torch
from torch import nn

from nnunetv2_recokd.evaluation.networks import conv_gflops, count_parameters, inference_latency_ms


def test_conv_gflops_hand_computed():
    # Conv3d 1 -> 2, kernel 3, padding 1 on a 4^3 patch: 2 * 64 outputs, each 1 * 27 multiply-adds
    # -> 3456 MACs = 6912 FLOPs. ConvTranspose3d 2 -> 1, kernel 2, stride 2: 2 * 64 inputs spread over 8 kernel
    # taps into 1 channel -> 1024 MACs = 2048 FLOPs. Linear 512 -> 3 on the flattened 8^3 output: 1536 MACs
    # = 3072 FLOPs. Biases, the activation and the flatten cost nothing.
    net = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.LeakyReLU(), nn.ConvTranspose3d(2, 1, 2, stride=2),
                        nn.Flatten(), nn.Linear(512, 3))
    assert conv_gflops(net, (4, 4, 4)) * 1e9 == 6912 + 2048 + 3072


def test_conv_gflops_counts_transposed_and_grouped_convolutions():
    # ConvTranspose3d 4 -> 6, groups 2, kernel (1, 2, 3) on a 2 x 3 x 5 input: every input voxel of every input
    # channel feeds 6 / 2 output channels over 6 taps -> 4 * 30 * 3 * 6 = 2160 MACs
    net = nn.ConvTranspose3d(4, 6, (1, 2, 3), groups=2)
    assert conv_gflops(net, (2, 3, 5), in_channels=4) * 1e9 == 2 * 2160


def test_conv_gflops_restores_the_mode_and_records_no_gradient():
    net = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.Dropout(0.5))
    net.train()
    assert conv_gflops(net, (4, 4, 4)) > 0
    assert net.training and all(p.grad is None for p in net.parameters())
    net.eval()
    conv_gflops(net, (4, 4, 4))
    assert not net.training


def test_conv_gflops_of_a_plain_unet_matches_the_convolutions_it_runs():
    # the counter sees every convolution nnU-Net's PlainConvUNet runs; compare with the MACs read off its layers
    from nnunetv2_recokd import sandbox

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(sandbox.unet_plans((4, 8, 16), (8, 8, 8)))
    net = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 3, False)
    macs = 0

    def hook(module, inputs, output):
        nonlocal macs
        if isinstance(module, nn.ConvTranspose3d):
            macs += inputs[0].numel() * module.out_channels * module.weight[0, 0].numel()
        elif isinstance(module, nn.Conv3d):
            macs += output.numel() * module.in_channels * module.weight[0, 0].numel()

    handles = [m.register_forward_hook(hook) for m in net.modules()]
    with torch.no_grad():
        net.eval()(torch.zeros(1, 1, 8, 8, 8))
    for h in handles:
        h.remove()
    assert any(isinstance(m, nn.ConvTranspose3d) for m in net.modules()) and macs > 0
    assert conv_gflops(net, (8, 8, 8)) * 1e9 == 2 * macs


def test_count_parameters_counts_shared_modules_once():
    conv = nn.Conv3d(1, 2, 3)  # 2*27 weights + 2 biases = 56
    net = nn.Module()
    net.a, net.b = conv, conv
    assert count_parameters(net) == 56


def test_inference_latency_positive_and_restores_nothing_else():
    net = nn.Conv3d(1, 2, 3, padding=1)
    ms = inference_latency_ms(net, (8, 8, 8), runs=2)
    assert ms > 0 and not net.training and net.weight.grad is None
