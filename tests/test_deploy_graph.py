"""deploy/graph.py: the skip concatenations folded into the convolutions that read them."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from nnunetv2_recokd import sandbox  # noqa: E402
from nnunetv2_recokd.deploy.graph import split_concat_convs  # noqa: E402
from nnunetv2_recokd.deploy.runtime import export_onnx, onnx_cache_file  # noqa: E402
from nnunetv2_recokd.student import build_student_network  # noqa: E402


def _run(model, **inputs) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def _concat_conv(extra_reader: bool = False):
    """a (1, 1, 1, 1, 2) and b (1, 2, 1, 1, 2) concatenated, then a 1x1x1 convolution W = [1, 2, 3], bias 0.5."""
    nodes = [helper.make_node("Concat", ["a", "b"], ["ab"], axis=1),
             helper.make_node("Conv", ["ab", "W", "B"], ["y"], kernel_shape=[1, 1, 1])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 1, 1, 2])]
    if extra_reader:  # the concatenation also read by another node: must stay
        nodes.append(helper.make_node("Relu", ["ab"], ["r"]))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 3, 1, 1, 2]))
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 1, 1, 1, 2]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 2, 1, 1, 2])], outputs,
        [numpy_helper.from_array(np.array([1, 2, 3], np.float32).reshape(1, 3, 1, 1, 1), "W"),
         numpy_helper.from_array(np.array([0.5], np.float32), "B")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_split_convolution_by_hand():
    a = np.array([1, -1], np.float32).reshape(1, 1, 1, 1, 2)
    b = np.array([[2, 0], [1, 4]], np.float32).reshape(1, 2, 1, 1, 2)
    # y = 1 * a + 2 * b0 + 3 * b1 + 0.5 = [1 + 4 + 3 + 0.5, -1 + 0 + 12 + 0.5]
    expected = np.array([8.5, 11.5], np.float32).reshape(1, 1, 1, 1, 2)
    model = _concat_conv()
    rewritten, removed = split_concat_convs(model)
    assert removed == 1
    assert [n.op_type for n in rewritten.graph.node] == ["Conv", "Conv", "Add"]
    weights = {i.name: numpy_helper.to_array(i) for i in rewritten.graph.initializer}
    assert sorted(weights) == ["B", "W__part0", "W__part1"]  # the unsplit weight is gone
    np.testing.assert_array_equal(weights["W__part1"].ravel(), [2, 3])
    np.testing.assert_allclose(_run(rewritten, a=a, b=b), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(_run(model, a=a, b=b), expected, rtol=0, atol=1e-6)
    assert [n.op_type for n in model.graph.node] == ["Concat", "Conv"]  # the input model is left as it was


def test_a_concatenation_read_elsewhere_is_kept():
    rewritten, removed = split_concat_convs(_concat_conv(extra_reader=True))
    assert removed == 0 and [n.op_type for n in rewritten.graph.node] == ["Concat", "Conv", "Relu"]


def test_unet_export_loses_its_concatenations_not_its_output():
    """nnU-Net's U-Net (3 stages: 2 decoder concatenations) exported, rewritten: no Concat left, logits equal to
    float32 summation order."""
    torch.manual_seed(0)
    plans = sandbox.unet_plans((16, 32, 64), (16, 16, 16))
    configuration = PlansManager(plans).get_configuration("3d_fullres")
    network = build_student_network(configuration, 1, 3, False, 0.5, 8).eval()
    buffer = io.BytesIO()
    export_onnx(network, (1, 1, 16, 16, 16), buffer)
    plain = onnx.load_from_string(buffer.getvalue())
    rewritten, removed = split_concat_convs(plain)
    ops = [n.op_type for n in rewritten.graph.node]
    assert removed == 2 and "Concat" not in ops and ops.count("Add") == 2
    onnx.checker.check_model(rewritten)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        reference = network(x).numpy()
    assert np.abs(_run(rewritten, image=x.numpy()) - reference).max() < 1e-4
    assert np.abs(_run(rewritten, image=x.numpy()) - _run(plain, image=x.numpy())).max() < 1e-5


def test_rewritten_and_plain_exports_are_cached_apart(tmp_path):
    checkpoint = tmp_path / "checkpoint_final.pth"
    checkpoint.write_bytes(b"weights")
    shape = (1, 1, 16, 16, 16)
    assert onnx_cache_file(checkpoint, shape, tmp_path) != onnx_cache_file(checkpoint, shape, tmp_path,
                                                                           optimize_graph=False)
