"""The pattern convolution on phase planes of whole aligned rows, without split loads (AVX-512): stride 2
(ResNet-50's 56 -> 28 and 28 -> 14 layers) and stride 1 (14x14, 28x28 and 112x112 layers of >= 128 channels, all 56x56
ones, 32x32 ones of <= 64 channels).

A 3x3 stride-2 layer with padding 1 reads output pixel (y, x)'s tap (dy, dx) at padded input pixel
(2y + dy, 2x + dx). Each input channel is first split into its 2 x 2 row/column phase planes: plane
(a, b) holds padded pixel (2y + a, 2x + b), i.e. input pixel (2y + a - 1, 2x + b - 1), zero outside, for
y = 0..OH and x = 0..OW. Tap (dy, dx) then reads plane (dy % 2, dx % 2) at row offset dy // 2 and column
offset dx // 2: a stride-1 read. Every plane row is stored as V = ceil((OW + 1) / 16) aligned 16-lane
vectors (column OW is the last one a shifted tap reads, lanes past it are zeros), so a tap with column
offset 0 is one aligned vector and one with offset 1 is that vector and the next (or zeros) shifted by
one lane (one ``valignd``): no load splits a cache line. The TE operator's strided aligned rows read
the dx = 2 taps as vectors one float on (a split load, two load slots, for about a third of the taps).
At stride 1 a channel is one plane: plane row y holds input row y - 1 (zero rows above and below), column x
input column x (zero lanes from column W on), and tap (dy, dx) reads row offset dy, column shift dx - 1. Rows of
one vector (14x14): the centre column an aligned vector, the side ones a ``valignd`` of it with zeros. Rows of V >= 2
vectors are lifted (:data:`PHASE_LIFTED`): lane j of vector i holds column V j + i, so the side taps of vector i
are vectors i - 1 and i + 1 of the same row (aligned loads), and only vector 0's left one (vector V - 1 one lane
up, a zero in lane 0) and vector V - 1's right one (vector 0 one lane down) a ``valignd`` with zeros; the output
stage interleaves the tile's vectors back into consecutive floats. Unlifted, every side tap of every vector was a
``valignd`` of two adjacent vectors (LLVM turned about half into a ``vpermt2ps`` plus a register copy: ~16 shuffles
per 32 FMAs at 56x56). The TE operator's aligned rows read the side taps of their 16-float rows as loads one float
off (every one splits a line).

The register tile is R whole output rows (R x V vectors; R divides the output's rows), kept on the
stack so that it stays in registers across the (filter, pattern) runs, stored once with bias and
ReLU as whole vectors of consecutive output floats (each permuted from the result vectors its pixels
come from, the last overlapping the one before: no masked or partial store). Filters run in FKW's
stored order, each thread a contiguous run of them (:func:`~.pattern_conv_2x2.thread_filters`), row
blocks outside the filters, so a block's plane rows (every channel) are what the filters re-read from L2; with one
thread they are built per row block, just before the filters read them, into a buffer of one block, instead of all
planes first: in the model the planes then come from L2, not back from L3 (ResNet-50's 56 -> 28 layer's planes are
1.9 MB; Zen 5, 1 thread, in the pruned ResNet-50, per-call minima, two interleaved runs of 9 rounds: 56 -> 28
1.089x / 1.093x, 28 -> 14 1.023x / 1.039x; alone 0.98x and 1.03x); more threads pad everything first (split over
the channels).
Per kernel, the first line of the block of each plane its pattern reads is prefetched for the kernel
:data:`PHASE_PREFETCH` ahead (the channel is gathered; the hardware prefetchers follow the rest of the block).

Zen 5, 1 thread, ResNet-50's layers with the pruned model's weights, interleaved against the TE operator's
strided aligned rows (session 17): alone 128x128 56 -> 28 0.37 -> 0.31 ms (29 -> 35% of 268 GFLOP/s; 1.16x
before the prefetch, which added 1.05-1.10x), 256x256 28 -> 14 0.36 -> 0.28 ms (30 -> 38%; 1.24x with 7-row
tiles, 1.19x with 14, the prefetch 1.05-1.07x); in the pruned ResNet-50 (per-call minima, two runs of 9 rounds)
0.415-0.438 -> 0.353-0.379 ms and 0.391-0.401 -> 0.309-0.314 ms. The pad takes 0.039 and 0.022 ms of that (the TE
operator's 0.078 and 0.056). The rest is the kernel loop reading the planes from L2: with the channel indices
mapped mod 16 (the planes in L1) the layers run 1.57-1.65x faster. A stride-2 kernel reads ~1 input vector per
FMA (only taps of one plane share rows), so its planes' bytes per FMA are twice a stride-1 layer's. Stride 1
against the TE operator's aligned rows (14x14) and halo-less lifted rows (28x28): alone ResNet-50's 256x256 14x14
1.19-1.25x (7-row tiles; 14 rows 1.19x), 128x128 28x28 1.19x (4 x 2 vectors; 7 x 1 0.78x), VGG-16 224's 512x512
14x14 1.11x; in the models (per-call minima) ResNet-50's five 14x14 layers 0.230-0.233 -> 0.183-0.187 ms (46 ->
57-58%), its three 28x28 0.205-0.213 -> 0.172-0.176 ms (50-52 -> 61-62%), VGG-16 224's three 14x14 0.818-0.834 ->
0.730-0.759 ms (1.09-1.12x). VGG-16 224's 256- and 512-channel 28x28 layers tie (1.00-1.02x): not routed.
ResNet-50's 64-channel 56x56 layers (4-vector rows, 2 x 4 tiles), against the wide-rows kernel: alone 1.19-1.21x
(0.23 -> 0.19 ms, 46 -> 55%), in the model 0.232-0.257 -> 0.198-0.219 ms (1.14-1.19x, two runs; 41-46 -> 49-54%).

VGG-16 224's 56x56 layers (session 17, h4; 4-vector rows, 2 x 4 tiles), alone against the kernels they ran before
(interleaved, CPU time): 128 -> 256 1.23x over the wide-rows kernel (1.73 -> 1.41 ms, 49 -> 60%), 256 -> 256 1.02-1.03x
over the TE operator's lifted rows; lifted planes then 1.045x and 1.065x more (1.32 and 2.81 ms, 65% and 61%),
ResNet-50's 128-channel 28x28 1.054x (in the model 1.06x), its 64-channel 56x56 1.02x, 14x14 unchanged (one vector).
With the channel indices mapped mod 16 (the planes in L1) the 256-channel layer runs only 1.13x (unlifted) / 1.18x
(lifted) faster: it is bound by instructions more than by the L2. Not kept there: 4 x 4 tiles (16 accumulators,
lifted or not: spills, 0.48-0.52x), 1 x 4 (0.69-0.71x), half rows 4 x 2 (0.97-0.98x of 2 x 4), 7 x 2 (0.96x), the
whole pad first instead of per row block (0.98x).

Measured and not kept: channel blocks of 16-20 channels (the kernels ordered by block, each filter's tile sums kept
in memory between blocks) 1.06-1.11x alone but 0.68-0.75x (28 -> 14) and 0.96-1.02x (56 -> 28) in the model; plane
rows stored per row block and channel contiguously (0.92x at 56 -> 28, 1.00x at 28 -> 14); prefetching more lines of
a plane (every 1-4 lines: 0.89-1.05x).

Where the stride-2 layers' time goes (session 18, h6; Zen 5, 1 thread, core 1; alone, real pruned weights, per-call
minima, medians of 5 rounds): 56 -> 28 hot 0.288-0.292 ms, after a 64 MB eviction 0.348, evicted then only the output
brought back 0.354-0.359, only the input 0.305-0.316, only the weights 0.342; in the pruned ResNet-50 0.290-0.302: the
hot time (the input, the layer before's output, is in cache). 28 -> 14 hot 0.245, evicted 0.270-0.282, output back
0.280-0.283, input 0.270-0.272, weights 0.276; in the model 0.274-0.282, the evicted time with no one part to blame.
At stride 2 each kernel prefetches the weights and channel index of the kernel :data:`PHASE_WEIGHT_PREFETCH` ahead
(64; 128 and 256 the same): in the pruned ResNet-50 (per-call minima, three interleaved runs of 9-11 rounds) 56 -> 28
296.8-301.8 -> 288.6-292.9 us (1.02-1.04x; 35-36 -> 36-37% of 268 GFLOP/s), 28 -> 14 277.5-282.2 -> 263.3-272.7 us
(1.035-1.054x; 38 -> 39-40%); the stride-1 layers 0.98-1.02x (56x56, 14x14): off there. Not kept: the output lines of
the filter 1 or 2 ahead prefetched for writing (as the 7x7 shifted-rows kernel does) 56 -> 28 1.01-1.02x, 28 -> 14
0.97-0.98x, stride 1 0.97-1.00x; the input rows the next row block adds prefetched (prefetcht1) while a block's planes
are built 0.95x / 0.98x.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..errors import PatDNNError
from .activation import bias_relu
from .pattern_conv import PATTERN_CONV_ATTR, PatternConvSpec, _spec_attr, fkw_arguments
from .pattern_conv_2x2 import thread_filters

__all__ = ["PHASE_LIFTED", "PHASE_LIFTED_TILE_VECTORS", "PHASE_PLANE_SIZES", "PHASE_PREFETCH", "PHASE_WEIGHT_PREFETCH",
           "PHASE_TILE_VECTORS", "gathered_windows", "phase_planes_apply", "phase_planes_tile",
           "pattern_conv_phases_primfunc"]

_LANES = 16
_MAX_VECTORS = 4  # vectors a plane row, at most (wider rows measured 0.66-0.89x of the wide-rows kernel)
_MAX_LIFTED_VECTORS = 14  # ... lifted rows of exactly ceil(W / 16) vectors (see phase_planes_tile)
# Each kernel prefetches, for the kernel this many ahead (its channel is gathered: the hardware prefetcher cannot
# follow), the first line of the row block of each phase plane its pattern reads (0: none)
PHASE_PREFETCH = 4
# stride -> each kernel prefetches the weights and channel index of the kernel this many ahead (0 or absent: none):
# inside a model a layer's weights stream from beyond the L3 (ResNet-50's ~70 MB). Measured in the module docstring.
PHASE_WEIGHT_PREFETCH = {2: 64}
# Stride-1 plane rows of at least 2 vectors are stored lifted: lane j of vector i is column vectors * j + i, so a
# side tap of vector i is vector i -+ 1 of the row (an aligned load) and only the first (last) vector's one valignd of
# the last (first) vector with zeros, instead of one valignd of two adjacent vectors for every vector (LLVM made half
# of them vpermt2ps plus a register copy); the output stage interleaves the tile's vectors back into rows.
PHASE_LIFTED = True
PHASE_TILE_VECTORS = 8  # accumulator vectors of the register tile, at most
# ... with lifted rows (fewer shuffle temporaries): VGG-16 224's 28x28 layers 7 x 2 tiles against 4 x 2 1.08-1.10x,
# ResNet-50's 128-channel 28x28 1.095x; at 56x56 still 2 x 4 (3 rows do not divide 56; 4 x 4 spills: 0.5x)
PHASE_LIFTED_TILE_VECTORS = 14
# (input height, input width, stride) this kernel is routed for -> (fewest, most) input channels it takes there
# (None: no bound): ResNet-50's 56 -> 28 and 28 -> 14 stride-2 layers, the 14x14 layers of ResNet-50 (256 channels)
# and VGG-16 224 (512), 28x28 layers of >= 128 channels (ResNet-50's 128, VGG-16 224's 256 -> 512 and 512 -> 512:
# unlifted a tie with the TE operator's halo-less lifted rows, 1.00-1.02x; lifted with 7 x 2 tiles 1.17-1.18x in the
# trunk) and every 56x56 layer (ResNet-50's 64 channels, VGG-16 224's 128 -> 256 and 256 -> 256: in the trunk
# 1.24x / 1.12-1.15x / 1.05-1.08x over the wide-rows kernel and the TE operator's lifted rows before lifted planes,
# 1.30-1.32x / 1.18-1.19x / 1.10-1.12x with them); fewer channels keep the TE operator (unmeasured); rows of 112 and
# 224 columns (8 and 15 vectors) 0.66-0.89x of the wide-rows kernel: not routed; CIFAR's 64-channel 32x32 layer 1.28x
# over it in 2 lifted vectors (phase_planes_tile; 0.90x in 3): routed up to 64 channels (more: unmeasured); VGG-16
# 224's 128x128 112x112 in 7 lifted vectors (2 x 7 tiles) 1.12x alone and 1.155x in the trunk over the wide-rows
# kernel, its 64 -> 128 0.99x (not routed below 128 channels), 4 x 7 tiles 0.53x (spills)
PHASE_PLANE_SIZES = {(56, 56, 2): (None, None), (28, 28, 2): (None, None), (14, 14, 1): (256, None),
                     (28, 28, 1): (128, None), (56, 56, 1): (None, None), (32, 32, 1): (None, 64),
                     (112, 112, 1): (128, None)}


def phase_planes_tile(spec: PatternConvSpec) -> tuple[int, int]:
    """(R output rows, V vectors a row) of the register tile: V = ceil((OW + 1) / 16), R the largest divisor
    of the output's rows with R x V <= :data:`PHASE_TILE_VECTORS` (lifted rows :data:`PHASE_LIFTED_TILE_VECTORS`).
    Lifted stride-1 rows of more than 16 columns take ceil(OW / 16) vectors: a lifted side tap reads column OW only
    as the zero shifted in at an end vector, so rows of 32 columns fill 2 vectors (not 3 at 67% of the lanes; VGG-16
    CIFAR's 64-channel 32x32: 1.21-1.23x over the wide-rows kernel alone, 77-82% of 268 GFLOP/s, 1.28x in the model,
    0.061 -> 0.047 ms; 224 columns in 14 lifted vectors, 1 x 14 tiles, 0.69x of it)."""
    vectors = -(-(spec.out_width + 1) // _LANES)
    if PHASE_LIFTED and spec.strides[0] == 1 and spec.out_width > _LANES:
        vectors = -(-spec.out_width // _LANES)
    most = PHASE_LIFTED_TILE_VECTORS if _lifted(spec.strides[0], vectors) else PHASE_TILE_VECTORS
    rows = max(r for r in range(1, spec.out_height + 1)
               if spec.out_height % r == 0 and r * vectors <= max(most, vectors))
    return rows, vectors


def phase_planes_apply(spec: PatternConvSpec, target_lanes: int, sizes=None) -> bool:
    """Whether this kernel computes ``spec`` on a target of ``target_lanes`` fp32 lanes: 16 (AVX-512), stride
    1 or 2, padding 1 on every side, 4-tap patterns, output rows of at most 63 columns (4 vectors with the
    shifted taps' extra column; lifted stride-1 rows up to 224 columns), at stride 2 input rows of at least 16
    columns, and (``sizes`` None) a size and channel count of :data:`PHASE_PLANE_SIZES` (``"any"``: any other)."""
    sizes = PHASE_PLANE_SIZES if sizes is None else sizes
    stride = spec.strides[0]
    if not (target_lanes == _LANES and spec.strides in ((1, 1), (2, 2)) and spec.padding == (1, 1, 1, 1)
            and spec.taps == 4 and spec.n_kernels > 0 and (spec.out_width + 1 <= _MAX_VECTORS * _LANES or (
                PHASE_LIFTED and stride == 1 and spec.out_width <= _MAX_LIFTED_VECTORS * _LANES))
            and (stride == 1 or spec.width >= _LANES) and spec.batch * spec.in_channels * spec.height * spec.width
            >= _LANES):
        return False
    if sizes == "any":
        return True
    fewest, most = sizes.get((spec.height, spec.width, stride), (0, 0))
    return (fewest is None or spec.in_channels >= fewest) and (most is None or spec.in_channels <= most)


def _lifted(stride: int, vectors: int) -> bool:
    """Whether plane rows are stored lifted (:data:`PHASE_LIFTED`)."""
    return PHASE_LIFTED and stride == 1 and vectors > 1


def _windows(w_: int, vectors: int, out_width: int, stride: int) -> dict:
    """(b, v) -> (input windows, permutation index) of plane vector v of column phase b: at stride 2 lane i is
    input column 2 (16 v + i) + b - 1 for plane columns up to ``out_width``, at stride 1 column 16 v + i for
    columns before ``w_``; zero elsewhere (index 16 x the windows)."""
    lanes = _LANES
    starts_of = {}
    for b in range(stride):
        for v in range(vectors):
            columns = ([vectors * i + v for i in range(lanes)] if _lifted(stride, vectors)
                       else [v * lanes + i for i in range(lanes)])
            wanted = ([q if 0 <= q < w_ and x <= out_width else None for x, q in ((x, 2 * x + b - 1) for x in columns)]
                      if stride == 2 else [x if x < w_ else None for x in columns])
            starts_of[b, v] = gathered_windows(wanted, w_, lanes)
    return starts_of


def gathered_windows(wanted: list, total: int, lanes: int) -> tuple[list[int], list[int]]:
    """How one vector gathers its ``lanes`` values from a row of ``total`` floats: ``wanted[i]`` is the position
    lane i takes (None: zero). Returns the starts of the fewest whole-vector loads (inside the row) that cover
    them and each lane's index into those loads followed by a zero vector (index ``lanes`` x the loads: zero),
    the operands of one shuffle."""
    windows = []
    for q in sorted(q for q in wanted if q is not None):
        if not windows or q >= windows[-1] + lanes:
            windows.append(max(0, min(q, total - lanes)))
    index = []
    for q in wanted:
        if q is None:
            index.append(len(windows) * lanes)
        else:
            w = max(i for i, start in enumerate(windows) if start <= q)
            index.append(w * lanes + q - windows[w])
    return windows, index


def _pad_row(source, planes, channel, y, destination, h_, w_, total: int, vectors: int, starts_of, stride: int):
    """Plane row ``y`` of every phase plane of input channel ``channel`` (of all images' channels), stored at
    ``destination(plane) + v * 16``: per plane vector whole-vector loads of the input row's windows and one
    permutation of them with zeros; rows outside the input zeros. Rows narrower than a vector load the 16 floats
    from the row's start, or (the input's last row, where those would run past its end) the 16 ending with it."""
    lanes = _LANES
    zero = tirx.Broadcast(tirx.const(0.0, "float32"), lanes)
    for a in range(stride):
        row = stride * y + a - 1
        inside = tirx.all(row >= 0, row < h_)
        base = (channel * h_ + tirx.min(tirx.max(row, 0), h_ - 1)) * w_
        for b in range(stride):
            for v in range(vectors):
                windows, index = starts_of[b, v]
                at = tirx.Ramp(destination(stride * a + b) + v * lanes, 1, lanes)

                def value(back: int = 0, windows=windows, index=index):
                    parts = [source[tirx.Ramp(base + start - back, 1, lanes)] for start in windows]
                    moved = [i + back if i < len(windows) * lanes else i for i in index]
                    return tirx.Select(inside, tirx.Shuffle(parts + [zero], moved), zero)

                if w_ >= lanes:
                    T.buffer_store(planes, value(), [at])
                    continue
                with T.If(base + lanes <= total):
                    with T.Then():
                        T.buffer_store(planes, value(), [at])
                    with T.Else():
                        T.buffer_store(planes, value(lanes - w_), [at])


def _pad_block(source, planes, n, c_, h_, w_, y0, rows: int, pitch: int, vectors: int, out_width: int,
               stride: int) -> None:
    """Plane rows y0 .. y0 + rows - 1 of every channel of image n, into planes [c][plane][rows][pitch]."""
    starts_of, count = _windows(w_, vectors, out_width, stride), stride * stride
    with T.serial(0, c_) as c:
        for yy in range(rows):
            _pad_row(source, planes, n * c_ + c, y0 + yy,
                     lambda plane, yy=yy: ((c * count + plane) * rows + yy) * pitch, h_, w_, source.shape[0], vectors,
                     starts_of, stride)


def _pad_planes(source, planes, n_, c_, h_, w_, rows: int, pitch: int, vectors: int, out_width: int,
                stride: int) -> None:
    """Split every input channel into its stride x stride phase planes of ``rows`` rows x ``pitch`` floats (see
    the module docstring)."""
    starts_of, count = _windows(w_, vectors, out_width, stride), stride * stride
    with T.parallel(0, n_ * c_) as c:
        with T.serial(0, rows) as y:
            _pad_row(source, planes, c, y, lambda plane: ((c * count + plane) * rows + y) * pitch, h_, w_,
                     source.shape[0], vectors, starts_of, stride)


def _tap_source(dy: int, dx: int, stride: int) -> tuple[int, int, int]:
    """(plane, row offset, column shift) of tap (dy, dx): output pixel (y, x) reads plane row y + row offset,
    column x + column shift. Stride 2: plane (dy % 2, dx % 2), offsets dy // 2 and dx // 2; stride 1: the one
    plane (row y holds input row y - 1, column x input column x), offsets dy and dx - 1."""
    return (2 * (dy % 2) + dx % 2, dy // 2, dx // 2) if stride == 2 else (0, dy, dx - 1)


def _output_stores(results, rows: int, width: int, vectors: int, lifted: bool = False):
    """(first float, vector) of one tile's stores: ``rows`` whole output rows of ``width`` floats, contiguous
    in the output channel, from ``results[r * vectors + v]`` (lane i: column v * 16 + i of row r, lifted column
    vectors * i + v); whole vectors of consecutive floats, the last overlapping the one before."""
    lanes, total, stores = _LANES, rows * width, []
    for k in range(-(-total // lanes)):
        start = min(k * lanes, total - lanes)
        sources = [divmod(start + i, width) for i in range(lanes)]  # (row, column)
        slots = [(r * vectors + x % vectors, x // vectors) if lifted else (r * vectors + x // lanes, x % lanes)
                 for r, x in sources]
        used = sorted({s for s, _ in slots})
        index = [used.index(s) * lanes + lane for s, lane in slots]
        value = results[used[0]] if index == list(range(lanes)) else tirx.Shuffle([results[s] for s in used], index)
        stores.append((start, value))
    return stores


def pattern_conv_phases_primfunc(spec: PatternConvSpec, threads: int = 1, lanes: int = _LANES,
                                 sizes=None) -> tirx.PrimFunc:
    """The scheduled PrimFunc of one stride-2 pattern conv on phase planes (see the module docstring); the
    arguments of the shifted-rows kernel: data, values, channels, offsets, order (FKW's: stored filter ->
    output channel), [bias], out."""
    if not phase_planes_apply(spec, lanes, sizes):
        raise PatDNNError("the phase-plane kernel takes 16 lanes, stride 1 or 2 (input rows of at least 16 columns), "
                          "padding 1, 4 taps and output rows of at most 63 columns (lifted stride-1 rows 224); got "
                          f"{spec.height}x{spec.width}, strides {spec.strides}, padding {spec.padding}, {spec.taps} "
                          f"taps at {lanes} lanes")
    n_, c_, h_, w_ = spec.batch, spec.in_channels, spec.height, spec.width
    oh, ow = spec.out_height, spec.out_width
    f_, p_ = spec.out_channels, len(spec.patterns)
    tile_rows, vectors = phase_planes_tile(spec)
    stride = spec.strides[0]
    lifted = _lifted(stride, vectors)
    count, halo = stride * stride, 3 - stride  # planes a channel; plane rows past a block's output rows
    fused = threads == 1  # plane rows built per row block (the module docstring)
    pitch, plane_rows = vectors * lanes, (tile_rows if fused else oh) + halo
    plane = plane_rows * pitch
    zero = tirx.const(0.0, "float32")
    zeros = tirx.Broadcast(zero, lanes)
    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name("main")
            data, values, channels, offsets, order, bias, out = fkw_arguments(
                spec, spec.n_kernels, (n_, c_, h_, w_), (n_, f_, oh, ow))
            source = T.decl_buffer((n_ * c_ * h_ * w_,), "float32", data=data.data)
            planes = T.decl_buffer(((1 if fused else n_) * c_ * count * plane,), "float32")
            if not fused:
                _pad_planes(source, planes, n_, c_, h_, w_, plane_rows, pitch, vectors, ow, stride)
            outputs = T.decl_buffer((n_ * f_ * oh * ow,), "float32", data=out.data)

            def tile(n, f, y0) -> None:
                acc = T.decl_buffer((tile_rows * vectors * lanes,), "float32")  # on the stack: in registers
                for s in range(tile_rows * vectors):
                    T.buffer_store(acc, zeros, [tirx.Ramp(s * lanes, 1, lanes)])
                for p, pattern in enumerate(spec.patterns):
                    start = offsets[f * p_ + p]
                    with T.serial(0, offsets[f * p_ + p + 1] - start) as j:
                        k = start + j
                        base = (channels[k] * count * plane if fused
                                else (n * c_ + channels[k]) * count * plane + y0 * pitch)

                        def row_vector(source: int, row: int, v: int):
                            if not 0 <= v < vectors:
                                return zeros
                            return planes[tirx.Ramp(base + source * plane + row * pitch + v * lanes, 1, lanes)]

                        if PHASE_WEIGHT_PREFETCH.get(stride, 0):  # a later kernel's weights and channel
                            later = tirx.min(k + PHASE_WEIGHT_PREFETCH[stride], spec.n_kernels - 1)
                            for address in (tirx.address_of(values[later, 0]), tirx.address_of(channels[later])):
                                T.evaluate(tirx.call_intrin("void", "tirx.prefetch", address, 0, 3, 1))
                        if PHASE_PREFETCH:  # the first line of the block of each plane this pattern reads, ahead
                            ahead = tirx.min(k + PHASE_PREFETCH, spec.n_kernels - 1)
                            later = (channels[ahead] * count * plane if fused
                                     else (n * c_ + channels[ahead]) * count * plane + y0 * pitch)
                            for source in sorted({_tap_source(dy, dx, stride)[0] for dy, dx in pattern}):
                                T.evaluate(tirx.call_intrin("void", "tirx.prefetch", tirx.address_of(
                                    planes[later + source * plane]), 0, 3, 1))
                        for t, (dy, dx) in enumerate(pattern):
                            weight = tirx.Broadcast(values[k, t], lanes)
                            source, oy, sx = _tap_source(dy, dx, stride)
                            for r in range(tile_rows):
                                for v in range(vectors):
                                    vector = row_vector(source, r + oy, v)
                                    if lifted and sx and 0 <= v + sx < vectors:  # the neighbour column's vector
                                        vector = row_vector(source, r + oy, v + sx)
                                    elif lifted and sx:  # the other end's vector one lane on, zeros shifted in
                                        edge = row_vector(source, r + oy, vectors - 1 if sx < 0 else 0)
                                        pair, first = ((zeros, edge), lanes - 1) if sx < 0 else ((edge, zeros), 1)
                                        ints = [tirx.reinterpret(f"int32x{lanes}", part) for part in pair]
                                        vector = tirx.reinterpret(f"float32x{lanes}",
                                                                  tirx.Shuffle(ints, list(range(first, first + lanes))))
                                    elif sx:  # a window of this vector and the next (previous): on int32 lanes valignd
                                        pair = (vector, row_vector(source, r + oy, v + 1)) if sx > 0 else (
                                            row_vector(source, r + oy, v - 1), vector)
                                        first = 1 if sx > 0 else lanes - 1
                                        ints = [tirx.reinterpret(f"int32x{lanes}", part) for part in pair]
                                        vector = tirx.reinterpret(f"float32x{lanes}",
                                                                  tirx.Shuffle(ints, list(range(first, first + lanes))))
                                    slots = tirx.Ramp((r * vectors + v) * lanes, 1, lanes)
                                    T.buffer_store(acc, acc[slots] + vector * weight, [slots])
                fo = order[f]
                results = [bias_relu(acc[tirx.Ramp(s * lanes, 1, lanes)], None if bias is None else bias[fo],
                                     spec.relu, lanes) for s in range(tile_rows * vectors)]
                first = (n * f_ + fo) * oh * ow + y0 * ow
                for offset, value in _output_stores(results, tile_rows, ow, vectors, lifted):
                    T.buffer_store(outputs, value, [tirx.Ramp(first + offset, 1, lanes)])

            with T.parallel(0, threads) as t:
                first_filter, last_filter = thread_filters(offsets, f_, p_, threads, t)
                with T.serial(0, n_) as n:
                    with T.serial(0, oh // tile_rows) as block:
                        if fused:
                            _pad_block(source, planes, n, c_, h_, w_, block * tile_rows, plane_rows, pitch, vectors, ow,
                                       stride)
                        with T.serial(first_filter, last_filter) as f:
                            tile(n, f, block * tile_rows)
    func = builder.get().without_attr("global_symbol")
    return func.with_attr(PATTERN_CONV_ATTR, {**_spec_attr(spec), "phase_planes": 1})
