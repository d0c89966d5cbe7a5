"""The pattern convolution blocked over input channels, for layers with many channels (AVX2).

The TE operator (:mod:`.pattern_conv`) runs, per register tile, every filter over all its kernels:
each kernel gathers a different input channel, so a filter's ~C/3.6 kernels touch that many
channels' tile rows (at 512 channels, 28x28: ~110 KB), more than the 32 KB L1, and every kernel's
input streams from L2 past the hardware prefetcher. Mapping every kernel's channel onto 8 channels
(the same instruction stream, L1-resident input) made VGG-16 224's 512x512 28x28 layer 1.51x
faster, 256x256 56x56 1.32x, 512x512 14x14 1.15x (Zen 3, 1 thread, interleaved).

Here, per register tile of the output, the input channels are taken in blocks of ``block``
channels whose tile input windows fit L1, and every filter sweeps a block before the next one is
touched: the block is read from L1 by all filters and only the weights stream, sequentially
(packed block -> filter -> kernel by :func:`blocked_weights`). A filter's tile accumulates in
registers over its kernels of the block, from zero, and is added to an accumulation buffer after
each block (loading the buffer before the block instead put its L2 latency on the FMAs' path:
1.08-1.09x at 256x256 56x56, Zen 3). The pad stage copies each tile's window of every channel
(``rows + 2`` lifted rows of ``columns + 2`` vectors: :mod:`.pattern_conv`'s lifted rows, cut per
tile) contiguously, so a block is one contiguous stretch of memory: reading the windows from the
whole lifted image instead left a third of the L1 misses in place (the cache sets of a block's rows
collide); with the image's channel pitch padded so that a block's windows fall on consecutive sets
it was 1.04x and 0.92x at 256x256 56x56 (its pad is half the work, its kernel loop 0.94x), and the
copy per (tile, block) just before the filters sweep it 0.95x.

A (filter, block) has only ~block/3.6 kernels, so the kernels of all patterns are one loop (a loop
per (filter, pattern) costs 20-60 cycles of set-up and mispredicted exits): each kernel carries
its 4 taps' offsets into the window (channel, row and column shift, precomputed at compile time),
so every tap is a broadcast weight and one aligned vector load per output vector of the tile; no
input vector is shared between taps, as the TE operator's constant tap offsets do at the price of
a loop per pattern.

Cycles, per kernel of a 14-vector tile: 56 FMAs (28 cycles on two FMA pipes), 56 aligned vector
loads + 4 broadcasts + 4 offsets (32 cycles at two vector loads a cycle); a C loop of that shape
from L1 ran at 1.0 FMA a cycle with 8 accumulators and 1.5 with 12 (Zen 3), so the loop is
load-bound. Per (filter, block) run add ~65 cycles (256x256 56x56 with L1-resident input, blocks
of 14 to 256 channels: ~37 cycles a kernel, ~65 a run; accumulators stored, a mispredicted exit)
for ~7 kernels a run. Runs ordered by kernel count within a block (so the exit branch's trip
counts repeat) measured 1.13x and 0.97x, and 1.02-1.03x on top of the zero start.

Wide images (VGG-16 224's 112x112 and 224x224 layers, 64-128 channels) stay on the TE operator: the
per-tile windows are 2.6x the input there (4 rows for 2, 9 vectors for 7), and with the image-sized
accumulation buffer the layout moves an estimated ~130 MB at 64x64 224x224 (0.48-0.68x the TE operator).
Built and measured in session 12 (Zen 3, 1 thread, interleaved against the TE operator of commit 45134fb),
none kept: the windows of a tile gathered by its own thread just before its filters, outputs stored from
registers (one run: 64x64 224x224 0.80x, 128x64 112x112 0.80x, 128x128 112x112 1.06x; at 224x224 the
kernel loop ran 7.8 ms against the TE operator's whole 12.6, the gather took 6 ms and the outputs 4); the
windows read straight from a lifted image, outputs stored per row band of all filters (one run,
0.64-0.92x: the loop slower than from copied windows); that image copied per tile with vector loads,
outputs per band (2x7 tiles, blocks of 28, two runs: 64x64 224x224 0.81x, 0.75x; 128x64 112x112 0.92x,
0.93x; 128x128 112x112 1.01x, 1.00x; at 224x224 the lifted image 2 ms, the tile copies 4.2, the outputs
3.7, the kernel loop 10.7 of 20.7 ms).

The tile computes the fewest padded vectors: 7x2 at 14 and 28 columns, 2x7 (whole lifted rows of 7
vectors) at 56, where 7x2 rounds the row up to 8 vectors. Stride 1 only. The epilogue (filter
order, lifted-lane scatter, bias, ReLU) runs once per output (in the tile loop, from L1, after the
last block, it was 0.89-0.95x); it reads whole accumulator vectors and stores their lanes M columns
apart: 0.21 ms at 256x256 56x56, against 1.68 ms with one scalar load, index division and store
per output (Zen 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..arith import ceil_div, round_up
from ..fkw import FKWWeight
from .activation import bias_relu
from .pattern_conv import PATTERN_CONV_ATTR, PatternConvSpec, _spec_attr

__all__ = ["BLOCKED_CHANNELS", "BLOCKED_WIDTHS", "BlockedLayout", "LANES", "ROUTED_LANES", "WHOLE_ROW_WIDTH",
           "blocked_applies", "blocked_layout", "blocked_weights", "pattern_conv_blocked_primfunc"]

LANES = (8, 16)  # fp32 lanes it is built for: AVX2, AVX-512
ROUTED_LANES = 8  # the lanes of the targets whose layers take it (blocked_applies)
# register tile vectors by lanes: the vector registers (AVX2 16, AVX-512 32) less the broadcast weight and a spare
ACCUMULATORS = {8: 14, 16: 28}
# A channel block's tile input windows: Zen 3's 32 KB L1 (7x2 tiles, 512 channels: blocks for 16, 24, 32 and
# 48 KB measured 0.87x, 0.95x, 1x and 0.99x at 28x28, 0.88x, 0.95x, 1x, 0.97x at 14x14)
L1_BLOCK_BYTES = 32 * 1024
BLOCKED_CHANNELS = 256  # input channels from which a layer takes this kernel (half that from WHOLE_ROW_WIDTH)
WHOLE_ROW_WIDTH = 56  # output columns from which 128 input channels take it (its 2x7 tile: whole lifted rows)
BLOCKED_WIDTHS = range(14, 57)  # output widths of the layers that take it


@dataclass(frozen=True)
class BlockedLayout:
    """The channel-blocked kernel's layout of one pattern conv: its register tile (output rows x
    lifted column vectors) and the input channels per block."""

    spec: PatternConvSpec
    row_tile: int
    column_tile: int
    block: int

    @property
    def lanes(self) -> int:
        return self.spec.vector_width

    @property
    def vectors(self) -> int:
        """M, output columns per lane of a lifted row (vectors per output row), a whole number of tiles."""
        return round_up(ceil_div(self.spec.out_width, self.lanes), self.column_tile)

    @property
    def acc_rows(self) -> int:
        return round_up(self.spec.out_height, self.row_tile)

    @property
    def row_pitch(self) -> int:
        """Floats per row of a tile's input window: the tile's column vectors and the 2-vector halo."""
        return (self.column_tile + 2) * self.lanes

    @property
    def channel_pitch(self) -> int:
        """Floats per channel of a tile's input window (``row_tile + 2`` rows)."""
        return (self.row_tile + 2) * self.row_pitch

    @property
    def blocks(self) -> int:
        return ceil_div(self.spec.in_channels, self.block)

    @property
    def tiles(self) -> int:
        """Register tiles per image."""
        return self.acc_rows // self.row_tile * (self.vectors // self.column_tile)


