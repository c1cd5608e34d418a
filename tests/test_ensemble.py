"""One student from several teachers: ensemble logit KD, per-teacher modules, fold teachers, leakage, --c."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nnunetv2_recokd import sandbox
from nnunetv2_recokd.config import SettingsError, default_settings
from nnunetv2_recokd.distiller import Distiller, module_key
from nnunetv2_recokd.losses.logits import LogitKDLoss
from nnunetv2_recokd.sandbox import make_batch
from nnunetv2_recokd.teacher import TeacherError, resolve_teachers
from nnunetv2_recokd.trainers import (
    nnUNetTrainerLogitKD,
    nnUNetTrainerLogitKD_ensemble,
    nnUNetTrainerReCoKD,
    nnUNetTrainerReCoKD_ensemble,
    nnUNetTrainerReCoKDGraph,
)
from tests.tiny_nnunet import make_trainer, setup_env, tiny_batch

TEACHER_FOLDER = "nnUNetTrainer__nnUNetPlans__3d_fullres"


def _voxel(values: list[float]) -> torch.Tensor:
    return torch.tensor(values).reshape(1, len(values), 1, 1, 1)


# ------------------------------------------------------------------------------------------- ensemble logit KD
def test_ensemble_logit_kd_hand_computed():
    # teachers: softmax [0.75, 0.25] and [0.25, 0.75] -> mean [0.5, 0.5]; student [0.75, 0.25]
    # KL(mean || student) = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.5 ln(4/3)
    student, a, b = _voxel([math.log(3), 0.0]), _voxel([math.log(3), 0.0]), _voxel([0.0, math.log(3)])
    assert LogitKDLoss(1.0)(student, [a, b]).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    # weights 3 : 1 -> teacher mean [0.625, 0.375]
    expected = 0.625 * math.log(0.625 / 0.75) + 0.375 * math.log(0.375 / 0.25)
    assert LogitKDLoss(1.0)(student, [a, b], weights=[3, 1]).item() == pytest.approx(expected, rel=1e-6)
    # sigmoid (region-based): per channel p = 0.75 and 0.25 -> mean 0.5 against the student's 0.75
    sig = LogitKDLoss(1.0, sigmoid=True)(_voxel([math.log(3)]), [_voxel([math.log(3)]), _voxel([-math.log(3)])])
    assert sig.item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)


@pytest.mark.parametrize("sigmoid", [False, True])
def test_ensemble_logit_kd_equals_kd_against_averaged_probabilities(sigmoid):
    torch.manual_seed(0)
    t = 2.0
    student = torch.randn(2, 3, 4, 4, 4)
    teachers = [torch.randn(2, 3, 4, 4, 4) * 3 for _ in range(3)]
    weights = [0.2, 0.5, 0.3]
    if sigmoid:
        p = sum(w * torch.sigmoid(z / t) for w, z in zip(weights, teachers))
        q = torch.sigmoid(student / t)
        expected = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).mean() * t * t
    else:
        p = sum(w * F.softmax(z / t, 1) for w, z in zip(weights, teachers))
        expected = (p * (p.log() - F.log_softmax(student / t, 1))).sum(1).mean() * t * t
    loss = LogitKDLoss(t, sigmoid=sigmoid)(student, teachers, weights=weights)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # one teacher listed alone is bit for bit the single-teacher loss
    assert torch.equal(LogitKDLoss(t, sigmoid=sigmoid)(student, [teachers[0]]),
                       LogitKDLoss(t, sigmoid=sigmoid)(student, teachers[0]))
    with pytest.raises(ValueError, match="2 teacher weights for 3 teachers"):
        LogitKDLoss(t)(student, teachers, weights=[1, 1])


# ------------------------------------------------------------------------------------------------- distiller
CHANNELS = {"enc0": 4, "enc1": 8, "enc2": 8, "dec0": 4, "dec1": 8}
OTHER_CHANNELS = {"enc0": 6, "enc1": 10, "enc2": 12, "dec0": 6, "dec1": 10}  # a teacher of other plans


def _settings(**changes):
    values = {"logit_weight": 1.0, "graph_lesion_labels": [2], "graph_min_component_voxels": 1, **changes}
    return default_settings("nnUNetTrainerReCoKDGraph").replace(**values)


def _inputs(seed: int, channels: dict[str, int]):
    g = torch.Generator().manual_seed(seed)
    shapes = {"enc0": (8, 8, 8), "enc1": (4, 4, 4), "dec0": (8, 8, 8), "dec1": (4, 4, 4)}
    features = {k: torch.randn(2, channels[k], *s, generator=g) for k, s in shapes.items()}
    outputs = [torch.randn(2, 3, 8, 8, 8, generator=g), torch.randn(2, 3, 4, 4, 4, generator=g)]
    return features, outputs


def test_one_teacher_keeps_the_checkpoint_keys_other_teachers_get_their_own_modules():
    one = Distiller(_settings(), CHANNELS, CHANNELS, n_stages=3, ds_weights=[1.0, 0.0])
    two = Distiller(_settings(), CHANNELS, [CHANNELS, OTHER_CHANNELS], n_stages=3, ds_weights=[1.0, 0.0])
    assert set(one.reco) == {"enc0", "enc1"} and set(one.graph) == {"dec0", "dec1"}
    assert set(two.reco) == {"enc0", "enc1", "enc0_teacher1", "enc1_teacher1"}
    assert set(two.graph) == {"dec0", "dec1", "dec0_teacher1", "dec1_teacher1"}
    assert set(one.state_dict()) < set(two.state_dict())  # teacher 0's keys are the one-teacher keys
    # each teacher's adapter maps the student into ITS channel space
    assert two.reco["enc0"].adapter.out_channels == 4 and two.reco["enc0_teacher1"].adapter.out_channels == 6
    assert two.teacher_weights == [0.5, 0.5]
    with pytest.raises(ValueError, match="1 value"):
        Distiller(_settings(teacher_weights=[1.0]), CHANNELS, [CHANNELS, CHANNELS], n_stages=3, ds_weights=[1.0])


@pytest.mark.parametrize("weights", [None, [1.0, 3.0]])
def test_two_identical_teachers_give_every_term_of_one_teacher(weights):
    one = Distiller(_settings(), CHANNELS, CHANNELS, n_stages=3, ds_weights=[1.0, 0.5])
    two = Distiller(_settings(teacher_weights=weights), CHANNELS, [CHANNELS, CHANNELS], n_stages=3,
                    ds_weights=[1.0, 0.5])
    for family in ("reco", "graph"):  # the same module weights for both teacher slots
        for name, module in getattr(one, family).items():
            for i in range(2):
                getattr(two, family)[module_key(name, i)].load_state_dict(module.state_dict())
    student, student_out = _inputs(0, CHANNELS)
    teacher, teacher_out = _inputs(1, CHANNELS)
    targets = make_batch((8, 8, 8), 2, n_targets=2)["target"]
    total_1, terms_1 = one(student, teacher, student_out, teacher_out, targets, progress=1.0)
    total_2, terms_2 = two(student, [teacher, teacher], student_out, [teacher_out, teacher_out], targets, 1.0)
    assert set(terms_1) == set(terms_2) >= {"logit", "sard_fg", "sard_bg", "sard_att", "ca", "graph_node",
                                             "graph_edge", "graph_gw"}
    for key, value in terms_1.items():
        assert value.item() > 0, key
        assert terms_2[key].item() == pytest.approx(value.item(), rel=1e-5), key
    assert total_2.item() == pytest.approx(total_1.item(), rel=1e-5)


def test_feature_terms_are_the_teacher_weighted_mean_of_each_teachers_terms():
    weights = [1.0, 3.0]
    two = Distiller(_settings(logit_weight=0.0), CHANNELS, [CHANNELS, OTHER_CHANNELS], n_stages=3,
                    ds_weights=[1.0, 0.5], teacher_weights=weights)
    singles = []
    for i, channels in enumerate((CHANNELS, OTHER_CHANNELS)):  # each teacher alone, with its modules
        single = Distiller(_settings(logit_weight=0.0), CHANNELS, channels, n_stages=3, ds_weights=[1.0, 0.5])
        for family in ("reco", "graph"):
            for name, module in getattr(single, family).items():
                module.load_state_dict(getattr(two, family)[module_key(name, i)].state_dict())
        singles.append(single)
    student, _ = _inputs(0, CHANNELS)
    teachers = [_inputs(1, CHANNELS)[0], _inputs(2, OTHER_CHANNELS)[0]]
    targets = make_batch((8, 8, 8), 2, n_targets=2)["target"]
    total, terms = two(student, teachers, [], [], targets, progress=0.5)
    alone = [single(student, t, [], [], targets, progress=0.5) for single, t in zip(singles, teachers)]
    assert total.item() == pytest.approx(0.25 * alone[0][0].item() + 0.75 * alone[1][0].item(), rel=1e-5)
    for key in terms:
        expected = 0.25 * alone[0][1][key].item() + 0.75 * alone[1][1][key].item()
        assert terms[key].item() == pytest.approx(expected, rel=1e-5), key
    with pytest.raises(ValueError, match="features of 1 teacher"):
        two(student, teachers[0], [], [], targets, progress=0.5)


# ------------------------------------------------------------------------------------------------ the trainer
def _fold_teachers(root: Path, plans: dict, dataset: dict, folds, seeds=None) -> Path:
    """A model folder at nnU-Net's default location with one random teacher per fold (checkpoint names its fold)."""
    folder = Path(os.environ["nnUNet_results"]) / plans["dataset_name"] / TEACHER_FOLDER
    for i, fold in enumerate(folds):
        scratch = sandbox.write_random_teacher(root / f"scratch_{fold}", plans, dataset,
                                               seed=(seeds or list(range(len(folds))))[i])
        checkpoint = torch.load(scratch / "fold_0" / "checkpoint_final.pth", weights_only=False)
        checkpoint["init_args"]["fold"] = fold
        (folder / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, folder / f"fold_{fold}" / "checkpoint_final.pth")
        for name in ("plans.json", "dataset.json"):
            shutil.copy(scratch / name, folder / name)
    return folder


