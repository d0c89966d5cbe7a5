"""The channel-blocked pattern conv (AVX2): equal to onnx.reference, and taken by the layers it is for."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tvm
from model_factory import ConvSpec, build_cnn, reference_outputs
from onnx import numpy_helper
from tvm import relax

import tvm_patdnn
from tvm_patdnn.analysis import analyze_conv_weight
from tvm_patdnn.fkw import pack_fkw
from tvm_patdnn.frontend import import_onnx
from tvm_patdnn.ops.pattern_conv import PATTERN_CONV_ATTR, PatternConvSpec, is_pattern_conv
from tvm_patdnn.ops.pattern_conv_blocked import blocked_layout, blocked_weights, pattern_conv_blocked_primfunc
from tvm_patdnn.targets import resolve_target, vector_lanes
from tvm_patdnn.transform import PatternConvRewrite

AVX2 = {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}


def _needs_avx2() -> None:
    if vector_lanes(resolve_target("x86")) < 8:
        pytest.skip("host CPU: no AVX2 to run the code on (it was built)")


@pytest.mark.parametrize("batch, channels, height, width, tile, block, bias, relu, threads", [
    (1, 20, 13, 11, (2, 2), 8, True, True, 1),  # odd sizes, 20 channels in blocks of 8
    (2, 19, 9, 17, (3, 1), 5, False, True, 2),  # batch 2, two threads' filter groups
    (1, 12, 14, 14, None, None, True, False, 2),  # the default layout (7x2), one block
    (2, 7, 5, 30, (1, 2), 3, False, False, 1),  # rows of 4 lifted vectors in column tiles of 2
    (2, 9, 6, 56, None, 4, True, True, 2),  # 56 columns: the default 2x7 tile, whole rows of 7 vectors
    (1, 10, 5, 50, None, None, False, True, 1),  # 50 columns in 7 vectors: the epilogue drops lanes 50-55
])
def test_blocked_kernel_matches_the_onnx_reference(batch, channels, height, width, tile, block, bias, relu, threads):
    rng = np.random.default_rng(channels * height + width)
    model = build_cnn(rng, (batch, channels, height, width), [ConvSpec(10, connectivity=2.0, bias=bias, relu=relu)])
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weight = inits[model.graph.node[0].input[1]]
    bias_value = inits[model.graph.node[0].input[2]] if bias else None
    fkw = pack_fkw(weight, analyze_conv_weight(weight))
    spec = PatternConvSpec.from_fkw(fkw, (batch, channels, height, width), (1, 1), (1, 1, 1, 1), bias, relu)
    layout = blocked_layout(spec, *(tile or (None, None)), block)
    assert layout.blocks == -(-channels // layout.block)
    func = pattern_conv_blocked_primfunc(layout, threads)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tvm.target.Target(AVX2))
    _needs_avx2()
    x = rng.standard_normal((batch, channels, height, width)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((batch, 10, height, width), np.float32))
    weights = [*blocked_weights(fkw, layout), fkw.order] + ([bias_value] if bias else [])
    lib["main"](tvm.runtime.tensor(x), *(tvm.runtime.tensor(w) for w in weights), out)
    expected = reference_outputs(model, {"input": x})[0]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_many_channel_layers_take_the_blocked_kernel_on_avx2_only():
    """256 input channels at 14x14, stride 1: blocked on AVX2, the TE operator on AVX-512 and NEON, and
    for a stride-2 layer or fewer channels."""
    rng = np.random.default_rng(3)
    model = build_cnn(rng, (1, 256, 14, 14), [ConvSpec(16, connectivity=3.6), ConvSpec(16, connectivity=2.0),
                                              ConvSpec(256, connectivity=2.0)])
    mod = relax.transform.FoldConstant()(import_onnx(model).mod)
    for lanes, expected in ((8, [True, False, False]), (16, [False] * 3), (4, [False] * 3)):
        rewritten = PatternConvRewrite(vector_width=lanes, accumulators=8)(mod)
        layouts = [func.attrs[PATTERN_CONV_ATTR] for _, func in rewritten.functions_items() if is_pattern_conv(func)]
        assert [bool(layout.get("blocked", 0)) for layout in layouts] == expected
    strided = build_cnn(rng, (1, 256, 28, 28), [ConvSpec(16, stride=2, connectivity=3.6)])
    assert _blocked_flags(strided) == [False]


def _blocked_flags(model) -> list[bool]:
    """Which pattern convs of ``model`` take the blocked kernel on AVX2, in the module's function order."""
    rewritten = PatternConvRewrite(vector_width=8, accumulators=8)(relax.transform.FoldConstant()(import_onnx(model).mod))
    return [bool(func.attrs[PATTERN_CONV_ATTR].get("blocked", 0)) for _, func in rewritten.functions_items()
            if is_pattern_conv(func)]


