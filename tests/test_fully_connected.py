"""The fully connected kernel: Gemm / MatMul heads against onnx.reference, the fused chain, the
tile choice, AVX-512 and NEON code generation."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from test_compiler import check_against_reference
from test_depthwise_conv import kernel_calls

from tvm_patdnn.ops.fully_connected import FULLY_CONNECTED_ATTR, FullyConnectedSpec, fully_connected_primfunc
from tvm_patdnn.targets import resolve_target


def fc_model(rng, rows: int, features: list[int], op: str = "Gemm", trans_b: int = 1, bias: bool = True,
             activation: str = "relu") -> onnx.ModelProto:
    """A chain of FC layers ``features[0] -> features[1] -> ...``, each Gemm (weight transposed or
    not) or MatMul (+ Add bias), then ReLU / Clip(-0.5, 0.5) / nothing."""
    nodes, inits, current = [], [], "x"
    for index, (k, n) in enumerate(zip(features, features[1:])):
        name = f"fc{index}"
        weight = (rng.standard_normal((n, k) if op == "Gemm" and trans_b else (k, n)) / np.sqrt(k)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"{name}.w"))
        inputs = [current, f"{name}.w"]
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"{name}.b"))
        if op == "Gemm":
            nodes.append(helper.make_node("Gemm", inputs + ([f"{name}.b"] if bias else []), [f"{name}.y"], transB=trans_b))
        else:
            nodes.append(helper.make_node("MatMul", inputs, [f"{name}.mm" if bias else f"{name}.y"]))
            if bias:
                nodes.append(helper.make_node("Add", [f"{name}.mm", f"{name}.b"], [f"{name}.y"]))
        current = f"{name}.y"
        if activation == "relu":
            nodes.append(helper.make_node("Relu", [current], [f"{name}.act"]))
            current = f"{name}.act"
        elif activation == "clip":
            inits += [numpy_helper.from_array(np.array(v, np.float32), f"{name}.{t}") for t, v in (("lo", -0.5), ("hi", 0.5))]
            nodes.append(helper.make_node("Clip", [current, f"{name}.lo", f"{name}.hi"], [f"{name}.act"]))
            current = f"{name}.act"
    graph = helper.make_graph(nodes, "fc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, features[0]])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, [rows, features[-1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@st.composite
def fc_models(draw):
    """Batches 1-5 (more rows than a row tile), features no vector divides and fewer than a
    vector, Gemm with and without transB, MatMul + Add, bias or not, each activation."""
    seed = draw(st.integers(0, 2**31))
    features = [draw(st.integers(1, 300)) for _ in range(draw(st.integers(2, 3)))]
    op = draw(st.sampled_from(["Gemm", "MatMul"]))
    model = fc_model(np.random.default_rng(seed), draw(st.integers(1, 5)), features, op, draw(st.sampled_from([0, 1])),
                     draw(st.booleans()), draw(st.sampled_from(["relu", "clip", "none"])))
    return model, seed, len(features) - 1


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fc_models())
def test_random_fc_chains_match_reference_on_the_fc_kernel(case):
    model, seed, layers = case
    compiled = check_against_reference(model, seed)
    assert kernel_calls(compiled, "fully_connected") == layers
    assert kernel_calls(compiled, "fused") == 0  # bias and activation inside the kernel


def test_classifier_heads_of_the_benchmark_models():
    """ResNet-50 (2048 -> 1000) and a VGG-like two-layer head, batch 2."""
    rng = np.random.default_rng(3)
    assert kernel_calls(check_against_reference(fc_model(rng, 1, [2048, 1000], activation="none"), 3), "fully_connected") == 1
    assert kernel_calls(check_against_reference(fc_model(rng, 2, [1024, 512, 10]), 3), "fully_connected") == 2


def test_register_tile_follows_the_target():
    assert FullyConnectedSpec.for_target(16, 8, rows=1, in_features=64, out_features=1000).block == 64
    batch = FullyConnectedSpec.for_target(16, 8, rows=4, in_features=64, out_features=1000)
    assert (batch.block, batch.row_tile) == (32, 2)
    assert FullyConnectedSpec.for_target(32, 16, rows=8, in_features=64, out_features=1000).row_tile == 6
    narrow = FullyConnectedSpec.for_target(16, 8, rows=1, in_features=64, out_features=5)
    assert (narrow.lanes, narrow.vectors, narrow.blocks) == (5, 1, 1)
    with pytest.raises(ValueError, match="activation"):
        FullyConnectedSpec(1, 8, 8, activation="gelu")


@pytest.mark.parametrize("target, lanes, pattern", [
    ('{"kind":"llvm","mcpu":"skylake-avx512"}', 16, r"vfmadd\w+\s+[^\n]*zmm"),
    ("arm_cpu-linux", 4, r"fmla\s+v\d+\.4s"),
])
def test_kernel_generates_wide_fmas(target, lanes, pattern):
    """Code generation only (this host may not run it)."""
    import tvm

    spec = FullyConnectedSpec.for_target(32, lanes, rows=1, in_features=256, out_features=1000, has_bias=True)
    func = fully_connected_primfunc(spec).with_attr("global_symbol", "fc")
    assert FULLY_CONNECTED_ATTR in func.attrs
    asm = tvm.tirx.build(tvm.IRModule({"fc": func}), resolve_target(target)).inspect_source("asm")
    assert len(re.findall(pattern, asm)) >= spec.vectors
    assert "gather" not in asm


def test_a_one_element_addend_of_higher_rank_stays_a_relax_add_after_the_kernel():
    """A (1, 1, 1) constant added to a (1, 4) matmul broadcasts the sum to 3-D: it is no bias of the
    2-D kernel, which then takes the matmul alone (fusing it bound a 2-D call to a 3-D variable)."""
    import tvm
    from tvm import relax
    from tvm.script import ir as I
    from tvm.script import relax as R

    from tvm_patdnn.transform import FullyConnectedRewrite

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 8), "float32"), w: R.Tensor((8, 4), "float32"), b: R.Tensor((1, 1, 1), "float32")):
            with R.dataflow():
                y = R.matmul(x, w)
                gv = R.add(y, b)
                R.output(gv)
            return gv

    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((8, 4)).astype(np.float32), "b": np.ones((1, 1, 1), np.float32)}
    after = FullyConnectedRewrite(16, 8)(relax.transform.BindParams("main", params)(Before))
    relax.analysis.well_formed(after)  # raises on ill-formed IR (returns None in TVM 0.27)
    kernel, add = after["main"].body.blocks[0].bindings
    assert kernel.value.op.same_as(tvm.ir.Op.get("relax.call_tir")) and kernel.value.args[0].name_hint == "fully_connected"
    assert add.value.op.same_as(tvm.ir.Op.get("relax.add")) and tuple(add.var.ty.shape) == (1, 1, 4)
