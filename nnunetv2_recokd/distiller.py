"""The distiller: composes the distillation terms, their stage weights and schedules, and owns every
trainable distillation module (adapters, context blocks, graph projectors).

It is an nn.Module held by the trainer beside (not inside) the student network: it is trained by the
student's optimizer, saved in the checkpoint under its own key, and never part of the network that
nnUNetv2_predict rebuilds. Data flows one way: trainer -> distiller -> losses.

Total objective (see docs/METHODS.md):
    L = L_seg + lambda_reco(e) * sum_k w_k (SARD_k + ca_weight * CA_k)
              + lambda_graph(e) * sum_s RGD_s + logit_weight * sum_k ds_k L_logit,k
              + lambda_attention(e) * mean_s ATT_s       (shared CBAM3D alignment, losses/attention.py)

Several teachers (teacher_weights v_i, normalised): each teacher has its own feature space, so each has its own
adapters, context blocks and projectors, and every feature term is sum_i v_i term_i; the logit term distils the
ensemble, the v-weighted mean of the teachers' softened probabilities. Teacher 0's modules keep the one-teacher
names (reco.enc0, graph.dec0: checkpoints of one teacher resume unchanged); teacher i > 0's are named
<stage>_teacher<i> (reco.enc0_teacher1, ...).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from nnunetv2_recokd.config import DistillSettings
from nnunetv2_recokd.losses.attention import AttentionAlignLoss
from nnunetv2_recokd.losses.graph import RegionGraphLoss, extract_regions
from nnunetv2_recokd.losses.logits import make_logit_loss
from nnunetv2_recokd.losses.masks import region_masks
from nnunetv2_recokd.losses.reco import ReCoStageLoss
from nnunetv2_recokd.losses.sard import SARDConfig


def stage_weights(levels: Sequence[int], alpha: float) -> list[float]:
    """ReCo-KD's multi-scale weights w_k proportional to (2^(-3 alpha))^k, normalised to sum 1."""
    raw = [(2.0 ** (-3.0 * alpha)) ** k for k in levels]
    total = sum(raw)
    return [r / total for r in raw]


def linear_warmup(progress: float, warmup: float) -> float:
    """Factor in [0, 1]: rises linearly from 0 to 1 over the first `warmup` fraction of training."""
    if warmup <= 0:
        return 1.0
    return min(1.0, max(0.0, progress / warmup))


def reco_stage_loss(settings: DistillSettings, student_channels: int, teacher_channels: int,
                    conv_dim: int = 3) -> ReCoStageLoss:
    """One stage's ReCo-KD module (adapter, MS-SARD and/or MS-CA) as the settings configure it."""
    sard_on = settings.sard_fg_weight + settings.sard_bg_weight + settings.sard_att_weight > 0
    sard = (SARDConfig(settings.sard_temperature, settings.sard_fg_weight, settings.sard_bg_weight,
                       settings.sard_att_weight) if sard_on else None)
    return ReCoStageLoss(student_channels, teacher_channels, conv_dim, sard=sard,
                         ca_ratio=settings.ca_ratio if settings.ca_weight > 0 else None)


def region_graph_loss(settings: DistillSettings, student_channels: int, teacher_channels: int) -> RegionGraphLoss:
    """One stage's region-graph module as the settings configure it."""
    return RegionGraphLoss(student_channels, teacher_channels, settings.graph_node_weight, settings.graph_edge_weight,
                           settings.graph_gw_weight, settings.graph_gw_solver, settings.graph_gw_epsilon)


def _level(stage_name: str) -> int:
    return int(stage_name[3:])


