"""What the dense CPU rules share: find their one reduction block, accumulate a register tile,
then write it out with its epilogue."""

from __future__ import annotations

from collections.abc import Callable

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.target import Target

from ..targets import vector_lanes

SPATIAL, REDUCE = 0, 2  # tirx.IterVar kinds: DataPar, CommReduce


def schedule_main_block(
    func: tirx.PrimFunc,
    target: Target,
    is_main: Callable[[s_tir.SBlock], bool],
    schedule: Callable[[s_tir.Schedule, list, s_tir.schedule.SBlockRV, int], None],
) -> s_tir.Schedule | None:
    """``schedule(sch, blocks, main, lanes)`` (``lanes``: the CPU target's vector width) when exactly
    one block of ``func`` is ``is_main``; None (rule not applicable) otherwise or when the schedule
    does not fit."""
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(get_root_block(sch))
    main = [b for b in blocks if is_main(sch.get(b))]
    if len(main) != 1:
        return None
    try:
        schedule(sch, blocks, main[0], vector_lanes(target))
    except s_tir.ScheduleError:
        return None
    return sch


def _vectorize_innermost_below(sch: s_tir.Schedule, block, outer) -> None:
    """Vectorize ``block``'s innermost loop if it lies below ``outer`` (a block whose tile loops
    were all of extent 1 has none, and vectorizing ``outer`` itself would be wrong)."""
    loops = sch.get_loops(block)
    depth = [sch.get(loop).same_as(sch.get(outer)) for loop in loops].index(True)
    if len(loops) > depth + 1:
        sch.vectorize(loops[-1])


def accumulate_in_registers(sch: s_tir.Schedule, main, at_loop, first_reduction, consumers) -> None:
    """Cache ``main``'s output tile in registers under ``at_loop``, write it back there with the
    injective ``consumers`` (bias, activation) inlined, and initialise it before the reduction."""
    store = sch.cache_write(main, 0, "local")
    sch.reverse_compute_at(store, at_loop)
    for block in consumers:
        try:
            sch.reverse_compute_inline(block)  # bias/activation written from registers
        except s_tir.ScheduleError:
            break  # a non-injective consumer stays a loop nest of its own
    _vectorize_innermost_below(sch, store, at_loop)
    init = sch.decompose_reduction(main, first_reduction)
    _vectorize_innermost_below(sch, init, at_loop)
