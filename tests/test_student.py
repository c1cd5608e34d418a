"""The student: nnU-Net's planned network with narrower stages, its width recorded in the plans."""

import copy

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from nnunetv2_recokd.sandbox import unet_plans
from nnunetv2_recokd.student import (
    PLANS_KEY,
    build_student_network,
    count_parameters,
    record_student_spec,
    scaled_features,
    student_arch_kwargs,
    student_spec,
)

FEATURES = [32, 64, 128]


def tiny_plans() -> dict:
    """A minimal nnU-Net plans dict: one 3D configuration, 3-stage PlainConvUNet."""
    return unet_plans(FEATURES, (16, 16, 16), dataset_name="Dataset999_Tiny")


def managers(plans=None):
    pm = PlansManager(plans or tiny_plans())
    return pm, pm.get_configuration("3d_fullres")


def conv_out_channels(module: nn.Module) -> list[int]:
    return [m.out_channels for m in module.modules() if isinstance(m, nn.Conv3d)]


# ------------------------------------------------------------------------------------------ scaled_features
def test_scaled_features_quarter_width():
    assert scaled_features([32, 64, 128, 256], 0.25, 8) == [8, 16, 32, 64]
    assert scaled_features([32, 64, 128, 256, 320, 320], 0.25, 8) == [8, 16, 32, 64, 80, 80]
    assert scaled_features([32, 64, 128, 256], 1.0, 8) == [32, 64, 128, 256]
    assert scaled_features([32, 64, 128, 256], 0.5, 8) == [16, 32, 64, 128]


def test_scaled_features_min_channels_floor():
    assert scaled_features([32, 64, 128, 256], 0.125, 8) == [8, 8, 16, 32]
    assert scaled_features([32, 64, 128], 0.25, 24) == [24, 24, 32]


def test_scaled_features_never_above_teacher():
    # the floor would exceed the teacher's own width at the first stages
    assert scaled_features([4, 8, 64], 0.25, 16) == [4, 8, 16]
    for width in (0.1, 0.25, 0.5, 1.0):
        for c_s, c_t in zip(scaled_features([3, 7, 32, 320], width, 8), [3, 7, 32, 320]):
            assert 1 <= c_s <= c_t


@pytest.mark.parametrize("width", [0, 0.0, -0.25, 1.5, 1.0001])
def test_scaled_features_rejects_width_outside_unit_interval(width):
    with pytest.raises(ValueError, match="width"):
        scaled_features([32, 64], width, 8)


def test_scaled_features_rejects_an_empty_stage():
    with pytest.raises(ValueError) as e:
        scaled_features([32, 64, 128], 0.01, 0)  # round(0.32) = 0, round(0.64) = 1
    assert "[0]" in str(e.value)


def test_student_arch_kwargs_does_not_touch_the_cached_manager():
    _, cm = managers()
    before = copy.deepcopy(cm.network_arch_init_kwargs)
    kwargs = student_arch_kwargs(cm.network_arch_init_kwargs, 0.25, 8)
    assert kwargs["features_per_stage"] == [8, 16, 32]
    assert cm.network_arch_init_kwargs == before
    assert cm.network_arch_init_kwargs["features_per_stage"] == FEATURES


# -------------------------------------------------------------------------------------------- networks
def test_build_student_network_channels_and_size():
    _, cm = managers()
    student = build_student_network(cm, 1, 3, enable_deep_supervision=False, width=0.25, min_channels=8)
    full = build_student_network(cm, 1, 3, enable_deep_supervision=False, width=1.0, min_channels=8)
    assert [stage[-1].convs[-1].conv.out_channels for stage in student.encoder.stages] == [8, 16, 32]
    assert [stage[-1].convs[-1].conv.out_channels for stage in full.encoder.stages] == [32, 64, 128]
    assert set(conv_out_channels(student.encoder)) == {8, 16, 32}
    # decoder: stages at 16 then 8 channels, then a 3-class 1x1x1 seg layer
    assert [s.convs[-1].conv.out_channels for s in student.decoder.stages] == [16, 8]
    assert student.decoder.seg_layers[-1].out_channels == 3
    ratio = count_parameters(student) / count_parameters(full)
    assert 1 / 20 < ratio < 1 / 12, ratio
    # and it runs, at nnU-Net's input layout
    with torch.no_grad():
        out = student(torch.zeros(1, 1, 16, 16, 16))
    assert out.shape == (1, 3, 16, 16, 16)


