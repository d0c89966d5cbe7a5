"""The depthwise conv kernel and the ONNX Clip import: models against onnx.reference, one fused
kernel per conv chain at IR level, AVX-512 and NEON code generation, the emulated phone."""

from __future__ import annotations

import gc
import re

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_factory import reference_outputs
from onnx import TensorProto, helper, numpy_helper
from test_compiler import assert_close, check_against_reference
from tvm import relax

import tvm_patdnn
from tvm_patdnn.frontend import import_onnx
from tvm_patdnn.ops.depthwise_conv import DEPTHWISE_CONV_ATTR, DepthwiseConvSpec, depthwise_conv_primfunc
from tvm_patdnn.pipeline import pattern_passes
from tvm_patdnn.targets import resolve_target


def kernel_calls(compiled: tvm_patdnn.CompiledModel, name: str) -> int:
    """How many calls of kernels named ``name...`` the compiled model makes."""
    return sum(line.strip().startswith(f"call  {name}") for line in compiled.executable.as_text().splitlines())


def depthwise_layer(rng, shape, kernel=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), bias=True, activation="clip",
                    multiplier=1, dilation=1, opset=17) -> onnx.ModelProto:
    """Depthwise Conv (+ bias) (+ Relu / Clip(0, 6) / Clip(-0.5, 0.75)) as ONNX; clip bounds as
    initializer inputs (opset 11+) or attributes (older opsets)."""
    n, c, h, w = shape
    out_c = c * multiplier
    keff = [dilation * (k - 1) + 1 for k in kernel]
    oh = (h + pads[0] + pads[2] - keff[0]) // strides[0] + 1
    ow = (w + pads[1] + pads[3] - keff[1]) // strides[1] + 1
    weight = (rng.standard_normal((out_c, 1, *kernel)) / np.sqrt(kernel[0] * kernel[1])).astype(np.float32)
    inits, inputs = [numpy_helper.from_array(weight, "w")], ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(out_c).astype(np.float32), "b"))
        inputs.append("b")
    nodes = [helper.make_node("Conv", inputs, ["c"], name="dw", group=c, kernel_shape=list(kernel),
                              strides=list(strides), pads=[pads[0], pads[1], pads[2], pads[3]],
                              dilations=[dilation, dilation])]
    out = "c"
    if activation == "relu":
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
        out = "y"
    elif activation in ("clip", "clip_narrow"):
        low, high = (0.0, 6.0) if activation == "clip" else (-0.5, 0.75)
        if opset >= 11:
            inits += [numpy_helper.from_array(np.array(low, np.float32), "lo"),
                      numpy_helper.from_array(np.array(high, np.float32), "hi")]
            nodes.append(helper.make_node("Clip", ["c", "lo", "hi"], ["y"]))
        else:
            nodes.append(helper.make_node("Clip", ["c"], ["y"], min=low, max=high))
        out = "y"
    graph = helper.make_graph(nodes, "depthwise", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [n, out_c, oh, ow])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@st.composite
def depthwise_models(draw):
    """Odd sizes, channels no vector divides, rows narrower than a vector, kernels 1/3/5,
    row and column strides 1-3 independently, asymmetric paddings, bias, ReLU / ReLU6 / a
    narrow clip, batch 1 and 2."""
    seed = draw(st.integers(0, 2**31))
    kernel = draw(st.sampled_from([(3, 3), (3, 3), (5, 5), (1, 1), (3, 5)]))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
    height = draw(st.integers(max(1, kernel[0] - pads[0] - pads[2]), 23))
    width = draw(st.integers(max(1, kernel[1] - pads[1] - pads[3]), 23))
    shape = (draw(st.sampled_from([1, 2])), draw(st.integers(2, 19)), height, width)  # 1 channel: a dense conv
    strides = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    activation = draw(st.sampled_from(["none", "relu", "clip", "clip_narrow"]))
    return depthwise_layer(np.random.default_rng(seed), shape, kernel, strides, pads, draw(st.booleans()),
                           activation), seed


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(depthwise_models())
def test_random_depthwise_convs_match_reference_on_the_depthwise_kernel(case):
    model, seed = case
    compiled = check_against_reference(model, seed)
    assert kernel_calls(compiled, "depthwise_conv") == 1


