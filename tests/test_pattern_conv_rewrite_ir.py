"""IR-level tests of PatternConvRewrite, in the style of TVM's own pass tests.

Each test writes the module before the pass and the module it must become in TVMScript and
compares them with ``tvm.ir.assert_structural_equal``, so it states which Relax ops the rewrite
fuses into the pattern-conv call and which stay outside. The weight and bias are parameters of
``main`` bound to constants with ``BindParams`` (as TVM's FoldConstant tests do: an array has no
TVMScript spelling); in the expected module the kernel's arguments are bound the same way to the
weight's FKW packing (values, channels, offsets, inverse filter order) and the bias vector.

The kernel the pass adds is the operator's generated TE function, whose tap tables and layout
follow from the weight and the target and which ``test_pattern_op.py`` checks against
``onnx.reference``; spelt out here it would be a golden copy of generated code that every change of
the operator breaks. So the expected module declares the kernel by its signature alone (data,
packed weight, [bias], output), which is what the Relax call depends on, and the test puts in the
body the operator builds for the variant the rewrite must choose (bias and ReLU fused or not, the
(pixel x tap) kernel for 2x2 images): the comparison covers that choice too.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from tvm_patdnn.analysis import analyze_conv_weight
from tvm_patdnn.fkw import pack_fkw
from tvm_patdnn.kernel_patterns import candidate_patterns
from tvm_patdnn.ops.pattern_conv import PatternConvSpec, pattern_conv2d_primfunc
from tvm_patdnn.ops.pattern_conv_2x2 import arranged_rows, pattern_conv_2x2_primfunc
from tvm_patdnn.pruning.projection import project_pattern_and_connectivity
from tvm_patdnn.report import ConvRecord
from tvm_patdnn.transform import PatternConvRewrite
from tvm_patdnn.transform.exprs import OPAQUE

# 4 filters x 2 input channels projected onto two 4-tap patterns, 6 of the 8 kernels kept:
# FKW stores 6 kernels x 4 taps and one run per (filter, pattern), 4 x 2 + 1 offsets; its filter
# order is not its own inverse, so the tests tell which of the two a kernel gets.
RNG = np.random.default_rng(1)
WEIGHT = project_pattern_and_connectivity(RNG.standard_normal((4, 2, 3, 3)).astype(np.float32),
                                          candidate_patterns()[:2], rate=8 / 6)
DENSE_WEIGHT = RNG.standard_normal((4, 2, 3, 3)).astype(np.float32)
BIAS = RNG.standard_normal(4).astype(np.float32)
FKW = pack_fkw(WEIGHT, analyze_conv_weight(WEIGHT))
KERNEL = "pattern_conv2d_conv2d_0"  # the pass names the kernel after the conv (no ONNX name here: the index)


def bind(mod: tvm.IRModule, **params: np.ndarray) -> tvm.IRModule:
    """``mod`` with ``main``'s named parameters replaced by constants."""
    return relax.transform.BindParams("main", params)(mod)


def with_kernel(expected: tvm.IRModule, bias: np.ndarray | None = None, relu: bool = False,
                **constants: np.ndarray) -> tvm.IRModule:
    """``expected`` with the kernel's arguments bound to WEIGHT's FKW packing (and ``bias``),
    ``constants`` bound, and its declared kernel replaced by the pattern-conv operator of WEIGHT
    on the 1x2x6x6 input, padding 1, for an 8-lane, 8-accumulator target (the pass's arguments)."""
    packing = dict(values=FKW.values, channels=FKW.channels, offsets=FKW.offsets,
                   inverse_order=np.argsort(FKW.order).astype(np.int32))
    expected = bind(expected, **packing, **constants, **({} if bias is None else {"bias": bias}))
    spec = PatternConvSpec.from_fkw(FKW, (1, 2, 6, 6), (1, 1), (1, 1, 1, 1), bias is not None, relu, 8, 8)
    expected.update_func(expected.get_global_var(KERNEL), pattern_conv2d_primfunc(spec).with_attr("op_pattern", OPAQUE))
    return expected


