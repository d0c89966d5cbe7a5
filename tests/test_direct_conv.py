"""The direct dense conv kernel (vectors along output channels): single convs with every epilogue
against onnx.reference, the pass's per-layer choice, code generation for AVX-512 and NEON, and
the NEON build run on the emulated phone."""

from __future__ import annotations

import dataclasses

import gc
import re

import numpy as np
import onnx
import pytest
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_factory import reference_outputs
from onnx import TensorProto, helper, numpy_helper
from test_compiler import RTOL, assert_close
from test_dense_conv import dense_kernel_calls
from tvm import relax

import tvm_patdnn
from tvm_patdnn.errors import PatDNNError
from tvm_patdnn.frontend import import_onnx
from tvm_patdnn.ops.dense_conv import DenseConvSpec, pack_dense_conv_weight
from tvm_patdnn.ops import direct_conv
from tvm_patdnn.ops.direct_conv import (
    DIRECT_CONV_ATTR,
    DirectConvSpec,
    direct_conv_primfunc,
    direct_register_tile,
    pack_direct_conv_bias,
)
from tvm_patdnn.pipeline import get_pipeline
from tvm_patdnn.targets import resolve_target, vector_lanes, vector_registers
from tvm_patdnn.transform import DenseConvRewrite

NEON = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}


def conv_model(shape, out_c: int, kernel: tuple[int, int], strides=(1, 1), pads=(0, 0, 0, 0), bias: bool = True,
               residual: bool = False, activation: str = "none", seed: int = 0) -> onnx.ModelProto:
    """Conv (pads top, left, bottom, right) [+ bias] [+ x] [-> Relu | Clip(-0.5, 0.75)] as ONNX."""
    rng = np.random.default_rng(seed)
    n, c, h, w = shape
    out_h = (h + pads[0] + pads[2] - kernel[0]) // strides[0] + 1
    out_w = (w + pads[1] + pads[3] - kernel[1]) // strides[1] + 1
    weight = (rng.standard_normal((out_c, c, *kernel)) / np.sqrt(c * kernel[0] * kernel[1])).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "w")]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(out_c).astype(np.float32), "b"))
    onnx_pads = [pads[0], pads[1], pads[2], pads[3]]
    nodes = [helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["y0"], kernel_shape=list(kernel),
                              strides=list(strides), pads=onnx_pads)]
    last = "y0"
    if residual:
        nodes.append(helper.make_node("Add", [last, "x"], ["y1"]))
        last = "y1"
    if activation == "relu":
        nodes.append(helper.make_node("Relu", [last], ["y2"]))
        last = "y2"
    elif activation == "clip":
        inits += [numpy_helper.from_array(np.array(v, np.float32), name) for v, name in ((-0.5, "lo"), (0.75, "hi"))]
        nodes.append(helper.make_node("Clip", [last, "lo", "hi"], ["y2"]))
        last = "y2"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, out_c, out_h, out_w])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def compile_forced(model: onnx.ModelProto, kernel: str, target="x86"):
    """The model with every dense conv forced onto ``kernel`` (``DenseConvRewrite(kernel=...)``)."""
    target = resolve_target(target)
    mod = relax.transform.FoldConstant()(import_onnx(model).mod)
    mod = DenseConvRewrite(vector_registers(target), vector_lanes(target), kernel=kernel)(mod)
    return tvm.compile(mod, target, relax_pipeline=get_pipeline(target, dense_kernels=False))


def run(executable, x: np.ndarray) -> np.ndarray:
    return relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def direct_calls(executable) -> int:
    return sum(line.strip().startswith("call  direct_conv") for line in executable.as_text().splitlines())


@st.composite
def direct_convs(draw):
    """One conv with its epilogue: kernels 1x1 to 7x7 (not square too), strides 1-3 per axis,
    asymmetric paddings, channels no vector block divides (fewer filters than lanes too), images
    smaller than a register tile, batch 1 and 2, bias / residual / ReLU / clip."""
    kernel = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    residual = draw(st.booleans())
    c = draw(st.integers(1, 20))
    if residual:  # output shape = input shape: stride 1, kernel - 1 padding per axis
        strides = (1, 1)
        top, left = draw(st.integers(0, kernel[0] - 1)), draw(st.integers(0, kernel[1] - 1))
        pads = (top, left, kernel[0] - 1 - top, kernel[1] - 1 - left)
        out_c = c
    else:
        strides = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        pads = tuple(draw(st.integers(0, k - 1)) for k in (*kernel, *kernel))
        out_c = draw(st.integers(1, 40))
    h = draw(st.integers(max(1, kernel[0] - pads[0] - pads[2]), 13))
    w = draw(st.integers(max(1, kernel[1] - pads[1] - pads[3]), 13))
    shape = (draw(st.sampled_from([1, 2])), c, h, w)
    return conv_model(shape, out_c, kernel, strides, pads, bias=draw(st.booleans()), residual=residual,
                      activation=draw(st.sampled_from(["none", "relu", "clip"])), seed=draw(st.integers(0, 2**31)))


def rounding_scale(model: onnx.ModelProto, x: np.ndarray) -> float:
    """The largest output of ``model`` with its weights, bias and input made non-negative: the sum of
    the terms' magnitudes, to which float32 rounding of any summation order is proportional (an
    activation can zero every output but one, whose terms cancel: its own magnitude is no scale)."""
    positive = onnx.ModelProto()
    positive.CopyFrom(model)
    for init in positive.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(np.abs(numpy_helper.to_array(init)), init.name))
    return float(np.abs(reference_outputs(positive, {"x": np.abs(x)})[0]).max())


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(direct_convs())
def test_random_convs_match_reference_on_the_direct_kernel(model):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    executable = compile_forced(model, "direct")
    assert direct_calls(executable) == 1
    actual, expected = run(executable, x), reference_outputs(model, {"x": x})[0]
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= RTOL * max(np.abs(expected).max(), rounding_scale(model, x))


