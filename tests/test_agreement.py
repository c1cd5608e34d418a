"""Teacher labels filtered where its mirrorings disagree (nnunetv2_recokd/agreement.py, add-unlabeled
--min-agreement): hand-computed votes, equality with nnU-Net's own mirroring, and the ignore label in the dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_recokd.agreement import (
    agreement_with,
    mirrorings,
    one_fold,
    one_mirroring,
    pairwise_dice,
    predict_with_agreement,
)
from nnunetv2_recokd.teacher import check_compatible
from nnunetv2_recokd.unlabeled import (
    UnlabeledError,
    check_inputs,
    dataset_min_agreement,
    derived_dataset_json,
    ignore_label_of,
    label_cases,
)
from tests.test_unlabeled import _world


def test_mirrorings_are_nnunets_identity_then_every_combination_of_the_allowed_axes():
    assert mirrorings(None) == [()]
    assert mirrorings((1,)) == [(), (3,)]
    assert mirrorings((0, 1, 2)) == [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]


def test_agreement_is_the_share_of_votes_equal_to_the_label():
    votes = [torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]), torch.tensor([0, 2, 2])]
    assert agreement_with(votes, torch.tensor([0, 1, 2])).tolist() == pytest.approx([1, 2 / 3, 2 / 3])
    with pytest.raises(ValueError, match="shape"):
        agreement_with([torch.zeros(2)], torch.zeros(3))


class _Predictor:
    """The part of nnUNetPredictor that predict_with_agreement uses: a network whose class-1 logit is the input plus
    a fixed ramp (so mirroring changes the answer), mirroring along the last axis, nnU-Net's sliding window reduced
    to one tile."""

    allowed_mirroring_axes = (2,)
    use_mirroring = True

    def __init__(self):
        ramp = torch.tensor([-1.0, -1.0, -1.0, 2.0])
        self.network = lambda x: torch.cat([torch.zeros_like(x), x + ramp], dim=1)

    def _internal_maybe_mirror_and_predict(self, x):
        raise AssertionError("nnU-Net's own mirroring must not run inside one_mirroring")

    def predict_logits_from_preprocessed_data(self, data):
        return self._internal_maybe_mirror_and_predict(data[None])[0]


def test_each_mirroring_votes_and_the_label_is_their_mean_hand_computed():
    predictor = _Predictor()
    data = torch.tensor([0.0, 2.0, 0.0, 0.0]).reshape(1, 1, 1, 4)
    logits, agreement = predict_with_agreement(predictor, data)
    # identity: class-1 logits [-1, 1, -1, 2] -> labels [0, 1, 0, 1] (a tie goes to class 0, as argmax does)
    # mirrored: the input [0, 0, 2, 0] + ramp = [-1, -1, 1, 2], mirrored back [2, 1, -1, -1] -> labels [1, 1, 0, 0]
    # mean class-1 logits [0.5, 1, -1, 0.5] -> label [1, 1, 0, 1]; agreement [1/2, 1, 1, 1/2]
    assert logits[1].flatten().tolist() == [0.5, 1.0, -1.0, 0.5]
    assert logits[0].abs().sum() == 0
    assert agreement.flatten().tolist() == [0.5, 1.0, 1.0, 0.5]
    with pytest.raises(AssertionError, match="must not run"):  # the override is gone after the block
        predictor.predict_logits_from_preprocessed_data(data)
    predictor.use_mirroring = False  # one vote: the agreement is 1 everywhere
    logits, agreement = predict_with_agreement(predictor, data)
    assert logits[1].flatten().tolist() == [-1.0, 1.0, -1.0, 2.0] and agreement.flatten().tolist() == [1.0] * 4


def test_the_mean_over_mirrorings_is_nnunets_mirrored_prediction(tmp_path, monkeypatch):
    """Through nnU-Net's own sliding window (the sandbox's random teacher): one mirroring at a time, averaged, equals
    nnUNetPredictor's prediction with mirroring on, to nnU-Net's half-precision accumulation of tiles. That rounding is
    coarse only where the Gaussian tile weight is tiny: the image's outer 4 voxels here (16^3 tiles, sigma 2 voxels,
    on a 20^3 image), so the comparison is on the rest."""
    from nnunetv2_recokd.deploy.modelfolder import open_model_folder
    from nnunetv2_recokd.deploy.predictor import build_predictor

    teacher, images, _ = _world(tmp_path, monkeypatch, n_unlabeled=1)
    predictor = build_predictor(open_model_folder(teacher, None), "torch", True, 0.5)
    data = torch.randn(1, 20, 20, 20, generator=torch.Generator().manual_seed(0))
    expected = predictor.predict_logits_from_preprocessed_data(data)
    logits, agreement = predict_with_agreement(predictor, data)
    inner = (slice(None), *[slice(4, 16)] * 3)
    torch.testing.assert_close(logits[inner], expected.float()[inner], rtol=0, atol=4e-3)  # fp16 steps near 1: 1e-3
    assert len(mirrorings(predictor.allowed_mirroring_axes)) == 8
    assert set(torch.unique(agreement * 8).tolist()) <= set(range(1, 9))  # k of 8 votes
    with one_mirroring(predictor, ()):
        assert predictor.predict_logits_from_preprocessed_data(data).shape == expected.shape
    assert "_internal_maybe_mirror_and_predict" not in vars(predictor)  # nnU-Net's method is back


def test_labels_where_the_mirrorings_disagree_become_the_ignore_label(tmp_path, monkeypatch):
    teacher, images, _ = _world(tmp_path, monkeypatch, n_unlabeled=2)
    plain = check_inputs(teacher, images, 500, "Derived", labelled="991")
    filtered = check_inputs(teacher, images, 501, "Filtered", labelled="991", min_agreement=1.0)
    assert label_cases(plain, tmp_path / "plain") == 2
    log: list[str] = []
    assert label_cases(filtered, tmp_path / "filtered", log=log.append) == 2
    assert any("fewer than 1 of the teacher's 8 mirrorings" in m for m in log)
    assert any(m.startswith("[2/2] scan_001") and "voxels ignored" in m for m in log)  # per case, on its own line
    ignore = ignore_label_of(filtered.teacher.dataset_json)
    assert ignore == 3  # the sandbox's labels are 0, 1, 2: nnU-Net wants the highest + 1
    ignored = 0
    for case in ("scan_000", "scan_001"):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "plain" / f"{case}.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "filtered" / f"{case}.nii.gz")))
        kept = b != ignore
        inner = np.zeros_like(kept)
        inner[4:16, 4:16, 4:16] = True  # away from the border that nnU-Net's fp16 tile weighting blurs (test above)
        assert np.array_equal(a[kept & inner], b[kept & inner])  # the kept label is nnU-Net's mirrored prediction
        ignored += int((~kept).sum())
    assert 0 < ignored < 2 * 20 ** 3  # a random teacher's mirrorings disagree somewhere, not everywhere
    dataset = derived_dataset_json(filtered)
    assert dataset["labels"]["ignore"] == 3 and dataset_min_agreement(dataset) == 1.0
    assert "ignore" not in derived_dataset_json(plain)["labels"] and dataset_min_agreement(
        derived_dataset_json(plain)) is None


@pytest.mark.parametrize("kwargs, message", [
    ({"min_agreement": 0.0}, r"in \(0, 1\]"),
    ({"min_agreement": 1.5}, r"in \(0, 1\]"),
    ({"min_agreement": 0.75, "tta": False}, "leave mirroring on"),
])
def test_a_min_agreement_that_cannot_work_is_refused_before_anything_is_written(tmp_path, monkeypatch, kwargs,
                                                                                 message):
    teacher, images, raw = _world(tmp_path, monkeypatch)
    with pytest.raises(UnlabeledError, match=message):
        check_inputs(teacher, images, 500, "Derived", labelled="991", **kwargs)
    assert not (raw.parent / "Dataset500_Derived").exists()


def test_a_student_dataset_with_an_ignore_label_keeps_the_teachers_classes(tmp_path, monkeypatch):
    teacher, _, _ = _world(tmp_path, monkeypatch)
    plans = json.loads((teacher / "plans.json").read_text())
    dataset = json.loads((teacher / "dataset.json").read_text())
    check_compatible(plans, dataset, "3d_fullres", plans, {**dataset, "labels": {**dataset["labels"], "ignore": 3}},
                     "3d_fullres")
    with pytest.raises(Exception, match="labels: teacher"):
        check_compatible(plans, dataset, "3d_fullres", plans, {**dataset, "labels": {"background": 0, "organ": 1}},
                         "3d_fullres")


# ------------------------------------------------------------------------------------------ agreement of a whole case
def test_pairwise_dice_of_the_members_hand_computed():
    """Three members on four voxels, label 1 at [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]: pairs 2*1/(2+1) = 2/3,
    0/(2+0) = 0, 0/(1+0) = 0, mean 2/9; label 2 absent from every member: 1.0; one member: 1.0."""
    votes = [torch.tensor(v) for v in ([1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0])]
    assert pairwise_dice(votes, [1, 2]) == pytest.approx({1: 2 / 9, 2: 1.0})
    assert pairwise_dice(votes[:1], [1]) == {1: 1.0}
    with pytest.raises(ValueError, match="shapes"):
        pairwise_dice([torch.zeros(4), torch.zeros(5)], [1])


def test_one_fold_predicts_with_that_fold_alone_and_puts_every_fold_back():
    class Plain:  # nnU-Net's predictor: a list of fold parameters
        list_of_parameters = ["p0", "p1", "p2"]

    class Compiled(Plain):  # the runtime predictor: one compiled network per fold
        fold_networks = ["n0", "n1", "n2"]

    plain, compiled = Plain(), Compiled()
    with one_fold(plain, 1):
        assert plain.list_of_parameters == ["p1"]
    with one_fold(compiled, 2):
        assert compiled.fold_networks == ["n2"] and compiled.list_of_parameters == ["p0", "p1", "p2"]
    assert plain.list_of_parameters == ["p0", "p1", "p2"] and compiled.fold_networks == ["n0", "n1", "n2"]
    torch_runtime = Compiled()
    torch_runtime.fold_networks = [None, None, None]  # runtime "torch": nnU-Net's own loop over the parameters
    with one_fold(torch_runtime, 0):
        assert torch_runtime.list_of_parameters == ["p0"]


def test_cases_the_teachers_members_disagree_on_are_dropped_and_listed(tmp_path, monkeypatch):
    """--min-case-agreement 0.9 with the agreement of scan_000 {1: 0.95, 2: 0.97} and of scan_001 {1: 0.95, 2: 0.5}
    (the members' Dice stood in for; the labelling is real): scan_001 is dropped from the dataset, listed with its
    agreement in dataset.json and the log, its label kept aside."""
    import os

    from nnunetv2_recokd import agreement, unlabeled

    teacher, images, raw = _world(tmp_path, monkeypatch, n_unlabeled=2)
    preset = iter([{1: 0.95, 2: 0.97}, {1: 0.95, 2: 0.5}])  # the cases are labelled in sorted order
    seen = []

    def stand_in(votes, labels):
        seen.append((len(votes), list(labels)))
        return next(preset)

    monkeypatch.setattr(agreement, "pairwise_dice", stand_in)
    from tests.test_unlabeled import _fake_preprocess

    monkeypatch.setattr(unlabeled, "_preprocess", _fake_preprocess)
    log: list[str] = []
    inputs = check_inputs(teacher, images, 500, "Derived", labelled="991", min_case_agreement=0.9)
    folder = unlabeled.add_unlabeled(inputs, num_processes=1, log=log.append)
    assert seen == [(8, [1, 2]), (8, [1, 2])]  # one fold: its 8 mirrorings are the members
    dataset = json.loads((folder / "dataset.json").read_text())[unlabeled.DATASET_KEY]
    assert dataset["teacher_labelled"] == ["scan_000"] and dataset["min_case_agreement"] == 0.9
    assert dataset["dropped_cases"] == {"scan_001": {"1": 0.95, "2": 0.5}}
    assert any(m.startswith("dropped scan_001") and "2: 0.500" in m for m in log)
    assert any("1 of 2 teacher-labelled cases kept, 1 dropped" in m for m in log)
    assert not (folder / "imagesTr" / "scan_001_0000.nii.gz").exists()
    assert not (folder / "labelsTr" / "scan_001.nii.gz").exists()
    assert (folder / unlabeled.DROPPED_LABELS / "scan_001.nii.gz").is_file()
    assert (folder / "labelsTr" / "scan_000.nii.gz").is_file()
    splits = json.loads((Path(os.environ["nnUNet_preprocessed"]) / folder.name / "splits_final.json").read_text())
    assert all("scan_001" not in fold["train"] + fold["val"] for fold in splits)


@pytest.mark.parametrize("kwargs, message", [
    ({"min_case_agreement": 0.0}, r"in \(0, 1\]"),
    ({"min_case_agreement": 0.9, "tta": False}, "leave mirroring on or give several folds"),
    ({"min_case_agreement": 0.9, "min_agreement": 1.0}, "cannot be combined"),
])
def test_a_min_case_agreement_that_cannot_work_is_refused(tmp_path, monkeypatch, kwargs, message):
    teacher, images, raw = _world(tmp_path, monkeypatch)
    with pytest.raises(UnlabeledError, match=message):
        check_inputs(teacher, images, 500, "Derived", labelled="991", **kwargs)
