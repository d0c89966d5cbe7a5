"""The pattern convolution of 2x2 outputs: one 512-bit vector (AVX-512) or two 256-bit ones (AVX2) of
(pixel x tap) lanes per kernel.

A stride-1 conv with padding 1 on a 2x2 image reads a 4x4 padded channel: 16 floats, one aligned
512-bit vector. For a kernel of pattern ``p`` (4 taps), the 16 products it contributes are
``weight[t] * padded[pixel + tap offset(p, t)]`` for the 4 output pixels x 4 taps, so one
permutation of the channel vector with a constant per-pattern index (``vpermps``), one 128-bit
weight load repeated to 512 bits (``vbroadcastf32x4``) and one FMA do a whole kernel with every
lane useful. The row and flat layouts of :mod:`.pattern_conv` fill a quarter (16 lanes) or half
(8 lanes) of each vector at 2x2 and need 4 FMAs per kernel.

Each (filter, pattern) run alternates its kernels between accumulators (two on AVX2, four on
AVX-512), so consecutive FMAs do not wait for each other (one chain would be FMA-latency bound); the
end sums the accumulators and each pixel's 4 tap lanes, adds the bias and applies ReLU.

Measured on Zen 4 (1 thread, VGG-16 CIFAR 8x, the three 512-channel 2x2 layers): 1.9-2.0x faster than
the cheapest row/flat layout (0.08 against 0.15-0.17 ms a layer); with one accumulator 1.4x, with
four 1.8x. On Zen 5 (512-bit FMAs at full rate, session 14) four accumulators are 1.14-1.17x faster
than two (40 -> 35 µs a layer); one run per filter with the ``vpermps`` index looked up per kernel (as
AVX2 does with its shuffle table) was 0.64-0.69x. Session 18 (Zen 5): eight accumulators, 1.12-1.14x
over four inside the model (57-59 -> 50-52 µs a layer; alone, weights in L2/L3, 1.01x), so AVX-512 takes
eight.

Where the AVX-512 kernel stands (Zen 5, session 18): alone ~30 µs a layer (29% of 268 GFLOP/s), 1.5-1.75
cycles a kernel: the loop is load-bound (a channel index, the ``vpermps`` memory operand and the
``vbroadcastf32x4``: 3 loads a kernel at ~2 a cycle), not FMA- or decode-bound; a C model of the loop with
the layer's real runs gives the same 1.77 cycles, 1.50 with the whole filter one run. Inside the model the
layer takes 50-59 µs: its 1.45 MB of weights and indices come from beyond the L2 (alone after a 64 MB
eviction ~65 µs). Measured and not kept (interleaved A/B in one process, the layer alone unless said):
channel indices pre-scaled (no shift; needs the rewrite to pass ``16 * channel``) 1.01-1.04x; a per-call
table of every (channel, pattern)'s permuted vector (256 KB at 8 patterns), read as the FMA's memory
operand: per pattern run 0.70-0.76x, one run per filter (``arranged_rows``) 0.70-0.74x, both bound by the
table's L2 -> L1 traffic (64 bytes a kernel; with the table forced into L1 by channel indices mod 8 they
tie or reach 1.05-1.13x); the table built per 64-channel block (32 KB, L1) with each filter's kernels
grouped by block, 4 kernels' weights one vector shuffled in registers: 0.69x (16 KB blocks 0.61x: a run
per (filter, block) instead of per (filter, pattern), and the loop at ~2 cycles a kernel in the model's
runs against 1.0 in a long C loop); the lanes flipped to (image value x pixel) with a zero-masked
``vpermps`` of the weights (C model) 0.89x; software prefetch of the weights, in the model, per layer: a line per 4
kernels 128-2048 kernels ahead (into L1, L2 or L3) 0.81-0.90x, per kernel 64 ahead 0.73x, the next 1-4
filters' lines at each filter's start 0.84-0.92x.

On AVX2 (8 lanes) a ymm permutes only 8 floats, but a kernel's 16 lanes take only 5 values: the
channel's 4 and zero. Each 128-bit half of the two ymm is one pixel's 4 taps, so one ``vpshufb`` of
the channel's 4 floats loaded into both halves (``vbroadcastf128``, 16 bytes from an image of 8 KB
at 512 channels: L1) with the pattern's constant control bytes (a byte with its top bit set gives
a zero) makes each ymm: per kernel 1 row index, 1 image, 1 weight and 2 control loads (the
table: 64 bytes per pattern), 2 ``vpshufb`` and 2 FMAs. ``vpermps`` would do the same from
``[v0 v1 v2 v3 0 0 0 0]`` but on Zen 3 it costs about as much as an FMA and does not overlap with
it (microbenchmark: 2 ``vpermps`` + 2 FMAs 3 cycles, 2 ``vpshufb`` + 2 FMAs 1.6). The pattern is a
table row, not code, so each kernel carries ``channel * P + pattern`` (:func:`arranged_rows`) and a
filter's kernels of every pattern are one loop (a run per (filter, pattern) cost ~60 cycles of loop
set-up and mispredicted exits). Nothing is arranged or copied per call or per thread (the
session-6 kernel wrote 16 (pixel x tap) inputs per channel and pattern: 256 KB in L2, a copy per
thread). Measured on Zen 3 (1 thread, VGG-16 CIFAR 8x, the three 512-channel 2x2 layers, A/B in one
process): 1.4-1.5x faster than those arranged inputs (0.12 -> 0.08 ms a layer); 4 accumulator
chains instead of 2: 0.8x.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .activation import bias_relu
from .pattern_conv import PATTERN_CONV_ATTR, PatternConvSpec, _spec_attr, fkw_arguments

__all__ = ["LANES", "TARGET_LANES", "arranged_rows", "tap_lanes_apply", "thread_filters", "pattern_conv_2x2_primfunc"]

LANES = 16  # 4 output pixels x 4 taps: one 512-bit vector, or two 256-bit ones
TARGET_LANES = (8, 16)  # AVX2 (vpshufb per kernel), AVX-512 (vpermps per kernel)
# accumulators (of a kernel's 16 lanes) a run alternates between, by target lanes: AVX2 2 (4 measured 0.8x),
# AVX-512 8 (Zen 5, session 14: 4 1.14-1.17x over 2, 8 1.17-1.18x, 3 and 6 1.01-1.02x; session 18, 1 thread,
# VGG-16 CIFAR's three 512-channel 2x2 layers inside the model, per-call minima, three interleaved runs of 9-11
# rounds: 8 over 4 1.12-1.14x (57-59 -> 50-52 us), 6 0.93-0.95x, 12 0.96-0.98x, 16 0.68-0.69x; alone 1.01x)
_CHAINS = {8: 2, 16: 8}


def tap_lanes_apply(spec: PatternConvSpec, target_lanes: int) -> bool:
    """Whether the (pixel x tap) kernel computes ``spec`` on a target of ``target_lanes`` fp32 lanes:
    AVX-512 (16) or AVX2 (8), a 2x2 image with stride 1 and padding 1 on every side, 4-tap patterns."""
    return (target_lanes in TARGET_LANES and (spec.height, spec.width) == (2, 2) and spec.strides == (1, 1)
            and spec.padding == (1, 1, 1, 1) and spec.taps == 4)


def _image_index(padded_index: int) -> int:
    """Where a lane of the padded 4x4 channel comes from: the 2x2 image's value (0-3), or 4: zero."""
    y, x = padded_index // 4, padded_index % 4
    return (y - 1) * 2 + (x - 1) if 1 <= y <= 2 and 1 <= x <= 2 else 4