def _config(tmp_path: Path, monkeypatch, **values) -> None:
    path = tmp_path / "override.json"
    path.write_text(json.dumps(values))
    monkeypatch.setenv("RECOKD_CONFIG", str(path))


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _two_teacher_recokd(tmp_path, monkeypatch, plans, dataset, first: Path, second: Path, weights: list[float]):
    """An initialised ReCo-KD trainer taught by the two teacher folders (the 'teacher' setting, no warm-up)."""
    _config(tmp_path, monkeypatch, teacher=[str(first), str(second)], reco_warmup=0.0, teacher_weights=weights)
    monkeypatch.delenv("RECOKD_TEACHER")
    trainer = make_trainer(nnUNetTrainerReCoKD, plans, dataset)
    trainer.initialize()
    return trainer


def test_teachers_of_other_plans_train_per_teacher_adapters_checkpoint_and_resume(tmp_path, monkeypatch):
    plans, dataset = setup_env(tmp_path, monkeypatch)
    first = Path(os.environ["RECOKD_TEACHER"])
    wide = copy.deepcopy(plans)  # a second teacher of other plans: other widths, same data and strides
    wide["plans_name"] = "nnUNetPlansWide"
    wide["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [24, 48, 96]
    second = sandbox.write_random_teacher(tmp_path / "wide" / "nnUNetTrainer__nnUNetPlansWide__3d_fullres", wide,
                                          dataset, seed=1)
    trainer = _two_teacher_recokd(tmp_path, monkeypatch, plans, dataset, first, second, [1, 2])
    assert [t.location.model_folder for t in trainer.teachers] == [first, second]
    d = trainer.distiller
    assert d.teacher_weights == pytest.approx([1 / 3, 2 / 3])
    assert d.reco["enc0"].adapter.out_channels == 16 and d.reco["enc0_teacher1"].adapter.out_channels == 24
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_optimizer for p in d.parameters())
    assert len(trainer.teacher_recorders) == 2 and all(r.num_hooks == 2 for r in trainer.teacher_recorders)
    teachers_before = [_snapshot(t.network) for t in trainer.teachers]
    before = _snapshot(d)
    out = trainer.train_step(tiny_batch())
    assert out["kd_sard_fg"] > 0 and out["kd_ca"] > 0
    moved = {k for k, v in d.state_dict().items() if not torch.equal(before[k], v)}
    for key in ("enc0", "enc0_teacher1", "enc1", "enc1_teacher1"):  # every teacher's adapter learns
        assert {f"{key}.adapter.weight", f"{key}.adapter.bias"} <= {k[len("reco."):] for k in moved}, key
    for teacher, snapshot in zip(trainer.teachers, teachers_before):
        assert all(torch.equal(v, teacher.network.state_dict()[k]) for k, v in snapshot.items())
        assert not teacher.network.training
    log = Path(trainer.log_file).read_text()
    assert "Loaded teacher 1 of 2" in log and "Loaded teacher 2 of 2" in log

    path = str(tmp_path / "ckpt.pth")
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    assert saved["recokd"]["teacher"] == [str(first / "fold_0" / "checkpoint_final.pth"),
                                          str(second / "fold_0" / "checkpoint_final.pth")]
    assert any(k.startswith("reco.enc1_teacher1.teacher_block.") for k in saved["recokd"]["distiller"])

    restored = make_trainer(nnUNetTrainerReCoKD, plans, dataset, continue_training=True)  # --c
    restored.load_checkpoint(path)
    assert len(restored.teachers) == 2
    for k, v in d.state_dict().items():
        assert torch.equal(v, restored.distiller.state_dict()[k]), k
    old, new = trainer.optimizer.state_dict(), restored.optimizer.state_dict()
    assert len(new["param_groups"]) == 2 and len(new["param_groups"][1]["params"]) == len(list(d.parameters()))
    assert old["state"].keys() == new["state"].keys()
    assert all(torch.equal(old["state"][i]["momentum_buffer"], new["state"][i]["momentum_buffer"])
               for i in old["state"])

    # --c with only one of the two teachers: stopped, both lists named
    _config(tmp_path, monkeypatch, teacher=[str(first)], reco_warmup=0.0)
    with pytest.raises(TeacherError, match="allow_teacher_change") as e:
        make_trainer(nnUNetTrainerReCoKD, plans, dataset, continue_training=True).load_checkpoint(path)
    assert str(second) in str(e.value)
    # allowed to change teachers, but one teacher has fewer modules than the checkpoint: the setting is named
    _config(tmp_path, monkeypatch, teacher=[str(first)], reco_warmup=0.0, allow_teacher_change=True)
    with pytest.raises(SettingsError, match="teacher: ") as e:
        make_trainer(nnUNetTrainerReCoKD, plans, dataset, continue_training=True).load_checkpoint(path)
    assert "teacher_weights" not in str(e.value)


