"""The inverted residual kernel (expansion 1x1 -> depthwise -> optional projection 1x1, one kernel):
models against onnx.reference, which blocks the rewrite takes, and the kernel with row bands.

The rewrite takes blocks on AVX2 and AVX-512 targets (8 and 16 lanes, where its rule was measured:
the module docstring of ``inverted_residual_rewrite``), so the tests of the kernel compile for one of
them (``AVX2``, which any AVX2 host runs, AVX-512 ones too; ``AVX512``, run where the host has it)
rather than for the host; on NEON targets the blocks stay separate kernels
(``test_neon_targets_keep_the_blocks_separate_kernels``)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from model_factory import reference_outputs
from test_compiler import assert_close, check_against_reference
from test_depthwise_conv import kernel_calls

import tvm_patdnn
from tvm_patdnn.frontend import seeded_inputs
from tvm_patdnn.ops.inverted_residual import InvertedResidualSpec
from tvm_patdnn.targets import resolve_target, runtime_threads, vector_lanes
from tvm_patdnn.transform import inverted_residual_rewrite

# The host's cores as "x86" has them (the kernel's row bands follow num-cores), AVX2's vectors.
AVX2 = {"kind": "llvm", "mcpu": "znver3", "num-cores": runtime_threads()}
AVX512 = {"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": runtime_threads()}
NEON = {"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon", "+v8.2a", "+dotprod"]}


def check_on(target: dict, model: onnx.ModelProto, seed: int) -> tvm_patdnn.CompiledModel:
    """``check_against_reference`` for ``target`` instead of the host: compiled, then run against
    onnx.reference where the host has the target's vectors (else a host-CPU skip)."""
    compiled = tvm_patdnn.compile(model, target)
    if vector_lanes(resolve_target("x86")) < vector_lanes(resolve_target(target)):
        pytest.skip(f"host CPU: no {vector_lanes(resolve_target(target))}-lane vectors to run the code on (it was built)")
    inputs = seeded_inputs(compiled, seed)
    for actual, expected in zip(compiled.run(inputs), reference_outputs(model, inputs), strict=True):
        assert_close(actual, expected)
    return compiled


def block_model(rng, shape, expanded, stride=(1, 1), pads=(1, 1, 1, 1), projected=None, residual=False,
                activation="clip", bias=True, second_reader=False, residual_first=False) -> onnx.ModelProto:
    """[Conv 1x1 (+ bias) + activation ->] depthwise 3x3 (+ bias) + activation [-> Conv 1x1 (+ bias)
    (+ the block's input)] as ONNX (opset 17); ``expanded`` None: no expansion (the depthwise conv
    reads the input); ``second_reader`` also outputs the expansion; ``residual_first``: the block's
    input is the add's first operand (torchvision's ``x + self.conv(x)``)."""
    n, c, h, w = shape
    oh = (h + pads[0] + pads[2] - 3) // stride[0] + 1
    ow = (w + pads[1] + pads[3] - 3) // stride[1] + 1
    inits, nodes = [], []

    def conv(name, x, weight, **attrs):
        inits.append(numpy_helper.from_array(weight.astype(np.float32), f"{name}_w"))
        inputs = [x, f"{name}_w"]
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(weight.shape[0]).astype(np.float32), f"{name}_b"))
            inputs.append(f"{name}_b")
        nodes.append(helper.make_node("Conv", inputs, [f"{name}_c"], name=name, **attrs))
        return f"{name}_c"

    def activate(x):
        if activation == "relu":
            nodes.append(helper.make_node("Relu", [x], [f"{x}_a"]))
        elif activation == "clip":
            nodes.append(helper.make_node("Clip", [x, "lo", "hi"], [f"{x}_a"]))
        else:
            return x
        return f"{x}_a"

    inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"),
              numpy_helper.from_array(np.array(6, np.float32), "hi")]
    if expanded is None:
        e, expanded = "x", c
    else:
        e = activate(conv("expand", "x", rng.standard_normal((expanded, c, 1, 1)) / np.sqrt(c)))
    d = activate(conv("dw", e, rng.standard_normal((expanded, 1, 3, 3)) / 3, group=expanded, strides=list(stride),
                      pads=list(pads)))
    out, out_shape = d, [n, expanded, oh, ow]
    if projected is not None:
        out = conv("project", d, rng.standard_normal((projected, expanded, 1, 1)) / np.sqrt(expanded))
        out_shape = [n, projected, oh, ow]
        if residual:
            nodes.append(helper.make_node("Add", ["x", out] if residual_first else [out, "x"], ["sum"]))
            out = "sum"
    outputs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)]
    if second_reader:
        outputs.append(helper.make_tensor_value_info(e, TensorProto.FLOAT, [n, expanded, h, w]))
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def every_block(monkeypatch):
    """The rewrite takes blocks of any size (its rule keeps the small ones of these tests apart)."""
    monkeypatch.setattr(inverted_residual_rewrite, "MIN_EXPANDED_BYTES", 0)