def rewrite(mod: tvm.IRModule, lanes: int = 8) -> tuple[tvm.IRModule, list[ConvRecord]]:
    """The pass on ``mod`` for a target of ``lanes`` fp32 lanes and 8 accumulators, and the records
    it reported."""
    records: list[ConvRecord] = []
    return PatternConvRewrite(vector_width=lanes, accumulators=8, on_conv=records.append)(mod), records


# Expected modules shared by several tests: the kernel declared by its destination-passing signature.


@I.ir_module
class ConvKernel:
    @T.prim_func(private=True)
    def pattern_conv2d_conv2d_0(data: T.Buffer((1, 2, 6, 6), "float32"), values: T.Buffer((6, 4), "float32"),
                                channels: T.Buffer((6,), "int32"), offsets: T.Buffer((9,), "int32"),
                                inverse_order: T.Buffer((4,), "int32"), out: T.Buffer((1, 4, 6, 6), "float32")):
        T.evaluate(0)

    @R.function
    def main(x: R.Tensor((1, 2, 6, 6), "float32"), values: R.Tensor((6, 4), "float32"),
             channels: R.Tensor((6,), "int32"), offsets: R.Tensor((9,), "int32"),
             inverse_order: R.Tensor((4,), "int32")) -> R.Tensor((1, 4, 6, 6), "float32"):
        cls = ConvKernel
        with R.dataflow():
            gv = R.call_tir(cls.pattern_conv2d_conv2d_0, (x, values, channels, offsets, inverse_order),
                            out_ty=R.Tensor((1, 4, 6, 6), "float32"))
            R.output(gv)
        return gv


@I.ir_module
class BiasKernel:
    @T.prim_func(private=True)
    def pattern_conv2d_conv2d_0(data: T.Buffer((1, 2, 6, 6), "float32"), values: T.Buffer((6, 4), "float32"),
                                channels: T.Buffer((6,), "int32"), offsets: T.Buffer((9,), "int32"),
                                inverse_order: T.Buffer((4,), "int32"), bias: T.Buffer((4,), "float32"),
                                out: T.Buffer((1, 4, 6, 6), "float32")):
        T.evaluate(0)

    @R.function
    def main(x: R.Tensor((1, 2, 6, 6), "float32"), values: R.Tensor((6, 4), "float32"),
             channels: R.Tensor((6,), "int32"), offsets: R.Tensor((9,), "int32"),
             inverse_order: R.Tensor((4,), "int32"),
             bias: R.Tensor((4,), "float32")) -> R.Tensor((1, 4, 6, 6), "float32"):
        cls = BiasKernel
        with R.dataflow():
            gv = R.call_tir(cls.pattern_conv2d_conv2d_0, (x, values, channels, offsets, inverse_order, bias),
                            out_ty=R.Tensor((1, 4, 6, 6), "float32"))
            R.output(gv)
        return gv


# Before modules shared by several tests.


@I.ir_module
class ConvBiasRelu:
    @R.function
    def main(x: R.Tensor((1, 2, 6, 6), "float32"), w: R.Tensor((4, 2, 3, 3), "float32"),
             b: R.Tensor((1, 4, 1, 1), "float32")):
        with R.dataflow():
            conv = R.nn.conv2d(x, w, padding=(1, 1))
            biased = R.add(conv, b)
            gv = R.nn.relu(biased)
            R.output(gv)
        return gv


@I.ir_module
class ConvRelu:
    @R.function
    def main(x: R.Tensor((1, 2, 6, 6), "float32"), w: R.Tensor((4, 2, 3, 3), "float32")):
        with R.dataflow():
            conv = R.nn.conv2d(x, w, padding=(1, 1))
            gv = R.nn.relu(conv)
            R.output(gv)
        return gv


