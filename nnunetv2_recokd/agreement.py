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
    total, votes = None, []
    for axes in mirrorings(predictor.allowed_mirroring_axes if predictor.use_mirroring else None):
        with one_mirroring(predictor, axes):
            logits = predictor.predict_logits_from_preprocessed_data(data).float().cpu()
        votes.append(logits.argmax(0).to(torch.int16))
        total = logits if total is None else total.add_(logits)
    mean = total / len(votes)
    return mean, agreement_with(votes, mean.argmax(0).to(torch.int16))


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
