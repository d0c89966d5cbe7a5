"""Default CPU schedule of the fully connected layers (matmul + bias/activation epilogues).

ONNX Gemm with ``transB=1`` reaches TIR as ``out[i, j] += x[i, k] * W[k, j]`` once the weight
transpose is folded, and the unscheduled loop nest walks ``W`` down its columns (one cache
miss per weight: VGG-16's 102M-weight classifier took over a second). Putting ``k`` outside a
vector of ``j`` reads the weight row by row, contiguously, with the accumulators in registers.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from ..arith import largest_divisor
from .register_tile import REDUCE, SPATIAL, accumulate_in_registers, schedule_main_block


class MatmulCPU(CPUScheduleRule):
    """Row-streaming schedule for ``[..., i, j] += a[..., i, k] * b[k, j]`` on LLVM targets."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not self.is_target_available(target):
            return None
        return schedule_main_block(func, target, _is_row_major_matmul, _schedule)


def _is_row_major_matmul(block) -> bool:
    """Spatial iterators then one reduction ``k``, and an operand indexed ``[..., k, j]``."""
    kinds = [int(iv.iter_type) for iv in block.iter_vars]
    if len(kinds) < 2 or kinds[-1] != REDUCE or any(k != SPATIAL for k in kinds[:-1]):
        return False
    j, k = block.iter_vars[-2].var, block.iter_vars[-1].var
    for read in block.reads:
        region = read.region
        if len(region) >= 2 and region[-1].min.same_as(j) and region[-2].min.same_as(k):
            return True
    return False


def _schedule(sch: s_tir.Schedule, blocks, main, lanes: int) -> None:
    index = [sch.get(b).same_as(sch.get(main)) for b in blocks].index(True)
    consumers = blocks[index + 1 :]
    *outer, j, k = sch.get_loops(main)
    extent = int(sch.get(j).extent)
    width = largest_divisor(extent, 4 * lanes)
    jo, ji = sch.split(j, [None, width])
    sch.reorder(*outer, jo, k, ji)
    rows = sch.fuse(*outer, jo) if outer else jo
    sch.parallel(rows)
    sch.vectorize(ji)
    accumulate_in_registers(sch, main, rows, k, consumers)
