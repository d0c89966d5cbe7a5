"""Relax pass: turn convs and matmuls whose reduction has a single term into broadcast multiplies.

A 1x1 conv of one input channel (groups 1) is ``out[n, f, y, x] = x[n, 0, y*s, x*s] * w[f]``, and a
matmul with an inner dimension of 1 an outer product: neither reduces anything. Left as
reductions they reach dlight's GPU ``Fallback`` rule, which in TVM 0.27 drops the unit-extent
reduction iterators but keeps the block's init, so a fused bias or residual add is inlined into
both and applied twice (``2 * bias + x * w``; relative error 0.89-0.93 on PoCL). As multiplies they
fuse with their epilogue into plain elementwise kernels. The pipeline runs this pass on GPU targets
(CPU targets take such convs on our dense kernels, which compute them right).
"""

from __future__ import annotations

import tvm
from tvm import IRModule, relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from .exprs import static_shape

__all__ = ["UnitReductionRewrite"]


def _conv_as_multiply(conv: relax.Call) -> relax.Expr | None:
    data, weight = conv.args
    attrs = conv.attrs
    shape, w_shape = static_shape(data), static_shape(weight)
    if (shape is None or w_shape is None or len(shape) != 4 or tuple(w_shape[1:]) != (1, 1, 1)
            or int(attrs.groups) != 1 or conv.ty.dtype != data.ty.dtype
            or (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW")
            or any(int(d) != 1 for d in attrs.dilation)):
        return None
    top, left, bottom, right = (int(p) for p in attrs.padding)
    if top or left or bottom or right:
        data = relax.op.nn.pad(data, [0, 0, 0, 0, top, bottom, left, right])
    strides = [int(s) for s in attrs.strides]
    if strides != [1, 1]:
        height, width = shape[2] + top + bottom, shape[3] + left + right
        data = relax.op.strided_slice(data, axes=[2, 3], begin=[0, 0], end=[height, width], strides=strides)
    return relax.op.multiply(data, relax.op.reshape(weight, (1, w_shape[0], 1, 1)))


def _matmul_as_multiply(matmul: relax.Call) -> relax.Expr | None:
    x_shape, w_shape = static_shape(matmul.args[0]), static_shape(matmul.args[1])
    if x_shape is None or w_shape is None or len(x_shape) < 2 or len(w_shape) < 2 or x_shape[-1] != 1:
        return None
    return relax.op.multiply(*matmul.args)  # (..., M, 1) x (..., 1, N) broadcasts to (..., M, N)


def _or_unchanged(rewrite):
    """A ``rewrite_call`` callback: ``rewrite(expr)``, or ``expr`` itself when that gives None."""

    def callback(expr: relax.Call, _matches) -> relax.Expr:
        new = rewrite(expr)
        return expr if new is None else new

    return callback


@tvm.transform.module_pass(opt_level=0, name="UnitReductionRewrite")
class UnitReductionRewrite:
    """Rewrite single-term conv2d/matmul reductions into multiplies (see the module docstring)."""

    def __init__(self) -> None:
        self.conv = is_op("relax.nn.conv2d")(wildcard(), wildcard())
        self.matmul = is_op("relax.matmul")(wildcard(), wildcard())

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        builder = relax.BlockBuilder(mod)
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, relax.Function) and not (func.attrs and func.attrs.get("Primitive", 0)):
                func = rewrite_call(self.conv, _or_unchanged(_conv_as_multiply), func)
                func = rewrite_call(self.matmul, _or_unchanged(_matmul_as_multiply), func)
                builder.update_func(gvar, func)
        return builder.get()
