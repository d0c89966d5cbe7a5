"""What every rewrite of this package reads off the Relax expressions it matched (static shapes,
constant arrays and scalars, a per-channel bias), and how it adds its kernel to the module: one
home, so the rewrites agree on what a bias is and none imports another's private helpers."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx

__all__ = [
    "OPAQUE", "add_kernel", "constant_array", "float_value", "nchw_conv_shapes", "per_channel_bias",
    "single_use_values", "static_shape",
]

OPAQUE = 8  # relax OpPatternKind.kOpaque: FuseOps must not merge (and re-schedule) our op


def static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    """The tensor's shape when every dimension is a known integer, else None."""
    shape = getattr(expr.ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    try:
        return tuple(int(d) for d in shape.values)
    except (TypeError, ValueError):
        return None


def nchw_conv_shapes(conv: relax.Call, weight: relax.Expr) -> tuple[tuple[int, ...], ...] | None:
    """(data, weight, output) shapes of a float32 NCHW / OIHW conv2d with a constant weight and no
    dilation, all static and 4-D, which is what our dense-path kernels take; else None."""
    attrs = conv.attrs
    shapes = static_shape(conv.args[0]), static_shape(weight), static_shape(conv)
    if not all(s is not None and len(s) == 4 for s in shapes):
        return None
    if not (isinstance(weight, tvm.ir.GenericConst)
            and conv.ty.dtype == "float32"
            and conv.args[0].ty.dtype == "float32"
            and str(weight.ty.dtype) == "float32"
            and (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) == ("NCHW", "OIHW", "NCHW")
            and all(int(d) == 1 for d in attrs.dilation)):
        return None
    return shapes


def constant_array(expr: relax.Expr) -> np.ndarray:
    """A constant's value as numpy."""
    return expr.value.numpy()


def float_value(expr: relax.Expr) -> float | None:
    """A scalar (a constant, or a PrimValue such as a clip bound) as a float; None when it is not one."""
    value = getattr(expr, "value", None)
    try:
        return float(getattr(value, "value", value))
    except (TypeError, ValueError):
        return None


def per_channel_bias(bias: relax.Expr, channels: int) -> np.ndarray | None:
    """The bias as a (channels,) vector when the constant broadcasts per output channel and leaves
    the conv's NCHW shape as it is (a one-element constant of rank 5 would make the sum 5-D)."""
    if not isinstance(bias, tvm.ir.GenericConst):
        return None
    value = constant_array(bias)
    if value.dtype != np.float32:
        return None
    if value.size == channels and value.shape in {(1, channels, 1, 1), (channels, 1, 1)}:
        return value.reshape(channels)
    if value.size == 1 and value.ndim <= 4:
        return np.full(channels, value.reshape(()), dtype=np.float32)
    return None


def single_use_values(func: relax.Function) -> set[relax.Expr]:
    """The bound values of ``func`` whose variable is used exactly once: a rewrite may fuse such a
    value into the op that uses it; fusing one with other users would compute it twice."""
    uses: dict[relax.Var, int] = {}

    def count(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Var):
            uses[expr] = uses.get(expr, 0) + 1

    relax.analysis.post_order_visit(func.body, count)
    bindings = [b for block in getattr(func.body, "blocks", []) for b in block.bindings]
    return {b.value for b in bindings if uses.get(b.var, 0) == 1}


def add_kernel(builder: relax.BlockBuilder, func: tirx.PrimFunc, name: str) -> relax.GlobalVar:
    """Add one of our (scheduled or rule-scheduled) kernels, marked opaque so that FuseOps leaves it whole."""
    return builder.add_func(func.with_attr("op_pattern", OPAQUE), name)
