"""The one distillation trainer base. Every public -tr name is a few lines over it.

nnU-Net does the planning, preprocessing, augmentation, data loading, validation and inference; this
class adds, in nnU-Net's own order:
  __init__              settings (trainer_configs/ + RECOKD_CONFIG) and the student's width and input channels
                        in the plans
  initialize            teacher found, checked, frozen; distiller built; then nnU-Net's initialize
                        (student network, optimizer over student + distiller, loss); hooks registered
  train_step            teacher forward (every channel), student forward (its view of the batch: its channels,
                        modality dropout, simulated low dose), seg loss + distillation terms, one backward
  validation            the student on its channels; its model folder describes only those (inputs/channels.py)
  on_train_epoch_end    each term logged per epoch and drawn in progress.png
  save/load_checkpoint  network (student only), optimizer, grad scaler AND distiller, written atomically

Never change __init__'s signature: nnU-Net stores it in every checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from batchgenerators.utilities.file_and_folder_operations import save_json
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn

from nnunetv2_recokd.config import (
    CONFIG_ENV,
    TEACHER_ENV,
    DistillSettings,
    SettingsError,
    default_settings,
    resolve_settings,
)
from nnunetv2_recokd.distiller import Distiller, merge_terms
from nnunetv2_recokd.hooks import FeatureRecorder, stage_channels, unwrap_network
from nnunetv2_recokd.losses.logits import onehot_logits
from nnunetv2_recokd.inputs.channels import (
    resolve_student_channels,
    student_dataset_json,
    student_plans,
)
from nnunetv2_recokd.inputs.view import StudentInput, build_student_input
from nnunetv2_recokd.student import (
    PLANS_KEY,
    count_parameters,
    record_student_spec,
    student_arch_kwargs,
    student_network_from_plans,
)
from nnunetv2_recokd.teacher import (
    LoadedTeacher,
    TeacherError,
    combined_leakage,
    find_leakage,
    labeller_leakage,
    load_teachers,
    resolve_teachers,
    teacher_splits,
)
from nnunetv2_recokd.trainers.ddp import all_reduce_gradients
from nnunetv2_recokd.unlabeled import (
    TRAINING_CASES_FILE,
    count_training_cases,
    dataset_min_agreement,
    dataset_teacher,
    dataset_teacher_folds,
    min_agreement_note,
    teacher_labelled_cases,
)
from nnunetv2_recokd.trainers.progress import KD_PREFIX, SEG_KEY, DistillLocalLogger, ensure_key

CHECKPOINT_KEY = "recokd"
DISTILLER_SEED_OFFSET = 7919  # the distiller's own seed is the run's seed plus this
GRAD_PREFIX = "train_grad_"  # logger keys of the gradient norms (not drawn in progress.png)
TEACHER_PREFIX = "teacher"  # step outputs teacher<i>_<term>: one teacher's share of a term (several teachers)


class nnUNetTrainerDistillBase(nnUNetTrainer):
    """Narrow student from nnU-Net's plans, optionally distilled from a frozen nnU-Net teacher.

    Class attribute a variant may set:
        distill: False trains the student alone (the control every KD result is compared with).
    Settings: trainer_configs/defaults.json, then trainer_configs/<class>.json of every class along the hierarchy
    that ships one (what that class changes), then RECOKD_CONFIG.
    """

    distill: bool = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.settings: DistillSettings = resolve_settings(type(self))
        s = self.settings
        if s.cpu_threads is not None and self.device.type == "cpu":
            torch.set_num_threads(s.cpu_threads)  # after nnUNetv2_train's set_num_threads(os.cpu_count())
        self.num_epochs = s.num_epochs
        self.num_iterations_per_epoch = s.num_iterations_per_epoch
        self.num_val_iterations_per_epoch = s.num_val_iterations_per_epoch
        self.save_every = s.save_every
        self.initial_lr = s.initial_lr
        self.student_channels: Optional[list[int]] = resolve_student_channels(s.student_channels, dataset_json)
        if self.student_channels is not None and self.is_cascaded:
            raise SettingsError("student_channels cannot be used with a cascade stage (its input adds the previous "
                                "stage's segmentation as channels); set it to null")
        self._record_student_spec()
        self.student_input: Optional[StudentInput] = None  # built in initialize
        self.logger.local_logger = DistillLocalLogger(self.logger.local_logger.verbose)
        self.teachers: list[LoadedTeacher] = []  # one, or several (an ensemble of folds, other plans)
        self.distiller: Optional[Distiller] = None
        self.student_recorder: Optional[FeatureRecorder] = None
        self.teacher_recorders: list[FeatureRecorder] = []
        self._teacher_encoder_only = False
        self._validation_only = False  # set by load_checkpoint for --val: no teacher needed
        self._compile_note_logged = False
        self._leakage: Optional[dict] = None  # the teacher saw student validation cases (allow_leaky_teacher)
        # --c: the teacher(s) the checkpoint was trained with (a path for one teacher, a list for several)
        self._checkpoint_teacher: Optional[Union[str, list[str]]] = None
        self._first_step_of_epoch = True
        self._part_gradient_norms: dict[str, float] = {}
        # cases labelled by a teacher (a derived dataset of nnunetv2_recokd add-unlabeled; empty otherwise)
        self.teacher_labelled: set[str] = teacher_labelled_cases(dataset_json)

    # ----------------------------------------------------------------------------------- construction
    def _record_student_spec(self) -> None:
        """nnUNetv2_predict rebuilds the student from the model folder's plans.json: record its width and the
        dataset channels it reads there."""
        s = self.settings
        record_student_spec(self.plans_manager.plans, self.configuration_manager, self.configuration_name,
                            s.student_width, s.student_min_channels,
                            {"input_channels": self.student_channels} if self.student_channels is not None else None)

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        """The student. Called on the class by nnUNetv2_predict, so it reads its width from the plans."""
        defaults = default_settings(cls)
        return student_network_from_plans(configuration_manager, num_input_channels, num_output_channels,
                                          enable_deep_supervision, defaults.student_width,
                                          defaults.student_min_channels)

    def initialize(self) -> None:
        if self.was_initialized:
            return super().initialize()  # raises nnU-Net's own error
        self.print_to_log_file(f"{type(self).__name__} settings (trainer_configs/ defaults + the trainer's changes"
                               + (f" + {CONFIG_ENV} {os.environ[CONFIG_ENV]}" if os.environ.get(CONFIG_ENV) else "")
                               + "):\n" + json.dumps(self.settings.as_dict(), indent=1),
                               also_print_to_console=False, add_timestamp=False)
        self._check_model_folder_width()
        if self.distill and self.is_ddp and self.settings.log_term_gradients:
            raise SettingsError("log_term_gradients cannot be used with several GPUs (DDP): its per-part gradients "
                                "need torch.autograd.grad, which DistributedDataParallel does not support. Set "
                                "\"log_term_gradients\": false, or run the diagnosis on one GPU")
        self.student_input = self._build_student_input()
        if self.settings.seed is not None:  # before anything random: distiller, network, data loaders
            seed = self.settings.seed + self.local_rank
            seed_everything(seed)
            self.print_to_log_file(f"random seed {seed}")
        if self.teacher_labelled and not self._validation_only:
            self._check_labeller_split()
        if self.distill and self._validation_only:
            self.print_to_log_file("validation only: the teacher and the distillation modules are not loaded")
        elif self.distill:
            # teacher (built with random weights before its checkpoint is loaded) and distiller draw from a forked
            # RNG, so the student's initial weights and the data stream (nnU-Net draws both from the global RNGs
            # afterwards) are those of the control trainer with the same seed: a seeded distilled student differs
            # from its control by the distillation alone
            with torch.random.fork_rng(devices=[]):
                if self.settings.seed is not None:
                    torch.manual_seed(self.settings.seed + DISTILLER_SEED_OFFSET)
                self._load_teacher()  # every check runs before nnU-Net builds anything
                self._check_teacher_split()
                self.distiller = self._build_distiller().to(self.device)
            if not self.distiller.has_terms:
                raise SettingsError(
                    f"{type(self).__name__} distils, but no distillation term is active: logit_weight, reco_weight, "
                    f"graph_weight and attention_weight are all 0 (or every part of the active one is off) in the "
                    f"settings {json.dumps({k: self.settings.as_dict()[k] for k in TERM_WEIGHTS})}. Set one of them "
                    f"above 0, or train the student without a teacher: -tr nnUNetTrainerStudent")
            if self.is_ddp:  # DDP broadcasts only the student it wraps: the distiller must start identical too
                for tensor in self.distiller.state_dict().values():
                    dist.broadcast(tensor, src=0)
        super().initialize()
        if self.student_channels is not None:  # nnU-Net counted the dataset's channels (never a cascade stage here)
            self.num_input_channels = self.student_input.n_channels
        student = unwrap_network(self.network)
        s = self.settings
        features = student_arch_kwargs(self.configuration_manager.network_arch_init_kwargs, s.student_width,
                                       s.student_min_channels)["features_per_stage"]
        message = f"student: {count_parameters(student) / 1e6:.3f} M parameters, features per stage {features}"
        if self.student_channels is not None:
            names = self.dataset_json["channel_names"]
            message += f", reads channels {[names[str(c)] for c in self.student_channels]} of {list(names.values())}"
        if s.modality_dropout > 0:
            message += f", modality dropout {s.modality_dropout:g} per channel"
        if self.student_input.degrade is not None:
            message += (f", simulated low dose on {len(self.student_input.degrade.channels)} CT channel(s) for "
                        f"{100 * s.lowdose_probability:g}% of samples (dose {s.lowdose_dose})")
        if self.teacher is not None:
            ratio = count_parameters(self.teacher.network) / count_parameters(student)
            message += f", {ratio:.1f}x fewer parameters than the teacher"
            if len(self.teachers) > 1:
                total = sum(count_parameters(t.network) for t in self.teachers) / count_parameters(student)
                message += f" ({total:.1f}x fewer than the {len(self.teachers)} teachers together)"
        self.print_to_log_file(message)
        if self.distiller is not None:
            self.distiller.ds_weights = [float(w) for w in getattr(self.loss, "weight_factors", [1.0])]
            stages = self.distiller.hooked_stages
            # encoder-feature terms without logits need only the teacher's encoder
            self._teacher_encoder_only = not self.distiller.uses_logits and all(n.startswith("enc") for n in stages)
            self.student_recorder = FeatureRecorder(student, stages)
            # features are recorded at the hooked stages only, per teacher, and handed over by pop() each step
            self.teacher_recorders = [FeatureRecorder(t.network.network, stages) for t in self.teachers]
            self.print_to_log_file(f"distillation terms recorded at stages {stages or 'none (logits only)'}; "
                                   f"{count_parameters(self.distiller) / 1e6:.4f} M trainable distillation "
                                   f"parameters (adapters, context blocks, projectors)")

    def _build_student_input(self) -> StudentInput:
        """The student's view of a batch from the settings (channels, modality dropout, simulated low dose);
        checked before training."""
        cm = self.configuration_manager
        try:
            return build_student_input(self.settings, self.student_channels, self.dataset_json,
                                       cm.normalization_schemes,
                                       self.plans_manager.foreground_intensity_properties_per_channel, cm.spacing)
        except ValueError as e:
            raise SettingsError(str(e)) from None

    def _check_model_folder_width(self) -> None:
        """All folds of a model folder share its plans.json, from which nnUNetv2_predict builds ONE network for
        every fold: a fold of another width would overwrite the record of the folds already trained."""
        path = os.path.join(self.output_folder_base, "plans.json")
        if not os.path.isfile(path):
            return
        with open(path) as f:
            recorded = json.load(f).get("configurations", {}).get(self.configuration_name, {}).get(PLANS_KEY)
        s = self.settings
        if not recorded or (recorded.get("width"), recorded.get("min_channels"), recorded.get("input_channels")) == (
                s.student_width, s.student_min_channels, self.student_channels):
            return
        trained = sorted(d for d in os.listdir(self.output_folder_base) if d.startswith("fold_") and any(
            f.startswith("checkpoint") and f.endswith(".pth")
            for f in os.listdir(os.path.join(self.output_folder_base, d))))
        if not trained:
            return
        def channels(c: Optional[list[int]]) -> str:
            names = self.dataset_json.get("channel_names", {})
            return "every channel" if c is None else str([names.get(str(i), i) for i in c])

        raise SettingsError(
            f"model folder {self.output_folder_base} holds {', '.join(trained)} trained with student width "
            f"{recorded.get('width')} (min channels {recorded.get('min_channels')}), reading "
            f"{channels(recorded.get('input_channels'))}; this run would train width {s.student_width} (min channels "
            f"{s.student_min_channels}), reading {channels(self.student_channels)}. All folds of a model folder share "
            f"one plans.json, from which nnUNetv2_predict builds one network for every fold, so widths and input "
            f"channels cannot be mixed. Train this student under its own trainer name (e.g. -tr "
            f"nnUNetTrainerReCoKD_w8 or a subclass of yours), or remove that model folder first.")

    def _check_teacher_split(self) -> None:
        """Stop when the teacher was trained on the student's validation cases (unless allow_leaky_teacher). The
        teacher's held-out cases come from its own validation summary or its own split (teacher_splits), never from
        the student's split."""
        _, validation = self.do_split()
        leaks = []
        for t in self.teachers:
            splits, source = teacher_splits(t.plans, self.settings.teacher_splits)
            same_dataset = t.plans.get("dataset_name") == self.plans_manager.dataset_name
            leaks.append(find_leakage(t, self.fold, list(validation), splits, source, same_dataset))
        leakage = combined_leakage(leaks)
        if leakage is None:
            return
        if not self.settings.allow_leaky_teacher and len(self.teachers) > 1:
            raise TeacherError(
                f"{leakage.describe()}: the student's fold {self.fold} validation Dice would be inflated. An "
                f"ensemble of fold teachers has seen every training case, so this is expected: set "
                f"\"allow_leaky_teacher\": true in {CONFIG_ENV} (the shipped *_ensemble trainers do) to accept it; the "
                f"validation is then marked optimistic, and held-out cases (imagesTs/labelsTs) give the honest Dice.")
        if not self.settings.allow_leaky_teacher:
            raise TeacherError(
                f"{leakage.describe()}: the student's fold {self.fold} validation Dice would be inflated. Use the "
                f"teacher of the same fold (nnUNetv2_train {self.plans_manager.dataset_name} "
                f"{self.configuration_name} {self.fold}), or set \"allow_leaky_teacher\": true in {CONFIG_ENV} to "
                f"accept it on purpose (fold ensembles); the validation is then marked optimistic.")
        self._leakage = leakage.as_dict()
        self.print_to_log_file(f"WARNING: {leakage.describe()}. allow_leaky_teacher is set: this student's fold "
                               f"{self.fold} validation is OPTIMISTIC (the report marks it so).")

    def _check_labeller_split(self) -> None:
        """A dataset of add-unlabeled: stop when the teacher folds that labelled it (its dataset.json's
        teacher_folds) were trained on this fold's validation cases, since their labels carry what they saw into the
        student (unless allow_leaky_teacher: then the log and the report mark the validation optimistic)."""
        folder, folds = dataset_teacher(self.dataset_json), dataset_teacher_folds(self.dataset_json)
        if folder is None or not folds:
            return
        _, validation = self.do_split()
        real_validation = [c for c in validation if c not in self.teacher_labelled]
        if not os.path.isdir(folder):
            raise TeacherError(f"this dataset's labels were made by the teacher {folder}, which is not on this "
                               f"machine: its folds' training cases cannot be checked against this fold's validation "
                               f"cases. Put the teacher there, or set \"allow_leaky_teacher\": true in {CONFIG_ENV}")
        leakage = labeller_leakage(folder, folds, self.fold, real_validation, self.settings.teacher_splits)
        if leakage is None:
            return
        if not self.settings.allow_leaky_teacher:
            raise TeacherError(
                f"this dataset's teacher labels were made by folds {', '.join(map(str, folds))} of {folder}; "
                f"{leakage.describe()}, so their labels carry those cases into the student and its fold {self.fold} "
                f"validation Dice would be inflated. Label with the teacher fold of this student's fold only "
                f"(nnunetv2_recokd add-unlabeled ... -f {self.fold}), or set \"allow_leaky_teacher\": true in "
                f"{CONFIG_ENV} to accept it; the validation is then marked optimistic.")
        self._leakage = leakage.as_dict()
        self.print_to_log_file(f"WARNING: the teacher folds that labelled this dataset: {leakage.describe()}. "
                               f"allow_leaky_teacher is set: this student's fold {self.fold} validation is OPTIMISTIC.")

    @property
    def teacher(self) -> Optional[LoadedTeacher]:
        """The first (with one teacher: the) teacher, None before initialize or without distillation."""
        return self.teachers[0] if self.teachers else None

    @property
    def teacher_recorder(self) -> Optional[FeatureRecorder]:
        return self.teacher_recorders[0] if self.teacher_recorders else None

    def _load_teacher(self) -> None:
        """Find every teacher, then check and load them all; every problem is reported at once."""
        s = self.settings
        locations = resolve_teachers(s.teacher, s.teacher_folds, self.plans_manager.dataset_name,
                                     self.configuration_name, self.fold, s.teacher_trainer,
                                     s.teacher_plans or self.plans_manager.plans_name, s.teacher_checkpoint,
                                     dataset_teacher=dataset_teacher(self.dataset_json))
        if s.teacher_weights is not None and len(s.teacher_weights) != len(locations):
            raise SettingsError(f"teacher_weights has {len(s.teacher_weights)} value(s) for {len(locations)} "
                                f"teacher(s) ({', '.join(str(loc.checkpoint) for loc in locations)}); give one weight "
                                f"per teacher in that order, or null for equal weights")
        if self._checkpoint_teacher is not None:
            saved = ([self._checkpoint_teacher] if isinstance(self._checkpoint_teacher, str)
                     else list(self._checkpoint_teacher))
            found = [loc.checkpoint for loc in locations]
            if len(saved) != len(found) or not all(_same_file(a, b) for a, b in zip(saved, found)):
                if not s.allow_teacher_change:
                    raise TeacherError(
                        f"--c: the checkpoint was distilled from the teacher(s) {', '.join(map(str, saved))}, but the "
                        f"teacher(s) found now are {', '.join(map(str, found))} (from {locations[0].source}). Point "
                        f"{TEACHER_ENV} or the teacher setting at the original teacher(s) to continue, or set "
                        f"\"allow_teacher_change\": true in {CONFIG_ENV} to continue with the new one(s).")
                self.print_to_log_file(f"NOTE: continuing with another teacher than the checkpoint's "
                                       f"({', '.join(map(str, saved))}); allow_teacher_change is set")
        self.teachers = load_teachers(locations, self.plans_manager.plans, self.dataset_json, self.configuration_name,
                                      self.device)
        for i, teacher in enumerate(self.teachers):
            prefix = "Loaded " if len(self.teachers) == 1 else f"Loaded teacher {i + 1} of {len(self.teachers)}: "
            self.print_to_log_file(prefix + teacher.describe())
            for note in teacher.notes:
                self.print_to_log_file("NOTE: " + note)

    def _build_distiller(self) -> Distiller:
        s = self.settings
        cm = self.configuration_manager
        student_kwargs = student_arch_kwargs(cm.network_arch_init_kwargs, s.student_width, s.student_min_channels)
        teacher_channels = [stage_channels(t.arch_kwargs) for t in self.teachers]
        return Distiller(s, stage_channels(student_kwargs),
                         teacher_channels[0] if len(teacher_channels) == 1 else teacher_channels,
                         n_stages=len(student_kwargs["features_per_stage"]), ds_weights=[1.0],
                         conv_dim=len(cm.patch_size), has_regions=self.label_manager.has_regions,
                         ignore_label=self.label_manager.ignore_label,
                         num_classes=None if self.label_manager.has_regions else max(self.label_manager.all_labels) + 1)

    def _do_i_compile(self) -> bool:
        compile_wanted = super()._do_i_compile()
        if compile_wanted and self.distiller is not None and self.distiller.hooked_stages:
            # forward hooks that store tensors in Python state are graph breaks under torch.compile; rather
            # than risk stale or missing features, the hooked student runs eagerly
            if not self._compile_note_logged:
                self.print_to_log_file("torch.compile disabled for this trainer: forward hooks record the "
                                       "student's stage outputs for distillation")
                self._compile_note_logged = True
            return False
        return compile_wanted

    def configure_optimizers(self):
        """nnU-Net's own optimizer and schedule, with the distillation modules as a second parameter group (same
        hyper-parameters; nnU-Net's poly schedule sets the lr of every group)."""
        optimizer, lr_scheduler = super().configure_optimizers()
        if self.distiller is not None and any(True for _ in self.distiller.parameters()):
            optimizer.add_param_group({"params": list(self.distiller.parameters())})
        return optimizer, lr_scheduler

    # ---------------------------------------------------------------------------------------- training
    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._first_step_of_epoch = True
        if self.distiller is not None:
            self.distiller.train()

    def _autocast(self):
        """nnU-Net's mixed precision: CUDA autocast, none on other devices."""
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def train_step(self, batch: dict) -> dict:
        """One step of the student, distilled or not: the control and the distilled trainers share this path, so a
        pair differs by the distillation alone (the student's view of the batch, grad_clip, the optimizer step)."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = ([t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list)
                  else target.to(self.device, non_blocking=True))
        # the student's view (a new tensor: the teacher's batch stays as it was) is built on the training device and
        # outside autocast: the low-dose simulation's sparse products must not be cast to half precision
        student_data = self.student_input(data, training=True)
        self.optimizer.zero_grad(set_to_none=True)
        progress = self.current_epoch / max(1, self.num_epochs)
        kd, terms, per_teacher = None, {}, []
        with self._autocast():
            if self.distiller is None:
                student_out = self.network(student_data)
                seg = self._seg_loss(student_out, target, batch.get("keys"))
            else:
                with self.student_recorder:
                    student_out = self.network(student_data)
                student_features = self.student_recorder.pop()
                seg = self._seg_loss(student_out, target, batch.get("keys"))
                kd = self._distillation_terms(data, target, student_out, student_features, progress, terms,
                                              per_teacher)
                del student_features
            loss = seg if kd is None else seg + kd
        del student_data
        if self.distiller is not None and self.settings.log_term_gradients and self._first_step_of_epoch:
            norms = self._term_gradient_norms(seg, terms, progress)
            if norms:
                self._part_gradient_norms = dict(zip(norms, torch.stack(list(norms.values())).cpu().tolist()))
        self._first_step_of_epoch = False

        clip = self.settings.grad_clip
        distill_params = ([p for p in self.distiller.parameters() if p.requires_grad] if self.distiller is not None
                          else [])
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            if self.is_ddp and distill_params:
                all_reduce_gradients(distill_params)
            self.grad_scaler.unscale_(self.optimizer)
        else:
            loss.backward()
            if self.is_ddp and distill_params:
                all_reduce_gradients(distill_params)
        # the norms before clipping: a distillation gradient far above `clip` would shrink the seg gradient too
        student_norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), clip)
        distill_norm = torch.nn.utils.clip_grad_norm_(distill_params, clip) if distill_params else seg.new_zeros(())
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        if self.distiller is None:  # nnU-Net's step output
            return {"loss": loss.detach().cpu().numpy()}
        # kd_total_weighted: what distillation added to the loss; one device-to-host copy for all values
        values = {"loss": loss, "seg_loss": seg, **{f"kd_{k}": v for k, v in terms.items()}, "kd_total_weighted": kd,
                  "grad_norm_student": student_norm, "grad_norm_distiller": distill_norm}
        if len(per_teacher) > 1:  # each teacher's raw feature terms (already times its weight), logged per epoch
            values.update({f"{TEACHER_PREFIX}{i}_{k}": v
                           for i, part in enumerate(per_teacher) for k, v in part.items()})
        host = torch.stack([torch.as_tensor(v).detach().float().reshape(()).to(seg.device)
                            for v in values.values()]).cpu().numpy()
        return dict(zip(values, host))

    def _seg_loss(self, output, target, keys) -> torch.Tensor:
        """nnU-Net's loss, with the samples the teacher labelled weighted by teacher_label_weight.

        With weight w, n_r real and n_t teacher-labelled samples of a batch of B:
            L = (n_r * L(real samples) + w * n_t * L(teacher-labelled samples)) / B
        (each group through nnU-Net's own loss). w = 1, or a batch of one kind, is nnU-Net's loss on the whole batch.
        """
        w = self.settings.teacher_label_weight
        if w == 1 or not self.teacher_labelled or keys is None:
            return self.loss(output, target)
        pseudo = torch.tensor([str(k) in self.teacher_labelled for k in keys])
        if not pseudo.any():
            return self.loss(output, target)
        total = None
        for group, weight in ((~pseudo, 1.0), (pseudo, w)):
            if not group.any():
                continue
            index = group.nonzero()[:, 0].to(self.device)
            part = self.loss(_take(output, index), _take(target, index)) * (weight * len(index) / len(keys))
            total = part if total is None else total + part
        return total

    def _distillation_terms(self, data: torch.Tensor, target, student_out, student_features: dict, progress: float,
                            terms: dict, per_teacher: list) -> torch.Tensor:
        """Every teacher's forward and the weighted distillation terms (their sum); raw terms into `terms`, each
        teacher's feature terms appended to `per_teacher`.

        One teacher at a time (eval mode, no_grad: FrozenTeacher; its encoder only where no term needs more): its
        feature terms are computed right after its forward, so its recorded features are freed before the next
        teacher runs; only the logits (few channels) of every teacher wait for the ensemble term."""
        targets = target if isinstance(target, list) else [target]
        kd, teacher_outputs, masks = None, [], {}
        margin = self.settings.logit_oracle_margin
        if margin is not None and not self.distiller.hooked_stages:
            # the oracle diagnostic: margin * onehot(label) at every level stands in for every teacher's logits, and
            # no teacher runs
            oracle = [onehot_logits(y, _as_list(student_out)[0].shape[1], margin) for y in targets]
            return merge_terms(kd, terms, *self.distiller.logit_terms(
                _as_list(student_out), [oracle] * len(self.teachers), targets, progress))
        for i, (teacher, recorder) in enumerate(zip(self.teachers, self.teacher_recorders)):
            with recorder:
                out = teacher.network.encode(data) if self._teacher_encoder_only else teacher.network(data)
            if not self._teacher_encoder_only and self.distiller.uses_logits:
                teacher_outputs.append(_as_list(out) if margin is None else
                                       [onehot_logits(y, o.shape[1], margin) for y, o in zip(targets, _as_list(out))])
            del out
            features = recorder.pop()
            if features:
                part, part_terms = self.distiller.teacher_terms(i, student_features, features, targets, progress,
                                                                masks)
                del features
                kd = merge_terms(kd, terms, part, part_terms)
                per_teacher.append(part_terms)
        return merge_terms(kd, terms, *self.distiller.logit_terms(_as_list(student_out), teacher_outputs, targets,
                                                                  progress))

    def validation_step(self, batch: dict) -> dict:
        return super().validation_step({**batch, "data": self.student_input(batch["data"], training=False)})

    def _term_gradient_norms(self, seg: torch.Tensor, terms: dict[str, torch.Tensor],
                             progress: float) -> dict[str, torch.Tensor]:
        """||d part / d student parameters|| of the seg loss and of each weighted distillation part (one extra
        backward per part; log_term_gradients, first step of each epoch), and of each part w.r.t. the distiller."""
        factors = self.distiller.term_factors(progress)
        parts = {"seg": seg, **{k: terms[k] * f for k, f in factors.items() if k in terms and f > 0}}
        student = [p for p in unwrap_network(self.network).parameters() if p.requires_grad]
        distiller = [p for p in self.distiller.parameters() if p.requires_grad]
        # as the step's backward: each part scaled by the grad scaler (fp16 gradients would underflow otherwise),
        # the norms unscaled
        scale = float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 1.0
        norms = {}
        for name, part in parts.items():
            if not part.requires_grad:
                continue
            grads = torch.autograd.grad(part * scale, student + distiller, retain_graph=True, allow_unused=True)
            for group, gs in (("student", grads[:len(student)]), ("distiller", grads[len(student):])):
                present = [g.float().norm() for g in gs if g is not None]
                if present:
                    norms[f"{name}_{group}"] = torch.stack(present).norm() / scale
        return norms

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        if self.distiller is None:
            return
        outputs = collate_outputs(train_outputs)
        summary = []
        for key in sorted(k for k in outputs if k == "seg_loss" or k.startswith("kd_")):
            value = self._mean_over_ranks(outputs[key])
            log_key = SEG_KEY if key == "seg_loss" else KD_PREFIX + key[3:]
            ensure_key(self.logger.local_logger, log_key, self.current_epoch)
            self.logger.log(log_key, value, self.current_epoch)
            summary.append(f"{key[3:] if key.startswith('kd_') else 'seg'} {value:.4g}")
        mult = self.distiller.schedule(self.current_epoch / max(1, self.num_epochs))
        self.print_to_log_file("train terms (raw): " + ", ".join(summary) + " | multipliers: " +
                               ", ".join(f"{k} {v:.3g}" for k, v in mult.items()))
        shares: dict[int, list[str]] = {}
        for key in sorted(k for k in outputs if re.match(rf"{TEACHER_PREFIX}\d+_", k)):
            value = self._mean_over_ranks(outputs[key])
            ensure_key(self.logger.local_logger, "train_" + key, self.current_epoch)  # not drawn in progress.png
            self.logger.log("train_" + key, value, self.current_epoch)
            index, term = key[len(TEACHER_PREFIX):].split("_", 1)
            shares.setdefault(int(index), []).append(f"{term} {value:.4g}")
        if shares:
            self.print_to_log_file("feature terms per teacher (raw x teacher weight; they add up to the above): " +
                                   "; ".join(f"teacher {i + 1}: {', '.join(v)}" for i, v in sorted(shares.items())))
        clip = self.settings.grad_clip
        gradients = {"norm_student": self._mean_over_ranks(outputs["grad_norm_student"]),
                     "norm_distiller": self._mean_over_ranks(outputs["grad_norm_distiller"]),
                     "clipped_fraction": self._mean_over_ranks(np.asarray(outputs["grad_norm_student"]) > clip)}
        gradients.update({f"first_step_{k}": v for k, v in self._part_gradient_norms.items()})
        self._part_gradient_norms = {}
        for key, value in gradients.items():
            ensure_key(self.logger.local_logger, GRAD_PREFIX + key, self.current_epoch)
            self.logger.log(GRAD_PREFIX + key, value, self.current_epoch)
        self.print_to_log_file(f"gradient norms before clipping at {clip:g} (mean over steps): student "
                               f"{gradients['norm_student']:.4g} ({100 * gradients['clipped_fraction']:.0f}% of steps "
                               f"clipped), distillation modules {gradients['norm_distiller']:.4g}")
        parts = {k[len("first_step_"):]: v for k, v in gradients.items() if k.startswith("first_step_")}
        if parts:
            self.print_to_log_file("gradient norm of each weighted part, first step of the epoch: " +
                                   ", ".join(f"{k} {v:.3g}" for k, v in parts.items()))

    def _mean_over_ranks(self, values) -> float:
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, values)
            return float(np.vstack(gathered).mean())
        return float(np.mean(values))

    def on_train_end(self) -> None:
        super().on_train_end()
        for recorder in (self.student_recorder, *self.teacher_recorders):
            if recorder is not None:
                recorder.remove()

    # -------------------------------------------------------------------------------------- checkpoint
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus the distiller's state, written to a temporary file then renamed."""
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        checkpoint = {
            "network_weights": unwrap_network(self.network).state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            CHECKPOINT_KEY: {
                "distiller": self.distiller.state_dict() if self.distiller is not None else None,
                "settings": self.settings.as_dict(),
                # one teacher: its path (the layout of checkpoints before ensembles); several: the list
                # resolved: --c from another working directory must compare the same files
                "teacher": (None if not self.teachers else _resolved(self.teacher.location.checkpoint)
                            if len(self.teachers) == 1 else [_resolved(t.location.checkpoint) for t in self.teachers]),
                "teacher_saw_validation_cases": self._leakage,
            },
        }
        tmp = f"{filename}.tmp"
        torch.save(checkpoint, tmp)
        os.replace(tmp, filename)  # a crash while saving never leaves a truncated checkpoint behind

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """Restore network, optimizer, grad scaler, logger, epoch AND distiller (path or dict).

        --val (nnU-Net calls this without --c) needs only the student: the teacher is not loaded then. The
        student's width always comes from the checkpoint, whatever RECOKD_CONFIG says now.
        """
        checkpoint = (torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
                      if isinstance(filename_or_checkpoint, str) else filename_or_checkpoint)
        state = checkpoint.get(CHECKPOINT_KEY) or {}
        if not self.was_initialized:
            self._validation_only = not self.logger.resume
            self._adopt_checkpoint_settings(state.get("settings"))
            self._checkpoint_teacher = state.get("teacher")
            self.initialize()
        if self._validation_only:
            self._leakage = state.get("teacher_saw_validation_cases")
        network = unwrap_network(self.network)
        weights = {k[7:] if k.startswith("module.") and k not in network.state_dict() else k: v
                   for k, v in checkpoint["network_weights"].items()}
        network.load_state_dict(weights)
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        if self._validation_only:
            self.print_to_log_file(f"Restored the student from the checkpoint (epoch {self.current_epoch})")
            return
        if self.distiller is not None:
            if state.get("distiller") is None:
                raise RuntimeError(f"{type(self).__name__}: this checkpoint holds no distillation state (written by "
                                   f"{checkpoint.get('trainer_name')}); cannot continue a distillation from it")
            self._check_distiller_state(state["distiller"], state.get("settings") or {})
            self.distiller.load_state_dict(state["distiller"])
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
        self.print_to_log_file(f"Restored checkpoint at epoch {self.current_epoch}"
                               + (" with distillation modules" if self.distiller is not None else ""))

    def _check_distiller_state(self, saved_state: dict, saved_settings: dict) -> None:
        """The distillation modules must be the checkpoint's: name the settings that changed them."""
        mine = {k: tuple(v.shape) for k, v in self.distiller.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in saved_state.items()}
        if mine == theirs:
            return
        current = self.settings.as_dict()
        changed = [f"{k}: {saved_settings[k]!r} in the checkpoint, {current[k]!r} now" for k in MODULE_SETTINGS
                   if k in saved_settings and saved_settings[k] != current[k]]
        differ = sorted(set(mine) ^ set(theirs)) + sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])
        cause = ("the settings that build them changed since the checkpoint was written:\n  - " + "\n  - ".join(changed)
                 if changed else f"the teacher's channels or the modules differ ({', '.join(differ[:6])})")
        raise SettingsError(f"--c: cannot continue this distillation: its modules (adapters, context blocks, "
                            f"projectors) differ from the checkpoint's because {cause}\nRestore those settings to "
                            f"continue, or start a new training without --c.")

    def on_train_start(self) -> None:
        super().on_train_start()
        self._record_training_cases()
        if self.student_channels is not None and self.local_rank == 0:
            # nnU-Net has just copied the dataset's plans.json and dataset.json into the model folder; the student's
            # describe only its channels, so nnUNetv2_predict asks for those files alone
            save_json(student_plans(self.plans_manager.plans, self.student_channels),
                      os.path.join(self.output_folder_base, "plans.json"), sort_keys=False)
            save_json(student_dataset_json(self.dataset_json, self.student_channels),
                      os.path.join(self.output_folder_base, "dataset.json"), sort_keys=False)

    def _record_training_cases(self) -> None:
        """Log, and write into the fold folder, how many real and teacher-labelled cases train this student."""
        if not self.teacher_labelled:
            return
        train, validation = self.do_split()
        counts = count_training_cases(list(train), self.dataset_json)
        counts["validation_teacher_labelled"] = sum(c in self.teacher_labelled for c in validation)
        counts["validation"] = len(validation)
        counts["teacher_label_weight"] = self.settings.teacher_label_weight
        counts["teacher"] = dataset_teacher(self.dataset_json)
        counts["min_agreement"] = dataset_min_agreement(self.dataset_json)
        filtered = min_agreement_note(counts["min_agreement"])
        self.print_to_log_file(
            f"training cases: {counts['real']} with real labels, {counts['teacher_labelled']} labelled by the teacher "
            f"(seg-loss weight {self.settings.teacher_label_weight:g} on those{filtered})")
        if counts["validation_teacher_labelled"]:
            self.print_to_log_file(
                f"NOTE: {counts['validation_teacher_labelled']} of the {len(validation)} validation cases are labelled "
                f"by the teacher: the validation Dice measures agreement with the teacher, not accuracy")
        if self.local_rank == 0:
            save_json(counts, os.path.join(self.output_folder, TRAINING_CASES_FILE), sort_keys=False)

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        if self.student_channels is None:
            super().perform_actual_validation(save_probabilities)
        else:  # nnU-Net loads every channel of each validation case: hand the student its own
            dataset_class = self.dataset_class
            self.dataset_class = _with_channels(dataset_class, self.student_channels)
            try:
                super().perform_actual_validation(save_probabilities)
            finally:
                self.dataset_class = dataset_class
        validation_by_teacher = self.teacher_labelled & set(self.do_split()[1]) if self.teacher_labelled else set()
        if validation_by_teacher:
            self.print_to_log_file(f"NOTE: {len(validation_by_teacher)} validation case(s) are labelled by the "
                                   f"teacher: this Dice is AGREEMENT WITH THE TEACHER, not accuracy")
        if self._leakage:
            self.print_to_log_file(f"NOTE: this validation is OPTIMISTIC: the teacher was trained on "
                                   f"{self._leakage['cases']} of its {self._leakage['of']} cases "
                                   f"(allow_leaky_teacher)")

    def _adopt_checkpoint_settings(self, saved: Optional[dict]) -> None:
        """The architecture is the checkpoint's; other setting changes apply from now on and are logged."""
        if not saved:
            return
        current = self.settings.as_dict()
        changed = {k: (saved[k], current[k]) for k in current if k in saved and saved[k] != current[k]}
        arch = {k: v for k, v in changed.items() if k in ("student_width", "student_min_channels", "student_channels")}
        if arch:
            self.print_to_log_file(f"the checkpoint's student was built with {({k: v[0] for k, v in arch.items()})}; "
                                   f"using that instead of the current settings {({k: v[1] for k, v in arch.items()})}")
            try:
                self.settings = self.settings.replace(**{k: v[0] for k, v in arch.items()})
            except SettingsError as e:
                raise SettingsError(f"the checkpoint's settings are invalid now: {e}") from e
            self.student_channels = resolve_student_channels(self.settings.student_channels, self.dataset_json)
            self._record_student_spec()
        others = {k: v for k, v in changed.items() if k not in arch}
        if others:
            self.print_to_log_file("settings changed since the checkpoint was written (now in effect): " +
                                   ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in others.items()))


