"""The block-sparse 1x1 conv kernel for OpenCL (Adreno), built and run on PoCL: single convs with every
epilogue, stride and odd image against onnx.reference, its work-group sizes and vector loads, and a whole
pruned model compiled for ``adreno``."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from hypothesis import HealthCheck, given, settings
from model_factory import ConvSpec, build_cnn
from onnx import numpy_helper
from test_adreno import ADRENO_MAX_GROUP, ADRENO_WAVE, _definition  # skips this module without PoCL too
from test_compiler import RTOL
from test_direct_conv import conv_model
from test_sparse_pointwise import sparse_models

import tvm_patdnn
from tvm_patdnn.ops.sparse_pointwise import BLOCK, MAX_DENSITY, block_density
from tvm_patdnn.ops.sparse_pointwise_gpu import SparsePointwiseGPUSpec, sparse_pointwise_gpu_primfunc
from tvm_patdnn.phone.opencl_check import check_opencl
from tvm_patdnn.pipeline import pattern_passes
from tvm_patdnn.targets import gpu_threads, resolve_target
from tvm_patdnn.transform import SparsePointwiseRewrite

SPARSE = "sparse_pointwise_conv"


def sparse_conv_model(shape, out_c: int, strides=(1, 1), keep: float = 0.25, seed: int = 0,
                      **epilogue) -> onnx.ModelProto:
    """:func:`conv_model` (1x1) with its weight cut to a random ``keep`` share of (4, 1) blocks."""
    model = conv_model(shape, out_c, (1, 1), strides, seed=seed, **epilogue)
    weight = next(init for init in model.graph.initializer if init.name == "w")
    values = numpy_helper.to_array(weight).copy()
    kept = np.random.default_rng(seed + 1).random((-(-out_c // BLOCK), shape[1])) < keep
    values *= np.repeat(kept, BLOCK, axis=0)[:out_c, :, None, None]
    weight.CopyFrom(numpy_helper.from_array(values, "w"))
    return model


def sparse_layers(model: onnx.ModelProto) -> int:
    """The model's 1x1 convs sparse enough for the sparse kernel (the pass's rule)."""
    return sum(block_density(numpy_helper.to_array(init), BLOCK) <= MAX_DENSITY for init in model.graph.initializer
               if init.name.endswith(".weight") and len(init.dims) == 4 and init.dims[2:] == [1, 1])


def sparse_launches(result) -> list:
    return [launch for launch in result.launches if launch.primfunc.startswith(SPARSE)]


def check(model: onnx.ModelProto, sparse_layers: int = 1):
    result = check_opencl(model, "adreno", rtol=RTOL)
    assert result.ok, result.summary()
    launches = sparse_launches(result)
    assert len(launches) == sparse_layers  # one launch per sparse layer: the whole chain in one kernel
    for launch in launches:
        items = int(np.prod(launch.local_size))
        assert items % ADRENO_WAVE == 0 and items <= ADRENO_MAX_GROUP
    return result


@pytest.mark.parametrize("shape,out_c,strides,epilogue", [
    ((1, 13, 7, 7), 22, (1, 1), {"bias": True, "activation": "relu"}),  # 49 pixels, 13 channels, 22 filters
    ((2, 9, 5, 3), 9, (1, 1), {"bias": True, "activation": "clip", "residual": True}),  # batch 2, 15 pixels
    ((1, 16, 8, 8), 16, (1, 1), {"bias": False, "residual": True}),  # 64 pixels: the residual read as float4s
    ((2, 12, 9, 9), 17, (2, 2), {"bias": True, "activation": "relu"}),  # stride 2, 5x5 out
    ((1, 6, 7, 5), 8, (2, 1), {"bias": True, "activation": "clip"}),  # rows and columns strided differently
    ((1, 10, 1, 3), 12, (1, 1), {"bias": True, "activation": "relu"}),  # 3 pixels: scalar items
])
def test_sparse_pointwise_matches_reference_on_pocl(shape, out_c: int, strides, epilogue: dict) -> None:
    check(sparse_conv_model(shape, out_c, strides, **epilogue))


def test_two_float4_per_item_match_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """``vectors=2`` (the other item size worth measuring on a phone): 8 pixels per item, the
    overlapping last item of 7x7 and 5x3 images included."""
    make = SparsePointwiseGPUSpec.for_target.__func__
    monkeypatch.setattr(SparsePointwiseGPUSpec, "for_target",
                        classmethod(lambda cls, *args, **shape: make(cls, *args, vectors=2, **shape)))
    check(sparse_conv_model((2, 13, 7, 7), 22, bias=True, activation="relu"))
    check(sparse_conv_model((1, 9, 5, 3), 9, bias=True, activation="clip", residual=True))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(sparse_models())
def test_random_sparse_pointwise_chains_match_reference_on_pocl(case) -> None:
    """The CPU kernel's random chains (1-24 channels, 1x1 to 11x11 images, strides 1-2, bias/ReLU/residual,
    batch 1-2) on the GPU kernel."""
    model, _ = case
    check(model, sparse_layers(model))


def gemm_k1_model() -> onnx.ModelProto:
    """Gemm of a (3, 1) input with a (1, 5) weight and a bias: a matmul whose reduction has one term."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.standard_normal((1, 5)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b")]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gemm", ["x", "w", "b"], ["y"])], "gemm_k1",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 5])], inits)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


