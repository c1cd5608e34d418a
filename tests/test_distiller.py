"""The distiller: stage weights, warm-up, which modules exist, and zero loss for a perfect student."""

import pytest
import torch

from nnunetv2_recokd.config import default_settings
from nnunetv2_recokd.distiller import Distiller, linear_warmup, stage_weights
from nnunetv2_recokd.sandbox import make_batch


def test_stage_weights_match_the_paper_for_six_stages():
    # (2^(-3 * 0.4))^k = 0.4353^k, normalised (METHOD.md: 0.569, 0.247, 0.108, 0.047, 0.020, 0.009)
    assert [round(w, 3) for w in stage_weights(range(6), 0.4)] == [0.569, 0.247, 0.108, 0.047, 0.020, 0.009]
    assert stage_weights([2], 0.4) == [1.0]
    assert stage_weights([0, 1], 0.0) == [0.5, 0.5]


def test_linear_warmup():
    assert [linear_warmup(p, 0.6) for p in (0.0, 0.3, 0.6, 0.9)] == [0.0, 0.5, 1.0, 1.0]
    assert linear_warmup(0.0, 0.0) == 1.0


def _distiller(name, **changes):
    s = default_settings(name).replace(**changes)
    channels = {"enc0": 4, "enc1": 8, "enc2": 8, "dec0": 4, "dec1": 8}
    return Distiller(s, channels, channels, n_stages=3, ds_weights=[1.0, 0.0])


def test_recokd_modules_and_schedule():
    d = _distiller("nnUNetTrainerReCoKD")
    assert d.reco_stages == ["enc0", "enc1"] and d.hooked_stages == ["enc0", "enc1"]
    assert set(d.reco) == {"enc0", "enc1"} and len(d.graph) == 0 and d.logit is None
    assert all(m.sard is not None and m.student_block is not None and m.teacher_block is not None
               for m in d.reco.values())
    assert {key.split(".", 2)[2].split(".")[0] for key in d.state_dict()} == {"adapter", "student_block",
                                                                              "teacher_block"}
    assert d.schedule(0.0)["reco"] == 0.0 and d.schedule(0.3)["reco"] == pytest.approx(0.005)
    assert d.schedule(0.6)["reco"] == pytest.approx(0.01)
    assert _distiller("nnUNetTrainerReCoKD_singleScale").reco_stages == ["enc0"]
    assert all(m.student_block is None and m.teacher_block is None
               for m in _distiller("nnUNetTrainerReCoKD_noCA").reco.values())
    assert all(m.sard is None for m in _distiller("nnUNetTrainerReCoKD_noSARD").reco.values())
    with pytest.raises(ValueError, match="reco_stages"):
        _distiller("nnUNetTrainerReCoKD", reco_stages=[2])  # the bottleneck has no deep-supervision target


def test_logit_term_has_the_full_weight_from_the_start_unless_warmed_up():
    """logit_warmup 0 (the default): logit_weight at every epoch; 0.5 with weight 2: rises linearly to 2 over the
    first half, so on the same (distinct) logits the weighted logit term at progress 0.2 is 0.4 of the one at 0.5,
    which is twice the raw term."""
    d = _distiller("nnUNetTrainerLogitKD")
    assert [d.schedule(p)["logit"] for p in (0.0, 0.5, 1.0)] == [1.0, 1.0, 1.0]
    warmed = _distiller("nnUNetTrainerLogitKD", logit_warmup=0.5, logit_weight=2.0)
    assert [warmed.schedule(p)["logit"] for p in (0.0, 0.2, 0.5, 0.8)] == pytest.approx([0.0, 0.8, 2.0, 2.0])
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 4, 4, 4)
    target = [torch.zeros(2, 1, 4, 4, 4)]
    early, raw = warmed.logit_terms([student], [teacher], target, progress=0.2)
    late, _ = warmed.logit_terms([student], [teacher], target, progress=0.5)
    assert raw["logit"].item() > 0 and early.item() == pytest.approx(0.4 * late.item())
    assert late.item() == pytest.approx(2.0 * raw["logit"].item())


def test_perfect_student_with_identity_adapters_has_zero_feature_loss():
    d = _distiller("nnUNetTrainerReCoKD")
    with torch.no_grad():
        for adapter in (stage.adapter for stage in d.reco.values()):
            adapter.weight.zero_()
            adapter.bias.zero_()
            for c in range(adapter.weight.shape[0]):
                adapter.weight[c, c] = 1.0
    batch = make_batch((8, 8, 8), 2, n_targets=2)
    torch.manual_seed(0)
    feats = {"enc0": torch.randn(2, 4, 8, 8, 8), "enc1": torch.randn(2, 8, 4, 4, 4)}
    total, terms = d(feats, feats, [], [], batch["target"], progress=1.0)
    for key in ("sard_fg", "sard_bg", "sard_att", "ca"):
        assert terms[key].item() == pytest.approx(0.0, abs=1e-6), key
    assert total.item() == pytest.approx(0.0, abs=1e-6)
    other = {k: v + 0.5 * torch.randn_like(v) for k, v in feats.items()}
    _, terms = d(other, feats, [], [], batch["target"], progress=1.0)
    assert terms["sard_fg"] > 0 and terms["sard_bg"] > 0


@pytest.mark.parametrize("name", ["nnUNetTrainerReCoKD", "nnUNetTrainerReCoKDGraph"])
def test_weighted_total_is_the_term_factors_times_the_raw_terms(name):
    d = _distiller(name, graph_lesion_labels=[2], graph_min_component_voxels=1, sard_att_weight=0.5,
                   ca_weight=2.0, graph_edge_weight=0.25)
    batch = make_batch((8, 8, 8), 2, n_targets=2)
    torch.manual_seed(1)
    student = {"enc0": torch.randn(2, 4, 8, 8, 8), "enc1": torch.randn(2, 8, 4, 4, 4),
               "dec0": torch.randn(2, 4, 8, 8, 8), "dec1": torch.randn(2, 8, 4, 4, 4)}
    teacher = {k: v + torch.randn_like(v) for k, v in student.items()}
    total, terms = d(student, teacher, [], [], batch["target"], progress=0.3)
    factors = d.term_factors(0.3)
    assert set(terms) <= set(factors)
    assert total.item() == pytest.approx(sum(factors[k] * v.item() for k, v in terms.items()), rel=1e-5)
