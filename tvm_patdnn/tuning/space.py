"""The pattern-conv design space for meta_schedule.

meta_schedule's default space never tiles a block with two indirect loads (the channel gather
and the run offsets), so evolutionary search has nothing to evolve. This space exposes the knobs
that decide the pattern conv's speed, all as sampling instructions the mutators understand:

* row tile and column tile (``sample_perfect_tile`` over the padded output rows and the output
  vectors: the divisors of the sizes the compute already pads to), i.e. the register tile;
* filter blocking ``F = fo x fi`` with loop order ``fo, row blocks, fi``: ``fi = F`` keeps row
  blocks outermost (each input row block stays in cache for every filter), ``fi = 1`` puts
  filters outermost (each filter's weights stay in cache for every row), anything between
  blocks both;
* LLVM unroll depth of the whole nest (``sample_categorical`` read by ``MutateUnroll``);
* parallel granularity: two design spaces, threads over (filter blocks x row blocks) or also
  over the filters of a block.

Patterns, taps and the register tile are always unrolled (the tap offsets become constants) and
the output vector is always ``vector_width`` lanes wide (the compute pads rows to it). The
untuned rule (``schedule_rules.pattern_conv_cpu``) is one point of this space (its tiles,
``fi = F``, threads over row blocks, no unroll pragma); ``tune`` measures it first as a seed.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import meta_schedule as ms

from ..ops.pattern_conv import PATTERN_CONV_ATTR

__all__ = ["is_pattern_conv", "pattern_conv_space", "pattern_conv_space_generator"]

UNROLL_STEPS = [0, 16, 64, 512]
_MAX_TILE = 8  # accumulator vectors per tile dimension; their product is left to the cost model


def is_pattern_conv(func: tirx.PrimFunc) -> bool:
    return func.attrs is not None and PATTERN_CONV_ATTR in func.attrs


def _schedule(sch: s_tir.Schedule, vector_width: int, parallel_filters: bool) -> None:
    """The pattern-conv loop nest with sampled tile factors and unroll depth."""
    pad, acc, out = sch.get_sblock("pad"), sch.get_sblock("acc"), sch.get_sblock("out")
    n, c, _h, _phase, _q = sch.get_loops(pad)
    sch.parallel(sch.fuse(n, c))

    n, f, y, q, x, rp, rj, rt = sch.get_loops(acc)
    yo, yt = sch.split(y, sch.sample_perfect_tile(y, n=2, max_innermost_factor=_MAX_TILE))
    xv, xi = sch.split(x, [None, vector_width])
    xo, xt = sch.split(xv, sch.sample_perfect_tile(xv, n=2, max_innermost_factor=_MAX_TILE))
    fo, fi = sch.split(f, sch.sample_perfect_tile(f, n=2, max_innermost_factor=int(sch.get(f).extent)))
    sch.reorder(n, fo, yo, fi, xo, rp, rj, rt, q, yt, xt, xi)
    sch.parallel(sch.fuse(n, fo, yo, fi) if parallel_filters else sch.fuse(n, fo, yo))
    for loop in (rp, rt, q, yt, xt):
        sch.unroll(loop)
    sch.vectorize(xi)
    unroll = sch.sample_categorical(UNROLL_STEPS, [1.0 / len(UNROLL_STEPS)] * len(UNROLL_STEPS))
    sch.annotate(acc, "meta_schedule.unroll_explicit", unroll)
    store = sch.cache_write(acc, 0, "local")
    # Unit loops stay, so the number of loops (instruction outputs in the trace) is the same
    # for every tile size a mutator may pick.
    sch.reverse_compute_at(store, xo, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(store)[-1])
    init = sch.decompose_reduction(acc, rp)
    sch.vectorize(sch.get_loops(init)[-1])

    n, f, _y, _x = sch.get_loops(out)
    sch.parallel(sch.fuse(n, f))


def pattern_conv_space(sch: s_tir.Schedule) -> list[s_tir.Schedule]:
    """ScheduleFn body: one design space per parallel granularity."""
    vector_width = int(sch.mod["main"].attrs[PATTERN_CONV_ATTR]["vector_width"])
    spaces = []
    for parallel_filters in (False, True):
        space = sch.copy()
        _schedule(space, vector_width, parallel_filters)
        spaces.append(space)
    return spaces


def pattern_conv_space_generator() -> ms.space_generator.ScheduleFn:
    """The space with the postprocessor and mutators its sampling instructions need."""
    return ms.space_generator.ScheduleFn(
        pattern_conv_space,
        sch_rules=[],
        postprocs=[ms.postproc.RewriteParallelVectorizeUnroll()],
        mutator_probs={ms.mutator.MutateTileSize(): 0.9, ms.mutator.MutateUnroll(): 0.1},
    )
