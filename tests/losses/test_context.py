"""Tests of the GCNet block and of MS-CA at one stage: the direct formula (context_alignment_direct) and the stage
module (ReCoStageLoss) on hand-computed values and against the materialised MSE of the two blocks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nnunetv2_recokd.losses import GlobalContextBlock, ReCoStageLoss, context_alignment_direct

PATHS = pytest.mark.parametrize("path", ["direct", "stage"])


class _ContextAlignment:
    """MS-CA with two blocks of ``channels``: context_alignment_direct, or the stage module with an identity adapter
    (so its input is the adapted feature). ``blocks`` are the ones the loss uses."""

    def __init__(self, path: str, channels: int, conv_dim: int = 3, ratio: float = 0.5) -> None:
        self.path = path
        if path == "direct":
            self.student_block = GlobalContextBlock(channels, ratio)
            self.teacher_block = GlobalContextBlock(channels, ratio)
        else:
            self.stage = ReCoStageLoss(channels, channels, conv_dim, ca_ratio=ratio)
            with torch.no_grad():
                self.stage.adapter.weight.copy_(torch.eye(channels).reshape(channels, channels, *[1] * conv_dim))
                self.stage.adapter.bias.zero_()
            self.student_block, self.teacher_block = self.stage.student_block, self.stage.teacher_block
        self.blocks = torch.nn.ModuleList([self.student_block, self.teacher_block])

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.path == "direct":
            return context_alignment_direct(student, teacher, self.student_block, self.teacher_block)
        return self.stage(student, teacher)["ca"]


def _naive_context_mse(loss: _ContextAlignment, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Reference MS-CA: materialise both broadcast sums and take the plain MSE."""
    return F.mse_loss(loss.student_block(student.float()), loss.teacher_block(teacher.float()))


def _randomise(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def test_context_pooling_by_hand():
    # C = 2, two voxels: F(:, v0) = (1, 0), F(:, v1) = (0, 1); W_m = (ln 3, 0) -> logits (ln 3, 0)
    # -> softmax (3/4, 1/4) -> ctx = 3/4 * (1, 0) + 1/4 * (0, 1) = (0.75, 0.25).
    block = GlobalContextBlock(2)
    with torch.no_grad():
        block.attention_logits.weight.copy_(torch.tensor([[math.log(3), 0.0]]))
    features_3d = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 1, 2)
    assert block.context(features_3d).flatten().tolist() == pytest.approx([0.75, 0.25], abs=1e-6)
    features_2d = features_3d.reshape(1, 2, 1, 2)  # dimension agnostic
    assert block.context(features_2d).flatten().tolist() == pytest.approx([0.75, 0.25], abs=1e-6)


def test_transform_by_hand():
    # C = 2, ratio 1 -> hidden 2. W_1 = I, b_1 = 0; ctx = (1, 3) -> LayerNorm: mean 2, var 1 -> (-1, 1)/sqrt(1 + 1e-5)
    # -> ReLU -> (0, 0.999995) -> W_2 = diag(1, 2), b_2 = (0.5, 0) -> (0.5, 1.99999).
    block = GlobalContextBlock(2, ratio=1.0)
    first, _, _, last = block.transform_layers
    with torch.no_grad():
        first.weight.copy_(torch.eye(2))
        first.bias.zero_()
        last.weight.copy_(torch.diag(torch.tensor([1.0, 2.0])))
        last.bias.copy_(torch.tensor([0.5, 0.0]))
    out = block.transform(torch.tensor([[1.0, 3.0]]))
    assert out.flatten().tolist() == pytest.approx([0.5, 2 / math.sqrt(1 + 1e-5)], abs=1e-6)


@pytest.mark.parametrize(("channels", "ratio", "hidden"), [(5, 0.5, 2), (1, 0.5, 1), (16, 0.25, 4), (3, 0.1, 1)])
def test_hidden_width(channels, ratio, hidden):
    block = GlobalContextBlock(channels, ratio)
    assert block.hidden_channels == hidden
    assert block.transform_layers[0].out_features == hidden


def test_fresh_block_is_identity_and_forward_broadcasts():
    torch.manual_seed(0)
    block = GlobalContextBlock(4)
    features = torch.randn(2, 4, 3, 4, 5)
    assert torch.equal(block(features), features)
    assert torch.equal(block.transform(block.context(features)), torch.zeros(2, 4))

    with torch.no_grad():
        block.transform_layers[-1].bias.copy_(torch.tensor([1.0, -2.0, 0.0, 3.0]))
    shifted = block(features)
    expected_shift = torch.tensor([1.0, -2.0, 0.0, 3.0]).reshape(1, 4, 1, 1, 1).expand_as(features)
    assert torch.allclose(shifted - features, expected_shift)
    features_2d = torch.randn(2, 4, 6, 6)
    assert torch.allclose(block(features_2d)[:, 3] - features_2d[:, 3], torch.full((2, 6, 6), 3.0))


