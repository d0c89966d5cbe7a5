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
permutations with zeros (``vpermt2ps``; since session 18 lane shifts with zeros and a constant mask,
:func:`_tap_rows_aligned`), 4 broadcasts and 4 FMAs into the 4 tap accumulators. With
one FMA per accumulator per kernel the loop would wait on the FMA latency (4 cycles a kernel), so
each (filter, pattern) run alternates its kernels between two sets of the 4 (8 accumulators).
Measured on Zen 5 (1 thread, VGG-16 CIFAR 8x's three 4x4 layers, interleaved with the windows layout
the cost model picks there, session 14): 1.51-1.57x with one set, 1.53-1.74x with two (four:
1.14-1.41x); the AVX2 build of this kernel on the same core 1.20-1.26x. Inside the pruned VGG-16 CIFAR, where
the layers' weights come from L3, one set is faster (session 18: 1.085-1.09x on the 256 -> 512 layer, 1.02-1.03x on
the 512 -> 512 ones), so the AVX-512 build runs one set (:data:`_SETS`; the two-set code stays, tested). An 8x8 channel is 4 vectors
of two rows: each output vector's tap is a permutation of the two channel vectors holding its rows
(16 accumulators, one set): 1.39x and 1.66x over the 8-lane rows layout the cost model picks for
CIFAR's 128x256 and 256x256 8x8 layers (the 8-lane build of it 0.66-0.75x, so AVX2 keeps the TE
operator there).

A 7x7 image (ResNet-50's last stage) is first copied into an 8x8 square whose last column and row are
zeros (per channel 4 loads, 4 permutations with zeros, 4 aligned stores; 128 KB for 512 channels) and
computed as 8x8 (77% of the lanes useful, against 7 of 8 lanes of 8-lane FMAs in the TE operator's
rows); 7x7 outputs are stored, as whole vectors of consecutive output floats permuted from two result
vectors (the last one overlapping). In such a square each tap's 16 pixels are 16 consecutive floats from
(row offset, column offset): the zero column is both the column left of the first and right of the last,
so a tap is a window of two adjacent channel vectors (one ``valignd``; zeros above the first row and
below the last), no masking. A stride-2 14x14 -> 7x7 layer's channels are split into their four (row,
column) phase planes, each copied into such a square: a tap reads one plane at row and column offset 0
or -1. Zen 5, 1 thread, ResNet-50's 512x512 layers with the pruned model's weights, interleaved against
the TE operator's 8-lane aligned rows: alone 0.355-0.360 -> 0.208-0.210 ms (30 -> 51% of 268 GFLOP/s;
with masked ``vpermt2ps`` permutations 0.236, 45%), 14 -> 7 stride 2 0.40-0.42 -> 0.32-0.33 ms (26 ->
32%); in the pruned ResNet-50 (weights from DRAM, per-call minima) 0.40-0.42 -> 0.29-0.32 ms and
0.43-0.46 -> 0.40-0.42 ms; with the weights prefetched 64 kernels ahead (they stream from DRAM in the
model) 0.39-0.40 -> 0.235-0.27 ms (40-45%) and 0.43-0.44 -> 0.385-0.39 ms (28%).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..errors import PatDNNError
from .activation import bias_relu
from .pattern_conv import PATTERN_CONV_ATTR, PatternConvSpec, _spec_attr, fkw_arguments
from .pattern_conv_2x2 import thread_filters
from .pattern_conv_phases import gathered_windows

__all__ = ["shifted_rows_apply", "pattern_conv_shifted_rows_primfunc"]

# (fp32 lanes of the target, image size) it is built for -> the accumulator sets a run alternates its kernels
# between (AVX-512 4x4, Zen 5: two 0.99-1.11x over one alone in session 14, four 0.72-0.80x; but inside the pruned
# VGG-16 CIFAR, session 18, per-call minima of two interleaved 11-round runs, one set over two: 256 -> 512 4x4
# 58.5-58.6 -> 53.7-54.0 us (1.085-1.09x; 30 -> 32% of 268 GFLOP/s), 512 -> 512 (x2) 83.9-85.6 -> 82.5-83.0 us
# (1.02-1.03x): one set; 8x8: 16 accumulators, one set)
_SETS = {(8, 4): 1, (16, 4): 1, (16, 8): 1, (16, 7): 1}  # by (lanes, output size)

