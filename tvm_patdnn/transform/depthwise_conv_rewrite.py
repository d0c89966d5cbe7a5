"""Relax pass: rewrite depthwise conv2d (+ per-channel bias)(+ ReLU / clip, which is also ReLU6)
into the depthwise kernel of :mod:`tvm_patdnn.ops.depthwise_conv`.

Matches the chains :class:`~tvm_patdnn.transform.dense_conv_rewrite.DenseConvRewriter` matches
(it is a subclass: same largest-chain-with-single-use-inner-values plan), but takes the convs
that one leaves alone: ``groups == in channels == out channels`` (one KxK filter per channel),
dilation 1, constant float32 weights, static NCHW shapes. A residual add is not fused (the
smaller chain without it is taken). Depthwise convs with a channel multiplier and dilated ones
stay on the legalized conv2d and the ``DenseConv2dCPU`` rule.

The same pass rewrites NCHW ``max_pool2d`` (dilation 1, no ceil mode) into the kernel's max
variant: the legalized pool with the ``DenseConv2dCPU`` rule ran ResNet-50's 3x3 stride-2 pool
at 0.6x ONNX Runtime (its rows of 56 outputs make 7-lane vectors and every padded tap tested).

On AVX-512 (16 lanes), stride-1 depthwise convs whose output rows are narrower than
``FLAT_WIDTH`` (MobileNetV2's 7x7 layers) run the kernel's flat tile (``DepthwiseConvSpec.flat``:
vectors along the flattened padded plane instead of 7-lane row vectors): Zen 5, 1 thread, kernel
alone, interleaved: 960, 576 and 384 channels at 7x7 1.29-1.33x (960: 35 -> 27 µs). Stride-2 ones
whose output rows are narrower than ``FLAT_STRIDED_WIDTH`` do too, on the plane split into 2 x 2
phase planes (``DepthwiseConvSpec.flat_offset``: every tap is a constant offset again) instead of
7- or 14-lane row vectors: Zen 5, 1 thread, per-call minima in the dense MobileNetV2, two interleaved
runs: 576@14x14 -> 7x7 0.028-0.029 -> 0.022-0.023 ms (1.25-1.34x; ORT 0.014), 192@28x28 -> 14x14
0.025-0.027 -> 0.020-0.022 ms (1.21-1.23x; ORT 0.015); whole model within noise (1.001x, 1.023x).

On 16-lane targets, max pools whose window equals the stride and that have no padding (VGG's 2x2
stride 2) run :mod:`tvm_patdnn.ops.max_pool` instead, on vectors of ``min(16, output row)`` lanes
read straight from the input (no padded plane copy) when that is at least ``POOL_MIN_LANES``: Zen 5, 1
thread, kernel alone, interleaved: 64 at 224x224 0.407 -> 0.152 ms (39 -> 106 GB/s), 128 at 112x112
0.168 -> 0.072, 256 at 56x56 0.095 -> 0.038, 512 at 28x28 0.028 -> 0.019, 512 at 14x14 4.7 -> 3.6 µs,
VGG-16 CIFAR's 64 at 32x32 2.7 -> 1.8 µs, 128 at 16x16 1.5 -> 1.0, 256 at 8x8 0.7 -> 0.5, 512 at 4x4
0.5 -> 0.4; 512 at 2x2 (1-lane rows) 0.18 -> 0.24 µs, so it keeps the depthwise kernel. The padded
pools in ``STREAMED_POOLS`` take it too (padding read as the nearest row or column inside, the same max):
ResNet-50's 3x3 stride-2 pad-1 pool at 112x112, alone 0.096 -> 0.055 ms, in the dense ResNet-50 (per-call
minima, 11 rounds) 0.124 -> 0.082 ms (ORT 0.064-0.071). Other padded or overlapping pools were not
measured and stay on the depthwise kernel.
"""

from __future__ import annotations

import dataclasses

import tvm
from tvm import relax
from tvm.ir import IRModule
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from ..ops.depthwise_conv import FLAT_VECTORS, DepthwiseConvSpec, depthwise_conv_primfunc
from ..ops.max_pool import MaxPoolSpec, max_pool_primfunc
from .dense_conv_rewrite import DenseConvRewriter
from .exprs import add_kernel, nchw_conv_shapes, per_channel_bias, static_shape

__all__ = ["DepthwiseConvRewrite", "DepthwiseConvRewriter"]

# On 16-lane targets, stride-1 depthwise convs with output rows narrower than this run the flat tile.
FLAT_WIDTH = 8
# On 16-lane targets, stride-2 depthwise convs with output rows narrower than this run the flat tile
# on phase planes (DepthwiseConvSpec.flat_offset).
FLAT_STRIDED_WIDTH = 16
# On 16-lane targets, max pools whose window equals the stride, without padding, run the streaming
# kernel of ops/max_pool.py when their output rows make vectors of at least this many lanes.
POOL_MIN_LANES = 2
# ... and so do these padded or overlapping pools: (kernel, strides, padding).
STREAMED_POOLS = {((3, 3), (2, 2), (1, 1, 1, 1))}


def _is_depthwise_conv(conv: relax.Call, weight: relax.Expr) -> bool:
    shapes = nchw_conv_shapes(conv, weight)
    if shapes is None:
        return False
    data, kernel, out = shapes
    return int(conv.attrs.groups) == data[1] == out[1] == kernel[0] and kernel[1] == 1


