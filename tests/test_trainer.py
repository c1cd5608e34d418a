"""Trainer-level tests on a tiny in-process nnU-Net setup: one train step, optimizer, checkpoint, errors."""

from __future__ import annotations

import json

import pytest
import torch

from nnunetv2_recokd.config import SettingsError, default_settings
from nnunetv2_recokd.teacher import TeacherError
from nnunetv2_recokd.trainers import (
    nnUNetTrainerGraphKD,
    nnUNetTrainerLogitKD,
    nnUNetTrainerLogitKD_CB,
    nnUNetTrainerLogitKD_CWD,
    nnUNetTrainerReCoKD,
    nnUNetTrainerReCoKD_w8,
    nnUNetTrainerReCoKDGraph,
    nnUNetTrainerStudent,
)
from tests.tiny_nnunet import make_trainer, setup_env, tiny_batch


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], after: torch.nn.Module | dict[str, torch.Tensor]) -> set[str]:
    """Keys whose tensors differ between a snapshot and a module (or another snapshot)."""
    state = after.state_dict() if isinstance(after, torch.nn.Module) else after
    return {k for k, v in state.items() if not torch.equal(before[k], v)}


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    return setup_env(tmp_path, monkeypatch)


def test_recokd_step_trains_student_and_distillation_modules_not_teacher(tiny):
    trainer = make_trainer(nnUNetTrainerReCoKD, *tiny)
    trainer.initialize()
    d = trainer.distiller
    assert d.reco_stages == ["enc0", "enc1"]  # 3 stages: the bottleneck has no deep-supervision target
    assert [round(w, 3) for w in d.reco_weights] == [0.697, 0.303]  # 1 : 2^-1.2, normalised
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in opt_params for p in d.parameters())
    student, reco, teacher = _snapshot(trainer.network), _snapshot(d.reco), _snapshot(trainer.teacher.network)
    trainer.current_epoch = 5  # past nothing: warm-up makes lambda > 0 only after epoch 0
    trainer.num_epochs = 10
    out = trainer.train_step(tiny_batch())
    assert {"loss", "seg_loss", "kd_sard_fg", "kd_sard_bg", "kd_sard_att", "kd_ca"} <= set(out)
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in out.values())
    assert _changed(student, trainer.network)
    adapters = {k for k in reco if ".adapter." in k}
    assert len(adapters) == 4 and _changed(reco, d.reco) >= adapters  # every adapter weight and bias moved
    assert any(k.startswith("enc0.student_block") for k in _changed(reco, d.reco))
    assert any(k.startswith("enc0.teacher_block") for k in _changed(reco, d.reco))
    assert not _changed(teacher, trainer.teacher.network)
    assert all(not p.requires_grad and p.grad is None for p in trainer.teacher.network.parameters())


def test_recorders_record_only_inside_training_steps(tiny):
    trainer = make_trainer(nnUNetTrainerReCoKD, *tiny)
    trainer.initialize()
    assert trainer.student_recorder.num_hooks == 2 and trainer.teacher_recorder.num_hooks == 2
    trainer.on_validation_epoch_start()
    with torch.no_grad():
        trainer.validation_step(tiny_batch())
    assert trainer.student_recorder._features == {} and trainer.teacher_recorder._features == {}
    trainer.network.train()
    trainer.train_step(tiny_batch())
    assert trainer.student_recorder._features == {}  # popped, nothing kept alive after the step


