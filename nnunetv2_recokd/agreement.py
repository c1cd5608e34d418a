"""Where the teacher's mirrorings disagree: nnU-Net's test-time mirroring split into its terms.

nnU-Net predicts with mirroring by averaging the network's logits over the image and its mirrorings (the identity and
every combination of the allowed axes: 8 for a 3D network), tile by tile of the sliding window. Predicting each
mirroring alone through the same sliding window and averaging gives the same logits (the sum is linear), up to nnU-Net's
half-precision accumulation of the Gaussian-weighted tiles, which rounds coarsely only where every tile's weight is tiny
(an image's outer voxels far from any tile centre); each mirroring's own argmax is a vote. A voxel's **agreement** is
the fraction of mirrorings whose label equals the label of the average. ``nnunetv2_recokd add-unlabeled --min-agreement
t`` writes nnU-Net's ignore label where the agreement is below ``t``: nnU-Net's seg loss, the MS-SARD masks, the graph
regions and logit KD then skip the voxels the teacher is unsure of (issue #20, item 4: filtering teacher labels where
its mirrorings disagree). Several teacher folds are averaged inside each mirroring, as nnU-Net averages folds.
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

# resampling interpolates the agreement map; a voxel whose interpolated agreement is within this of the threshold
# counts as agreeing (an agreement of exactly t keeps the label: t = 1 keeps the unanimous voxels only)
_TOLERANCE = 1e-4


def mirrorings(allowed_axes: Sequence[int] | None) -> list[tuple[int, ...]]:
    """The tensor axes (batch and channel first) of every mirroring nnU-Net's mirroring averages, the identity first.

    Args:
        allowed_axes: the spatial axes nnU-Net may mirror (the checkpoint's inference_allowed_mirroring_axes), or
            None / () for no mirroring.
    """
    axes = [int(a) + 2 for a in allowed_axes or ()]
    return [()] + [combo for n in range(1, len(axes) + 1) for combo in itertools.combinations(axes, n)]


def agreement_with(votes: Sequence[Tensor], label: Tensor) -> Tensor:
    """Fraction of the ``votes`` (M label maps of shape (*spatial)) equal to ``label`` (*spatial), as float32."""
    if not votes:
        raise ValueError("agreement of no votes")
    agree = torch.zeros(label.shape, dtype=torch.float32)
    for vote in votes:
        if vote.shape != label.shape:
            raise ValueError(f"a vote of shape {tuple(vote.shape)} for a label of shape {tuple(label.shape)}")
        agree += (vote == label)
    return agree / len(votes)


@contextlib.contextmanager
def one_mirroring(predictor, axes: tuple[int, ...]) -> Iterator[None]:
    """Within the block, the predictor's sliding window predicts the mirroring ``axes`` alone (mirror, network, mirror
    back, per tile as nnU-Net's own mirroring does). Works for nnUNetPredictor and its subclasses: the instance
    attribute shadows nnUNetPredictor._internal_maybe_mirror_and_predict, the one place nnU-Net mirrors."""
    def predict(x: Tensor) -> Tensor:
        if not axes:
            return predictor.network(x)
        return torch.flip(predictor.network(torch.flip(x, axes)), axes)

    predictor._internal_maybe_mirror_and_predict = predict
    try:
        yield
    finally:
        del predictor._internal_maybe_mirror_and_predict


def predict_with_agreement(predictor, data: Tensor) -> tuple[Tensor, Tensor]:
    """nnU-Net's logits of a preprocessed case (C, *spatial), computed one mirroring at a time, and the agreement of
    the mirrorings' labels with the label of those logits ((*spatial), float32 in [0, 1]).

    Only the running sum of logits and one label map per mirroring are kept (memory: one logits array plus M small
    label maps, not M logits arrays). With mirroring off there is one vote and the agreement is 1 everywhere.
    """
    mean, votes = _mirroring_members(predictor, data)
    return mean, agreement_with(votes, mean.argmax(0).to(torch.int16))


def _mirroring_members(predictor, data: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The mean of the mirrorings' logits (nnU-Net's mirrored prediction) and each mirroring's label map."""
    total, votes = None, []
    for axes in mirrorings(predictor.allowed_mirroring_axes if predictor.use_mirroring else None):
        with one_mirroring(predictor, axes):
            logits = predictor.predict_logits_from_preprocessed_data(data).float().cpu()
        votes.append(logits.argmax(0).to(torch.int16))
        total = logits if total is None else total.add_(logits)
    return total / len(votes), votes


def segmentation_in_image(logits: Tensor, properties: dict, predictor) -> np.ndarray:
    """The label map of (C, *spatial) logits in the image's geometry, as nnU-Net exports it (resampled, cropping and
    transposition reverted: convert_predicted_logits_to_segmentation_with_correct_shape)."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    plans = predictor.plans_manager
    return convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, plans, predictor.configuration_manager, plans.get_label_manager(predictor.dataset_json), properties)


def unsure_in_image(agreement: Tensor, min_agreement: float, properties: dict, predictor) -> np.ndarray:
    """Where the agreement is below ``min_agreement``, as a boolean map in the image's geometry. The agreement takes
    the logits' way back (nnU-Net's conversion of the two "logits" agreement - t and 0): the same resampling, cropping
    and transposition as the segmentation it qualifies."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    unsure_logits = torch.stack([agreement - (min_agreement - _TOLERANCE), torch.zeros_like(agreement)])
    return convert_predicted_logits_to_segmentation_with_correct_shape(
        unsure_logits, predictor.plans_manager, predictor.configuration_manager,
        LabelManager({"background": 0, "unsure": 1}, None), properties) == 1


