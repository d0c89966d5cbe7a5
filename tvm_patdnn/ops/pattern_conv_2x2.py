"""The pattern convolution of 2x2 outputs: one 512-bit vector (AVX-512) or two 256-bit ones (AVX2) of
(pixel x tap) lanes per kernel.

A stride-1 conv with padding 1 on a 2x2 image reads a 4x4 padded channel: 16 floats, one aligned
512-bit vector. For a kernel of pattern ``p`` (4 taps), the 16 products it contributes are
``weight[t] * padded[pixel + tap offset(p, t)]`` for the 4 output pixels x 4 taps, so one
permutation of the channel vector with a constant per-pattern index (``vpermps``), one 128-bit
weight load repeated to 512 bits (``vbroadcastf32x4``) and one FMA do a whole kernel with every
lane useful. The row and flat layouts of :mod:`.pattern_conv` fill a quarter (16 lanes) or half
(8 lanes) of each vector at 2x2 and need 4 FMAs per kernel.

Each (filter, pattern) run alternates its kernels between two accumulators, so consecutive FMAs do
not wait for each other (one chain would be FMA-latency bound); the end sums the accumulators and
each pixel's 4 tap lanes, adds the bias and applies ReLU.

Measured on Zen 4 (1 thread, VGG-16 CIFAR 8x, the three 512-channel 2x2 layers): 1.9-2.0x faster than
the cheapest row/flat layout (0.08 against 0.15-0.17 ms a layer); with one accumulator 1.4x, with
four 1.8x.

On AVX2 (8 lanes) a ymm permutes only 8 floats, so the lanes are arranged in memory instead: the
first stage writes, per channel and pattern of the layer, the 16 (pixel x tap) inputs of that
pattern (``arranged[n, c, p]``: 64 bytes, 8 patterns x 512 channels = 256 KB, written once per
call); a kernel is then two aligned ymm loads of its (channel, pattern) row, one 128-bit weight
load repeated to 256 bits (pixel-major lanes: every pixel's 4 taps take the kernel's 4 weights)
and two FMAs, every lane useful, where the flat layout does 4 broadcasts, 4 loads and 4 half-empty
FMAs. Since the pattern then only picks the row, each kernel carries its row index
(:func:`arranged_rows`) and a filter's kernels of every pattern are one loop.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..arith import ceil_div
from .pattern_conv import PATTERN_CONV_ATTR, PatternConvSpec, _spec_attr

__all__ = ["LANES", "TARGET_LANES", "arranged_rows", "tap_lanes_apply", "pattern_conv_2x2_primfunc"]

LANES = 16  # 4 output pixels x 4 taps: one 512-bit vector, or two 256-bit ones
TARGET_LANES = (8, 16)  # AVX2 (arranged inputs), AVX-512 (permuted in registers)
_CHAINS = 2  # accumulators (of a kernel's 16 lanes) a run alternates between (AVX2: 4 measured the same)


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
    """The AVX2 kernel's ``channels`` argument: each kernel's row of the arranged input,
    ``channel * n_patterns + pattern`` (FKW's ``offsets`` give each kernel's pattern)."""
    patterns = np.repeat(np.arange(len(offsets) - 1) % n_patterns, np.diff(offsets))
    rows = channels.astype(np.int64).copy()
    rows[: len(patterns)] = rows[: len(patterns)] * n_patterns + patterns
    return rows.astype(np.int32)


def pattern_conv_2x2_primfunc(spec: PatternConvSpec, lanes: int = LANES, threads: int = 1) -> tirx.PrimFunc:
    """The scheduled PrimFunc of one 2x2 pattern conv for a target of ``lanes`` fp32 lanes (see the
    module docstring); the same arguments as
    :func:`~tvm_patdnn.ops.pattern_conv.pattern_conv2d_primfunc` except that the filter permutation
    is FKW's ``order`` (stored filter -> output channel), not its inverse, and that on AVX2 the
    channels are :func:`arranged_rows`: data, values, channels (rows), offsets, order, [bias], out.
    Filters run in stored order, so the weights stream sequentially. On AVX2 with ``threads`` > 1
    each thread arranges its own copy of the input (the same 256 KB rows written by one core and read
    by the other ran 0.99x of the flat layout at 2 threads, own copies 1.09x; 1.11x at 1 thread either
    way) and takes the filters t, t + threads, ..."""
    if not tap_lanes_apply(spec, lanes):
        raise ValueError(f"the (pixel x tap) kernel takes 2x2 images, stride 1, padding 1, 4 taps, "
                         f"{' or '.join(map(str, TARGET_LANES))} lanes")
    halves = LANES // lanes  # vectors per kernel
    arranged_input = halves > 1
    chains = _CHAINS
    n_, c_, f_, p_ = spec.batch, spec.in_channels, spec.out_channels, len(spec.patterns)
    kernels = max(1, spec.n_kernels)
    zero = tirx.const(0.0, "float32")
    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name("main")
            data = T.arg("data", T.buffer((n_, c_, 2, 2), "float32"))
            values = T.arg("values", T.buffer((kernels, 4), "float32"))
            channels = T.arg("channels", T.buffer((kernels,), "int32"))
            offsets = T.arg("offsets", T.buffer((f_ * p_ + 1,), "int32"))
            order = T.arg("order", T.buffer((f_,), "int32"))
            bias = T.arg("bias", T.buffer((f_,), "float32")) if spec.has_bias else None
            out = T.arg("out", T.buffer((n_, f_, 2, 2), "float32"))
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            rows = p_ if arranged_input else 1  # per channel: one row per pattern, or the padded image
            images = T.decl_buffer((n_ * c_ * 4,), "float32", data=data.data)  # a channel's 2x2: 4 floats

            def arrange(padded, nc) -> None:
                # every padded lane is one of the image's 4 values or zero (index 4): one permute of
                # [image, 0, 0, 0, 0] per vector
                source = [images[tirx.Ramp(nc * 4, 1, 4)], tirx.Broadcast(zero, lanes - 4)]
                for p in range(rows):
                    lanes_from = [_image_index(i) for i in (_lane_offsets(spec.patterns[p]) if arranged_input
                                                             else range(LANES))]
                    for h in range(0, LANES, lanes):
                        T.buffer_store(padded, tirx.Shuffle(source, lanes_from[h:h + lanes]),
                                       [tirx.Ramp((nc * rows + p) * LANES + h, 1, lanes)])

            def filter_task(padded, task) -> None:
                n, f = task // f_, task % f_
                fo = order[f]
                acc = T.decl_buffer((chains * LANES,), "float32", scope="local")
                for q in range(chains * halves):
                    T.buffer_store(acc, tirx.Broadcast(zero, lanes), [tirx.Ramp(q * lanes, 1, lanes)])

                def accumulate(p: int, source_lanes: list[int], q: int, k) -> None:
                    weights = values[k, tirx.Ramp(0, 1, 4)]
                    repeated = tirx.Shuffle([weights] * (lanes // 4), list(range(lanes)))
                    if arranged_input:  # AVX2: the kernel's (channel, pattern) row holds its lanes in order
                        row = (n * c_ * p_ + channels[k]) * LANES
                        for h in range(halves):
                            slots = tirx.Ramp((q * halves + h) * lanes, 1, lanes)
                            product = padded[tirx.Ramp(row + h * lanes, 1, lanes)] * repeated
                            T.buffer_store(acc, acc[slots] + product, [slots])
                        return
                    channel = padded[tirx.Ramp((n * c_ + channels[k]) * LANES, 1, LANES)]
                    product = tirx.Shuffle([channel], source_lanes) * repeated
                    slots = tirx.Ramp(q * LANES, 1, LANES)
                    T.buffer_store(acc, acc[slots] + product, [slots])

                # AVX2: the pattern only picks the row, so a filter's kernels are one run (a run per
                # (filter, pattern) costs ~60 cycles of loop set-up and mispredicted exits: measured
                # 0.09 ms of a 0.14 ms 512-channel layer); AVX-512: one run per pattern, its permutation
                runs = [(None, f * p_, f * p_ + p_)] if arranged_input else [
                    (p, f * p_ + p, f * p_ + p + 1) for p in range(p_)]
                for p, first, last in runs:
                    source_lanes = _lane_offsets(spec.patterns[p]) if p is not None else []
                    start = offsets[first]
                    length = offsets[last] - start
                    with T.serial(0, length // chains) as j:
                        for q in range(chains):
                            accumulate(p, source_lanes, q, start + j * chains + q)
                    with T.serial(0, length % chains) as j:
                        accumulate(p, source_lanes, 0, start + length // chains * chains + j)
                with T.unroll(0, 4) as pixel:  # (chain, half) accumulators are consecutive: lane q * 16 + pixel * 4 + tap
                    value = sum((acc[q * LANES + pixel * 4 + t] for q in range(chains) for t in range(4)), zero)
                    if bias is not None:
                        value = value + bias[fo]
                    if spec.relu:
                        value = T.max(value, zero)
                    T.buffer_store(out, value, [n, fo, pixel // 2, pixel % 2])

            if arranged_input and threads > 1:
                with T.parallel(0, threads) as t:
                    own = T.decl_buffer((n_ * c_ * rows * LANES,), "float32", align=64)
                    with T.serial(0, n_ * c_) as nc:
                        arrange(own, nc)
                    with T.serial(0, ceil_div(n_ * f_, threads)) as i:
                        with T.If(i * threads + t < n_ * f_):
                            with T.Then():
                                filter_task(own, i * threads + t)
            else:
                padded = T.decl_buffer((n_ * c_ * rows * LANES,), "float32", align=64)
                with T.parallel(0, n_ * c_) as nc:
                    arrange(padded, nc)
                with T.parallel(0, n_ * f_) as task:
                    filter_task(padded, task)
    func = builder.get().without_attr("global_symbol")
    return func.with_attr(PATTERN_CONV_ATTR, {**_spec_attr(spec), "tap_lanes": 1})