def test_the_fkw_packing_has_the_shapes_the_expected_modules_declare():
    assert (FKW.values.shape, FKW.channels.shape, FKW.offsets.shape, FKW.order.shape) == ((6, 4), (6,), (9,), (4,))
    assert not np.array_equal(FKW.order, np.argsort(FKW.order))


def test_a_pattern_sparse_conv_becomes_one_kernel_call():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 2, 6, 6), "float32"), w: R.Tensor((4, 2, 3, 3), "float32")):
            with R.dataflow():
                gv = R.nn.conv2d(x, w, padding=(1, 1))
                R.output(gv)
            return gv

    after, records = rewrite(bind(Before, w=WEIGHT))
    tvm.ir.assert_structural_equal(after, with_kernel(ConvKernel))
    assert [(r.name, r.kind, r.reason, r.fused) for r in records] == [("conv2d_0", "pattern", None, ())]
    assert (records[0].kept_kernels, records[0].total_kernels, records[0].n_patterns) == (6, 8, 2)


@pytest.mark.parametrize("bias, vector", [
    (BIAS.reshape(1, 4, 1, 1), BIAS),
    (BIAS.reshape(4, 1, 1), BIAS),
    (np.float32([0.5]), np.full(4, 0.5, np.float32)),  # a scalar: the same value for every channel
], ids=["1C11", "C11", "scalar"])
def test_a_per_channel_bias_added_after_the_conv_is_fused(bias, vector):
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 2, 6, 6), "float32"), w: R.Tensor((4, 2, 3, 3), "float32"),
                 b: R.Tensor(bias.shape, "float32")):
            with R.dataflow():
                conv = R.nn.conv2d(x, w, padding=(1, 1))
                gv = R.add(conv, b)
                R.output(gv)
            return gv

    after, records = rewrite(bind(Before, w=WEIGHT, b=bias))
    tvm.ir.assert_structural_equal(after, with_kernel(BiasKernel, vector))
    assert [r.fused for r in records] == [("bias",)]


def test_a_per_channel_bias_added_before_the_conv_is_fused():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 2, 6, 6), "float32"), w: R.Tensor((4, 2, 3, 3), "float32"),
                 b: R.Tensor((1, 4, 1, 1), "float32")):
            with R.dataflow():
                conv = R.nn.conv2d(x, w, padding=(1, 1))
                gv = R.add(b, conv)
                R.output(gv)
            return gv

    after, records = rewrite(bind(Before, w=WEIGHT, b=BIAS.reshape(1, 4, 1, 1)))
    tvm.ir.assert_structural_equal(after, with_kernel(BiasKernel, BIAS))
    assert [r.fused for r in records] == [("bias",)]


def test_relu_after_the_bias_is_fused_too():
    after, records = rewrite(bind(ConvBiasRelu, w=WEIGHT, b=BIAS.reshape(1, 4, 1, 1)))
    tvm.ir.assert_structural_equal(after, with_kernel(BiasKernel, BIAS, relu=True))
    assert [r.fused for r in records] == [("bias", "relu")]


def test_relu_without_a_bias_is_fused():
    after, records = rewrite(bind(ConvRelu, w=WEIGHT))
    tvm.ir.assert_structural_equal(after, with_kernel(ConvKernel, relu=True))
    assert [r.fused for r in records] == [("relu",)]