def test_every_teacher_problem_is_reported_at_once(tmp_path, monkeypatch):
    plans, dataset = setup_env(tmp_path, monkeypatch)
    good = Path(os.environ["RECOKD_TEACHER"])
    other = copy.deepcopy(plans)
    other["configurations"]["3d_fullres"]["spacing"] = [2.0, 2.0, 2.0]
    wrong = sandbox.write_random_teacher(tmp_path / "wrong" / TEACHER_FOLDER, other, dataset)
    monkeypatch.setenv("RECOKD_TEACHER", os.pathsep.join([str(good), str(tmp_path / "missing_a"), str(wrong),
                                                          str(tmp_path / "missing_b")]))
    with pytest.raises(TeacherError) as e:
        make_trainer(nnUNetTrainerReCoKD, plans, dataset).initialize()
    assert "missing_a" in str(e.value) and "missing_b" in str(e.value)  # both missing teachers, one error
    monkeypatch.setenv("RECOKD_TEACHER", os.pathsep.join([str(good), str(wrong)]))
    trainer = make_trainer(nnUNetTrainerReCoKD, plans, dataset)
    with pytest.raises(TeacherError, match="spacing") as e:
        trainer.initialize()
    assert str(wrong) in str(e.value) and trainer.network is None  # nothing built
    monkeypatch.setenv("RECOKD_TEACHER", os.pathsep.join([str(good), str(good)]))
    with pytest.raises(TeacherError, match="listed twice"):
        make_trainer(nnUNetTrainerReCoKD, plans, dataset).initialize()
    copy_of_good = shutil.copytree(good, tmp_path / "copy" / good.name)
    monkeypatch.setenv("RECOKD_TEACHER", os.pathsep.join([str(good), str(copy_of_good / "fold_0")]))
    _config(tmp_path, monkeypatch, teacher_weights=[1.0, 2.0, 3.0])
    with pytest.raises(SettingsError, match="3 value"):
        make_trainer(nnUNetTrainerReCoKD, plans, dataset).initialize()


