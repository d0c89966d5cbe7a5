"""Block-sparse 1x1 convolution: connectivity pruning of pointwise layers, run without the zeros.

A 1x1 conv is the product ``out[f, p] = sum_c w[f, c] * x[c, p]``; a pointwise layer pruned in
blocks of ``B`` consecutive output channels sharing one input channel (``(B, 1)`` blocks, see
``tvm_patdnn.pruning.projection``) keeps, per filter block, a list of input channels. The kernel
is the dense packed-GEMM kernel of :mod:`tvm_patdnn.ops.dense_conv` with its reduction walking that
list instead of every channel (block-compressed rows, BCSR):

* the ``B`` filters of a block are the register tile's rows (``B x NR`` pixel-vector accumulators):
  each kept block costs ``B`` broadcast weights and ``NR`` input vectors for ``B * NR`` multiply-
  adds, the dense micro-kernel's ratio, plus one index load. Single weights (``B = 1``) would need a
  broadcast per vector of multiply-adds and run load-bound at half the rate, which is why the
  pruner keeps blocks;
* the input panel of a pixel tile is copied contiguous as in the dense kernel (an NCHW row sits
  ``H*W*4`` bytes from the next: without the copy the scattered channels of a block list share a
  few L1 sets), every channel at once, and every filter block of the tile reads its kept channels
  from it (see :attr:`SparsePointwiseSpec.channel_block`);
* the kept blocks of each filter block are sorted by channel (``starts[fb, 0]`` to ``starts[fb, 1]``);
* the last pixel tile overlaps the one before, as in the dense kernel, unless a single pixel is left
  over (7x7 images), which gets its own kernel (:func:`_last_pixel`);
* bias, residual add, ReLU and clip are applied to the accumulators before the one store.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..arith import ceil_div
from .dense_conv import DenseConvSpec, _output_args, _pack_panel, _padded_input, _store_output

__all__ = ["BLOCK", "MAX_DENSITY", "SPARSE_POINTWISE_ATTR", "BlockSparseWeight", "SparsePointwiseSpec",
           "block_density", "block_sparse_weight", "sparse_pointwise_primfunc", "sparse_pointwise_tile"]

# Scope of the accumulators: TVM 0.27 allocates a small "local" CPU buffer as heap workspace
# (TVMBackendAllocWorkspace), which LLVM cannot promote to registers; a "global" one is a stack
# alloca, which it can (as schedule_rules.pattern_conv_cpu.ACCUMULATOR_SCOPE). Measured on the AVX2
# Zen 3 host (1 in 4 blocks kept, each ResNet-50 1x1 layer alone, 9 and 11 interleaved rounds,
# local / global): 64->64 and 64->256 at 56x56 1.20-1.48x, the others 0.98-1.11x; the 15 layers
# summed 1.04x and 1.08x. Outputs identical.
ACC_SCOPE = "global"

SPARSE_POINTWISE_ATTR = "patdnn.sparse_pointwise"
# Filter rows of a kept block: the pruner's default ``pointwise_block`` (4, 1). Measured on the AVX2
# host (256->64 at 56x56, 1024->256 at 14x14, 512->2048 at 7x7, 1/4 of the blocks kept): blocks of
# 4 ran 2.4-5x faster than single weights (one broadcast per vector of multiply-adds) and 1.1-1.3x
# faster than blocks of 8 (fewer pixel vectors fit beside 8 accumulator rows).
BLOCK = 4
# Largest kept share of blocks run sparse. A kept block costs what a dense block costs (same
# register tile, one more index load: at 100% kept the sparse kernel ran 0.98-1.15x the dense one),
# and the input panel copy and output stores are paid either way, so sparsity pays from a few % of
# blocks dropped; 0.6 leaves margin for the noise of that measurement.
MAX_DENSITY = 0.6


def block_density(weight: np.ndarray, block: int = BLOCK) -> float:
    """Kept share of a 1x1 weight's (``block``, 1) blocks (a block is kept when any weight is nonzero)."""
    rows = weight.reshape(weight.shape[0], -1)
    tiles = ceil_div(rows.shape[0], block)
    padded = np.zeros((tiles * block, rows.shape[1]), dtype=bool)
    padded[: rows.shape[0]] = rows != 0
    return float(padded.reshape(tiles, block, -1).any(axis=1).mean())