def test_a_value_other_ops_use_is_not_fused_into_the_relu():
    """The biased conv feeds the ReLU and the add after it: fusing the ReLU would leave a second
    kernel computing the biased conv for the add, so the bias is fused and the ReLU stays."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 2, 6, 6), "float32"), w: R.Tensor((4, 2, 3, 3), "float32"),
                 b: R.Tensor((1, 4, 1, 1), "float32")):
            with R.dataflow():
                conv = R.nn.conv2d(x, w, padding=(1, 1))
                biased = R.add(conv, b)
                activated = R.nn.relu(biased)
                gv = R.add(activated, biased)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @T.prim_func(private=True)
        def pattern_conv2d_conv2d_0(data: T.Buffer((1, 2, 6, 6), "float32"), values: T.Buffer((6, 4), "float32"),
                                    channels: T.Buffer((6,), "int32"), offsets: T.Buffer((9,), "int32"),
                                    inverse_order: T.Buffer((4,), "int32"), bias: T.Buffer((4,), "float32"),
                                    out: T.Buffer((1, 4, 6, 6), "float32")):
            T.evaluate(0)

        @R.function
        def main(x: R.Tensor((1, 2, 6, 6), "float32"), values: R.Tensor((6, 4), "float32"),
                 channels: R.Tensor((6,), "int32"), offsets: R.Tensor((9,), "int32"),
                 inverse_order: R.Tensor((4,), "int32"),
                 bias: R.Tensor((4,), "float32")) -> R.Tensor((1, 4, 6, 6), "float32"):
            cls = Expected
            with R.dataflow():
                biased = R.call_tir(cls.pattern_conv2d_conv2d_0, (x, values, channels, offsets, inverse_order, bias),
                                    out_ty=R.Tensor((1, 4, 6, 6), "float32"))
                activated = R.nn.relu(biased)
                gv = R.add(activated, biased)
                R.output(gv)
            return gv

    after, records = rewrite(bind(Before, w=WEIGHT, b=BIAS.reshape(1, 4, 1, 1)))
    tvm.ir.assert_structural_equal(after, with_kernel(Expected, BIAS))
    assert [r.fused for r in records] == [("bias",)]


@pytest.mark.parametrize("shape, constant", [((1, 4, 6, 6), True), ((6,), True), ((1, 4, 1, 1), False)],
                         ids=["full-tensor-constant", "per-column-constant", "per-channel-variable"])
def test_an_add_that_is_no_constant_bias_stays_a_relax_add_after_the_kernel(shape, constant):
    """Only a constant that broadcasts per output channel is a bias: with any other addend the
    conv is rewritten alone and the add (and the ReLU after it, which must see the sum) stay."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 2, 6, 6), "float32"), addend: R.Tensor(shape, "float32"),
                 w: R.Tensor((4, 2, 3, 3), "float32")):
            with R.dataflow():
                conv = R.nn.conv2d(x, w, padding=(1, 1))
                summed = R.add(conv, addend)
                gv = R.nn.relu(summed)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @T.prim_func(private=True)
        def pattern_conv2d_conv2d_0(data: T.Buffer((1, 2, 6, 6), "float32"), values: T.Buffer((6, 4), "float32"),
                                    channels: T.Buffer((6,), "int32"), offsets: T.Buffer((9,), "int32"),
                                    inverse_order: T.Buffer((4,), "int32"), out: T.Buffer((1, 4, 6, 6), "float32")):
            T.evaluate(0)

        @R.function
        def main(x: R.Tensor((1, 2, 6, 6), "float32"), addend: R.Tensor(shape, "float32"),
                 values: R.Tensor((6, 4), "float32"), channels: R.Tensor((6,), "int32"),
                 offsets: R.Tensor((9,), "int32"),
                 inverse_order: R.Tensor((4,), "int32")) -> R.Tensor((1, 4, 6, 6), "float32"):
            cls = Expected
            with R.dataflow():
                conv = R.call_tir(cls.pattern_conv2d_conv2d_0, (x, values, channels, offsets, inverse_order),
                                  out_ty=R.Tensor((1, 4, 6, 6), "float32"))
                summed = R.add(conv, addend)
                gv = R.nn.relu(summed)
                R.output(gv)
            return gv

    addend = {"addend": np.random.default_rng(2).standard_normal(shape).astype(np.float32)} if constant else {}
    after, records = rewrite(bind(Before, w=WEIGHT, **addend))
    tvm.ir.assert_structural_equal(after, with_kernel(Expected, **addend))
    assert [(r.kind, r.fused) for r in records] == [("pattern", ())]


