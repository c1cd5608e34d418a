"""Modality dropout (REACT-KD, Sec. II-E): blank some of the student's input channels so it segments without them.

Each sample of the batch draws its own pattern: every channel is blanked with probability exactly p, and never
all channels of a sample (there would be nothing left to segment from). Independent per-channel draws cannot
satisfy both, so the pattern is drawn in two steps:
    k ~ Binomial(C - 1, p * C / (C - 1))       how many of the C channels to blank (at most C - 1)
    the k channels uniformly at random          which ones
Each channel is then blanked with probability E[k] / C = p; with two channels (PET/CT) this is REACT-KD's
"either PET or CT is masked with probability p" (each with p, never both). It needs p <= (C - 1) / C.

A blanked channel holds the value a blank scan (all zeros in the raw file) has after nnU-Net's normalisation of
that channel (inputs.channels.blank_values), which is what the student sees at inference when a user passes a
blank image for a missing scan.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def max_dropout_probability(n_channels: int) -> float:
    """The largest p with which every channel can be blanked at rate p while one channel always stays."""
    return (n_channels - 1) / n_channels


def draw_dropout_mask(batch_size: int, n_channels: int, p: float, generator: Optional[torch.Generator] = None,
                      device: Optional[torch.device] = None) -> torch.Tensor:
    """Which channels to blank: bool (B, C), each entry True with probability p, never a whole row.

    Raises:
        ValueError: fewer than two channels (nothing can be dropped), or p outside [0, (C - 1) / C].
    """
    if n_channels < 2:
        raise ValueError(f"modality dropout needs at least two input channels of the student, it reads {n_channels}")
    if not 0 <= p <= max_dropout_probability(n_channels) + 1e-12:
        raise ValueError(f"modality dropout probability must be in [0, {max_dropout_probability(n_channels):.3g}] "
                         f"for {n_channels} channels (one channel always stays), got {p}")
    count_p = min(1.0, p * n_channels / (n_channels - 1))
    trials = torch.rand((batch_size, n_channels - 1), generator=generator) < count_p
    k = trials.sum(1, keepdim=True)  # (B, 1) channels to blank
    # a uniformly random subset of size k: the k channels with the smallest random keys
    ranks = torch.rand((batch_size, n_channels), generator=generator).argsort(1).argsort(1)
    mask = ranks < k
    return mask.to(device) if device is not None else mask


def apply_modality_dropout(data: torch.Tensor, mask: torch.Tensor, blank: Sequence[float]) -> torch.Tensor:
    """A copy of `data` (B, C, *spatial) with channel c of sample b set to blank[c] where mask[b, c].

    Raises:
        ValueError: mask or blank values that do not match the batch and channels.
    """
    if mask.shape != data.shape[:2] or len(blank) != data.shape[1]:
        raise ValueError(f"dropout mask {tuple(mask.shape)} / {len(blank)} blank values do not match data "
                         f"{tuple(data.shape)} (B, C, *spatial)")
    fill = torch.as_tensor(list(blank), dtype=data.dtype, device=data.device)
    shape = (*data.shape[:2], *([1] * (data.ndim - 2)))
    keep = ~mask.to(data.device).reshape(shape)
    return torch.where(keep, data, fill.reshape(1, -1, *([1] * (data.ndim - 2))))
