"""The dense conv kernels (packed GEMM, direct): models against onnx.reference, the pass's fusion and
kernel choice, the tile choice."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_factory import ConvSpec, build_cnn, reference_outputs
from test_compiler import assert_close, check_against_reference
from tvm import relax

import tvm_patdnn
from tvm_patdnn.ops import dense_conv
from tvm_patdnn.frontend import import_onnx
from tvm_patdnn.ops.dense_conv import DENSE_CONV_ATTR, DenseConvSpec, register_tile
from tvm_patdnn.pipeline import get_pipeline
from tvm_patdnn.targets import resolve_target, vector_lanes, vector_registers
from tvm_patdnn.transform import DenseConvRewrite, dense_conv_rewrite


def dense_kernel_calls(compiled: tvm_patdnn.CompiledModel,
                       kernels: tuple[str, ...] = ("dense_conv", "direct_conv")) -> int:
    """How many calls of the dense conv kernels (the GEMM ``dense_conv``, the ``direct_conv``) the
    compiled model makes."""
    return sum(line.strip().startswith(tuple(f"call  {k}" for k in kernels))
               for line in compiled.executable.as_text().splitlines())


@st.composite
def dense_models(draw):
    """Chains of dense 1x1 and 3x3 convs: odd sizes, channels that no register tile divides,
    strides, paddings, bias, ReLU, residual adds, batch 1 and 2, images smaller than a vector.
    Returns the model, its seed and how many of its convs the dense kernel takes here."""
    seed = draw(st.integers(0, 2**31))
    lanes = vector_lanes(resolve_target("x86"))
    channels, height, width = draw(st.integers(1, 20)), draw(st.integers(1, 13)), draw(st.integers(1, 13))
    shape = (draw(st.sampled_from([1, 2])), channels, height, width)
    convs, taken = [], 0
    for _ in range(draw(st.integers(1, 3))):
        residual = draw(st.booleans())
        kind = draw(st.sampled_from(["1x1", "dense"]))
        pads = tuple(draw(st.integers(0, 2)) for _ in range(4)) if kind == "dense" else (0, 0, 0, 0)
        if residual:
            pads = (1, 1, 1, 1)
        if kind == "dense" and (height + pads[0] + pads[2] < 3 or width + pads[1] + pads[3] < 3):
            kind = "1x1"
        out_c = channels if residual else draw(st.integers(1, 40))
        stride = 1 if residual else draw(st.sampled_from([1, 2, 3]))
        convs.append(ConvSpec(out_channels=out_c, stride=stride, pads=pads, bias=draw(st.booleans()),
                              relu=draw(st.booleans()), residual=residual, kind=kind))
        taken += kind == "1x1" or out_c >= lanes
        k = 1 if kind == "1x1" else 3
        height = (height + (pads[0] + pads[2] if k == 3 else 0) - k) // stride + 1
        width = (width + (pads[1] + pads[3] if k == 3 else 0) - k) // stride + 1
        channels = out_c
    return build_cnn(np.random.default_rng(seed), shape, convs), seed, taken


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dense_models())
def test_random_dense_chains_match_reference_on_the_dense_kernel(case):
    model, seed, taken = case
    compiled = check_against_reference(model, seed)
    assert dense_kernel_calls(compiled) == taken


def test_dense_and_pattern_layers_alternate_in_one_model():
    convs = [
        ConvSpec(64, kind="dense"),  # 3-channel dense 3x3 stem
        ConvSpec(13, kind="1x1"),
        ConvSpec(13, connectivity=2.0),  # pattern
        ConvSpec(13, kind="1x1", residual=True),
        ConvSpec(40, kind="1x1", stride=2, relu=False),
        ConvSpec(40, residual=True),  # pattern + residual
        ConvSpec(16, kind="1x1", bias=False),
    ]
    model = build_cnn(np.random.default_rng(4), (2, 3, 19, 17), convs, head=True)
    compiled = check_against_reference(model, 4)
    assert [r.kind for r in compiled.report] == ["dense", "dense", "pattern", "dense", "dense", "pattern", "dense"]
    assert dense_kernel_calls(compiled) == 5


def _relax_conv_chain(shape, weight, bias, residual: bool, activation):
    """x -> conv1x1 -> + bias -> (+ x) -> activation, as a Relax module with constant weights."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(weight)))
            y = bb.emit(relax.op.add(y, relax.const(bias.reshape(1, -1, 1, 1))))
            if residual:
                y = bb.emit(relax.op.add(x, y))
            out = bb.emit_output(activation(y) if activation is not None else y)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("activation, numpy_activation", [
    (relax.op.nn.relu, lambda v: np.maximum(v, 0)),
    (lambda v: relax.op.clip(v, 0.0, 6.0), lambda v: np.clip(v, 0, 6)),  # ReLU6
    (lambda v: relax.op.clip(v, -0.5, 0.25), lambda v: np.clip(v, -0.5, 0.25)),
    (None, lambda v: v),
])
def test_bias_residual_and_activation_fuse_into_one_kernel(activation, numpy_activation):
    rng = np.random.default_rng(8)
    shape = (2, 12, 9, 9)  # over 64 pixels: the GEMM on AVX2 too
    weight = rng.standard_normal((12, 12, 1, 1)).astype(np.float32) * 0.3
    bias = rng.standard_normal(12).astype(np.float32)
    mod = _relax_conv_chain(shape, weight, bias, True, activation)

    with resolve_target("x86"):
        rewritten = DenseConvRewrite()(relax.transform.FoldConstant()(mod))
    bindings = [b.value for block in rewritten["main"].body.blocks for b in block.bindings]
    assert [b.op.name for b in bindings if isinstance(b, relax.Call)] == ["relax.call_tir"]  # nothing left over
    assert DENSE_CONV_ATTR in rewritten[bindings[0].args[0]].attrs

    x = rng.standard_normal(shape).astype(np.float32)
    compiled = tvm_patdnn.compile(mod, "x86")
    expected = numpy_activation(np.einsum("fc,nchw->nfhw", weight[:, :, 0, 0], x) + bias.reshape(1, -1, 1, 1) + x)
    assert_close(compiled.run({"x": x})[0], expected)
    assert dense_kernel_calls(compiled) == 1