def merge_terms(total: Optional[torch.Tensor], terms: dict[str, torch.Tensor], part: Optional[torch.Tensor],
                part_terms: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """Add one part (a teacher's feature terms, or the logit term) to a running total and its raw terms (in
    place); returns the new total (None while no part had an active term)."""
    for key, value in part_terms.items():
        terms[key] = terms.get(key, 0) + value
    if part is None:
        return total
    return part if total is None else total + part


def module_key(stage_name: str, teacher: int) -> str:
    """Name of one teacher's module for one stage: the stage name for teacher 0 (the one-teacher layout),
    <stage>_teacher<i> for the others."""
    return stage_name if teacher == 0 else f"{stage_name}_teacher{teacher}"


def normalised_teacher_weights(weights: Optional[Sequence[float]], n_teachers: int) -> list[float]:
    """Per-teacher weights summing to 1 (equal when None).

    Raises:
        ValueError: not one weight per teacher, a negative weight, or a zero sum.
    """
    if weights is None:
        return [1.0 / n_teachers] * n_teachers
    if len(weights) != n_teachers:
        raise ValueError(f"teacher_weights has {len(weights)} value(s) for {n_teachers} teacher(s); give one weight "
                         f"per teacher, in the order the teachers are listed, or null for equal weights")
    if any(w < 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"teacher_weights must be >= 0 with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


class Distiller(nn.Module):
    """All distillation terms of one trainer, configured by DistillSettings.

    Args:
        settings: resolved settings (weights of zero switch a term off entirely: no hooks, no modules).
        student_channels / teacher_channels: channels of each named stage (see hooks.stage_channels); for several
            teachers, teacher_channels is a list with one such dict per teacher.
        n_stages: number of encoder stages of the U-Net (the bottleneck, n_stages-1, is never distilled
            by ReCo-KD: it has no deep-supervision target).
        ds_weights: nnU-Net's deep-supervision weights, one per output (used by the logit term).
        conv_dim: 2 or 3, the dimensionality of the features (for the 1x1(x1) adapters).
        has_regions: region-based training (sigmoid outputs, multi-channel targets).
        ignore_label: the dataset's ignore label or None.
        num_classes: max label + 1 of label-map datasets; lets the masks skip a host sync per stage.
        teacher_weights: one weight per teacher (normalised); None: settings.teacher_weights, else equal.

    Raises:
        ValueError: a configured stage does not exist, graph lesion settings in region mode, or not one teacher
            weight per teacher.
    """

    def __init__(self, settings: DistillSettings,
                 student_channels: dict[str, int], teacher_channels: Union[dict[str, int], Sequence[dict[str, int]]],
                 n_stages: int, ds_weights: Sequence[float], conv_dim: int = 3, has_regions: bool = False,
                 ignore_label: Optional[int] = None, num_classes: Optional[int] = None,
                 teacher_weights: Optional[Sequence[float]] = None):
        super().__init__()
        per_teacher = [teacher_channels] if isinstance(teacher_channels, Mapping) else list(teacher_channels)
        self.n_teachers = len(per_teacher)
        self.teacher_weights = normalised_teacher_weights(
            teacher_weights if teacher_weights is not None else settings.teacher_weights, self.n_teachers)
        self.settings = settings
        self.has_regions = has_regions
        self.ignore_label = ignore_label
        self.num_classes = num_classes
        self.ds_weights = [float(w) for w in ds_weights]

        self.logit = (make_logit_loss(settings.logit_form, settings.logit_temperature, sigmoid=has_regions)
                      if settings.logit_weight > 0 else None)

        # ReCo-KD on encoder stages that have deep-supervision targets (0 .. n_stages-2): one module per stage
        # holds its adapter and context blocks and computes MS-SARD and MS-CA from chunked reductions (losses/reco.py)
        self.reco_stages: list[str] = []
        self.reco_weights: list[float] = []
        sard_on = settings.sard_fg_weight + settings.sard_bg_weight + settings.sard_att_weight > 0
        self.uses_masks = settings.sard_fg_weight + settings.sard_bg_weight > 0
        if settings.reco_weight > 0 and (sard_on or settings.ca_weight > 0):
            levels = settings.reco_stages if settings.reco_stages is not None else list(range(n_stages - 1))
            bad = [k for k in levels if not 0 <= k <= n_stages - 2]
            if bad:
                raise ValueError(f"reco_stages {bad} out of range: encoder stages with deep-supervision targets "
                                 f"are 0..{n_stages - 2}")
            self.reco_stages = [f"enc{k}" for k in levels]
            self.reco_weights = stage_weights(levels, settings.reco_stage_alpha)
        self.reco = nn.ModuleDict({
            module_key(name, i): reco_stage_loss(settings, student_channels[name], channels[name], conv_dim)
            for i, channels in enumerate(per_teacher) for name in self.reco_stages})

        # REACT-KD region graphs on the configured stages
        self.graph_stages: list[str] = list(settings.graph_stages) if settings.graph_weight > 0 else []
        for name in self.graph_stages:
            if name not in student_channels or _level(name) > n_stages - 2:
                valid = [n for n in student_channels if _level(n) <= n_stages - 2]
                raise ValueError(f"graph stage {name!r} has no deep-supervision target to build regions from; "
                                 f"valid names: {', '.join(valid)}")
        if self.graph_stages and has_regions:
            raise ValueError("region-graph distillation needs label maps; this dataset is region-based "
                             "(set graph_weight to 0 or use nnUNetTrainerReCoKD)")
        self.graph = nn.ModuleDict({
            module_key(name, i): region_graph_loss(settings, student_channels[name], channels[name])
            for i, channels in enumerate(per_teacher) for name in self.graph_stages})

        # shared attention alignment: per stage (and teacher) one adapter and ONE CBAM3D applied to both features
        self.attention_stages: list[str] = list(settings.attention_stages) if settings.attention_weight > 0 else []
        unknown = [name for name in self.attention_stages if name not in student_channels]
        if unknown:
            raise ValueError(f"attention stage(s) {unknown} do not exist; valid names: {', '.join(student_channels)}")
        self.attention = nn.ModuleDict({
            module_key(name, i): AttentionAlignLoss(student_channels[name], channels[name], conv_dim)
            for i, channels in enumerate(per_teacher) for name in self.attention_stages})

    @property
    def hooked_stages(self) -> list[str]:
        """Stage names whose features the trainer must record (same names in student and teacher)."""
        return list(dict.fromkeys(self.reco_stages + self.graph_stages + self.attention_stages))

    @property
    def uses_logits(self) -> bool:
        return self.logit is not None

    @property
    def has_terms(self) -> bool:
        """True when at least one term is active (a weight of zero switches a term off entirely)."""
        return self.uses_logits or bool(self.hooked_stages)

    def schedule(self, progress: float) -> dict[str, float]:
        """Multipliers of each term family at `progress` = epoch / num_epochs."""
        s = self.settings
        return {"reco": s.reco_weight * linear_warmup(progress, s.reco_warmup),
                "graph": s.graph_weight * linear_warmup(progress, s.graph_warmup),
                "attention": s.attention_weight * linear_warmup(progress, s.attention_warmup),
                "logit": s.logit_weight * linear_warmup(progress, s.logit_warmup)}

    def term_factors(self, progress: float) -> dict[str, float]:
        """The factor of each raw term of ``forward`` in the weighted total: total == sum_k factor_k * terms[k]
        over the terms forward returns (the raw terms are already stage-weighted)."""
        s, mult = self.settings, self.schedule(progress)
        return {"logit": mult["logit"], "ca": mult["reco"] * s.ca_weight, "attention": mult["attention"],
                **{f"sard_{k}": mult["reco"] * getattr(s, f"sard_{k}_weight") for k in ("fg", "bg", "att")},
                **{f"graph_{k}": mult["graph"] * getattr(s, f"graph_{k}_weight") for k in ("node", "edge", "gw")}}

    def forward(self, student_features: dict[str, torch.Tensor],
                teacher_features: Union[dict[str, torch.Tensor], Sequence[dict[str, torch.Tensor]]],
                student_outputs: Sequence[torch.Tensor],
                teacher_outputs: Union[Sequence[torch.Tensor], Sequence[Sequence[torch.Tensor]]],
                targets: Sequence[torch.Tensor], progress: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted total and the raw (unweighted, stage-aggregated, teacher-weighted) value of every term, float32.

        Args:
            student_features / teacher_features: recorded stage outputs, (B, C, *spatial) per name; for several
                teachers a list with one dict per teacher.
            student_outputs / teacher_outputs: deep-supervision logits, output[k] at target[k]'s resolution; for
                several teachers a list with one such list per teacher (empty when no term needs logits).
            targets: nnU-Net's deep-supervision targets.
            progress: epoch / num_epochs, drives the warm-ups.

        Raises:
            ValueError: features or logits of another number of teachers than the distiller was built for.
        """
        teacher_features = ([teacher_features] if isinstance(teacher_features, Mapping)
                            else list(teacher_features))
        if self.hooked_stages and len(teacher_features) != self.n_teachers:
            raise ValueError(f"features of {len(teacher_features)} teacher(s) for a distiller of {self.n_teachers}")
        if not self.hooked_stages:
            teacher_features = []
        total, terms = self.logit_terms(student_outputs, teacher_outputs, targets, progress)
        masks: dict[str, tuple] = {}
        for i, features in enumerate(teacher_features):
            total = merge_terms(total, terms,
                                *self.teacher_terms(i, student_features, features, targets, progress, masks))
        if total is None:
            raise RuntimeError("the distiller has no active term; use nnUNetTrainerStudent for plain training")
        return total, terms

    def logit_terms(self, student_outputs: Sequence[torch.Tensor], teacher_outputs: Sequence[Sequence[torch.Tensor]],
                    targets: Sequence[torch.Tensor], progress: float
                    ) -> tuple[Optional[torch.Tensor], dict[str, torch.Tensor]]:
        """The logit term against the ensemble of every teacher (weighted total or None, raw terms)."""
        if self.logit is None:
            return None, {}
        teacher_outputs = ([list(teacher_outputs)] if teacher_outputs and torch.is_tensor(teacher_outputs[0])
                           else [list(o) for o in teacher_outputs])
        if len(teacher_outputs) != self.n_teachers:
            raise ValueError(f"logits of {len(teacher_outputs)} teacher(s) for a distiller of {self.n_teachers}")
        # several teachers: against the mean of their softened probabilities
        logit = sum(w * self.logit(s, [o[k] for o in teacher_outputs], self._valid(y), self.teacher_weights)
                    for k, (w, s, y) in enumerate(zip(self.ds_weights, student_outputs, targets)) if w > 0)
        return logit * self.schedule(progress)["logit"], {"logit": logit}

    def teacher_terms(self, teacher: int, student_features: dict[str, torch.Tensor],
                      teacher_features: dict[str, torch.Tensor], targets: Sequence[torch.Tensor], progress: float,
                      masks: Optional[dict[str, tuple]] = None
                      ) -> tuple[Optional[torch.Tensor], dict[str, torch.Tensor]]:
        """The feature terms of ONE teacher, already multiplied by its weight v_i: (weighted total or None, raw
        terms). The trainer calls it right after that teacher's forward, so each teacher's features can be freed
        before the next teacher runs; `masks` caches the region masks of each stage across teachers."""
        masks = {} if masks is None else masks
        v = self.teacher_weights[teacher]
        mult = self.schedule(progress)
        terms: dict[str, torch.Tensor] = {}
        total = None

        def add(value: torch.Tensor, factor: float) -> None:
            nonlocal total
            total = value * factor if total is None else total + value * factor

        for name, w in zip(self.reco_stages, self.reco_weights):
            if name not in masks:  # one set of masks for every teacher
                masks[name] = (region_masks(targets[_level(name)], self.ignore_label, self.has_regions,
                                            self.num_classes) if self.uses_masks else (None, None))
            values = self.reco[module_key(name, teacher)](student_features[name], teacher_features[name],
                                                          *masks[name])
            if "sard" in values:  # the weighted MS-SARD total; its raw parts fg, bg, att are logged
                add(values.pop("sard"), mult["reco"] * w * v)
            if "ca" in values:
                add(values["ca"], mult["reco"] * w * v * self.settings.ca_weight)
            for key, value in values.items():
                log_key = key if key == "ca" else f"sard_{key}"
                terms[log_key] = terms.get(log_key, 0) + w * v * value

        for name in self.graph_stages:
            key = f"graph:{name}"
            if key not in masks:
                masks[key] = extract_regions(targets[_level(name)], self.settings.graph_lesion_labels,
                                             self.settings.graph_min_component_voxels,
                                             self.settings.graph_background_node, self.ignore_label)
            values = self.graph[module_key(name, teacher)](student_features[name], teacher_features[name], masks[key])
            for part, value in values.items():
                if part != "total":
                    terms[f"graph_{part}"] = terms.get(f"graph_{part}", 0) + v * value
            add(values["total"], mult["graph"] * v)

        if self.attention_stages:  # the mean over stages
            attention = sum(self.attention[module_key(name, teacher)](student_features[name], teacher_features[name])
                            for name in self.attention_stages) * (v / len(self.attention_stages))
            terms["attention"] = attention
            add(attention, mult["attention"])
        return total, terms

    def _valid(self, target: torch.Tensor) -> Optional[torch.Tensor]:
        if self.ignore_label is None:
            return None
        if self.has_regions:
            return 1 - target[:, -1:].float()  # nnU-Net puts the ignore mask in the last channel
        return (target != self.ignore_label)
