"""Default CPU schedule of the window reductions left to TVM's legalized ops: pooling, and the
convs the dense kernel (``ops/dense_conv.py``) does not take (grouped/depthwise, dilated, few
filters, non-constant weights; all dense convs with ``get_pipeline(..., dense_kernels=False)``).

TVM's default pipeline leaves legalized conv2d (and pooling) loops unscheduled, ~25x slower
than a tuned schedule, which would make every end-to-end comparison meaningless. This rule
gives any NCHW window reduction (4 spatial iterators then 2+ reduction iterators) a sound
register-tiled schedule: a tile of filters x a vector of output columns is accumulated in
registers over the whole reduction, one input vector serving every filter of the tile, with
fused bias/activation epilogues written straight from registers.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from ..arith import largest_divisor
from ..ops.pattern_conv import is_pattern_conv
from .register_tile import REDUCE, SPATIAL, accumulate_in_registers, schedule_main_block


class DenseConv2dCPU(CPUScheduleRule):
    """Register-tiled schedule for dense NCHW conv2d / pooling PrimFuncs on LLVM targets."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not self.is_target_available(target) or is_pattern_conv(func):
            return None
        return schedule_main_block(func, target, _is_window_reduction, _schedule)


def _is_window_reduction(block) -> bool:
    kinds = [int(iv.iter_type) for iv in block.iter_vars]
    return (
        len(kinds) >= 6
        and kinds[:4] == [SPATIAL] * 4
        and all(k == REDUCE for k in kinds[4:])
        and len(block.writes) == 1
        and len(block.writes[0].region) == 4
    )


def _schedule(sch: s_tir.Schedule, blocks, main, lanes: int) -> None:
    index = [sch.get(b).same_as(sch.get(main)) for b in blocks].index(True)
    producers, consumers = blocks[:index], blocks[index + 1 :]
    for block in producers:
        loops = sch.get_loops(block)
        if len(loops) >= 2:
            sch.parallel(sch.fuse(loops[0], loops[1]))

    loops = sch.get_loops(main)
    n, f, y, x = loops[:4]
    reductions = loops[4:]
    extents = [int(sch.get(loop).extent) for loop in (f, x)]
    f_tile = largest_divisor(extents[0], 4)
    x_vec = largest_divisor(extents[1], lanes)
    x_tile = largest_divisor(extents[1] // x_vec, 2)
    fo, fi = sch.split(f, [None, f_tile])
    xo, xt, xi = sch.split(x, [None, x_tile, x_vec])
    sch.reorder(n, fo, y, xo, *reductions, fi, xt, xi)
    sch.parallel(sch.fuse(n, fo))
    sch.unroll(fi)
    sch.unroll(xt)
    sch.vectorize(xi)
    accumulate_in_registers(sch, main, xo, reductions[0], consumers)