def test_teacher_folds_expand_the_default_location(tmp_path, monkeypatch):
    plans, dataset = setup_env(tmp_path, monkeypatch, teacher=False)
    folder = _fold_teachers(tmp_path, plans, dataset, [0, 1, 2])
    results, name = os.environ["nnUNet_results"], plans["dataset_name"]

    def folds(setting):
        return [loc.checkpoint.parent.name for loc in resolve_teachers(
            None, setting, name, "3d_fullres", 0, "nnUNetTrainer", "nnUNetPlans", "checkpoint_final.pth")]

    assert folds(None) == ["fold_0"]  # one teacher, the student's fold, as before
    assert folds("all") == ["fold_0", "fold_1", "fold_2"]
    assert folds([2, 1]) == ["fold_2", "fold_1"]
    with pytest.raises(TeacherError, match="fold_4"):
        folds([1, 4])
    # a fold folder or checkpoint is one teacher whatever teacher_folds says
    assert len(resolve_teachers(str(folder / "fold_1"), "all", name, "3d_fullres", 0, "nnUNetTrainer", "nnUNetPlans",
                                "checkpoint_final.pth")) == 1
    empty = Path(results) / name / "nnUNetTrainer__nnUNetPlans__2d"
    empty.mkdir()
    with pytest.raises(TeacherError, match="holds no fold"):
        resolve_teachers(None, "all", name, "2d", 0, "nnUNetTrainer", "nnUNetPlans", "checkpoint_final.pth")