@pytest.mark.parametrize("channels, size, stride", [(32, 112, 1), (96, 112, 2), (144, 56, 2), (960, 7, 1)])
def test_mobilenet_v2_shapes_match_reference(channels, size, stride):
    model = depthwise_layer(np.random.default_rng(channels), (1, channels, size, size), strides=(stride, stride))
    assert kernel_calls(check_against_reference(model, 1), "depthwise_conv") == 1


@pytest.mark.parametrize("attrs", [{"multiplier": 2}, {"dilation": 2, "pads": (2, 2, 2, 2)}])
def test_convs_the_kernel_does_not_take_stay_on_the_legalized_conv(attrs):
    model = depthwise_layer(np.random.default_rng(3), (2, 6, 9, 11), **attrs)
    assert kernel_calls(check_against_reference(model, 3), "depthwise_conv") == 0


def _calls_after_pattern_stage(model: onnx.ModelProto) -> list[str]:
    """The operators left in ``main`` after the pattern stage (before legalization)."""
    target = resolve_target("x86")
    mod = import_onnx(model).mod
    with target:
        for p in pattern_passes(target):
            mod = p(mod)
    calls = [b.value for block in mod["main"].body.blocks for b in block.bindings if isinstance(b.value, relax.Call)]
    return [c.op.name if hasattr(c.op, "name") else str(c.op) for c in calls]


@pytest.mark.parametrize("opset", [7, 11, 17])
def test_onnx_clip_fuses_into_the_depthwise_kernel(opset):
    """Clip as attributes (opset < 11) or constant inputs: one call_tir, the depthwise kernel."""
    model = depthwise_layer(np.random.default_rng(5), (1, 8, 10, 10), activation="clip_narrow", opset=opset)
    assert _calls_after_pattern_stage(model) == ["relax.call_tir"]
    compiled = check_against_reference(model, 5)
    assert kernel_calls(compiled, "depthwise_conv") == 1 and kernel_calls(compiled, "fused") == 0


