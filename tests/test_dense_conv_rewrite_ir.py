"""IR-level tests of DenseConvRewrite's fusion plan, in the style of ``test_pattern_conv_rewrite_ir.py``:
the module before the pass and the one it must become in TVMScript, compared with
``tvm.ir.assert_structural_equal``. The kernels are declared by their signature and replaced by the
GEMM the pass builds for the spec it must choose (``kernel="gemm"``: the fusion, not the kernel
rule, is under test); weights and biases are ``main``'s parameters bound to constants."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from tvm_patdnn.ops.dense_conv import DenseConvSpec, dense_conv_primfunc, pack_dense_conv_weight
from tvm_patdnn.transform import DenseConvRewrite
from tvm_patdnn.transform.exprs import OPAQUE

RNG = np.random.default_rng(3)
W0, W1 = (RNG.standard_normal((8, 8, 1, 1)).astype(np.float32) for _ in range(2))
B0, B1 = (RNG.standard_normal(8).astype(np.float32) for _ in range(2))
SHAPE = dict(batch=1, in_channels=8, height=9, width=9, out_channels=8, has_bias=True, activation="none",
             clip_min=0.0, clip_max=0.0)
PROJECTION = DenseConvSpec.for_target(16, 8, **SHAPE)  # AVX2's register tile: 6 filters x 2 vectors
RESIDUAL = DenseConvSpec.for_target(16, 8, **SHAPE, residual=True)
TILES = (2, 8, 6)  # [ceil(8 / 6)][8 channels][6 filters]


def bind(mod: tvm.IRModule, **params: np.ndarray) -> tvm.IRModule:
    return relax.transform.BindParams("main", params)(mod)


@I.ir_module
class TwoKernels:
    """Block 1's projection y, then block 2's projection with y added in its epilogue (the pass adds
    the kernels as it rewrites, the outputs' chains first)."""

    @T.prim_func(private=True)
    def dense_conv(data: T.Buffer((1, 8, 9, 9), "float32"), weight: T.Buffer(TILES, "float32"),
                   bias: T.Buffer((8,), "float32"), residual: T.Buffer((1, 8, 9, 9), "float32"),
                   out: T.Buffer((1, 8, 9, 9), "float32")):
        T.evaluate(0)

    @T.prim_func(private=True)
    def dense_conv1(data: T.Buffer((1, 8, 9, 9), "float32"), weight: T.Buffer(TILES, "float32"),
                    bias: T.Buffer((8,), "float32"), out: T.Buffer((1, 8, 9, 9), "float32")):
        T.evaluate(0)

    @R.function
    def main(x: R.Tensor((1, 8, 9, 9), "float32"), w0: R.Tensor(TILES, "float32"), b0: R.Tensor((8,), "float32"),
             w1: R.Tensor(TILES, "float32"), b1: R.Tensor((8,), "float32")) -> R.Tensor((1, 8, 9, 9), "float32"):
        cls = TwoKernels
        with R.dataflow():
            y = R.call_tir(cls.dense_conv1, (x, w0, b0), out_ty=R.Tensor((1, 8, 9, 9), "float32"))
            gv = R.call_tir(cls.dense_conv, (y, w1, b1, y), out_ty=R.Tensor((1, 8, 9, 9), "float32"))
            R.output(gv)
        return gv


def expected() -> tvm.IRModule:
    """TwoKernels with the GEMMs of PROJECTION and RESIDUAL and the weights in their filter tiles."""
    mod = bind(TwoKernels, w0=pack_dense_conv_weight(W0, PROJECTION.filter_tile), b0=B0,
               w1=pack_dense_conv_weight(W1, RESIDUAL.filter_tile), b1=B1)
    for name, spec in (("dense_conv", RESIDUAL), ("dense_conv1", PROJECTION)):
        mod.update_func(mod.get_global_var(name), dense_conv_primfunc(spec).with_attr("op_pattern", OPAQUE))
    return mod


def test_the_gemm_tiles_have_the_shapes_the_expected_module_declares():
    assert pack_dense_conv_weight(W0, PROJECTION.filter_tile).shape == TILES
    assert (PROJECTION.filter_tile, RESIDUAL.filter_tile) == (6, 6)


def two_projections(chain_with_other_users_first: bool) -> tvm.IRModule:
    """Block 1's projection ``y = conv(x) + b0``, read by block 2's projection ``p = conv(y) + b1`` and
    by the residual add ``y + p`` (or ``p + y``), as TVMScript prints it:
    ``c0 = R.nn.conv2d(x, w0); y = R.add(c0, b0); c1 = R.nn.conv2d(y, w1); p = R.add(c1, b1); gv = R.add(y, p)``."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 9, 9), "float32"))

    def projection(data, weight, bias):
        return bb.emit(relax.op.add(bb.emit(relax.op.nn.conv2d(data, relax.const(weight))),
                                    relax.const(bias.reshape(1, 8, 1, 1))))

    with bb.function("main", [x]):
        with bb.dataflow():
            y = projection(x, W0, B0)
            p = projection(y, W1, B1)
            gv = bb.emit_output(relax.op.add(y, p) if chain_with_other_users_first else relax.op.add(p, y))
        bb.emit_func_output(gv)
    return bb.get()


@pytest.mark.parametrize("chain_with_other_users_first", [True, False], ids=["first", "second"])
def test_a_residual_add_fuses_into_the_conv_chain_only_it_reads_whichever_operand_that_is(chain_with_other_users_first):
    """MobileNetV2's ``x + block(x)``, ``x`` the previous block's projection: that chain is read by the
    next block and by the add, so it cannot take the add in; the add's other operand, read only by
    the add, does, whether it comes first or second."""
    after = DenseConvRewrite(16, 8, kernel="gemm")(two_projections(chain_with_other_users_first))
    tvm.ir.assert_structural_equal(after, expected())