# (fp32 lanes, image size) whose channels are first copied into a zero-padded square of this pitch (a 7x7 image into
# 8x8: every row and the channel whole vectors; the zero column and row are the conv's right and bottom padding)
_PITCH = {(16, 7): 8}

# The (lanes, input size, stride) this kernel takes; a stride-2 layer's input is split into its 4 (row, column)
# phase planes, each copied into the padded square of its output size
SHIFTED_ROWS_SIZES = frozenset({(8, 4, 1), (16, 4, 1), (16, 8, 1), (16, 7, 1), (16, 14, 2)})


def shifted_rows_apply(spec: PatternConvSpec, target_lanes: int) -> bool:
    """Whether this kernel computes ``spec`` on a target of ``target_lanes`` fp32 lanes: 4x4 images on
    AVX2 (8) and AVX-512 (16), 8x8 and 7x7 on AVX-512 at stride 1, 14x14 to 7x7 at stride 2 on AVX-512
    (:data:`SHIFTED_ROWS_SIZES`); padding 1 on every side, 4-tap patterns."""
    stride = spec.strides[0]
    return ((target_lanes, spec.height, stride) in SHIFTED_ROWS_SIZES and spec.width == spec.height
            and spec.strides == (stride, stride) and spec.out_height * stride == spec.height
            and spec.padding == (1, 1, 1, 1) and spec.taps == 4)


def _tap_window(images, base, size: int, top: int, shift: int, lanes: int, vectors: int):
    """The same rows as :func:`_tap_rows` for a channel stored in a padded square (its last column and row
    zeros, the lanes of that column and row discarded): lanes ``lanes`` consecutive floats of the square from
    pixel (top, shift), the floats before and after the square zeros. A column shift reads the row's
    neighbour through the zero column (the column left of the first is the row above's last, zero; the
    column right of the last real one is zero), so the window is two adjacent vectors of the channel
    concatenated and shifted (``valignd``), or one vector, with no masking."""
    first = top * size + shift
    v0, offset = first // lanes, first % lanes
    used = [v0] if offset == 0 else [v0, v0 + 1]
    zero = tirx.Broadcast(tirx.const(0.0, "float32"), lanes)
    parts = [images[tirx.Ramp(base + v * lanes, 1, lanes)] if 0 <= v < vectors else zero for v in used]
    if offset == 0:
        return parts[0]
    # on int32 lanes LLVM lowers the window to one valignd; on float lanes it took a vpermt2ps with an index
    # register and a register copy (Zen 5, ResNet-50's 512x512 7x7 alone: 1.12x)
    ints = [tirx.reinterpret(f"int32x{lanes}", part) for part in parts]
    return tirx.reinterpret(f"float32x{lanes}", tirx.Shuffle(ints, [offset + i for i in range(lanes)]))


