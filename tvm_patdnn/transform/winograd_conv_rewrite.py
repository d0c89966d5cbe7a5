"""Relax pass: rewrite dense 3x3 stride-1 conv2d chains (+ bias)(+ residual)(+ ReLU / clip) into
the Winograd kernel of :mod:`tvm_patdnn.ops.winograd_conv`, where it pays.

Runs before :class:`~tvm_patdnn.transform.DenseConvRewrite`, with the same chain matching (it is
a subclass); every conv it does not take is left for that pass.

The rule (measured with ``benchmarks/winograd.py``, 1 thread, AMD EPYC Zen 3, against the packed-
GEMM dense kernel; see :data:`MIN_CHANNELS` and :func:`choose_tile`): a 3x3 stride-1 conv with
at least :data:`MIN_CHANNELS` input and output channels, F(4x4) when the output is at least
:data:`MIN_F4_SIZE` pixels on its shorter side, else F(2x2).

Accuracy and the tests: the compiled models are compared with ``onnx.reference`` at 2e-6 of the
output's magnitude (``tests/test_compiler.py``). F(2x2) errs at most ~3e-7 of the magnitude there
(its transforms only add and halve), F(4x4) up to ~4e-6 (its input transform multiplies by 4 and
5, its output transform by 8: the float32 rounding of the larger intermediate values), F(6x6) up
to ~3e-5 (``ERROR_BOUND`` in :mod:`~tvm_patdnn.ops.winograd_conv`, measured against float64).
The existing tests' layers have fewer than :data:`MIN_CHANNELS` channels, so they stay on the
direct kernels and keep 2e-6; ``tests/test_winograd_conv.py`` checks the Winograd layers against
the bound of the variant they use. F(6x6) is not chosen by the rule (see :func:`choose_tile`).
"""

from __future__ import annotations

import tvm
from tvm import relax

from ..ops.winograd_conv import WinogradConvSpec, pack_winograd_weight, winograd_conv_primfunc
from .dense_conv_rewrite import DenseConvRewrite
from .pattern_conv_rewrite import OPAQUE, _static_shape

__all__ = ["MIN_CHANNELS", "MIN_F4_SIZE", "WinogradConvRewrite", "choose_tile"]

# Fewer input or output channels leave the transforms (per tile: ~alpha^2 adds per channel in,
# per filter out) too large next to the multiply-adds (alpha^2 per channel and filter).
MIN_CHANNELS = 64
# F(4x4) needs outputs of at least this side: smaller images waste most of the 4x4 tiles.
MIN_F4_SIZE = 8

# The pass class DenseConvRewrite wraps (tvm's module_pass decorator returns a wrapper class whose
# instances hold the real pass object): subclassing it keeps the chain matching.
_DenseConvRewriter = type(DenseConvRewrite()._inst)


def choose_tile(in_channels: int, out_channels: int, out_height: int, out_width: int) -> int | None:
    """The Winograd output tile ``m`` for a 3x3 stride-1 conv, or None when the direct kernel is faster."""
    if min(in_channels, out_channels) < MIN_CHANNELS:
        return None
    return 4 if min(out_height, out_width) >= MIN_F4_SIZE else 2


@tvm.transform.module_pass(opt_level=0, name="WinogradConvRewrite")
class WinogradConvRewrite(_DenseConvRewriter):
    """Rewrite the dense 3x3 stride-1 conv2d chains where Winograd pays into its ``call_tir``.

    ``registers`` and ``lanes`` are the target's (:func:`tvm_patdnn.targets.vector_registers`,
    :func:`~tvm_patdnn.targets.vector_lanes`); ``tile`` forces one output tile size for every
    3x3 stride-1 conv with constant weights (benchmarks and tests), instead of :func:`choose_tile`.
    """

    def __init__(self, registers: int = 16, lanes: int = 8, tile: int | None = None):
        super().__init__(registers, lanes)
        self.tile = tile

    def _fusion(self, expr: relax.Call, matches) -> tuple | None:
        fusion = super()._fusion(expr, matches)
        if fusion is None:
            return None
        conv, spec, bias, residual = fusion
        if spec.kernel != (3, 3) or spec.strides != (1, 1):
            return None
        tile = self.tile or choose_tile(spec.in_channels, spec.out_channels, spec.out_height, spec.out_width)
        if tile is None:
            return None
        wino = WinogradConvSpec.for_target(
            self.registers, self.lanes, tile, batch=spec.batch, in_channels=spec.in_channels, height=spec.height,
            width=spec.width, out_channels=spec.out_channels, padding=spec.padding, has_bias=spec.has_bias,
            residual=spec.residual, activation=spec.activation, clip_min=spec.clip_min, clip_max=spec.clip_max,
        )
        return conv, wino, bias, residual

    def _rewrite(self, expr: relax.Expr, matches) -> relax.Expr:
        if expr not in self._fusions:
            return expr
        conv, spec, bias, residual = self._fusions[expr]
        if spec not in self._kernels:
            func = winograd_conv_primfunc(spec).with_attr("op_pattern", OPAQUE)
            self._kernels[spec] = self._builder.add_func(func, "winograd_conv")
        weight = conv.args[1]
        key = (weight, spec.tile, spec.filter_tile)
        if key not in self._packed:
            self._packed[key] = relax.const(pack_winograd_weight(weight.value.numpy(), spec.tile, spec.filter_tile))
        args = [conv.args[0], self._packed[key]]
        args += [relax.const(bias)] if bias is not None else []
        args += [residual] if residual is not None else []
        return relax.call_tir(self._kernels[spec], args, relax.TensorType(_static_shape(conv), "float32"))