def _independent_logit_term(form: str, student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """The logit term written out with plain torch ops (not the package's losses): (B, C, *spatial) logits."""
    if form == "cwd":  # per sample and channel, a softmax over space
        zs, zt = student.flatten(2) / t, teacher.flatten(2) / t
        p = torch.softmax(zt, -1)
        return (p * (p.log() - torch.log_softmax(zs, -1))).sum(-1).mean() * t * t
    p = torch.softmax(teacher / t, 1)
    kl = (p * (p.log() - torch.log_softmax(student / t, 1))).sum(1)  # (B, *spatial)
    if form == "hinton":
        return kl.mean() * t * t
    classes = teacher.argmax(1)  # class_balanced: the mean KL of each class present, then their mean
    return torch.stack([kl[classes == c].mean() for c in classes.unique()]).mean() * t * t


@pytest.mark.parametrize("trainer_class, form, oracle", [
    (nnUNetTrainerLogitKD, "hinton", None), (nnUNetTrainerLogitKD_CB, "class_balanced", None),
    (nnUNetTrainerLogitKD_CWD, "cwd", None), (nnUNetTrainerLogitKD, "hinton", 6.0)])
def test_logit_kd_train_step_term_equals_an_independent_computation(tiny, tmp_path, monkeypatch, trainer_class, form,
                                                                    oracle):
    if oracle is not None:
        cfg = tmp_path / "oracle.json"
        cfg.write_text(json.dumps({"logit_oracle_margin": oracle}))
        monkeypatch.setenv("RECOKD_CONFIG", str(cfg))
    trainer = make_trainer(trainer_class, *tiny)
    trainer.initialize()
    assert trainer.settings.logit_form == form
    assert trainer.distiller.hooked_stages == [] and trainer.student_recorder.num_hooks == 0
    assert trainer.distiller.ds_weights == [1.0, 0.0]  # nnU-Net's weights, lowest output switched off
    batch = tiny_batch()
    with torch.no_grad():  # the student before the step, as train_step sees it
        student = trainer.network(batch["data"])[0]
        if oracle is None:
            teacher = trainer.teacher.network(batch["data"])[0]
        else:  # the oracle: margin * onehot(label) in place of the teacher's logits
            labels = batch["target"][0][:, 0].long()
            teacher = oracle * torch.nn.functional.one_hot(labels, student.shape[1]).movedim(-1, 1).float()
    expected = _independent_logit_term(form, student, teacher, trainer.settings.logit_temperature)
    out = trainer.train_step(batch)
    assert float(out["kd_logit"]) == pytest.approx(expected.item(), rel=1e-5)
    assert float(out["kd_total_weighted"]) == pytest.approx(float(out["kd_logit"]))  # logit_weight 1, no warm-up
    assert float(out["loss"]) == pytest.approx(float(out["seg_loss"] + out["kd_logit"]), rel=1e-5)


def test_student_control_needs_no_teacher(tmp_path, monkeypatch):
    plans, ds = setup_env(tmp_path, monkeypatch, teacher=False)
    trainer = make_trainer(nnUNetTrainerStudent, plans, ds)
    trainer.initialize()
    assert trainer.teacher is None and trainer.distiller is None
    feats = [m.out_channels for m in trainer.network.encoder.stages.modules() if isinstance(m, torch.nn.Conv3d)]
    assert feats[0] == 8 and max(feats) == 16  # [16, 32, 64] / 4 with at least 8 channels
    assert "loss" in trainer.train_step(tiny_batch())


def test_graph_trainer_step_with_lesion_components(tiny, tmp_path, monkeypatch):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"graph_lesion_labels": [2], "graph_min_component_voxels": 1}))
    monkeypatch.setenv("RECOKD_CONFIG", str(cfg))
    trainer = make_trainer(nnUNetTrainerReCoKDGraph, *tiny)
    trainer.initialize()
    assert set(trainer.distiller.hooked_stages) == {"enc0", "enc1", "dec0", "dec1"}
    projector = _snapshot(trainer.distiller.graph)
    trainer.current_epoch, trainer.num_epochs = 5, 10
    out = trainer.train_step(tiny_batch())
    assert {"kd_graph_node", "kd_graph_edge", "kd_graph_gw"} <= set(out)
    assert out["kd_graph_edge"] > 0
    assert _changed(projector, trainer.distiller.graph)


