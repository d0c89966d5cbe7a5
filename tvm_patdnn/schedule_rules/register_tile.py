"""The tail the CPU rules share: accumulate a register tile, then write it out with its epilogue."""

from __future__ import annotations

from tvm import s_tir


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