def test_a_one_element_addend_of_higher_rank_stays_a_relax_add():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 2, 6, 6), "float32"), w: R.Tensor((4, 2, 3, 3), "float32"),
                 b: R.Tensor((1, 1, 1, 1, 1), "float32")):
            with R.dataflow():
                conv = R.nn.conv2d(x, w, padding=(1, 1))
                gv = R.add(conv, b)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @T.prim_func(private=True)
        def pattern_conv2d_conv2d_0(data: T.Buffer((1, 2, 6, 6), "float32"), values: T.Buffer((6, 4), "float32"),
                                    channels: T.Buffer((6,), "int32"), offsets: T.Buffer((9,), "int32"),
                                    inverse_order: T.Buffer((4,), "int32"), out: T.Buffer((1, 4, 6, 6), "float32")):
            T.evaluate(0)

        @R.function
        def main(x: R.Tensor((1, 2, 6, 6), "float32"), values: R.Tensor((6, 4), "float32"),
                 channels: R.Tensor((6,), "int32"), offsets: R.Tensor((9,), "int32"),
                 inverse_order: R.Tensor((4,), "int32"),
                 b: R.Tensor((1, 1, 1, 1, 1), "float32")) -> R.Tensor((1, 1, 4, 6, 6), "float32"):
            cls = Expected
            with R.dataflow():
                conv = R.call_tir(cls.pattern_conv2d_conv2d_0, (x, values, channels, offsets, inverse_order),
                                  out_ty=R.Tensor((1, 4, 6, 6), "float32"))
                gv = R.add(conv, b)
                R.output(gv)
            return gv

    b = np.full((1, 1, 1, 1, 1), 0.5, np.float32)
    after, _ = rewrite(bind(Before, w=WEIGHT, b=b))
    assert relax.analysis.check_well_formed(after)
    tvm.ir.assert_structural_equal(after, with_kernel(Expected, b=b))