@st.composite
def blocks(draw):
    """Odd sizes, expanded channels no filter tile divides, rows narrower than a vector, strides 1-2
    per axis, asymmetric paddings, ReLU / ReLU6 / none, with and without bias, a projection with and
    without residual, no expansion (then a projection), batch 1 and 2."""
    seed = draw(st.integers(0, 2**31))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pads = tuple(draw(st.integers(0, 1)) for _ in range(4))
    height, width = draw(st.integers(3, 21)), draw(st.integers(3, 21))
    channels = draw(st.integers(1, 9))
    expanded = draw(st.sampled_from([None, draw(st.integers(2, 31)), draw(st.integers(2, 31))]))
    projected = draw(st.sampled_from([channels, draw(st.integers(1, 13))] + [None, None] * (expanded is not None)))
    residual = projected == channels and stride == (1, 1) and pads == (1, 1, 1, 1) and draw(st.booleans())
    shape = (draw(st.sampled_from([1, 2])), channels, height, width)
    model = block_model(np.random.default_rng(seed), shape, expanded, stride, pads, projected, residual,
                        draw(st.sampled_from(["clip", "relu", "none"])), draw(st.booleans()))
    return model, seed, projected is not None, expanded is not None


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(blocks(), st.booleans(), st.sampled_from([AVX2, AVX512]))
def test_random_blocks_match_reference_on_one_kernel(every_block, monkeypatch, case, fuse_projection, target):
    model, seed, projected, expanded = case
    monkeypatch.setattr(inverted_residual_rewrite, "FUSE_PROJECTION", fuse_projection)
    compiled = check_on(target, model, seed)
    fused = expanded or fuse_projection
    assert kernel_calls(compiled, "inverted_residual") == fused
    separate = 1 if projected and not fuse_projection else 0
    assert kernel_calls(compiled, "dense_conv") + kernel_calls(compiled, "direct_conv") == separate
    assert kernel_calls(compiled, "depthwise_conv") == (not fused)


@pytest.mark.parametrize("target", [AVX2, AVX512], ids=["avx2", "avx512"])
@pytest.mark.parametrize("channels, expanded, size, stride, projected", [
    (16, 96, 112, 2, None), (24, 144, 56, 1, 24), (24, 144, 56, 2, 32), (32, None, 112, 1, 16)])
def test_mobilenet_v2_blocks_the_rule_fuses_match_reference(channels, expanded, size, stride, projected, target):
    """The rule's blocks (expanded tensors of at least MIN_EXPANDED_BYTES), residual where the model has one."""
    model = block_model(np.random.default_rng(size), (1, channels, size, size), expanded, (stride, stride),
                        projected=projected, residual=projected == channels and stride == 1)
    assert kernel_calls(check_on(target, model, 2), "inverted_residual") == 1


def test_neon_targets_keep_the_blocks_separate_kernels():
    """The rule was measured on AVX2 and AVX-512 only: a block it fuses there stays the 1x1 and
    depthwise kernels on a 4-lane (NEON) target."""
    import tvm
    from tvm import relax

    from tvm_patdnn.frontend import import_onnx
    from tvm_patdnn.ops.inverted_residual import INVERTED_RESIDUAL_ATTR
    from tvm_patdnn.targets import vector_registers

    model = block_model(np.random.default_rng(56), (1, 24, 56, 56), 144, projected=24, residual=True)
    mod = relax.transform.FoldConstant()(import_onnx(model).mod)
    for target, fused in ((AVX2, True), (AVX512, True), (NEON, False)):
        resolved = tvm.target.Target(target)
        rewritten = inverted_residual_rewrite.InvertedResidualRewrite(vector_registers(resolved),
                                                                       vector_lanes(resolved))(mod)
        kernels = [f for _, f in rewritten.functions_items() if f.attrs and INVERTED_RESIDUAL_ATTR in f.attrs]
        assert len(kernels) == fused, target