@pytest.mark.parametrize("model", [
    conv_model((1, 1, 4, 4), 1, (1, 1), bias=False, residual=True),
    conv_model((2, 1, 5, 6), 8, (1, 1), strides=(2, 2), pads=(1, 0, 1, 2), activation="relu"),
    gemm_k1_model(),
], ids=["1x1-one-channel-residual", "1x1-one-channel-strided-padded", "gemm-k1"])
def test_reductions_of_length_one_on_the_gpu(model: onnx.ModelProto) -> None:
    """Found by the random chains above: a dense 1x1 conv of one input channel or a Gemm with K=1, left to
    TVM 0.27's dlight GPU Fallback, computed ``epilogue(epilogue(0) + x * w)`` (e.g. ``2 * bias + x * w``:
    it drops the unit reduction iterators but keeps the block's init). ``UnitReductionRewrite`` makes them
    broadcast multiplies first."""
    result = check_opencl(model, "adreno", rtol=RTOL)
    assert result.ok, result.summary()


def test_filter_blocks_without_kept_blocks_are_bias_only() -> None:
    """Keep 1 in 20: most filter blocks have an empty channel list (their outputs are the epilogue of zero)."""
    model = sparse_conv_model((1, 8, 6, 6), 40, keep=0.05, seed=3, bias=True, activation="relu")
    assert block_density(numpy_helper.to_array(model.graph.initializer[0]), BLOCK) < 0.1
    check(model)


def test_work_items_and_vector_loads_follow_the_image() -> None:
    adreno = resolve_target("adreno")
    assert gpu_threads(adreno) == (ADRENO_WAVE, ADRENO_MAX_GROUP)
    shape = {"in_channels": 64, "out_channels": 256, "has_bias": True, "activation": "relu"}

    def spec(height: int, width: int, strides=(1, 1), batch: int = 1) -> SparsePointwiseGPUSpec:
        return SparsePointwiseGPUSpec.for_target(*gpu_threads(adreno), BLOCK, 100, batch=batch, height=height,
                                                 width=width, strides=strides, **shape)

    big = spec(56, 56)  # 4 filters x 1 float4 per item, 784 items per filter block
    assert (big.block, big.conv.vectors, big.conv.lanes, big.items) == (4, 1, 4, 64 * 784)
    assert big.group % ADRENO_WAVE == 0 and big.group <= ADRENO_MAX_GROUP
    assert spec(1, 3).conv.lanes == 1 and spec(1, 3).items == 64 * 3  # smaller than a float4: scalar items
    assert spec(7, 7, batch=2).items == 2 * 64 * 13

    def source(s: SparsePointwiseGPUSpec) -> str:
        func = sparse_pointwise_gpu_primfunc(s).with_attr("global_symbol", "main")
        return tvm.tirx.build(tvm.IRModule({"main": func}), target=adreno).imports[0].inspect_source()

    # weights: the kept block's 4 values as one float4; input: one float4 at stride 1 whatever the
    # alignment (56x56 and 7x7), gathered at stride 2; output: one float4 store per filter
    for s in (spec(56, 56), spec(7, 7), spec(14, 14, strides=(2, 2))):
        code = source(s)
        assert "vload4(0, values_ptr" in code and code.count("vstore4(max(") == BLOCK  # ReLU'd stores
        loads = code.count("vload4(0, ((__global float *)")
        assert (loads, ".s3]" in code) == ((1, False) if s.conv.strides == (1, 1) else (0, True))