def test_each_conv_is_decided_on_its_own_and_reported_in_program_order():
    """A pattern-sparse conv followed by a dense one: the first becomes the kernel (named after its
    place), the second stays a Relax conv2d on the kernel's output."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 2, 6, 6), "float32"), w: R.Tensor((4, 2, 3, 3), "float32"),
                 dense: R.Tensor((4, 4, 3, 3), "float32")):
            with R.dataflow():
                first = R.nn.conv2d(x, w, padding=(1, 1))
                gv = R.nn.conv2d(first, dense, padding=(1, 1))
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @T.prim_func(private=True)
        def pattern_conv2d_conv2d_0(data: T.Buffer((1, 2, 6, 6), "float32"), values: T.Buffer((6, 4), "float32"),
                                    channels: T.Buffer((6,), "int32"), offsets: T.Buffer((9,), "int32"),
                                    inverse_order: T.Buffer((4,), "int32"), out: T.Buffer((1, 4, 6, 6), "float32")):
            T.evaluate(0)

        @R.function
        def main(x: R.Tensor((1, 2, 6, 6), "float32"), values: R.Tensor((6, 4), "float32"),
                 channels: R.Tensor((6,), "int32"), offsets: R.Tensor((9,), "int32"),
                 inverse_order: R.Tensor((4,), "int32"),
                 dense: R.Tensor((4, 4, 3, 3), "float32")) -> R.Tensor((1, 4, 6, 6), "float32"):
            cls = Expected
            with R.dataflow():
                first = R.call_tir(cls.pattern_conv2d_conv2d_0, (x, values, channels, offsets, inverse_order),
                                   out_ty=R.Tensor((1, 4, 6, 6), "float32"))
                gv = R.nn.conv2d(first, dense, padding=(1, 1))
                R.output(gv)
            return gv

    dense = np.random.default_rng(3).standard_normal((4, 4, 3, 3)).astype(np.float32)
    after, records = rewrite(bind(Before, w=WEIGHT, dense=dense))
    tvm.ir.assert_structural_equal(after, with_kernel(Expected, dense=dense))
    assert [(r.name, r.kind) for r in records] == [("conv2d_0", "pattern"), ("conv2d_1", "dense")]


def test_a_dense_conv_is_left_exactly_as_it_was():
    before = bind(ConvBiasRelu, w=DENSE_WEIGHT, b=BIAS.reshape(1, 4, 1, 1))
    after, records = rewrite(before)
    tvm.ir.assert_structural_equal(after, before)
    assert [(r.kind, r.reason) for r in records] == [
        ("dense", "kernels have up to 9 nonzeros, more than the 4 of a pattern")]


def test_a_conv_whose_weight_is_not_a_constant_is_left_as_it_was():
    after, records = rewrite(ConvRelu)
    tvm.ir.assert_structural_equal(after, ConvRelu)
    assert [(r.kind, r.reason) for r in records] == [("dense", "weight is not a constant")]


@pytest.mark.parametrize("lanes", [16, 8])
def test_a_2x2_image_takes_the_tap_lane_kernel_in_stored_filter_order(lanes):
    """On AVX-512 and AVX2 a 2x2 image takes the (pixel x tap) kernel: it gets FKW's filter order
    rather than its inverse and, on AVX2, each kernel's row of the arranged input as its channel."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 2, 2, 2), "float32"), w: R.Tensor((4, 2, 3, 3), "float32"),
                 b: R.Tensor((1, 4, 1, 1), "float32")):
            with R.dataflow():
                conv = R.nn.conv2d(x, w, padding=(1, 1))
                biased = R.add(conv, b)
                gv = R.nn.relu(biased)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @T.prim_func(private=True)
        def pattern_conv2d_conv2d_0(data: T.Buffer((1, 2, 2, 2), "float32"), values: T.Buffer((6, 4), "float32"),
                                    channels: T.Buffer((6,), "int32"), offsets: T.Buffer((9,), "int32"),
                                    order: T.Buffer((4,), "int32"), bias: T.Buffer((4,), "float32"),
                                    out: T.Buffer((1, 4, 2, 2), "float32")):
            T.evaluate(0)

        @R.function
        def main(x: R.Tensor((1, 2, 2, 2), "float32"), values: R.Tensor((6, 4), "float32"),
                 channels: R.Tensor((6,), "int32"), offsets: R.Tensor((9,), "int32"),
                 order: R.Tensor((4,), "int32"), bias: R.Tensor((4,), "float32")) -> R.Tensor((1, 4, 2, 2), "float32"):
            cls = Expected
            with R.dataflow():
                gv = R.call_tir(cls.pattern_conv2d_conv2d_0, (x, values, channels, offsets, order, bias),
                                out_ty=R.Tensor((1, 4, 2, 2), "float32"))
                R.output(gv)
            return gv

    after, records = rewrite(bind(Before, w=WEIGHT, b=BIAS.reshape(1, 4, 1, 1)), lanes)
    channels = FKW.channels if lanes == 16 else arranged_rows(FKW.channels, FKW.offsets, len(FKW.patterns))
    expected = bind(Expected, values=FKW.values, channels=channels, offsets=FKW.offsets, order=FKW.order, bias=BIAS)
    spec = PatternConvSpec.from_fkw(FKW, (1, 2, 2, 2), (1, 1), (1, 1, 1, 1), True, True, lanes, 8)
    expected.update_func(expected.get_global_var(KERNEL),
                         pattern_conv_2x2_primfunc(spec, lanes).with_attr("op_pattern", OPAQUE))
    tvm.ir.assert_structural_equal(after, expected)
    assert [r.fused for r in records] == [("bias", "relu")]