def blocked_applies(spec: PatternConvSpec) -> bool:
    """Whether a layer takes the channel-blocked kernel: AVX2 (:data:`ROUTED_LANES`), stride 1, padding 1,
    4-tap patterns, output rows of :data:`BLOCKED_WIDTHS` columns, at least :data:`BLOCKED_CHANNELS` input
    channels (half that from :data:`WHOLE_ROW_WIDTH` columns). Zen 3, 1 thread, TE operator / this
    kernel, interleaved (``benchmarks/pattern_blocked.py``, 3-5 runs on a shared box): VGG-16 224's
    512x512 28x28 1.33-1.65x, 512x512 14x14 1.38-1.48x, 256x256 56x56 1.16-1.36x, 256x128 56x56
    1.12-1.51x, 512x256 28x28 0.99-1.43x (1.29x, 1.43x, 1.14x, 1.04x, 0.99x); session 11's 256x256
    14x14 1.18-1.23x. Not taken: 128x128 28x28 0.74-1.02x, 64x64 56x56 0.88-0.99x, 512x512 7x7
    1.02-1.13x, CIFAR's 32x32 0.79x, 16x16 0.84-1.00x, 8x8 1.10-1.12x (its shipped records stay),
    4x4 0.68-0.77x; VGG-16 224's 112x112 and 224x224 layers (64x64 224x224 0.48-0.68x, 128x128
    112x112 0.71-0.97x; the wide-image variants of the module docstring 0.64-1.06x).

    Not on AVX-512: built for 16 lanes (28-vector tiles) on Zen 5, 1 thread, one interleaved run
    (session 14), it lost to the layouts :func:`.pattern_conv.target_layout` now gives those
    layers: 56x56 0.84-0.92x, 28x28 0.81-0.88x, 14x14 0.82-0.85x (against the cost model's
    layouts, the default before: 56x56 0.87-1.90x, 28x28 0.81-0.88x, 14x14 0.93-0.96x)."""
    channels = BLOCKED_CHANNELS // (2 if spec.out_width >= WHOLE_ROW_WIDTH else 1)
    return (spec.vector_width == ROUTED_LANES and spec.strides == (1, 1) and spec.padding == (1, 1, 1, 1)
            and spec.taps == 4 and spec.out_width in BLOCKED_WIDTHS and spec.in_channels >= channels)