def test_region_based_dataset_recokd_works_graph_refuses(tmp_path, monkeypatch):
    plans, ds = setup_env(tmp_path, monkeypatch, regions=True)
    trainer = make_trainer(nnUNetTrainerReCoKD, plans, ds)
    trainer.initialize()
    trainer.current_epoch, trainer.num_epochs = 5, 10
    out = trainer.train_step(tiny_batch(regions=True))
    assert torch.isfinite(torch.as_tensor(out["kd_sard_fg"])) and out["kd_sard_fg"] > 0
    graph = make_trainer(nnUNetTrainerGraphKD, plans, ds)
    with pytest.raises(ValueError, match="region-based"):
        graph.initialize()


def test_checkpoint_holds_student_only_and_restores_distiller(tiny, tmp_path):
    trainer = make_trainer(nnUNetTrainerReCoKD, *tiny)
    trainer.initialize()
    trainer.train_step(tiny_batch())
    path = str(tmp_path / "ckpt.pth")
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    student_keys = set(trainer.network.state_dict())
    assert set(saved["network_weights"]) == student_keys
    assert saved["recokd"]["settings"]["reco_weight"] == 0.01

    restored = make_trainer(nnUNetTrainerReCoKD, *tiny, continue_training=True)  # --c
    restored.load_checkpoint(path)
    for k, v in trainer.distiller.state_dict().items():
        assert torch.equal(v, restored.distiller.state_dict()[k]), k
    assert restored.current_epoch == 1
    assert len(restored.optimizer.param_groups) == 2
    m_old = trainer.optimizer.state_dict()["state"]
    m_new = restored.optimizer.state_dict()["state"]
    assert m_old.keys() == m_new.keys() and all(torch.equal(m_old[i]["momentum_buffer"],
                                                            m_new[i]["momentum_buffer"]) for i in m_old)


def test_missing_teacher_fails_at_initialize_with_instructions(tmp_path, monkeypatch):
    plans, ds = setup_env(tmp_path, monkeypatch, teacher=False)
    trainer = make_trainer(nnUNetTrainerLogitKD, plans, ds)
    with pytest.raises(TeacherError, match="RECOKD_TEACHER") as e:
        trainer.initialize()
    assert "nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth" in str(e.value)
    assert trainer.network is None  # nothing was built, no optimizer, nothing written


def test_config_file_sets_schedule_and_width(tiny, tmp_path, monkeypatch):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"num_epochs": 3, "num_iterations_per_epoch": 7, "student_width": 0.5}))
    monkeypatch.setenv("RECOKD_CONFIG", str(cfg))
    trainer = make_trainer(nnUNetTrainerLogitKD, *tiny)
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch) == (3, 7)
    assert trainer.plans_manager.plans["configurations"]["3d_fullres"]["recokd_student"]["width"] == 0.5
    trainer.initialize()
    first = trainer.network.encoder.stages[0][0].convs[0].conv
    assert first.out_channels == 8  # 16 * 0.5
    cfg.write_text(json.dumps({"num_epochs": "three"}))
    with pytest.raises(ValueError, match="num_epochs"):
        make_trainer(nnUNetTrainerLogitKD, *tiny)


def test_seed_makes_student_and_distillation_modules_reproducible(tiny, tmp_path, monkeypatch):
    def initial_state(seed) -> dict[str, torch.Tensor]:
        cfg = tmp_path / f"seed_{seed}.json"
        cfg.write_text(json.dumps({"seed": seed}))
        monkeypatch.setenv("RECOKD_CONFIG", str(cfg))
        trainer = make_trainer(nnUNetTrainerReCoKD, *tiny)
        trainer.initialize()
        return {**_snapshot(trainer.network), **{f"distiller.{k}": v for k, v in _snapshot(trainer.distiller).items()}}

    first, again, other = initial_state(7), initial_state(7), initial_state(8)
    assert not _changed(first, again)
    # paired with the control: the same seed gives the control's initial student and the same global RNG after
    # initialize (the data stream), whatever the distiller draws
    control = make_trainer(nnUNetTrainerStudent, *tiny)
    control.initialize()
    after_control = torch.rand(3)
    distilled = make_trainer(nnUNetTrainerReCoKD, *tiny)
    distilled.initialize()
    assert torch.equal(torch.rand(3), after_control)
    assert not _changed(_snapshot(control.network), distilled.network)
    # convs, adapters, linears (the context blocks' zero-initialised last layers excepted)
    random_init = {k for k, v in first.items() if k.endswith("weight") and v.ndim > 1 and v.any()}
    assert random_init and _changed(first, other) >= random_init