def _tap_rows_aligned(images, base, size: int, top: int, shift: int, lanes: int):
    """As :func:`_tap_rows` for a channel that is one vector (AVX-512 4x4): the vector shifted by
    ``top * size + shift`` lanes with zeros on int32 lanes, the lanes whose column wrapped and-ed with a constant
    mask (LLVM: ``valignq`` / ``vpslldq`` / ``vpermt2d``, no register copy). As permutations of the vector and
    zeros LLVM emitted a ``vpermt2ps`` and a register copy per tap. Zen 5, 1 thread, VGG-16 CIFAR's 4x4 layers with
    the pruned model's weights, interleaved: alone 1.06-1.11x (256 -> 512 36.0 -> 32.5 us, 48 -> 54% of 268
    GFLOP/s; 512 -> 512 72.9 -> 68.5 us, 48 -> 51%); inside the model (per-call minima, two runs of 11 rounds)
    53.1-53.4 -> 50.2-52.2 us (1.02-1.06x) and 81.6-83.1 -> 76.7-79.7 us (1.04-1.06x; 42-43 -> 44-45%)."""
    offset = top * size + shift
    vector = tirx.reinterpret(f"int32x{lanes}", images[tirx.Ramp(base, 1, lanes)])
    if offset == 0:
        return tirx.reinterpret(f"float32x{lanes}", vector)
    zero = tirx.Broadcast(tirx.const(0, "int32"), lanes)
    parts, first = ([vector, zero], offset) if offset > 0 else ([zero, vector], lanes + offset)
    value = tirx.Shuffle(parts, [first + i for i in range(lanes)])
    if shift:
        ones = tirx.Broadcast(tirx.const(-1, "int32"), lanes)
        keep = [0 <= i % size + shift < size for i in range(lanes)]
        value = value & tirx.Shuffle([ones, zero], [0 if k else lanes for k in keep])
    return tirx.reinterpret(f"float32x{lanes}", value)


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


def _tap_source(dy: int, dx: int, stride: int) -> tuple[int, int, int]:
    """(phase plane, row offset, column offset) of tap (dy, dx): output pixel (y, x) reads the plane's pixel
    (y + row offset, x + column offset). Stride 1: the channel itself, offsets dy - 1, dx - 1. Stride 2
    (padding 1): input row 2y + dy - 1 is row y - 1 of the odd rows' plane for dy = 0, row y of the even
    rows' for dy = 1 and of the odd rows' for dy = 2 (columns alike); plane 2 * (row phase) + column phase."""
    if stride == 1:
        return 0, dy - 1, dx - 1
    return 2 * (dy != 1) + (dx != 1), -(dy == 0), -(dx == 0)