def sparse_pointwise_tile(registers: int, lanes: int, block: int, pixels: int, chains: int = 8) -> tuple[int, int]:
    """(pixel vectors NR, lanes) of a ``block``-row register tile: the fewest pixel vectors whose
    ``block x NR`` accumulators give the FMA units ``chains`` independent chains
    (:func:`tvm_patdnn.targets.fma_chains`), within the registers left after the ``block``
    broadcast weights, one input vector and a spare. More would not run faster: each kept block is
    ``block x NR`` multiply-adds whatever NR, while a wider tile makes a wider panel per channel
    (fewer channels per L1-sized block, so more partial-sum round trips) and a wider wasted last
    tile. Measured on Zen 4 AVX-512 (1 in 4 blocks kept, ResNet-50 1x1 shapes 56x56 to 7x7): 1 zmm
    vector (4 chains) 1.2-1.5x faster than 2 and 2.5-3.9x faster than 6; on 8-lane vectors 2
    (8 chains) was best, as on the AVX2 Zen 3 host."""
    if pixels < lanes:
        return 1, pixels
    vectors = min(ceil_div(chains, block), (registers - block - 2) // block)
    return max(1, min(vectors, pixels // lanes)), lanes


@dataclass(frozen=True)
class SparsePointwiseSpec:
    """A 1x1 conv (any stride, no padding) with (``block``, 1) block-sparse weights and its tile."""

    conv: DenseConvSpec  # shape, stride and epilogue; filter_tile is the block, vectors x lanes the pixel tile
    nonzero_blocks: int

    def __post_init__(self):
        if self.conv.kernel != (1, 1) or self.conv.padding != (0, 0, 0, 0):
            raise ValueError("a sparse pointwise conv is 1x1 and unpadded")

    @classmethod
    def for_target(cls, registers: int, lanes: int, block: int, nonzero_blocks: int, chains: int = 8,
                   **shape) -> SparsePointwiseSpec:
        probe = DenseConvSpec(**shape, lanes=1, filter_tile=1, vectors=1)
        vectors, lanes = sparse_pointwise_tile(registers, lanes, block, probe.pixels, chains)
        return cls(DenseConvSpec(**shape, filter_tile=block, vectors=vectors, lanes=lanes), nonzero_blocks)

    @property
    def block(self) -> int:
        return self.conv.filter_tile

    @property
    def filter_blocks(self) -> int:
        return self.conv.filter_tiles

    @property
    def channel_block(self) -> int:
        """Input channels per reduction block: all of them. Unlike the dense kernel's L1-sized blocks,
        one block has no partial sums to park and reload per (filter block, channel block) — which
        at 1/4 kept cost as much as in the dense kernel against a quarter of the multiply-adds —
        and the panel (``C x 16`` floats on AVX2: 128 KB at 2048 channels) is read a quarter at a
        time from L2. Measured on the AVX2 Zen 3 host (1 in 4 blocks kept, ResNet-50's 1x1 shapes,
        kernel alone, interleaved): 1.12-1.25x faster on the eight layers of 512-2048 input
        channels, unchanged on those of 64-256 (already one 16 KB block)."""
        return self.conv.in_channels

    @property
    def flops(self) -> int:
        """Multiply-adds actually done (the kept blocks), x2."""
        return 2 * self.conv.batch * self.nonzero_blocks * self.block * self.conv.pixels


@dataclass(frozen=True)
class BlockSparseWeight:
    """(``block``, 1)-block compressed rows of a 1x1 weight.

    ``values[j]`` holds the ``block`` weights of the j-th kept block, ``channels[j]`` its input
    channel; filter block ``fb``'s blocks of channel block ``kb`` are ``starts[fb, kb]`` to
    ``starts[fb, kb + 1]``, sorted by channel. Filters past the weight's rows are zero; an all-zero
    weight keeps one unread entry (buffers cannot be empty).
    """

    values: np.ndarray  # float32 [blocks, block]
    channels: np.ndarray  # int32 [blocks]
    starts: np.ndarray  # int32 [filter blocks, channel blocks + 1]

    @property
    def kept_blocks(self) -> int:
        return int(self.starts[-1, -1])


def block_sparse_weight(weight: np.ndarray, block: int, channel_block: int) -> BlockSparseWeight:
    """Compress a ``[F, C]`` (or ``[F, C, 1, 1]``) weight into kept (``block``, 1) blocks: a block
    is kept when any of its weights is nonzero."""
    rows = weight.reshape(weight.shape[0], -1).astype(np.float32)
    out_c, in_c = rows.shape
    tiles = ceil_div(out_c, block)
    padded = np.zeros((tiles * block, in_c), dtype=np.float32)
    padded[:out_c] = rows
    grouped = padded.reshape(tiles, block, in_c)
    kept = np.any(grouped != 0, axis=1)  # [filter blocks, C]
    tile_ids, channels = np.nonzero(kept)  # row-major: by filter block, then channel
    values = grouped[tile_ids, :, channels]  # [blocks, block]
    channel_blocks = ceil_div(in_c, channel_block)
    bounds = np.arange(channel_blocks + 1) * channel_block
    first = np.searchsorted(tile_ids, np.arange(tiles))
    starts = np.stack([first[fb] + np.searchsorted(channels[tile_ids == fb], bounds) for fb in range(tiles)])
    if not len(channels):  # an all-zero weight: one unread entry, as buffers cannot be empty
        values, channels = np.zeros((1, block), dtype=np.float32), np.zeros(1, dtype=np.int64)
    return BlockSparseWeight(np.ascontiguousarray(values, dtype=np.float32), channels.astype(np.int32),
                             starts.astype(np.int32))


def _micro_kernel(spec: SparsePointwiseSpec, panel, values, channels, starts, n, base, fb, epilogue) -> None:
    """One filter block x one pixel tile over the filter block's kept blocks, stored once.

    The loop counter and the channel's panel offset are 64-bit: with the int32 ``starts`` and
    ``channels`` as they are, LLVM sign-extends every index and unrolls by 2 (21.5 instructions per
    kept block for its 8 FMAs); cast once, it unrolls by 4 with one base register per array (17).
    Measured on the AVX2 Zen 3 host (1 in 4 blocks kept, kernel alone, 9 interleaved rounds):
    0.98-1.28x per layer, 1.06x summed over ResNet-50's 15 1x1 layers."""
    conv = spec.conv
    mr, nr, lanes, tp = conv.filter_tile, conv.vectors, conv.lanes, conv.pixel_tile
    acc = T.decl_buffer((mr * tp,), "float32", scope=ACC_SCOPE)
    with T.unroll(0, mr) as i:
        with T.vectorized(0, tp) as j:
            T.buffer_store(acc, tirx.const(0.0, "float32"), [i * tp + j])
    with T.serial(starts[fb, 0].astype("int64"), starts[fb, 1].astype("int64")) as e:
        row = channels[e].astype("int64") * tp
        with T.unroll(0, mr) as i:
            with T.unroll(0, nr) as jo:
                with T.vectorized(0, lanes) as ji:
                    slot = i * tp + jo * lanes + ji
                    T.buffer_store(acc, acc[slot] + values[e, i] * panel[row + jo * lanes + ji], [slot])
    _store_output(conv, acc, *epilogue, n, fb, base)


def _prefetch_next_panel(conv: DenseConvSpec, source, n, base) -> None:
    """Prefetch the next pixel tile's input line in every channel (stride 1: on AVX2 a tile's 16
    pixels of a channel are one 64-byte line) while this tile's filter blocks run. The panel copy
    reads one line from each of ``C`` rows ``H*W*4`` bytes apart, a pattern the hardware prefetchers
    do not follow; at 56x56 and 28x28 those lines come from L3, shared with the other core. Measured on the AVX2
    Zen 3 host (1 in 4 blocks kept, kernel alone, 15 interleaved rounds): with the other vCPU
    running tests, 1.24-1.33x on 64->256, 256->64 and 256->128 at 56x56, 1.05x at 28x28, 1.01x at
    14x14 and 7x7 (1.03x summed over ResNet-50's 15 1x1 layers); on a quieter box 0.995-1.04x per
    layer, 1.01x summed. Two tiles ahead ran as one."""
    ahead = T.min(base + conv.pixel_tile, conv.pixels - 1)
    with T.serial(0, conv.in_channels) as c:
        T.evaluate(tirx.call_intrin("void", "tirx.prefetch", tirx.address_of(source[n, c, ahead]), 0, 3, 1))


def _pixel_tile(spec: SparsePointwiseSpec, source, values, channels, starts, n, base, epilogue) -> None:
    """Every filter block over the pixel tile from ``base``: the tile's input panel, then the micro-kernels."""
    conv = spec.conv
    panel = T.decl_buffer((conv.in_channels * conv.pixel_tile,), "float32")
    _pack_panel(conv, source, panel, n, base, 0, conv.in_channels)
    if conv.pointwise and conv.pixels > conv.pixel_tile:
        _prefetch_next_panel(conv, source, n, base)
    with T.serial(0, spec.filter_blocks) as fb:
        _micro_kernel(spec, panel, values, channels, starts, n, base, fb, epilogue)


def _last_pixel(spec: SparsePointwiseSpec, source, values, channels, starts, n, epilogue) -> None:
    """Every filter block at the image's last pixel, when it is the only one past the whole tiles
    (7x7 images: 3 tiles of 16 and 1 pixel). An overlapping tile would pay a whole tile's multiply-
    adds for it (64 pixels computed for 49); here a kept block's weights are one vector against
    the pixel broadcast, 4 accumulators taking turns so the FMAs do not wait on each other.
    Measured on the AVX2 Zen 3 host (1 in 4 blocks kept, kernel alone, interleaved): 1.12-1.24x
    on ResNet-50's 7x7 1x1 layers; the same for 4 remaining pixels (14x14) ran 0.93-1.02x, so
    larger remainders keep the overlapping tile."""
    conv = replace(spec.conv, vectors=1, lanes=1)
    mr, sets, base = conv.filter_tile, 4, conv.pixels - 1
    panel = T.decl_buffer((conv.in_channels,), "float32")
    _pack_panel(conv, source, panel, n, base, 0, conv.in_channels)
    with T.serial(0, spec.filter_blocks) as fb:
        acc = T.decl_buffer((sets * mr,), "float32", scope=ACC_SCOPE)
        with T.vectorized(0, sets * mr) as i:
            T.buffer_store(acc, tirx.const(0.0, "float32"), [i])
        first, count = starts[fb, 0], starts[fb, 1] - starts[fb, 0]

        def accumulate(e, h) -> None:
            with T.vectorized(0, mr) as i:
                T.buffer_store(acc, acc[h * mr + i] + values[e, i] * panel[channels[e]], [h * mr + i])

        with T.serial(0, count // sets) as k:
            with T.unroll(0, sets) as h:
                accumulate(first + k * sets + h, h)
        with T.serial(0, count % sets) as k:
            accumulate(first + count // sets * sets + k, 0)
        with T.vectorized(0, mr) as i:
            T.buffer_store(acc, sum((acc[h * mr + i] for h in range(1, sets)), acc[i]), [i])
        _store_output(conv, acc, *epilogue, n, fb, base)


def sparse_pointwise_primfunc(spec: SparsePointwiseSpec) -> tirx.PrimFunc:
    """The scheduled PrimFunc of one block-sparse 1x1 conv.

    Arguments, in order: data (N, C, H, W), values, channels, starts (:class:`BlockSparseWeight`),
    [bias (F,)], [residual (N, F, OH, OW)], out.
    """
    conv = spec.conv
    n_, f_, p_ = conv.batch, conv.out_channels, conv.pixels
    mr, tp = conv.filter_tile, conv.pixel_tile
    tiles = ceil_div(p_, tp)
    last_pixel = p_ > tp and p_ % tp == 1
    blocks = max(1, spec.nonzero_blocks)
    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name("main")
            data = T.arg("data", T.buffer((n_, conv.in_channels, conv.height, conv.width), "float32"))
            values = T.arg("values", T.buffer((blocks, mr), "float32"))
            channels = T.arg("channels", T.buffer((blocks,), "int32"))
            starts = T.arg("starts", T.buffer((spec.filter_blocks, 2), "int32"))
            bias = T.arg("bias", T.buffer((f_,), "float32")) if conv.has_bias else None
            flat_res, flat_out = _output_args(conv)
            source = _padded_input(conv, data)
            weight, epilogue = (values, channels, starts), (bias, flat_res, flat_out)
            with T.parallel(0, n_ * tiles) as task:
                n, tile = task // tiles, task % tiles
                if not last_pixel:
                    _pixel_tile(spec, source, *weight, n, T.min(tile * tp, p_ - tp), epilogue)
                else:
                    with T.If(tile < tiles - 1):
                        with T.Then():
                            _pixel_tile(spec, source, *weight, n, tile * tp, epilogue)
                        with T.Else():
                            _last_pixel(spec, source, *weight, n, epilogue)
    func = builder.get().without_attr("global_symbol")
    return func.with_attr(SPARSE_POINTWISE_ATTR, {"block": mr, "vectors": conv.vectors, "lanes": conv.lanes,
                                                  "nonzero_blocks": spec.nonzero_blocks})
