"""Relax pass: rewrite depthwise conv2d (+ per-channel bias)(+ ReLU / clip, which is also ReLU6)
into the depthwise kernel of :mod:`tvm_patdnn.ops.depthwise_conv`.

Matches the chains :class:`~tvm_patdnn.transform.dense_conv_rewrite.DenseConvRewriter` matches
(it is a subclass: same largest-chain-with-single-use-inner-values plan), but takes the convs
that one leaves alone: ``groups == in channels == out channels`` (one KxK filter per channel),
dilation 1, constant float32 weights, static NCHW shapes. A residual add is not fused (the
smaller chain without it is taken). Depthwise convs with a channel multiplier and dilated ones
stay on the legalized conv2d and the ``DenseConv2dCPU`` rule.
"""

from __future__ import annotations

import tvm
from tvm import relax

from ..ops.depthwise_conv import DepthwiseConvSpec, depthwise_conv_primfunc
from .dense_conv_rewrite import DenseConvRewriter, _float_value
from .pattern_conv_rewrite import OPAQUE, _per_channel_bias, _static_shape

__all__ = ["DepthwiseConvRewrite", "DepthwiseConvRewriter"]


def _is_depthwise_conv(conv: relax.Call, weight: relax.Expr) -> bool:
    attrs = conv.attrs
    shapes = _static_shape(conv.args[0]), _static_shape(weight), _static_shape(conv)
    if not all(s is not None and len(s) == 4 for s in shapes):
        return False
    channels = shapes[0][1]
    return (
        isinstance(weight, tvm.ir.GenericConst)
        and conv.ty.dtype == "float32"
        and conv.args[0].ty.dtype == "float32"
        and str(weight.ty.dtype) == "float32"
        and (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) == ("NCHW", "OIHW", "NCHW")
        and int(attrs.groups) == channels == shapes[2][1] == shapes[1][0]
        and shapes[1][1] == 1
        and all(int(d) == 1 for d in attrs.dilation)
    )


class DepthwiseConvRewriter(DenseConvRewriter):
    """Rewrite depthwise conv2d chains into depthwise-conv ``call_tir``s (the pass is
    :data:`DepthwiseConvRewrite`); ``registers`` and ``lanes`` size the register tile
    (:meth:`DepthwiseConvSpec.for_target`)."""

    def __init__(self, registers: int = 16, lanes: int = 8):
        super().__init__(registers, lanes)

    def _fusion(self, expr: relax.Call, matches) -> tuple | None:
        """(conv, spec, bias) of a match the kernel can take, else None."""
        conv, weight = matches[self.conv], matches[self.weight]
        if self.added in matches or not _is_depthwise_conv(conv, weight):
            return None
        n, c, h, w = _static_shape(conv.args[0])
        bias = None
        if self.bias in matches:
            bias = _per_channel_bias(matches[self.bias], c)
            if bias is None:
                return None  # not a per-channel bias: a smaller match takes the conv
        activation = ("none", 0.0, 0.0)
        if self.relu in matches:
            activation = ("relu", 0.0, 0.0)
        elif self.clip in matches:
            bounds = _float_value(expr.args[1]), _float_value(expr.args[2])
            if None in bounds:
                return None
            activation = ("clip", *bounds)
        spec = DepthwiseConvSpec.for_target(
            self.registers, self.lanes, batch=n, channels=c, height=h, width=w, kernel=_static_shape(weight)[2:],
            strides=tuple(int(s) for s in conv.attrs.strides), padding=tuple(int(p) for p in conv.attrs.padding),
            has_bias=bias is not None, activation=activation[0], clip_min=activation[1], clip_max=activation[2],
        )
        return conv, spec, bias

    def _rewrite(self, expr: relax.Expr, matches) -> relax.Expr:
        if expr not in self._fusions:
            return expr
        conv, spec, bias = self._fusions[expr]
        if spec not in self._kernels:
            func = depthwise_conv_primfunc(spec).with_attr("op_pattern", OPAQUE)
            self._kernels[spec] = self._builder.add_func(func, "depthwise_conv")
        args = [conv.args[0], conv.args[1]] + ([relax.const(bias)] if bias is not None else [])
        return relax.call_tir(self._kernels[spec], args, relax.TensorType(_static_shape(conv), "float32"))


DepthwiseConvRewrite = tvm.transform.module_pass(DepthwiseConvRewriter, opt_level=0, name="DepthwiseConvRewrite")
