"""Relax pass: rewrite an inverted residual block's convs (an expansion 1x1 conv chain read only by a
depthwise conv chain, and the projection 1x1 conv chain that alone reads that one; either may be
missing, not both) into the one kernel of :mod:`tvm_patdnn.ops.inverted_residual`, so the
expanded tensor is never written.

Runs before :class:`~tvm_patdnn.transform.DenseConvRewrite` and
:class:`~tvm_patdnn.transform.DepthwiseConvRewrite`, on the chains they would take one by one (the
plans are theirs: the largest chain with single-use inner values): an expansion 1x1 stride-1
unpadded conv (+ per-channel bias)(+ ReLU / clip) without residual, read by nothing but a depthwise
conv (+ bias)(+ ReLU / clip) whose window is at least as tall as its stride, and optionally the
1x1 projection (+ bias)(+ residual)(+ activation) that alone reads the depthwise output. Which
blocks are taken (measured on Zen 3, 1 thread, MobileNetV2, interleaved A/B against the kernels
one by one): those whose expanded tensor has at least ``MIN_EXPANDED_BYTES`` per image (16->96
at 112x112 s2 1.38-1.55x, 24->144 at 56x56 s1 and s2 1.0-1.09x: the 4.8 and 1.8 MB expanded
tensors are neither written nor read back); at 28x28 and 14x14 (0.3-0.6 MB, in L2 anyway) the
fused kernel at best ties the separate ones (block alone, 11 interleaved rounds: 32->192->32 at
28x28 0.97x, 32->192->64 s2 1.01x, 64->384->64, 64->384->96 and 96->576->96 at 14x14 1.00-1.03x,
96->576->160 s2 at 14x14 0.71x, 160->960->160 at 7x7 0.47x), and taking them lost on the whole
model (0.989x with the 28x28 blocks, 0.972x with the 14x14 ones too): each 1x1 conv computes 16
positions for 14 (the separate GEMMs 208 for 196), which eats what the L2 round trip of the
expanded tensor saved. The projection joins them (``FUSE_PROJECTION``): the depthwise rows
of a block then go to a buffer in cache instead of memory. A depthwise conv without expansion
before it but with a projection after it (MobileNetV2's first block, 32 channels at 112x112) is
taken too: kernel alone 1.21-1.27x over the depthwise and projection kernels, the whole model
within noise (1.059x ORT against 1.057x). Measured on AVX2 (8 lanes) and AVX-512 (16 lanes), so
only those targets take it (``FUSED_LANES``): on Zen 5 (1 thread, MobileNetV2 with the same rule,
interleaved against the kernels one by one, two runs of 11 and 15 rounds) the whole model ran 1.079x,
1.065x per round (ORT/ours 1.000 -> 1.084x, 1.028 -> 1.071x); with only the 112x112 blocks
(``MIN_EXPANDED_BYTES`` 4 MB) 1.053x, 1.061x. Session 14 had measured 0.97x, before the separate
16-lane GEMM, depthwise and direct kernels changed.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.ir import IRModule

from ..ops.dense_conv import pack_dense_conv_weight
from ..ops.direct_conv import pack_direct_conv_bias
from ..ops.inverted_residual import InvertedResidualSpec, inverted_residual_primfunc
from .dense_conv_rewrite import DenseConvRewriter
from .depthwise_conv_rewrite import DepthwiseConvRewriter
from .exprs import add_kernel, single_use_values, static_shape

__all__ = ["InvertedResidualRewrite", "InvertedResidualRewriter"]

# Blocks whose expanded tensor (per image) is smaller than this stay separate kernels.
MIN_EXPANDED_BYTES = 1000000
# Whether the projection joins the fused kernel (else it stays a kernel of its own): with it, 16->96->24
# at 112x112 s2 1.16-1.21x, 24->144->24 (+ residual) at 56x56 1.08-1.09x, 24->144->32 s2 1.10x over the
# two-conv kernel + the projection's own kernel (Zen 3, 1 thread); the whole MobileNetV2 1.025x.
FUSE_PROJECTION = True
# Lane counts whose targets take the fused kernel (AVX2 and AVX-512, where the rule was measured).
FUSED_LANES = (8, 16)
_EXPANSION_FIELDS = ("batch", "in_channels", "height", "width", "out_channels", "has_bias", "activation", "clip_min",
                     "clip_max")
_PROJECTION_FIELDS = _EXPANSION_FIELDS + ("residual",)
_DEPTHWISE_FIELDS = ("batch", "channels", "height", "width", "kernel", "strides", "padding", "has_bias", "activation",
                     "clip_min", "clip_max")


class InvertedResidualRewriter(DepthwiseConvRewriter):
    """Rewrite inverted residual blocks into inverted-residual ``call_tir``s (the pass is
    :data:`InvertedResidualRewrite`); ``registers`` and ``lanes`` size the register tiles
    (:meth:`InvertedResidualSpec.for_target`: the 1x1 convs' are the GEMM's, ``gemm_vectors``),
    ``threads`` the bands of rows a block with a projection is split into."""

    def __init__(self, registers: int = 16, lanes: int = 8, threads: int = 1):
        super().__init__(registers, lanes)
        self.threads = threads
        self._pointwise = DenseConvRewriter(registers, lanes)

    def transform_module(self, mod: IRModule, ctx: tvm.transform.PassContext) -> IRModule:
        return DenseConvRewriter.transform_module(self, mod, ctx)  # the conv chains only, not max pooling

    def _plan(self, func: relax.Function) -> dict[relax.Expr, tuple]:
        """Each fused block's last chain (the projection's, else the depthwise conv's) -> (block spec,
        the expansion, depthwise and projection fusions)."""
        depthwise = super()._plan(func)
        dense = self._pointwise._plan(func)
        single_use = single_use_values(func)
        var2val = self._var2val

        def only_reader(var: relax.Expr) -> relax.Expr | None:
            """The chain bound to ``var`` when only one op reads it."""
            value = var2val.get(var)
            return value if value is not None and value in single_use else None

        fused: dict[relax.Expr, tuple] = {}
        taken: set[relax.Expr] = set()
        if FUSE_PROJECTION:
            for root, projection in dense.items():
                inner = only_reader(projection[0].args[0])
                if inner in depthwise:
                    expansion = dense.get(only_reader(depthwise[inner][0].args[0]))
                    block = self._block(expansion, depthwise[inner], projection)
                    if block is not None:
                        fused[root] = block
                        taken.add(inner)
        for root, dw in depthwise.items():
            if root not in taken:
                block = self._block(dense.get(only_reader(dw[0].args[0])), dw, None)
                if block is not None:
                    fused[root] = block
        return fused

    def _block(self, expansion: tuple | None, depthwise: tuple, projection: tuple | None) -> tuple | None:
        """(spec, expansion, depthwise, projection) of a block the kernel takes, else None: a depthwise
        conv with an expansion before it, a projection after it or both (the ones that fit)."""
        dspec = depthwise[1]
        if self.lanes not in FUSED_LANES or dspec.kernel[0] < dspec.strides[0]:
            return None
        if expansion is not None and (expansion[3] is not None or not expansion[1].pointwise):
            expansion = None
        if projection is not None and not projection[1].pointwise:
            projection = None
        if (expansion is None and projection is None
                or dspec.channels * dspec.height * dspec.width * 4 < MIN_EXPANDED_BYTES):
            return None
        spec = InvertedResidualSpec.for_target(
            *self._pointwise.gemm_vectors(),
            {k: getattr(expansion[1], k) for k in _EXPANSION_FIELDS} if expansion is not None else None,
            {k: getattr(dspec, k) for k in _DEPTHWISE_FIELDS},
            {k: getattr(projection[1], k) for k in _PROJECTION_FIELDS} if projection is not None else None,
            self.threads)
        return spec, expansion, depthwise, projection

    def _rewrite(self, expr: relax.Expr, matches) -> relax.Expr:
        if expr not in self._fusions:
            return expr
        spec, expansion, (dconv, _, dbias), projection = self._fusions[expr]
        if spec not in self._kernels:
            self._kernels[spec] = add_kernel(self._builder, inverted_residual_primfunc(spec), "inverted_residual")
        if expansion is not None:
            econv, _, ebias, _ = expansion
            args = [econv.args[0], self._tiles(econv.args[1], spec.expansion.filter_tile)]
            args += [relax.const(pack_direct_conv_bias(ebias, spec.expansion.filter_tile))] if ebias is not None else []
        else:
            args = [dconv.args[0]]
        args += [dconv.args[1]] + ([relax.const(dbias)] if dbias is not None else [])
        out = dconv
        if projection is not None:
            pconv, _, pbias, residual = projection
            args.append(self._tiles(pconv.args[1], spec.projection.filter_tile))
            if pbias is not None:
                args.append(relax.const(pack_direct_conv_bias(pbias, spec.projection.filter_tile)))
            args += [residual] if residual is not None else []
            out = pconv
        return relax.call_tir(self._kernels[spec], args, relax.TensorType(static_shape(out), "float32"))

    def _tiles(self, weight: relax.Expr, filter_tile: int) -> relax.Expr:
        """A 1x1 weight packed in GEMM filter tiles (``[F / MR][C][MR]``), once per weight and tile."""
        return self._packed_weight(weight, lambda w: pack_dense_conv_weight(w, filter_tile), ("gemm", filter_tile))


InvertedResidualRewrite = tvm.transform.module_pass(InvertedResidualRewriter, opt_level=0,
                                                    name="InvertedResidualRewrite")
