"""The student's view of a batch: its channels, then (training only) modality dropout and simulated low dose.

The trainer calls StudentInput on the batch nnU-Net's data loader produced (after augmentation); the teacher
gets the batch as it is. Every step returns a new tensor, so the teacher's input is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from nnunetv2_recokd.inputs.channels import ChannelError, blank_values, dataset_channel_names, resolve_student_channels
from nnunetv2_recokd.inputs.dropout import apply_modality_dropout, draw_dropout_mask, max_dropout_probability
from nnunetv2_recokd.inputs.lowdose import CT_NORMALIZATION, degrade_ct_channels, draw_doses


class InputSettingsError(ValueError):
    """Input settings that cannot work with this dataset (raised before training starts)."""


@dataclass
class StudentInput:
    """What the student reads of a (B, C_dataset, *spatial) batch.

    Args:
        channels: dataset channel indices the student reads, in its order (None: all).
        n_dataset_channels: channels of the preprocessed data.
        blank: per student channel, the normalised value of a blank scan (for modality dropout).
        dropout: modality dropout probability per channel (0: off).
        degrade: an optional callable (student batch) -> degraded student batch applied after dropout in training
            (simulated low dose); it must not modify its input.
    """

    channels: Optional[list[int]]
    n_dataset_channels: int
    blank: list[float]
    dropout: float = 0.0
    degrade: Optional[Any] = None

    @property
    def n_channels(self) -> int:
        """The student's image channels (a cascade stage's network reads the previous stage's segmentation too)."""
        return self.n_dataset_channels if self.channels is None else len(self.channels)

    @property
    def is_identity(self) -> bool:
        """True when the student sees exactly what the teacher sees, in training too."""
        return self.channels is None and self.dropout == 0 and self.degrade is None

    def select(self, data: torch.Tensor) -> torch.Tensor:
        """The student's channels of a (B, C_dataset, *spatial) batch (the same tensor when it reads all)."""
        if self.channels is None:
            return data
        return data[:, self.channels]

    def __call__(self, data: torch.Tensor, training: bool) -> torch.Tensor:
        x = self.select(data)
        if not training:
            return x
        if self.dropout > 0:
            # the image channels only: a cascade stage appends the previous stage's one-hot segmentation after them
            # (nnU-Net's input of 3d_cascade_fullres), which is no scan and is never blanked
            images = len(self.blank)
            mask = draw_dropout_mask(x.shape[0], images, self.dropout)
            dropped = apply_modality_dropout(x[:, :images], mask, self.blank)
            x = dropped if x.shape[1] == images else torch.cat((dropped, x[:, images:]), 1)
        if self.degrade is not None:
            x = self.degrade(x)
        return x


@dataclass
class LowDose:
    """Simulated low dose on the student's CT channels: per sample, with `probability`, a dose drawn from `dose`
    (one fraction, or [lo, hi] log-uniformly), then inputs.lowdose.degrade_ct_channels.

    Args:
        channels: positions of the CT channels in the student's input.
        props: position -> the plans' foreground intensity properties of that channel (nnU-Net's CT normalisation).
        spacing_mm: spacing of every spatial axis of the patch (the configuration's spacing).
    """

    channels: list[int]
    props: dict[int, dict]
    spacing_mm: list[float]
    dose: list[float]
    probability: float
    i0: float
    electronic_noise: float
    extra_water_mm: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        doses = draw_doses(x.shape[0], self.dose[0] if len(self.dose) == 1 else self.dose, self.probability)
        return degrade_ct_channels(x, self.channels, self.props, doses, self.spacing_mm, self.i0,
                                   self.electronic_noise, extra_water_mm=self.extra_water_mm)


def build_low_dose(settings, student_channels: list[int], dataset_json: dict[str, Any],
                   normalization_schemes: Sequence[str], intensity_properties: dict[str, Any],
                   spacing_mm: Sequence[float]) -> Optional[LowDose]:
    """LowDose from the lowdose_* settings (None when lowdose_probability is 0).

    Raises:
        InputSettingsError: no CT-normalised channel among the student's, or lowdose_channels naming a channel the
            student does not read or one that is not CT-normalised (HU cannot be recovered from it).
    """
    if settings.lowdose_probability <= 0:
        return None
    names = dataset_channel_names(dataset_json)
    if settings.lowdose_channels is None:
        chosen = [c for c in student_channels if normalization_schemes[c] == CT_NORMALIZATION]
        if not chosen:
            raise InputSettingsError(
                f"lowdose_probability {settings.lowdose_probability} needs a CT channel, but none of the student's "
                f"channels {[names[c] for c in student_channels]} is CT-normalised (plans: "
                f"{[normalization_schemes[c] for c in student_channels]}); set lowdose_probability to 0")
    else:
        try:
            chosen = resolve_student_channels(settings.lowdose_channels, dataset_json) or list(range(len(names)))
        except ChannelError as e:
            raise InputSettingsError(str(e).replace("student_channels", "lowdose_channels")) from None
        problems = [f"{names[c]} is not read by the student" for c in chosen if c not in student_channels]
        problems += [f"{names[c]} is {normalization_schemes[c]}, not CTNormalization (HU cannot be recovered)"
                     for c in chosen if normalization_schemes[c] != CT_NORMALIZATION]
        if problems:
            raise InputSettingsError("lowdose_channels: " + "; ".join(problems))
    positions = [student_channels.index(c) for c in chosen]
    return LowDose(positions, {p: dict(intensity_properties[str(c)]) for p, c in zip(positions, chosen)},
                   [float(v) for v in spacing_mm], list(settings.lowdose_dose), settings.lowdose_probability,
                   settings.lowdose_i0, settings.lowdose_electronic_noise, settings.lowdose_extra_water_mm)


def build_student_input(settings, channels: Optional[list[int]], dataset_json: dict[str, Any],
                        normalization_schemes: Sequence[str], intensity_properties: dict[str, Any],
                        spacing_mm: Sequence[float]) -> StudentInput:
    """StudentInput from the settings (modality_dropout, lowdose_*) for a dataset: `channels` the student reads
    (None: all), the configuration's normalisation schemes and spacing, the plans' intensity properties.

    Raises:
        InputSettingsError: modality dropout with one student channel or p above (C - 1) / C; low-dose settings
            that cannot work (see build_low_dose).
    """
    names = dataset_channel_names(dataset_json)
    student = list(range(len(names))) if channels is None else list(channels)
    dropout = settings.modality_dropout
    if dropout > 0:
        if len(student) < 2:
            raise InputSettingsError(
                f"modality_dropout {dropout} needs at least two input channels of the student; it reads "
                f"{[names[c] for c in student]}. Set modality_dropout to 0, or let the student read more channels")
        if dropout > max_dropout_probability(len(student)) + 1e-12:
            raise InputSettingsError(
                f"modality_dropout {dropout} is above {max_dropout_probability(len(student)):.3g}, the most that "
                f"keeps one of the student's {len(student)} channels in every sample at the same rate per channel")
    low_dose = build_low_dose(settings, student, dataset_json, normalization_schemes, intensity_properties, spacing_mm)
    return StudentInput(channels, len(names), blank_values(normalization_schemes, intensity_properties, student),
                        dropout, low_dose)