def test_block_rejects_wrong_channels():
    block = GlobalContextBlock(4)
    with pytest.raises(ValueError, match=r"\(B, 4, \*spatial\).*\(1, 3, 2, 2, 2\)"):
        block.context(torch.zeros(1, 3, 2, 2, 2))
    with pytest.raises(ValueError, match=r"\(B, 4\).*\(1, 3\)"):
        block.transform(torch.zeros(1, 3))


@PATHS
def test_fresh_blocks_reduce_to_plain_mse_by_hand(path):
    # Zero-initialised transforms -> MS-CA = MSE(F_s, F_t). F_s - F_t = 2 on half the elements, 0 elsewhere
    # -> mean of d^2 = 4 * 1/2 = 2.0.
    teacher = torch.zeros(1, 2, 2, 2, 2)
    student = teacher.clone()
    student[0, 0] = 2.0
    assert _ContextAlignment(path, 2)(student, teacher).item() == pytest.approx(2.0, abs=1e-6)


@PATHS
def test_constant_shift_by_hand(path):
    # Student transform has zero weight and bias b = (1, -1), teacher block is fresh: a_s = (1, -1), a_t = 0.
    # F_s = F_t + 1 everywhere -> per channel (1 + 1)^2 = 4 and (1 - 1)^2 = 0 -> mean 2.0 (d and delta both count).
    # F_s = F_t with b = (1, 3) -> mean(b^2) = (1 + 9) / 2 = 5.0.
    torch.manual_seed(1)
    loss = _ContextAlignment(path, 2)
    with torch.no_grad():
        loss.student_block.transform_layers[-1].bias.copy_(torch.tensor([1.0, -1.0]))
    teacher = torch.randn(3, 2, 3, 4, 5)
    assert loss(teacher + 1.0, teacher).item() == pytest.approx(2.0, abs=1e-5)
    with torch.no_grad():
        loss.student_block.transform_layers[-1].bias.copy_(torch.tensor([1.0, 3.0]))
    assert loss(teacher.clone(), teacher).item() == pytest.approx(5.0, abs=1e-5)
    # The teacher block's shift cancels the student's: b_t = (1, 3) too -> 0.
    with torch.no_grad():
        loss.teacher_block.transform_layers[-1].bias.copy_(torch.tensor([1.0, 3.0]))
    assert loss(teacher.clone(), teacher).item() == pytest.approx(0.0, abs=1e-10)


@PATHS
def test_student_equal_teacher_gives_zero(path):
    torch.manual_seed(2)
    teacher = torch.randn(2, 6, 4, 4, 4)
    loss = _ContextAlignment(path, 6)
    assert loss(teacher.clone(), teacher).item() == 0.0
    _randomise(loss.student_block, seed=3)
    loss.teacher_block.load_state_dict(loss.student_block.state_dict())
    assert loss(teacher.clone(), teacher).item() == pytest.approx(0.0, abs=1e-12)
    # Sanity: with different block weights the same features no longer give zero.
    _randomise(loss.teacher_block, seed=4)
    assert loss(teacher.clone(), teacher).item() > 1e-3


@PATHS
@pytest.mark.parametrize("shape", [(2, 6, 5, 4, 3), (3, 4, 7, 5)])
def test_matches_the_materialised_mse_of_both_blocks(shape, path):
    torch.manual_seed(5)
    loss = _ContextAlignment(path, shape[1], conv_dim=len(shape) - 2)
    _randomise(loss.student_block, seed=6)
    _randomise(loss.teacher_block, seed=7)
    student = torch.randn(shape, requires_grad=True)
    teacher = torch.randn(shape)

    value = loss(student, teacher)
    grads = torch.autograd.grad(value, [student, *loss.blocks.parameters()])
    reference = _naive_context_mse(loss, student, teacher)
    reference_grads = torch.autograd.grad(reference, [student, *loss.blocks.parameters()])

    assert reference.item() > 0.5  # the blocks shift the features noticeably
    assert value.item() == pytest.approx(reference.item(), abs=1e-5)
    for grad, reference_grad in zip(grads, reference_grads):
        assert torch.allclose(grad, reference_grad, atol=1e-5, rtol=1e-4)