class DepthwiseConvRewriter(DenseConvRewriter):
    """Rewrite depthwise conv2d chains into depthwise-conv ``call_tir``s (the pass is
    :data:`DepthwiseConvRewrite`); ``registers`` and ``lanes`` size the register tile
    (:meth:`DepthwiseConvSpec.for_target`)."""

    def __init__(self, registers: int = 16, lanes: int = 8):
        super().__init__(registers, lanes)
        self.max_pool = is_op("relax.nn.max_pool2d")(wildcard())

    def transform_module(self, mod: IRModule, ctx: tvm.transform.PassContext) -> IRModule:
        mod = super().transform_module(mod, ctx)
        self._builder = relax.BlockBuilder(mod)
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, relax.Function) and not (func.attrs and func.attrs.get("Primitive", 0)):
                self._builder.update_func(gvar, rewrite_call(self.max_pool, self._rewrite_max_pool, func))
        return self._builder.get()

    def _rewrite_max_pool(self, expr: relax.Call, _matches) -> relax.Expr:
        attrs, shape, out_shape = expr.attrs, static_shape(expr.args[0]), static_shape(expr)
        if (shape is None or out_shape is None or len(shape) != 4 or expr.ty.dtype != "float32"
                or (attrs.layout, attrs.out_layout) != ("NCHW", "NCHW") or bool(attrs.ceil_mode)
                or any(int(d) != 1 for d in attrs.dilation)):
            return expr
        n, c, h, w = shape
        kernel, strides = tuple(int(k) for k in attrs.pool_size), tuple(int(s) for s in attrs.strides)
        padding = tuple(int(p) for p in attrs.padding)
        lanes = min(self.lanes, int(out_shape[3]), w // strides[1])
        streamed = (kernel == strides and not any(padding)) or (kernel, strides, padding) in STREAMED_POOLS
        if self.lanes >= 16 and lanes >= POOL_MIN_LANES and streamed:
            pool = MaxPoolSpec(batch=n, channels=c, height=h, width=w, kernel=kernel, strides=strides, padding=padding,
                               lanes=lanes)
            if (pool.out_height, pool.out_width) == tuple(out_shape[2:]):
                if pool not in self._kernels:
                    self._kernels[pool] = add_kernel(self._builder, max_pool_primfunc(pool), "max_pool")
                return relax.call_tir(self._kernels[pool], [expr.args[0]], relax.TensorType(out_shape, "float32"))
        spec = DepthwiseConvSpec.for_target(
            self.registers, self.lanes, batch=n, channels=c, height=h, width=w,
            kernel=tuple(int(k) for k in attrs.pool_size), strides=tuple(int(s) for s in attrs.strides),
            padding=tuple(int(p) for p in attrs.padding), reduction="max",
        )
        if (spec.out_height, spec.out_width) != out_shape[2:]:
            return expr
        if spec not in self._kernels:
            self._kernels[spec] = add_kernel(self._builder, depthwise_conv_primfunc(spec), "depthwise_max_pool")
        return relax.call_tir(self._kernels[spec], [expr.args[0]], relax.TensorType(out_shape, "float32"))

    def _fusion(self, expr: relax.Call, matches) -> tuple | None:
        """(conv, spec, bias) of a match the kernel can take, else None."""
        conv, weight = matches[self.conv], matches[self.weight]
        if self.added in matches or not _is_depthwise_conv(conv, weight):
            return None
        n, c, h, w = static_shape(conv.args[0])
        bias = None
        if self.bias in matches:
            bias = per_channel_bias(matches[self.bias], c)
            if bias is None:
                return None  # not a per-channel bias: a smaller match takes the conv
        activation = self._activation(expr, matches)
        if activation is None:
            return None
        spec = DepthwiseConvSpec.for_target(
            self.registers, self.lanes, batch=n, channels=c, height=h, width=w, kernel=static_shape(weight)[2:],
            strides=tuple(int(s) for s in conv.attrs.strides), padding=tuple(int(p) for p in conv.attrs.padding),
            has_bias=bias is not None, **activation,
        )
        if self.lanes >= 16 and ((spec.strides == (1, 1) and spec.out_width < FLAT_WIDTH)
                                 or (spec.strides == (2, 2) and spec.out_width < FLAT_STRIDED_WIDTH)):
            flat = dataclasses.replace(spec, flat=True, lanes=self.lanes)
            if flat.flat_vectors <= FLAT_VECTORS:
                spec = flat
        return conv, spec, bias

    def _rewrite(self, expr: relax.Expr, matches) -> relax.Expr:
        if expr not in self._fusions:
            return expr
        conv, spec, bias = self._fusions[expr]
        if spec not in self._kernels:
            self._kernels[spec] = add_kernel(self._builder, depthwise_conv_primfunc(spec), "depthwise_conv")
        args = [conv.args[0], conv.args[1]] + ([relax.const(bias)] if bias is not None else [])
        return relax.call_tir(self._kernels[spec], args, relax.TensorType(static_shape(conv), "float32"))


DepthwiseConvRewrite = tvm.transform.module_pass(DepthwiseConvRewriter, opt_level=0, name="DepthwiseConvRewrite")
