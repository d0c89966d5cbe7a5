"""Dense KxK convolution as a direct kernel vectorised along output channels (NCHW in and out).

Why a second dense kernel next to the packed GEMM of :mod:`tvm_patdnn.ops.dense_conv`: a KxK
conv there first copies every input window into a panel (one copy per tap and pixel, scalar when
the stride is 2 or a tile crosses a row), and small images (7x7: 49 pixels) waste the overlap of
their last 16-pixel tile. Here, as in ORT/MLAS's NCHWc kernels, vectors run along the output
channels instead, so nothing is copied:

* weights are packed at compile time as ``[F / (NR * lanes)][C][KH][KW][NR * lanes]``: per
  reduction step (input channel ``c``, tap ``dy, dx``) a filter block's ``NR`` weight vectors are
  one contiguous run (the GEMM's layout, :func:`~.dense_conv.pack_dense_conv_weight`, with ``NR * lanes``
  filters a tile);
* a register tile holds ``MR`` output pixels x ``NR`` filter vectors; per reduction step the
  ``MR`` input scalars are broadcast straight from the (zero-padded, when the conv pads) NCHW
  input at each pixel's window start plus the tap's constant offset, so any stride costs the
  same; ``MR * NR`` FMAs per ``MR + NR`` loads (AVX2 6 pixels x 2 vectors: 12 of the 16 ymm plus
  two weight vectors and a broadcast; AVX-512 6 x 4 of its 32 registers, MLAS's tile; NEON 6 x 3);
* pixels are flattened (a tile may cross output rows: every pixel has its own window start); the
  last tile takes the pixels left over (an unrolled copy of the tile for ``P mod MR`` pixels, as
  MLAS's remainder kernels) rather than overlapping the one before: 49 pixels as 8 x 6 + 1, not
  9 x 6 (Zen 4, 1 thread, vs ORT in the same runs: 0.87 -> 0.93x on 1x1 512->2048 at 7x7, 0.93 ->
  0.98x on 2048->512, 0.90 -> 1.06x on 960->320, 0.92 -> 0.97x on 3x3 512 at 7x7; the AVX2 build
  0.60-0.74x -> 0.65-0.82x on the same layers; ties on 14x14 images, whose 196 pixels lose 2);
* tasks are (image, filter block, group of pixel tiles) with the pixel tiles innermost, so one
  thread sweeps its pixels with the same filter block; input channels are blocked so that the
  block's weights (``cb * KH * KW * NR * lanes`` floats, ``WEIGHT_PANEL_BYTES``) stay in L1 across
  the tiles, the partial sums waiting in a per-task buffer between channel blocks. Large inputs
  with few weights (3x3 64 at 56x56) turn it around: tasks are pixel groups that sweep every filter
  block, so the group's input rows stay in L2 instead of being re-read once per filter block
  (:meth:`DirectConvSpec.for_target` compares the two re-reads);
* the bias is the accumulators' initial value; residual add and ReLU / clip are applied to the
  accumulators, which are written to NCHW once (``MR * NR * lanes`` scalar stores per
  ``C * KH * KW * MR * NR`` FMAs); 16-lane tiles first transpose each filter vector's ``MR`` pixel rows
  in registers (``transposed_store``), so every filter's ``MR`` consecutive output pixels (and residual)
  are one vector store (load): Zen 5, 1 thread, ResNet-50's direct 1x1s 1.00-1.10x alone and
  1.03-1.15x in the dense model (256->1024 at 14x14 with its residual 0.53-0.55 -> 0.49-0.51 ms);
* between 16-lane direct convs the tensors may be blocked, NCHW16c (``blocked_input`` / ``blocked_residual`` /
  ``blocked_output``, chosen by :mod:`tvm_patdnn.transform.blocked_layout`): a pixel's 16 channels are one vector,
  so the output and residual are whole-vector stores and loads with no transpose (256->1024 + residual at 14x14
  in the dense ResNet-50 1.10-1.14x), and the input's broadcasts read 16 channels from one line;
* weights that stream from DRAM (AVX-512 1x1s at 14x14 and 7x7 in ResNet-50: 1-4 MB a layer) come in a burst per
  panel under its first tile; ``weight_stream`` prefetches the next panel into L2 one or two lines per channel step
  inside the reduction, evenly over the panel's tiles (the tile's accumulators then split into one stack buffer
  per vector, so the prefetch cannot push them to memory): 512->2048 + residual at 7x7 in the dense ResNet-50
  1.20-1.27x (69-70 -> 84-88% of the 268 GFLOP/s peak).

The function is written directly as (scheduled) TIR, so no schedule rule or tuning touches it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..arith import ceil_div, round_up
from ..errors import PatDNNError
from .activation import activate
from .dense_conv import TILE_SCOPE, DenseConvSpec, _keep_or_finish, _output_args, _padded_input

__all__ = ["BLOCK", "DirectConvSpec", "DIRECT_CONV_ATTR", "blocked_shape", "direct_conv_primfunc",
           "direct_register_tile", "pack_direct_conv_bias"]

# PrimFunc attribute carrying the kernel's description (benchmarks and tests look for it).
DIRECT_CONV_ATTR = "patdnn.direct_conv"
# A filter block's weights per reduction block: the L1 data cache of the targets (32 KB on Zen 3
# and Cortex-A76); 8, 16, 64 KB and no blocking measured within noise of it, 32 KB ahead most often.
WEIGHT_PANEL_BYTES = 32768
# Parallel tasks at least (when the pixels allow): the filter blocks alone may be fewer than the cores.
PARALLEL_TASKS = 8
# Pixel groups of a filters-inner task read at most about this much input (in L2 across the filter blocks).
GROUP_INPUT_BYTES = 131072
# Filter vectors at most of an 8-lane tile with 32 registers (AVX-512's KxK tiles, ``direct_vectors``):
# fewer than 6 pixels (2x2 images) left room for 6 ymm vectors, 4 x 6 accumulators, and that tile ran
# 2.5-3.5x slower than 4 x 4 (Zen 5, 1 thread, per-call minima in the dense VGG-16 CIFAR: 512 at 2x2
# 0.94 -> 0.27 ms; alone, the 7x7 stem's 4 x 6 tile 21x slower than 6 x 4).
AVX512_YMM_VECTORS = 4
# Strided unpadded 1x1 convs on tiles of these lanes whose input reaches COMPACT_INPUT_BYTES (a Zen 5 L2)
# first copy the pixels they read into a compact (N, C, OH * OW) buffer (at stride 2 a quarter of the floats,
# every line read whole) and run as a stride-1 1x1 on it (_compact_input). Zen 5, 1 thread, per-call minima
# in the dense ResNet-50, four interleaved runs (nothing else changed; the box loaded in three): 512->1024 s2
# at 28x28 (1.6 MB input) 1.057x, 1.037x, 1.030x, 1.021x; 256->512 s2 at 56x56 (3.2 MB) 1.023x, 1.073x,
# 0.982x, 1.010x; below the threshold 1024->2048 s2 at 14x14 (800 KB) measured 1.009x, 1.021x, 0.985x.
COMPACT_STRIDED_LANES = (16,)
COMPACT_INPUT_BYTES = 1024 * 1024
# Channels per block of the blocked layout (NCHW16c: (N, C / BLOCK, H, W, BLOCK)) that 16-lane tiles read and write
# (DirectConvSpec.blocked_input / blocked_residual / blocked_output).
BLOCK = 16


def blocked_shape(batch: int, channels: int, height: int, width: int) -> tuple[int, int, int, int, int]:
    """The NCHW16c shape of an NCHW tensor (``channels`` a multiple of :data:`BLOCK`)."""
    return batch, channels // BLOCK, height, width, BLOCK


def direct_register_tile(registers: int, lanes: int, out_channels: int, pixels: int) -> tuple[int, int]:
    """(pixels MR, filter vectors NR) of the accumulator tile.

    Six pixels per tile (MLAS's count: enough broadcasts to hide the weight loads, little overlap
    waste on 7x7 images) and as many filter vectors as the registers left after the accumulators,
    the weight vectors and one broadcast allow (AVX2 2 of 16 ymm, AVX-512 4 of 32 zmm: no spills in
    the assembly), no more than the filters need; fewer pixels only when the image has fewer. NEON
    (4 lanes) takes one vector less: its by-element FMAs read the pixels' inputs from vector
    registers too, and 6 x 4 spilled 9-29 values per reduction loop where 6 x 3 spills none.
    On AVX-512 (16 lanes), when the filters are not a whole number of 4-vector blocks, 2 or 3
    vectors if that pads fewer filters (96 filters as 2 x 3 vectors, not 2 x 4; 160 as 5 x 2, not
    3 x 4): measured on Zen 4, 1 thread, MobileNetV2 1x1s, 1.25x at 384->96 14x14, 1.46x at 576->96
    14x14, 1.3x at 576->160 and 960->160 7x7 (not measured on the narrower targets: they keep NR).
    On AVX2 (8 lanes), 4 pixels x 3 vectors when that pads fewer filters (24 filters: 3 vectors, not
    2 x 2): measured on Zen 3, 1 thread, MobileNetV2's 144->24 and 96->24 1x1s at 56x56, 1.40-1.42x
    over 6 x 2 (and 1.10-1.14x over the GEMM).
    With 32 registers of 8 lanes (AVX-512's KxK tiles) at most ``AVX512_YMM_VECTORS`` (4) vectors, also
    when fewer pixels leave room for more.
    """
    mr = min(6, pixels)
    cap = AVX512_YMM_VECTORS if registers >= 32 and lanes == 8 else registers
    nr = min(cap, max(1, (registers - 1) // (mr + 1) - (lanes < 8)))
    vectors = ceil_div(out_channels, lanes)
    nr = min(nr, vectors)
    if lanes == 8 and mr == 6:
        wide = min(vectors, (registers - 1) // 5, cap)
        if round_up(vectors, wide) < round_up(vectors, nr):
            return 4, wide
    if lanes < 16:
        return mr, nr
    return mr, min(range(min(2, nr), nr + 1), key=lambda v: (round_up(vectors, v), -v))


@dataclass(frozen=True)
class DirectConvSpec:
    """One dense conv (``conv``: its shape and epilogue; the GEMM tile fields unused) and the
    direct kernel's register tile: ``pixel_tile`` (MR) pixels x ``vectors`` (NR) of ``lanes``."""

    conv: DenseConvSpec
    pixel_tile: int = 6
    vectors: int = 2
    lanes: int = 8
    weight_panel: int = WEIGHT_PANEL_BYTES  # bytes of a filter block's weights per reduction block
    filters_inner: bool = False  # tasks are pixel groups, each sweeping every filter block
    exact_tail: bool = True  # the last tile covers the pixels left (False: it overlaps the one before, to measure)
    transposed_store: bool = True  # 16 lanes: the epilogue transposes the tile in registers (see _store_transposed)
    weight_prefetch: int = 0  # the next weight panel prefetched into L2 (2) or L3 (1) over the tiles (0: off)
    # 16 lanes: the next weight panel streamed into L2 inside the reduction, ``weight_stream`` prefetches per channel
    # step spread evenly over the panel's tiles, so that it has arrived after 1 / weight_stream of them (0: off; see
    # _stream_next_panel). The tile's accumulators are then one stack buffer each, which LLVM keeps in registers.
    weight_stream: int = 0
    # NCHW16c (blocked_shape) instead of NCHW for the input, the residual and the output (16-lane tiles only; see
    # tvm_patdnn.transform.blocked_layout): a pixel's 16 channels are one vector, so the epilogue stores (and loads
    # the residual) as whole vectors without a transpose, and the input's broadcasts read 16 channels a line.
    blocked_input: bool = False
    blocked_residual: bool = False
    blocked_output: bool = False

    def __post_init__(self):
        if not 1 <= self.pixel_tile <= self.conv.pixels:
            raise ValueError(f"a tile of {self.pixel_tile} pixels does not fit {self.conv.pixels} output pixels")
        conv = self.conv
        if self.weight_stream:
            if self.weight_stream < 0:
                raise PatDNNError(f"weight_stream counts prefetches per channel step, not {self.weight_stream}")
            if self.lanes != 16:
                raise PatDNNError(f"the weight stream is built for 16-lane tiles, not {self.lanes}")
            if self.weight_prefetch:
                raise PatDNNError("a direct conv prefetches its next weight panel one way: weight_prefetch or "
                                  "weight_stream, not both")
        if self.blocked_input or self.blocked_residual or self.blocked_output:
            if self.lanes != BLOCK:
                raise PatDNNError(f"the blocked layout needs {BLOCK}-lane tiles, not {self.lanes}")
            if self.blocked_residual and not conv.residual:
                raise PatDNNError("a blocked residual needs a conv that adds a residual")
            if conv.residual and self.blocked_output and not self.blocked_residual:
                raise PatDNNError("a blocked output needs a blocked residual (an NCHW one would need a transpose)")
            if (self.blocked_output or self.blocked_residual) and conv.out_channels % BLOCK:
                raise PatDNNError(f"a blocked output needs a multiple of {BLOCK} filters, not {conv.out_channels}")
            if self.blocked_input:
                if conv.in_channels % BLOCK:
                    raise PatDNNError(f"a blocked input needs a multiple of {BLOCK} channels, not {conv.in_channels}")
                if any(conv.padding):
                    raise PatDNNError("a blocked input is read in place (or compacted): the conv must not pad")

    @classmethod
    def for_target(cls, conv: DenseConvSpec, registers: int, lanes: int) -> DirectConvSpec:
        """The spec with the register tile (:func:`direct_register_tile`) of a target with
        ``registers`` vectors of ``lanes``, and the loop order that re-reads less: filter blocks
        outside (each re-reads the input) unless the input, once per filter block, outweighs the
        weights, once per pixel group (and the conv has at least 16 input channels). Measured
        (Zen 3, 1 thread, two interleaved A/B runs on a loaded box, filters inside / outside):
        3x3 64 at 56x56 1.08-1.15x, 128 at 56x56 stride 2 1.14-1.36x (both chosen); 256 at 28x28
        s2 1.02-1.05x, 256 at 14x14 0.96-1.09x, 128 at 28x28 0.98-1.19x (near ties, not chosen);
        512 at 14x14 s2 0.52x (9.4 MB of weights per group) and the 3-channel 7x7 stem 0.68-0.85x
        (not chosen)."""
        mr, nr = direct_register_tile(registers, lanes, conv.out_channels, conv.pixels)
        outside = cls(conv, mr, nr, lanes)
        inside = dataclasses.replace(outside, filters_inner=True)
        input_bytes = conv.batch * conv.in_channels * conv.padded_height * conv.padded_width * 4
        weight_bytes = outside.filter_blocks * outside.filter_block * conv.taps * 4
        if conv.in_channels >= 16 and input_bytes * outside.filter_blocks > weight_bytes * inside.pixel_groups:
            return inside
        return outside

    @property
    def filter_block(self) -> int:
        """Filters per register tile (NR vectors of lanes)."""
        return self.vectors * self.lanes

    @property
    def filter_blocks(self) -> int:
        return ceil_div(self.conv.out_channels, self.filter_block)

    @property
    def pixel_tiles(self) -> int:
        return ceil_div(self.conv.pixels, self.pixel_tile)

    @property
    def channel_block(self) -> int:
        """Input channels per reduction block: the filter block's weights for them fit
        ``weight_panel`` bytes (in L1 while every pixel tile sweeps them), blocks of equal size."""
        per_channel = self.conv.kernel[0] * self.conv.kernel[1] * self.filter_block * 4
        blocks = ceil_div(self.conv.in_channels, max(1, self.weight_panel // per_channel))
        if self.blocked_input:  # whole channel blocks of the layout
            return round_up(ceil_div(self.conv.in_channels, blocks), BLOCK)
        return ceil_div(self.conv.in_channels, blocks)

    @property
    def channel_blocks(self) -> int:
        return ceil_div(self.conv.in_channels, self.channel_block)

    @property
    def group_tiles(self) -> int:
        """Pixel tiles per parallel task: the tiles of an (image, filter block) split into groups so
        that there are ``PARALLEL_TASKS`` tasks when the pixels allow."""
        if self.filters_inner:
            conv = self.conv
            input_bytes = conv.in_channels * conv.padded_height * conv.padded_width * 4
            groups = max(ceil_div(PARALLEL_TASKS, conv.batch), ceil_div(input_bytes, GROUP_INPUT_BYTES))
        else:
            groups = ceil_div(PARALLEL_TASKS, self.conv.batch * self.filter_blocks)
        return ceil_div(self.pixel_tiles, max(1, min(self.pixel_tiles, groups)))

    @property
    def pixel_groups(self) -> int:
        return ceil_div(self.pixel_tiles, self.group_tiles)


def pack_direct_conv_bias(bias: np.ndarray, filter_block: int) -> np.ndarray:
    """The per-filter bias padded with zeros to whole filter blocks (loaded as full vectors)."""
    blocks = ceil_div(bias.shape[0], filter_block)
    padded = np.zeros(blocks * filter_block, dtype=np.float32)
    padded[: bias.shape[0]] = bias
    return padded


def _store_output(spec: DirectConvSpec, mr: int, acc, flat_res, flat_out, n, fb, base) -> None:
    """Residual add and activation on the ``mr`` pixels' accumulators, each real filter's pixel stored
    once to NCHW."""
    conv, block = spec.conv, spec.filter_block
    ragged = conv.out_channels % block != 0
    if isinstance(acc, list):  # split accumulators (Python loops over the pixels and vectors)
        for m in range(mr):
            for v in range(spec.vectors):
                with T.unroll(0, spec.lanes) as ji:
                    _store_one(spec, ragged, acc[m][v][ji], fb * block + v * spec.lanes + ji, m, flat_res, flat_out,
                               n, base)
        return
    with T.unroll(0, mr) as m:
        with T.unroll(0, block) as j:
            f = fb * block + j

            def store() -> None:
                value = _add_residual(spec, acc[m * block + j], flat_res, n, f, base + m)
                T.buffer_store(flat_out, activate(value, conv), [n, f, base + m])

            _store_real_filter(ragged, f < conv.out_channels, store)


def _store_one(spec, ragged, value, f, m, flat_res, flat_out, n, base) -> None:
    """:func:`_store_output` of one accumulator lane (filter ``f``, pixel ``m``) of a split tile."""
    conv = spec.conv

    def store() -> None:
        T.buffer_store(flat_out, activate(_add_residual(spec, value, flat_res, n, f, base + m), conv), [n, f, base + m])

    _store_real_filter(ragged, f < conv.out_channels, store)


def _add_residual(spec, value, flat_res, n, f, pixel):
    """``value`` plus filter ``f``'s residual at ``pixel`` (NCHW or NCHW16c), if the conv has one."""
    if flat_res is None:
        return value
    if spec.blocked_residual:
        return value + flat_res[n, f // BLOCK, pixel, f % BLOCK]
    return value + flat_res[n, f, pixel]


def _acc_vector(acc, m: int, v: int, block: int, lanes: int):
    """Filter vector ``v`` of pixel ``m`` of the tile (one buffer, or split: ``acc[m][v]``)."""
    if isinstance(acc, list):
        return acc[m][v][tirx.Ramp(0, 1, lanes)]
    return acc[tirx.Ramp(m * block + v * lanes, 1, lanes)]


def _store_real_filter(ragged: bool, real, store: Callable[[], None]) -> None:
    """``store()``, guarded by ``real`` (the filter exists) when the last filter block is ragged."""
    if ragged:
        with T.If(real):
            with T.Then():
                store()
    else:
        store()


def _transpose16(rows: list) -> list:
    """The 16x16 transpose of ``rows`` (16 vectors of 16 lanes; None: a row of zeros) in four rounds
    of two-vector shuffles: round ``b`` (8, 4, 2, 1) swaps the off-diagonal ``b x b`` blocks of every
    ``2b x 2b`` block (each shuffle one ``vshuff32x4`` / ``vpermt2ps`` / ``vunpck*``)."""
    zero = tirx.Broadcast(tirx.const(0.0, "float32"), 16)
    rows = [zero if r is None else r for r in rows]
    for b in (8, 4, 2, 1):
        new = list(rows)
        for i in range(16):
            if i & b:
                continue
            low, high = rows[i], rows[i + b]
            new[i] = tirx.Shuffle([low, high], [l if not l & b else 16 + l - b for l in range(16)])
            new[i + b] = tirx.Shuffle([low, high], [l + b if not l & b else 16 + l for l in range(16)])
        rows = new
    return rows


def _store_transposed(spec: DirectConvSpec, mr: int, acc, flat_res, flat_out, n, fb, base) -> None:
    """The epilogue of 16-lane tiles: each filter vector's ``mr`` (<= 16) pixel rows transposed in
    registers (:func:`_transpose16`), so that every filter's ``mr`` consecutive output pixels (and
    residual) are one ``mr``-wide vector store (load) instead of ``mr`` scalar ones."""
    conv, block, lanes = spec.conv, spec.filter_block, spec.lanes
    ragged = conv.out_channels % block != 0
    for v in range(spec.vectors):
        rows = [_acc_vector(acc, m, v, block, lanes) for m in range(mr)]
        if flat_res is not None and spec.blocked_residual:  # a blocked residual is added to the rows, untransposed
            c = fb * spec.vectors + v
            rows = [row + _real_vector(ragged, c < conv.out_channels // lanes,
                                       flat_res[n, c, base + m, tirx.Ramp(0, 1, lanes)]) for m, row in enumerate(rows)]
        columns = _transpose16(rows + [None] * (16 - mr))
        for j in range(lanes):
            f = fb * block + v * lanes + j
            pixels = tirx.Ramp(base, 1, mr)

            def store(column=columns[j], f=f, pixels=pixels) -> None:
                value = column if mr == lanes else tirx.Shuffle([column], list(range(mr)))
                if flat_res is not None and not spec.blocked_residual:
                    value = value + flat_res[n, f, pixels]
                T.buffer_store(flat_out, activate(value, conv), [n, f, pixels])

            _store_real_filter(ragged, f < conv.out_channels, store)


def _real_vector(ragged: bool, real, value):
    """``value``, or zeros where ``real`` (the filter vector exists) is false when the last filter block is ragged."""
    return tirx.if_then_else(real, value, tirx.Broadcast(tirx.const(0.0, "float32"), 16)) if ragged else value


def _store_blocked(spec: DirectConvSpec, mr: int, acc, flat_res, flat_out, n, fb, base) -> None:
    """The epilogue of a blocked (NCHW16c) output: each pixel's filter vector (plus its residual, read the same
    way) is one whole 64-byte vector store, no transpose; a ragged last filter block stores its real vectors."""
    conv, block, lanes = spec.conv, spec.filter_block, spec.lanes
    ragged = conv.out_channels % block != 0
    for v in range(spec.vectors):
        c = fb * spec.vectors + v
        for m in range(mr):
            def store(m=m, v=v, c=c) -> None:
                value = _acc_vector(acc, m, v, block, lanes)
                lane = tirx.Ramp(0, 1, lanes)
                if flat_res is not None:
                    value = value + flat_res[n, c, base + m, lane]
                T.buffer_store(flat_out, activate(value, conv), [n, c, base + m, lane])

            _store_real_filter(ragged, c < conv.out_channels // lanes, store)


def _tile(spec: DirectConvSpec, mr: int, source, weight, bias, partial, outputs, n, fb, kb, t, base, first,
          count) -> None:
    """One register tile (``MR`` pixels from ``base`` x one filter block) over one reduction block
    of ``count`` channels from ``first``; the partial sums wait in ``partial`` until the last block,
    which writes the output."""
    conv, nr, lanes, block = spec.conv, spec.vectors, spec.lanes, spec.filter_block
    kh, kw, wp = conv.kernel[0], conv.kernel[1], conv.padded_width
    # Where each pixel's window starts in the padded image.
    start = T.decl_buffer((mr,), "int32", scope="local")
    with T.unroll(0, mr) as m:
        pixel = base + m
        T.buffer_store(start, pixel // conv.out_width * conv.strides[0] * wp + pixel % conv.out_width * conv.strides[1],
                       [m])
    zero = tirx.const(0.0, "float32")
    # With the weight stream, one stack buffer per accumulator vector: the whole tile (1.5 KB at 6 x 4 vectors) is a
    # heap workspace past TVM's 1 KB stack limit (kMaxStackAlloca), which LLVM keeps in registers only while nothing
    # in the loop may alias it; a prefetch (untyped, unlike the loads) may, and the tile was stored every channel.
    split = spec.weight_stream > 0
    if split:
        acc = [[T.decl_buffer((lanes,), "float32", scope=TILE_SCOPE) for _ in range(nr)] for _ in range(mr)]
        for m in range(mr):
            for v in range(nr):
                with T.vectorized(0, lanes) as ji:
                    j = v * lanes + ji
                    init = bias[fb * block + j] if bias is not None else zero
                    if partial is not None:
                        init = T.if_then_else(kb == 0, init, partial[(t * spec.pixel_tile + m) * block + j])
                    T.buffer_store(acc[m][v], init, [ji])
    else:
        acc = T.decl_buffer((mr * block,), "float32", scope=TILE_SCOPE if lanes >= 8 else "local")
        with T.unroll(0, mr) as m:
            with T.vectorized(0, block) as j:
                init = bias[fb * block + j] if bias is not None else zero
                if partial is not None:
                    init = T.if_then_else(kb == 0, init, partial[(t * spec.pixel_tile + m) * block + j])
                T.buffer_store(acc, init, [m * block + j])
    # Taps unrolled along a row of at most 3 (a 7-tap row: LLVM hoists the broadcasts shared by
    # stride-2 neighbours across taps and spills them on AVX-512); rows and channels in loops.
    def reduce(channel, read) -> None:
        if split:
            with T.serial(0, kh) as dy:
                with (T.unroll if kw <= 3 else T.serial)(0, kw) as dx:
                    for m in range(mr):
                        for v in range(nr):
                            with T.vectorized(0, lanes) as ji:
                                x = read(start[m] + dy * wp + dx)
                                w = weight[fb, (channel * kh + dy) * kw + dx, v * lanes + ji]
                                T.buffer_store(acc[m][v], acc[m][v][ji] + x * w, [ji])
            return
        with T.serial(0, kh) as dy:
            with (T.unroll if kw <= 3 else T.serial)(0, kw) as dx:
                with T.unroll(0, mr) as m:
                    with T.unroll(0, nr) as v:
                        with T.vectorized(0, lanes) as ji:
                            slot = m * block + v * lanes + ji
                            x = read(start[m] + dy * wp + dx)
                            w = weight[fb, (channel * kh + dy) * kw + dx, v * lanes + ji]
                            T.buffer_store(acc, acc[slot] + x * w, [slot])

    if spec.blocked_input:  # count and first are whole channel blocks (channel_block)
        with T.serial(0, count // BLOCK) as co:
            with T.serial(0, BLOCK) as ci:
                reduce(first + co * BLOCK + ci, lambda at: source[n, first // BLOCK + co, at, ci])
                if spec.weight_stream > 0:
                    _stream_next_panel(spec, weight, fb, first, t, co * BLOCK + ci)
    else:
        with T.serial(0, count) as c:
            reduce(first + c, lambda at: source[n, first + c, at])
            if spec.weight_stream > 0:
                _stream_next_panel(spec, weight, fb, first, t, c)
    # Saved as one block-wide vector per pixel (8-lane pieces, as the GEMM's tile_vectors: ties on Zen 3,
    # and the AVX-512 7x7 stem's reduction loop lost its whole-tile FMAs).
    if spec.blocked_output:
        epilogue = _store_blocked
    elif spec.transposed_store and lanes == 16 and 1 < mr <= 16:
        epilogue = _store_transposed
    else:
        epilogue = _store_output
    finish = lambda: epilogue(spec, mr, acc, *outputs, n, fb, base)  # noqa: E731
    if split:
        if partial is None:
            finish()
            return
        with T.If(kb < spec.channel_blocks - 1):
            with T.Then():
                for m in range(mr):
                    for v in range(nr):
                        with T.vectorized(0, lanes) as ji:
                            T.buffer_store(partial, acc[m][v][ji], [(t * spec.pixel_tile + m) * block + v * lanes + ji])
            with T.Else():
                finish()
        return
    _keep_or_finish(acc, partial, mr, block, block, lambda m, j: (t * spec.pixel_tile + m) * block + j, kb,
                    spec.channel_blocks, finish)


def _stream_next_panel(spec: DirectConvSpec, weight, fb, first, t, step) -> None:
    """Channel step ``step`` of tile ``t`` prefetches ``spec.weight_stream`` lines of the weight panel after the
    current one (as :func:`_prefetch_next_panel`) into L2: line ``(g * weight_stream + i) * lines // steps`` of
    its ``lines`` for the ``g``-th of the panel's ``steps`` channel steps (every tile's), the last line again past
    the end. One or two prefetches between FMAs never queue up like a tile's share at its start did, and the
    panel a DRAM stream brings in a burst arrives evenly while the tiles before it run."""
    conv, block = spec.conv, spec.filter_block
    taps, window = conv.taps, conv.kernel[0] * conv.kernel[1]
    panel = spec.channel_block * window * block  # floats
    lines = ceil_div(panel, 16)
    steps = spec.group_tiles * spec.channel_block
    total = spec.filter_blocks * taps * block
    start = fb * taps * block + first * window * block + panel
    g = t * spec.channel_block + step
    for i in range(spec.weight_stream):
        line = T.min((g * spec.weight_stream + i) * lines // steps, lines - 1)
        e = T.min(start + line * 16, total - 1)
        T.evaluate(tirx.call_intrin("void", "tirx.prefetch", tirx.address_of(
            weight[e // (taps * block), e // block % taps, e % block]), 0, 2, 1))


def _prefetch_next_panel(spec: DirectConvSpec, weight, fb, first, t) -> None:
    """Tile ``t`` of a task prefetches its share (1 / ``group_tiles``) of the lines of the weight panel after
    the current one (the next reduction block's, or the next filter block's first: contiguous in the packed
    weight) into the cache level ``spec.weight_prefetch`` (tirx.prefetch locality), so that a panel streamed
    from DRAM arrives while the tiles before it run instead of in a burst under the first tile's FMAs."""
    conv, block = spec.conv, spec.filter_block
    taps, window = conv.taps, conv.kernel[0] * conv.kernel[1]
    panel = spec.channel_block * window * block  # floats
    per_tile = ceil_div(ceil_div(panel, 16), spec.group_tiles)
    total = spec.filter_blocks * taps * block
    start = fb * taps * block + first * window * block + panel
    with T.serial(0, per_tile) as i:
        e = T.min(start + (t * per_tile + i) * 16, total - 1)
        T.evaluate(tirx.call_intrin("void", "tirx.prefetch", tirx.address_of(
            weight[e // (taps * block), e // block % taps, e % block]), 0, spec.weight_prefetch, 1))


def _compacts(spec: DirectConvSpec) -> bool:
    """Whether the kernel runs on a compact copy of a strided 1x1's input (COMPACT_STRIDED_LANES)."""
    conv = spec.conv
    input_bytes = conv.in_channels * conv.height * conv.width * 4
    return (spec.lanes in COMPACT_STRIDED_LANES and conv.kernel == (1, 1) and conv.strides != (1, 1)
            and conv.padding == (0, 0, 0, 0) and input_bytes >= COMPACT_INPUT_BYTES)


def _compact_input(conv: DenseConvSpec, data):
    """The input pixels a strided unpadded 1x1 conv reads, as a compact (N, C, OH * OW) workspace filled in
    parallel: the tiles then read every line they bring whole, and the input fits the L2 a quarter as often."""
    n_, c_, oh, ow = conv.batch, conv.in_channels, conv.out_height, conv.out_width
    sy, sx = conv.strides
    compact = T.decl_buffer((n_, c_, oh * ow), "float32")
    with T.parallel(0, n_ * c_) as nc:
        with T.serial(0, oh) as y:
            with T.serial(0, ow) as x:  # vectorised (stride-2 gathers): 0.97-1.02x of this loop
                T.buffer_store(compact, data[nc // c_, nc % c_, y * sy, x * sx], [nc // c_, nc % c_, y * ow + x])
    return compact


def _nchw(*shape: int) -> tuple[int, ...]:
    return shape


def _blocked_output_args(spec: DirectConvSpec) -> tuple:
    """Declare [residual] and out, each in its layout (NCHW16c when blocked), and the function's attributes;
    returns their views (residual or None, out): (N, F / 16, OH * OW, 16) when blocked, else (N, F, OH * OW)."""
    conv = spec.conv
    nchw = (conv.batch, conv.out_channels, conv.out_height, conv.out_width)
    blocked = blocked_shape(*nchw)

    def declare(name: str, is_blocked: bool):
        arg = T.arg(name, T.buffer(blocked if is_blocked else nchw, "float32"))
        view = (blocked[0], blocked[1], conv.pixels, BLOCK) if is_blocked else (nchw[0], nchw[1], conv.pixels)
        return arg, view

    residual, res_view = declare("residual", spec.blocked_residual) if conv.residual else (None, None)
    out, out_view = declare("out", spec.blocked_output)
    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
    flat_out = T.decl_buffer(out_view, "float32", data=out.data)
    flat_res = T.decl_buffer(res_view, "float32", data=residual.data) if residual is not None else None
    return flat_res, flat_out


def _compact_blocked_input(conv: DenseConvSpec, data):
    """:func:`_compact_input` of a blocked input: each pixel read is one 16-channel vector, copied whole into a
    compact (N, C / 16, OH * OW, 16) workspace."""
    n_, cb_, oh, ow = conv.batch, conv.in_channels // BLOCK, conv.out_height, conv.out_width
    sy, sx = conv.strides
    compact = T.decl_buffer((n_, cb_, oh * ow, BLOCK), "float32")
    with T.parallel(0, n_ * cb_) as nc:
        with T.serial(0, oh) as y:
            with T.serial(0, ow) as x:
                with T.vectorized(0, BLOCK) as j:
                    T.buffer_store(compact, data[nc // cb_, nc % cb_, y * sy, x * sx, j],
                                   [nc // cb_, nc % cb_, y * ow + x, j])
    return compact


def direct_conv_primfunc(spec: DirectConvSpec) -> tirx.PrimFunc:
    """The scheduled PrimFunc of one dense conv on the direct kernel.

    Arguments, in order: data (N, C, H, W), packed weight, [padded bias (blocks * B,)],
    [residual (N, F, OH, OW)], out; data, residual and out in the blocked layout (N, C / 16, H, W, 16) when the
    spec says so.
    """
    conv = spec.conv
    n_, c_, p_ = conv.batch, conv.in_channels, conv.pixels
    mr, nr, lanes, block = spec.pixel_tile, spec.vectors, spec.lanes, spec.filter_block
    blocks, tiles = spec.filter_blocks, spec.pixel_tiles
    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name("main")
            in_shape = (blocked_shape if spec.blocked_input else _nchw)(n_, c_, conv.height, conv.width)
            data = T.arg("data", T.buffer(in_shape, "float32"))
            weight = T.arg("weight", T.buffer((blocks, conv.taps, block), "float32"))
            bias = T.arg("bias", T.buffer((blocks * block,), "float32")) if conv.has_bias else None
            blocked_out = spec.blocked_output or spec.blocked_residual
            flat_res, flat_out = _blocked_output_args(spec) if blocked_out else _output_args(conv)
            if spec.blocked_input and _compacts(spec):
                source = _compact_blocked_input(conv, data)
                conv = dataclasses.replace(conv, height=conv.out_height, width=conv.out_width, strides=(1, 1))
                spec = dataclasses.replace(spec, conv=conv)
            elif spec.blocked_input:  # read in place (unpadded: __post_init__)
                source = T.decl_buffer((n_, c_ // BLOCK, conv.height * conv.width, BLOCK), "float32", data=data.data)
            elif _compacts(spec):
                source = _compact_input(conv, data)
                conv = dataclasses.replace(conv, height=conv.out_height, width=conv.out_width, strides=(1, 1))
                spec = dataclasses.replace(spec, conv=conv)
            else:
                source = _padded_input(conv, data)
            cb, kblocks = spec.channel_block, spec.channel_blocks
            groups, per_group = spec.pixel_groups, spec.group_tiles
            tasks = n_ * groups if spec.filters_inner else n_ * blocks * groups
            with T.parallel(0, tasks) as task:
                n = task // (tasks // n_)
                group = task % groups
                # Partial sums of the task's tiles between reduction blocks.
                filters = blocks if spec.filters_inner else 1
                partial = T.decl_buffer((filters * per_group * mr * block,), "float32") if kblocks > 1 else None
                with T.serial(0, kblocks) as kb:
                    first = kb * cb
                    with T.serial(0, filters) as fi:
                        fb = fi if spec.filters_inner else task // groups % blocks
                        with T.serial(0, T.min(per_group, tiles - group * per_group)) as t:
                            index = group * per_group + t
                            args = (source, weight, bias, partial, (flat_res, flat_out), n, fb, kb, fi * per_group + t)
                            count = T.min(cb, c_ - first)
                            if spec.weight_prefetch:
                                _prefetch_next_panel(spec, weight, fb, first, t)
                            if spec.exact_tail and p_ % mr:
                                with T.If(index < tiles - 1):
                                    with T.Then():
                                        _tile(spec, mr, *args, index * mr, first, count)
                                    with T.Else():
                                        _tile(spec, p_ % mr, *args, p_ - p_ % mr, first, count)
                            else:
                                _tile(spec, mr, *args, T.min(index * mr, p_ - mr), first, count)
    func = builder.get().without_attr("global_symbol")  # the module names it when it is added
    attr = {"pixel_tile": mr, "vectors": nr, "lanes": lanes, "kernel": list(conv.kernel)}
    blocked = [spec.blocked_input, spec.blocked_residual, spec.blocked_output]
    if any(blocked):
        attr["blocked"] = blocked
    return func.with_attr(DIRECT_CONV_ATTR, attr)