def test_build_student_network_deep_supervision_outputs():
    _, cm = managers()
    net = build_student_network(cm, 2, 4, enable_deep_supervision=True, width=0.5, min_channels=8)
    assert net.encoder.stages[0][0].convs[0].conv.in_channels == 2
    with torch.no_grad():
        out = net(torch.zeros(1, 2, 16, 16, 16))
    assert [tuple(o.shape) for o in out] == [(1, 4, 16, 16, 16), (1, 4, 8, 8, 8)]


def test_count_parameters_counts_shared_encoder_once():
    _, cm = managers()
    net = build_student_network(cm, 1, 3, False, 0.25, 8)
    assert net.decoder.encoder is net.encoder
    expected = sum(p.numel() for p in set(net.parameters()))
    assert count_parameters(net) == expected
    net.encoder.requires_grad_(False)
    assert count_parameters(net, trainable_only=True) == expected - sum(p.numel() for p in net.encoder.parameters())


# ------------------------------------------------------------------------------- the width in the plans
def test_record_student_spec_writes_plans_and_cached_manager():
    plans = tiny_plans()
    pm, cm = managers(plans)
    record_student_spec(pm.plans, cm, "3d_fullres", 0.5, 4, extra={"trainer": "x"})
    expected = {"width": 0.5, "min_channels": 4, "trainer": "x"}
    assert plans["configurations"]["3d_fullres"][PLANS_KEY] == expected
    assert cm.configuration[PLANS_KEY] == expected
    # nnU-Net caches the manager: later lookups see the record too
    assert pm.get_configuration("3d_fullres").configuration[PLANS_KEY]["width"] == 0.5
    assert student_spec(cm.configuration, 0.25, 8) == {"width": 0.5, "min_channels": 4, "input_channels": None}
    record_student_spec(pm.plans, cm, "3d_fullres", 0.5, 4, extra={"input_channels": [1]})
    assert student_spec(cm.configuration, 0.25, 8)["input_channels"] == [1]


def test_student_spec_falls_back_to_defaults():
    _, cm = managers()
    assert PLANS_KEY not in cm.configuration
    assert student_spec(cm.configuration, 0.25, 8) == {"width": 0.25, "min_channels": 8, "input_channels": None}
    assert student_spec({PLANS_KEY: {"width": 0.125}}, 0.25, 8) == {"width": 0.125, "min_channels": 8,
                                                                     "input_channels": None}
    assert student_spec({PLANS_KEY: None}, 0.5, 2) == {"width": 0.5, "min_channels": 2, "input_channels": None}


def _trainer_cls():
    from nnunetv2_recokd.trainers import nnUNetTrainerLogitKD

    return nnUNetTrainerLogitKD


def test_trainer_builds_the_recorded_width_like_nnunetv2_predict():
    cls = _trainer_cls()
    plans = tiny_plans()
    plans["configurations"]["3d_fullres"][PLANS_KEY] = {"width": 0.5, "min_channels": 8}
    pm, cm = managers(plans)
    net = cls.build_network_architecture(pm, cm, 1, 3, enable_deep_supervision=False)
    assert [s[-1].convs[-1].conv.out_channels for s in net.encoder.stages] == [16, 32, 64]
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)  # no deep supervision list


def test_trainer_builds_the_class_default_width_without_a_record():
    cls = _trainer_cls()
    pm, cm = managers()
    net = cls.build_network_architecture(pm, cm, 1, 3, enable_deep_supervision=False)
    assert [s[-1].convs[-1].conv.out_channels for s in net.encoder.stages] == [8, 16, 32]
    # the cached manager still describes nnU-Net's full-width plans
    assert cm.network_arch_init_kwargs["features_per_stage"] == FEATURES


def test_trainer_build_ignores_recokd_config(tmp_path, monkeypatch):
    """nnUNetv2_predict must rebuild what was trained: only plans.json decides, not today's environment."""
    cls = _trainer_cls()
    override = tmp_path / "o.json"
    override.write_text('{"student_width": 1.0}')
    monkeypatch.setenv("RECOKD_CONFIG", str(override))
    pm, cm = managers()
    net = cls.build_network_architecture(pm, cm, 1, 3, enable_deep_supervision=False)
    assert net.encoder.stages[0][-1].convs[-1].conv.out_channels == 8