def _pad_channels(source, padded, channels: int, side: int, image: int, size: int, stride: int,
                  lanes: int) -> None:
    """Copy ``channels`` ``side`` x ``side`` input channels into stride x stride phase planes each
    (plane 2a + b holds input pixels (stride y + a, stride x + b)), of ``image`` x ``image`` pixels stored as
    ``size`` x ``size`` squares, zeros in the extra columns and rows: per padded vector whole-vector loads of
    the windows of the channel holding its pixels and one permutation of them with zeros."""
    total, planes = side * side, stride * stride
    zero = tirx.Broadcast(tirx.const(0.0, "float32"), lanes)
    with T.parallel(0, channels) as c:
        for plane in range(planes):
            a, b = divmod(plane, stride)
            for h in range(size * size // lanes):
                wanted = []
                for i in range(lanes):
                    y, x = divmod(h * lanes + i, size)
                    wanted.append((stride * y + a) * side + stride * x + b if y < image and x < image else None)
                starts, index = gathered_windows(wanted, total, lanes)
                parts = [source[tirx.Ramp(c * total + start, 1, lanes)] for start in starts]
                T.buffer_store(padded, tirx.Shuffle(parts + [zero], index),
                               [tirx.Ramp((c * planes + plane) * size * size + h * lanes, 1, lanes)])


def _output_vectors(results, image: int, size: int, lanes: int):
    """(first float, vector) of the output channel's stores, from ``results``: the channel's ``size`` x
    ``size`` output vectors. A square output is stored as it is; a smaller one (computed in a padded
    square) as whole vectors of consecutive output floats, each a permutation of the two result vectors its
    pixels come from, the last one overlapping the one before (every store a whole vector in the channel)."""
    if image == size:
        return [(h * lanes, value) for h, value in enumerate(results)]
    total, stores = image * image, []
    for k in range(-(-total // lanes)):
        start = min(k * lanes, total - lanes)
        lanes_of = [divmod(divmod(start + i, image)[0] * size + (start + i) % image, lanes) for i in range(lanes)]
        used = sorted({h for h, _ in lanes_of})
        index = [used.index(h) * lanes + lane for h, lane in lanes_of]
        stores.append((start, tirx.Shuffle([results[h] for h in used], index)))
    return stores


# Padded squares (7x7 layers) prefetch each kernel's weights and channel index this many kernels ahead: ResNet-50's
# 512x512 7x7 layers stream 1.47 MB of weights from DRAM in the model (its ~70 MB of weights outgrow the L3). Zen 5,
# 1 thread, in the pruned ResNet-50 (per-call minima, two interleaved runs of 11 rounds): 7x7 1.16-1.33x, 14 -> 7
# stride 2 1.08-1.15x (256 ahead the same); alone with the weights in cache 0.95-1.00x. 4x4 and 8x8 unmeasured: off.
# One thread only: in a parallel body the 1 KB tile is not a stack buffer, and with the prefetch in the kernel loop LLVM
# stored all 16 accumulators every kernel (the 2-thread build did 2.0-2.2x the 1-thread work on one core; session 18,
# ResNet-50's 7x7 layers at 2 threads, `patdnn bench --profile`, three pairs of runs: 0.48-0.50 -> 0.33-0.40 ms).
_WEIGHT_PREFETCH = 64

# (lanes, output size) -> each filter prefetches, for writing, the output channel of the filter this many ahead (its
# lines, ``order`` scatters the output channels so the hardware prefetcher does not see them). ResNet-50's 512x512
# 7x7 layers alone after a 64 MB eviction: 0.244-0.247 ms, 0.222 with the output in cache, 0.219 with input and
# output (the output's 100 KB came from DRAM one line at a time); with this prefetch 0.225-0.226 (1 or 2 ahead),
# hot 1.00x. In the pruned ResNet-50 (Zen 5, 1 thread, per-call minima, two interleaved runs of 11 rounds, session
# 18): first 7x7 layer 238.4-238.6 -> 211.2-214.7 us (1.11-1.13x; 45 -> 50% of 268 GFLOP/s), second 214.9-215.2 ->
# 211.4-211.9 us (1.02x; 50%); one filter ahead 212.9-216.9 us.
_OUTPUT_PREFETCH = {(16, 7): 2}


def pattern_conv_shifted_rows_primfunc(spec: PatternConvSpec, threads: int = 1, lanes: int = 8) -> tirx.PrimFunc:
    """The scheduled PrimFunc of one 4x4, 8x8 or 7x7 (stride 1 or 2) pattern conv for a target of ``lanes``
    fp32 lanes (see the module docstring); the arguments of
    :func:`~tvm_patdnn.ops.pattern_conv_2x2.pattern_conv_2x2_primfunc` on AVX-512: data, values, channels,
    offsets, order (FKW's: stored filter -> output channel), [bias], out. Each thread takes a contiguous run of
    filters holding its share of the kernels (:func:`~tvm_patdnn.ops.pattern_conv_2x2.thread_filters`)."""
    if not shifted_rows_apply(spec, lanes):
        raise PatDNNError("the shifted-rows kernel takes 4x4 images (8 or 16 lanes), 8x8 and 7x7 ones (16 lanes), "
                          "stride 1, or 14x14 ones to 7x7 at stride 2 (16 lanes), padding 1, 4 taps; got "
                          f"{spec.height}x{spec.width}, strides {spec.strides}, padding {spec.padding}, "
                          f"{spec.taps} taps at {lanes} lanes")
    image, stride = spec.out_height, spec.strides[0]  # the output's side; 1 or 2
    sets = _SETS[lanes, image]
    size = _PITCH.get((lanes, image), image)  # the square the kernel computes on (the padded copy's pitch)
    n_, c_, f_, p_ = spec.batch, spec.in_channels, spec.out_channels, len(spec.patterns)
    taps, pixels, halves = spec.taps, size * size, size * size // lanes
    kernels = max(1, spec.n_kernels)
    zero = tirx.const(0.0, "float32")
    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name("main")
            data, values, channels, offsets, order, bias, out = fkw_arguments(
                spec, kernels, (n_, c_, spec.height, spec.width), (n_, f_, image, image))
            planes = stride * stride  # per channel
            if size == image and stride == 1:
                images = T.decl_buffer((n_ * c_ * pixels,), "float32", data=data.data)
            else:
                images = T.decl_buffer((n_ * c_ * planes * pixels,), "float32")
                _pad_channels(T.decl_buffer((n_ * c_ * spec.height * spec.width,), "float32", data=data.data),
                              images, n_ * c_, spec.height, image, size, stride, lanes)
            outputs = T.decl_buffer((n_ * f_ * image * image,), "float32", data=out.data)

            def filter_task(task) -> None:
                n, f = task // f_, task % f_
                chains = sets * halves * taps  # (set, half, tap) vectors
                acc = T.decl_buffer((chains * lanes,), "float32", scope="local")
                for q in range(chains):
                    T.buffer_store(acc, tirx.Broadcast(zero, lanes), [tirx.Ramp(q * lanes, 1, lanes)])
                ahead = _OUTPUT_PREFETCH.get((lanes, image), 0)
                if ahead:  # the output channel of the filter this many ahead, for writing
                    later = (n * f_ + order[tirx.min(f + ahead, f_ - 1)]) * (image * image)
                    for byte in range(0, image * image * 4, 64):  # 64 bytes apart: every line of the channel
                        point = later + min(byte // 4, image * image - 1)
                        T.evaluate(tirx.call_intrin("void", "tirx.prefetch", tirx.address_of(outputs[point]), 1, 3, 1))

                def accumulate(pattern, k, a: int) -> None:
                    base = (n * c_ + channels[k]) * planes * pixels
                    if _WEIGHT_PREFETCH and size > image and threads == 1:
                        ahead = tirx.min(k + _WEIGHT_PREFETCH, kernels - 1)
                        for address in (tirx.address_of(values[ahead, 0]), tirx.address_of(channels[ahead])):
                            T.evaluate(tirx.call_intrin("void", "tirx.prefetch", address, 0, 3, 1))
                    for t, (dy, dx) in enumerate(pattern):
                        weight = tirx.Broadcast(values[k, t], lanes)
                        plane, top, shift = _tap_source(dy, dx, stride)
                        for h in range(halves):
                            slots = tirx.Ramp(((a * halves + h) * taps + t) * lanes, 1, lanes)
                            if size > image:  # a padded square: windows of two vectors
                                rows = _tap_window(images, base + plane * pixels, size, h * lanes // size + top,
                                                   shift, lanes, halves)
                            else:
                                tap_rows = _tap_rows_aligned if pixels == lanes else _tap_rows  # AVX-512 4x4
                                rows = tap_rows(images, base + plane * pixels, size, h * lanes // size + top,
                                                 shift, lanes)
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
                results = []
                for h in range(halves):
                    value = sum((acc[tirx.Ramp(((a * halves + h) * taps + t) * lanes, 1, lanes)]
                                 for a in range(sets) for t in range(taps) if a or t),
                                acc[tirx.Ramp(h * taps * lanes, 1, lanes)])
                    results.append(bias_relu(value, None if bias is None else bias[fo], spec.relu, lanes))
                for start, value in _output_vectors(results, image, size, lanes):
                    T.buffer_store(outputs, value, [tirx.Ramp((n * f_ + fo) * (image * image) + start, 1, lanes)])

            with T.parallel(0, threads) as t:
                first, last = thread_filters(offsets, f_, p_, threads, t)
                with T.serial(first, last) as f:
                    with T.serial(0, n_) as n:
                        filter_task(n * f_ + f)
    func = builder.get().without_attr("global_symbol")
    return func.with_attr(PATTERN_CONV_ATTR, {**_spec_attr(spec), "shifted_rows": 1})
