"""The CPU schedule of the pattern convolution (x86 AVX2/AVX-512 and aarch64 NEON): one loop
nest for both the untuned default and the tuning design space.

Per register tile of output vectors (rows x columns x partial sums), the accumulators live in
registers while the loops over patterns, kernels and taps run; patterns, taps and the tile are
unrolled, so every tap offset is a constant, each kernel costs one channel index load plus one
vector FMA per tap and tile vector, and an input vector two taps of the tile share is loaded once.

The nest has four knobs (:class:`Knobs`; five for fused layouts: the pad's location). Following
dlight's ``apply(func, target, tunable)``, a tunable schedule *samples* them
(``sample_perfect_tile`` / ``sample_categorical`` / ``sample_compute_location``, which
meta_schedule's mutators understand) and the default *fixes* them to :func:`default_knobs`;
every other instruction is the same, so the default is the point of the space whose decisions
are the default knobs (``tests/test_pattern_schedule.py`` replays it). What the compute fixes
before scheduling (the padding of rows and columns to the layout's tile, the tap partial sums,
the flat small-image formulation) is not a knob: tiles are divisors of the padded extents.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from ..arith import largest_divisor
from ..ops.pattern_conv import PATTERN_CONV_ATTR, TALL_TILE, is_lifted, is_pattern_conv
from .kernel_runs import bound_kernel_runs

__all__ = ["ACCUMULATOR_SCOPE", "LIFTED_BLOCK_BYTES", "NARROW_TILE", "NARROW_TILE_AVX512", "NARROW_TILE_CHANNELS",
           "UNROLL_STEPS", "Knobs", "PatternConvCPU", "apply_default_schedule", "default_knobs",
           "schedule_pattern_conv_cpu"]

# LLVM unroll depth of the nest (meta_schedule's "unroll_explicit" annotation, MutateUnroll).
UNROLL_STEPS = (0, 16, 64, 512)
_MAX_TILE = 8  # accumulator vectors per tile dimension sampled at least; their product is left to the cost model
NARROW_TILE = (8, 1)  # (rows, vectors) of the register tile of fused layouts with few input channels
NARROW_TILE_CHANNELS = 64  # input channels, at most, for the NARROW_TILE
NARROW_TILE_AVX512 = (7, 1)  # the NARROW_TILE at 16 lanes (where it divides the rows)
# 16-lane lifted rows: a row block whose input (every channel's rows, halo included) takes more bytes than
# this (half of Zen 5's 1 MB L2) runs its column blocks outside the filters
LIFTED_BLOCK_BYTES = 512 * 1024
# Storage scope of the register tile's buffer. TVM 0.27 (LowerTVMBuiltin) keeps a small CPU buffer
# on the stack only in "global" scope; a "local" one is heap workspace (TVMBackendAllocWorkspace),
# whose pointer LLVM cannot promote to registers, so it stored all the tile's accumulators after
# every (filter, pattern) run. On the stack, SROA keeps the tile in registers from init to store.
ACCUMULATOR_SCOPE = "global"


@dataclass(frozen=True)
class Knobs:
    """One point of the pattern-conv space, in the order the nest samples it.

    ``rows`` = (row blocks, row tile) over the padded output rows; ``columns`` = (column
    blocks, column tile) over the output vectors of a row; ``filters`` = (filter blocks,
    filters run one after the other, filters interleaved over the threads) with loop order
    blocks > row blocks > interleaved > serial, so (1, F, 1) keeps row blocks outermost (a row
    block's inputs stay in cache for every filter), (B, F/B, 1) blocks the filters too (a
    block's weights stay in cache for every row) and (1, F/T, T) gives thread t the filters
    t, t+T, ...; ``columns`` = (column blocks outside the serial filters, column blocks inside
    them, column tile), so (B, 1, t) reuses a column block's input (all channels) across every
    filter before reading the next block's and (1, B, t) sweeps the whole row per filter;
    ``unroll`` indexes :data:`UNROLL_STEPS`; ``pad`` (fused layouts only, else None) is the
    pad's compute location as ``sample_compute_location`` decides it: 0 the row-block loop (each
    row block's padded rows, every channel and the halo, built just before its filters read them),
    1 the column blocks outside the filters (the block's columns only, stored compactly), -1 the
    whole padded image first (the space also reaches deeper loops and inlining).
    """

    rows: tuple[int, int]
    columns: tuple[int, int, int]
    filters: tuple[int, int, int]
    unroll: int = 0
    pad: int | None = None

    def decisions(self) -> list:
        """The knobs as the decisions of the space's sampling instructions, in trace order."""
        pad = [] if self.pad is None else [self.pad]
        return [list(self.rows), list(self.columns), list(self.filters), *pad, self.unroll]


def default_knobs(func: tirx.PrimFunc, threads: int, parallel_filters: bool | None = None,
                  columns_outside: bool | None = None, narrow_tile: bool = True) -> Knobs:
    """The untuned choice: the register tile the operator's layout was padded to; row blocks
    outermost; threads share the row blocks, and the filters too when there are fewer than two
    row blocks per thread (small images have one), thread t taking filters t, t+T, ... (FKW sorts
    filters by kernel count, so TVM's contiguous per-thread chunks would get unequal work), or
    contiguous chunks when the threads do not divide the filters. ``parallel_filters`` overrides
    when threads share the filters (``benchmarks/optimisations.py`` measures what it is worth).
    Column blocks run outside the filters for the AVX2 tall tile on wide rows (the layouts
    :func:`~tvm_patdnn.ops.pattern_conv.target_layout` gives it, more than one tile per row):
    1.09-1.15x on top of the tile at 224x224, 0.95-1.10x at 112x112 (Zen 3, 1 thread, three
    interleaved runs); elsewhere inside. ``columns_outside`` overrides. Fused layouts build
    their pad per column block (``pad`` 1): all channels of a block's 6 padded rows x 18 columns
    (27 KB at 64 channels, contiguous) stay in the 32 KB L1 while every filter reads them; with
    plain rows those 18 columns of each row touch 2-3 cache lines of a 226-float row, 61 KB.
    Zen 3, 1 thread, interleaved: 1.07x at 224x224, 1.15x and 1.21x at 112x112 over the pad per row
    block (``pad`` 0), which was 1.11x and 1.15x over the whole pad first with the same compute.
    Fused layouts of at most :data:`NARROW_TILE_CHANNELS` input channels take the
    :data:`NARROW_TILE` (8 rows x 1 vector, its pad block 64 x 10 rows x 10 columns: 26 KB):
    1.08-1.18x at 224x224 and 1.01-1.08x at 112x112 with 64 channels over the layout's 4 x 2
    (Zen 3, 1 thread, three interleaved runs of 11 rounds); at 128 channels 0.99x, so those keep
    4 x 2 (``narrow_tile=False`` keeps it everywhere).

    At 16 lanes (AVX-512) the narrow tile is :data:`NARROW_TILE_AVX512`, 7 rows x 1 vector (its pad
    block 64 x 9 rows x 18 columns, 41 KB, in Zen 5's 48 KB L1; 8 rows' is 46 KB): Zen 5, 1 thread,
    interleaved, 1.09-1.13x at 224x224 (three runs) and 1.02-1.04x at 112x112 with 64 channels over 8 x 1.
    16-lane lifted rows whose row block's input exceeds :data:`LIFTED_BLOCK_BYTES` run their column
    blocks outside the filters, so a column block's input, not the whole row block's, is what every
    filter re-reads from L2: VGG-16 224's 256-channel 56x56 (9 rows x 96 floats x 256 channels, 884 KB,
    beside 364 KB of weights in Zen 5's 1 MB L2; a column block's 442 KB) 1.04-1.16x in three
    interleaved runs, its 128x128 112x112 (9 x 160 floats x 128 channels, 737 KB) 1.00-1.12x in three;
    at 56x56 with 128 channels (442 KB) 0.95-1.00x in three, so it stays inside."""
    layout = func.attrs[PATTERN_CONV_ATTR]
    batch, filters, rows, _partials, columns = _acc_shape(func)
    row_tile, column_tile = int(layout["row_tile"]), int(layout["column_tile"])
    lanes = int(layout["vector_width"])
    vectors = columns // lanes
    pad_extents = _extents(func, "pad")
    in_channels = pad_extents[1]
    if columns_outside is None:
        columns_outside = (lanes in (8, 16) and (row_tile, column_tile) == TALL_TILE
                           and not int(layout["flat"]) and not int(layout["windows"]) and vectors > column_tile)
        if lanes == 16 and is_lifted(layout) and vectors > column_tile:
            block_rows = (row_tile - 1) * int(layout["strides"][0]) + 3
            block_bytes = 4 * in_channels * block_rows * pad_extents[3] * pad_extents[4]
            columns_outside = block_bytes > LIFTED_BLOCK_BYTES
    if narrow_tile and "fused" in layout and in_channels <= NARROW_TILE_CHANNELS:
        narrow = NARROW_TILE_AVX512 if lanes == 16 and rows % NARROW_TILE_AVX512[0] == 0 else NARROW_TILE
        if rows % narrow[0] == 0:
            row_tile, column_tile = narrow
    if parallel_filters is None:
        parallel_filters = batch * (rows // row_tile) < 2 * threads
    if threads == 1 or not parallel_filters:
        split = (1, filters, 1)
    elif filters % threads == 0:
        split = (1, filters // threads, threads)
    else:
        split = (1, 1, filters)
    blocks = vectors // column_tile
    columns_split = (blocks, 1, column_tile) if columns_outside else (1, blocks, column_tile)
    return Knobs((rows // row_tile, row_tile), columns_split, split, pad=1 if "fused" in layout else None)


def _acc_shape(func: tirx.PrimFunc) -> tuple[int, ...]:
    """(batch, filters, rows, partials, columns) of the accumulator the compute pads to."""
    return _extents(func, "acc")[:5]


def _extents(func: tirx.PrimFunc, block: str) -> tuple[int, ...]:
    """The loop extents of an unscheduled block of ``func``."""
    sch = s_tir.Schedule(func)
    return tuple(int(sch.get(loop).extent) for loop in sch.get_loops(sch.get_sblock(block)))


class PatternConvCPU(CPUScheduleRule):
    """Pattern-conv PrimFuncs on CPUs (others: not applicable).

    ``tunable``: the design space (sampled knobs, traced; the tuner's builder bounds the kernel
    runs after replay). Otherwise the default knobs for the target's core count, with the kernel
    runs bounded (:mod:`.kernel_runs`).
    """

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not is_pattern_conv(func) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        if tunable:
            schedule_pattern_conv_cpu(sch)
            return sch
        apply_default_schedule(sch, target)
        return s_tir.Schedule(bound_kernel_runs(sch.mod["main"]))


def apply_default_schedule(sch: s_tir.Schedule, target: Target) -> None:
    """The default knobs for ``target``'s cores, as a traceable schedule (the tuner measures it
    first, as a seed), before the kernel-run bounds."""
    schedule_pattern_conv_cpu(sch, default_knobs(sch.mod["main"], int(target.attrs.get("num-cores", 8))))


def schedule_pattern_conv_cpu(sch: s_tir.Schedule, knobs: Knobs | None = None, *, code_per_pattern: bool = True,
                              vector_output: bool = True, output_in_tile: bool = True,
                              accumulator_scope: str = ACCUMULATOR_SCOPE) -> None:
    """Schedule the blocks of :func:`~tvm_patdnn.ops.pattern_conv.pattern_conv2d_primfunc`:
    sampled knobs when ``knobs`` is None (the design space), else those.

    Loop order: filter blocks, row blocks, interleaved filters (these three share the threads),
    column blocks outside the filters, serial filters, column blocks inside them (one of the two
    column loops has extent 1 in the default); inside, the kernels of each pattern, and the
    register tile of rows x columns vectors (times the layout's partial sums) innermost.
    The output stage (filter order restored, partial sums added, bias and ReLU) is vectorised
    along each output row: left to LLVM, AVX-512 targets turned it into gathers and scatters. For
    lifted rows the pad is vectorised along the lanes (a gather M columns apart) and the output
    stage reads an accumulator vector and stores its lanes M apart (vectorised along the output
    row instead it gathered: pad and output stage took 13.3 ms instead of 5 at 224x224). At 16 lanes
    that loop over the segments is vectorised (a vector read of the accumulator, its lanes stored M
    apart) instead of unrolled: unrolled, LLVM vectorised the loop over the lane columns instead, into
    a gather of M accumulator lanes 64 bytes apart per M contiguous outputs, which took a quarter of
    a lifted layer's time; Zen 5, 1 thread, interleaved, per VGG-16 224 layer 1.20-1.39x at 112x112
    (128 channels), 1.27-1.28x (256) and 1.44x (128) at 56x56, 1.14-1.15x at 28x28.
    16-lane strided aligned rows build each column phase row of their pad in
    16-lane vectors (LLVM still moves the strided columns float by float, with less loop overhead): the
    scalar pad took 0.127 of ResNet-50's 128x128 56 -> 28 layer's 0.45 ms (Zen 5, 1 thread, kernel loop
    emptied), vectorised 0.080; the layer 1.125x alone and 1.11x in the model (0.485 -> 0.437 ms, per-call
    minima), 28 -> 14 1.02x; 8-lane strided layers (AVX2, NEON, AVX-512's 7-column ones) are unchanged.
    Fused layouts (``fused`` in the layout attribute) compute the pad where the ``pad`` knob says
    (per column block by default) and run the output stage under the register tile: the tile is
    stored once, with bias and ReLU, and no accumulator buffer remains.
    The register tile's buffer is in :data:`ACCUMULATOR_SCOPE`, so it stays in registers across
    the (filter, pattern) runs.
    ``code_per_pattern=False`` (pattern and tap loops not unrolled: every tap's offset looked up
    at run time), ``vector_output=False``, ``output_in_tile=False`` (a fused layout's output
    stage as a separate pass) and ``accumulator_scope="local"`` (the tile in heap workspace, stored
    after every run) exist to measure what they are worth (``benchmarks/optimisations.py``).
    """
    func = sch.mod["main"]
    layout = func.attrs[PATTERN_CONV_ATTR]
    vector_width = int(layout["vector_width"])
    pad, acc, out = sch.get_sblock("pad"), sch.get_sblock("acc"), sch.get_sblock("out")

    def tile(loop, n: int, limit: int, knob: str) -> list:
        if knobs is None:
            return sch.sample_perfect_tile(loop, n=n, max_innermost_factor=limit)
        return list(getattr(knobs, knob))

    n, c, _h, _phase, column = sch.get_loops(pad)
    sch.parallel(sch.fuse(n, c))
    lifted = is_lifted(layout)
    if lifted:  # each vector of a lifted row gathers one column from each of its 8 segments
        sch.vectorize(sch.split(column, [None, vector_width])[1])
    elif (vector_width == 16 and "aligned" in layout
          and any(int(s) > 1 for s in layout["strides"])):  # a phase row of 16-lane vectors from strided loads
        sch.vectorize(sch.split(column, [None, vector_width])[1])

    n, f, y, q, x, rp, rj, rt = sch.get_loops(acc)
    yo, yt = sch.split(y, tile(y, 2, max(_MAX_TILE, int(layout["row_tile"])), "rows"))
    xv, xi = sch.split(x, [None, vector_width])
    xo_outside, xo_inside, xt = sch.split(xv, tile(xv, 3, max(_MAX_TILE, int(layout["column_tile"])), "columns"))
    fb, fi, ft = sch.split(f, tile(f, 3, int(sch.get(f).extent), "filters"))
    sch.reorder(n, fb, yo, ft, xo_outside, fi, xo_inside, rp, rj, rt, q, yt, xt, xi)
    blocks = sch.fuse(n, fb, yo, ft)
    sch.parallel(blocks)
    if "fused" in layout:  # the pad where the knob says (a compute location), or the whole image first (-1)
        if knobs is None:
            sch.compute_at(pad, sch.sample_compute_location(pad), preserve_unit_loops=True)
        elif knobs.pad >= 0:
            sch.compute_at(pad, (blocks, xo_outside)[knobs.pad], preserve_unit_loops=True)
    for loop in (rp, rt, q, yt, xt) if code_per_pattern else (q, yt, xt):
        sch.unroll(loop)
    sch.vectorize(xi)
    # meta_schedule's postprocessor turns the annotation into LLVM unroll pragmas (the untuned
    # compile runs none: its 0, no unrolling, stays inert). A fixed value must be an IntImm: a
    # plain int does not come back from a database record as an expression the postprocessor reads.
    unroll = (sch.sample_categorical(list(UNROLL_STEPS), [1.0 / len(UNROLL_STEPS)] * len(UNROLL_STEPS))
              if knobs is None else tirx.IntImm("int32", UNROLL_STEPS[knobs.unroll]))
    sch.annotate(acc, "meta_schedule.unroll_explicit", unroll)
    store = sch.cache_write(acc, 0, accumulator_scope)
    # Unit loops stay, so the number of loops (instruction outputs in the trace) is the same
    # for every tile size a mutator may pick.
    sch.reverse_compute_at(store, xo_inside, preserve_unit_loops=True)
    fused = "fused" in layout and output_in_tile
    if fused:  # the output stage reads the register tile: no accumulator in memory
        sch.reverse_compute_at(out, xo_inside, preserve_unit_loops=True)
        sch.compute_inline(store)
        *_, yt_out, x = sch.get_loops(out)
        x_out, lanes = sch.split(x, [None, vector_width])
        sch.vectorize(lanes)
        sch.unroll(x_out)
        sch.unroll(yt_out)
    else:
        sch.vectorize(sch.get_loops(store)[-1])
    init = sch.decompose_reduction(acc, rp)
    sch.vectorize(sch.get_loops(init)[-1])
    if fused:
        return

    n, f, _y, x = sch.get_loops(out)
    sch.parallel(sch.fuse(n, f))
    if lifted:  # output column j*M + i is lane j of vector i: read a vector, store its lanes M apart
        segment, lane_column = sch.split(x, [None, _acc_shape(func)[4] // vector_width])
        sch.reorder(lane_column, segment)
        if vector_width == 16:  # unrolled, LLVM vectorised the lane columns into gathers of M lanes
            sch.vectorize(segment)
        else:
            sch.unroll(segment)
    elif vector_output:
        sch.vectorize(sch.split(x, [None, largest_divisor(int(sch.get(x).extent), vector_width)])[1])
