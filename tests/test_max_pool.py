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


def _run_against_reference(shape, kernel, strides=None, pads=(0, 0, 0, 0), seed=0) -> tvm_patdnn.CompiledModel:
    model = max_pool_model(shape, kernel, strides or kernel, pads)
    compiled = tvm_patdnn.compile(model, "x86")
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    if seed % 2:
        x[..., ::3] = -np.inf  # -inf inputs: the max must still see them
    assert_close(compiled.run({"x": x})[0], reference_outputs(model, {"x": x})[0])
    return compiled


def _streamed(shape, kernel, strides, pads) -> bool:
    out_width = (shape[3] + pads[1] + pads[3] - kernel[1]) // strides[1] + 1
    lanes = min(16, out_width, shape[3] // strides[1])
    routed = (kernel == strides and not any(pads)) or (kernel, strides, pads) == ((3, 3), (2, 2), (1, 1, 1, 1))
    return AVX512 and lanes >= 2 and routed


@pytest.mark.parametrize("shape, kernel, strides, pads", [
    ((2, 3, 224, 224), (2, 2), (2, 2), (0, 0, 0, 0)),  # VGG's pool: 112-wide rows, 7 whole vectors
    ((2, 5, 57, 61), (2, 2), (2, 2), (0, 0, 0, 0)),  # odd sizes: last row and column dropped, an overlapping vector
    ((1, 7, 9, 100), (3, 3), (3, 3), (0, 0, 0, 0)),  # 3x3 stride 3, a 33-wide row
    ((2, 3, 8, 66), (2, 3), (2, 3), (0, 0, 0, 0)),  # an asymmetric window, 22 outputs a row
    ((1, 4, 14, 14), (2, 2), (2, 2), (0, 0, 0, 0)),  # 7-wide rows: one 7-lane vector
    ((2, 9, 5, 4), (2, 2), (2, 2), (0, 0, 0, 0)),  # 2-wide rows
    ((1, 3, 6, 38), (1, 2), (1, 2), (0, 0, 0, 0)),  # a one-row window
    ((2, 3, 112, 112), (3, 3), (2, 2), (1, 1, 1, 1)),  # ResNet's stem pool: clamped rows and row-end vectors
    ((1, 5, 23, 19), (3, 3), (2, 2), (1, 1, 1, 1)),  # ... odd sizes
    ((2, 4, 40, 71), (3, 3), (2, 2), (1, 1, 1, 1)),  # ... a 36-wide row
])
def test_max_pool_matches_reference(shape, kernel, strides, pads):
    compiled = _run_against_reference(shape, kernel, strides, pads)
    expected = _streamed(shape, kernel, strides, pads)
    assert kernel_calls(compiled, "max_pool") == expected
    assert kernel_calls(compiled, "depthwise_max_pool") == (not expected)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 2), st.integers(1, 19), st.integers(3, 40), st.integers(4, 70), st.integers(1, 3),
       st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.lists(st.integers(0, 2), min_size=4, max_size=4),
       st.integers(0, 3))
def test_random_pools_match_reference_on_the_kernel(batch, channels, height, width, kh, kw, sh, sw, pads, seed):
    """Any window, stride and padding (smaller than the window) the kernel is built for, against a numpy max."""
    kh, kw = min(kh, height), min(kw, width)
    pads = (min(pads[0], kh - 1), min(pads[1], kw - 1), min(pads[2], kh - 1), min(pads[3], kw - 1))
    out_width = (width + pads[1] + pads[3] - kw) // sw + 1
    lanes = min(16, out_width, width // sw)
    if lanes < 1:
        return
    spec = MaxPoolSpec(batch=batch, channels=channels, height=height, width=width, kernel=(kh, kw), strides=(sh, sw),
                       padding=pads, lanes=lanes)
    func = max_pool_primfunc(spec).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=resolve_target("x86"))
    x = np.random.default_rng(seed).standard_normal((batch, channels, height, width)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((batch, channels, spec.out_height, spec.out_width), np.float32))
    lib["main"](tvm.runtime.tensor(x), out)
    assert_close(out.numpy(), _numpy_max_pool(x, (kh, kw), (sh, sw), pads))


def _numpy_max_pool(x, kernel, strides, pads):
    """The reference of the random test: onnx.reference's MaxPool fails on some of these windows (a
    1-row window with padding: 'zero-size array to reduction'), so the max over a -inf padded copy."""
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=-np.inf)
    oh = (padded.shape[2] - kernel[0]) // strides[0] + 1
    ow = (padded.shape[3] - kernel[1]) // strides[1] + 1
    out = np.full((*x.shape[:2], oh, ow), -np.inf, np.float32)
    for dy in range(kernel[0]):
        for dx in range(kernel[1]):
            rows = slice(dy, dy + (oh - 1) * strides[0] + 1, strides[0])
            out = np.maximum(out, padded[:, :, rows, dx:dx + (ow - 1) * strides[1] + 1:strides[1]])
    return out


def test_routing_per_target():
    """16-lane targets take the kernel for window == stride without padding and for ResNet's 3x3 stride-2
    pad-1 pool, with rows of >= 2 outputs; other padded or overlapping pools, 1-wide rows, AVX2 and NEON
    targets keep the depthwise kernel."""
    def kernels(lanes, shape, kernel, strides, pads):
        mod = import_onnx(max_pool_model(shape, kernel, strides, pads)).mod
        rewritten = DepthwiseConvRewrite(32, lanes)(mod)
        return [MAX_POOL_ATTR in func.attrs for _, func in rewritten.functions_items()
                if isinstance(func, tvm.tirx.PrimFunc) and func.attrs]

    vgg = ((1, 64, 224, 224), (2, 2), (2, 2), (0, 0, 0, 0))
    assert kernels(16, *vgg) == [True]
    assert kernels(8, *vgg) == [False] and kernels(4, *vgg) == [False]  # AVX2, NEON unchanged
    assert kernels(16, (1, 64, 112, 112), (3, 3), (2, 2), (1, 1, 1, 1)) == [True]  # ResNet-50's pool
    assert kernels(8, (1, 64, 112, 112), (3, 3), (2, 2), (1, 1, 1, 1)) == [False]
    assert kernels(16, (1, 8, 8, 8), (2, 2), (2, 2), (1, 1, 1, 1)) == [False]  # other padded pools
    assert kernels(16, (1, 8, 9, 9), (3, 3), (1, 1), (1, 1, 1, 1)) == [False]
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
    (dict(height=4, width=20, kernel=(3, 3), strides=(1, 3), lanes=7), "input rows of 20"),
    (dict(height=0, width=20), "empty input"),
    (dict(height=8, width=20, kernel=(3, 3), strides=(2, 2), padding=(3, 1, 1, 1), lanes=4), "smaller than the window"),
    (dict(height=8, width=20, kernel=(3, 3), strides=(0, 2), lanes=4), "must be positive"),
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