def write_label_with_ignore(logits: Tensor, agreement: Tensor, min_agreement: float, ignore_label: int,
                            properties: dict, predictor, output_truncated: str) -> dict[str, int]:
    """Write the segmentation of ``logits`` as nnU-Net exports it, with ``ignore_label`` where the agreement is below
    ``min_agreement``. Returns voxel counts: foreground (teacher label > 0), ignored, and ignored foreground."""
    segmentation = segmentation_in_image(logits, properties, predictor)
    unsure = unsure_in_image(agreement, min_agreement, properties, predictor)
    counts = {"foreground": int((segmentation > 0).sum()), "ignored": int(unsure.sum()),
              "ignored_foreground": int((unsure & (segmentation > 0)).sum())}
    segmentation = segmentation.astype(np.uint16 if ignore_label > 255 else segmentation.dtype)
    segmentation[unsure] = ignore_label
    ending = predictor.dataset_json["file_ending"]
    predictor.plans_manager.image_reader_writer_class().write_seg(segmentation, str(Path(output_truncated)) + ending,
                                                                  properties)
    return counts


# ------------------------------------------------------------------------------------------- agreement of a whole case
# `add-unlabeled --min-case-agreement D` keeps a teacher-labelled case only when the teacher's members agree on it: its
# folds when several label (the FLARE22 entries kept a pseudo-labelled case when their five fold models agreed, mean
# pairwise Dice above 0.9 per organ), else its mirrorings.
@contextlib.contextmanager
def one_fold(predictor, index: int) -> Iterator[None]:
    """Within the block, the predictor predicts with its fold ``index`` alone: nnU-Net's predictor loops over
    list_of_parameters, the compiled runtime predictor (deploy/predictor.py) over fold_networks."""
    networks = getattr(predictor, "fold_networks", None)
    compiled = bool(networks) and all(n is not None for n in networks)
    name = "fold_networks" if compiled else "list_of_parameters"
    everything = getattr(predictor, name)
    setattr(predictor, name, [everything[index]])
    try:
        yield
    finally:
        setattr(predictor, name, everything)


def predict_with_members(predictor, data: Tensor) -> tuple[Tensor, list[Tensor], str]:
    """nnU-Net's logits of a preprocessed case (C, *spatial) and one label map per member of the teacher, with what
    the members are: its folds when it has several (each fold with nnU-Net's mirroring as configured; the folds' mean
    is nnU-Net's fold ensemble), else its mirrorings (their mean is nnU-Net's mirrored prediction)."""
    n_folds = len(predictor.list_of_parameters)
    if n_folds > 1:
        total, votes = None, []
        for i in range(n_folds):
            with one_fold(predictor, i):
                logits = predictor.predict_logits_from_preprocessed_data(data).float().cpu()
            votes.append(logits.argmax(0).to(torch.int16))
            total = logits if total is None else total.add_(logits)
        return total / n_folds, votes, f"{n_folds} folds"
    mean, votes = _mirroring_members(predictor, data)
    return mean, votes, f"{len(votes)} mirrorings"


def pairwise_dice(votes: Sequence[Tensor], labels: Sequence[int]) -> dict[int, float]:
    """Mean over every pair of members of the Dice of each label between their label maps (*spatial); 1.0 for a pair
    where the label is absent from both, and for a single member.

    Raises:
        ValueError: label maps of different shapes.
    """
    for vote in votes[1:]:
        if vote.shape != votes[0].shape:
            raise ValueError(f"label maps of shapes {tuple(votes[0].shape)} and {tuple(vote.shape)}")
    out = {}
    for label in labels:
        masks = [(v == label) for v in votes]
        sizes = [float(m.sum()) for m in masks]
        values = []
        for i, j in itertools.combinations(range(len(masks)), 2):
            denominator = sizes[i] + sizes[j]
            values.append(1.0 if denominator == 0 else 2.0 * float((masks[i] & masks[j]).sum()) / denominator)
        out[int(label)] = float(np.mean(values)) if values else 1.0
    return out