def _conv_clip(opset: int, bounds: tuple[float | None, float | None], dynamic_bound: bool = False) -> onnx.ModelProto:
    """Dense 1x1 conv + Clip; a bound left None is absent, ``dynamic_bound`` makes ``max`` computed at
    run time (half the input's largest value)."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 8, 1, 1)).astype(np.float32), "w")]
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 5])]
    if opset < 11:
        clip = helper.make_node("Clip", ["c"], ["y"], **{k: v for k, v in zip(("min", "max"), bounds) if v is not None})
    else:
        names = []
        for name, bound in zip(("lo", "hi"), bounds):
            names.append(name if bound is not None else "")
            if bound is not None:
                inits.append(numpy_helper.from_array(np.array(bound, np.float32), name))
        while names and names[-1] == "":
            names.pop()
        clip = helper.make_node("Clip", ["c", *names], ["y"])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), clip]
    if dynamic_bound:
        inits = [i for i in inits if i.name != "hi"] + [numpy_helper.from_array(np.array(0.5, np.float32), "half")]
        nodes[1:1] = [helper.make_node("ReduceMax", ["x"], ["top"], keepdims=0), helper.make_node("Mul", ["top", "half"], ["hi"])]
    graph = helper.make_graph(nodes, "g", graph_inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 6, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset, bounds", [
    (7, (0.0, 6.0)), (17, (0.0, 6.0)), (13, (-1.0, None)), (11, (None, 0.5)), (17, (None, None)),
])
def test_onnx_clip_imports_as_one_relax_clip_the_dense_kernel_fuses(opset, bounds):
    model = _conv_clip(opset, bounds)
    assert _calls_after_pattern_stage(model) == ["relax.call_tir"]
    check_against_reference(model, 7)


def test_clip_with_a_runtime_bound_keeps_tvms_converter():
    model = _conv_clip(17, (0.0, 6.0), dynamic_bound=True)
    assert "relax.clip" not in _calls_after_pattern_stage(model)
    check_against_reference(model, 1)


def test_register_tile_follows_the_target():
    shape = {"batch": 1, "channels": 32, "height": 112, "width": 112}
    assert (DepthwiseConvSpec.for_target(16, 8, **shape).rows, DepthwiseConvSpec.for_target(16, 8, **shape).lanes) == (4, 8)
    assert DepthwiseConvSpec.for_target(32, 16, **shape).rows == 8
    small = DepthwiseConvSpec.for_target(16, 8, batch=1, channels=960, height=3, width=5, strides=(2, 2))
    assert (small.rows, small.lanes) == (2, 3)  # a 2x3 output: 2 rows, one 3-lane vector
    with pytest.raises(ValueError, match="activation"):
        DepthwiseConvSpec(1, 8, 9, 9, activation="gelu")


@pytest.mark.parametrize("shape, kernel, pads, activation, stride", [
    ((2, 40, 7, 7), (3, 3), (1, 1, 1, 1), "clip", 1),  # MobileNetV2's 7x7, batch 2
    ((1, 17, 5, 6), (3, 3), (1, 1, 1, 1), "relu", 1),  # non-square, 17 planes
    ((1, 9, 4, 3), (3, 2), (2, 0, 0, 1), "none", 1),  # asymmetric kernel and padding, rows of 2
    ((2, 24, 14, 14), (3, 3), (1, 1, 1, 1), "clip", 2),  # MobileNetV2's 576@14x14 -> 7x7, batch 2
    ((1, 19, 28, 27), (3, 3), (1, 1, 1, 1), "relu", 2),  # 28x27 -> 14x14: 14 vectors, odd width
    ((1, 9, 11, 9), (3, 2), (2, 0, 1, 1), "none", 2),  # asymmetric kernel and padding, odd rows
])
def test_flat_tile_matches_reference(shape, kernel, pads, activation, stride):
    """On AVX-512 hosts, stride-1 depthwise convs with output rows narrower than 8 and stride-2 ones
    with rows narrower than 16 take the flat tile (vectors along the flattened padded plane, at
    stride 2 split into phase planes); against onnx.reference."""
    from tvm_patdnn.targets import vector_lanes

    if vector_lanes(resolve_target("x86")) < 16:
        pytest.skip("host CPU: no AVX-512 to run the flat 16-lane tile on")
    model = depthwise_layer(np.random.default_rng(8), shape, kernel=kernel, strides=(stride, stride), pads=pads,
                            activation=activation)
    mod = relax.transform.FoldConstant()(import_onnx(model).mod)
    from tvm_patdnn.transform.depthwise_conv_rewrite import DepthwiseConvRewrite

    rewritten = DepthwiseConvRewrite(32, 16)(mod)
    assert [bool(func.attrs[DEPTHWISE_CONV_ATTR]["flat"]) for _, func in rewritten.functions_items()
            if func.attrs and DEPTHWISE_CONV_ATTR in func.attrs] == [True]
    compiled = tvm_patdnn.compile(model, "x86")
    assert "depthwise_conv" in compiled.executable.as_text()
    x = np.random.default_rng(9).standard_normal(shape).astype(np.float32)
    assert_close(compiled.run({"x": x})[0], reference_outputs(model, {"x": x})[0])


def test_flat_tile_is_chosen_on_16_lanes_only():
    from tvm_patdnn.transform.depthwise_conv_rewrite import DepthwiseConvRewrite

    spec = DepthwiseConvSpec.for_target(32, 16, batch=1, channels=960, height=7, width=7)
    flat = DepthwiseConvSpec(**{**spec.__dict__, "flat": True, "lanes": 16})
    assert flat.flat_vectors == 4 and flat.plane_size >= 4 * 16 + 2 * 9 + 2  # 63 positions, the taps past them
    with pytest.raises(ValueError, match="equal strides"):
        DepthwiseConvSpec(**{**flat.__dict__, "strides": (2, 1)})
    model = depthwise_layer(np.random.default_rng(1), (1, 24, 7, 7))
    mod = relax.transform.FoldConstant()(import_onnx(model).mod)
    for lanes, expected in ((16, True), (8, False)):
        rewritten = DepthwiseConvRewrite(32 if lanes == 16 else 16, lanes)(mod)
        flats = [func.attrs[DEPTHWISE_CONV_ATTR] for _, func in rewritten.functions_items()
                 if func.attrs and DEPTHWISE_CONV_ATTR in func.attrs]
        assert len(flats) == 1 and bool(flats[0].get("flat", False)) == expected


def test_tasks_take_several_planes_on_16_lanes():
    """On 16-lane targets every task pads its plane buffer once for at least 8 planes (at most 1/8 of
    them); other targets keep the old grouping; a grouping with a partial last task (50 planes in
    tasks of 6) matches onnx.reference on the host."""
    from tvm_patdnn.transform.depthwise_conv_rewrite import DepthwiseConvRewrite

    shape = dict(batch=2, channels=25, height=40, width=40)
    assert DepthwiseConvSpec.for_target(16, 8, **shape).channel_group == 2  # 16384 / (40 * 40 * 9): 2
    assert DepthwiseConvSpec.for_target(32, 16, **shape).channel_group == 6  # MIN_GROUP 8, at most 50 // 8
    model = depthwise_layer(np.random.default_rng(2), (2, 25, 40, 40))
    mod = relax.transform.FoldConstant()(import_onnx(model).mod)
    for registers, lanes, group in ((32, 16, 6), (16, 8, 2)):
        rewritten = DepthwiseConvRewrite(registers, lanes)(mod)
        attrs = [func.attrs[DEPTHWISE_CONV_ATTR] for _, func in rewritten.functions_items()
                 if func.attrs and DEPTHWISE_CONV_ATTR in func.attrs]
        assert len(attrs) == 1 and int(attrs[0]["channel_group"]) == group
    compiled = tvm_patdnn.compile(model, "x86")
    x = np.random.default_rng(3).standard_normal((2, 25, 40, 40)).astype(np.float32)
    assert_close(compiled.run({"x": x})[0], reference_outputs(model, {"x": x})[0])


def _asm(target: str, **shape) -> str:
    import tvm

    resolved = resolve_target(target)
    lanes = 16 if "avx512" in target else 4
    spec = DepthwiseConvSpec.for_target(32, lanes, **shape, has_bias=True, activation="clip")
    func = depthwise_conv_primfunc(spec).with_attr("global_symbol", "depthwise")
    assert DEPTHWISE_CONV_ATTR in func.attrs
    return tvm.tirx.build(tvm.IRModule({"depthwise": func}), resolved).inspect_source("asm")


@pytest.mark.parametrize("stride", [1, 2])
def test_avx512_code_uses_512_bit_fmas(stride):
    """Code generation only (this host may not run it)."""
    asm = _asm('{"kind":"llvm","mcpu":"skylake-avx512"}', batch=1, channels=24, height=56, width=56, strides=(stride, stride))
    assert len(re.findall(r"vfmadd\w+\s+[^\n]*zmm", asm)) >= 9 * 8  # an 8-row tile of 3x3 taps
    assert "vgather" not in asm


@pytest.mark.parametrize("stride", [1, 2])
def test_neon_code_uses_vector_fmlas(stride):
    asm = _asm("arm_cpu-linux", batch=1, channels=24, height=28, width=28, strides=(stride, stride))
    assert len(re.findall(r"fmla\s+v\d+\.4s", asm)) >= 9 * 8


def test_runs_on_the_emulated_phone(phone_runtime, tmp_path):
    """The NEON kernel (MobileNetV2-like stride 1 and 2 layers, ReLU6) is correct on aarch64."""
    import tvm
    from tvm import rpc
    from tvm.support import cc

    from tvm_patdnn.phone import runtime
    from tvm_patdnn.phone.emulator import popen_session

    rng = np.random.default_rng(11)
    model = depthwise_layer(rng, (1, 20, 15, 13), strides=(2, 1))
    compiled = tvm_patdnn.compile(model, "arm_cpu-linux")
    assert kernel_calls(compiled, "depthwise_conv") == 1
    path = tmp_path / "depthwise.so"
    compiled.executable.export_library(str(path), fcompile=cc.cross_compiler(runtime.CROSS_CXX))
    x = rng.standard_normal((1, 20, 15, 13)).astype(np.float32)
    remote: rpc.RPCSession = popen_session()
    remote.upload(str(path))
    dev = remote.cpu()
    out = relax.VirtualMachine(remote.load_module(path.name), dev)["main"](tvm.runtime.tensor(x, dev)).numpy()
    del dev, remote
    gc.collect()
    assert_close(out, reference_outputs(model, {"x": x})[0])


def max_pool_model(shape, kernel, strides, pads, ceil_mode=0) -> onnx.ModelProto:
    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=list(kernel), strides=list(strides), pads=list(pads),
                            ceil_mode=ceil_mode)
    out = [-(-(size + pads[axis] + pads[axis + 2] - kernel[axis]) // strides[axis]) + 1 if ceil_mode else
           (size + pads[axis] + pads[axis + 2] - kernel[axis]) // strides[axis] + 1 for axis, size in enumerate(shape[2:])]
    graph = helper.make_graph([node], "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*shape[:2], *out])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("shape, kernel, strides, pads", [
    ((1, 5, 23, 19), (3, 3), (2, 2), (1, 1, 1, 1)),  # ResNet's stem pool, odd sizes (AVX-512: ops/max_pool.py)
    ((2, 3, 224, 224), (2, 2), (2, 2), (0, 0, 0, 0)),  # VGG's pool (AVX-512: ops/max_pool.py, test_max_pool.py)
    ((1, 4, 9, 7), (3, 3), (1, 1), (1, 1, 1, 1)),
    ((2, 6, 11, 13), (3, 2), (3, 1), (2, 0, 1, 1)),  # asymmetric, padding up to the kernel size - 1
    ((1, 2, 3, 3), (3, 3), (2, 2), (1, 1, 1, 1)),  # a 2x2 output: narrow vectors
])
def test_max_pool_matches_reference_on_the_window_kernel(shape, kernel, strides, pads):
    compiled = check_against_reference(max_pool_model(shape, kernel, strides, pads), 2)
    from tvm_patdnn.targets import vector_lanes

    routed = (kernel == strides and not any(pads)) or (kernel, strides, pads) == ((3, 3), (2, 2), (1, 1, 1, 1))
    out_width = (shape[3] + pads[1] + pads[3] - kernel[1]) // strides[1] + 1
    streamed = vector_lanes(resolve_target("x86")) >= 16 and routed and min(out_width, shape[3] // strides[1]) >= 2
    assert kernel_calls(compiled, "max_pool" if streamed else "depthwise_max_pool") == 1


def test_only_layers_worth_a_parallel_region_get_one():
    """A parallel region costs ~2 µs of fork/join at 2 threads: VGG-16 CIFAR's pools from 128 channels
    at 16x16 down run serially, its first (64 channels at 32x32) and MobileNetV2's convs in parallel."""
    def parallel(**shape) -> bool:
        return "T.parallel(" in depthwise_conv_primfunc(DepthwiseConvSpec.for_target(16, 8, batch=1, **shape)).script()

    pool = {"kernel": (2, 2), "strides": (2, 2), "padding": (0, 0, 0, 0), "reduction": "max"}
    assert parallel(channels=64, height=32, width=32, **pool)
    assert not parallel(channels=128, height=16, width=16, **pool)
    assert not parallel(channels=512, height=2, width=2, **pool)
    assert parallel(channels=960, height=7, width=7)  # MobileNetV2's smallest depthwise conv


def test_ceil_mode_max_pool_stays_on_the_legalized_pool():
    compiled = check_against_reference(max_pool_model((1, 3, 10, 10), (3, 3), (2, 2), (0, 0, 0, 0), ceil_mode=1), 2)
    assert kernel_calls(compiled, "depthwise_max_pool") == 0


def test_depthwise_conv_on_a_plane_wider_than_a_vector_can_be():
    """A 224x224 stride-2 depthwise layer: its padded plane (225 x 2 x 113 floats) is filled row by row."""
    model = depthwise_layer(np.random.default_rng(9), (1, 2, 224, 224), strides=(2, 2))
    assert kernel_calls(check_against_reference(model, 9), "depthwise_conv") == 1


def test_max_pool_between_layers_and_before_a_flatten_compiles():
    """A one-input call_tir (the max pool) before a reshape once failed TVM's RewriteDataflowReshape."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p2"], ["flat"], axis=1)]
    inits = [numpy_helper.from_array(rng.standard_normal((32, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((32, 32, 3, 3)).astype(np.float32) * 0.1, "w2")]
    graph = helper.make_graph(nodes, "pools", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("flat", TensorProto.FLOAT, [1, 32])], inits)
    check_against_reference(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