def test_val_needs_no_teacher_and_rebuilds_the_checkpoint_width(tiny, tmp_path, monkeypatch):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"student_width": 0.5}))
    monkeypatch.setenv("RECOKD_CONFIG", str(cfg))
    trainer = make_trainer(nnUNetTrainerReCoKD, *tiny)
    trainer.initialize()
    trainer.train_step(tiny_batch())
    path = str(tmp_path / "ckpt.pth")
    trainer.save_checkpoint(path)

    # a fresh shell: no RECOKD_CONFIG (default width 0.25) and no teacher anywhere
    monkeypatch.delenv("RECOKD_CONFIG")
    monkeypatch.setenv("RECOKD_TEACHER", str(tmp_path / "gone"))
    validator = make_trainer(nnUNetTrainerReCoKD, *tiny)  # what --val constructs (no --c)
    validator.load_checkpoint(path)
    assert validator.teacher is None and validator.distiller is None
    assert validator.settings.student_width == 0.5
    for k, v in trainer.network.state_dict().items():
        assert torch.equal(v, validator.network.state_dict()[k]), k

    # --c still needs the teacher and says where it looked
    with pytest.raises(TeacherError, match="gone"):
        make_trainer(nnUNetTrainerReCoKD, *tiny, continue_training=True).load_checkpoint(path)


def test_teacher_runs_encoder_only_when_no_term_needs_its_decoder(tiny):
    recokd = make_trainer(nnUNetTrainerReCoKD, *tiny)
    recokd.initialize()
    assert recokd._teacher_encoder_only
    calls = []
    recokd.teacher.network.network.decoder.register_forward_hook(lambda *a: calls.append(1))
    recokd.train_step(tiny_batch())
    assert calls == []  # the teacher's decoder never ran
    logit = make_trainer(nnUNetTrainerLogitKD, *tiny)
    logit.initialize()
    assert not logit._teacher_encoder_only


def test_subclass_of_a_shipped_trainer_inherits_its_defaults(tiny):
    class nnUNetTrainerReCoKD_250ep(nnUNetTrainerReCoKD):
        pass

    class nnUNetTrainerReCoKD_w8_250ep(nnUNetTrainerReCoKD_w8):
        pass

    trainer = make_trainer(nnUNetTrainerReCoKD_250ep, *tiny)
    assert trainer.settings == default_settings("nnUNetTrainerReCoKD")
    assert trainer.settings.reco_weight == 0.01
    narrow = make_trainer(nnUNetTrainerReCoKD_w8_250ep, *tiny)
    assert (narrow.settings.reco_weight, narrow.settings.student_width) == (0.01, 0.125)  # both parents' changes


def test_resenc_teacher_teaches_a_plain_student(tmp_path, monkeypatch):
    """The teacher is rebuilt from its own plans: a ResidualEncoderUNet teacher with nnU-Net's plain plans."""
    import copy

    from nnunetv2_recokd import sandbox

    plans, dataset = setup_env(tmp_path, monkeypatch, teacher=False)
    resenc = copy.deepcopy(plans)
    resenc["plans_name"] = "nnUNetResEncUNetMPlans"
    arch = resenc["configurations"]["3d_fullres"]["architecture"]
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    arch["arch_kwargs"]["n_blocks_per_stage"] = arch["arch_kwargs"].pop("n_conv_per_stage")
    folder = sandbox.write_random_teacher(tmp_path / "resenc" / "nnUNetTrainer__nnUNetResEncUNetMPlans__3d_fullres",
                                          resenc, dataset)
    monkeypatch.setenv("RECOKD_TEACHER", str(folder))
    trainer = make_trainer(nnUNetTrainerReCoKD, plans, dataset)
    trainer.initialize()
    assert type(trainer.teacher.network.network).__name__ == "ResidualEncoderUNet"
    assert type(trainer.network).__name__ == "PlainConvUNet"
    trainer.current_epoch, trainer.num_epochs = 5, 10
    out = trainer.train_step(tiny_batch())
    assert out["kd_sard_fg"] > 0 and torch.isfinite(torch.as_tensor(out["loss"]))


