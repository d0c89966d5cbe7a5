"""The pattern convolution of wide rows with few channels on AVX-512, without split loads.

The TE operator's fused layout (:mod:`.pattern_conv`) builds, per block of 7 output rows x 16 columns,
every channel's 9 padded rows x 18 columns (41 KB at 64 channels, in Zen 5's 48 KB L1) and reads a
tap (dy, dx) of an output vector as the 16 floats at column dx of row r + dy: with a pitch of 18
floats nearly every one of those 512-bit loads splits a cache line, and a split load costs two load
slots, so the kernel loop (~22 input loads per 28 FMAs) is load-bound.

Here the block keeps each padded row's 16 centre columns as one aligned vector and its two border
columns apart (36 + 4.6 KB at 64 channels): the centre tap (dx = 1) is the aligned vector, dx = 0
and dx = 2 are that vector shifted by one lane with the left or right border column in the free lane
(one ``vpermt2ps`` each): per kernel ~9 aligned loads, ~14 border scalars and ~14 shuffles instead of
~22 split loads. A C loop of the kernel's shape from L1 (7 rows, 4 taps, Zen 5): 105 GFLOP/s with
the split loads, 184 with the shuffles. The block's input comes from L3 in 64-byte pieces of 576
rows: the filter sweep of each block prefetches the lines of the column block :data:`SWEEP_PREFETCH`
ahead, a few per filter (without a prefetch the pad took a third of the 224x224 layer's time).

Everything else is the fused layout's: row blocks of 7 rows (8 for rows of 16, 32 or 56 columns)
share the threads, column blocks of 16 run inside them (where the row is not a multiple of 16 the
last block overlaps the one before it: every load and store a whole vector), the block's pad is
built just before every filter sweeps it, each filter's (filter, pattern) runs are found through
FKW's permutation (``inverse_order``), the register tile (7 or 8 vectors, on the stack so that it stays
in registers across the runs) is stored once with bias and ReLU.

Zen 5, 1 thread, interleaved against the TE operator's layouts, VGG-16 224 8x layers: alone 64x64
224x224 1.18-1.24x (1.09x without the pad prefetch), 128x64 112x112 1.45-1.47x, 128x128 112x112
1.29-1.31x (128 channels: the block, 81 KB, is in L2; the TE operator's lifted rows there); in the
trunk (per-call minima) 1.24x, 1.45x, 1.27x. Rows of 16, 32 and 56 columns with 8-row tiles (16 rows:
0.60-0.68x, spilled; 4 rows 0.87x), alone: VGG-16 CIFAR's 64x64 32x32 1.28-1.29x, 128x64 and 128x128
16x16 1.20x, ResNet-50's 64x64 56x56 1.20x (1.08-1.09x with the last block built and stored lane by
lane); in VGG-16 CIFAR (per-call minima of 61 inferences) 0.091 -> 0.067 ms (38 -> 52% of 268 GFLOP/s),
0.040 -> 0.037, 0.078 -> 0.067 ms, whole model 1.068x per round. Not taken: 56x56 above 128 channels
(256x128 1.02x, 256x256 0.96x), 28x28 at 128 channels 1.06-1.09x, at 512 1.04-1.05x, 14x14 0.91x (14
rows a tile; 7: 0.97x, 1.03x at 256 channels).

Session 18 (Zen 5, 1 thread, VGG-16 224's 64x64 224x224 in the pruned trunk, per-call minima, quiet box):
with the sweep's prefetch (:data:`SWEEP_PREFETCH`) and the left border from the pad 3.34-3.37 -> 3.05-3.09 ms
(1.08-1.105x; 51 -> 55-56% of 268 GFLOP/s). Synthetic weights with runs of 1, 2, 3 kernels a (filter,
pattern) fit ~18 cycles a kernel (28 FMAs: 14 at peak) plus ~0.85 ms fixed; the real irregular runs cost
within 1% of that fit (their data-dependent exits are not the limit). The output stores (12.8 MB, read for
ownership) are ~7% (all stores to 7 fixed lines: 1.07x, a measurement variant). Not kept: 8-row tiles
(0.97x), a write prefetch of the output lines a block ahead (0.99-1.01x), a row's two border floats as an
8-byte pair (no split border loads, every side tap a vpermt2ps: 0.95-0.98x), side taps reading the centre
vector again as integers (to get valignd instead of vpermt2ps + a copy: 0.85x).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..errors import PatDNNError
from .activation import bias_relu
from .pattern_conv import PATTERN_CONV_ATTR, PatternConvSpec, _spec_attr, fkw_arguments

__all__ = ["BORDER_VECTOR_CHANNELS", "WIDE_ROWS", "NARROW_ROWS", "NARROW_WIDTHS", "wide_rows_tile",
           "wide_rows_apply", "pattern_conv_wide_primfunc"]

WIDE_ROWS = 7  # output rows of the register tile (one 16-lane vector each) for rows of >= 112 columns
NARROW_ROWS = 8  # ... for rows of NARROW_WIDTHS columns (16 rows: 0.6-0.7x, 4 rows: 0.87-0.9x of 8)
NARROW_WIDTHS = (16, 32, 56)  # VGG-16 CIFAR's 16x16 and 32x32 layers, ResNet-50's 56x56
_LANES = 16
_MAX_CHANNELS = 128  # input channels, at most (64: the block in L1; 128: 81 KB, in L2, still 1.3x)
# The input lines of the column block SWEEP_PREFETCH ahead (the first line of each of its pad rows) are prefetched
# during the filter sweep of this block, the block's channels x rows spread evenly over its filters (9 lines a filter
# at 64 channels), into L1 (prefetcht0). Before (session 15-17) the pad prefetched the same lines two blocks ahead
# while it copied, 576 prefetches in a burst: that burst found the lines no sooner than the loads did (alone, the
# pad's prefetch off 0.97x). Zen 5, 1 thread, VGG-16 224's 64x64 224x224: with its pad skipped (a measurement
# variant, wrong results) the layer runs 1.30-1.39x faster, with the pad reading one column block's lines every time
# (in cache) 1.16-1.28x: most of the pad is the input's lines arriving from L3. Spread over the sweep, distance 2:
# alone 1.06-1.16x (three runs), in the trunk 1.13x; distance 1 0.96x (the right border's line arrives late), 1 with
# the next two lines 1.07-1.14x, 3 1.05x, prefetcht1/t2 1.05-1.15x, the sweep and the pad's burst 1.06x, the
# prefetches over the last half or quarter of the filters only 0.97-1.01x. Not kept: the next block's pad built
# during this sweep (two pad buffers, 82 KB) 0.83-0.86x; the three column-shifted copies of every pad row (each tap
# one aligned load, no shuffle; 110 KB, in L2) 0.84x.
SWEEP_PREFETCH = 2
# Layers of at most this many input channels read a row's side taps as one valignd of its centre vector and a
# border vector (16 floats from 2 x the row's slot in the compact border array: lane 0 the right border, lane 15
# the left one; a load that mostly splits a line, one for both sides). Zen 5, 1 thread, session 17, interleaved,
# two runs: ResNet-50's 64x64 56x56 1.10x / 1.10x (0.25 -> 0.23 ms, 43 -> 47% of 268 GFLOP/s), VGG-16 224's 64x64
# 224x224 1.05x, 128x64 112x112 1.02x, CIFAR's 64-channel 32x32 and 16x16 1.00-1.02x. With 128 channels 0.97-0.98x
# (CIFAR 128x128 16x16) and 1.00x (128x128 112x112): they keep a vpermt2ps with each border float broadcast. Border
# vectors of 16 floats a row (aligned, 64 bytes) 1.04-1.05x at 56x56: the block outgrew the L1.
BORDER_VECTOR_CHANNELS = 64


def wide_rows_tile(spec: PatternConvSpec) -> int:
    """The output rows of this kernel's register tile for ``spec``, 0 where it does not take ``spec``: 16 lanes,
    stride 1, padding 1, 4-tap patterns, at most 128 input channels, and either rows of at least 112 columns, a
    multiple of 16, and a multiple of :data:`WIDE_ROWS` rows (:data:`WIDE_ROWS`), or rows of one of
    :data:`NARROW_WIDTHS` columns and a multiple of :data:`NARROW_ROWS` rows (:data:`NARROW_ROWS`)."""
    if not (spec.vector_width == _LANES and spec.strides == (1, 1) and spec.padding == (1, 1, 1, 1)
            and spec.taps == 4 and spec.in_channels <= _MAX_CHANNELS and spec.n_kernels > 0):
        return 0
    if spec.out_width >= 112 and spec.out_width % _LANES == 0 and spec.out_height % WIDE_ROWS == 0:
        return WIDE_ROWS
    if spec.out_width in NARROW_WIDTHS and spec.out_height % NARROW_ROWS == 0:
        return NARROW_ROWS
    return 0


def wide_rows_apply(spec: PatternConvSpec) -> bool:
    """Whether this kernel computes ``spec`` (:func:`wide_rows_tile`)."""
    return wide_rows_tile(spec) > 0


def pattern_conv_wide_primfunc(spec: PatternConvSpec) -> tirx.PrimFunc:
    """The scheduled PrimFunc of one wide-row pattern conv (see the module docstring); the arguments of
    :func:`~tvm_patdnn.ops.pattern_conv.pattern_conv2d_primfunc`: data, values, channels, offsets,
    inverse_order (user filter -> FKW's stored filter), [bias], out; its register tile has
    :func:`wide_rows_tile` output rows."""
    if not wide_rows_apply(spec):
        raise PatDNNError("the wide-rows kernel takes 16 lanes, stride 1, padding 1, 4 taps, at most 128 channels, "
                          "rows of >= 112 columns (a multiple of 16) in blocks of 7 or rows of 16, 32 or 56 "
                          "columns in blocks of 8")
    n_, c_, h_, w_ = spec.batch, spec.in_channels, spec.height, spec.width
    rows = wide_rows_tile(spec)
    f_, lanes = spec.out_channels, _LANES
    block_rows, blocks, row_blocks = rows + 2, (w_ + _LANES - 1) // _LANES, h_ // rows
    border_vectors = c_ <= BORDER_VECTOR_CHANNELS  # the side taps from border vectors (valignd)
    zero = tirx.const(0.0, "float32")
    zeros = tirx.Broadcast(zero, lanes)
    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name("main")
            data, values, channels, offsets, inverse_order, bias, out = fkw_arguments(
                spec, spec.n_kernels, (n_, c_, h_, w_), (n_, f_, h_, w_), order="inverse_order")
            image = T.decl_buffer((n_ * c_ * h_ * w_,), "float32", data=data.data)
            outputs = T.decl_buffer((n_ * f_ * h_ * w_,), "float32", data=out.data)
            with T.parallel(0, n_ * row_blocks) as task:
                n, y0 = task // row_blocks, task % row_blocks * rows
                centre = T.decl_buffer((c_ * block_rows * lanes,), "float32")
                border = T.decl_buffer((c_ * block_rows * 2 + (lanes if border_vectors else 0),), "float32")
                with T.serial(0, blocks) as b:
                    x0 = b * lanes if w_ % lanes == 0 else tirx.min(b * lanes, w_ - lanes)  # the last overlaps
                    with T.serial(0, c_) as c:
                        for r in range(block_rows):
                            row = y0 + r - 1
                            inside = tirx.all(row >= 0, row < h_)
                            base = ((n * c_ + c) * h_ + tirx.min(tirx.max(row, 0), h_ - 1)) * w_
                            slot = c * block_rows + r
                            # The left border: where no column block overlaps the one before (W a multiple of 16),
                            # the last lane of that block's centre vector, still in this slot (in L1; its input line
                            # was in L2 by now): the border stores come before the centre's. Zen 5, 1 thread, VGG-16
                            # 224's 64x64 224x224: alone 1.035x, in the trunk 1.036x / 1.035x (per-call minima, two
                            # runs of 7 rounds; 3.17-3.26 -> 3.06-3.15 ms); 128x64 112x112 1.016x / 0.995-1.007x.
                            if w_ % lanes == 0:
                                left = tirx.Select(tirx.all(inside, x0 > 0), centre[slot * lanes + lanes - 1], zero)
                            else:
                                left = tirx.Select(tirx.all(inside, x0 > 0), image[base + tirx.max(x0 - 1, 0)], zero)
                            right = tirx.Select(tirx.all(inside, x0 + lanes < w_),
                                                image[base + tirx.min(x0 + lanes, w_ - 1)], zero)
                            if border_vectors:  # the 16 floats from 2 * slot: lane 0 this row's right border,
                                T.buffer_store(border, right, [slot * 2])  # lane 15 its left one (odd floats:
                                T.buffer_store(border, left, [slot * 2 + lanes - 1])  # the left borders 7 rows back)
                            else:
                                T.buffer_store(border, left, [slot * 2])
                                T.buffer_store(border, right, [slot * 2 + 1])
                            T.buffer_store(centre, tirx.Select(inside, image[tirx.Ramp(base + x0, 1, lanes)], zeros),
                                           [tirx.Ramp(slot * lanes, 1, lanes)])
                    with T.serial(0, f_) as f:
                        if SWEEP_PREFETCH and blocks > SWEEP_PREFETCH:  # filter f's share of the slots
                            slots = c_ * block_rows
                            with T.serial(f * slots // f_, (f + 1) * slots // f_) as i:
                                row = tirx.min(tirx.max(y0 + i % block_rows - 1, 0), h_ - 1)
                                base = ((n * c_ + i // block_rows) * h_ + row) * w_
                                ahead = tirx.min(x0 + SWEEP_PREFETCH * lanes, w_ - lanes)
                                T.evaluate(tirx.call_intrin("void", "tirx.prefetch", tirx.address_of(
                                    image[base + ahead]), 0, 3, 1))
                        _filter(spec, f, n, y0, x0, rows, block_rows, centre, border, values, channels, offsets,
                                inverse_order, bias, outputs, border_vectors)
    func = builder.get().without_attr("global_symbol")
    return func.with_attr(PATTERN_CONV_ATTR, {**_spec_attr(spec), "wide_rows": 1})


def _filter(spec, f, n, y0, x0, rows, block_rows, centre, border, values, channels, offsets, inverse_order, bias,
            outputs, border_vectors: bool = False) -> None:
    """One filter over one block: its runs into ``rows`` accumulators, stored with bias and ReLU; the side taps
    one ``valignd`` of the centre vector and the row's border vector (``border_vectors``), else a ``vpermt2ps``
    with the border float broadcast."""
    f_, p_, h_, w_, lanes = spec.out_channels, len(spec.patterns), spec.height, spec.width, _LANES
    zeros = tirx.Broadcast(tirx.const(0.0, "float32"), lanes)
    stored = inverse_order[f]
    acc = T.decl_buffer((rows * lanes,), "float32")  # on the stack: in registers across the runs
    for r in range(rows):
        T.buffer_store(acc, zeros, [tirx.Ramp(r * lanes, 1, lanes)])
    for p, pattern in enumerate(spec.patterns):
        start = offsets[stored * p_ + p]
        with T.serial(0, offsets[stored * p_ + p + 1] - start) as j:
            k = start + j
            channel = channels[k]

            def tap(r: int, dx: int, channel=channel):
                slot = channel * block_rows + r
                vector = centre[tirx.Ramp(slot * lanes, 1, lanes)]
                if dx == 1:
                    return vector
                if border_vectors:  # dx 0: lane 15 of the border vector, centre lanes 0-14; dx 2: lanes 1-15, lane 0
                    side = border[tirx.Ramp(slot * 2, 1, lanes)]
                    parts = [tirx.reinterpret(f"int32x{lanes}", part) for part in
                             ((side, vector) if dx == 0 else (vector, side))]
                    start = lanes - 1 if dx == 0 else 1  # a window of the two: on int32 lanes one valignd
                    return tirx.reinterpret(f"float32x{lanes}", tirx.Shuffle(parts, list(range(start, start + lanes))))
                if dx == 0:  # lane 0 the left border, lanes 1-15 centre lanes 0-14
                    return tirx.Shuffle([tirx.Broadcast(border[slot * 2], lanes), vector],
                                        [0] + list(range(lanes, 2 * lanes - 1)))
                return tirx.Shuffle([vector, tirx.Broadcast(border[slot * 2 + 1], lanes)], list(range(1, lanes + 1)))

            for t, (dy, dx) in enumerate(pattern):
                weight = tirx.Broadcast(values[k, t], lanes)
                for r in range(rows):
                    slots = tirx.Ramp(r * lanes, 1, lanes)
                    T.buffer_store(acc, acc[slots] + tap(r + dy, dx) * weight, [slots])
    for r in range(rows):
        value = bias_relu(acc[tirx.Ramp(r * lanes, 1, lanes)], None if bias is None else bias[f], spec.relu, lanes)
        first = ((n * f_ + f) * h_ + y0 + r) * w_ + x0
        T.buffer_store(outputs, value, [tirx.Ramp(first, 1, lanes)])
