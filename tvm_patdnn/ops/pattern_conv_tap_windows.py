"""The pattern convolution of 14x14 -> 7x7 stride-2 layers on per-channel tap windows in channel blocks (AVX-512):
the patterns are data, not code.

A 7x7 output is computed as an 8x8 square (4 vectors of 2 rows; 77% of the lanes useful). For each input channel
the 9 windows a tap (dy, dx) can read are stored as such squares: window (dy, dx) at square pixel (y, x) holds
input pixel (s y + dy - 1, s x + dx - 1), zero outside the input and in the square's last row and column (9 x 4
aligned vectors, 2.3 KB a channel). Every tap of every pattern is then 4 aligned vectors at ``block base + the
kernel's tap offset`` (channel in its block x 576 + window x 64 floats, precomputed at compile time as 4 int16
offsets, read as one int64 a kernel), so kernels run per (filter, channel block) whatever their patterns: runs of
~4.4 kernels for ResNet-50's 512-channel layer (density 0.28, 16-channel blocks). The shifted-rows kernel
(:mod:`.pattern_conv_shifted_rows`) runs per (filter, pattern), each pattern's taps code constants, shuffling every
tap from the channel's 4 phase planes (512 KB for 512 channels, read from L2), and a channel-blocked sweep of it
ran (filter, pattern, block) runs of ~1 kernel (0.46-0.90x alone, session 17).

Loop nest: per image, per block of :data:`TAP_WINDOW_BLOCK` input channels, each thread builds the block's windows
into its own buffer (37 KB: it stays in L1; per vector whole-vector loads of the input rows and one permutation with
zeros), then runs its filters' kernels of that block; a filter's 4 output vectors are loaded from and stored back to
a per-filter partial-sum buffer (zero for the first block; bias, ReLU and the output store after the last). A run
alternates its taps between two sets of the 4 accumulators (8 FMA chains), summed at its end. Per kernel: one
int64 of offsets, 4 weight broadcasts, 16 FMAs each with an aligned load from L1, and a prefetch of the weights
and offsets :data:`TAP_WINDOW_PREFETCH` kernels ahead. Kernels are stored (channel block, filter)-major, channel
ascending, so the weights stream in order; each thread takes a contiguous range of filters, which
:func:`tap_windows_weights` fills with balanced kernel counts.

Zen 5, 1 thread, ResNet-50's 512 14 -> 7 layer with the pruned model's weights (72,818 kernels, 28.5 MFLOP),
against the shifted-rows kernel, interleaved in one process (session 18): alone 0.319-0.341 -> 0.276-0.298 ms
(1.14-1.16x; 31-32 -> 36-38% of 268 GFLOP/s); in the pruned ResNet-50 (per-call minima, 9 rounds) 0.351 -> 0.318
and 0.346 -> 0.329 ms (1.106x / 1.050x). Where the time goes alone: windows 0.012 ms, partial sums, run set-up and
output 0.030-0.047 ms, the kernel loop ~0.23 ms (~12-13 cycles a kernel for 16 FMAs: with every tap reading one
channel's windows 0.97x, with runs of a fixed length the same per kernel: neither L1 misses nor the runs' exit
branches bound it). Measured and not kept: 8-, 12-, 20- and 24-channel blocks (0.90x, 0.95x, 0.98x, 0.91x of 16);
4 accumulator sets (0.78-0.88x); the 4 weights as one 128-bit load broadcast in registers (1.00x); int16 offsets
loaded one by one (0.98-0.99x alone, 0.97x in the model), uint8 window indices (0.99x); no prefetch (1.03x alone,
0.95x in the model), 32, 128 or 256 kernels ahead (within 1% of 64). The 7x7 stride-1 layers on this kernel ran
0.63-0.69x of the shifted-rows kernel (whose 7x7 taps shuffle from the channel's own 4 vectors, in L1): not taken.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..errors import PatDNNError
from .activation import bias_relu
from .pattern_conv import PATTERN_CONV_ATTR, PatternConvSpec, _spec_attr
from .pattern_conv_phases import gathered_windows
from .pattern_conv_shifted_rows import _output_vectors

__all__ = ["TAP_WINDOW_BLOCK", "TAP_WINDOW_PREFETCH", "TAP_WINDOW_SIZES", "tap_windows_apply", "tap_windows_weights",
           "pattern_conv_tap_windows_primfunc"]

_LANES = 16
_SIDE = 8  # the square a 7x7 output is computed in
_VECTORS = _SIDE * _SIDE // _LANES
_WINDOW = _SIDE * _SIDE  # floats a window
_CHANNEL = 9 * _WINDOW  # floats a channel's windows
_SETS = 2  # accumulator sets a run alternates its taps between
# Input channels a block: 16 x 2.3 KB of windows in the 48 KB L1
TAP_WINDOW_BLOCK = 16
# Each kernel prefetches the weights and offsets of the kernel this many ahead (0: none): the 512-channel layer's
# 1.75 MB of them come from DRAM in the model
TAP_WINDOW_PREFETCH = 64
# (input side, stride) it is routed for
TAP_WINDOW_SIZES = frozenset({(14, 2)})


def tap_windows_apply(spec: PatternConvSpec, target_lanes: int, sizes=None) -> bool:
    """Whether this kernel computes ``spec``: 16 lanes, 7x7 outputs from a square input (stride 1 or 2),
    padding 1, 4-tap patterns, and (``sizes`` None) an (input side, stride) of :data:`TAP_WINDOW_SIZES`
    (``"any"``: any)."""
    sizes = TAP_WINDOW_SIZES if sizes is None else sizes
    if not (target_lanes == _LANES and spec.strides in ((1, 1), (2, 2)) and spec.padding == (1, 1, 1, 1)
            and spec.taps == 4 and spec.n_kernels > 0 and spec.height == spec.width
            and spec.out_height == spec.out_width == 7):
        return False
    return sizes == "any" or (spec.height, spec.strides[0]) in sizes


def _block(spec: PatternConvSpec) -> int:
    block = min(TAP_WINDOW_BLOCK, spec.in_channels)
    if not 0 < block * _CHANNEL <= 1 << 16:
        raise PatDNNError(f"the tap-window kernel's offsets are 16-bit: {block} channels a block do not fit")
    return block


def tap_windows_weights(fkw, spec: PatternConvSpec, threads: int = 1):
    """(values, offsets, runs, order) of ``fkw`` for this kernel. Kernels are stored (channel block, filter)-major,
    channel ascending; ``offsets[k]`` (int32 pairs: one int64 a kernel) holds the float offsets of its 4 taps'
    windows from its block's in 16-bit fields (tap t at bit 16 t); ``runs[b * F + f]`` is the first kernel of
    (block b, stored filter f); ``order`` maps stored filters to output channels: FKW's, or with more threads
    rearranged so that thread t's range of stored filters (t F // threads ..) holds its share of the kernels."""
    block = _block(spec)
    blocks = -(-spec.in_channels // block)
    f_, p_ = fkw.out_channels, len(fkw.patterns)
    per_pattern = np.diff(fkw.offsets)
    kept = per_pattern.reshape(f_, p_).sum(axis=1)
    place = np.arange(f_)  # FKW filter -> stored filter
    if threads > 1:  # the heaviest filter first, to the thread with fewest kernels that has room
        ends = [(t + 1) * f_ // threads for t in range(threads)]
        filled, load = [t * f_ // threads for t in range(threads)], [0] * threads
        for f in np.argsort(-kept, kind="stable"):
            t = min((t for t in range(threads) if filled[t] < ends[t]), key=lambda t: load[t])
            place[f], load[t], filled[t] = filled[t], load[t] + kept[f], filled[t] + 1
    order = np.empty(f_, np.int32)
    order[place] = fkw.order
    filters = place[np.repeat(np.arange(f_ * p_) // p_, per_pattern)]
    pattern = np.repeat(np.arange(f_ * p_) % p_, per_pattern)
    channels = fkw.channels.astype(np.int64)
    blocks_of = channels // block
    sort = np.lexsort((pattern, channels, filters, blocks_of))
    table = np.zeros((p_, 4), np.int64)
    for p, taps in enumerate(fkw.patterns):
        if len(taps) != 4:
            raise PatDNNError(f"the tap-window kernel takes 4-tap patterns; pattern {p} has {len(taps)}")
        for t, (dy, dx) in enumerate(taps):
            table[p, t] = (dy * 3 + dx) * _WINDOW
    offsets = ((channels % block)[:, None] * _CHANNEL + table[pattern])[sort]
    offsets = np.ascontiguousarray(offsets.astype("<u2")).view("<i4")  # (kernels, 2): one int64 a kernel
    counts = np.zeros(blocks * f_, np.int64)
    np.add.at(counts, blocks_of * f_ + filters, 1)
    runs = np.zeros(blocks * f_ + 1, np.int32)
    runs[1:] = np.cumsum(counts)
    return np.ascontiguousarray(fkw.values[sort]), offsets, runs, order


def _window_vectors(side: int, stride: int) -> dict:
    """(window, vector) -> (input windows, permutation index): lane i of vector q of window (dy, dx) is input
    pixel (s y + dy - 1, s x + dx - 1) of the flat channel for square pixel (y, x) = (2 q + i // 8, i % 8), zero
    outside the input and for y or x = 7 (index 16 x the windows)."""
    lanes, total, result = _LANES, side * side, {}
    for dy in range(3):
        for dx in range(3):
            for q in range(_VECTORS):
                wanted = []
                for i in range(lanes):
                    y, x = 2 * q + i // _SIDE, i % _SIDE
                    row, column = stride * y + dy - 1, stride * x + dx - 1
                    inside = y < 7 and x < 7 and 0 <= row < side and 0 <= column < side
                    wanted.append(row * side + column if inside else None)
                result[dy * 3 + dx, q] = gathered_windows(wanted, total, lanes)
    return result


def _build_windows(source, windows, channel, first, side: int, table) -> None:
    """The 9 windows of input channel ``channel`` (over all images' channels), from float ``first`` on."""
    lanes = _LANES
    zero = tirx.Broadcast(tirx.const(0.0, "float32"), lanes)
    base = channel * side * side
    for w in range(9):
        for q in range(_VECTORS):
            starts, index = table[w, q]
            parts = [source[tirx.Ramp(base + start, 1, lanes)] for start in starts]
            value = tirx.Shuffle(parts + [zero], index) if parts else zero
            T.buffer_store(windows, value, [tirx.Ramp(first + w * _WINDOW + q * lanes, 1, lanes)])


def pattern_conv_tap_windows_primfunc(spec: PatternConvSpec, threads: int = 1, lanes: int = _LANES,
                                      sizes=None) -> tirx.PrimFunc:
    """The scheduled PrimFunc (see the module docstring); arguments data, values, offsets, runs, order
    (:func:`tap_windows_weights` for the same ``threads``), [bias], out."""
    if not tap_windows_apply(spec, lanes, sizes):
        raise PatDNNError("the tap-window kernel takes 16 lanes, 7x7 outputs at stride 1 or 2 from square inputs, "
                          f"padding 1, 4 taps; got {spec.height}x{spec.width} -> {spec.out_height}x{spec.out_width}, "
                          f"strides {spec.strides}, padding {spec.padding}, {spec.taps} taps at {lanes} lanes")
    n_, c_, side, f_ = spec.batch, spec.in_channels, spec.height, spec.out_channels
    block = _block(spec)
    blocks = -(-c_ // block)
    table = _window_vectors(side, spec.strides[0])
    zeros = tirx.Broadcast(tirx.const(0.0, "float32"), lanes)
    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name("main")
            data = T.arg("data", T.buffer((n_, c_, side, side), "float32"))
            values = T.arg("values", T.buffer((spec.n_kernels, 4), "float32"))
            pairs = T.arg("offsets", T.buffer((spec.n_kernels, 2), "int32"))
            runs = T.arg("runs", T.buffer((blocks * f_ + 1,), "int32"))
            order = T.arg("order", T.buffer((f_,), "int32"))
            bias = T.arg("bias", T.buffer((f_,), "float32")) if spec.has_bias else None
            out = T.arg("out", T.buffer((n_, f_, 7, 7), "float32"))
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            offsets = T.decl_buffer((spec.n_kernels,), "int64", data=pairs.data)  # one load a kernel
            source = T.decl_buffer((n_ * c_ * side * side,), "float32", data=data.data)
            outputs = T.decl_buffer((n_ * f_ * 49,), "float32", data=out.data)
            windows = T.decl_buffer((threads * block * _CHANNEL,), "float32")  # a block's, per thread
            partial = T.decl_buffer((f_ * _VECTORS * lanes,), "float32")

            def run(n, cb, f, base):
                acc = T.decl_buffer((_SETS * _VECTORS * lanes,), "float32")  # on the stack: in registers
                for q in range(_VECTORS):
                    first = partial[tirx.Ramp((f * _VECTORS + q) * lanes, 1, lanes)]
                    T.buffer_store(acc, tirx.Select(cb == 0, zeros, first), [tirx.Ramp(q * lanes, 1, lanes)])
                    for a in range(1, _SETS):
                        T.buffer_store(acc, zeros, [tirx.Ramp((a * _VECTORS + q) * lanes, 1, lanes)])
                start = runs[cb * f_ + f]
                with T.serial(0, runs[cb * f_ + f + 1] - start) as j:
                    k = start + j
                    if TAP_WINDOW_PREFETCH:
                        ahead = tirx.min(k + TAP_WINDOW_PREFETCH, spec.n_kernels - 1)
                        for address in (tirx.address_of(values[ahead, 0]), tirx.address_of(offsets[ahead])):
                            T.evaluate(tirx.call_intrin("void", "tirx.prefetch", address, 0, 3, 1))
                    for t in range(4):
                        weight = tirx.Broadcast(values[k, t], lanes)
                        at = base + tirx.Cast("int32", tirx.bitwise_and(
                            tirx.shift_right(offsets[k], tirx.const(16 * t, "int64")), tirx.const(0xFFFF, "int64")))
                        for q in range(_VECTORS):
                            slots = tirx.Ramp(((t % _SETS) * _VECTORS + q) * lanes, 1, lanes)
                            T.buffer_store(acc, acc[slots] + windows[tirx.Ramp(at + q * lanes, 1, lanes)] * weight,
                                           [slots])
                sums = [acc[tirx.Ramp(q * lanes, 1, lanes)] for q in range(_VECTORS)]
                for a in range(1, _SETS):
                    sums = [value + acc[tirx.Ramp((a * _VECTORS + q) * lanes, 1, lanes)]
                            for q, value in enumerate(sums)]
                with T.If(cb < blocks - 1):
                    with T.Then():
                        for q in range(_VECTORS):
                            T.buffer_store(partial, sums[q], [tirx.Ramp((f * _VECTORS + q) * lanes, 1, lanes)])
                    with T.Else():
                        fo = order[f]
                        results = [bias_relu(value, None if bias is None else bias[fo], spec.relu, lanes)
                                   for value in sums]
                        for first, value in _output_vectors(results, 7, _SIDE, lanes):
                            T.buffer_store(outputs, value, [tirx.Ramp((n * f_ + fo) * 49 + first, 1, lanes)])

            with T.parallel(0, threads) as t:
                base = t * block * _CHANNEL
                with T.serial(0, n_) as n:
                    with T.serial(0, blocks) as cb:
                        with T.serial(0, tirx.min(block, c_ - cb * block)) as c:
                            _build_windows(source, windows, n * c_ + cb * block + c, base + c * _CHANNEL, side, table)
                        with T.serial(t * f_ // threads, (t + 1) * f_ // threads) as f:
                            run(n, cb, f, base)
    func = builder.get().without_attr("global_symbol")
    return func.with_attr(PATTERN_CONV_ATTR, {**_spec_attr(spec), "tap_windows": 1})