def test_rewrite_chooses_the_kernel_by_target() -> None:
    """The same model: OpenCL gets the thread-bound GPU kernel (one channel block), CPUs the parallel
    loop nest; dense 1x1 convs stay legalized conv2d on the GPU."""
    model = build_cnn(np.random.default_rng(1), (1, 8, 6, 6),
                      [ConvSpec(24, kind="1x1", connectivity=4.0), ConvSpec(24, kind="1x1")])
    from tvm_patdnn.frontend import import_onnx

    mod = tvm.relax.transform.FoldConstant()(import_onnx(model).mod)
    gpu = SparsePointwiseRewrite(gpu=gpu_threads(resolve_target("adreno")))(mod)
    cpu = SparsePointwiseRewrite()(mod)
    kernels = {name: [f for gv, f in m.functions_items() if gv.name_hint.startswith(SPARSE)]
               for name, m in (("gpu", gpu), ("cpu", cpu))}
    assert len(kernels["gpu"]) == len(kernels["cpu"]) == 1
    assert "threadIdx.x" in kernels["gpu"][0].script() and "threadIdx.x" not in kernels["cpu"][0].script()
    assert "T.parallel" in kernels["cpu"][0].script()
    names = [p.info.name for p in pattern_passes(resolve_target("adreno"))]
    assert "SparsePointwiseRewrite" in names and "DenseConvRewrite" not in names


def test_pruned_model_on_adreno_runs_sparse_pointwise_layers() -> None:
    """Pattern 3x3 convs, (4, 1) block-sparse 1x1s (bias + ReLU, residual, strided, linear), a dense 1x1
    and a 1x1 too dense to pay: the sparse ones, and only those, run the sparse kernel, and the report
    says so."""
    convs = [
        ConvSpec(16, connectivity=2.0),  # pattern 3x3
        ConvSpec(32, kind="1x1", connectivity=4.0),  # sparse, bias + ReLU
        ConvSpec(32, kind="1x1", connectivity=4.0, residual=True, bias=False),  # sparse + residual
        ConvSpec(40, kind="1x1", connectivity=4.0, stride=2, relu=False),  # sparse, strided, no activation
        ConvSpec(24, kind="1x1"),  # dense 1x1: legalized conv2d on the GPU rules
        ConvSpec(24, kind="1x1", connectivity=1.2),  # ~83% of blocks kept: stays dense
        ConvSpec(20, kind="1x1", connectivity=4.0),  # sparse
    ]
    model = build_cnn(np.random.default_rng(11), (2, 6, 11, 11), convs, head=True)
    assert sparse_layers(model) == 4
    result = check(model, sparse_layers=4)
    kinds = [record.kind for record in tvm_patdnn.compile(model, "adreno").report]
    assert kinds == ["pattern", "sparse", "sparse", "sparse", "dense", "dense", "sparse"]
    assert not any(launch.primfunc.startswith(("dense_conv", "direct_conv")) for launch in result.launches)
    sources = [s for name, s in result.sources.items() if name.startswith(SPARSE)]
    assert len(sources) == 4 and all("vload4(0, values_ptr" in s for s in sources)
    assert all("channels_ptr" in _definition(name, s) for name, s in result.sources.items() if name.startswith(SPARSE))