# the weights that switch the distillation terms on
TERM_WEIGHTS = ("logit_weight", "reco_weight", "graph_weight", "attention_weight")

# settings that decide which distillation modules exist (and their shapes): a --c must not change them
MODULE_SETTINGS = ("student_width", "student_min_channels", "reco_weight", "reco_stages", "sard_fg_weight",
                   "sard_bg_weight", "sard_att_weight", "ca_weight", "ca_ratio", "graph_weight", "graph_stages",
                   "attention_weight", "attention_stages",
                   "teacher", "teacher_folds")  # the last two: how many teachers, so how many sets of modules


def _with_channels(dataset_class: type, channels: list[int]) -> type:
    """nnU-Net's dataset class, loading only `channels` of each case's data (the student's validation)."""

    class StudentChannelsDataset(dataset_class):
        def load_case(self, identifier):
            data, seg, seg_prev, properties = super().load_case(identifier)
            return np.asarray(data[:])[channels], seg, seg_prev, properties

    return StudentChannelsDataset


def _resolved(path) -> str:
    return os.path.realpath(str(path))


def _same_file(a, b) -> bool:
    return os.path.realpath(str(a)) == os.path.realpath(str(b))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices): nnU-Net's samplers and transforms draw from their global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _take(x, index: torch.Tensor):
    """The samples `index` of a batch tensor or of each tensor of a deep-supervision list."""
    return [t[index] for t in x] if isinstance(x, (list, tuple)) else x[index]


def _as_list(output) -> list[torch.Tensor]:
    return list(output) if isinstance(output, (list, tuple)) else [output]