def _single_conv(in_c, out_c, size, kernel=1, **attrs) -> onnx.ModelProto:
    weight = np.random.default_rng(2).standard_normal((out_c, in_c // attrs.get("group", 1), kernel, kernel))
    pads, stride = attrs.get("pads", [0] * 4), attrs.get("strides", [1])[0]
    out_h = (size + pads[0] + pads[2] - kernel) // stride + 1
    out_w = (size + pads[1] + pads[3] - kernel) // stride + 1
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[kernel, kernel], **attrs)], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, in_c, size, size])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, out_c, out_h, out_w])],
        [onnx.numpy_helper.from_array((weight / np.sqrt(weight[0].size)).astype(np.float32), "w")],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


@pytest.mark.parametrize("in_c, out_c, size, kernel, attrs", [
    (3, 64, 23, 7, {"strides": [2, 2], "pads": [3, 3, 3, 3]}),  # a ResNet-like stem, odd size
    (5, 65, 9, 3, {"pads": [1, 1, 1, 1]}),
    (6, 67, 10, 3, {"strides": [2, 2], "pads": [0, 1, 2, 0]}),  # asymmetric padding
    (4, 68, 7, 5, {"strides": [3, 3], "pads": [2, 2, 2, 2]}),
    (40, 66, 6, 3, {"pads": [1, 1, 1, 1]}),  # 360 taps: several reduction blocks
    (300, 13, 5, 1, {}),  # 300 channels: several reduction blocks of a 1x1
    (7, 70, 3, 3, {}),  # one output pixel
    (160, 96, 7, 1, {}),  # AVX-512: a 1x1 on the direct kernel, 96 filters as 2 blocks of 3 vectors
    (130, 40, 9, 1, {"strides": [2, 2]}),  # AVX-512: a strided 1x1 on the direct kernel, a ragged block
    (128, 50, 9, 1, {}),  # AVX-512: 128 input channels, a 1x1 on the GEMM's 16-lane tile
    (32, 16, 9, 1, {}),  # AVX-512: 16 filters, the GEMM's balanced 8-filter tiles
    (40, 24, 28, 1, {}),  # AVX-512: 784 pixels, the GEMM reads the input in place (no panel copy)
    (40, 70, 57, 1, {}),  # AVX-512: 3249 pixels, <= 64 channels: the GEMM's 8 x 3 tile, ragged filters
    (130, 40, 28, 1, {}),  # AVX-512: 784 pixels, the direct kernel's 12 pixels x 2 vectors, a ragged block
    (3, 64, 12, 3, {"pads": [1, 1, 1, 1]}),  # an RGB image's first 3x3: the GEMM (AVX2 and AVX-512)
    (20, 70, 2, 3, {"pads": [1, 1, 1, 1]}),  # 2x2 output: AVX-512's 4 pixels x 4 vectors of 8 lanes
])
def test_kxk_convs_match_reference_on_the_direct_kernel(in_c, out_c, size, kernel, attrs):
    """KxK convs with at least a vector of filters run on the direct kernel (AVX2 and AVX-512 hosts),
    but for an RGB image's stride-1 3x3; 1x1 convs on the GEMM, or on AVX-512 hosts on the direct kernel
    above 128 input channels."""
    compiled = check_against_reference(_single_conv(in_c, out_c, size, kernel, **attrs), kernel)
    target = resolve_target("x86")
    stride = attrs.get("strides", [1])[0]
    spec = DenseConvSpec(batch=2, in_channels=in_c, height=size, width=size, out_channels=out_c, lanes=1,
                         kernel=(kernel, kernel), strides=(stride, stride), padding=tuple(attrs.get("pads", [0] * 4)))
    chosen = DenseConvRewrite(vector_registers(target), vector_lanes(target)).kernel_for(spec)
    assert dense_kernel_calls(compiled, ({"gemm": "dense_conv", "direct": "direct_conv"}[chosen],)) == 1