@pytest.mark.parametrize("shape, out_c, kernel, strides, pads", [
    ((2, 3, 29, 27), 64, (7, 7), (2, 2), (3, 3, 3, 3)),  # a ResNet-like stem, odd size, batch 2
    ((1, 24, 7, 7), 40, (3, 3), (1, 1), (1, 1, 1, 1)),  # 49 pixels: an overlapping last tile, 3 filter blocks
    ((1, 70, 9, 9), 16, (3, 3), (2, 2), (1, 1, 1, 1)),  # 630 taps: several reduction blocks
])
def test_default_pipeline_takes_kxk_convs_on_the_direct_kernel(shape, out_c, kernel, strides, pads):
    model = conv_model(shape, out_c, kernel, strides, pads, residual=False, activation="relu")
    compiled = tvm_patdnn.compile(model, "x86")
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    assert_close(compiled.run({"x": x})[0], reference_outputs(model, {"x": x})[0])
    assert dense_kernel_calls(compiled, ("direct_conv",)) == 1


@pytest.mark.parametrize("filters_inner", [False, True])
def test_both_loop_orders_match_reference(filters_inner):
    """Filter blocks outside (tasks per filter block) or inside pixel groups, with two reduction
    blocks (partial sums), a ragged last filter block, batch 2, residual and clip."""
    shape, out_c = (2, 70, 20, 19), 40
    model = conv_model(shape, out_c, (3, 3), (1, 1), (1, 1, 1, 1), residual=False, activation="clip", seed=5)
    conv = DenseConvSpec(batch=2, in_channels=70, height=20, width=19, out_channels=out_c, kernel=(3, 3),
                         padding=(1, 1, 1, 1), has_bias=True, activation="clip", clip_min=-0.5, clip_max=0.75)
    spec = DirectConvSpec(conv, 6, 2, 8, filters_inner=filters_inner)
    assert spec.channel_blocks == 2 and spec.filter_blocks == 3 and spec.pixel_groups > 1
    weight, bias = (numpy_helper.to_array(t) for t in model.graph.initializer[:2])
    func = direct_conv_primfunc(spec).with_attr("global_symbol", "main")
    kernel = tvm.compile(tvm.IRModule({"main": func}), resolve_target("x86"))["main"]
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    out = tvm.runtime.empty((2, out_c, 20, 19), "float32")
    kernel(tvm.runtime.tensor(x), tvm.runtime.tensor(pack_dense_conv_weight(weight, 16)),
           tvm.runtime.tensor(pack_direct_conv_bias(bias, 16)), out)
    expected = reference_outputs(model, {"x": x})[0]
    # 630 taps summed in two blocks: fp32 rounding up to a few 1e-6 of the output's magnitude
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=2e-5 * np.abs(expected).max())


@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("shape, out_c, kernel, strides, pads, residual, tile, vectors", [
    ((2, 40, 13, 13), 40, (1, 1), (1, 1), (0, 0, 0, 0), True, 12, 2),  # 169 = 14 x 12 + 1: a 1-pixel tail, ragged
    ((1, 24, 10, 10), 48, (1, 1), (2, 2), (0, 0, 0, 0), False, 12, 2),  # 25 = 2 x 12 + 1, stride 2
    ((1, 20, 10, 10), 70, (1, 1), (1, 1), (0, 0, 0, 0), False, 16, 1),  # a whole 16-pixel tile; 100 = 6 x 16 + 4
    ((2, 7, 9, 11), 33, (3, 3), (2, 1), (1, 1, 1, 1), False, 6, 3),  # KxK, 45 pixels = 7 x 6 + 3
])
def test_transposed_store_matches_reference(transposed, shape, out_c, kernel, strides, pads, residual, tile, vectors):
    """16-lane tiles: the epilogue that transposes each filter vector's pixel rows in registers
    (one vector store per filter) and the scalar one, with residual, clip, ragged filter blocks,
    remainder tiles of 1 to 4 pixels and batch 2, against onnx.reference."""
    target = resolve_target("x86")
    if vector_lanes(target) < 16:
        pytest.skip("host CPU: no AVX-512 to run the 16-lane code on")
    model, conv = _layer(shape, out_c, kernel, strides, pads, residual, "clip", seed=3)
    spec = DirectConvSpec(conv, tile, vectors, 16, transposed_store=transposed)
    _assert_kernel_matches(spec, model, target, seed=4)


def _layer(shape, out_c, kernel, strides, pads, residual, activation, seed):
    """A one-conv model with bias (clip bounds -0.5 / 0.75) and its DenseConvSpec."""
    model = conv_model(shape, out_c, kernel, strides, pads, residual=residual, activation=activation, seed=seed)
    n, c, h, w = shape
    conv = DenseConvSpec(batch=n, in_channels=c, height=h, width=w, out_channels=out_c, kernel=kernel,
                         strides=strides, padding=pads, has_bias=True, residual=residual, activation=activation,
                         clip_min=-0.5, clip_max=0.75)
    return model, conv


def _assert_kernel_matches(spec: DirectConvSpec, model, target, seed: int) -> None:
    """The direct kernel of ``spec`` alone (weights and bias packed, the input as its own residual when the
    conv has one) against onnx.reference on the one-conv ``model``."""
    conv = spec.conv
    weight, bias = (numpy_helper.to_array(t) for t in model.graph.initializer[:2])
    func = direct_conv_primfunc(spec).with_attr("global_symbol", "main")
    kernel_fn = tvm.compile(tvm.IRModule({"main": func}), target)["main"]
    shape = (conv.batch, conv.in_channels, conv.height, conv.width)
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    out = tvm.runtime.empty((conv.batch, conv.out_channels, conv.out_height, conv.out_width), "float32")
    args = [tvm.runtime.tensor(x), tvm.runtime.tensor(pack_dense_conv_weight(weight, spec.filter_block)),
            tvm.runtime.tensor(pack_direct_conv_bias(bias, spec.filter_block))]
    kernel_fn(*args, *([tvm.runtime.tensor(x)] if conv.residual else []), out)
    assert_close(out.numpy(), reference_outputs(model, {"x": x})[0])


