"""The student's input: its channels, modality dropout, and what the trainer hands the teacher and the student."""

from __future__ import annotations

import json
from copy import deepcopy

import numpy as np
import pytest
import torch
from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization

from nnunetv2_recokd import sandbox
from nnunetv2_recokd.config import SettingsError
from nnunetv2_recokd.inputs.channels import (
    DATASET_KEY,
    ChannelError,
    blank_values,
    resolve_student_channels,
    student_dataset_json,
    student_input_files,
    student_plans,
)
from nnunetv2_recokd.inputs.dropout import apply_modality_dropout, draw_dropout_mask
from nnunetv2_recokd.inputs.view import StudentInput
from nnunetv2_recokd.trainers import nnUNetTrainerReCoKD, nnUNetTrainerStudent
from tests.tiny_nnunet import PATCH, make_trainer

torch.set_num_threads(1)

CT_PROPS = {"mean": 40.0, "std": 80.0, "percentile_00_5": -100.0, "percentile_99_5": 300.0, "max": 1000.0,
            "min": -1000.0, "median": 40.0}
DATASET = {"channel_names": {"0": "PET", "1": "CT", "2": "T1"}, "labels": {"background": 0, "organ": 1},
           "numTraining": 2, "file_ending": ".nii.gz"}


def test_channels_by_name_or_index_in_the_students_order():
    assert resolve_student_channels(["CT"], DATASET) == [1]
    assert resolve_student_channels([2, "PET"], DATASET) == [2, 0]
    assert resolve_student_channels(None, DATASET) is None
    assert resolve_student_channels([0, 1, 2], DATASET) is None  # every channel in order: nothing to select


@pytest.mark.parametrize("setting, message", [(["MR"], "'MR' is not a channel"), ([3], "3 is not a channel"),
                                              (["CT", 1], "names a channel twice"), ([], "is empty")])
def test_bad_channel_settings_name_the_valid_channels(setting, message):
    with pytest.raises(ChannelError, match=message) as e:
        resolve_student_channels(setting, DATASET)
    if setting:
        assert "0 (PET), 1 (CT), 2 (T1)" in str(e.value)


def test_student_dataset_and_plans_describe_its_channels_only():
    dataset = student_dataset_json(DATASET, [2, 1])
    assert dataset["channel_names"] == {"0": "T1", "1": "CT"}
    assert dataset[DATASET_KEY] == {"0": {"dataset_channel": 2, "name": "T1"},
                                    "1": {"dataset_channel": 1, "name": "CT"}}
    assert DATASET["channel_names"] == {"0": "PET", "1": "CT", "2": "T1"}  # the original is untouched
    plans = {"foreground_intensity_properties_per_channel": {"0": {"mean": 0}, "1": CT_PROPS, "2": {"mean": 2}},
             "configurations": {"3d_fullres": {"normalization_schemes": ["ZScoreNormalization", "CTNormalization",
                                                                         "ZScoreNormalization"],
                                               "use_mask_for_norm": [False, False, True]},
                                "3d_lowres": {"inherits_from": "3d_fullres"}}}
    out = student_plans(plans, [2, 1])
    assert out["configurations"]["3d_fullres"]["normalization_schemes"] == ["ZScoreNormalization", "CTNormalization"]
    assert out["configurations"]["3d_fullres"]["use_mask_for_norm"] == [True, False]
    assert out["configurations"]["3d_lowres"] == {"inherits_from": "3d_fullres"}
    assert out["foreground_intensity_properties_per_channel"] == {"0": {"mean": 2}, "1": CT_PROPS}
    assert len(plans["configurations"]["3d_fullres"]["normalization_schemes"]) == 3


def test_blank_scan_values_are_nnunets_normalisation_of_zeros():
    # z-score of a constant image: 0; CT: (clip(0, -100, 300) - 40) / 80 = -0.5
    values = blank_values(["ZScoreNormalization", "CTNormalization"], {"1": CT_PROPS}, [1, 0])
    assert values == [-0.5, 0.0]
    expected = CTNormalization(False, CT_PROPS).run(np.zeros((2, 2, 2), np.float32))
    assert np.allclose(expected, -0.5)


