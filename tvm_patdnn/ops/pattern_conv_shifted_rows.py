"""The pattern convolution of small images in registers (4x4 on AVX2 and AVX-512, 8x8 on AVX-512):
each tap's pixels shuffled in registers from the channel itself.

A 4x4 channel is 16 floats (64 bytes, one cache line): two 256-bit vectors of two rows each, and
so is its output. The pixels a tap (dy, dx) needs for output rows r and r + 1 are image rows
r + dy - 1 and r + dy shifted by dx - 1 columns, zeros past the border: a fixed lane selection
from the channel's two vectors and zeros, which LLVM turns into a byte shift within 128-bit halves
(each half is one row: ``vpshufb``), a ``vperm2f128`` for rows 1-2 and a blend at the edges. So a
kernel loads its channel once (2 aligned vectors, from the 32 KB input of a 512-channel layer
itself: nothing is padded or copied), where the TE operator's windows layout (:mod:`.pattern_conv`)
first writes the 9 shifted windows of every channel (576 bytes a channel, 295 KB: L2) and loads 4
of them (8 vectors) per kernel.

Per kernel: 1 channel index, 2 input loads, 4 weight broadcasts, ~6 shuffles, 8 FMAs, every lane
useful. The 8 accumulators are (2 output vectors) x (4 taps), so consecutive FMAs into one
accumulator are a kernel apart (4 cycles: the FMA latency). Kernels run per (filter, pattern), the
pattern's taps being constants of its code. Measured on Zen 3 (1 thread, VGG-16 CIFAR 8x's three
4x4 layers, interleaved with the windows layout in one process): 1.32-1.47x; loading each tap's
rows instead (a masked load at the top edge, a 128-bit one at the bottom: 4-6 loads, fewer
shuffles) 1.03-1.23x; rows 3-4 from a 128-bit load and the rest from the two vectors (LLVM puts a
lane-crossing ``vpermps`` there otherwise) the same as this (0.98-1.05x), with rows -1-0 from a
masked load too 0.96-0.98x: loads, not the two ``vpermps``, bound the loop.

On AVX-512 a 4x4 channel and its output are one 512-bit vector each: per kernel 1 load, 4 lane
permutations with zeros (``vpermt2ps``), 4 broadcasts and 4 FMAs into the 4 tap accumulators. With
one FMA per accumulator per kernel the loop would wait on the FMA latency (4 cycles a kernel), so
each (filter, pattern) run alternates its kernels between two sets of the 4 (8 accumulators).
Measured on Zen 5 (1 thread, VGG-16 CIFAR 8x's three 4x4 layers, interleaved with the windows layout
the cost model picks there, session 14): 1.51-1.57x with one set, 1.53-1.74x with two (four:
1.14-1.41x); the AVX2 build of this kernel on the same core 1.20-1.26x. An 8x8 channel is 4 vectors
of two rows: each output vector's tap is a permutation of the two channel vectors holding its rows
(16 accumulators, one set): 1.39x and 1.66x over the 8-lane rows layout the cost model picks for
CIFAR's 128x256 and 256x256 8x8 layers (the 8-lane build of it 0.66-0.75x, so AVX2 keeps the TE
operator there).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .activation import bias_relu
from .pattern_conv import PATTERN_CONV_ATTR, PatternConvSpec, _spec_attr
from .pattern_conv_2x2 import thread_filters

__all__ = ["shifted_rows_apply", "pattern_conv_shifted_rows_primfunc"]

# (fp32 lanes of the target, image size) it is built for -> the accumulator sets a run alternates its kernels
# between (AVX-512 4x4, Zen 5: two 0.99-1.11x over one, four 0.72-0.80x; 8x8: 16 accumulators, one set)
_SETS = {(8, 4): 1, (16, 4): 2, (16, 8): 1}


def shifted_rows_apply(spec: PatternConvSpec, target_lanes: int) -> bool:
    """Whether this kernel computes ``spec`` on a target of ``target_lanes`` fp32 lanes: 4x4 images on
    AVX2 (8) and AVX-512 (16), 8x8 on AVX-512; stride 1, padding 1 on every side, 4-tap patterns."""
    return ((target_lanes, spec.height) in _SETS and spec.width == spec.height and spec.strides == (1, 1)
            and spec.padding == (1, 1, 1, 1) and spec.taps == 4)


def _tap_rows(images, base, size: int, top: int, shift: int, lanes: int):
    """Image rows ``top`` to ``top + lanes // size - 1`` of the ``size`` x ``size`` channel at ``base``,
    shifted by ``shift`` columns: lane i is pixel (top + i // size, i % size + shift), zero outside the
    image; a permutation of the channel's vectors that hold those rows (AVX2 4x4: rows 0-1, rows 2-3)."""
    rows = lanes // size  # image rows per vector
    vectors = list(range(max(0, top) // rows, min(size - 1, top + rows - 1) // rows + 1))
    index = []
    for i in range(lanes):
        y, x = top + i // size, i % size + shift
        pixel = y * size + x
        inside = 0 <= y < size and 0 <= x < size
        index.append(vectors.index(pixel // lanes) * lanes + pixel % lanes if inside else len(vectors) * lanes)
    parts = [images[tirx.Ramp(base + v * lanes, 1, lanes)] for v in vectors]
    return tirx.Shuffle(parts + [tirx.Broadcast(tirx.const(0.0, "float32"), lanes)], index)


def pattern_conv_shifted_rows_primfunc(spec: PatternConvSpec, threads: int = 1, lanes: int = 8) -> tirx.PrimFunc:
    """The scheduled PrimFunc of one 4x4 or 8x8 pattern conv for a target of ``lanes`` fp32 lanes (see
    the module docstring); the arguments of :func:`~tvm_patdnn.ops.pattern_conv_2x2.pattern_conv_2x2_primfunc`
    on AVX-512: data, values, channels, offsets, order (FKW's: stored filter -> output channel), [bias],
    out. Each thread takes a contiguous run of filters holding its share of the kernels
    (:func:`~tvm_patdnn.ops.pattern_conv_2x2.thread_filters`)."""
    if not shifted_rows_apply(spec, lanes):
        raise ValueError("the shifted-rows kernel takes 4x4 images (8 or 16 lanes) or 8x8 ones (16 lanes), "
                         "stride 1, padding 1, 4 taps")
    size = spec.height
    sets = _SETS[lanes, size]
    n_, c_, f_, p_ = spec.batch, spec.in_channels, spec.out_channels, len(spec.patterns)
    taps, pixels, halves = spec.taps, size * size, size * size // lanes
    kernels = max(1, spec.n_kernels)
    zero = tirx.const(0.0, "float32")
    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name("main")
            data = T.arg("data", T.buffer((n_, c_, size, size), "float32"))
            values = T.arg("values", T.buffer((kernels, taps), "float32"))
            channels = T.arg("channels", T.buffer((kernels,), "int32"))
            offsets = T.arg("offsets", T.buffer((f_ * p_ + 1,), "int32"))
            order = T.arg("order", T.buffer((f_,), "int32"))
            bias = T.arg("bias", T.buffer((f_,), "float32")) if spec.has_bias else None
            out = T.arg("out", T.buffer((n_, f_, size, size), "float32"))
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            images = T.decl_buffer((n_ * c_ * pixels,), "float32", data=data.data)
            outputs = T.decl_buffer((n_ * f_ * pixels,), "float32", data=out.data)

            def filter_task(task) -> None:
                n, f = task // f_, task % f_
                chains = sets * halves * taps  # (set, half, tap) vectors
                acc = T.decl_buffer((chains * lanes,), "float32", scope="local")
                for q in range(chains):
                    T.buffer_store(acc, tirx.Broadcast(zero, lanes), [tirx.Ramp(q * lanes, 1, lanes)])

                def accumulate(pattern, k, a: int) -> None:
                    base = (n * c_ + channels[k]) * pixels
                    for t, (dy, dx) in enumerate(pattern):
                        weight = tirx.Broadcast(values[k, t], lanes)
                        for h in range(halves):
                            slots = tirx.Ramp(((a * halves + h) * taps + t) * lanes, 1, lanes)
                            rows = _tap_rows(images, base, size, h * lanes // size + dy - 1, dx - 1, lanes)
                            T.buffer_store(acc, acc[slots] + rows * weight, [slots])

                for p, pattern in enumerate(spec.patterns):
                    start = offsets[f * p_ + p]
                    length = offsets[f * p_ + p + 1] - start
                    with T.serial(0, length // sets) as j:
                        for a in range(sets):
                            accumulate(pattern, start + j * sets + a, a)
                    if sets > 1:
                        with T.serial(0, length % sets) as j:
                            accumulate(pattern, start + length // sets * sets + j, 0)
                fo = order[f]
                for h in range(halves):
                    value = sum((acc[tirx.Ramp(((a * halves + h) * taps + t) * lanes, 1, lanes)]
                                 for a in range(sets) for t in range(taps) if a or t),
                                acc[tirx.Ramp(h * taps * lanes, 1, lanes)])
                    value = bias_relu(value, None if bias is None else bias[fo], spec.relu, lanes)
                    T.buffer_store(outputs, value, [tirx.Ramp((n * f_ + fo) * pixels + h * lanes, 1, lanes)])

            with T.parallel(0, threads) as t:
                first, last = thread_filters(offsets, f_, p_, threads, t)
                with T.serial(first, last) as f:
                    with T.serial(0, n_) as n:
                        filter_task(n * f_ + f)
    func = builder.get().without_attr("global_symbol")
    return func.with_attr(PATTERN_CONV_ATTR, {**_spec_attr(spec), "shifted_rows": 1})
