"""Default CPU schedule of the fully connected layers (matmul + bias/activation epilogues).

ONNX Gemm with ``transB=1`` reaches TIR as ``out[i, j] += x[i, k] * W[k, j]`` once the weight
transpose is folded, and the unscheduled loop nest walks ``W`` down its columns (one cache
miss per weight: VGG-16's 102M-weight classifier took over a second). Putting ``k`` outside a
vector of ``j`` reads the weight row by row, contiguously, with the accumulators in registers.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from ..targets import vector_lanes
from .register_tile import accumulate_in_registers

_SPATIAL, _REDUCE = 0, 2  # tirx.IterVar kinds: DataPar, CommReduce


class MatmulCPU(ScheduleRule):
    """Row-streaming schedule for ``[..., i, j] += a[..., i, k] * b[k, j]`` on LLVM targets."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(get_root_block(sch))
        main = [b for b in blocks if _is_row_major_matmul(sch.get(b))]
        if len(main) != 1:
            return None
        try:
            _schedule(sch, blocks, main[0], vector_lanes(target))
        except s_tir.ScheduleError:
            return None
        return sch


def _is_row_major_matmul(block) -> bool:
    """Spatial iterators then one reduction ``k``, and an operand indexed ``[..., k, j]``."""
    kinds = [int(iv.iter_type) for iv in block.iter_vars]
    if len(kinds) < 2 or kinds[-1] != _REDUCE or any(k != _SPATIAL for k in kinds[:-1]):
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
    width = max(d for d in range(1, min(extent, 4 * lanes) + 1) if extent % d == 0)
    jo, ji = sch.split(j, [None, width])
    sch.reorder(*outer, jo, k, ji)
    rows = sch.fuse(*outer, jo) if outer else jo
    sch.parallel(rows)
    sch.vectorize(ji)
    accumulate_in_registers(sch, main, rows, k, consumers)