@pytest.mark.parametrize("channels, size, expected", [
    (128, 56, True),  # 56 columns (whole 7-vector rows): from 128 channels
    (64, 56, False),  # ResNet-50's 64x64 56x56 stays on the TE operator
    (256, 28, True),
    (128, 28, False),  # ResNet-50's 128x128 28x28 too
])
def test_the_blocked_kernel_takes_56_column_rows_from_128_channels_and_narrower_ones_from_256(channels, size, expected):
    model = build_cnn(np.random.default_rng(channels + size), (1, channels, size, size), [ConvSpec(8, connectivity=3.6)])
    assert _blocked_flags(model) == [expected]


@pytest.mark.parametrize("batch", [1, 2])
def test_a_compiled_model_with_a_blocked_layer_matches_the_onnx_reference(batch):
    rng = np.random.default_rng(batch)
    model = build_cnn(rng, (batch, 256, 14, 14), [ConvSpec(24, connectivity=3.6), ConvSpec(8, connectivity=2.0)])
    compiled = tvm_patdnn.compile(model, AVX2)
    assert [r.kind for r in compiled.report] == ["pattern", "pattern"]
    _needs_avx2()
    x = rng.standard_normal((batch, 256, 14, 14)).astype(np.float32)
    expected = reference_outputs(model, {"input": x})[0]
    np.testing.assert_allclose(compiled.run({"input": x})[0], expected, rtol=1e-4, atol=1e-4)


_TWO_THREADS = """
import sys, numpy as np, tvm
from tvm_patdnn.ops.pattern_conv import PatternConvSpec
from tvm_patdnn.ops.pattern_conv_blocked import blocked_layout, blocked_weights, pattern_conv_blocked_primfunc
from tvm_patdnn.fkw import pack_fkw
from tvm_patdnn.analysis import analyze_conv_weight
arrays = dict(np.load(sys.argv[1]))
x, weight, bias = arrays["x"], arrays["weight"], arrays["bias"]
fkw = pack_fkw(weight, analyze_conv_weight(weight))
spec = PatternConvSpec.from_fkw(fkw, x.shape, (1, 1), (1, 1, 1, 1), True, True)
layout = blocked_layout(spec, block=6)
assert layout.tiles == 1 * 2  # fewer tiles than twice the threads: the threads split the filters
lib = tvm.compile(tvm.IRModule({"main": pattern_conv_blocked_primfunc(layout, 2).with_attr("global_symbol", "main")}),
                  tvm.target.Target({"kind": "llvm", "mcpu": "znver3", "num-cores": 2}))
out = tvm.runtime.tensor(np.zeros((x.shape[0], weight.shape[0], *x.shape[2:]), np.float32))
lib["main"](*(tvm.runtime.tensor(a) for a in (x, *blocked_weights(fkw, layout), fkw.order, bias)), out)
np.save(sys.argv[2], out.numpy())
"""


@pytest.mark.parametrize("height, width", [(14, 14), (4, 56)])
def test_blocked_kernel_is_right_when_the_runtime_runs_two_threads(tmp_path, height, width):
    """A fresh process with TVM_NUM_THREADS=2 (the runtime's thread count is fixed at its start): two tiles
    (7x2 at 14x14, 2x7 at 4x56), so the two threads split the filters."""
    _needs_avx2()
    rng = np.random.default_rng(11)
    model = build_cnn(rng, (1, 16, height, width), [ConvSpec(12, connectivity=2.0)])
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    x = rng.standard_normal((1, 16, height, width)).astype(np.float32)
    weight, bias = (inits[name] for name in model.graph.node[0].input[1:3])
    np.savez(tmp_path / "in.npz", x=x, weight=weight, bias=bias)
    env = {**os.environ, "TVM_NUM_THREADS": "2", "TVM_BIND_THREADS": "0"}
    subprocess.run([sys.executable, "-c", _TWO_THREADS, str(tmp_path / "in.npz"), str(tmp_path / "out.npy")],
                   env=env, check=True)
    expected = reference_outputs(model, {"input": x})[0]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-4, atol=1e-4)