@pytest.mark.parametrize("in_c, out_c, size, attrs", [
    (3, 64, 16, {"pads": [1, 1, 1, 1]}),  # 256 pixels: 2 whole 112-pixel tiles and an overlapping last one
    (3, 65, 13, {"pads": [0, 1, 2, 1]}),  # a ragged last filter tile, tiles across rows, asymmetric padding
    (2, 70, 11, {}),  # 81 pixels: fewer than the tile, keeps the 14 x 2 tile
])
def test_streamed_output_tile_matches_reference(in_c, out_c, size, attrs, monkeypatch):
    """AVX-512: an RGB stride-1 3x3 whose output outgrows L2 takes the GEMM's 3 filters x 7 vectors tile
    (threshold lowered here so that small batch-2 images take it)."""
    monkeypatch.setattr(dense_conv_rewrite, "STREAMED_OUTPUT_BYTES", 1)
    compiled = check_against_reference(_single_conv(in_c, out_c, size, 3, **attrs), size)
    assert dense_kernel_calls(compiled, ("dense_conv",)) == 1
    if vector_lanes(resolve_target("x86")) >= 16:
        spec = DenseConvSpec(batch=2, in_channels=in_c, height=size, width=size, out_channels=out_c, lanes=1,
                             kernel=(3, 3), padding=tuple(attrs.get("pads", [0] * 4)))
        tile = DenseConvRewrite(32, 16).gemm_tile(spec)
        assert (tile.filter_tile, tile.vectors) == ((3, 7) if tile.pixels >= 112 else (14, 2))


@pytest.mark.parametrize("in_c, out_c, kernel, attrs", [
    (6, 8, 1, {"pads": [1, 1, 1, 1], "group": 2}),  # grouped
    (6, 8, 3, {"dilations": [2, 2]}),  # dilated
    (3, 7, 3, {"pads": [1, 1, 1, 1]}),  # 3x3 with fewer filters than a vector's lanes
])
def test_convs_the_kernel_does_not_take_stay_on_the_dense_path(in_c, out_c, kernel, attrs):
    compiled = check_against_reference(_single_conv(in_c, out_c, 9, kernel, **attrs), 1)
    assert dense_kernel_calls(compiled) == 0


