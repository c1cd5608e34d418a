"""Tests for the region-graph distillation loss (nnunetv2_recokd.losses.graph)."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch

from nnunetv2_recokd.losses.graph import (
    RegionGraphLoss,
    cosine_similarity_matrix,
    extract_regions,
    gromov_wasserstein_discrepancy,
    masked_average_pool,
)


def _identity_projector(loss: RegionGraphLoss) -> RegionGraphLoss:
    with torch.no_grad():
        loss.projector.weight.copy_(torch.eye(loss.teacher_channels, loss.student_channels))
        loss.projector.bias.zero_()
    return loss


def _numpy_reference(student: np.ndarray, teacher: np.ndarray, masks: np.ndarray, projector: torch.nn.Linear) -> dict:
    """Slow per-node float64 reference of one sample: student (C_s, V), teacher (C_t, V), masks (R, V)."""
    h_s = np.stack([student[:, m].mean(axis=1) for m in masks])
    h_t = np.stack([teacher[:, m].mean(axis=1) for m in masks])
    proj = h_s @ projector.weight.detach().double().numpy().T + projector.bias.detach().double().numpy()
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    node = np.mean(np.sum((unit(proj) - unit(h_t)) ** 2, axis=1))
    e_s, e_t = unit(h_s) @ unit(h_s).T, unit(h_t) @ unit(h_t).T
    edge = np.mean((e_s - e_t) ** 2)
    gw = ot.gromov.gromov_wasserstein2(1 - e_s, 1 - e_t, loss_fun="square_loss")
    return {"node": node, "edge": edge, "gw": gw}


# ----------------------------------------------------------------------------- masked pooling / cosine


def test_masked_average_pool_matches_hand_computation():
    features = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0], [30.0, 40.0]]])  # (C=2, 2, 2)
    regions = torch.tensor(
        [
            [[True, True], [False, False]],  # mean of voxels (0,0), (0,1)
            [[False, False], [False, True]],  # one voxel
            [[True, False], [True, True]],  # three voxels
        ]
    )
    pooled = masked_average_pool(features, regions)
    assert pooled.dtype == torch.float32 and pooled.shape == (3, 2)
    expected = torch.tensor([[1.5, 15.0], [4.0, 40.0], [8.0 / 3.0, 80.0 / 3.0]])
    torch.testing.assert_close(pooled, expected)
    # A one-voxel region is exactly that voxel's feature vector.
    assert pooled[1].tolist() == [4.0, 40.0]


def test_masked_average_pool_float_weights_empty_region_and_fp16():
    features = torch.tensor([[2.0, 4.0, 8.0]]).half()
    regions = torch.tensor([[1.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    pooled = masked_average_pool(features, regions)
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, torch.tensor([[(2.0 + 24.0) / 4.0], [0.0]]))
    with pytest.raises(ValueError, match=r"\(1, 3\).*\(2, 4\)"):
        masked_average_pool(features, torch.ones(2, 4))


def test_cosine_similarity_matrix_values():
    h = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]])
    expected = torch.tensor(
        [[1.0, 1 / math.sqrt(2), 0.0], [1 / math.sqrt(2), 1.0, -1 / math.sqrt(2)], [0.0, -1 / math.sqrt(2), 1.0]]
    )
    torch.testing.assert_close(cosine_similarity_matrix(h), expected)


# ----------------------------------------------------------------------------- region extraction


def test_two_separate_lesions_give_two_nodes_and_min_size_drops_small_one():
    target = torch.zeros(1, 1, 6, 6, 6)
    target[0, 0, 0:2, 0:2, 0:2] = 1  # organ, 8 voxels
    target[0, 0, 4:6, 4:6, 4:6] = 2  # lesion A, 8 voxels, first voxel at flat index 4*36+4*6+4
    target[0, 0, 0, 5, 5] = 2  # lesion B, 1 voxel, first voxel at flat index 35 (comes first)

    (regions,) = extract_regions(target, lesion_labels=[2])
    assert regions.dtype == torch.bool and regions.shape == (3, 6, 6, 6)
    assert regions.sum(dim=(1, 2, 3)).tolist() == [8, 1, 8]
    assert torch.equal(regions[0], target[0, 0] == 1)
    assert regions[1, 0, 5, 5] and regions[2, 4:6, 4:6, 4:6].all()

    (regions,) = extract_regions(target, lesion_labels=[2], min_component_voxels=2)
    assert regions.sum(dim=(1, 2, 3)).tolist() == [8, 8]
    assert regions[1, 4:6, 4:6, 4:6].all()

    # Without lesion labels, class 2 is one node (both lesions together); order by label.
    (regions,) = extract_regions(target)
    assert regions.sum(dim=(1, 2, 3)).tolist() == [8, 9]
    assert torch.equal(regions[1], target[0, 0] == 2)
    # min size also drops a too-small non-lesion class.
    (regions,) = extract_regions(target, min_component_voxels=9)
    assert regions.sum(dim=(1, 2, 3)).tolist() == [9]


def test_connectivity_is_full_26_in_3d_and_8_in_2d():
    target = torch.zeros(1, 1, 4, 4, 4, dtype=torch.int64)
    target[0, 0, 0, 0, 0] = 1
    target[0, 0, 1, 1, 1] = 1  # touches the first only at a corner
    target[0, 0, 3, 3, 0] = 1  # not touching anything
    (regions,) = extract_regions(target, lesion_labels=[1])
    assert regions.sum(dim=(1, 2, 3)).tolist() == [2, 1]

    sample_0 = [[3, 0, 0], [0, 3, 0], [0, 0, 0]]
    sample_1 = [[0, 0, 3], [0, 0, 0], [3, 3, 0]]
    target_2d = torch.tensor([[sample_0], [sample_1]], dtype=torch.uint8)  # (B=2, 1, 3, 3)
    regions = extract_regions(target_2d, lesion_labels=[3])
    assert [r.shape[0] for r in regions] == [1, 2]  # diagonal neighbours join; separate blobs don't
    assert regions[1].sum(dim=(1, 2)).tolist() == [1, 2]


def test_background_node_first_and_ignore_label_excluded():
    target = torch.tensor([[[0, 0, 1, 1], [0, 9, 9, 1], [2, 2, 0, 9]]], dtype=torch.float32)[None]  # (1,1,3,4)
    target = target + 1e-3  # float labels are rounded
    (regions,) = extract_regions(target, background_node=True, ignore_label=9)
    assert regions.shape == (3, 3, 4)
    labels = target[0, 0].round()
    assert torch.equal(regions[0], labels == 0)  # background first: 4 voxels, no ignore voxels
    assert regions.sum(dim=(1, 2)).tolist() == [4, 3, 2]
    ignored = labels == 9
    assert not (regions & ignored).any()
    # Without the background node, the same foreground nodes in the same order.
    (fg_only,) = extract_regions(target, ignore_label=9)
    assert torch.equal(fg_only, regions[1:])
    # Without ignore_label, 9 is an ordinary class and becomes the last node.
    (with_nine,) = extract_regions(target)
    assert torch.equal(with_nine[-1], ignored)


def test_extract_regions_empty_sample_and_validation():
    target = torch.zeros(2, 1, 4, 4, 4)
    target[1, 0, 0, 0, 0] = 1
    regions = extract_regions(target, lesion_labels=[1])
    assert regions[0].shape == (0, 4, 4, 4) and regions[1].shape == (1, 4, 4, 4)
    with pytest.raises(ValueError):
        extract_regions(target[:, 0])
    with pytest.raises(ValueError):
        extract_regions(target, lesion_labels=[0])
    with pytest.raises(ValueError):
        extract_regions(target, lesion_labels=[2], ignore_label=2)
    with pytest.raises(ValueError):
        extract_regions(target, min_component_voxels=0)


# ----------------------------------------------------------------------------- Gromov-Wasserstein


def test_gw_two_node_graphs_hand_value_and_gradient():
    # For 2-node graphs with off-diagonal costs a, b > 0 the optimal plan is I/2: GW = (a - b)^2 / 2.
    cost_s = torch.tensor([[0.0, 0.5], [0.5, 0.0]], requires_grad=True)
    cost_t = torch.tensor([[0.0, 1.5], [1.5, 0.0]])
    gw = gromov_wasserstein_discrepancy(cost_s, cost_t)
    assert gw.dtype == torch.float32 and gw.ndim == 0
    assert gw.item() == pytest.approx(0.5, abs=1e-6)
    gw.backward()
    # d/dC_s[i, k] = 2 C_s[i, k] p_i p_k - 2 (T C_t T^T)[i, k] = (a - b) / 2 off the diagonal.
    torch.testing.assert_close(cost_s.grad, torch.tensor([[0.0, -0.5], [-0.5, 0.0]]))


def _random_cost(n: int, seed: int) -> np.ndarray:
    h = np.random.default_rng(seed).normal(size=(n, 6))
    h /= np.linalg.norm(h, axis=1, keepdims=True)
    return 1.0 - h @ h.T


def test_gw_matches_pot_numpy_is_permutation_invariant_and_zero_for_identical_graphs():
    c_s, c_t = _random_cost(5, 0), _random_cost(4, 1)  # different node counts
    expected = ot.gromov.gromov_wasserstein2(c_s, c_t, loss_fun="square_loss")
    value = gromov_wasserstein_discrepancy(torch.tensor(c_s, dtype=torch.float32), torch.tensor(c_t))
    assert expected > 1e-3
    assert value.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)

    perm = np.array([3, 0, 4, 1, 2])
    permuted = gromov_wasserstein_discrepancy(torch.tensor(c_s[perm][:, perm]), torch.tensor(c_t))
    assert permuted.item() == pytest.approx(value.item(), rel=1e-5, abs=1e-7)

    assert gromov_wasserstein_discrepancy(torch.tensor(c_s), torch.tensor(c_s)).item() == pytest.approx(0.0, abs=1e-7)
    assert gromov_wasserstein_discrepancy(torch.tensor(c_s[perm][:, perm]), torch.tensor(c_s)).item() == pytest.approx(
        0.0, abs=1e-7
    )


def test_gw_entropic_is_finite_close_to_exact_and_differentiable():
    cost_s = torch.tensor([[0.0, 0.5], [0.5, 0.0]], requires_grad=True)
    cost_t = torch.tensor([[0.0, 1.5], [1.5, 0.0]])
    exact = gromov_wasserstein_discrepancy(cost_s, cost_t).item()
    entropic = gromov_wasserstein_discrepancy(cost_s, cost_t, solver="entropic", epsilon=0.05)
    assert math.isfinite(entropic.item())
    assert entropic.item() == pytest.approx(exact, abs=0.05)
    entropic.backward()
    assert cost_s.grad is not None and cost_s.grad[0, 1].item() < 0  # raising a towards b lowers GW
    # Identical 2-node graphs: from the uniform plan Sinkhorn would stay on the saddle (value a^2 / 2 = 0.125).
    same = gromov_wasserstein_discrepancy(cost_s.detach(), cost_s.detach(), solver="entropic")
    assert same.item() == pytest.approx(0.0, abs=1e-3)
    # A generic pair of 4-node graphs.
    c_s, c_t = torch.tensor(_random_cost(4, 5)), torch.tensor(_random_cost(4, 6))
    exact = gromov_wasserstein_discrepancy(c_s, c_t).item()
    assert exact > 0.01
    assert gromov_wasserstein_discrepancy(c_s, c_t, solver="entropic").item() == pytest.approx(exact, abs=0.02)


def test_gw_validation():
    c = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="exact, entropic"):
        gromov_wasserstein_discrepancy(c, c, solver="sinkhorn")
    with pytest.raises(ValueError):
        gromov_wasserstein_discrepancy(c, torch.zeros(2, 3))
    with pytest.raises(ValueError):
        gromov_wasserstein_discrepancy(c, c, solver="entropic", epsilon=0.0)


# ----------------------------------------------------------------------------- RegionGraphLoss


def _hand_example() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    # 1-D spatial, 4 voxels, regions {0, 1} and {2, 3}; h_s = [1, 0], [0, 1.5]; h_t = [1, 1], [0, 1].
    student = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 2.0]]])
    teacher = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]])
    regions = [torch.tensor([[True, True, False, False], [False, False, True, True]])]
    return student, teacher, regions


def test_region_graph_loss_hand_computed_terms():
    student, teacher, regions = _hand_example()
    loss = _identity_projector(RegionGraphLoss(2, 2, node_weight=1.0, edge_weight=2.0, gw_weight=3.0))
    out = loss(student, teacher, regions)
    # node: ||[1,0] - [1,1]/sqrt2||^2 / 2 = 1 - 1/sqrt2; edge: E_s offdiag 0, E_t offdiag 1/sqrt2 -> 2 * 0.5 / 4;
    # GW of 2-node graphs with off-diagonal costs 1 and 1 - 1/sqrt2: (1/sqrt2)^2 / 2.
    assert out["node"].item() == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)
    assert out["edge"].item() == pytest.approx(0.25, abs=1e-6)
    assert out["gw"].item() == pytest.approx(0.25, abs=1e-6)
    assert out["total"].item() == pytest.approx(1 - 1 / math.sqrt(2) + 2 * 0.25 + 3 * 0.25, abs=1e-5)
    assert all(v.dtype == torch.float32 and v.ndim == 0 for v in out.values())


def test_region_graph_loss_matches_numpy_reference_and_gradients():
    torch.manual_seed(0)
    target = torch.zeros(1, 1, 6, 6, 6)
    target[0, 0, :3] = 1
    target[0, 0, 4:, :2, :2] = 2
    target[0, 0, 4:, 4:, 4:] = 2
    target[0, 0, 3, 3, 3:] = 3
    regions = extract_regions(target, lesion_labels=[2], background_node=True)
    assert regions[0].shape[0] == 5
    student = torch.randn(1, 3, 6, 6, 6, requires_grad=True)
    teacher = torch.randn(1, 5, 6, 6, 6, requires_grad=True)
    loss = RegionGraphLoss(3, 5)
    out = loss(student, teacher, regions)

    ref = _numpy_reference(
        student[0].detach().double().reshape(3, -1).numpy(),
        teacher[0].detach().double().reshape(5, -1).numpy(),
        regions[0].reshape(5, -1).numpy(),
        loss.projector,
    )
    assert out["node"].item() == pytest.approx(ref["node"], rel=1e-5)
    assert out["edge"].item() == pytest.approx(ref["edge"], rel=1e-4)
    assert out["gw"].item() == pytest.approx(ref["gw"], rel=1e-3, abs=1e-6)
    assert ref["gw"] > 1e-3

    out["total"].backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0 and torch.isfinite(student.grad).all()
    assert loss.projector.weight.grad is not None and loss.projector.weight.grad.abs().sum() > 0

    # The GW term alone also reaches the student.
    student.grad = None
    gw_only = RegionGraphLoss(3, 5, node_weight=0.0, edge_weight=0.0, gw_weight=1.0)
    gw_only(student, teacher, regions)["total"].backward()
    assert student.grad.abs().sum() > 0 and torch.isfinite(student.grad).all()


def test_permuting_regions_leaves_all_terms_unchanged():
    torch.manual_seed(1)
    student, teacher = torch.randn(1, 4, 5, 5, 5), torch.randn(1, 6, 5, 5, 5)
    labels = torch.randint(0, 5, (1, 1, 5, 5, 5))
    (regions,) = extract_regions(labels, background_node=True)
    assert regions.shape[0] == 5
    loss = RegionGraphLoss(4, 6)
    base = loss(student, teacher, [regions])
    permuted = loss(student, teacher, [regions[torch.tensor([2, 4, 0, 3, 1])]])
    for key in base:
        assert permuted[key].item() == pytest.approx(base[key].item(), rel=1e-5, abs=1e-7)
    assert base["gw"].item() > 1e-4


def test_identical_student_and_teacher_give_zero_loss():
    torch.manual_seed(2)
    features = torch.randn(2, 4, 6, 6)
    labels = torch.randint(0, 4, (2, 1, 6, 6))
    regions = extract_regions(labels, lesion_labels=[3], background_node=True)
    out = _identity_projector(RegionGraphLoss(4, 4))(features, features.clone(), regions)
    for key in ("node", "edge", "gw", "total"):
        assert out[key].item() == pytest.approx(0.0, abs=1e-6)


def test_fewer_than_two_nodes_gives_zero_edge_and_gw_with_finite_gradient():
    torch.manual_seed(3)
    student = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4, 4)
    target = torch.zeros(2, 1, 4, 4, 4)
    target[0, 0, :2] = 1  # one node; sample 1 has no node at all
    regions = extract_regions(target)
    assert [r.shape[0] for r in regions] == [1, 0]
    loss = RegionGraphLoss(3, 3)
    out = loss(student, teacher, regions)
    assert out["edge"].item() == 0.0 and out["gw"].item() == 0.0
    assert out["node"].item() > 0 and math.isfinite(out["total"].item())
    out["total"].backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0

    # No node anywhere: every term is a finite zero that still back-propagates.
    student.grad = None
    empty = loss(student, teacher, [regions[1], regions[1]])
    assert all(v.item() == 0.0 for v in empty.values())
    assert empty["total"].requires_grad
    empty["total"].backward()
    assert student.grad is not None and torch.count_nonzero(student.grad) == 0
    assert loss.projector.weight.grad is not None


def test_batch_with_different_node_counts_equals_mean_of_single_samples():
    torch.manual_seed(4)
    target = torch.zeros(2, 1, 6, 6, 6)
    target[0, 0, :3] = 1
    target[0, 0, 4:] = 2  # sample 0: 2 nodes
    target[1, 0, :2, :2] = 1
    target[1, 0, 4:, :2, :2] = 2
    target[1, 0, 4:, 4:, 4:] = 2
    target[1, 0, 2:4, 2:4] = 3  # sample 1: 4 nodes (class 2 has two lesions)
    regions = extract_regions(target, lesion_labels=[2])
    assert [r.shape[0] for r in regions] == [2, 4]
    student, teacher = torch.randn(2, 3, 6, 6, 6), torch.randn(2, 5, 6, 6, 6)
    loss = RegionGraphLoss(3, 5, node_weight=0.5, edge_weight=2.0, gw_weight=1.5)
    batch = loss(student, teacher, regions)
    singles = [loss(student[b : b + 1], teacher[b : b + 1], [regions[b]]) for b in range(2)]
    for key in batch:
        expected = (singles[0][key] + singles[1][key]).item() / 2
        assert batch[key].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert singles[0]["gw"].item() != pytest.approx(singles[1]["gw"].item())


def test_fp16_and_autocast_inputs_give_finite_float32_loss():
    torch.manual_seed(5)
    labels = torch.randint(0, 3, (2, 1, 4, 4, 4))
    regions = extract_regions(labels)
    loss = RegionGraphLoss(2, 3, gw_solver="entropic")
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = loss(torch.randn(2, 2, 4, 4, 4).half(), torch.randn(2, 3, 4, 4, 4).half(), regions)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    assert out["gw"].item() > 0


def test_region_graph_loss_validation():
    loss = RegionGraphLoss(2, 3)
    regions = [torch.ones(1, 4, 4, dtype=torch.bool)]
    with pytest.raises(ValueError, match=r"\(1, 2, 4, 4\).*\(1, 3, 4, 5\)"):
        loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 5), regions)
    with pytest.raises(ValueError):
        loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), regions)
    with pytest.raises(ValueError):
        loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4), regions * 2)
    with pytest.raises(ValueError, match="exact, entropic"):
        RegionGraphLoss(2, 3, gw_solver="fast")
    with pytest.raises(ValueError):
        RegionGraphLoss(2, 3, edge_weight=-1.0)