def test_dropout_rate_is_p_per_channel_and_never_all_channels():
    g = torch.Generator().manual_seed(0)
    for channels, p in ((2, 0.3), (3, 0.5), (4, 0.2)):
        mask = draw_dropout_mask(40000, channels, p, generator=g)
        assert not mask.all(1).any()  # a sample always keeps one channel
        rates = mask.float().mean(0)
        # binomial standard error at n = 40000 is <= 0.0025: 4 sigma
        assert torch.allclose(rates, torch.full((channels,), p), atol=0.01), (channels, p, rates)
    # two channels (PET/CT): one of them with probability 2p, never both
    mask = draw_dropout_mask(40000, 2, 0.3, generator=g)
    assert abs(mask.any(1).float().mean().item() - 0.6) < 0.01
    assert not draw_dropout_mask(1000, 3, 0.0, generator=g).any()


@pytest.mark.parametrize("channels, p, message", [(1, 0.2, "at least two"), (2, 0.6, r"\[0, 0.5\]"),
                                                  (3, 0.7, r"\[0, 0.667\]")])
def test_dropout_refuses_what_cannot_keep_a_channel(channels, p, message):
    with pytest.raises(ValueError, match=message):
        draw_dropout_mask(4, channels, p)


def test_dropout_blanks_with_the_blank_value_and_leaves_its_input():
    data = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(2, 3, 2, 2, 2)
    before = data.clone()
    mask = torch.tensor([[True, False, False], [False, True, True]])
    out = apply_modality_dropout(data, mask, [-1.0, -2.0, -3.0])
    assert torch.equal(data, before)
    assert torch.all(out[0, 0] == -1) and torch.equal(out[0, 1:], data[0, 1:])
    assert torch.equal(out[1, 0], data[1, 0]) and torch.all(out[1, 1] == -2) and torch.all(out[1, 2] == -3)


def test_student_input_selects_then_drops_only_in_training():
    view = StudentInput(channels=[2, 0], n_dataset_channels=3, blank=[-7.0, -9.0], dropout=0.5)
    data = torch.randn(64, 3, 2, 2, 2)
    before = data.clone()
    val = view(data, training=False)
    assert torch.equal(val, data[:, [2, 0]])
    torch.manual_seed(0)
    train = view(data, training=True)
    assert torch.equal(data, before)  # the teacher's batch
    dropped = torch.stack([(train[:, c] != data[:, s]).flatten(1).all(1) for c, s in enumerate([2, 0])], 1)
    assert dropped.any(1).all()  # p = 0.5 with two channels: exactly one channel of every sample
    assert not dropped.all(1).any()
    assert torch.all(train[:, 0][dropped[:, 0]] == -7) and torch.all(train[:, 1][dropped[:, 1]] == -9)


def test_student_input_files_link_the_students_channels_under_its_numbers(tmp_path):
    source = tmp_path / "imagesTs"
    source.mkdir()
    for case in ("a", "b"):
        for c in range(3):
            (source / f"{case}_{c:04d}.nii.gz").write_text(f"{case}{c}")
    student = student_dataset_json(DATASET, [2, 1])
    cases = student_input_files(source, tmp_path / "student", student)
    assert cases == ["a", "b"]
    assert sorted(p.name for p in (tmp_path / "student").iterdir()) == [
        "a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz"]
    assert (tmp_path / "student" / "a_0000.nii.gz").read_text() == "a2"
    assert (tmp_path / "student" / "b_0001.nii.gz").read_text() == "b1"
    (source / "b_0002.nii.gz").unlink()
    with pytest.raises(ChannelError, match="b_0002.nii.gz"):
        student_input_files(source, tmp_path / "again", student)


