"""Parameters, GFLOPs and latency helpers used by the demo and the report."""

import pytest
from torch import nn

from nnunetv2_recokd.profiling import conv_gflops, count_parameters, inference_latency_ms


def test_conv_gflops_hand_computed():
    # Conv3d 1 -> 2, kernel 3, padding 1 on a 4^3 patch: 2 * 64 outputs, each 1 * 27 multiply-adds
    # -> 3456 MACs = 6912 FLOPs. ConvTranspose3d 2 -> 1, kernel 2, stride 2: 2 * 64 inputs spread over 8 kernel
    # taps into 1 channel -> 1024 MACs = 2048 FLOPs.
    net = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ConvTranspose3d(2, 1, 2, stride=2))
    assert conv_gflops(net, (4, 4, 4)) * 1e9 == pytest.approx(6912 + 2048)


def test_count_parameters_counts_shared_modules_once():
    conv = nn.Conv3d(1, 2, 3)  # 2*27 weights + 2 biases = 56
    net = nn.Module()
    net.a, net.b = conv, conv
    assert count_parameters(net) == 56


def test_inference_latency_positive_and_restores_nothing_else():
    net = nn.Conv3d(1, 2, 3, padding=1)
    ms = inference_latency_ms(net, (8, 8, 8), runs=2)
    assert ms > 0 and not net.training and net.weight.grad is None
