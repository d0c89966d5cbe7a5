"""The streaming max-pool kernel (window equal to the stride, no padding; AVX-512 targets): models against
onnx.reference, the routing per target, bad specs."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_factory import reference_outputs
from test_compiler import assert_close
from test_depthwise_conv import kernel_calls, max_pool_model

import tvm_patdnn
from tvm_patdnn.errors import PatDNNError
from tvm_patdnn.frontend import import_onnx
from tvm_patdnn.ops.max_pool import MAX_POOL_ATTR, MaxPoolSpec, max_pool_primfunc
from tvm_patdnn.targets import resolve_target, vector_lanes
from tvm_patdnn.transform.depthwise_conv_rewrite import DepthwiseConvRewrite

AVX512 = vector_lanes(resolve_target("x86")) >= 16


def _run_against_reference(shape, kernel, seed=0) -> tvm_patdnn.CompiledModel:
    model = max_pool_model(shape, kernel, kernel, (0, 0, 0, 0))
    compiled = tvm_patdnn.compile(model, "x86")
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    x[..., ::3] = -np.inf if seed % 2 else x[..., ::3]  # -inf inputs: the max must still see them
    assert_close(compiled.run({"x": x})[0], reference_outputs(model, {"x": x})[0])
    return compiled


@pytest.mark.parametrize("shape, kernel", [
    ((2, 3, 224, 224), (2, 2)),  # VGG's pool: 112-wide rows, 7 whole vectors
    ((2, 5, 57, 61), (2, 2)),  # odd sizes: the last row and column dropped, a 30-wide row's overlapping vector
    ((1, 7, 9, 100), (3, 3)),  # 3x3 stride 3, a 33-wide row
    ((2, 3, 8, 66), (2, 3)),  # an asymmetric window, 22 outputs a row
    ((1, 4, 14, 14), (2, 2)),  # 7-wide rows: one 7-lane vector
    ((2, 9, 5, 4), (2, 2)),  # 2-wide rows
    ((1, 3, 6, 38), (1, 2)),  # a one-row window
])
def test_max_pool_matches_reference(shape, kernel):
    compiled = _run_against_reference(shape, kernel)
    out_width = shape[3] // kernel[1]
    expected = AVX512 and min(16, out_width) >= 2
    assert kernel_calls(compiled, "max_pool") == expected
    assert kernel_calls(compiled, "depthwise_max_pool") == (not expected)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 2), st.integers(1, 19), st.integers(2, 40), st.integers(4, 70), st.integers(1, 3),
       st.integers(1, 3), st.integers(0, 3))
def test_random_pools_match_reference(batch, channels, height, width, kh, kw, seed):
    kh, kw = min(kh, height), min(kw, width)
    _run_against_reference((batch, channels, height, width), (kh, kw), seed)


def test_routing_per_target():
    """16-lane targets take the kernel for window == stride without padding and rows of >= 2 outputs;
    padded or overlapping pools, 1-wide rows, AVX2 and NEON targets keep the depthwise kernel."""
    def kernels(lanes, shape, kernel, strides, pads):
        mod = import_onnx(max_pool_model(shape, kernel, strides, pads)).mod
        rewritten = DepthwiseConvRewrite(32, lanes)(mod)
        return [MAX_POOL_ATTR in func.attrs for _, func in rewritten.functions_items()
                if isinstance(func, tvm.tirx.PrimFunc) and func.attrs]

    vgg = ((1, 64, 224, 224), (2, 2), (2, 2), (0, 0, 0, 0))
    assert kernels(16, *vgg) == [True]
    assert kernels(8, *vgg) == [False] and kernels(4, *vgg) == [False]  # AVX2, NEON unchanged
    assert kernels(16, (1, 64, 112, 112), (3, 3), (2, 2), (1, 1, 1, 1)) == [False]  # ResNet-50's pool
    assert kernels(16, (1, 8, 4, 4), (2, 2), (2, 2), (1, 1, 1, 1)) == [False]  # padded
    assert kernels(16, (1, 512, 2, 2), (2, 2), (2, 2), (0, 0, 0, 0)) == [False]  # 1-wide rows
    assert kernels(16, (1, 512, 4, 4), (2, 2), (2, 2), (0, 0, 0, 0)) == [True]


def test_kernel_reads_and_writes_whole_vectors():
    """The 2x2 pool's rows are whole 512-bit loads, shuffled by two-source permutes, no gathers (code
    generation only: this host may not run it)."""
    func = max_pool_primfunc(MaxPoolSpec(batch=1, channels=4, height=224, width=224)).with_attr("global_symbol", "p")
    asm = tvm.tirx.build(tvm.IRModule({"p": func}), resolve_target('{"kind":"llvm","mcpu":"skylake-avx512"}')) \
        .inspect_source("asm")
    assert "vpermt2ps" in asm or "vpermi2ps" in asm
    assert "vgather" not in asm and "vmaxps" in asm


@pytest.mark.parametrize("fields, message", [
    (dict(height=3, width=40, kernel=(4, 2)), "does not fit"),
    (dict(height=4, width=40, kernel=(0, 2)), "does not fit"),
    (dict(height=4, width=20, kernel=(2, 2), lanes=16), "do not fit output rows of 10"),
    (dict(height=4, width=20, kernel=(2, 2), lanes=0), "do not fit"),
    (dict(height=0, width=20), "empty input"),
])
def test_bad_specs_raise_patdnn_errors(fields, message):
    with pytest.raises(PatDNNError, match=message):
        MaxPoolSpec(**{"batch": 1, "channels": 2, **fields})


def test_max_pool_before_a_flatten_compiles():
    """A one-input call_tir (the pool) before a reshape: TVM's RewriteDataflowReshape needs the root block."""
    from onnx import TensorProto, helper
    pool = helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2])
    flat = helper.make_node("Flatten", ["p"], ["y"])
    graph = helper.make_graph([pool, flat], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4 * 32 * 32])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    compiled = tvm_patdnn.compile(model, "x86")
    x = np.random.default_rng(1).standard_normal((1, 4, 64, 64)).astype(np.float32)
    assert_close(compiled.run({"x": x})[0], reference_outputs(model, {"x": x})[0])

