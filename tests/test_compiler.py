"""Compiled models against onnx.reference.ReferenceEvaluator, and the report's verdicts."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_factory import ConvSpec, build_cnn, pattern_weight, reference_outputs
from tvm import relax

import tvm_patdnn
from tvm_patdnn import PatDNNError
from tvm_patdnn.frontend import seeded_inputs
from tvm_patdnn.verify import relative_error

# Largest errors measured against onnx.reference, as a share of the output's magnitude (fp32 sums in
# another order): 1.6e-7 over 60 random pattern models; up to 2.1e-6 on random dense-kernel models
# and 2.9e-6 on real layers for the direct kernel, whose reductions run over C*KH*KW terms blocked
# by channel (Winograd F(2x2) 1.2e-6; its F(4x4) tests have their own bound). 5e-6 leaves room for
# those orders without hiding a wrong tap or a dropped ReLU, which err by 1e-2 and more.
RTOL = 5e-6


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Relative error (to the output's magnitude) at most RTOL."""
    assert actual.shape == expected.shape
    error = relative_error(actual, expected)
    assert error <= RTOL, f"relative error {error:.2e}"


def check_against_reference(model: onnx.ModelProto, seed: int = 0, **compile_args) -> tvm_patdnn.CompiledModel:
    compiled = tvm_patdnn.compile(model, "x86", **compile_args)
    inputs = seeded_inputs(compiled, seed)
    for actual, expected in zip(compiled.run(inputs), reference_outputs(model, inputs), strict=True):
        assert_close(actual, expected)
    return compiled


@st.composite
def pattern_models(draw):
    """Random graphs of pattern-pruned convs: row and column strides (independently 1-3),
    paddings, sizes, channels, 3-5 tap patterns, bias, constant adds (per channel, scalar, per
    element), ReLU, residuals, intermediate outputs."""
    seed = draw(st.integers(0, 2**31))
    batch = draw(st.sampled_from([1, 2]))
    channels = draw(st.integers(1, 9))
    height, width = draw(st.integers(3, 13)), draw(st.integers(3, 13))
    taps = draw(st.sampled_from([3, 4, 5]))
    convs = []
    h, w, c = height, width, channels
    for _ in range(draw(st.integers(1, 3))):
        stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
        if h + pads[0] + pads[2] < 3 or w + pads[1] + pads[3] < 3:
            pads = (1, 1, 1, 1)
        residual = draw(st.booleans())
        out_c = c if residual else draw(st.integers(1, 12))
        if residual:
            stride, pads = (1, 1), (1, 1, 1, 1)
        convs.append(
            ConvSpec(
                out_channels=out_c,
                stride=stride,
                pads=pads,
                bias=draw(st.booleans()),
                relu=draw(st.booleans()),
                residual=residual,
                n_patterns=draw(st.integers(1, 12)),
                connectivity=draw(st.sampled_from([1.0, 2.0, 3.6])),
                taps=taps,
                add=draw(st.sampled_from([None, None, "channel", "scalar", "full"])),
                output=draw(st.booleans()),
            )
        )
        h = (h + pads[0] + pads[2] - 3) // stride[0] + 1
        w = (w + pads[1] + pads[3] - 3) // stride[1] + 1
        c = out_c
    model = build_cnn(np.random.default_rng(seed), (batch, channels, height, width), convs)
    return model, seed, taps


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern_models())
def test_random_pattern_models_match_reference(case):
    model, seed, taps = case
    compiled = check_against_reference(model, seed, entries=max(taps, 4))
    # Every conv of these models is pattern-sparse (unless connectivity emptied it entirely).
    for record in compiled.report:
        assert record.kind == "pattern" or record.reason == "all kernels are zero", record


def test_mixed_model_marks_exactly_the_pattern_layers():
    convs = [
        ConvSpec(16, kind="dense"),  # first layer, 3 input channels, dense 3x3
        ConvSpec(16, connectivity=3.6),
        ConvSpec(16, kind="1x1"),
        ConvSpec(16, stride=2, residual=False),
        ConvSpec(16, kind="depthwise"),
        ConvSpec(24, kind="dilated", pads=(2, 2, 2, 2)),
        ConvSpec(24, residual=True, bias=False),
        ConvSpec(12, kind="dense", stride=2),
    ]
    model = build_cnn(np.random.default_rng(3), (2, 3, 17, 15), convs, head=True)
    compiled = check_against_reference(model, 3)
    kinds = {r.name: (r.kind, r.reason) for r in compiled.report}
    assert [r.name for r in compiled.report] == [f"conv{i}" for i in range(len(convs))]
    expected_pattern = {"conv1", "conv3", "conv6"}
    assert {n for n, (k, _) in kinds.items() if k == "pattern"} == expected_pattern
    assert "nonzeros" in kinds["conv0"][1]
    assert "1x1" in kinds["conv2"][1]
    assert "depthwise" in kinds["conv4"][1]
    assert "dilated" in kinds["conv5"][1]
    fused = {r.name: r.fused for r in compiled.report}
    assert fused["conv1"] == ("bias", "relu")
    assert fused["conv6"] == ()  # its add is a residual, not a bias; no bias input
    conv1 = next(r for r in compiled.report if r.name == "conv1")
    assert conv1.kept_kernels < conv1.total_kernels
    assert conv1.nonzero_flops < conv1.dense_flops / 2
    assert sum(conv1.pattern_counts) == conv1.kept_kernels


