"""Default GPU (OpenCL / Adreno) schedule of the pattern convolution.

One work item computes one output row segment of ``vector_width`` columns (a float4 on
Adreno) for one filter, over all of that filter's patterns and kernels. Work items of a work
group are consecutive output positions of the same filter, so every item of a wave reads the
same packed kernel at the same time: no divergence between items (PatDNN's reason for the
filter-kernel reorder) and the kernel's weights are one vectorized load from the packed
``values`` row. Input reads of neighbouring items are neighbouring addresses.
Work groups are whole waves (64 on Adreno 6xx), and no larger than the layer needs.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.target import Target

from ..arith import work_group_size
from ..ops.pattern_conv import PATTERN_CONV_ATTR, is_pattern_conv
from ..targets import gpu_threads

__all__ = ["PatternConvGPU", "schedule_pattern_conv_gpu"]

_VECTOR_TYPES = (2, 4, 8, 16)  # OpenCL vector widths


class PatternConvGPU(GPUScheduleRule):
    """The untuned GPU schedule of pattern-conv PrimFuncs (others: not applicable)."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not is_pattern_conv(func) or not self.is_target_available(target):
            return None
        layout = func.attrs[PATTERN_CONV_ATTR]
        wave, max_threads = gpu_threads(target)
        # The operator indexes in int64 (FuseTIR needs it; fusion is over by now); GPUs emulate
        # 64-bit integer multiply/divide, and every index here is far below 2**31.
        func = tirx.transform.ForceNarrowIndexToInt32()(tvm.IRModule({"main": func}))["main"]
        sch = s_tir.Schedule(func)
        schedule_pattern_conv_gpu(sch, int(layout["vector_width"]), int(layout["taps"]), wave, max_threads)
        return sch


def _bind_flat(sch: s_tir.Schedule, loops: list, wave: int, max_threads: int) -> None:
    """Fuse ``loops`` and spread them over work groups of a wave-multiple size."""
    fused = sch.fuse(*loops)
    extent = int(sch.get(fused).extent)
    group, item = sch.split(fused, [None, work_group_size(extent, wave, max_threads)])
    sch.bind(group, "blockIdx.x")
    sch.bind(item, "threadIdx.x")


def schedule_pattern_conv_gpu(sch: s_tir.Schedule, vector_width: int, taps: int, wave: int,
                              max_threads: int) -> None:
    """Apply the default GPU schedule to the blocks of :func:`pattern_conv2d_primfunc`.

    Three kernels: padding, the pattern accumulation (work item = filter x row x vector of
    columns, accumulators in registers), and the epilogue (filter order, bias, ReLU).
    """
    pad, acc, out = sch.get_sblock("pad"), sch.get_sblock("acc"), sch.get_sblock("out")
    _bind_flat(sch, sch.get_loops(pad), wave, max_threads)

    n, f, y, q, x, rp, rj, rt = sch.get_loops(acc)
    xo, xi = sch.split(x, [None, vector_width])
    sch.reorder(n, f, y, q, xo, rp, rj, rt, xi)
    _bind_flat(sch, [n, f, y, q, xo], wave, max_threads)
    sch.unroll(rp)
    sch.unroll(rt)
    store = sch.cache_write(acc, 0, "local")
    sch.reverse_compute_at(store, sch.get_loops(acc)[1])
    sch.vectorize(sch.get_loops(store)[-1])
    if taps in _VECTOR_TYPES:
        # The kernel's taps are one row of the packed values: load it as one vector.
        weights = sch.cache_read(acc, 1, "local")
        sch.compute_at(weights, rj)
        sch.vectorize(sch.get_loops(weights)[-1])
    sch.vectorize(xi)
    init = sch.decompose_reduction(acc, rp)
    sch.vectorize(sch.get_loops(init)[-1])

    _bind_flat(sch, sch.get_loops(out), wave, max_threads)