def test_fold_ensemble_leakage_is_refused_unless_allowed_and_then_marked(tmp_path, monkeypatch):
    plans, dataset = setup_env(tmp_path, monkeypatch, teacher=False)
    _fold_teachers(tmp_path, plans, dataset, [0, 1, 2])
    _config(tmp_path, monkeypatch, teacher_folds="all")
    with pytest.raises(TeacherError) as e:
        make_trainer(nnUNetTrainerReCoKD, plans, dataset).initialize()
    assert "folds 1, 2" in str(e.value) and "allow_leaky_teacher" in str(e.value)
    monkeypatch.delenv("RECOKD_CONFIG")
    trainer = make_trainer(nnUNetTrainerReCoKD_ensemble, plans, dataset)  # shipped: all folds, leak accepted
    trainer.initialize()
    assert [t.fold for t in trainer.teachers] == [0, 1, 2]
    assert set(trainer.distiller.reco) == {"enc0", "enc1", "enc0_teacher1", "enc1_teacher1", "enc0_teacher2",
                                           "enc1_teacher2"}
    assert trainer._leakage["teacher_fold"] == [1, 2] and trainer._leakage["cases"] == 1
    assert "OPTIMISTIC" in Path(trainer.log_file).read_text()
    path = str(tmp_path / "ckpt.pth")
    trainer.train_step(tiny_batch())
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=False)["recokd"]["teacher_saw_validation_cases"]["teacher_fold"] == [1, 2]


