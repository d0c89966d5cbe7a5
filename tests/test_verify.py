"""The output check every deployment, OpenCL check and test relies on."""

from __future__ import annotations

import numpy as np
from model_factory import ConvSpec, build_cnn
from onnx import TensorProto, helper

from tvm_patdnn.frontend import load_model, seeded_inputs
from tvm_patdnn.verify import DEFAULT_RTOL, onnx_reference, relative_error


def test_relative_error_is_the_largest_deviation_over_the_largest_expected_value() -> None:
    expected = np.array([[-4.0, 1.0], [0.5, 2.0]], np.float32)
    actual = expected + np.array([[0.0, 0.02], [-0.04, 0.0]], np.float32)
    assert np.isclose(relative_error(actual, expected), 0.04 / 4.0)
    assert relative_error(expected, expected) == 0.0


def test_a_wrong_shape_or_an_all_zero_reference_cannot_pass_by_accident() -> None:
    assert relative_error(np.zeros((1, 4)), np.zeros((4, 1))) == float("inf")
    assert relative_error(np.full(3, 1e-3), np.zeros(3)) > DEFAULT_RTOL  # scale floored, not divided by zero


def test_onnx_reference_runs_the_graph_as_onnx_specifies_it() -> None:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
    (y,) = onnx_reference(model, {"x": x})
    assert isinstance(y, np.ndarray) and np.array_equal(y, np.maximum(x, 0))


def test_seeded_inputs_are_reproducible_and_fit_the_model() -> None:
    model = build_cnn(np.random.default_rng(1), (1, 3, 8, 8), [ConvSpec(4, kind="dense")])
    imported = load_model(model)
    first, again = seeded_inputs(imported), seeded_inputs(imported)
    assert list(first) == ["input"] and first["input"].shape == (1, 3, 8, 8) and first["input"].dtype == np.float32
    assert np.array_equal(first["input"], again["input"])
    assert not np.array_equal(first["input"], seeded_inputs(imported, seed=1)["input"])
    assert onnx_reference(model, first)[0].shape == (1, 4, 8, 8)