def test_gradient_norms_of_each_part_are_logged(tiny, tmp_path, monkeypatch):
    (tmp_path / "grad.json").write_text(json.dumps({"log_term_gradients": True, "reco_warmup": 0.0}))
    monkeypatch.setenv("RECOKD_CONFIG", str(tmp_path / "grad.json"))
    trainer = make_trainer(nnUNetTrainerReCoKD, *tiny)
    trainer.initialize()
    batch = tiny_batch()
    params = list(trainer.network.parameters())
    seg = trainer.loss(trainer.network(batch["data"]), batch["target"])
    grads = torch.autograd.grad(seg, params, allow_unused=True)  # the lowest-resolution head has DS weight 0
    expected_seg = torch.stack([g.norm() for g in grads if g is not None]).norm().item()
    out = trainer.train_step(batch)  # first step of an epoch (set in __init__ and by on_train_epoch_start)
    norms = trainer._part_gradient_norms
    assert {"seg_student", "sard_fg_student", "sard_bg_student", "sard_att_student", "ca_student",
            "sard_fg_distiller", "ca_distiller"} <= set(norms)
    assert "seg_distiller" not in norms  # the seg loss never reaches the adapters
    assert all(v > 0 for v in norms.values())
    assert out["grad_norm_student"] > 0 and out["grad_norm_distiller"] > 0
    assert norms["seg_student"] == pytest.approx(expected_seg, rel=1e-5)
    trainer._first_step_of_epoch = False
    before = trainer._part_gradient_norms
    assert trainer.train_step(batch) and trainer._part_gradient_norms is before  # only on the first step


def test_logit_kd_at_a_negligible_weight_trains_exactly_as_the_control(tiny, tmp_path, monkeypatch):
    """The pair differs by the distillation term alone: nnUNetTrainerLogitKD with logit_weight 1e-12 (its teacher
    loaded and run on every batch) and nnUNetTrainerStudent, same seed, start from the same weights and after three
    steps on the same batches have bit-identical weights and seg losses. (Checked on Hippocampus too, 8 steps through
    nnU-Net's loader: the same cases, seg losses and weights; so logit KD's failure there is the term's own doing.)"""
    runs = []
    for cls, extra in ((nnUNetTrainerStudent, {}), (nnUNetTrainerLogitKD, {"logit_weight": 1e-12})):
        (tmp_path / "pair.json").write_text(json.dumps({"seed": 3, **extra}))
        monkeypatch.setenv("RECOKD_CONFIG", str(tmp_path / "pair.json"))
        trainer = make_trainer(cls, *tiny)
        trainer.initialize()
        first = _snapshot(trainer.network)
        outs = [trainer.train_step(tiny_batch(seed=i)) for i in range(3)]
        seg = [float(o["seg_loss"] if "seg_loss" in o else o["loss"]) for o in outs]  # the control logs seg as loss
        runs.append((trainer, first, _snapshot(trainer.network), seg))
    (control, first_c, last_c, seg_c), (kd, first_k, last_k, seg_k) = runs
    assert control.distiller is None and kd.distiller is not None and kd.teacher is not None
    assert not _changed(first_c, first_k) and _changed(first_c, last_c)  # the same start; the steps moved it
    assert not _changed(last_c, last_k) and seg_c == seg_k