def test_logit_kd_ensemble_distils_the_mean_of_the_fold_teachers(tmp_path, monkeypatch):
    plans, dataset = setup_env(tmp_path, monkeypatch, teacher=False)
    _fold_teachers(tmp_path, plans, dataset, [0, 1])
    trainer = make_trainer(nnUNetTrainerLogitKD_ensemble, plans, dataset)
    trainer.initialize()
    assert len(trainer.teachers) == 2 and not trainer._teacher_encoder_only
    batch = tiny_batch()
    with torch.no_grad():
        student = trainer.network(batch["data"])
        teachers = [t.network(batch["data"]) for t in trainer.teachers]
    assert not torch.equal(teachers[0][0], teachers[1][0])  # different teachers
    t = trainer.settings.logit_temperature
    p = (F.softmax(teachers[0][0] / t, 1) + F.softmax(teachers[1][0] / t, 1)) / 2
    expected = (p * (p.log() - F.log_softmax(student[0] / t, 1))).sum(1).mean() * t * t  # DS weights [1, 0]
    out = trainer.train_step(batch)
    assert out["kd_logit"] == pytest.approx(expected.item(), rel=1e-5)


def test_one_teacher_checkpoint_layout_is_unchanged(tmp_path, monkeypatch):
    """Checkpoints written before ensembles resume: one teacher saves its path (a string) and the old keys."""
    plans, dataset = setup_env(tmp_path, monkeypatch)
    for cls in (nnUNetTrainerReCoKDGraph, nnUNetTrainerLogitKD):
        trainer = make_trainer(cls, plans, dataset)
        trainer.initialize()
        path = str(tmp_path / f"{cls.__name__}.pth")
        trainer.save_checkpoint(path)
        saved = torch.load(path, weights_only=False)["recokd"]
        assert isinstance(saved["teacher"], str)
        assert not any("_teacher" in k for k in saved["distiller"])


def test_teachers_run_one_at_a_time_and_their_shares_are_logged(tmp_path, monkeypatch):
    import weakref

    plans, dataset = setup_env(tmp_path, monkeypatch)
    first = Path(os.environ["RECOKD_TEACHER"])
    second = sandbox.write_random_teacher(tmp_path / "second" / "nnUNetTrainer__nnUNetPlans__3d_fullres", plans,
                                          dataset, seed=1)
    trainer = _two_teacher_recokd(tmp_path, monkeypatch, plans, dataset, first, second, [1, 3])
    one, two = (t.network.network for t in trainer.teachers)
    recorded, alive_when_second_ran = [], []
    one.encoder.stages[0].register_forward_hook(lambda m, i, o: recorded.append(weakref.ref(o)))
    two.encoder.register_forward_pre_hook(lambda m, a: alive_when_second_ran.append(recorded[-1]() is not None))
    out = trainer.train_step(tiny_batch())
    # teacher 1's full-resolution feature was used and released before teacher 2 ran
    assert alive_when_second_ran == [False]
    for term in ("sard_fg", "sard_bg", "sard_att", "ca"):
        assert out[f"teacher0_{term}"] + out[f"teacher1_{term}"] == pytest.approx(out[f"kd_{term}"], rel=1e-5)
        assert out[f"teacher0_{term}"] > 0 and out[f"teacher1_{term}"] > 0
    trainer.on_train_epoch_end([out, out])
    log = Path(trainer.log_file).read_text()
    assert "feature terms per teacher" in log and "teacher 2: ca" in log
    logged = trainer.logger.local_logger.my_fantastic_logging
    assert logged["train_teacher1_ca"][-1] == pytest.approx(out["teacher1_ca"])