def test_weights_past_l2_run_filter_tiles_outside_pixel_tiles_and_match_reference(monkeypatch):
    """1x1 convs with 2 MB of weights and more (ResNet-50's 1024->512, 512->1024 s2, 1024->2048 s2) sweep
    panels packed beforehand, one filter tile at a time, on 8-lane tiles (measured on AVX2 only: not on
    AVX-512's 16-lane or NEON's 4-lane tiles by default); that order, taken here by every GEMM layer,
    against onnx.reference: stride 2, a residual, ragged filter and pixel tiles, batch 2."""
    def layer(in_c, out_c, size, stride, registers=16, lanes=8):
        return DenseConvSpec.for_target(registers, lanes, batch=1, in_channels=in_c, height=size, width=size,
                                        out_channels=out_c, strides=(stride, stride))

    assert layer(1024, 2048, 14, 2).filters_outer and layer(1024, 512, 14, 1).filters_outer
    assert not layer(256, 1024, 14, 1).filters_outer and not layer(1024, 256, 14, 1).filters_outer
    assert not layer(1024, 2048, 14, 2, 32, 16).filters_outer and not layer(1024, 2048, 14, 2, 32, 4).filters_outer
    with pytest.raises(ValueError, match="packed panels"):
        DenseConvSpec(batch=1, in_channels=8, height=4, width=4, out_channels=8, pack_panel=False, filters_outer=True)
    monkeypatch.setattr(dense_conv, "FILTERS_OUTER_WEIGHT_BYTES", 0)
    no_pad = (0, 0, 0, 0)
    convs = [ConvSpec(40, kind="1x1", pads=no_pad), ConvSpec(40, kind="1x1", pads=no_pad, residual=True),
             ConvSpec(37, kind="1x1", pads=no_pad, stride=2)]
    compiled = check_against_reference(build_cnn(np.random.default_rng(7), (2, 13, 23, 11), convs), 7)
    assert dense_kernel_calls(compiled, ("dense_conv",)) == 3


@pytest.mark.parametrize("prefetch", [True, False, None])
def test_epilogue_prefetch_matches_reference(prefetch):
    """The GEMM prefetches each tile's residual and output lines before its multiply-adds (in the
    reduction block that stores; ``prefetch_output``) and writes the same outputs without it: several
    reduction blocks, a residual, stride 2, ragged filter and pixel tiles, batch 2. By default (None)
    it prefetches on 8 and 4 lanes, and on 16 lanes only where the epilogue reads a residual."""
    no_pad = (0, 0, 0, 0)
    convs = [ConvSpec(300, kind="1x1", pads=no_pad), ConvSpec(300, kind="1x1", pads=no_pad, residual=True),
             ConvSpec(37, kind="1x1", pads=no_pad, stride=2), ConvSpec(40, kind="1x1", pads=no_pad, bias=False)]
    model = build_cnn(np.random.default_rng(9), (2, 13, 23, 11), convs)
    target = resolve_target("x86")
    mod = relax.transform.FoldConstant()(import_onnx(model).mod)
    mod = DenseConvRewrite(vector_registers(target), vector_lanes(target), kernel="gemm", prefetch_output=prefetch)(mod)
    kernels = [f for f in mod.functions.values() if f.attrs is not None and DENSE_CONV_ATTR in f.attrs]
    residual = [any(param.name == "residual" for param in f.params) for f in kernels]
    expected = [prefetch if prefetch is not None else vector_lanes(target) < 16 or r for r in residual]
    assert len(kernels) == 4 and sum(residual) == 1
    assert [("T.prefetch(" in f.script()) for f in kernels] == expected
    executable = tvm.compile(mod, target, relax_pipeline=get_pipeline(target, dense_kernels=False))
    x = np.random.default_rng(9).standard_normal((2, 13, 23, 11)).astype(np.float32)
    actual = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert_close(actual, reference_outputs(model, {model.graph.input[0].name: x})[0])


