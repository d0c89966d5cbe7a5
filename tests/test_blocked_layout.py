"""The blocked layout (NCHW16c) between 16-lane direct-kernel convs: the kernel reading and writing it against
onnx.reference, which tensors the pass blocks (and which stay NCHW), models through tvm_patdnn.compile, other
targets untouched, and PatDNNError for specs the kernel cannot run."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import tvm
from model_factory import reference_outputs
from onnx import TensorProto, helper, numpy_helper
from test_compiler import assert_close
from test_direct_conv import conv_model

import tvm_patdnn
from tvm_patdnn.errors import PatDNNError
from tvm_patdnn.frontend import import_onnx
from tvm_patdnn.ops.dense_conv import DenseConvSpec, pack_dense_conv_weight
from tvm_patdnn.ops import direct_conv
from tvm_patdnn.ops.direct_conv import DIRECT_CONV_ATTR, DirectConvSpec, direct_conv_primfunc, pack_direct_conv_bias
from tvm_patdnn.pipeline import pattern_passes
from tvm_patdnn.targets import resolve_target, vector_lanes
from tvm_patdnn.transform import blocked_layout

AVX512 = {"kind": "llvm", "mcpu": "znver5", "num-cores": 1}
AVX2 = {"kind": "llvm", "mcpu": "znver3", "num-cores": 1}


def to_blocked(x: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    return np.ascontiguousarray(x.reshape(n, c // 16, 16, h, w).transpose(0, 1, 3, 4, 2))


def from_blocked(x: np.ndarray) -> np.ndarray:
    n, cb, h, w, b = x.shape
    return np.ascontiguousarray(x.transpose(0, 1, 4, 2, 3).reshape(n, cb * b, h, w))


def needs_avx512():
    target = resolve_target("x86")
    if vector_lanes(target) < 16:
        pytest.skip("host CPU: no AVX-512 to run the 16-lane code on")
    return target


def layer(shape, out_c, kernel=(1, 1), strides=(1, 1), residual=False, activation="relu") -> DenseConvSpec:
    n, c, h, w = shape
    return DenseConvSpec(batch=n, in_channels=c, height=h, width=w, out_channels=out_c, kernel=kernel, strides=strides,
                         padding=(0, 0, 0, 0), has_bias=True, residual=residual, activation=activation,
                         clip_min=-0.5 if activation == "clip" else 0.0, clip_max=0.75 if activation == "clip" else 0.0)


@pytest.mark.parametrize("blocked_input, blocked_residual, blocked_output", [
    (True, True, True), (True, False, False), (False, False, True), (False, True, False), (True, True, False),
])
@pytest.mark.parametrize("shape, out_c, kernel, strides, residual, activation, tile, vectors, panel", [
    ((2, 48, 7, 9), 48, (1, 1), (1, 1), True, "relu", 6, 4, 32768),  # batch 2, residual, 63 = 10 x 6 + 3, ragged block
    ((1, 64, 14, 14), 80, (1, 1), (1, 1), False, "clip", 6, 4, 4096),  # 4 reduction blocks of 16, ragged 80 = 64 + 16
    ((2, 32, 9, 9), 32, (1, 1), (2, 2), False, "none", 6, 2, 32768),  # strided 1x1 read in place, 25 = 4 x 6 + 1
    ((1, 32, 8, 8), 48, (3, 3), (1, 1), False, "relu", 6, 3, 8192),  # unpadded 3x3, several reduction blocks
    ((2, 96, 14, 14), 96, (1, 1), (1, 1), True, "relu", 12, 2, 16384),  # the wide 12 x 2 tile + residual
    ((1, 48, 7, 7), 48, (1, 1), (1, 1), True, "clip", 1, 3, 32768),  # 1-pixel tiles: the scalar epilogue
])
def test_blocked_kernel_matches_reference(blocked_input, blocked_residual, blocked_output, shape, out_c, kernel,
                                          strides, residual, activation, tile, vectors, panel):
    """The direct kernel reading its input and / or residual, writing its output in NCHW16c (a blocked residual
    with an NCHW output too: added to the rows before the transpose), against onnx.reference on the NCHW model
    (arguments converted around the kernel)."""
    target = needs_avx512()
    # without a residual its layout means nothing; with one, a blocked output reads a blocked residual
    blocked_residual = residual and (blocked_residual or blocked_output)
    model = conv_model(shape, out_c, kernel, strides, residual=residual, activation=activation, seed=5)
    conv = layer(shape, out_c, kernel, strides, residual, activation)
    spec = DirectConvSpec(conv, tile, vectors, 16, weight_panel=panel, blocked_input=blocked_input,
                          blocked_residual=blocked_residual, blocked_output=blocked_output)
    _assert_blocked_kernel_matches(spec, model, target)
    script = direct_conv_primfunc(spec).script()
    if blocked_output:
        assert "T.Shuffle" not in script  # whole-vector stores, no transpose


def _assert_blocked_kernel_matches(spec: DirectConvSpec, model, target) -> None:
    conv = spec.conv
    weight, bias = (numpy_helper.to_array(t) for t in model.graph.initializer[:2])
    func = direct_conv_primfunc(spec).with_attr("global_symbol", "main")
    kernel_fn = tvm.compile(tvm.IRModule({"main": func}), target)["main"]
    x = np.random.default_rng(6).standard_normal((conv.batch, conv.in_channels, conv.height, conv.width))
    x = x.astype(np.float32)
    out_shape = (conv.batch, conv.out_channels, conv.out_height, conv.out_width)
    out = tvm.runtime.empty(to_blocked(np.zeros(out_shape, np.float32)).shape if spec.blocked_output else out_shape,
                            "float32")
    args = [tvm.runtime.tensor(to_blocked(x) if spec.blocked_input else x),
            tvm.runtime.tensor(pack_dense_conv_weight(weight, spec.filter_block)),
            tvm.runtime.tensor(pack_direct_conv_bias(bias, spec.filter_block))]
    if conv.residual:  # the model adds its input
        args.append(tvm.runtime.tensor(to_blocked(x) if spec.blocked_residual else x))
    kernel_fn(*args, out)
    actual = from_blocked(out.numpy()) if spec.blocked_output else out.numpy()
    assert_close(actual, reference_outputs(model, {"x": x})[0])


@pytest.mark.parametrize("shape, out_c, tile, vectors", [
    ((1, 336, 28, 28), 64, 6, 4),  # 1.05 MB: past COMPACT_INPUT_BYTES, 196 = 32 x 6 + 4
    ((2, 352, 27, 29), 48, 12, 2),  # batch 2, odd sides (14 x 15 outputs), 210 = 17 x 12 + 6
])
def test_strided_pointwise_compacts_a_blocked_input(shape, out_c, tile, vectors):
    """A strided 1x1 whose blocked input reaches the compact threshold copies the 16-channel vectors it reads."""
    target = needs_avx512()
    model = conv_model(shape, out_c, (1, 1), (2, 2), activation="relu", seed=9)
    spec = DirectConvSpec(layer(shape, out_c, strides=(2, 2)), tile, vectors, 16, blocked_input=True,
                          blocked_output=True)
    assert direct_conv._compacts(spec)
    _assert_blocked_kernel_matches(spec, model, target)


def _conv(name, x, c, f, out, inits, rng, kernel=1, pads=0, stride=1):
    weight = (rng.standard_normal((f, c, kernel, kernel)) / np.sqrt(c * kernel * kernel)).astype(np.float32)
    inits += [numpy_helper.from_array(weight, name + "_w"),
              numpy_helper.from_array(rng.standard_normal(f).astype(np.float32) * 0.1, name + "_b")]
    return helper.make_node("Conv", [x, name + "_w", name + "_b"], [out], pads=[pads] * 4, strides=[stride] * 2)


def bottlenecks(batch=2, channels=160, width=144, side=7, pool=False) -> onnx.ModelProto:
    """A ResNet-like chain on 16-lane direct kernels (1x1s of more than 128 input channels): a downsample-like 1x1 (x -> d), two bottleneck blocks whose
    last 1x1 adds the block input as residual (d -> b1 -> b2; their middle 3x3 pads: its input and output stay
    NCHW), a last 1x1 reading b2 (-> y, a model output: NCHW). With ``pool`` a max pool also reads b1 (a non-direct
    consumer: b1 stays NCHW, and so must b2's residual partner)."""
    rng = np.random.default_rng(11)
    inits, nodes = [], []
    wide = 4 * width
    nodes += [_conv("down", "x", channels, wide, "d0", inits, rng), helper.make_node("Relu", ["d0"], ["d"])]
    last = "d"
    for i in (1, 2):
        nodes += [_conv(f"c{i}a", last, wide, width, f"a{i}0", inits, rng), helper.make_node("Relu", [f"a{i}0"], [f"a{i}"]),
                  _conv(f"c{i}b", f"a{i}", width, width, f"m{i}0", inits, rng, kernel=3, pads=1),
                  helper.make_node("Relu", [f"m{i}0"], [f"m{i}"]),
                  _conv(f"c{i}c", f"m{i}", width, wide, f"e{i}", inits, rng),
                  helper.make_node("Add", [f"e{i}", last], [f"s{i}"]), helper.make_node("Relu", [f"s{i}"], [f"b{i}"])]
        last = f"b{i}"
    nodes.append(_conv("head", last, wide, channels, "y", inits, rng))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, channels, side, side])]
    if pool:
        nodes.append(helper.make_node("MaxPool", ["b1"], ["p"], kernel_shape=[2, 2], strides=[2, 2]))
        outputs.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, [batch, wide, side // 2, side // 2]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                             [batch, channels, side, side])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def rewritten(model: onnx.ModelProto, target) -> tvm.IRModule:
    """The module after the pattern stage (the dense rewrites) for ``target``."""
    target = resolve_target(target)
    with target:
        return tvm.transform.Sequential(pattern_passes(target))(import_onnx(model).mod)


def blocked_kernels(mod: tvm.IRModule) -> list[list[bool]]:
    """[blocked input, residual, output] of each direct kernel called by main, in call order."""
    found = []
    for line in mod["main"].script().splitlines():
        if "R.call_tir(direct_conv" in line:
            name = line.split("R.call_tir(")[1].split(",")[0]
            attr = mod[name].attrs[DIRECT_CONV_ATTR]
            found.append([bool(b) for b in attr["blocked"]] if "blocked" in attr else [False] * 3)
    return found


def test_pass_blocks_tensors_between_direct_kernels_only():
    """d, b1, b2 are written blocked; the middle 3x3s (padded: NCHW inputs), and the model output stay NCHW."""
    mod = rewritten(bottlenecks(), AVX512)
    assert blocked_kernels(mod) == [
        [False, False, True],  # x (model input) -> d
        [True, False, False], [False, False, False], [False, True, True],  # block 1: 1x1 reads d, 3x3, 1x1 + d -> b1
        [True, False, False], [False, False, False], [False, True, True],  # block 2 -> b2
        [True, False, False],  # head reads b2, writes the model output
    ]
    assert "R.Tensor((2, 36, 7, 7, 16)" in mod["main"].script()


def test_a_non_direct_reader_keeps_a_tensor_nchw():
    """b1 is also read by a max pool: it stays NCHW, and so does b2, which block 2's 1x1 writes adding b1 (an NCHW
    residual and a blocked output would need a transpose); d stays blocked: block 1's 1x1 adds it to its rows
    before transposing them to b1's NCHW."""
    kernels = blocked_kernels(rewritten(bottlenecks(pool=True), AVX512))
    assert kernels == [
        [False, False, True],  # -> d
        [True, False, False], [False, False, False], [False, True, False],  # b1 = 1x1 + d: blocked residual, NCHW
        [False, False, False], [False, False, False], [False, False, False],  # b2 = 1x1 + b1: NCHW
        [False, False, False],
    ]


@pytest.mark.parametrize("target", [AVX2, "galaxy-s10"])
def test_other_targets_keep_nchw(target):
    mod = rewritten(bottlenecks(), target)
    assert not any(any(k) for k in blocked_kernels(mod))
    assert ", 16)" not in mod["main"].script()


def test_rule_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(blocked_layout, "BLOCKED_LAYOUT_LANES", ())
    assert not any(any(k) for k in blocked_kernels(rewritten(bottlenecks(), AVX512)))


def kernel_names(mod: tvm.IRModule) -> list[str]:
    return [line.split("R.call_tir(")[1].split(",")[0].rstrip("0123456789")
            for line in mod["main"].script().splitlines() if "R.call_tir(" in line]


@pytest.mark.parametrize("pool", [False, True])
def test_residual_pointwise_takes_the_direct_kernel_only_when_blocked(pool):
    """128 -> 576 + residual: the GEMM by the rules (at most 128 input channels); the direct kernel when its output
    is blocked (the chain without the pool), the GEMM when it is not (the pool reads b1: both blocks' expansions)."""
    mod = rewritten(bottlenecks(width=128), AVX512)
    if pool:
        mod = rewritten(bottlenecks(width=128, pool=True), AVX512)
        blocks = ["direct_conv", "direct_conv", "dense_conv"] * 2  # 1x1, 3x3, expansion on the GEMM
        assert kernel_names(mod) == ["direct_conv"] + blocks + ["direct_conv", "max_pool"]
        assert not any(any(k) for k in blocked_kernels(mod))
    else:
        assert kernel_names(mod) == ["direct_conv"] * 8
        assert blocked_kernels(mod) == [
            [False, False, True],
            [True, False, False], [False, False, False], [False, True, True],
            [True, False, False], [False, False, False], [False, True, True],
            [True, False, False],
        ]


@pytest.mark.parametrize("width", [144, 128])
@pytest.mark.parametrize("pool", [False, True])
def test_blocked_chain_matches_reference(pool, width):
    """The whole chain (batch 2, residuals, ReLU, blocked tensors ending in an NCHW output; with the pool a tensor
    with a non-direct reader) through tvm_patdnn.compile against onnx.reference; outputs are NCHW."""
    needs_avx512()
    model = bottlenecks(width=width, pool=pool)
    x = np.random.default_rng(12).standard_normal((2, 160, 7, 7)).astype(np.float32)
    compiled = tvm_patdnn.compile(model, "x86", tuning_db=False)
    actual, expected = compiled.run({"x": x}), reference_outputs(model, {"x": x})
    assert [a.shape for a in actual] == [e.shape for e in expected]
    for a, e in zip(actual, expected):
        assert_close(a, e)


@pytest.mark.parametrize("blocked_input, blocked_residual, blocked_output", [
    (True, True, True), (True, True, False), (False, False, True),
])
@pytest.mark.parametrize("shape, out_c, residual, tile, vectors, panel", [
    ((2, 128, 7, 7), 128, True, 6, 4, 8192),  # batch 2, residual, 49 = 8 x 6 + 1, 4 reduction blocks
    ((1, 96, 7, 9), 80, False, 6, 4, 16384),  # ragged filter block, 63 = 10 x 6 + 3
])
def test_weight_stream_matches_reference_in_the_blocked_layouts(blocked_input, blocked_residual, blocked_output, shape,
                                                               out_c, residual, tile, vectors, panel):
    """The streamed next weight panel (split accumulators) with a blocked input, residual and / or output."""
    target = needs_avx512()
    blocked_residual = residual and (blocked_residual or blocked_output)
    model = conv_model(shape, out_c, (1, 1), (1, 1), residual=residual, activation="relu", seed=13)
    spec = DirectConvSpec(layer(shape, out_c, residual=residual), tile, vectors, 16, weight_panel=panel,
                          weight_stream=2, blocked_input=blocked_input, blocked_residual=blocked_residual,
                          blocked_output=blocked_output)
    assert "prefetch" in direct_conv_primfunc(spec).script()
    _assert_blocked_kernel_matches(spec, model, target)


def test_blocked_spec_rejects_what_the_kernel_cannot_run():
    conv = layer((1, 48, 7, 7), 48, residual=True)
    base = DirectConvSpec(conv, 6, 3, 16)
    with pytest.raises(PatDNNError, match="16-lane"):
        DirectConvSpec(conv, 6, 3, 8, blocked_output=True, blocked_residual=True)
    with pytest.raises(PatDNNError, match="needs a blocked residual"):
        dataclasses.replace(base, blocked_output=True)
    with pytest.raises(PatDNNError, match="residual"):
        DirectConvSpec(layer((1, 48, 7, 7), 48), 6, 3, 16, blocked_residual=True)
    with pytest.raises(PatDNNError, match="multiple of 16 filters"):
        DirectConvSpec(layer((1, 48, 7, 7), 40), 6, 3, 16, blocked_output=True)
    with pytest.raises(PatDNNError, match="multiple of 16 channels"):
        DirectConvSpec(layer((1, 40, 7, 7), 48), 6, 3, 16, blocked_input=True)
    with pytest.raises(PatDNNError, match="must not pad"):
        DirectConvSpec(dataclasses.replace(layer((1, 48, 7, 7), 48, (3, 3)), padding=(1, 1, 1, 1)), 6, 3, 16,
                       blocked_input=True)
