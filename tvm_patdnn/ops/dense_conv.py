"""Dense convolution (and its bias / residual / ReLU / clip epilogue) as a packed GEMM kernel.

A conv over NCHW is the matrix product ``out[n, f, p] = sum_r w[f, r] * cols[n, r, p]`` over the
flattened output pixels ``p`` and the window taps ``r = (c, dy, dx)`` (for a 1x1 conv, ``cols`` is
the input itself). Why it gets its own kernel instead of a schedule of the legalized conv
(measured on ResNet-50 shapes, see ``benchmarks/dense.py``): vectors along the flattened pixels
use every lane whatever the image width (56, 28, 14, 7 leave 14 of 16 or 7 of 8 lanes to a
row-wise vector), and the loop nest is the one of a GEMM micro-kernel:

* weights are packed at compile time as ``[F / MR][C * KH * KW][MR]``: the ``MR`` filters of a
  register tile are one contiguous run per tap, read as ``MR`` broadcasts;
* per tile of ``NR`` pixel vectors, the panel ``[C * KH * KW][NR * lanes]`` of the tile's windows
  is first copied into a contiguous buffer (a 1x1 stride-1 conv copies rows of the input: its
  rows are ``H*W*4`` bytes apart, which maps a whole panel onto a few L1 sets; measured 53 -> 64
  GFLOP/s on 256->64 at 56x56), then every filter tile sweeps it from L1 with ``MR x NR``
  accumulators in registers (``MR * NR + NR + 2`` vector registers: AVX2 6x2 of its 16,
  AVX-512 and NEON 14x2 of their 32). Other convs gather the panel from a zero-padded copy of
  the input (im2col one tile at a time: it stays in cache and costs one copy per tap and pixel,
  against ``F`` multiply-adds);
* a long reduction (many channels x taps) runs in blocks whose panel fits ``PANEL_BYTES``, the
  partial sums waiting in a per-tile buffer (not in the output: tiles overlap, see below);
* except when the weights outgrow L2 (``filters_outer``, by default on AVX2 tiles with
  ``FILTERS_OUTER_WEIGHT_BYTES`` of weights): the order above streams them once per pixel tile,
  from L3, so a neighbour's memory traffic slows it down; then every panel is packed first and
  each filter tile sweeps all of them, its weights in L1 and the panels in L2 (Zen 3, 1 thread,
  interleaved: 1024->2048 s2 at 14x14 (8 MB of weights) 1.17-1.22x, 1024->512 at 14x14 and
  512->1024 s2 at 28x28 (2 MB) 1.05x and 1.03x, ties on the 1 MB layers). ``patdnn tune``
  measures both orders where the weights reach L2's size, on every target;
* the last pixel tile overlaps the one before instead of running a masked tail (stores of the
  overlap write identical values), so every load and store is a full vector; when at most one
  vector of pixels is left after the whole tiles it is one vector wide (``narrow_tail``): a 7x7
  output computes 56 pixels for 49 instead of 64, a 14x14 one 200 for 196 instead of 208 (its
  6 x 1 accumulators are too few chains to hide the FMA latency, so it runs at about 3/4 of the
  rate; Zen 3, 1 thread, interleaved: 1024->2048 s2 to 7x7 1.03-1.09x alone and 1.11x in the
  dense ResNet-50, per-call minimum over 20 inferences; its 14x14 layers 0.98-1.06x alone, 0.99-1.05x
  in the model);
* bias, a residual input, ReLU or clip are applied to the accumulators before the one store;
  the lines that store reads (residual) and writes (output) are prefetched before the tile's
  multiply-adds (``prefetch_output``): a tile's 16 pixels of 6 filters are 6 rows ``P * 4`` bytes
  apart, a pattern the hardware prefetchers do not follow, so without it each epilogue waits on
  L3 or memory in a model, where a residual add's input was written layers before (Zen 3,
  1 thread, interleaved: the kernel alone with its weights, residual and output flushed from the
  caches 1.20-1.28x with a residual (128->512 at 28x28, 256->1024 at 14x14), 1.00-1.03x without;
  pruned ResNet-50 1.017x on a quiet box (two builds each, identical builds 0.997x), 1.04-1.08x
  with other processes on both cores; dense ResNet-50 1.03x).

Which convs run here (``DenseConvRewrite.kernel_for``): the 1x1s; KxK convs run on the direct
kernel of :mod:`tvm_patdnn.ops.direct_conv` (no window copy) unless this one is forced.

The function is written directly as (scheduled) TIR, so no schedule rule or tuning touches it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..arith import ceil_div
from .activation import activate, check_activation

__all__ = ["DenseConvSpec", "DENSE_CONV_ATTR", "dense_conv_primfunc", "pack_dense_conv_weight", "register_tile",
           "tile_vectors"]

# PrimFunc attribute carrying the kernel's description (benchmarks and tests look for it).
DENSE_CONV_ATTR = "patdnn.dense_conv"
# DenseConvSpec's fields that describe the conv itself (the others are the GEMM kernel's tile).
LAYER_FIELDS = ("batch", "in_channels", "height", "width", "out_channels", "kernel", "strides", "padding",
                "has_bias", "residual", "activation", "clip_min", "clip_max")
# Input panel budget: half of the smallest L1 data cache of the targets (32 KB on Zen 3 and on
# Cortex-A76), the rest for the weights being broadcast and the output tile.
PANEL_BYTES = 16384
# Weights of at least this many bytes (4 times a 512 KB L2) run with the filter tiles outside the
# pixel tiles on 8-lane (AVX2) tiles unless a tuning record says otherwise
# (DenseConvSpec.default_filters_outer).
FILTERS_OUTER_WEIGHT_BYTES = 2 * 1024 * 1024
# Scope of the register tiles' accumulator buffers: TVM 0.27 allocates a small "local" CPU buffer as
# heap workspace (TVMBackendAllocWorkspace), which LLVM cannot promote to registers (the tile was
# stored to it after every micro-kernel); a "global" one is a stack alloca, which it can (as
# schedule_rules.pattern_conv_cpu.ACCUMULATOR_SCOPE). Zen 3, 1 thread, interleaved, local / global:
# kernel alone (11 rounds) the GEMM 1.01-1.08x on ResNet-50's 1x1s (1024->2048 s2 1.06x twice), the
# direct kernel 0.99-1.09x; in the pruned ResNet-50 (per-call minima of 20 inferences, two builds)
# the GEMM calls 1.00x and 1.06x summed, the direct ones 1.07x in the run without an outlier. The
# direct kernel's NEON (4-lane) tiles keep "local": with "global" the stem-like 3-pixel remainder
# tile's reduction loop addressed the stack (not measured on a phone).
TILE_SCOPE = "global"


def register_tile(registers: int, lanes: int, pixels: int, vectors: int = 2) -> tuple[int, int, int]:
    """(filters MR, pixel vectors NR, lanes per vector) of the accumulator tile.

    ``vectors`` pixel vectors per tile (2: the loads per FMA stay low while small images waste
    little in the overlapping last tile); fewer when the image is smaller than that, and one
    narrower vector when it is smaller than one vector. The filters take the registers left after
    the accumulators' input vectors, one broadcast weight and one spare (LLVM spills otherwise:
    AVX2 4x3, which needs all 16, ran 10-50% slower than 6x2).
    """
    if pixels < lanes:
        lanes, vectors = pixels, 1
    vectors = max(1, min(vectors, pixels // lanes))
    filters = max(1, (registers - vectors - 2) // vectors)
    return filters, vectors, lanes


@dataclass(frozen=True)
class DenseConvSpec:
    """Static description of one dense conv (groups 1, dilation 1) and its register tile."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    has_bias: bool = False
    residual: bool = False
    activation: str = "none"  # ACTIVATIONS; "clip" uses clip_min/clip_max
    clip_min: float = 0.0
    clip_max: float = 6.0
    filter_tile: int = 6  # MR
    vectors: int = 2  # NR
    lanes: int = 8
    pack_panel: bool = True  # False (pointwise only): read the NCHW input in place, to measure the copy's worth
    filters_outer: bool = False  # filter tiles outside the pixel tiles (for_target: default_filters_outer)
    prefetch_output: bool = True  # prefetch the tile's residual and output lines before its multiply-adds
    narrow_tail: bool = True  # the last pixel tile one vector wide when at most a vector of pixels is left

    def __post_init__(self):
        check_activation(self.activation)
        if not self.pack_panel and not self.pointwise:
            raise ValueError("only a 1x1 stride-1 unpadded conv can read its input in place")
        if self.filters_outer and not self.pack_panel:
            raise ValueError("the filters-outer order sweeps packed panels")
        if self.out_height < 1 or self.out_width < 1:
            raise ValueError("the kernel is larger than the padded input")
        if self.lanes > self.pixels:
            raise ValueError(f"{self.lanes} lanes exceed the {self.pixels} output pixels")

    @classmethod
    def for_target(cls, registers: int, lanes: int, vectors: int = 2, **shape) -> DenseConvSpec:
        """The spec with the register tile (:func:`register_tile`) of a target with ``registers``
        vectors of ``lanes``, in the rule's loop order (:attr:`default_filters_outer`)."""
        probe = cls(**shape, lanes=1, filter_tile=1, vectors=1)
        filters, vectors, lanes = register_tile(registers, lanes, probe.pixels, vectors)
        spec = cls(**shape, filter_tile=filters, vectors=vectors, lanes=lanes)
        return dataclasses.replace(spec, filters_outer=spec.default_filters_outer)

    def layer_fields(self) -> dict:
        """The conv's shape and epilogue fields (every field but the GEMM tile's)."""
        return {name: getattr(self, name) for name in LAYER_FIELDS}

    @property
    def pointwise(self) -> bool:
        """A 1x1 stride-1 unpadded conv: its panel rows are contiguous runs of the input."""
        return self.kernel == (1, 1) and self.strides == (1, 1) and self.padding == (0, 0, 0, 0)

    @property
    def padded_height(self) -> int:
        return self.height + self.padding[0] + self.padding[2]

    @property
    def padded_width(self) -> int:
        return self.width + self.padding[1] + self.padding[3]

    @property
    def out_height(self) -> int:
        return (self.padded_height - self.kernel[0]) // self.strides[0] + 1

    @property
    def out_width(self) -> int:
        return (self.padded_width - self.kernel[1]) // self.strides[1] + 1

    @property
    def pixels(self) -> int:
        return self.out_height * self.out_width

    @property
    def taps(self) -> int:
        """The reduction length: input channels x kernel taps."""
        return self.in_channels * self.kernel[0] * self.kernel[1]

    @property
    def pixel_tile(self) -> int:
        return self.vectors * self.lanes

    @property
    def tail(self) -> DenseConvSpec:
        """The spec of the last pixel tile: one vector wide (overlapping the tile before) when
        ``narrow_tail`` and at most one vector of pixels is left after the whole tiles, else this one."""
        left = self.pixels % self.pixel_tile
        if self.narrow_tail and self.vectors > 1 and 0 < left <= self.lanes:
            return dataclasses.replace(self, vectors=1)
        return self

    @property
    def channel_block(self) -> int:
        """Input channels per reduction block: the block's panel fits PANEL_BYTES (in L1 while every
        filter tile sweeps it), blocks of equal size."""
        per_channel = self.kernel[0] * self.kernel[1] * self.pixel_tile * 4
        blocks = ceil_div(self.in_channels, max(1, PANEL_BYTES // per_channel))
        return ceil_div(self.in_channels, blocks)

    @property
    def filter_tiles(self) -> int:
        return ceil_div(self.out_channels, self.filter_tile)

    @property
    def weight_bytes(self) -> int:
        return self.out_channels * self.taps * 4

    @property
    def default_filters_outer(self) -> bool:
        """The rule's loop order for this layer and tile: every panel packed first, then swept per
        filter tile (weights streamed once) for 8-lane tiles whose weights reach
        ``FILTERS_OUTER_WEIGHT_BYTES``. Measured on AVX2 (Zen 3) only, so off for 16-lane (AVX-512)
        and 4-lane (NEON) tiles, where ``patdnn tune`` may still choose it."""
        return self.pack_panel and self.lanes == 8 and self.weight_bytes >= FILTERS_OUTER_WEIGHT_BYTES

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.out_channels * self.taps * self.pixels


def pack_dense_conv_weight(weight: np.ndarray, filter_tile: int) -> np.ndarray:
    """OIHW weight as ``[ceil(O / MR)][I * KH * KW][MR]``, the filters past O zero: the GEMM's filter tiles,
    and the direct kernel's filter blocks (``MR`` = :attr:`~.direct_conv.DirectConvSpec.filter_block`)."""
    out_c = weight.shape[0]
    rows = weight.reshape(out_c, -1)
    tiles = ceil_div(out_c, filter_tile)
    padded = np.zeros((tiles * filter_tile, rows.shape[1]), dtype=np.float32)
    padded[:out_c] = rows
    return np.ascontiguousarray(padded.reshape(tiles, filter_tile, rows.shape[1]).transpose(0, 2, 1))


def _padded_input(spec: DenseConvSpec, data):
    """A zero-padded copy of the input (n, c, padded pixel) in a workspace, filled in parallel;
    the input itself when there is no padding."""
    n_, c_, h_, w_ = spec.batch, spec.in_channels, spec.height, spec.width
    hp, wp = spec.padded_height, spec.padded_width
    if (hp, wp) == (h_, w_):
        return T.decl_buffer((n_, c_, h_ * w_), "float32", data=data.data)
    top, left = spec.padding[0], spec.padding[1]
    padded = T.decl_buffer((n_, c_, hp * wp), "float32")
    with T.parallel(0, n_ * c_) as nc:
        with T.serial(0, hp) as y:
            with T.serial(0, wp) as x:
                inside = tirx.all(y >= top, y < top + h_, x >= left, x < left + w_)
                value = tirx.if_then_else(inside, data[nc // c_, nc % c_, y - top, x - left], tirx.const(0.0, "float32"))
                T.buffer_store(padded, value, [nc // c_, nc % c_, y * wp + x])
    return padded


def _output_args(conv: DenseConvSpec) -> tuple:
    """Declare the last arguments of a dense-conv kernel, [residual] and out (N, F, OH, OW), and the
    function's attributes; returns their flat (pixel-major) views (residual or None, out), which
    the epilogues index by filter and pixel."""
    n_, f_, p_ = conv.batch, conv.out_channels, conv.pixels
    out_shape = (n_, f_, conv.out_height, conv.out_width)
    residual = T.arg("residual", T.buffer(out_shape, "float32")) if conv.residual else None
    out = T.arg("out", T.buffer(out_shape, "float32"))
    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
    flat_out = T.decl_buffer((n_, f_, p_), "float32", data=out.data)
    flat_res = T.decl_buffer((n_, f_, p_), "float32", data=residual.data) if residual is not None else None
    return flat_res, flat_out


def _pack_panel(spec: DenseConvSpec, source, panel, n, base, first, count) -> None:
    """``panel[r * tile + j]`` = the tap ``r = (c - first, dy, dx)`` of the window of pixel
    ``base + j``, for the ``count`` channels from ``first``."""
    tp, kh, kw = spec.pixel_tile, spec.kernel[0], spec.kernel[1]
    if spec.pointwise:
        with T.serial(0, count) as c:
            with T.vectorized(0, tp) as j:
                T.buffer_store(panel, source[n, first + c, base + j], [c * tp + j])
        return
    wp = spec.padded_width

    def copy_windows(offset, vectorized: bool) -> None:
        loop = T.vectorized if vectorized else T.unroll
        with T.serial(0, count) as c:
            with T.serial(0, kh) as dy:
                with T.serial(0, kw) as dx:
                    with loop(0, tp) as j:
                        T.buffer_store(panel, source[n, first + c, offset(j) + dy * wp + dx],
                                       [((c * kh + dy) * kw + dx) * tp + j])

    def window_start(pixel):
        """Where the window of ``pixel`` starts in the padded image."""
        return pixel // spec.out_width * spec.strides[0] * wp + pixel % spec.out_width * spec.strides[1]

    # Each pixel's window start, computed once per tile.
    start = T.decl_buffer((tp,), "int32", scope="local")
    with T.unroll(0, tp) as j:
        T.buffer_store(start, window_start(base + j), [j])
    if spec.strides[1] != 1:
        copy_windows(lambda j: start[j], vectorized=False)
        return
    # Stride 1 and the tile within one output row: each tap is a contiguous run of the input.
    with T.If(base % spec.out_width + tp <= spec.out_width):
        with T.Then():
            copy_windows(lambda j: window_start(base) + j, vectorized=True)
        with T.Else():
            copy_windows(lambda j: start[j], vectorized=False)


def _micro_kernel(spec: DenseConvSpec, panel, partial, source, weight, n, base, ft, kb, first, count, blocks,
                  epilogue) -> None:
    """One filter tile x one pixel tile over one reduction block, accumulated in registers; the
    partial sums wait in ``partial`` until the last block, which writes the output."""
    mr, nr, lanes, tp = spec.filter_tile, spec.vectors, spec.lanes, spec.pixel_tile
    window = spec.kernel[0] * spec.kernel[1]
    zero = tirx.const(0.0, "float32")
    acc = T.decl_buffer((mr * tp,), "float32", scope=TILE_SCOPE)

    def init(i, j) -> None:
        start = zero if partial is None else T.if_then_else(kb == 0, zero, partial[(ft * mr + i) * tp + j])
        T.buffer_store(acc, start, [i * tp + j])

    tile_vectors(mr, tp, lanes, init)
    if spec.prefetch_output:  # in the block that stores
        if blocks > 1:
            with T.If(kb == blocks - 1):
                with T.Then():
                    _prefetch_epilogue(spec, *epilogue[1:], n, ft, base)
        else:
            _prefetch_epilogue(spec, *epilogue[1:], n, ft, base)
    with T.serial(0, count * window) as r:
        with T.unroll(0, mr) as i:
            with T.unroll(0, nr) as jo:
                with T.vectorized(0, lanes) as ji:
                    slot = i * tp + jo * lanes + ji
                    column = jo * lanes + ji
                    x = panel[r * tp + column] if panel is not None else source[n, first + r, base + column]
                    T.buffer_store(acc, acc[slot] + weight[ft, first * window + r, i] * x, [slot])
    _keep_or_finish(acc, partial, mr, tp, lanes, lambda i, j: (ft * mr + i) * tp + j, kb, blocks,
                    lambda: _store_output(spec, acc, *epilogue, n, ft, base))


def _prefetch_epilogue(spec: DenseConvSpec, flat_res, flat_out, n, ft, base) -> None:
    """Prefetch the lines the epilogue will read (residual) and write (output) while the tile's
    multiply-adds run: the tile's pixels of each of its filters' rows, ``P * 4`` bytes apart, where
    the hardware prefetchers see no stream; one or two lines a row (rows are not line-aligned)."""
    with T.unroll(0, spec.filter_tile) as i:
        f = T.min(ft * spec.filter_tile + i, spec.out_channels - 1)
        with T.unroll(0, 2) as end:
            pixel = base + end * (spec.pixel_tile - 1)
            if flat_res is not None:
                T.evaluate(tirx.call_intrin("void", "tirx.prefetch", tirx.address_of(flat_res[n, f, pixel]), 0, 3, 1))
            T.evaluate(tirx.call_intrin("void", "tirx.prefetch", tirx.address_of(flat_out[n, f, pixel]), 1, 3, 1))


def tile_vectors(rows: int, width: int, lanes: int, body) -> None:
    """``body(i, j)`` over a ``rows x width`` register tile as ``lanes``-wide vectors (``width`` a multiple
    of ``lanes``). Every access to a tile must use the vector width of its FMAs: LLVM keeps a tile that
    is also stored ``width`` wide (its initial values, the epilogue) in memory, one store and reload
    per accumulator and tile (Zen 3, 1 thread: this GEMM 1.06-1.15x on 1x1s with 16-96 input channels,
    16->96 at 112x112, 24->144 at 56x56, 96->576 at 14x14, 64->256 at 56x56; ties elsewhere)."""
    with T.unroll(0, rows) as i:
        with T.unroll(0, width // lanes) as jo:
            with T.vectorized(0, lanes) as ji:
                body(i, jo * lanes + ji)


def _keep_or_finish(acc, partial, rows: int, width: int, lanes: int, saved, kb, blocks, finish) -> None:
    """After reduction block ``kb`` of ``blocks``: the ``rows x width`` accumulators wait in ``partial``
    (row ``i``, lane ``j`` at ``saved(i, j)``) until the last block, which calls ``finish`` (the
    epilogue's one store); with no ``partial`` (one block) ``finish`` runs directly."""
    if partial is None:
        finish()
        return
    with T.If(kb < blocks - 1):
        with T.Then():
            tile_vectors(rows, width, lanes, lambda i, j: T.buffer_store(partial, acc[i * width + j], [saved(i, j)]))
        with T.Else():
            finish()


def _store_output(spec: DenseConvSpec, acc, bias, flat_res, flat_out, n, ft, base) -> None:
    """The epilogue: each accumulator row (a real filter) plus bias and residual, activated, stored once."""
    mr, tp, lanes = spec.filter_tile, spec.pixel_tile, spec.lanes
    with T.unroll(0, mr) as i:
        f = ft * mr + i
        with T.If(f < spec.out_channels):
            with T.Then():
                with T.unroll(0, tp // lanes) as jo:
                    with T.vectorized(0, lanes) as ji:
                        j = jo * lanes + ji  # the FMAs' vector width (tile_vectors)
                        value = acc[i * tp + j]
                        if bias is not None:
                            value = value + bias[f]
                        if flat_res is not None:
                            value = value + flat_res[n, f, base + j]
                        T.buffer_store(flat_out, activate(value, spec), [n, f, base + j])


def dense_conv_primfunc(spec: DenseConvSpec) -> tirx.PrimFunc:
    """The scheduled PrimFunc of one dense conv.

    Arguments, in order: data (N, C, H, W), packed weight, [bias (F,)], [residual (N, F, OH, OW)], out.
    """
    n_, f_, k_, mr = spec.batch, spec.out_channels, spec.taps, spec.filter_tile
    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name("main")
            data = T.arg("data", T.buffer((n_, spec.in_channels, spec.height, spec.width), "float32"))
            weight = T.arg("weight", T.buffer((spec.filter_tiles, k_, mr), "float32"))
            bias = T.arg("bias", T.buffer((f_,), "float32")) if spec.has_bias else None
            flat_res, flat_out = _output_args(spec)
            source = _padded_input(spec, data)
            (_filters_outer if spec.filters_outer else _pixels_outer)(spec, source, weight, (bias, flat_res, flat_out))
    return _with_attrs(builder.get(), spec)


def _pixels_outer(spec: DenseConvSpec, source, weight, epilogue) -> None:
    """The usual order: per (image, pixel tile) task, per reduction block, its panel packed, then
    every filter tile sweeps it."""
    n_, p_, tp, mr = spec.batch, spec.pixels, spec.pixel_tile, spec.filter_tile
    tiles = ceil_div(p_, tp)
    window = spec.kernel[0] * spec.kernel[1]
    cb = spec.channel_block
    blocks = ceil_div(spec.in_channels, cb)
    with T.parallel(0, n_ * tiles) as task:
        n = task // tiles
        panel = T.decl_buffer((cb * window * tp,), "float32") if spec.pack_panel else None
        partial = T.decl_buffer((spec.filter_tiles * mr * tp,), "float32") if blocks > 1 else None

        def sweep(tile: DenseConvSpec, base) -> None:
            with T.serial(0, blocks) as kb:
                first = kb * cb
                count = T.min(cb, spec.in_channels - first)
                if panel is not None:
                    _pack_panel(tile, source, panel, n, base, first, count)
                with T.serial(0, spec.filter_tiles) as ft:
                    _micro_kernel(tile, panel, partial, source, weight, n, base, ft, kb, first, count, blocks, epilogue)

        _by_tile(spec, task % tiles, sweep)


def _filters_outer(spec: DenseConvSpec, source, weight, epilogue) -> None:
    """The ``filters_outer`` order: the panels of every pixel tile (whole reduction) packed into a
    workspace in parallel, then per (image, filter tile) task the tile sweeps them all."""
    n_, p_, k_, tp = spec.batch, spec.pixels, spec.taps, spec.pixel_tile
    tiles, filter_tiles = ceil_div(p_, tp), spec.filter_tiles
    panels = T.decl_buffer((n_ * tiles * k_ * tp,), "float32")

    def panel(index):
        return T.decl_buffer((k_ * tp,), "float32", data=panels.data, elem_offset=index * (k_ * tp))

    with T.parallel(0, n_ * tiles) as task:
        _by_tile(spec, task % tiles,
                 lambda tile, base: _pack_panel(tile, source, panel(task), task // tiles, base, 0, spec.in_channels))
    tail = spec.tail
    with T.parallel(0, n_ * filter_tiles) as task:
        n, ft = task // filter_tiles, task % filter_tiles

        def sweep(tile: DenseConvSpec, t, base) -> None:
            _micro_kernel(tile, panel(n * tiles + t), None, source, weight, n, base, ft, 0, 0, spec.in_channels, 1,
                          epilogue)

        if tail is spec:
            with T.serial(0, tiles) as t:
                sweep(spec, t, T.min(t * tp, p_ - tp))
        else:
            with T.serial(0, tiles - 1) as t:
                sweep(spec, t, t * tp)
            sweep(tail, tiles - 1, p_ - tail.pixel_tile)


def _by_tile(spec: DenseConvSpec, index, body) -> None:
    """``body(tile spec, first pixel)`` of pixel tile ``index``: the last one is :attr:`DenseConvSpec.tail`
    (its own code, ending at the last pixel), the others whole tiles (the last overlapping the one
    before when the tail is a whole tile)."""
    tail, tp, p_ = spec.tail, spec.pixel_tile, spec.pixels
    if tail is spec:
        body(spec, T.min(index * tp, p_ - tp))
        return
    with T.If(index < ceil_div(p_, tp) - 1):
        with T.Then():
            body(spec, index * tp)
        with T.Else():
            body(tail, p_ - tail.pixel_tile)


def _with_attrs(func: tirx.PrimFunc, spec: DenseConvSpec) -> tirx.PrimFunc:
    func = func.without_attr("global_symbol")  # the module names it when it is added
    return func.with_attr(DENSE_CONV_ATTR, {"filter_tile": spec.filter_tile, "vectors": spec.vectors,
                                            "lanes": spec.lanes, "kernel": list(spec.kernel)})
