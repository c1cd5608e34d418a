"""The student's view of a batch: its channels, then (training only) modality dropout and simulated low dose.

The trainer calls StudentInput on the batch nnU-Net's data loader produced (after augmentation); the teacher
gets the batch as it is. Every step returns a new tensor, so the teacher's input is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from nnunetv2_recokd.inputs.channels import blank_values, dataset_channel_names
from nnunetv2_recokd.inputs.dropout import apply_modality_dropout, draw_dropout_mask, max_dropout_probability


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
            mask = draw_dropout_mask(x.shape[0], x.shape[1], self.dropout)
            x = apply_modality_dropout(x, mask, self.blank)
        if self.degrade is not None:
            x = self.degrade(x)
        return x


def build_student_input(channels: Optional[list[int]], dataset_json: dict[str, Any],
                        normalization_schemes: Sequence[str], intensity_properties: dict[str, Any],
                        dropout: float, degrade=None) -> StudentInput:
    """StudentInput for a dataset; checks the dropout probability against the student's channel count.

    Raises:
        InputSettingsError: modality dropout with one student channel, or p above (C - 1) / C.
    """
    names = dataset_channel_names(dataset_json)
    student = list(range(len(names))) if channels is None else list(channels)
    if dropout > 0:
        if len(student) < 2:
            raise InputSettingsError(
                f"modality_dropout {dropout} needs at least two input channels of the student; it reads "
                f"{[names[c] for c in student]}. Set modality_dropout to 0, or let the student read more channels")
        if dropout > max_dropout_probability(len(student)) + 1e-12:
            raise InputSettingsError(
                f"modality_dropout {dropout} is above {max_dropout_probability(len(student)):.3g}, the most that "
                f"keeps one of the student's {len(student)} channels in every sample at the same rate per channel")
    return StudentInput(channels, len(names), blank_values(normalization_schemes, intensity_properties, student),
                        dropout, degrade)
