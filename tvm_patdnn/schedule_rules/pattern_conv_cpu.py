"""Default CPU schedule of the pattern convolution (x86 AVX2/AVX-512 and aarch64 NEON).

Per register tile of output vectors (rows x columns x partial sums, sized by the operator's
layout for the target's vector width and register count), the accumulators live in registers
while the loops over patterns, kernels and taps run; patterns, taps and the tile are unrolled,
so every tap offset is a constant, each kernel costs one channel index load plus one vector FMA
per tap and tile vector, and an input vector two taps of the tile share is loaded once.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from ..ops.pattern_conv import PATTERN_CONV_ATTR
from .kernel_runs import bound_kernel_runs


class PatternConvCPU(ScheduleRule):
    """The untuned CPU schedule of pattern-conv PrimFuncs (others: not applicable)."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if func.attrs is None or PATTERN_CONV_ATTR not in func.attrs or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        apply_default_schedule(sch, target)
        return s_tir.Schedule(bound_kernel_runs(sch.mod["main"]))


def apply_default_schedule(sch: s_tir.Schedule, target: Target) -> None:
    """:func:`schedule_pattern_conv_cpu` with the layout the operator was built with (a
    traceable schedule: the tuner replays it as its first candidate)."""
    layout = sch.mod["main"].attrs[PATTERN_CONV_ATTR]
    schedule_pattern_conv_cpu(sch, int(layout["vector_width"]), int(layout["column_tile"]), int(layout["row_tile"]),
                              threads=int(target.attrs.get("num-cores", 8)))


def schedule_pattern_conv_cpu(
    sch: s_tir.Schedule,
    vector_width: int,
    column_tile: int,
    row_tile: int,
    *,
    code_per_pattern: bool = True,
    parallel_filters: bool | None = None,
    threads: int = 8,
) -> None:
    """Apply the default CPU schedule to the blocks of :func:`pattern_conv2d_primfunc`.

    Loop order: row blocks outermost, then filters, so the few input rows a row block reads
    stay in cache while every filter uses them; inside, the kernels of each pattern, and the
    register tile of ``row_tile x column_tile`` vectors (times the layout's partial sums)
    innermost. Threads share the row blocks, and the filters too when there are fewer than two
    row blocks per thread (small images have one; with enough row blocks, adding the filters
    does not pay), each thread taking every T-th filter. ``code_per_pattern=False`` (pattern and tap loops
    not unrolled: every tap's offset looked up at run time) and ``parallel_filters`` exist to
    measure what those choices are worth (``benchmarks/optimisations.py``).
    """
    pad, acc, out = sch.get_sblock("pad"), sch.get_sblock("acc"), sch.get_sblock("out")

    n, c, h, phase, q = sch.get_loops(pad)
    sch.parallel(sch.fuse(n, c))

    n, f, y, q, x, rp, rj, rt = sch.get_loops(acc)
    yo, yt = sch.split(y, [None, row_tile])
    xo, xt, xi = sch.split(x, [None, column_tile, vector_width])
    sch.reorder(n, yo, f, xo, rp, rj, rt, q, yt, xt, xi)
    if parallel_filters is None:
        parallel_filters = int(sch.get(n).extent) * int(sch.get(yo).extent) < 2 * threads
    if parallel_filters and threads > 1 and int(sch.get(f).extent) % threads == 0:
        # Thread t takes filters t, t + T, t + 2T, ...: FKW sorts filters by kernel count, so
        # TVM's contiguous per-thread chunks of the filter loop would get unequal work.
        fo, fi = sch.split(f, [None, threads])
        sch.reorder(n, yo, fi, fo)
        sch.parallel(sch.fuse(n, yo, fi))
    elif parallel_filters:
        sch.parallel(sch.fuse(n, yo, f))
    else:
        sch.parallel(sch.fuse(n, yo))
    for loop in (rp, rt, q, yt, xt) if code_per_pattern else (q, yt, xt):
        sch.unroll(loop)
    sch.vectorize(xi)
    store = sch.cache_write(acc, 0, "local")
    sch.reverse_compute_at(store, xo)
    sch.vectorize(sch.get_loops(store)[-1])
    init = sch.decompose_reduction(acc, rp)
    sch.vectorize(sch.get_loops(init)[-1])

    n, f, y, x = sch.get_loops(out)
    sch.parallel(sch.fuse(n, f))