def blocked_layout(spec: PatternConvSpec, row_tile: int | None = None, column_tile: int | None = None,
                   block: int | None = None) -> BlockedLayout:
    """The layout of ``spec``: unless given, the tile of up to :data:`ACCUMULATORS` vectors that
    computes the fewest padded vectors, then reads the least window per output vector (14x14 and
    28x28: 7x2; 56x56: 2x7, whole rows of 7 vectors, where 7x2 rounds the 7 up to 8: 1.11x), and the
    largest channel block whose tile input windows fit :data:`L1_BLOCK_BYTES`."""
    lanes = spec.vector_width
    needed, accumulators = ceil_div(spec.out_width, lanes), ACCUMULATORS[lanes]
    if row_tile is None or column_tile is None:
        tiles = [(r, c) for c in range(1, min(needed, accumulators) + 1) for r in range(1, accumulators // c + 1)
                 if (row_tile or r) == r and (column_tile or c) == c and r <= spec.out_height]
        row_tile, column_tile = min(tiles, key=lambda t: (round_up(spec.out_height, t[0]) * round_up(needed, t[1]),
                                                          (t[0] + 2) * (t[1] + 2) / (t[0] * t[1])))
    row_tile = min(row_tile, spec.out_height)
    if block is None:
        block = max(1, L1_BLOCK_BYTES // ((row_tile + 2) * (column_tile + 2) * lanes * 4))
    return BlockedLayout(spec, row_tile, column_tile, min(block, spec.in_channels))


def blocked_weights(fkw: FKWWeight, layout: BlockedLayout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, taps, starts): FKW's kernels in block -> (stored) filter -> kernel order, each with
    its 4 tap offsets into a tile's input windows (channel, row, column vector), and ``starts[b * F + f]``
    the first kernel of filter ``f`` in block ``b``."""
    n_patterns = len(fkw.patterns)
    counts = np.diff(fkw.offsets)
    pattern = np.repeat(np.arange(len(counts)) % n_patterns, counts)
    filters = np.repeat(np.arange(len(counts)) // n_patterns, counts)
    block_of = fkw.channels // layout.block
    kernels = np.lexsort((np.arange(len(filters)), filters, block_of))  # stable: block, filter, FKW order
    shift = np.array([[dy * layout.row_pitch + dx * layout.lanes for dy, dx in taps] for taps in fkw.patterns],
                     np.int64)
    taps = fkw.channels[kernels, None].astype(np.int64) * layout.channel_pitch + shift[pattern[kernels]]
    runs = block_of[kernels] * fkw.out_channels + filters[kernels]
    starts = np.searchsorted(runs, np.arange(layout.blocks * fkw.out_channels + 1)).astype(np.int32)
    return fkw.values[kernels], taps.astype(np.int32), starts


def pattern_conv_blocked_primfunc(layout: BlockedLayout, threads: int = 1) -> tirx.PrimFunc:
    """The scheduled PrimFunc of one stride-1 pattern conv on AVX2 or AVX-512 (see the module docstring).
    Arguments: data, values, taps, starts (:func:`blocked_weights`), order (FKW's: stored filter ->
    output channel), [bias], out. Threads take (image, tile, filter group) tasks; with fewer tiles
    than twice ``threads`` the filters are split in ``threads`` interleaved groups."""
    spec, lanes = layout.spec, layout.lanes
    if spec.strides != (1, 1) or spec.taps != 4:
        raise ValueError("the channel-blocked pattern conv takes stride 1 and 4-tap patterns")
    n_, c_, f_ = spec.batch, spec.in_channels, spec.out_channels
    h_, w_, top, left = spec.height, spec.width, spec.padding[0], spec.padding[1]
    oh, ow = spec.out_height, spec.out_width
    m, rt, ct = layout.vectors, layout.row_tile, layout.column_tile
    rp, cp, nb = layout.row_pitch, layout.channel_pitch, layout.blocks
    acc_pitch = m * lanes  # floats per accumulator row (lifted order, like the input)
    tiles_x = m // ct
    tiles = n_ * layout.tiles
    groups = threads if tiles < 2 * threads else 1
    kernels = max(1, spec.n_kernels)
    zero = tirx.const(0.0, "float32")
    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name("main")
            data = T.arg("data", T.buffer((n_, c_, h_, w_), "float32"))
            values = T.arg("values", T.buffer((kernels, 4), "float32"))
            taps = T.arg("taps", T.buffer((kernels, 4), "int32"))
            starts = T.arg("starts", T.buffer((nb * f_ + 1,), "int32"))
            order = T.arg("order", T.buffer((f_,), "int32"))
            bias = T.arg("bias", T.buffer((f_,), "float32")) if spec.has_bias else None
            out = T.arg("out", T.buffer((n_, f_, oh, ow), "float32"))
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            # per (image, tile, channel) the tile's input window, lifted: window[.., y, v * 8 + j] is padded
            # row y0 + y, column j * M + x0 + v (x0: the tile's first vector); a block's windows are contiguous
            windows = T.decl_buffer((tiles * c_ * cp,), "float32", align=64)
            accbuf = T.decl_buffer((n_ * f_ * layout.acc_rows * acc_pitch,), "float32", align=64)

            with T.parallel(0, tiles * c_) as tc:
                tile, c = tc // c_, tc % c_
                n, tile_y, tile_x = tile // layout.tiles, tile % layout.tiles // tiles_x, tile % tiles_x
                with T.serial(0, rt + 2) as y:
                    with T.serial(0, ct + 2) as v:
                        with T.vectorized(0, lanes) as j:
                            row, column = tile_y * rt + y - top, j * m + tile_x * ct + v - left
                            inside = tirx.all(row >= 0, row < h_, column >= 0, column < w_)
                            value = tirx.if_then_else(inside, data[n, c, row, column], zero)
                            T.buffer_store(windows, value, [tc * cp + y * rp + v * lanes + j])

            with T.parallel(0, tiles * groups) as task:
                group, tile = task % groups, task // groups
                n, tile_y, tile_x = tile // layout.tiles, tile % layout.tiles // tiles_x, tile % tiles_x
                base = tile * c_ * cp
                acc_base = tile_y * rt * acc_pitch + tile_x * ct * lanes
                acc = T.decl_buffer((rt * ct * lanes,), "float32", scope="local")
                slots = [(r, c, tirx.Ramp((r * ct + c) * lanes, 1, lanes)) for r in range(rt) for c in range(ct)]
                with T.serial(0, nb) as b:
                    with T.serial(0, ceil_div(f_, groups)) as fi:
                        f = fi * groups + group
                        with T.If(f < f_):
                            with T.Then():
                                run = b * f_ + f
                                first = (n * f_ + f) * layout.acc_rows * acc_pitch + acc_base
                                for r, c, s in slots:
                                    T.buffer_store(acc, tirx.Broadcast(zero, lanes), [s])
                                start = starts[run]
                                with T.serial(0, starts[run + 1] - start) as j:
                                    k = start + j
                                    for t in range(4):
                                        weight = tirx.Broadcast(values[k, t], lanes)
                                        at = base + taps[k, t]
                                        for r, c, s in slots:
                                            tap = windows[tirx.Ramp(at + r * rp + c * lanes, 1, lanes)]
                                            T.buffer_store(acc, acc[s] + weight * tap, [s])
                                for r, c, s in slots:  # the earlier blocks' sum, loaded off the FMAs' path
                                    slot = tirx.Ramp(first + r * acc_pitch + c * lanes, 1, lanes)
                                    kept = tirx.Select(b > 0, accbuf[slot], tirx.Broadcast(zero, lanes))
                                    T.buffer_store(accbuf, acc[s] + kept, [slot])

            with T.parallel(0, n_ * f_) as nf:  # epilogue: user's filter order, lifted lanes back to columns
                fo = order[nf % f_]
                lane_values = T.decl_buffer((lanes,), "float32", scope="local")
                with T.serial(0, oh) as y:
                    with T.serial(0, m) as i:  # one accumulator vector, its lane j to column j * M + i
                        vector = accbuf[tirx.Ramp((nf * layout.acc_rows + y) * acc_pitch + i * lanes, 1, lanes)]
                        value = bias_relu(vector, None if bias is None else bias[fo], spec.relu, lanes)
                        T.buffer_store(lane_values, value, [tirx.Ramp(0, 1, lanes)])
                        for j in range(min(lanes, ceil_div(ow, m))):
                            with T.If(j * m + i < ow):
                                with T.Then():
                                    T.buffer_store(out, lane_values[j], [nf // f_, fo, y, j * m + i])
    func = builder.get().without_attr("global_symbol")
    return func.with_attr(PATTERN_CONV_ATTR, {**_spec_attr(spec), "blocked": 1, "block": layout.block,
                                              "row_tile": rt, "column_tile": ct})