@pytest.mark.parametrize("narrow", [True, False])
@pytest.mark.parametrize("filters_outer", [False, True])
def test_narrow_last_pixel_tile_matches_reference(narrow, filters_outer, monkeypatch):
    """When at most one vector of pixels is left after the whole pixel tiles, the GEMM's last tile is
    one vector wide (``narrow_tail``, the default; a 7x7 output computes 56 pixels, not 64), in both
    loop orders; with it off, a whole overlapping tile: both against onnx.reference with 196 pixels
    (a stride-2 1x1, one and two reduction blocks, a residual) and 49 (a 3x3 stride 2, a 1x1),
    channels no tile divides, batch 2."""
    def tail_vectors(pixels):
        return DenseConvSpec.for_target(16, 8, batch=1, in_channels=8, height=pixels, width=1,
                                        out_channels=8).tail.vectors

    assert [tail_vectors(p) for p in (49, 196, 63, 64, 8, 20)] == [1, 1, 2, 2, 1, 1]
    if filters_outer:
        monkeypatch.setattr(dense_conv, "FILTERS_OUTER_WEIGHT_BYTES", 0)
    no_pad = (0, 0, 0, 0)
    convs = [ConvSpec(37, kind="1x1", pads=no_pad, stride=2), ConvSpec(300, kind="1x1", pads=no_pad),
             ConvSpec(300, kind="1x1", pads=no_pad, residual=True), ConvSpec(40, kind="dense", stride=2),
             ConvSpec(37, kind="1x1", pads=no_pad)]
    model = build_cnn(np.random.default_rng(11), (2, 13, 28, 28), convs)
    target = resolve_target("x86")
    mod = relax.transform.FoldConstant()(import_onnx(model).mod)
    mod = DenseConvRewrite(vector_registers(target), vector_lanes(target), kernel="gemm", narrow_tail=narrow)(mod)
    kernels = [f for f in mod.functions.values() if f.attrs is not None and DENSE_CONV_ATTR in f.attrs]
    assert len(kernels) == 5
    executable = tvm.compile(mod, target, relax_pipeline=get_pipeline(target, dense_kernels=False))
    x = np.random.default_rng(11).standard_normal((2, 13, 28, 28)).astype(np.float32)
    actual = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert_close(actual, reference_outputs(model, {model.graph.input[0].name: x})[0])


def test_register_tile_follows_the_target():
    assert register_tile(16, 8, 3136) == (6, 2, 8)  # AVX2: 12 accumulators + 2 inputs + broadcast + spare
    assert register_tile(32, 16, 3136) == (14, 2, 16)  # AVX-512: 28 of 32 zmm
    assert register_tile(32, 4, 49) == (14, 2, 4)  # NEON
    assert register_tile(16, 8, 9) == (13, 1, 8)  # one vector of pixels: more filters
    assert register_tile(16, 8, 5) == (13, 1, 5)  # smaller than a vector: a narrower one
    assert DenseConvRewrite(32, 16).gemm_vectors() == (32, 16)  # AVX-512: 14 x 2 of 16 lanes (Zen 5)
    assert DenseConvRewrite(16, 8).gemm_vectors() == (16, 8) and DenseConvRewrite(32, 4).gemm_vectors() == (32, 4)
    # a forced GEMM takes KxK convs with four vectors of 8 filters: 32 on AVX2 and AVX-512 alike
    kxk = dict(batch=1, in_channels=13, height=28, width=28, kernel=(3, 3), strides=(2, 2), padding=(1, 1, 1, 1))
    for registers, lanes in ((16, 8), (32, 16)):
        forced = DenseConvRewrite(registers, lanes, kernel="gemm")
        assert forced.kernel_for(DenseConvSpec(**kxk, out_channels=32)) == "gemm"
        assert forced.kernel_for(DenseConvSpec(**kxk, out_channels=31)) is None
    targets = {
        '{"kind":"llvm","mcpu":"znver3"}': (16, 8),
        '{"kind":"llvm","mcpu":"skylake-avx512"}': (32, 16),
        "galaxy-s10": (32, 4),
    }
    for name, expected in targets.items():
        target = resolve_target(name)
        assert (vector_registers(target), vector_lanes(target)) == expected


@pytest.mark.parametrize("target", ['{"kind":"llvm","mcpu":"skylake-avx512","num-cores":2}', "galaxy-s10"])
def test_kernel_builds_for_avx512_and_neon(target):
    """Code generation only (this host may not run it): the wider tiles compile."""
    convs = [ConvSpec(64, kind="dense"), ConvSpec(40, kind="1x1"), ConvSpec(40, kind="1x1", residual=True)]
    compiled = tvm_patdnn.compile(build_cnn(np.random.default_rng(6), (1, 20, 9, 9), convs), target)
    assert dense_kernel_calls(compiled) == 3
