"""Relax pass: rewrite dense 3x3 stride-1 conv2d chains (+ bias)(+ residual)(+ ReLU / clip) into
the Winograd kernel of :mod:`tvm_patdnn.ops.winograd_conv`, where it pays.

Runs before :class:`~tvm_patdnn.transform.DenseConvRewrite`, with the same chain matching (it is
a subclass); every conv it does not take is left for that pass.

The rule (:func:`choose_tile`), from ``benchmarks/winograd.py`` (1 thread, AMD EPYC Zen 3, a
shared box: ratios of interleaved rounds) against the direct dense kernel:

* output side >= :data:`MIN_F4_SIDE` (24) and >= 32 input and output channels: F(4x4). Measured
  1.6-2.4x over the direct kernel (1.7-2.4x over ORT) on every such layer of ResNet-50 (64@56²,
  128@28²) and VGG-16 (224 and CIFAR 32x32), 1.6x on 32@56²; F(6x6) was up to 1.25x faster
  than F(4x4) on some of them and slower on others, with 5x the error;
* output side 14-23 (ResNet-50's and VGG-16's 14x14, CIFAR's 16x16) and >= 64 channels: F(2x2),
  1.15-1.7x; F(4x4) lost on the 14x14 ones (20 tiles per image: the ``36 C F`` transformed
  weights, 4x the direct ones' bytes, are streamed for too few tiles);
* smaller outputs (7x7, 8x8, 4x4, 2x2) and 32 channels at 14x14 stay on the direct kernel:
  Winograd measured 0.26-1.09x there.

Accuracy and the tests: the compiled models are compared with ``onnx.reference`` at 2e-6 of the
output's magnitude (``tests/test_compiler.py``). Measured against float64 (same benchmark, 32-512
channels), the largest errors relative to the output's magnitude were 1.2e-6 for F(2x2), 6.9e-6
for F(4x4) and 2.5e-5 for F(6x6) (the transforms scale intermediate values by up to 2.5 / 8 and
5.25 / 32, whose float32 rounding adds up over the channels); the direct kernels stay below 2.9e-6.
F(2x2) thus fits the tests' 2e-6; F(4x4) does not, but no other test has a dense 3x3 stride-1
layer the rule gives to F(4x4) (the dense 3x3 layers under ``tests/`` have outputs of at most 23
pixels a side on CPU targets), so none of their tolerances changed; ``tests/test_winograd_conv.py`` checks the
Winograd layers against ``ERROR_BOUND`` of the tile they use (:mod:`~tvm_patdnn.ops.winograd_conv`).
"""

from __future__ import annotations

import tvm
from tvm import relax

from ..ops.dense_conv import DenseConvSpec
from ..ops.winograd_conv import WinogradConvSpec
from .dense_conv_rewrite import DenseConvRewriter
from .kernel_choice import KernelChoices, KernelSpec

__all__ = ["WinogradConvRewrite", "WinogradConvRewriter", "choose_tile"]

# Output sides and channel counts of the rule (see the module docstring for the measurements).
MIN_F4_SIDE = 24
MIN_F4_CHANNELS = 32
MIN_F2_SIDE = 14
MIN_F2_CHANNELS = 64


def choose_tile(in_channels: int, out_channels: int, out_height: int, out_width: int) -> int | None:
    """The Winograd output tile ``m`` for a 3x3 stride-1 conv, or None when the direct kernel is faster."""
    side, channels = min(out_height, out_width), min(in_channels, out_channels)
    if side >= MIN_F4_SIDE and channels >= MIN_F4_CHANNELS:
        return 4
    if side >= MIN_F2_SIDE and channels >= MIN_F2_CHANNELS:
        return 2
    return None


class WinogradConvRewriter(DenseConvRewriter):
    """Rewrite the dense 3x3 stride-1 conv2d chains where Winograd pays into its ``call_tir``.

    ``registers`` and ``lanes`` are the target's (:func:`tvm_patdnn.targets.vector_registers`,
    :func:`~tvm_patdnn.targets.vector_lanes`); ``tile`` forces one output tile size for every
    3x3 stride-1 conv with constant weights (benchmarks and tests), instead of :func:`choose_tile`;
    ``choices`` (recorded by ``patdnn tune``) decide per layer instead of the rule, Winograd or not.
    """

    def __init__(self, registers: int = 16, lanes: int = 8, tile: int | None = None,
                 choices: KernelChoices | None = None):
        super().__init__(registers, lanes, choices=choices)
        self.tile = tile

    def _fusion(self, expr: relax.Call, matches) -> tuple | None:
        fusion = super()._fusion(expr, matches)
        if fusion is None:
            return None
        spec = fusion[1]
        if spec.kernel != (3, 3) or spec.strides != (1, 1):
            return None
        return fusion if isinstance(self._chosen_or_rule(spec), WinogradConvSpec) else None

    def _chosen_or_rule(self, spec: DenseConvSpec) -> KernelSpec | None:
        """The measured choice (Winograd or a dense kernel, the next pass's), else the rule's Winograd
        tile or None."""
        chosen = self.choices.spec(spec, self.registers) if self.choices is not None else None
        if chosen is not None:
            return chosen
        tile = self.tile or choose_tile(spec.in_channels, spec.out_channels, spec.out_height, spec.out_width)
        return None if tile is None else self._winograd(spec, tile)

    def kernel_spec(self, spec: DenseConvSpec) -> KernelSpec:
        return self._chosen_or_rule(spec)

    def _winograd(self, spec: DenseConvSpec, tile: int) -> WinogradConvSpec:
        shape = {name: value for name, value in spec.layer_fields().items() if name not in ("kernel", "strides")}
        return WinogradConvSpec.for_target(self.registers, self.lanes, tile, **shape)

    def candidates(self, spec: DenseConvSpec) -> list[KernelSpec]:
        """The dense kernels' candidates and, for 3x3 stride-1 convs, F(4x4) and F(2x2); the rules'
        choice first (F(6x6) is left out: 5x the error of F(4x4) for at most 1.25x)."""
        dense = super().candidates(spec)
        if spec.kernel != (3, 3) or spec.strides != (1, 1):
            return dense
        winograd = {}
        for tile in (4, 2):
            try:
                winograd[tile] = self._winograd(spec, tile)
            except ValueError:  # fewer tiles than one register tile's
                pass
        default = self.tile or choose_tile(spec.in_channels, spec.out_channels, spec.out_height, spec.out_width)
        if default in winograd:
            return [winograd.pop(default), *winograd.values(), *dense]
        return [*dense, *winograd.values()]


WinogradConvRewrite = tvm.transform.module_pass(WinogradConvRewriter, opt_level=0, name="WinogradConvRewrite")