# ---------------------------------------------------------------------------------------------- the trainer
def _two_channel_setup(root, monkeypatch, config: dict):
    """A sandbox with a two-channel dataset (z-score 'main', CT 'ct'), a random two-channel teacher, settings."""
    plans = sandbox.unet_plans((16, 32, 64), PATCH)
    cfg = plans["configurations"]["3d_fullres"]
    cfg["normalization_schemes"] = ["ZScoreNormalization", "CTNormalization"]
    cfg["use_mask_for_norm"] = [False, False]
    plans["foreground_intensity_properties_per_channel"]["1"] = CT_PROPS
    dataset = {**sandbox.dataset_json(), "channel_names": {"0": "main", "1": "ct"}}
    env: dict = {}
    sandbox.prepare_folders(root, plans, env)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    teacher = sandbox.write_random_teacher(root / "teacher" / "nnUNetTrainer__nnUNetPlans__3d_fullres", plans, dataset)
    monkeypatch.setenv("RECOKD_TEACHER", str(teacher))
    (root / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("RECOKD_CONFIG", str(root / "config.json"))
    return plans, dataset


def _two_channel_batch(seed: int = 0) -> dict:
    batch = sandbox.make_batch(PATCH, 2, n_targets=2, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    batch["data"] = torch.cat([batch["data"], batch["data"] * 0.3 + torch.randn(batch["data"].shape, generator=g)], 1)
    return batch


def _inputs_seen(trainer) -> dict[str, torch.Tensor]:
    """What the student network and the teacher's encoder are given at each forward ("student", "teacher")."""
    seen: dict[str, torch.Tensor] = {}
    trainer.network.register_forward_pre_hook(lambda m, args: seen.__setitem__("student", args[0].clone()))
    trainer.teacher.network.network.encoder.register_forward_pre_hook(
        lambda m, args: seen.__setitem__("teacher", args[0].clone()))
    return seen


def test_one_channel_student_of_a_two_channel_teacher(tmp_path, monkeypatch):
    plans, dataset = _two_channel_setup(tmp_path, monkeypatch, {"student_channels": ["ct"]})
    trainer = make_trainer(nnUNetTrainerReCoKD, plans, dataset)
    trainer.initialize()
    assert trainer.network.encoder.stages[0][0].convs[0].conv.weight.shape[1] == 1
    assert trainer.teacher.network.network.encoder.stages[0][0].convs[0].conv.weight.shape[1] == 2
    seen = _inputs_seen(trainer)
    batch = _two_channel_batch()
    data = batch["data"].clone()
    trainer.current_epoch, trainer.num_epochs = 5, 10
    out = trainer.train_step(batch)
    assert np.isfinite(out["loss"]) and out["kd_sard_fg"] > 0
    assert torch.equal(seen["teacher"], data)  # the teacher reads both channels, untouched
    assert torch.equal(seen["student"], data[:, 1:2])  # the student its own
    assert torch.equal(batch["data"], data)
    assert np.isfinite(trainer.validation_step(_two_channel_batch(1))["loss"])


def test_modality_dropout_blanks_the_students_channels_only(tmp_path, monkeypatch):
    plans, dataset = _two_channel_setup(tmp_path, monkeypatch, {"modality_dropout": 0.5})
    trainer = make_trainer(nnUNetTrainerReCoKD, plans, dataset)
    trainer.initialize()
    assert trainer.student_input.blank == [0.0, -0.5]
    seen = _inputs_seen(trainer)
    batch = _two_channel_batch()
    data = batch["data"].clone()
    trainer.train_step(batch)
    assert torch.equal(seen["teacher"], data)
    student, blank = seen["student"], torch.tensor([0.0, -0.5]).view(1, 2, 1, 1, 1)
    dropped = (student == blank).flatten(2).all(2)  # (B, C)
    assert dropped.sum(1).tolist() == [1, 1]  # p = 0.5, two channels: one channel of each sample, never both
    assert torch.equal(student[~dropped], data[~dropped])
    trainer.validation_step(_two_channel_batch(1))  # no dropout at validation
    # the control trainer (no teacher) drops the same way
    control = make_trainer(nnUNetTrainerStudent, plans, dataset)
    control.initialize()
    control.network.register_forward_pre_hook(lambda m, args: seen.__setitem__("control", args[0].clone()))
    control.train_step(_two_channel_batch())
    assert (seen["control"] == blank).flatten(2).all(2).sum(1).tolist() == [1, 1]


@pytest.mark.parametrize("config, message", [({"student_channels": ["ct"], "modality_dropout": 0.2}, "at least two"),
                                             ({"modality_dropout": 0.6}, "above 0.5"),
                                             ({"student_channels": ["pet"]}, "'pet' is not a channel")])
def test_input_settings_that_cannot_work_fail_before_training(tmp_path, monkeypatch, config, message):
    plans, dataset = _two_channel_setup(tmp_path, monkeypatch, config)
    with pytest.raises((SettingsError, ChannelError), match=message):
        make_trainer(nnUNetTrainerReCoKD, plans, dataset).initialize()


def test_student_plans_keep_the_dataset_plans_intact(tmp_path, monkeypatch):
    plans, dataset = _two_channel_setup(tmp_path, monkeypatch, {"student_channels": [1]})
    trainer = make_trainer(nnUNetTrainerReCoKD, plans, dataset)
    original = deepcopy(trainer.plans_manager.plans)
    out = student_plans(trainer.plans_manager.plans, trainer.student_channels)
    assert out["configurations"]["3d_fullres"]["normalization_schemes"] == ["CTNormalization"]
    assert out["configurations"]["3d_fullres"]["recokd_student"]["input_channels"] == [1]
    assert trainer.plans_manager.plans["configurations"]["3d_fullres"]["normalization_schemes"] == \
        original["configurations"]["3d_fullres"]["normalization_schemes"]


def test_shared_attention_trainer_trains_one_cbam_per_stage_in_the_distiller(tmp_path, monkeypatch):
    from nnunetv2_recokd.trainers import nnUNetTrainerReCoKD_CBAM
    from tests.tiny_nnunet import setup_env, tiny_batch

    plans, dataset = setup_env(tmp_path, monkeypatch)
    trainer = make_trainer(nnUNetTrainerReCoKD_CBAM, plans, dataset)
    trainer.initialize()
    d = trainer.distiller
    assert d.attention_stages == ["enc1", "enc2"] and set(d.hooked_stages) >= {"enc1", "enc2"}
    cbam = {k: v.clone() for k, v in d.attention.state_dict().items() if ".cbam." in k}
    assert cbam and not any("cbam" in k for k in trainer.network.state_dict())  # never in the deployed student
    trainer.current_epoch, trainer.num_epochs = 5, 10
    out = trainer.train_step(tiny_batch())
    assert out["kd_attention"] > 0 and np.isfinite(out["loss"])
    after = d.attention.state_dict()
    assert all(not torch.equal(cbam[k], after[k]) for k in cbam)  # the shared blocks are trained
    assert d.term_factors(0.5)["attention"] == pytest.approx(0.1)  # past the 0.2 warm-up


def test_low_dose_degrades_the_students_ct_channel_only(tmp_path, monkeypatch):
    from nnunetv2_recokd.trainers import nnUNetTrainerReCoKD_lowDose

    plans, dataset = _two_channel_setup(tmp_path, monkeypatch, {"lowdose_probability": 1.0, "lowdose_dose": [0.05]})
    trainer = make_trainer(nnUNetTrainerReCoKD_lowDose, plans, dataset)
    trainer.initialize()
    degrade = trainer.student_input.degrade
    assert degrade.channels == [1] and degrade.props[1]["std"] == 80.0 and degrade.spacing_mm == [1.0, 1.0, 1.0]
    seen = _inputs_seen(trainer)
    batch = _two_channel_batch()
    data = batch["data"].clone()
    trainer.train_step(batch)
    assert torch.equal(seen["teacher"], data) and torch.equal(batch["data"], data)
    assert torch.equal(seen["student"][:, 0], data[:, 0])  # the z-score channel is no CT: untouched
    noise = (seen["student"][:, 1] - data[:, 1]) * 80  # in HU (std 80 of the CT normalisation)
    assert noise.std() > 5  # dose 0.05 of the scan's: visible noise
    assert abs(noise.mean()) < noise.std() / 4  # noise, not a shift
    trainer.validation_step(_two_channel_batch(1))  # validation sees clean inputs (checked in StudentInput)


@pytest.mark.parametrize("config, message", [
    ({"lowdose_probability": 0.5, "student_channels": ["main"]}, "needs a CT channel"),
    ({"lowdose_probability": 0.5, "lowdose_channels": ["main"]}, "main is ZScoreNormalization"),
    ({"lowdose_probability": 0.5, "student_channels": ["main"], "lowdose_channels": ["ct"]}, "ct is not read"),
    ({"lowdose_dose": [0.5, 0.1]}, "lo <= hi")])
def test_low_dose_settings_that_cannot_work_fail_before_training(tmp_path, monkeypatch, config, message):
    plans, dataset = _two_channel_setup(tmp_path, monkeypatch, config)
    with pytest.raises(SettingsError, match=message):
        make_trainer(nnUNetTrainerReCoKD, plans, dataset).initialize()


def test_modality_dropout_leaves_a_cascades_segmentation_channels_alone():
    # a 3d_cascade_fullres batch: the dataset's 2 image channels, then the previous stage's one-hot segmentation
    view = StudentInput(channels=None, n_dataset_channels=2, blank=[-7.0, -9.0], dropout=0.5)
    assert view.n_channels == 2
    data = torch.randn(64, 5, 2, 2, 2)
    torch.manual_seed(0)
    train = view(data, training=True)
    assert train.shape == data.shape
    assert torch.equal(train[:, 2:], data[:, 2:])  # never blanked
    dropped = torch.stack([(train[:, c] != data[:, c]).flatten(1).all(1) for c in range(2)], 1)
    assert dropped.sum(1).tolist() == [1] * 64  # p = 0.5 of two image channels: one per sample, never both
    assert torch.all(train[:, 0][dropped[:, 0]] == -7) and torch.all(train[:, 1][dropped[:, 1]] == -9)


def test_modality_dropout_student_trains_a_cascade_stage(tmp_path, monkeypatch):
    from nnunetv2_recokd.trainers import nnUNetTrainerStudent_modalityDropout

    plans, dataset = _two_channel_setup(tmp_path, monkeypatch, {"modality_dropout": 0.5})
    cfg = plans["configurations"]
    cfg["3d_lowres"] = {"inherits_from": "3d_fullres", "data_identifier": "nnUNetPlans_3d_lowres",
                        "next_stage": "3d_cascade_fullres"}
    cfg["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    trainer = nnUNetTrainerStudent_modalityDropout(plans={**deepcopy(plans), "continue_training": False},
                                                   configuration="3d_cascade_fullres", fold=0,
                                                   dataset_json=dataset, device=torch.device("cpu"))
    trainer.initialize()
    assert trainer.num_input_channels == 4  # 2 scans + one-hot of the 2 foreground labels (nnU-Net's count)
    seen: dict = {}
    trainer.network.register_forward_pre_hook(lambda m, args: seen.__setitem__("student", args[0].clone()))
    batch = _two_channel_batch()
    one_hot = torch.stack([(batch["target"][0][:, 0] == k).float() for k in (1, 2)], 1)
    batch["data"] = torch.cat([batch["data"], one_hot], 1)
    data = batch["data"].clone()
    assert np.isfinite(trainer.train_step(batch)["loss"])
    assert torch.equal(seen["student"][:, 2:], data[:, 2:])  # the previous stage's segmentation is kept
    assert (seen["student"][:, :2] != data[:, :2]).flatten(2).all(2).sum(1).tolist() == [1, 1]


def _under_cpu_bf16_autocast(trainer, monkeypatch) -> list[bool]:
    """Run the trainer's step under CPU bf16 autocast (as CUDA fp16 autocast on a GPU); returns, per call of the
    student's view, whether autocast was on."""
    monkeypatch.setattr(trainer, "_autocast", lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    view, calls = trainer.student_input, []

    def recording(data, training):
        calls.append(torch.is_autocast_enabled("cpu"))
        return view(data, training)

    monkeypatch.setattr(trainer, "student_input", recording)
    return calls


@pytest.mark.parametrize("trainer_name", ["nnUNetTrainerReCoKD_lowDose", "nnUNetTrainerStudent_lowDose"])
def test_low_dose_view_is_built_outside_autocast_by_both_trainers_of_the_pair(tmp_path, monkeypatch, trainer_name):
    from nnunetv2_recokd import trainers

    plans, dataset = _two_channel_setup(tmp_path, monkeypatch, {"lowdose_probability": 1.0, "lowdose_dose": [0.05],
                                                               "reco_warmup": 0.0})
    trainer = make_trainer(getattr(trainers, trainer_name), plans, dataset)
    trainer.initialize()
    calls = _under_cpu_bf16_autocast(trainer, monkeypatch)
    out = trainer.train_step(_two_channel_batch())  # the sparse projector raised NotImplementedError under bf16
    assert calls == [False]
    assert np.isfinite(out["loss"])