@pytest.mark.parametrize("size, stride", [(14, 1), (28, 2), (14, 2)])
def test_rows_narrower_than_two_vectors_keep_two_vector_tiles_and_match_reference(every_block, size, stride):
    """MobileNetV2's 14x14 and stride-2 blocks: the expansion computes 16 positions of the 14 + 2 of a
    padded row (not a 13 x 1 tile over the 14 columns), the projection takes enough output rows for
    two vectors of pixels."""
    clip = dict(has_bias=True, activation="clip", clip_min=0.0, clip_max=6.0)
    out = (size - 1) // stride + 1
    spec = InvertedResidualSpec.for_target(
        16, 8, dict(batch=1, in_channels=8, height=size, width=size, out_channels=48, **clip),
        dict(batch=1, channels=48, height=size, width=size, kernel=(3, 3), strides=(stride,) * 2,
             padding=(1, 1, 1, 1), **clip),
        dict(batch=1, in_channels=48, height=out, width=out, out_channels=16, has_bias=True, residual=False,
             activation="none", clip_min=0.0, clip_max=0.0))
    assert (spec.expansion.filter_tile, spec.expansion.vectors) == (6, 2)
    assert (spec.projection.filter_tile, spec.projection.vectors) == (6, 2)
    model = block_model(np.random.default_rng(size + stride), (1, 8, size, size), 48, (stride, stride), projected=16)
    assert kernel_calls(check_on(AVX2, model, 3), "inverted_residual") == 1


def test_small_blocks_and_shared_expansions_stay_separate_kernels(every_block):
    small = block_model(np.random.default_rng(4), (1, 32, 28, 28), 192)
    shared = block_model(np.random.default_rng(5), (2, 5, 9, 7), 11, second_reader=True)
    for model, expected in ((small, 1), (shared, 0)):
        with pytest.MonkeyPatch.context() as patch:
            if model is small:
                patch.setattr(inverted_residual_rewrite, "MIN_EXPANDED_BYTES", 1_000_000)
            compiled = check_on(AVX2, model, 4)
        assert kernel_calls(compiled, "inverted_residual") == 0
        assert kernel_calls(compiled, "depthwise_conv") == 1


def two_blocks(rng, shape, expanded, residual_first) -> onnx.ModelProto:
    """Two blocks of a MobileNetV2 stage: the second adds the first's projection, which the second's
    expansion reads too."""
    first = block_model(rng, shape, expanded, projected=shape[1])
    second = block_model(rng, shape, expanded, projected=shape[1], residual=True, residual_first=residual_first)
    return onnx.compose.merge_models(first, second, io_map=[("project_c", "x")], prefix2="second_")


@pytest.mark.parametrize("residual_first", [True, False])
@pytest.mark.parametrize("fused_blocks", [True, False])
def test_a_stages_residual_add_fuses_into_the_projection_whichever_operand_it_is(monkeypatch, residual_first,
                                                                                  fused_blocks):
    """The add reads the previous block's projection, which the next expansion reads too: it joins the
    second block's projection, on the inverted residual kernel or (blocks below the rule's size) the
    dense one, whether the block's input is the add's first operand or its second. Fused blocks on an
    AVX2 target (the rule's), separate ones on the host."""
    monkeypatch.setattr(inverted_residual_rewrite, "MIN_EXPANDED_BYTES", 0 if fused_blocks else 1_000_000)
    model = two_blocks(np.random.default_rng(6), (2, 5, 9, 7), 11, residual_first)
    compiled = check_on(AVX2, model, 6) if fused_blocks else check_against_reference(model, 6)
    assert kernel_calls(compiled, "add") == 0
    assert kernel_calls(compiled, "inverted_residual") == 2 * fused_blocks
    assert kernel_calls(compiled, "dense_conv") + kernel_calls(compiled, "direct_conv") == 4 * (not fused_blocks)


@pytest.mark.parametrize("threads, rows", [(1, 9), (2, 9), (3, 7), (4, 13)])
def test_bands_cover_every_output_row_once(threads, rows):
    """Row bands (one per core) with a partial last block: bands and blocks tile the output exactly."""
    clip = dict(has_bias=True, activation="clip", clip_min=0.0, clip_max=6.0)
    spec = InvertedResidualSpec.for_target(
        16, 8, dict(batch=1, in_channels=4, height=rows, width=17, out_channels=12, **clip),
        dict(batch=1, channels=12, height=rows, width=17, kernel=(3, 3), strides=(1, 1), padding=(1, 1, 1, 1), **clip),
        dict(batch=1, in_channels=12, height=rows, width=17, out_channels=5, has_bias=True, residual=False), threads)
    assert spec.band_rows % spec.depthwise.rows == 0 and spec.band_count * spec.band_rows >= rows
    assert (spec.band_count - 1) * spec.band_rows < rows
    with pytest.raises(ValueError, match="one group"):
        InvertedResidualSpec(spec.expansion, spec.depthwise, spec.projection, group_tiles=1)