@pytest.mark.parametrize("shape, out_c, kernel, strides, pads, residual, activation, tile, vectors, lanes, panel", [
    ((2, 40, 7, 7), 40, (3, 3), (1, 1), (1, 1, 1, 1), True, "relu", 6, 4, 8, 4096),  # 3 reduction blocks, ragged
    ((1, 48, 9, 9), 40, (3, 3), (2, 2), (1, 1, 1, 1), False, "clip", 6, 4, 8, 8192),  # stride 2, 25 = 4 x 6 + 1
    ((2, 96, 14, 14), 96, (1, 1), (1, 1), (0, 0, 0, 0), True, "relu", 6, 4, 16, 8192),  # 1x1 + residual, 196 pixels
])
def test_weight_prefetch_matches_reference(shape, out_c, kernel, strides, pads, residual, activation, tile, vectors,
                                           lanes, panel):
    """The next weight panel prefetched over the tiles (the last filter block's prefetches clamped to the weight's
    end): several reduction blocks, ragged filter blocks, remainder tiles, residual, ReLU / clip, batch 2."""
    target = resolve_target("x86")
    if vector_lanes(target) < lanes:
        pytest.skip("host CPU: no AVX-512 to run the 16-lane code on")
    model, conv = _layer(shape, out_c, kernel, strides, pads, residual, activation, seed=7)
    spec = DirectConvSpec(conv, tile, vectors, lanes, weight_panel=panel, weight_prefetch=2)
    assert spec.channel_blocks > 1
    assert "prefetch" in direct_conv_primfunc(spec).script()
    _assert_kernel_matches(spec, model, target, seed=8)