def test_layer_limits_entries_and_max_patterns():
    rng = np.random.default_rng(5)
    model = build_cnn(rng, (1, 8, 10, 10), [ConvSpec(16, n_patterns=12)])
    assert tvm_patdnn.inspect(model, max_patterns=12)[0].kind == "pattern"
    fewer = tvm_patdnn.inspect(model, max_patterns=4)[0]
    assert fewer.kind == "dense" and "max_patterns=4" in fewer.reason
    assert tvm_patdnn.inspect(model, entries=3)[0].kind == "dense"
    # Those dense decisions still compile and match the reference.
    check_against_reference(model, 5, max_patterns=4)


def test_one_shot_pruned_model_is_pattern_layer_for_layer(tmp_path):
    from tvm_patdnn.pruning import prune_onnx

    rng = np.random.default_rng(7)
    dense = build_cnn(
        rng,
        (1, 3, 16, 16),
        [ConvSpec(16, kind="dense"), ConvSpec(16, kind="dense"), ConvSpec(32, kind="dense", stride=2), ConvSpec(32, kind="dense")],
        head=True,
    )
    result = prune_onnx(dense, n_patterns=8, connectivity=3.6)
    pruned_names = {layer.name for layer in result.layers if layer.action == "pruned"}
    assert pruned_names == {"conv1", "conv2", "conv3"}
    compiled = check_against_reference(result.model, 7)
    assert {r.name for r in compiled.report if r.kind == "pattern"} == pruned_names
    assert all(r.n_patterns <= 8 for r in compiled.report if r.kind == "pattern")


def test_relax_module_with_params_and_export(tmp_path):
    rng = np.random.default_rng(11)
    weight = pattern_weight(rng, 8, 4, n_patterns=6, connectivity=2.0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 4, 9, 9), "float32"))
    w = relax.Var("w", relax.TensorType((8, 4, 3, 3), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            conv = bb.emit(relax.op.nn.conv2d(x, w, strides=2, padding=1))
            out = bb.emit_output(relax.op.nn.relu(conv))
        bb.emit_func_output(out)
    compiled = tvm_patdnn.compile(bb.get(), "x86", params={"w": weight})
    assert compiled.input_names == ["x"]
    assert [r.kind for r in compiled.report] == ["pattern"]

    data = rng.standard_normal((2, 4, 9, 9)).astype(np.float32)
    node = onnx.helper.make_node("Conv", ["x", "w"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1])
    relu = onnx.helper.make_node("Relu", ["c"], ["y"])
    graph = onnx.helper.make_graph(
        [node, relu], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4, 9, 9])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 8, 5, 5])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    reference = reference_outputs(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), {"x": data})[0]
    assert_close(compiled.run({"x": data})[0], reference)

    path = compiled.export_library(tmp_path / "model.so")
    # The library and its signature (tvm_patdnn.load), no temp file left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.so", "model.so.json"]
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    assert_close(vm["main"](tvm.runtime.tensor(data)).numpy(), reference)


def test_run_checks_inputs():
    compiled = tvm_patdnn.compile(build_cnn(np.random.default_rng(2), (1, 2, 5, 5), [ConvSpec(4)]), "x86")
    with pytest.raises(PatDNNError, match="missing"):
        compiled.run({})
    with pytest.raises(PatDNNError, match="shape"):
        compiled.run({"input": np.zeros((1, 2, 6, 5), np.float32)})


def test_a_scalar_graph_input_stays_a_scalar():
    """A 0-d input (here a scale multiplied into the image) is checked and passed as 0-d."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Mul", ["x", "scale"], ["y"])], "scaled",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3]),
         onnx.helper.make_tensor_value_info("scale", onnx.TensorProto.FLOAT, [])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])])
    compiled = tvm_patdnn.compile(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), "x86")
    x = np.arange(3, dtype=np.float32).reshape(1, 3)
    np.testing.assert_array_equal(compiled.run({"x": x, "scale": np.float32(2.0)})[0], 2 * x)


@pytest.mark.parametrize("batch, features, classes", [(1, 300, 37), (2, 300, 32), (3, 64, 1), (1, 1152, 256)])
def test_fully_connected_fallback_matches_reference(batch, features, classes):
    """Gemm (+ReLU) on the dense path with the project's FC schedule, including widths with no vector divisor."""
    rng = np.random.default_rng(classes)
    weight = rng.standard_normal((classes, features)).astype(np.float32)
    bias = rng.standard_normal(classes).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1), onnx.helper.make_node("Relu", ["y"], ["z"])],
        "fc", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, features])],
        [onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [batch, classes])],
        [onnx.numpy_helper.from_array(weight, "w"), onnx.numpy_helper.from_array(bias, "b")],
    )
    check_against_reference(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), 1)


def test_dense_conv_with_single_output_pixel_matches_reference():
    model = build_cnn(np.random.default_rng(9), (1, 5, 3, 3), [ConvSpec(3, kind="dense", pads=(0, 0, 0, 0))])
    check_against_reference(model, 9)