def _lane_offsets(taps) -> list[int]:
    """Index into the padded 4x4 channel of each lane (pixel-major, then tap) for one pattern."""
    return [(py + dy) * 4 + px + dx for py in range(2) for px in range(2) for dy, dx in taps]


def arranged_rows(channels: np.ndarray, offsets: np.ndarray, n_patterns: int) -> np.ndarray:
    """The AVX2 kernel's ``channels`` argument: ``channel * n_patterns + pattern`` per kernel (FKW's
    ``offsets`` give each kernel's pattern), the image and the shuffle-table row it reads."""
    patterns = np.repeat(np.arange(len(offsets) - 1) % n_patterns, np.diff(offsets))
    rows = channels.astype(np.int64).copy()
    rows[: len(patterns)] = rows[: len(patterns)] * n_patterns + patterns
    return rows.astype(np.int32)


def _shuffle_table(spec: PatternConvSpec) -> list[int]:
    """AVX2: per pattern, the ``vpshufb`` control bytes of its 16 (pixel x tap) lanes from the
    channel's 2x2 image in each 128-bit half (byte 4j + b of value j; 0x80: a zero)."""
    return [4 * j + b if j < 4 else -128 for taps in spec.patterns for i in _lane_offsets(taps)
            for j in [_image_index(i)] for b in range(4)]