def test_weight_prefetch_rule_takes_avx512_kxk_convs_up_to_14x14():
    def layer(c, f, size, kernel=1, stride=1, residual=False):
        return DenseConvSpec(batch=1, in_channels=c, height=size, width=size, out_channels=f, kernel=(kernel, kernel),
                             strides=(stride, stride), padding=(kernel // 2,) * 4, residual=residual)

    avx512, avx2 = DenseConvRewrite(32, 16), DenseConvRewrite(16, 8)
    taken = [layer(512, 512, 7, 3), layer(256, 256, 28, 3, 2), layer(512, 512, 14, 3, 2)]
    left = [layer(256, 1024, 14, residual=True), layer(512, 2048, 7, residual=True), layer(2048, 512, 7), layer(1024, 256, 14), layer(256, 64, 56),
            layer(128, 128, 56, 3, 2), layer(3, 64, 224, 7, 2), layer(1024, 2048, 14, 1, 2)]
    assert [avx512.default_kernel(conv).weight_prefetch for conv in taken] == [2, 2, 2]
    assert [getattr(avx512.default_kernel(conv), "weight_prefetch", 0) for conv in left] == [0] * len(left)
    assert all(getattr(avx2.default_kernel(conv), "weight_prefetch", 0) == 0 for conv in taken + left)
    assert avx512.default_kernel(taken[0]) in avx512.candidates(taken[0])


def test_weight_prefetch_rule_small_images():
    """AVX-512 KxK convs with at most 4x4 output pixels prefetch into L1 (locality 3), at most 2x2 not at all (their
    weights are a stream from DRAM); 8x8 keeps L2; AVX2 none of it."""
    def layer(c, f, size, lanes=8):
        return DenseConvSpec(batch=1, in_channels=c, height=size, width=size, out_channels=f, kernel=(3, 3),
                             strides=(1, 1), padding=(1, 1, 1, 1), lanes=lanes)

    avx512, avx2 = DenseConvRewrite(32, 16), DenseConvRewrite(16, 8)
    convs = [layer(512, 512, 4), layer(256, 512, 4), layer(512, 512, 2, lanes=4), layer(256, 256, 8), layer(512, 512, 3)]
    assert [avx512.default_kernel(conv).weight_prefetch for conv in convs] == [3, 3, 0, 2, 3]
    assert all(getattr(avx2.default_kernel(conv), "weight_prefetch", 0) == 0 for conv in convs)
    assert all(avx512.default_kernel(conv) in avx512.candidates(conv) for conv in convs)


@pytest.mark.parametrize("shape, residual, activation", [
    ((2, 40, 4, 4), True, "relu"),  # 16 pixels: 6 + 6 + 4, ragged reduction blocks, batch 2
    ((1, 24, 3, 3), False, "clip"),
])
def test_l1_weight_prefetch_matches_reference(shape, residual, activation):
    """The next weight panel prefetched into L1 (locality 3, the 4x4 rule) computes the same conv."""
    target = resolve_target("x86")
    model, conv = _layer(shape, 40, (3, 3), (1, 1), (1, 1, 1, 1), residual, activation, seed=9)
    spec = DirectConvSpec(conv, 6, 4, 8, weight_panel=4096, weight_prefetch=3)
    assert spec.channel_blocks > 1 or shape[1] < 40
    assert "prefetch" in direct_conv_primfunc(spec).script()
    _assert_kernel_matches(spec, model, target, seed=10)


@pytest.mark.parametrize("shape, out_c, kernel, strides, pads, residual, activation, tile, vectors, panel, lines", [
    ((2, 96, 7, 7), 160, (1, 1), (1, 1), (0, 0, 0, 0), False, "relu", 6, 4, 8192, 2),  # 49 = 8 x 6 + 1, ragged, batch 2
    ((1, 64, 14, 14), 64, (1, 1), (1, 1), (0, 0, 0, 0), True, "clip", 6, 4, 4096, 1),  # residual, 4 reduction blocks
    ((2, 48, 9, 11), 40, (3, 3), (2, 2), (1, 1, 1, 1), False, "relu", 6, 3, 8192, 3),  # padded strided 3x3, 30 pixels
    ((1, 96, 7, 7), 96, (1, 1), (1, 1), (0, 0, 0, 0), True, "none", 12, 2, 32768, 2),  # the 12 x 2 tile, one block
])
def test_weight_stream_matches_reference(shape, out_c, kernel, strides, pads, residual, activation, tile, vectors,
                                         panel, lines):
    """The next weight panel streamed inside the reduction (16 lanes; the tile's accumulators split into one buffer
    per vector): several reduction blocks, ragged filter blocks, remainder tiles, residual, ReLU / clip, batch 2, the
    last panel's prefetches clamped to the weight's end."""
    target = resolve_target("x86")
    if vector_lanes(target) < 16:
        pytest.skip("host CPU: no AVX-512 to run the 16-lane code on")
    model, conv = _layer(shape, out_c, kernel, strides, pads, residual, activation, seed=11)
    spec = DirectConvSpec(conv, tile, vectors, 16, weight_panel=panel, weight_stream=lines)
    assert spec.channel_blocks > 1 or spec.filter_blocks > 1
    tiles = 1 + bool(spec.conv.pixels % tile)  # the main tile's code and the remainder tile's
    assert direct_conv_primfunc(spec).script().count("prefetch") == lines * tiles
    _assert_kernel_matches(spec, model, target, seed=12)


def test_weight_stream_keeps_the_register_tile_in_registers():
    """Code generation: the main tile's reduction loop (ResNet-50's 512->2048 + residual at 7x7, blocked) holds its
    6 x 4 FMAs per channel, the prefetch, and no store (a 1.5 KB tile on the heap was stored every channel)."""
    conv = DenseConvSpec(batch=1, in_channels=512, height=7, width=7, out_channels=2048, kernel=(1, 1),
                         residual=True, activation="relu")
    spec = DenseConvRewrite(32, 16).default_kernel(conv)
    assert spec.weight_stream == 2
    spec = dataclasses.replace(spec, blocked_input=True, blocked_residual=True, blocked_output=True)
    func = direct_conv_primfunc(spec).with_attr("global_symbol", "main")
    executable = tvm.compile(tvm.IRModule({"main": func}), resolve_target({"kind": "llvm", "mcpu": "znver5"}))
    lines = executable.mod.inspect_source("asm").splitlines()
    labels = {line[:-1]: i for i, line in enumerate(lines) if re.match(r"^\.LBB\S+:$", line)}
    loops = []
    for i, line in enumerate(lines):
        branch = re.match(r"\s+j\w+\s+(\.LBB\S+)", line)
        if branch and labels.get(branch.group(1), i) < i:
            loops.append([b for b in lines[labels[branch.group(1)]:i] if b.startswith("\t")])
    fmas = [sum("vfmadd" in b for b in body) for body in loops]
    main = min((body for body, count in zip(loops, fmas) if count and count % 24 == 0), key=len)  # the innermost
    assert any("prefetch" in b for b in main)
    assert not [b for b in main if re.match(r"\s+vmov\w+\s+%zmm\d+, .*\(", b)]


def test_weight_stream_rule_takes_avx512_pointwise_convs_up_to_14x14():
    def layer(c, f, size, kernel=1, stride=1, residual=False):
        return DenseConvSpec(batch=1, in_channels=c, height=size, width=size, out_channels=f, kernel=(kernel, kernel),
                             strides=(stride, stride), padding=(kernel // 2,) * 4, residual=residual)

    avx512, avx2, neon = DenseConvRewrite(32, 16), DenseConvRewrite(16, 8), DenseConvRewrite(32, 4)
    taken = [layer(512, 2048, 7, residual=True), layer(2048, 512, 7), layer(256, 1024, 14, residual=True),
             layer(1024, 256, 14), layer(1024, 2048, 14, 1, 2), layer(512, 1024, 28, 1, 2), layer(160, 960, 7),
             layer(192, 64, 14)]
    left = [layer(128, 512, 28, residual=True), layer(512, 128, 28), layer(256, 64, 56), layer(128, 1024, 14),
            layer(512, 512, 7, 3), layer(3, 64, 224, 7, 2)]
    assert [avx512.default_kernel(conv).weight_stream for conv in taken] == [2] * len(taken)
    assert [getattr(avx512.default_kernel(conv), "weight_stream", 0) for conv in left] == [0] * len(left)
    assert all(getattr(other.default_kernel(conv), "weight_stream", 0) == 0
               for other in (avx2, neon) for conv in taken + left)
    assert all(avx512.default_kernel(conv) in avx512.candidates(conv) for conv in taken)


def test_weight_stream_rejects_what_the_kernel_cannot_run():
    conv = DenseConvSpec(batch=1, in_channels=64, height=7, width=7, out_channels=64, kernel=(1, 1))
    with pytest.raises(PatDNNError, match="per channel step"):
        DirectConvSpec(conv, 6, 4, 16, weight_stream=-1)
    with pytest.raises(PatDNNError, match="16-lane"):
        DirectConvSpec(conv, 6, 4, 8, weight_stream=2)
    with pytest.raises(PatDNNError, match="one way"):
        DirectConvSpec(conv, 6, 4, 16, weight_stream=2, weight_prefetch=2)


@pytest.mark.parametrize("filters_inner", [False, True])
@pytest.mark.parametrize("shape, out_c, strides, tile, vectors", [
    ((2, 136, 15, 13), 70, (2, 2), 6, 4),  # 8 x 7 = 56 pixels: 9 x 6 + 2, a ragged filter block, batch 2
    ((1, 40, 11, 16), 48, (3, 2), 12, 2),  # unequal strides, 4 x 8 = 32 pixels: 2 x 12 + 8
])
def test_strided_pointwise_on_a_compact_input_matches_reference(monkeypatch, filters_inner, shape, out_c, strides, tile,
                                                                vectors):
    """16-lane strided unpadded 1x1s (here of any input size: COMPACT_INPUT_BYTES 0) first copy the pixels they read
    into a compact input and run as a stride-1 1x1 on it (COMPACT_STRIDED_LANES); 8-lane tiles read the strided
    input in place. Both against onnx.reference."""
    target = resolve_target("x86")
    if vector_lanes(target) < 16:
        pytest.skip("host CPU: no AVX-512 to run the 16-lane code on")
    monkeypatch.setattr(direct_conv, "COMPACT_INPUT_BYTES", 0)
    model = conv_model(shape, out_c, (1, 1), strides, activation="relu", seed=8)
    n, c, h, w = shape
    conv = DenseConvSpec(batch=n, in_channels=c, height=h, width=w, out_channels=out_c, strides=strides,
                         has_bias=True, activation="relu")
    for spec in (DirectConvSpec(conv, tile, vectors, 16, filters_inner=filters_inner),
                 DirectConvSpec(conv, 6, 2, 8, filters_inner=filters_inner)):
        script = direct_conv_primfunc(spec).script()
        assert script.count("T.parallel(") == (2 if spec.lanes == 16 else 1)  # the copy's loop, the tiles'
        assert direct_conv._compacts(spec) == (spec.lanes == 16)
        _assert_kernel_matches(spec, model, target, seed=9)


def test_compact_input_rule_takes_strided_pointwise_inputs_past_l2():
    """ResNet-50's strided 1x1s on 16 lanes: 256->512 at 56x56 (3.2 MB input) and 512->1024 at 28x28 (1.6 MB) run
    on a compact input; 1024->2048 at 14x14 (800 KB), 8-lane tiles and padded or KxK convs read in place."""
    def spec(c, hw, f, lanes, kernel=(1, 1), padding=(0, 0, 0, 0)):
        conv = DenseConvSpec(batch=1, in_channels=c, height=hw, width=hw, out_channels=f, kernel=kernel,
                             strides=(2, 2), padding=padding)
        return DirectConvSpec.for_target(conv, 32, lanes)

    assert direct_conv._compacts(spec(256, 56, 512, 16)) and direct_conv._compacts(spec(512, 28, 1024, 16))
    assert not direct_conv._compacts(spec(1024, 14, 2048, 16))
    assert not direct_conv._compacts(spec(512, 28, 1024, 8))
    assert not direct_conv._compacts(spec(512, 28, 1024, 16, padding=(1, 1, 1, 1)))
    assert not direct_conv._compacts(spec(512, 28, 1024, 16, kernel=(3, 3)))


@pytest.mark.parametrize("shape, out_c, residual", [
    ((2, 48, 11, 13), 80, False),  # 143 pixels: two 64-pixel tiles and a one-vector tail; 80 filters in 6s
    ((1, 64, 9, 9), 64, True),  # 81 pixels: the last 64-pixel tile overlaps the first
])
def test_short_reduction_gemm_matches_reference(shape, out_c, residual):
    """1x1 convs of at most 64 input channels and 64+ filters through the default pipeline: on AVX-512
    the GEMM's 6 filters x 4 vectors tile (elsewhere the target's usual one), against onnx.reference."""
    model = conv_model(shape, out_c, (1, 1), residual=residual, activation="clip", seed=6)
    compiled = tvm_patdnn.compile(model, "x86")
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    assert_close(compiled.run({"x": x})[0], reference_outputs(model, {"x": x})[0])
    assert dense_kernel_calls(compiled, ("dense_conv",)) == 1


def test_loop_order_puts_filters_inside_for_large_inputs():
    def spec(c, f, size, stride, kernel):
        conv = DenseConvSpec(batch=1, in_channels=c, height=size, width=size, out_channels=f, kernel=(kernel, kernel),
                             strides=(stride, stride), padding=(kernel // 2,) * 4)
        return DirectConvSpec.for_target(conv, 16, 8)

    assert spec(64, 64, 56, 1, 3).filters_inner and spec(128, 128, 56, 2, 3).filters_inner
    assert not spec(512, 512, 14, 2, 3).filters_inner  # 9.4 MB of weights would be re-read per pixel group
    assert not spec(3, 64, 224, 2, 7).filters_inner  # the stem: measured slower


def test_choice_is_gemm_for_1x1_and_direct_for_kxk():
    shape = dict(batch=1, in_channels=64, height=14, width=14, out_channels=96)
    rewrite = DenseConvRewrite(16, 8)
    assert rewrite.kernel_for(DenseConvSpec(**shape)) == "gemm"
    assert rewrite.kernel_for(DenseConvSpec(**shape, strides=(2, 2))) == "gemm"
    assert rewrite.kernel_for(DenseConvSpec(**{**shape, "in_channels": 512})) == "gemm"
    small = DenseConvSpec(**{**shape, "height": 7, "width": 7})  # AVX2: 7x7 1x1s on the direct kernel, 8 KB panels
    assert rewrite.kernel_for(small) == "direct" and rewrite.default_kernel(small).weight_panel == 8192
    assert rewrite.kernel_for(DenseConvSpec(**{**shape, "height": 13, "width": 13}, strides=(2, 2))) == "gemm"
    assert rewrite.kernel_for(DenseConvSpec(**{**shape, "out_channels": 32})) == "direct"  # few filters, whole blocks
    assert rewrite.kernel_for(DenseConvSpec(**{**shape, "out_channels": 24})) == "direct"  # one 4 x 3-vector block
    assert rewrite.default_kernel(DenseConvSpec(**{**shape, "out_channels": 24})).pixel_tile == 4
    assert rewrite.kernel_for(DenseConvSpec(**{**shape, "out_channels": 40})) == "gemm"  # every tile pads
    avx512 = DenseConvRewrite(32, 16)  # 1x1: direct above 128 input channels, the GEMM up to 128
    assert avx512.kernel_for(DenseConvSpec(**shape)) == "gemm"
    assert avx512.kernel_for(DenseConvSpec(**{**shape, "in_channels": 128})) == "gemm"
    assert avx512.kernel_for(DenseConvSpec(**{**shape, "in_channels": 129})) == "direct"
    assert avx512.kernel_for(DenseConvSpec(**{**shape, "in_channels": 512}, strides=(2, 2))) == "direct"
    kxk = DenseConvSpec(**shape, kernel=(3, 3), padding=(1, 1, 1, 1))
    assert avx512.direct_vectors(kxk) == (32, 8) and avx512.direct_vectors(DenseConvSpec(**shape)) == (32, 16)
    assert rewrite.direct_vectors(kxk) == (16, 8)
    # AVX-512: an RGB stem on 6 pixels x 2 vectors of 16 lanes; an RGB stride-1 3x3 on the GEMM (as AVX2)
    stem = DenseConvSpec(batch=1, in_channels=3, height=224, width=224, out_channels=64, kernel=(7, 7),
                         strides=(2, 2), padding=(3, 3, 3, 3))
    tile = avx512.default_kernel(stem)
    assert (tile.pixel_tile, tile.vectors, tile.lanes) == (6, 2, 16)
    assert rewrite.default_kernel(stem).lanes == 8  # AVX2 unchanged
    first = DenseConvSpec(batch=1, in_channels=3, height=32, width=32, out_channels=64, kernel=(3, 3),
                          padding=(1, 1, 1, 1))
    assert avx512.kernel_for(first) == "gemm" and rewrite.kernel_for(first) == "gemm"
    assert avx512.kernel_for(dataclasses.replace(first, out_channels=48)) == "direct"  # < 4 vectors of 16
    # ... with 14 filters x 2 vectors, or 3 x 7 when its output outgrows L2 (VGG-16 224's first conv)
    assert (avx512.gemm_tile(first).filter_tile, avx512.gemm_tile(first).vectors) == (13, 2)
    large = dataclasses.replace(first, height=224, width=224)
    assert (avx512.default_kernel(large).filter_tile, avx512.default_kernel(large).vectors) == (3, 7)
    assert (rewrite.gemm_tile(large).filter_tile, rewrite.gemm_tile(large).lanes) == (6, 8)  # AVX2 unchanged
    # AVX-512 1x1s on the direct kernel: 12 pixels x 2 vectors from 28x28 output pixels, 6 x 4 below
    wide = DenseConvSpec(batch=1, in_channels=256, height=28, width=28, out_channels=64)
    assert (avx512.default_kernel(wide).pixel_tile, avx512.default_kernel(wide).vectors) == (12, 2)
    narrow = dataclasses.replace(wide, height=27)
    assert (avx512.default_kernel(narrow).pixel_tile, avx512.default_kernel(narrow).vectors) == (6, 4)
    few = dataclasses.replace(wide, out_channels=32)  # fewer than 4 vectors of filters: 6 pixels
    assert avx512.default_kernel(few).pixel_tile == 6
    # AVX-512 GEMM tiles balanced over the filters (AVX2's 6 x 2 unchanged)
    gemm16 = DenseConvSpec(batch=1, in_channels=32, height=56, width=56, out_channels=16)
    assert avx512.default_kernel(gemm16).filter_tile == 8 and rewrite.gemm_tile(gemm16).filter_tile == 6
    # up to 64 input channels and at least 64 filters: 6 filters x 4 vectors (a short reduction); else 14 x 2
    short = avx512.default_kernel(dataclasses.replace(gemm16, out_channels=256, height=28, width=28))
    assert (short.filter_tile, short.vectors) == (6, 4)
    assert (rewrite.gemm_tile(dataclasses.replace(gemm16, out_channels=256)).vectors) == 2  # AVX2 as before
    wide = avx512.default_kernel(dataclasses.replace(gemm16, in_channels=96, out_channels=256))
    assert (wide.filter_tile, wide.vectors) == (14, 2)
    # ... and 8 x 3 from 56x56 output pixels (ResNet-50's 64->64 and 64->256)
    resnet = avx512.default_kernel(dataclasses.replace(gemm16, in_channels=64, out_channels=256))
    assert (resnet.filter_tile, resnet.vectors) == (8, 3)
    assert (rewrite.gemm_tile(dataclasses.replace(gemm16, in_channels=64, out_channels=256)).vectors) == 2  # AVX2
    small = avx512.default_kernel(dataclasses.replace(gemm16, height=28, width=28, out_channels=192))
    assert (small.filter_tile, small.vectors) == (6, 4)  # MobileNetV2's 32->192 at 28x28
    # ... and reading a 1x1's input in place from 28x28 output pixels (AVX2 copies its panels)
    assert not avx512.default_kernel(gemm16).pack_panel and rewrite.gemm_tile(gemm16).pack_panel
    assert avx512.default_kernel(dataclasses.replace(gemm16, height=14, width=14)).pack_panel
    assert rewrite.kernel_for(DenseConvSpec(**shape, kernel=(3, 3), padding=(1, 1, 1, 1))) == "direct"
    assert rewrite.kernel_for(DenseConvSpec(**{**shape, "out_channels": 7}, kernel=(3, 3))) is None  # < lanes
    assert DenseConvRewrite(16, 8, kernel="gemm").kernel_for(DenseConvSpec(**shape, kernel=(3, 3))) == "gemm"
    assert DenseConvRewrite(16, 8, kernel="direct").kernel_for(DenseConvSpec(**shape)) == "direct"
    with pytest.raises(ValueError, match="not one of"):
        DenseConvRewrite(16, 8, kernel="winograd")


def test_register_tile_follows_the_target():
    assert direct_register_tile(16, 8, 64, 3136) == (6, 2)  # AVX2: 12 ymm accumulators + 2 weights + broadcast
    assert direct_register_tile(32, 16, 64, 3136) == (6, 4)  # AVX-512: MLAS's 6 x 4 of 32 zmm
    assert direct_register_tile(32, 4, 64, 3136) == (6, 3)  # NEON: by-element FMAs keep inputs in registers
    assert direct_register_tile(16, 8, 5, 3136) == (6, 1)  # few filters: one vector
    assert direct_register_tile(16, 8, 64, 4) == (4, 3)  # 4 pixels: more filter vectors fit
    assert direct_register_tile(32, 16, 96, 196) == (6, 3)  # AVX-512: 96 filters, 2 x 3 vectors pad none
    assert direct_register_tile(32, 16, 160, 49) == (6, 2)  # 160: 5 x 2 vectors, not 3 x 4
    assert direct_register_tile(16, 8, 24, 3136) == (4, 3) and direct_register_tile(16, 8, 40, 3136) == (6, 2)  # AVX2
    assert direct_register_tile(32, 16, 16, 49) == (6, 1)
    assert direct_register_tile(32, 4, 64, 49) == (6, 3)  # NEON keeps NR
    # AVX-512's 8-lane KxK tiles: at most 4 vectors, also where few pixels leave room for 6
    assert direct_register_tile(32, 8, 512, 4) == (4, 4) and direct_register_tile(32, 8, 48, 3136) == (6, 4)
    assert direct_register_tile(32, 8, 64, 3136) == (6, 4) and direct_register_tile(32, 8, 512, 1) == (1, 4)


def _reduction_loops(asm: str, fma: str) -> list[tuple[int, int]]:
    """(FMAs, stack references) of every innermost loop with FMAs in the assembly."""
    lines = asm.splitlines()
    labels = {line[:-1]: i for i, line in enumerate(lines) if re.match(r"^\.LBB\S+:$", line)}
    loops = []
    for i, line in enumerate(lines):
        branch = re.match(r"\s+(?:j\w+|b\.\w+|b|cbn?z\s+\w+,)\s+(\.LBB\S+)", line)
        if branch and labels.get(branch.group(1), i) < i:
            body = lines[labels[branch.group(1)]:i]
            fmas = sum(fma in b for b in body)
            if fmas:
                loops.append((fmas, sum("rsp)" in b or "[sp" in b for b in body)))
    return loops


@pytest.mark.parametrize("target, fma, vector", [
    ({"kind": "llvm", "mcpu": "skylake-avx512"}, "vfmadd231ps", "zmm"),
    (NEON, "fmla", "v"),
])
@pytest.mark.parametrize("layer", [(3, 64, 29, 2, 7), (64, 64, 14, 1, 3)])
def test_avx512_and_neon_code_keeps_the_register_tile(target, fma, vector, layer):
    """Code generation only (this host may not run it): the innermost reduction loop holds
    MR x NR FMAs per tap of the target's width and no spills (NEON's 7-tap loop reloads one
    loop-invariant vector per 126 FMAs: allowed, accumulators spilled were 9-29 per 72)."""
    c, f, size, stride, k = layer
    conv = DenseConvSpec(batch=1, in_channels=c, height=size, width=size, out_channels=f, kernel=(k, k),
                         strides=(stride, stride), padding=(k // 2,) * 4, has_bias=True, activation="relu")
    tvm_target = resolve_target(target)
    spec = DirectConvSpec.for_target(conv, vector_registers(tvm_target), vector_lanes(tvm_target))
    func = direct_conv_primfunc(spec).with_attr("global_symbol", "main")
    assert DIRECT_CONV_ATTR in func.attrs
    executable = tvm.compile(tvm.IRModule({"main": func}), tvm_target)
    asm = executable.mod.imports[0].inspect_source("asm") if executable.mod.imports else \
        executable.mod.inspect_source("asm")
    assert any(re.search(rf"{fma}\s.*{vector}\d", line) for line in asm.splitlines())
    loops = _reduction_loops(asm, fma)
    fmas, spills = min(loops)  # the main tile's loop, or the remainder tile's (fewer pixels)
    assert any(fmas % (m * spec.vectors) == 0 for m in (spec.pixel_tile, conv.pixels % spec.pixel_tile))
    assert spills * 50 <= fmas
    assert any(f % (spec.pixel_tile * spec.vectors) == 0 and s * 50 <= f for f, s in loops)


def test_neon_build_runs_on_the_emulated_phone(tmp_path, phone_runtime):
    """The NEON kernels (stem-like 7x7 stride 2, a ragged 3x3 with residual and clip; and the GEMM on a
    1x1 with residual, whose epilogue prefetches and whose last tile of its 81 pixels is one vector) run
    under qemu."""
    from tvm.support import cc

    from tvm_patdnn.phone import runtime
    from tvm_patdnn.phone.emulator import popen_session

    models = [conv_model((1, 3, 19, 17), 16, (7, 7), (2, 2), (3, 3, 2, 3), activation="relu"),
              conv_model((2, 13, 6, 5), 13, (3, 3), (1, 1), (1, 0, 1, 2), residual=True, activation="clip", seed=3),
              conv_model((2, 21, 9, 9), 21, (1, 1), residual=True, activation="relu", seed=4)]
    for index, (model, kernel) in enumerate(zip(models, ["direct_conv", "direct_conv", "dense_conv"], strict=True)):
        compiled = tvm_patdnn.compile(model, NEON)
        assert dense_kernel_calls(compiled, (kernel,)) == 1
        path = tmp_path / f"direct{index}.so"
        compiled.executable.export_library(str(path), fcompile=cc.cross_compiler(runtime.CROSS_CXX))
        shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        x = np.random.default_rng(index).standard_normal(shape).astype(np.float32)
        remote = popen_session()
        remote.upload(str(path))
        out = relax.VirtualMachine(remote.load_module(path.name), remote.cpu())["main"](
            tvm.runtime.tensor(x, remote.cpu())).numpy()
        del remote
        gc.collect()
        assert_close(out, reference_outputs(model, {"x": x})[0])


def test_small_wide_pointwise_rule():
    """AVX-512 1x1s at <= 7x7 with >= 512 input channels and <= 320 filters (MobileNetV2's projections) take the 12 x 2
    tile; more filters (ResNet-50's 2048->512), fewer channels, or 8 / 4 lanes keep theirs."""
    def layer(c, f, size):
        return DenseConvSpec(batch=1, in_channels=c, height=size, width=size, out_channels=f, kernel=(1, 1))

    avx512, avx2 = DenseConvRewrite(32, 16), DenseConvRewrite(16, 8)
    taken = [layer(576, 160, 7), layer(960, 160, 7), layer(960, 320, 7)]
    left = [layer(2048, 512, 7), layer(160, 960, 7), layer(320, 1280, 7), layer(576, 160, 14)]
    assert [(k.pixel_tile, k.vectors) for k in map(avx512.default_kernel, taken)] == [(12, 2)] * 3
    assert all(avx512.default_kernel(conv).pixel_tile == 6 for conv in left)
    assert all(avx512.default_kernel(conv) in avx512.candidates(conv) for conv in taken + left)
    assert all(getattr(avx2.default_kernel(conv), "pixel_tile", 6) != 12 for conv in taken)


def test_small_wide_pointwise_in_a_model_matches_reference():
    """MobileNetV2's 7x7 tail in small: 1x1 512->160 + clip (12 x 2 tile, weight stream), 1x1 160->960 + ReLU (weight
    stream), 1x1 960->160 + residual (12 x 2, blocked between them where the layout takes it), batch 2."""
    target = resolve_target("x86")
    rng = np.random.default_rng(21)

    def weight(name, f, c):
        return numpy_helper.from_array((rng.standard_normal((f, c, 1, 1)) / np.sqrt(c)).astype(np.float32), name)

    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["c1"]), helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"]),
         helper.make_node("Conv", ["r1", "w2"], ["c2"]), helper.make_node("Relu", ["c2"], ["r2"]),
         helper.make_node("Conv", ["r2", "w3"], ["c3"]), helper.make_node("Add", ["c3", "r1"], ["y"])],
        "tail", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 512, 7, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 160, 7, 7])],
        [weight("w1", 160, 512), weight("w2", 960, 160), weight("w3", 160, 960),
         numpy_helper.from_array(np.float32(0.0), "lo"), numpy_helper.from_array(np.float32(6.0), "hi")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((2, 512, 7, 7)).astype(np.float32)
    compiled = tvm_patdnn.compile(model, target, tuning_db=False)
    assert_close(compiled.run({"x": x})[0], reference_outputs(model, {"x": x})[0])


def test_narrow_pointwise_rule():
    """AVX-512 1x1s at 14x14 with <= 256 input channels and <= 64 filters (MobileNetV2's 192->64) take the 14 x 2 tile;
    more channels (its 384->64), more filters, other sizes, or 8 / 4 lanes keep theirs."""
    def layer(c, f, size):
        return DenseConvSpec(batch=1, in_channels=c, height=size, width=size, out_channels=f, kernel=(1, 1))

    avx512, avx2, neon = DenseConvRewrite(32, 16), DenseConvRewrite(16, 8), DenseConvRewrite(32, 4)
    taken = [layer(192, 64, 14), layer(160, 48, 14)]
    left = [layer(384, 64, 14), layer(192, 96, 14), layer(192, 64, 28), layer(192, 64, 7), layer(1024, 256, 14)]
    assert [(k.pixel_tile, k.vectors) for k in map(avx512.default_kernel, taken)] == [(14, 2)] * 2
    assert all(getattr(avx512.default_kernel(conv), "pixel_tile", 6) != 14 for conv in left)
    assert all(avx512.default_kernel(conv) in avx512.candidates(conv) for conv in taken + left)
    assert all(getattr(rules.default_kernel(conv), "pixel_tile", 6) != 14 for rules in (avx2, neon) for conv in taken)


def test_narrow_pointwise_in_a_model_matches_reference():
    """MobileNetV2's 192->64 projection at 14x14 (14 x 2 tile, weight stream) with a bias, a residual and a clip,
    batch 2, against onnx.reference."""
    target = resolve_target("x86")
    rng = np.random.default_rng(22)
    w = numpy_helper.from_array((rng.standard_normal((64, 192, 1, 1)) / np.sqrt(192)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"]), helper.make_node("Add", ["c", "skip"], ["s"]),
         helper.make_node("Clip", ["s", "lo", "hi"], ["y"])],
        "projection", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 192, 14, 14]),
                       helper.make_tensor_value_info("skip", TensorProto.FLOAT, [2, 64, 14, 14])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64, 14, 14])],
        [w, b, numpy_helper.from_array(np.float32(0.0), "lo"), numpy_helper.from_array(np.float32(6.0), "hi")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": rng.standard_normal((2, 192, 14, 14)).astype(np.float32),
             "skip": rng.standard_normal((2, 64, 14, 14)).astype(np.float32)}
    compiled = tvm_patdnn.compile(model, target, tuning_db=False)
    assert_close(compiled.run(feeds)[0], reference_outputs(model, feeds)[0])