def test_gradients_reach_student_adapter_and_both_blocks_but_not_teacher():
    torch.manual_seed(8)
    student_block, teacher_block = GlobalContextBlock(4), GlobalContextBlock(4)
    _randomise(student_block, seed=9)
    _randomise(teacher_block, seed=10)
    adapter = torch.nn.Conv3d(2, 4, kernel_size=1)
    raw_student = torch.randn(2, 2, 4, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 4, 4, 4, 4)
    context_alignment_direct(adapter(raw_student), teacher, student_block, teacher_block).backward()
    assert raw_student.grad.abs().sum().item() > 0
    assert adapter.weight.grad.abs().sum().item() > 0
    assert teacher.grad is None
    for name, parameter in [*student_block.named_parameters(), *teacher_block.named_parameters()]:
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum().item() > 0, name


def test_stage_gradients_reach_student_adapter_and_both_blocks_but_not_teacher():
    torch.manual_seed(8)
    stage = ReCoStageLoss(2, 4, ca_ratio=0.5)
    _randomise(stage.student_block, seed=9)
    _randomise(stage.teacher_block, seed=10)
    raw_student = torch.randn(2, 2, 4, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 4, 4, 4, 4, requires_grad=True)
    stage(raw_student, teacher)["ca"].backward()
    assert raw_student.grad.abs().sum().item() > 0
    assert teacher.grad is None
    for name, parameter in stage.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum().item() > 0, name


@PATHS
def test_teacher_feature_is_detached_even_if_it_requires_grad(path):
    torch.manual_seed(16)
    loss = _ContextAlignment(path, 4)
    _randomise(loss.blocks, seed=17)
    teacher = torch.randn(2, 4, 3, 3, 3, requires_grad=True)
    loss(torch.randn(2, 4, 3, 3, 3), teacher).backward()
    assert teacher.grad is None
    assert loss.teacher_block.attention_logits.weight.grad.abs().sum().item() > 0


@PATHS
def test_fresh_blocks_get_gradient_on_last_layer(path):
    # Zero-init last layer: only it receives a non-zero gradient at step 0, which is what lets training start.
    torch.manual_seed(11)
    loss = _ContextAlignment(path, 4)
    loss(torch.randn(2, 4, 3, 3, 3) + 1.0, torch.randn(2, 4, 3, 3, 3)).backward()
    for block in (loss.student_block, loss.teacher_block):
        assert block.transform_layers[-1].bias.grad.abs().sum().item() > 0
        assert block.transform_layers[-1].weight.grad.abs().sum().item() > 0


@PATHS
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_float32_loss(dtype, path):
    torch.manual_seed(12)
    loss = _ContextAlignment(path, 4)
    _randomise(loss.blocks, seed=13)
    student = torch.randn(2, 4, 4, 4, 4).to(dtype)
    teacher = torch.randn(2, 4, 4, 4, 4).to(dtype)
    value = loss(student, teacher)
    assert value.dtype == torch.float32 and value.ndim == 0 and torch.isfinite(value)
    assert value.item() == pytest.approx(_naive_context_mse(loss, student, teacher).item(), abs=1e-5)


@PATHS
def test_runs_in_float32_under_autocast(path):
    torch.manual_seed(14)
    loss = _ContextAlignment(path, 8)
    _randomise(loss.blocks, seed=15)
    student, teacher = torch.randn(2, 8, 6, 6, 6), torch.randn(2, 8, 6, 6, 6)
    expected = loss(student, teacher).item()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        value = loss(student, teacher)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_shape_mismatch_raises_with_both_shapes():
    blocks = GlobalContextBlock(3), GlobalContextBlock(3)
    with pytest.raises(ValueError, match=r"\(1, 3, 4, 4, 4\).*\(1, 3, 4, 4, 2\)"):
        context_alignment_direct(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 3, 4, 4, 2), *blocks)
    with pytest.raises(ValueError, match=r"\(B, 3, \*spatial\).*\(1, 5, 4, 4, 4\)"):
        context_alignment_direct(torch.zeros(1, 5, 4, 4, 4), torch.zeros(1, 5, 4, 4, 4), *blocks)
    with pytest.raises(ValueError, match="blocks of 3 and 4 channels"):
        context_alignment_direct(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4), blocks[0],
                                 GlobalContextBlock(4))


@pytest.mark.parametrize(("channels", "ratio", "match"), [(0, 0.5, "channels"), (2.5, 0.5, "channels"),
                                                          (True, 0.5, "channels"), (4, 0.0, "ratio"),
                                                          (4, float("nan"), "ratio")])
def test_invalid_options_raise(channels, ratio, match):
    with pytest.raises(ValueError, match=match):
        GlobalContextBlock(channels, ratio)
    if match == "ratio":  # the stage builds its two blocks with ca_ratio
        with pytest.raises(ValueError, match=match):
            ReCoStageLoss(3, channels, ca_ratio=ratio)