# ------------------------------------------------------------------------------------ one step path, checked at start
def test_control_and_distilled_trainers_clip_at_the_grad_clip_setting(tiny, tmp_path, monkeypatch):
    (tmp_path / "clip.json").write_text(json.dumps({"grad_clip": 5.0}))
    monkeypatch.setenv("RECOKD_CONFIG", str(tmp_path / "clip.json"))
    clip = torch.nn.utils.clip_grad_norm_
    seen: list[float] = []

    def recording(parameters, max_norm, *args, **kwargs):
        seen.append(float(max_norm))
        return clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    for cls in (nnUNetTrainerStudent, nnUNetTrainerReCoKD):
        trainer = make_trainer(cls, *tiny)
        trainer.initialize()
        seen.clear()
        trainer.train_step(tiny_batch())
        assert seen and set(seen) == {5.0}, cls.__name__  # nnU-Net's own step clips at a hard-coded 12


def test_a_distillation_trainer_without_an_active_term_is_refused_at_start(tiny, tmp_path, monkeypatch):
    (tmp_path / "off.json").write_text(json.dumps({"reco_weight": 0.0}))
    monkeypatch.setenv("RECOKD_CONFIG", str(tmp_path / "off.json"))
    with pytest.raises(SettingsError, match="no distillation term is active.*nnUNetTrainerStudent"):
        make_trainer(nnUNetTrainerReCoKD, *tiny).initialize()


def test_term_gradients_are_refused_under_ddp_and_unscaled_under_a_grad_scaler(tiny, tmp_path, monkeypatch):
    (tmp_path / "grad.json").write_text(json.dumps({"log_term_gradients": True, "reco_warmup": 0.0}))
    monkeypatch.setenv("RECOKD_CONFIG", str(tmp_path / "grad.json"))
    trainer = make_trainer(nnUNetTrainerReCoKD, *tiny)
    trainer.is_ddp = True  # as nnU-Net sets it when torch.distributed is initialised
    with pytest.raises(SettingsError, match="log_term_gradients cannot be used with several GPUs"):
        trainer.initialize()
    trainer = make_trainer(nnUNetTrainerReCoKD, *tiny)
    trainer.initialize()
    batch = tiny_batch()
    with trainer.student_recorder:
        out = trainer.network(batch["data"])
    features = trainer.student_recorder.pop()
    seg = trainer.loss(out, batch["target"])
    terms: dict = {}
    trainer._distillation_terms(batch["data"], batch["target"], out, features, 0.5, terms, [])
    plain = {k: v.item() for k, v in trainer._term_gradient_norms(seg, terms, 0.5).items()}
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaled = {k: v.item() for k, v in trainer._term_gradient_norms(seg, terms, 0.5).items()}
    assert scaled.keys() == plain.keys() and all(scaled[k] == pytest.approx(plain[k], rel=1e-5) for k in plain)


def test_the_control_never_looks_for_a_teacher(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("RECOKD_TEACHER", str(tmp_path / "does_not_exist"))
    trainer = make_trainer(nnUNetTrainerStudent, *tiny)
    trainer.initialize()
    assert trainer.teachers == [] and trainer.distiller is None
    assert set(trainer.train_step(tiny_batch())) == {"loss"}


def test_cpu_threads_overrides_nnunets_every_core_on_the_cpu_only(tiny, tmp_path, monkeypatch):
    """nnUNetv2_train -device cpu sets torch to os.cpu_count() threads before building the trainer; cpu_threads
    sets the trainer's own count after that (two trainings side by side on 2 cores: 1 each)."""
    cfg = tmp_path / "cfg.json"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # what nnUNetv2_train does on a 2-core machine
        cfg.write_text(json.dumps({"cpu_threads": 1}))
        monkeypatch.setenv("RECOKD_CONFIG", str(cfg))
        make_trainer(nnUNetTrainerStudent, *tiny)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        cfg.write_text(json.dumps({}))  # default: nnU-Net's choice stays
        make_trainer(nnUNetTrainerStudent, *tiny)
        assert torch.get_num_threads() == 2
        cfg.write_text(json.dumps({"cpu_threads": 0}))
        with pytest.raises(SettingsError, match="cpu_threads"):
            make_trainer(nnUNetTrainerStudent, *tiny)
    finally:
        torch.set_num_threads(threads)