def thread_filters(offsets, filters: int, patterns: int, threads: int, t):
    """The stored filters [first, last) thread ``t`` of ``threads`` computes: a contiguous run that
    holds its share of the kernels (FKW's ``offsets``), so each thread streams its own part of the
    weights. Interleaved filters (t, t + threads, ...) balanced as well but made every thread's
    stream skip the other's blocks: VGG-16 CIFAR 8x's 2-thread build run on one thread, inside the
    model (weights from L3), took 1.9x (2x2) and 1.35-1.5x (4x4) the 1-thread build's time."""
    ends = T.decl_buffer((2,), "int32", scope="global")
    kernels = offsets[filters * patterns]
    for b in range(2):
        T.buffer_store(ends, tirx.const(0, "int32"), [b])
    with T.serial(0, filters) as f:
        for b in range(2):  # filters starting before the thread's first / past its last kernel
            starts_before = offsets[f * patterns] * threads < (t + b) * kernels
            T.buffer_store(ends, ends[b] + tirx.Select(starts_before, 1, 0), [b])
    return ends[0], tirx.Select(t == threads - 1, filters, ends[1])


def pattern_conv_2x2_primfunc(spec: PatternConvSpec, lanes: int = LANES, threads: int = 1) -> tirx.PrimFunc:
    """The scheduled PrimFunc of one 2x2 pattern conv for a target of ``lanes`` fp32 lanes (see the
    module docstring); the same arguments as
    :func:`~tvm_patdnn.ops.pattern_conv.pattern_conv2d_primfunc` except that the filter permutation
    is FKW's ``order`` (stored filter -> output channel), not its inverse, and that on AVX2 the
    channels are :func:`arranged_rows`: data, values, channels (rows), offsets, order, [bias], out.
    Filters run in stored order, so the weights stream sequentially. On AVX2 each thread takes a
    contiguous run of filters holding its share of the kernels (:func:`thread_filters`); nothing is
    copied per thread."""
    if not tap_lanes_apply(spec, lanes):
        raise ValueError(f"the (pixel x tap) kernel takes 2x2 images, stride 1, padding 1, 4 taps, "
                         f"{' or '.join(map(str, TARGET_LANES))} lanes")
    halves = LANES // lanes  # vectors per kernel
    in_registers = halves > 1  # AVX2: the pattern's shuffle is looked up per kernel
    chains = _CHAINS[lanes]
    n_, c_, f_, p_ = spec.batch, spec.in_channels, spec.out_channels, len(spec.patterns)
    kernels = max(1, spec.n_kernels)
    zero = tirx.const(0.0, "float32")
    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name("main")
            data, values, channels, offsets, order, bias, out = fkw_arguments(
                spec, kernels, (n_, c_, 2, 2), (n_, f_, 2, 2))
            images = T.decl_buffer((n_ * c_ * 4,), "float32", data=data.data)  # a channel's 2x2: 4 floats
            outputs = T.decl_buffer((n_ * f_ * 4,), "float32", data=out.data)

            def filter_task(source, task) -> None:
                n, f = task // f_, task % f_
                fo = order[f]
                # on the stack ("global": LowerTVMBuiltin gives "local" buffers a TVMBackendAllocWorkspace
                # heap block, which inside a parallel loop is allocated and freed per filter: the
                # 2-thread build's 512-channel layer on one thread 82 -> 72 µs, the 1-thread build 65)
                acc = T.decl_buffer((chains * LANES,), "float32", scope="global")
                for q in range(chains * halves):
                    T.buffer_store(acc, tirx.Broadcast(zero, lanes), [tirx.Ramp(q * lanes, 1, lanes)])

                def accumulate(p, q: int, k) -> None:
                    weights = values[k, tirx.Ramp(0, 1, 4)]
                    repeated = tirx.Shuffle([weights] * (lanes // 4), list(range(lanes)))
                    if in_registers:  # AVX2: row = channel * P + pattern; two vpshufb of the channel
                        row = channels[k]
                        image = images[tirx.Ramp((n * c_ + row // p_) * 4, 1, 4)]
                        image_bytes = tirx.reinterpret("int8x32", tirx.Shuffle([image, image], list(range(8))))
                        for h in range(halves):
                            control = source[tirx.Ramp(row % p_ * LANES * 4 + h * 32, 1, 32)]
                            permuted = tirx.reinterpret("float32x8", tirx.call_llvm_pure_intrin(
                                "int8x32", "llvm.x86.avx2.pshuf.b", image_bytes, control))
                            slots = tirx.Ramp((q * halves + h) * lanes, 1, lanes)
                            T.buffer_store(acc, acc[slots] + permuted * repeated, [slots])
                        return
                    channel = source[tirx.Ramp((n * c_ + channels[k]) * LANES, 1, LANES)]
                    product = tirx.Shuffle([channel], _lane_offsets(spec.patterns[p])) * repeated
                    slots = tirx.Ramp(q * LANES, 1, LANES)
                    T.buffer_store(acc, acc[slots] + product, [slots])

                # AVX2: the pattern only picks the permutation, so a filter's kernels are one run (a run
                # per (filter, pattern) costs ~60 cycles of loop set-up and mispredicted exits: measured
                # 0.09 ms of a 0.14 ms 512-channel layer); AVX-512: one run per pattern, its permutation
                runs = [(None, f * p_, f * p_ + p_)] if in_registers else [
                    (p, f * p_ + p, f * p_ + p + 1) for p in range(p_)]
                for p, first, last in runs:
                    start = offsets[first]
                    length = offsets[last] - start
                    with T.serial(0, length // chains) as j:
                        for q in range(chains):
                            accumulate(p, q, start + j * chains + q)
                    with T.serial(0, length % chains) as j:
                        accumulate(p, 0, start + length // chains * chains + j)
                # the chains' sum, then each pixel's 4 tap lanes (lane pixel * 4 + tap): the filter's 2x2
                # output is 4 consecutive floats
                summed = [sum((acc[tirx.Ramp((q * halves + h) * lanes, 1, lanes)] for q in range(1, chains)),
                              acc[tirx.Ramp(h * lanes, 1, lanes)]) for h in range(halves)]
                value = sum((tirx.Shuffle(summed, [pixel * 4 + t for pixel in range(4)]) for t in range(1, 4)),
                            tirx.Shuffle(summed, [pixel * 4 for pixel in range(4)]))
                value = bias_relu(value, None if bias is None else bias[fo], spec.relu, 4)
                T.buffer_store(outputs, value, [tirx.Ramp((n * f_ + fo) * 4, 1, 4)])

            if in_registers:
                table = T.decl_buffer((p_ * LANES * 4,), "int8", align=64)
                for i, byte in enumerate(_shuffle_table(spec)):
                    T.buffer_store(table, tirx.const(byte, "int8"), [i])
                with T.parallel(0, threads) as t:
                    first, last = thread_filters(offsets, f_, p_, threads, t)
                    with T.serial(first, last) as f:
                        with T.serial(0, n_) as n:
                            filter_task(table, n * f_ + f)
            else:
                padded = T.decl_buffer((n_ * c_ * LANES,), "float32", align=64)
                with T.parallel(0, n_ * c_) as nc:
                    # every padded lane is one of the image's 4 values or zero (index 4)
                    source = [images[tirx.Ramp(nc * 4, 1, 4)], tirx.Broadcast(zero, LANES - 4)]
                    T.buffer_store(padded, tirx.Shuffle(source, [_image_index(i) for i in range(LANES)]),
                                   [tirx.Ramp(nc * LANES, 1, LANES)])
                with T.parallel(0, n_ * f_) as task:
                    filter_task(padded, task)
    func = builder.get().without_attr("global_symbol")
    return func.with_attr(PATTERN_CONV_ATTR, {**_spec_attr(spec), "tap_lanes": 1})
