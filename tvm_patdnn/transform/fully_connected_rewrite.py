"""Relax pass: rewrite fully connected layers, ``matmul(x, W)`` (+ bias)(+ ReLU / clip) with a
constant 2-D ``W`` (ONNX ``Gemm`` with ``transB=1`` once FoldConstant has folded the transpose,
or ``MatMul``), into the kernel of :mod:`tvm_patdnn.ops.fully_connected`, weights packed for it
at compile time.

A subclass of :class:`~tvm_patdnn.transform.dense_conv_rewrite.DenseConvRewriter` with the conv
replaced by the matmul in its chain pattern, so it fuses the same way (the largest chain whose
inner values nothing else uses). Matmuls with a non-constant right operand, batched (3-D+)
inputs or a residual add stay on the legalized matmul and the ``MatmulCPU`` rule.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..ops.fully_connected import FullyConnectedSpec, fully_connected_primfunc, pack_fully_connected_weight
from .dense_conv_rewrite import DenseConvRewriter
from .exprs import add_kernel, constant_array, static_shape

__all__ = ["FullyConnectedRewrite", "FullyConnectedRewriter"]


def _feature_bias(bias: relax.Expr, features: int) -> np.ndarray | None:
    """The bias as a (features,) vector when the constant broadcasts along the output features and
    leaves the (rows, features) shape as it is (a one-element constant of rank 3 would make the sum 3-D)."""
    value = constant_array(bias)
    if value.dtype != np.float32:
        return None
    if value.shape in {(features,), (1, features)}:
        return value.reshape(features)
    if value.size == 1 and value.ndim <= 2:
        return np.full(features, value.reshape(()), dtype=np.float32)
    return None


class FullyConnectedRewriter(DenseConvRewriter):
    """Rewrite FC chains into fully-connected ``call_tir``s (the pass is :data:`FullyConnectedRewrite`);
    ``registers`` and ``lanes`` size the register tile (:meth:`FullyConnectedSpec.for_target`)."""

    def __init__(self, registers: int = 16, lanes: int = 8):
        super().__init__(registers, lanes)
        self._chain("relax.matmul")  # the parent's chain with relax.matmul where its conv2d is

    def _fusion(self, expr: relax.Call, matches) -> tuple | None:
        """(matmul, spec, bias) of a match the kernel can take, else None."""
        matmul, weight = matches[self.conv], matches[self.weight]
        x_shape, w_shape = static_shape(matmul.args[0]), static_shape(weight)
        if (self.added in matches or x_shape is None or w_shape is None or len(x_shape) != 2 or len(w_shape) != 2
                or matmul.ty.dtype != "float32" or matmul.args[0].ty.dtype != "float32"
                or str(weight.ty.dtype) != "float32"):
            return None
        bias = None
        if self.bias in matches:
            bias = _feature_bias(matches[self.bias], w_shape[1])
            if bias is None:
                return None  # not a per-feature bias: a smaller match takes the matmul
        activation = self._activation(expr, matches)
        if activation is None:
            return None
        spec = FullyConnectedSpec.for_target(
            self.registers, self.lanes, rows=x_shape[0], in_features=x_shape[1], out_features=w_shape[1],
            has_bias=bias is not None, **activation,
        )
        return matmul, spec, bias

    def _rewrite(self, expr: relax.Expr, matches) -> relax.Expr:
        if expr not in self._fusions:
            return expr
        matmul, spec, bias = self._fusions[expr]
        if spec not in self._kernels:
            self._kernels[spec] = add_kernel(self._builder, fully_connected_primfunc(spec), "fully_connected")
        packed = relax.const(pack_fully_connected_weight(constant_array(matmul.args[1]), spec))
        args = [matmul.args[0], packed] + ([relax.const(bias)] if bias is not None else [])
        return relax.call_tir(self._kernels[spec], args, relax.TensorType(static_shape(matmul), "float32"))


FullyConnectedRewrite = tvm.transform.module_pass(FullyConnectedRewriter, opt_level=0, name="FullyConnectedRewrite")
