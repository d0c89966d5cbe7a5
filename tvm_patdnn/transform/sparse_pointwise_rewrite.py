"""Relax pass: rewrite block-sparse 1x1 conv2d chains into the sparse pointwise kernel of
:mod:`tvm_patdnn.ops.sparse_pointwise` (CPUs) or :mod:`tvm_patdnn.ops.sparse_pointwise_gpu` (OpenCL).

Runs before :class:`~tvm_patdnn.transform.DenseConvRewrite` and matches the same chains (conv2d
+ bias + residual add + ReLU / clip: it is a subclass), taking the 1x1 convs whose constant
weights are sparse enough in (``block``, 1) blocks for the sparse kernel to beat the dense one:
the rule is :func:`~tvm_patdnn.ops.sparse_pointwise.block_density` at most ``MAX_DENSITY`` (the
pattern pass reports the same layers as kind "sparse"). The rest is left to ``DenseConvRewrite``.
"""

from __future__ import annotations

import dataclasses

import tvm
from tvm import relax

from ..ops.sparse_pointwise import (BLOCK, MAX_DENSITY, SparsePointwiseSpec, block_density, block_sparse_weight,
                                   sparse_pointwise_primfunc)
from ..ops.sparse_pointwise_gpu import SparsePointwiseGPUSpec, sparse_pointwise_gpu_primfunc
from .dense_conv_rewrite import DenseConvRewriter
from .exprs import add_kernel, constant_array, nchw_conv_shapes, static_shape

__all__ = ["SparsePointwiseRewrite", "SparsePointwiseRewriter", "runs_sparse"]


def runs_sparse(conv: relax.Call, block: int = BLOCK, max_density: float = MAX_DENSITY) -> bool:
    """Whether the pass takes this conv2d: a float32 NCHW 1x1 conv, unpadded and ungrouped, whose
    constant weight keeps at most ``max_density`` of its (``block``, 1) blocks. A bias or
    activation the kernel cannot fuse only shortens the chain, so this is the whole rule, and
    the pattern pass reports these layers as kind "sparse" by it."""
    weight = conv.args[1]
    shapes = nchw_conv_shapes(conv, weight)
    return (shapes is not None and shapes[1][2:] == (1, 1) and int(conv.attrs.groups) == 1
            and all(int(p) == 0 for p in conv.attrs.padding)
            and block_density(constant_array(weight), block) <= max_density)


class SparsePointwiseRewriter(DenseConvRewriter):
    """Rewrite block-sparse 1x1 conv2d chains into sparse pointwise ``call_tir``s (the pass is
    :data:`SparsePointwiseRewrite`).

    ``block`` is the filter rows a kept block spans (the pruner's ``pointwise_block``);
    ``max_density`` the largest kept share of blocks rewritten; ``chains`` the target's
    :func:`~tvm_patdnn.targets.fma_chains`, which sizes the register tile. ``gpu``, the (wave,
    largest work group) of an OpenCL target (:func:`~tvm_patdnn.targets.gpu_threads`),
    selects the GPU kernel, whose weight has a single channel block.
    """

    def __init__(self, registers: int = 16, lanes: int = 8, block: int = BLOCK, max_density: float = MAX_DENSITY,
                 chains: int = 8, gpu: tuple[int, int] | None = None):
        super().__init__(registers, lanes)
        self.block, self.max_density, self.chains, self.gpu = block, max_density, chains, gpu

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        self._sparse: dict[relax.Expr, tuple] = {}
        return super().transform_module(mod, ctx)

    def _fusion(self, expr: relax.Call, matches) -> tuple | None:
        if not runs_sparse(matches[self.conv], self.block, self.max_density):
            return None
        fusion = super()._fusion(expr, matches)
        if fusion is None:
            return None
        conv, spec = fusion[0], fusion[1]
        weight = constant_array(conv.args[1])
        if self.gpu is None:
            probe = SparsePointwiseSpec.for_target(self.registers, self.lanes, self.block, 0, self.chains,
                                                  **spec.layer_fields())
            packed = block_sparse_weight(weight, self.block, probe.channel_block)
        else:
            probe = SparsePointwiseGPUSpec.for_target(*self.gpu, self.block, 0, **spec.layer_fields())
            packed = block_sparse_weight(weight, self.block, spec.in_channels)  # one channel block
        self._sparse[expr] = (dataclasses.replace(probe, nonzero_blocks=packed.kept_blocks), packed)
        return fusion

    def _rewrite(self, expr: relax.Expr, matches) -> relax.Expr:
        if expr not in self._fusions:
            return expr
        conv, _, bias, residual = self._fusions[expr]
        spec, packed = self._sparse[expr]
        if spec not in self._kernels:
            make = sparse_pointwise_primfunc if self.gpu is None else sparse_pointwise_gpu_primfunc
            self._kernels[spec] = add_kernel(self._builder, make(spec), "sparse_pointwise_conv")
        args = [conv.args[0], relax.const(packed.values), relax.const(packed.channels), relax.const(packed.starts)]
        args += [relax.const(bias)] if bias is not None else []
        args += [residual] if residual is not None else []
        return relax.call_tir(self._kernels[spec], args, relax.TensorType(static_shape(conv), "float32"))


SparsePointwiseRewrite = tvm.transform.module_pass(SparsePointwiseRewriter, opt_level=0, name="SparsePointwiseRewrite")
