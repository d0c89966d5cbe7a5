"""Relax pass: rewrite dense conv2d (+ bias)(+ residual add)(+ ReLU / clip, which is also ReLU6)
into one of two dense kernels, chosen per layer: the packed GEMM over output pixels of
:mod:`tvm_patdnn.ops.dense_conv` or the direct kernel vectorised along output channels of
:mod:`tvm_patdnn.ops.direct_conv`.

Runs after :class:`~tvm_patdnn.transform.PatternConvRewrite`, on the convs it left dense, with
constant weights, so the weight is packed for the target's register tile at compile time and
the whole chain becomes one ``call_tir`` writing each output once from registers. The choice
(:meth:`DenseConvRewriter.kernel_for`), from side-by-side measurements on ResNet-50 shapes
(``benchmarks/dense.py``, AMD EPYC Zen 3 and Zen 4, 1 thread; the numbers in ``docs/performance.md``):

* 1x1 convs take the GEMM on AVX2 and NEON: its pixel vectors read a pointwise input as contiguous
  rows, where the direct kernel broadcasts one scalar per pixel and channel (Zen 3: direct / GEMM
  0.58-0.99x on 10 of the 15 ResNet-50 1x1 layers, e.g. 2048->512 at 7x7 0.59x, 256->512 s2 0.58x;
  the other five 0.77-1.34x across runs);
* on AVX-512 (measured on Zen 4, which runs 512-bit FMAs on 256-bit units: the same FMA peak as
  AVX2; 1 thread, interleaved rounds on a shared box) 1x1 convs with more than
  ``DIRECT_POINTWISE_CHANNELS`` input channels take the direct kernel: its 6 pixels x 4 vectors
  tile beat the GEMM's 14 filters x 2 vectors on 14 of the 15 ResNet-50 1x1 layers (1.0-1.8x: most
  on 7x7 images, where the GEMM's 32-pixel tiles compute 64 pixels for 49, and on stride 2). With
  fewer channels its scalar NCHW stores (6 x 64 per tile, against 6 x 64 x C FMAs) dominate
  (MobileNetV2 16->96 at 112x112 0.41x ORT, 24->144 at 56x56 0.78x) and the GEMM stays, with
  AVX2's tile of 6 filters x 2 vectors of 8 lanes (``gemm_vectors``): 1.02-1.42x over its 14 x 2
  zmm tile on the 9 such layers of ResNet-50 and MobileNetV2 in two runs, once 0.97x (32->192 at
  28x28); 16-pixel tiles waste less, 6 filters divide 24, 96, 144 ... On Zen 5 (AVX-512 at full
  width: 268 GFLOP/s per core against 136 for 256-bit code) an 8-lane tile tops out at half the peak,
  and the GEMM now takes the target's 14 filters x 2 vectors of 16 lanes, up to 128 input channels
  (1 thread, per-call minima in the dense ResNet-50, 8-lane GEMM or direct -> 16-lane GEMM: 64->64
  and 64->256 at 56x56 0.24 -> 0.145 and 0.81-0.86 -> 0.49-0.53 ms, 128->512 at 28x28 on the direct
  kernel 0.63 -> 0.47 ms; the direct kernel stays above 128 channels: the 16-lane GEMM lost 5-50% on
  256->64 at 56x56, 512->128 at 28x28, 256/512->1024, 2048->512 and the strided 1x1s). MobileNetV2's
  small 1x1s (16->96, 24->144 ...) follow, not measured on Zen 5. There the direct kernel's 1x1 tile
  is ``WIDE_POINTWISE_TILE`` (12) pixels x 2 vectors of 16 lanes from ``WIDE_POINTWISE_PIXELS`` (28x28)
  output pixels (in the dense ResNet-50, per-call minima: 256->64 at 56x56 0.58 -> 0.52 ms, 256->128
  0.99 -> 0.94, 256->512 s2 1.03 -> 0.98, ties at 28x28 and 14x14; at 7x7, 49 = 4 x 12 + 1 pixels,
  it lost 0.61 -> 0.73; with fewer than 64 filters, MobileNetV2's 144->24 at 56x56 and 192->32 at
  28x28, it lost 1.13-1.22x), and the GEMM's filter tiles are balanced (at most 14 filters, as equal
  as the count allows: MobileNetV2's 32->16 at 112x112 as 2 x 8 filters, not 14 + 2 padded to 28:
  0.144 -> 0.091 ms; whole MobileNetV2 1.04x with both). The GEMM reads a stride-1 1x1's input in
  place, without the panel copy, from ``WIDE_POINTWISE_PIXELS`` output pixels (per-call minima in the
  dense models: ResNet-50's 64->64 and 64->256 at 56x56, 128->512 at 28x28 1.02-1.11x; MobileNetV2's
  1x1s at 112x112 1.10-1.20x, 56x56 1.03x; at 14x14 it lost 2-7%, so the copy stays there);
  1x1s with at most ``SHORT_REDUCTION_CHANNELS`` (64) input channels and at least 64 filters take 6
  filters x 4 vectors (``SHORT_REDUCTION_VECTORS``; 10 loads per 24 FMAs, 64-pixel tiles) instead of
  14 x 2: their reduction is too short for the 28-accumulator tile's epilogue (Zen 5, 1 thread,
  per-call minima in the dense models, two interleaved runs: MobileNetV2's 16->96 at 112x112, 24->144
  at 56x56, 32->192 at 28x28 and 64->384 at 14x14 1.06-1.18x, ResNet-50's 64->256 at 56x56 0.90-1.08x
  (kernel sums 1.00x), 32->16 left as it was: 6-filter tiles would pad 16 to 18); from
  ``SHORT_REDUCTION_WIDE_PIXELS`` (56x56) output pixels 8 filters x 3 vectors (``SHORT_REDUCTION_WIDE_TILE``:
  11 loads per 24 FMAs, 48-pixel tiles; Zen 5, 1 thread, per-call minima in the dense ResNet-50, two
  interleaved runs of 11 and 15 rounds: 64->256 + residual at 56x56 0.525 -> 0.499 and 0.488 -> 0.468 ms,
  64->64 0.126 -> 0.118 and 0.115 -> 0.112, whole model 1.013x and 1.019x per round; alone 0.449 -> 0.434;
  MobileNetV2's 6 x 4 layers at 28x28 and 14x14 lost 1-4% with it, so smaller images keep 6 x 4); the GEMM prefetches
  its epilogue's lines (``DenseConvSpec.prefetch_output``) only when the epilogue reads a residual:
  prefetching the output lines alone made every 16-lane GEMM layer of MobileNetV2 slower in the model
  (Zen 5, 1 thread, per-call minima, two interleaved runs: 16->96 at 112x112 0.263 -> 0.214 and
  0.491 -> 0.325 ms, 24->144 at 56x56 1.11-1.27x, 32->192 at 28x28 1.22-1.26x, 64->384 and 96->576
  at 14x14 1.13-1.28x; whole MobileNetV2 1.059-1.061x per round); ResNet-50's residual 1x1s keep it
  (without it 64->256 + residual at 56x56 lost 0.585 -> 0.643 ms; whole model 1.011x either way);
* on AVX2, stride-1 1x1 convs of at most ``SMALL_POINTWISE_PIXELS`` output pixels (the 7x7 images
  of ResNet-50's and MobileNetV2's last stages) take the direct kernel with ``POINTWISE_WEIGHT_PANEL``
  (8 KB) weight panels: the GEMM's 16-pixel tiles compute 64 pixels for 49 there. Measured (Zen 3,
  1 thread, interleaved A/B, ``patdnn tune``'s candidates): direct / GEMM 1.07-1.24x on 512->2048,
  2048->512, 960->160, 960->320 and 160->960 at 7x7; the 8 KB panel 1.09-1.16x over the usual 32 KB
  one there (a 32 KB panel and the input lines it is swept with do not fit a 32 KB L1 together);
  at 14x14 within 0.95-1.08x of the GEMM (not taken), at 28x28 and on stride 2 the GEMM wins by
  4-23%. So do stride-1 1x1 convs with at most ``FEW_POINTWISE_FILTERS`` (64) filters in whole
  blocks of 16, whatever the image: 1.13x on 384->64 at 14x14, 1.26x on 192->32 at 28x28, 1.26x on
  32->16 at 112x112, ties on 256->64 and 64->64 at 56x56 (the GEMM's 6-filter tiles pad 16 to 18
  and 32 to 36, and few filter tiles share each copied panel); 24 filters run as one 4-pixel x
  3-vector block (``direct_register_tile``): 1.14x on 144->24 and 1.10x on 96->24 at 56x56 (as
  2 vectors x 2 blocks, 8 of 32 lanes padding, the GEMM won by 1.25-1.29x); 192->48 a tie; filter
  counts that every tile pads (40, 56) stay on the GEMM;
* KxK convs with at least ``lanes`` filters take the direct kernel: no window copy, any stride
  at the same cost, no overlap waste on small images (Zen 3: direct / GEMM 1.01-1.81x on every KxK
  layer: the 7x7 stem 1.43x, 3x3 64 at 56x56 1.54x, 3x3 512 at 14x14 s2 1.81x);
* except, on AVX2 and AVX-512 (with four vectors of filters), stride-1 KxK convs whose reduction
  (input channels x taps) is at most ``FEW_TAPS_REDUCTION``: the first 3x3 conv of an RGB image (27)
  takes the GEMM, whose window copy
  is then small and whose pixel tiles fill every lane, where the direct kernel's reduction blocks are
  27 FMAs long (Zen 3, 1 thread, interleaved, 3->64: direct / GEMM 1.56x at 32x32, 1.16x at
  224x224 alone, 0.99x within the VGG-16 224 trunk; ``patdnn tune``'s choice on VGG-16 CIFAR, 1.2-1.5x
  in the model, in session 11; Zen 5, in the dense VGG-16 CIFAR: 0.107 -> 0.030 ms on the 16-lane
  GEMM, 0.035 on the 8-lane one). On AVX-512, when such a conv's output reaches ``STREAMED_OUTPUT_BYTES``
  (2 MB: it outgrows L2 and is written to L3), the GEMM tile is ``STREAMED_OUTPUT_TILE``, 3 filters x 7
  vectors of 16 lanes (a 112-pixel half row of VGG-16 224), instead of 13-14 x 2: the write of the output,
  not the FMAs, bounds it (with its stores redirected into L1 the 13 x 2 tile ran 1.33 -> 0.89 ms), and
  7-line runs per filter write it faster than 2-line runs of 13 filters (Zen 5, 1 thread, alone: 3->64 at
  224x224 1.29-1.31 -> 0.89-0.92 ms, 4 x 6, 5 x 4, 8 x 3 0.96-1.08, 3 x 8 and wider tiles spill; at 112x112
  0.255 -> 0.218; at 64x64 (1 MB) 0.092 -> 0.107 and at 32x32 0.020 -> 0.023, so smaller outputs keep 14 x 2;
  in the VGG-16 224 trunk, per-call minima, interleaved: 1.69 -> 1.01 ms, 64% of 268 GFLOP/s, trunk 1.05x
  per round). The 7x7 stem (147) stays direct;
* KxK convs on AVX-512 (Zen 4) run the direct kernel with 6 pixels x 4 vectors of 8 lanes
  (``direct_vectors``) rather than 4 of 16: vs ORT 0.81 -> 1.03x on the 7x7 stem (its 3 x 49 taps x
  64 filters of weights overflowed the 32 KB panel into two reduction blocks), 0.95 -> 1.01x on
  3x3 256 at 28x28 s2, ties to +0.03x on the other stride-2 / 7x7 layers of ResNet-50 and the
  MobileNetV2 stem, one loss (3x3 512 at 14x14 s2 0.97 -> 0.93x). On Zen 5 the same held for the 3x3s
  (16-lane tiles 0.95-1.0x on ResNet-50's), but not for an RGB stem (at most ``STEM_CHANNELS`` input
  channels): it runs 6 pixels x ``STEM_VECTORS`` (2) vectors of 16 lanes, one reduction block for
  its 3 channels (1 thread, alone, vs ORT: 6 x 4 of 8 lanes 0.52x, 6 x 4 of 16 0.50x, 10-14 x 2 of 16
  0.87-0.92x, 6 x 2 of 16 0.99x; in the dense ResNet-50 1.91 -> 1.07 ms). Its 8-lane tiles keep at
  most 4 vectors (:func:`~tvm_patdnn.ops.direct_conv.direct_register_tile`: a 2x2 image's 4 x 6 tile
  ran 3.5x slower than 4 x 4).
After the rewrite, tensors whose producer and every reader are 16-lane direct-kernel calls pass between them in
NCHW16c (:mod:`~tvm_patdnn.transform.blocked_layout`; AVX-512 only, every other tensor and target stays NCHW).
Left on the legalized conv2d and the :class:`~tvm_patdnn.schedule_rules.DenseConv2dCPU` schedule
(and in the tuning space): grouped/depthwise and dilated convs, non-constant weights, KxK convs
with fewer filters than a vector has lanes (most lanes of the direct kernel would be padding)."""

from __future__ import annotations

import dataclasses

import tvm
from tvm import relax
from tvm.ir import IRModule
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from ..arith import ceil_div
from ..ops.dense_conv import FILTERS_OUTER_WEIGHT_BYTES, DenseConvSpec
from ..ops.direct_conv import DirectConvSpec, direct_register_tile
from .blocked_layout import BLOCKED_LAYOUT_LANES, apply_blocked_layout
from .exprs import (
    add_kernel, constant_array, float_value, nchw_conv_shapes, per_channel_bias, single_use_values, static_shape,
)
from .kernel_choice import KernelChoices, KernelSpec, kernel_function, pack_for_kernel

__all__ = ["DenseConvRewrite", "DenseConvRewriter"]

# On AVX-512, 1x1 convs with more than this many input channels run on the direct kernel: it writes
# its 6 pixels x 64 filters tile to NCHW as scalars, which fewer channels' FMAs do not amortise.
DIRECT_POINTWISE_CHANNELS = 128
# On AVX-512, KxK convs with at most this many input channels (an RGB image's stem) run the direct
# kernel on 16-lane vectors, STEM_VECTORS of them a tile.
STEM_CHANNELS = 4
STEM_VECTORS = 2
# On AVX-512, 1x1 convs on the direct kernel with at least this many output pixels (28x28) and four
# vectors of filters take tiles of WIDE_POINTWISE_TILE pixels x 2 vectors of 16 lanes instead of 6 x 4.
WIDE_POINTWISE_PIXELS = 784
WIDE_POINTWISE_TILE = 12
# ... and so do those at most SMALL_WIDE_POINTWISE_PIXELS (7x7) with at least SMALL_WIDE_POINTWISE_CHANNELS input
# channels and at most SMALL_WIDE_POINTWISE_FILTERS filters (MobileNetV2's projections at 7x7: 160 filters are 2.5
# blocks of 4 vectors, 5 of 2; the 12 x 2 tile also reads each weight line for 12 pixels, not 6). Zen 5, 1 thread,
# core 0, per-call minima in the dense MobileNetV2, interleaved, two runs of 11 rounds: 960->160 (x2) 0.077-0.084 ->
# 0.067-0.070 ms (1.13-1.20x, 63 -> 80-83% of 268 GFLOP/s), 576->160 0.046-0.050 -> 0.042-0.043 (1.08-1.15x, 62-68 ->
# 78-79%), 960->320 1.01-1.10x. Not taken: 160->960 and 320->1280 (0.90-0.98x); ResNet-50's 7x7 1x1s (>= 512
# filters) keep 6 x 4 (7 x 3 / 8 x 3 measured 0.94-0.95x there in session 17).
SMALL_WIDE_POINTWISE_PIXELS = 49
SMALL_WIDE_POINTWISE_CHANNELS = 512
SMALL_WIDE_POINTWISE_FILTERS = 320
# ... and so do those at NARROW_POINTWISE_PIXELS (14x14) with at most NARROW_POINTWISE_CHANNELS input channels and at
# most NARROW_POINTWISE_FILTERS filters, on NARROW_POINTWISE_TILE pixels x 2 vectors (14 divides 196: no ragged tile;
# MobileNetV2's 192->64 at 14x14, 4.8 MFLOP: 6 x 4 tiles ran it at 66-67% of 268 GFLOP/s). Zen 5, 1 thread, core 1,
# per-call minima in the dense MobileNetV2, interleaved, three runs of 8-12 rounds: 0.0219-0.0235 -> 0.0204-0.0209 ms
# (1.07-1.15x, 73-78% of 268 GFLOP/s); 12 x 2 1.04-1.12x, 8 x 2 1.01-1.14x, 7 x 4 0.88-0.94x, 14 x 2 without the
# weight stream 0.97-1.03x. Its 384->64 at 14x14 (79-82%) keeps 6 x 4.
NARROW_POINTWISE_PIXELS = 196
NARROW_POINTWISE_CHANNELS = 256
NARROW_POINTWISE_FILTERS = 64
NARROW_POINTWISE_TILE = 14
# On AVX-512, 1x1 convs adding a residual that the rules put on the GEMM, with more than this many input channels,
# run the direct kernel when the blocked layout takes their output (blocked_layout: then the epilogue stores whole
# vectors), else they stay on the GEMM. Zen 5, 1 thread, core 0, per-call minima in the dense ResNet-50, interleaved
# (9 rounds, two runs): 128->512 + residual at 28x28 (x4) 0.439-0.450 -> 0.414-0.421 ms (1.035-1.079x, 86 -> 91% of
# 268 GFLOP/s; ORT 0.425 in its graph), and the 28x28 stage's tensors blocked with it (256->512 s2 1.025-1.041x).
# With 64 input channels (56x56: 64->256 + residual) 0.98-1.02x and the 56x56 stage's other 1x1s reading the blocked
# tensors 0.92-0.98x: not taken.
BLOCKED_DIRECT_CHANNELS = 64
# On AVX-512, direct KxK convs (8-lane tiles, not the RGB stem) with at most this many output pixels (14x14)
# prefetch their next weight panel into L2 over the tiles (DirectConvSpec.weight_prefetch): their weights
# stream from DRAM in the model and the first tile of each panel waited for them. Zen 5, 1 thread, core 0,
# per-call minima in the dense ResNet-50, two interleaved runs (7 rounds): 3x3 512 at 7x7 1.145-1.171x,
# 3x3 512 s2 14->7 1.099x / 1.114x, 3x3 256 s2 28->14 1.072x / 1.030x; whole model 1.033x / 1.023x per
# round. Not taken: 1x1s with a residual at 14x14 (256->1024: 1.00-1.03x), the 7x7 1x1s (0.92-1.02x), 1x1s
# at 28x28 / 56x56 (0.92-0.98x), 1024->2048 s2 (0.87x).
PREFETCH_WEIGHT_PIXELS = 196
# ... except the smallest images, whose weights are read by so few pixels that the layer is a stream of weights from
# DRAM (VGG-16 CIFAR's 512-channel 3x3s: 9.4 MB a layer, ~60 MB in the model, past the 32 MB L3): at most
# NO_PREFETCH_WEIGHT_PIXELS output pixels (2x2) no prefetch (the hardware's sequential prefetch streams them), at most
# L1_PREFETCH_WEIGHT_PIXELS (4x4) into L1 (locality 3) instead of L2. Zen 5, 1 thread, core 0, per-call minima in the
# dense VGG-16 CIFAR, interleaved (9 rounds, two runs): 512->512 2x2 (x3) 0.32-0.37 -> 0.25-0.28 ms (1.24-1.36x; 19-22
# -> 26-28% of 268 GFLOP/s, 9.4 MB in 0.26 ms = 36 GB/s: the weight stream is the bound, not the FMAs), 512->512 4x4
# (x2) 0.49-0.54 -> 0.43-0.47 ms (1.13-1.17x, 57 -> 61-66%), 256->512 4x4 1.10-1.15x. Not taken: L1 at 2x2 (1.07-1.12x),
# no prefetch at 4x4 (0.98-1.04x), L1 at 8x8 (CIFAR's 256 channels 1.02x) and at ResNet-50's 7x7 / 14x14 s2 (1.00-1.04x),
# 16-lane tiles at 4x4 / 2x2 (0.94-1.03x), the 16-lane weight stream there (0.86-0.98x).
NO_PREFETCH_WEIGHT_PIXELS = 4
L1_PREFETCH_WEIGHT_PIXELS = 16
# On AVX-512, direct 1x1 convs with at most STREAM_WEIGHT_PIXELS output pixels (14x14) and at least
# STREAM_WEIGHT_CHANNELS input channels stream their next weight panel into L2 inside the reduction
# (DirectConvSpec.weight_stream = STREAM_WEIGHT_LINES prefetches per channel step): their weights (1-4 MB a layer)
# come from DRAM in the model, a 32 KB panel in a burst under its first tile (ResNet-50's 512->2048 + residual at
# 7x7 at 69-70% of the 268 GFLOP/s peak; 86% with the weights in L2). Zen 5, 1 thread, core 0, per-call minima in
# the dense ResNet-50, interleaved (7 rounds, three runs): 512->2048 + residual at 7x7 (x3) 0.550-0.582 -> 0.434-0.477
# ms (1.20-1.27x, 65-70 -> 81-88% of peak), 2048->512 at 7x7 (x2) 1.21-1.25x, 1024->2048 s2 1.22-1.24x, 256->1024 +
# residual at 14x14 (x6) 1.05-1.07x, 1024->256 at 14x14 (x5) 1.05-1.08x, 512->1024 s2 1.03-1.04x. Not taken: 1x1s at
# 28x28 with >= 128 channels (1.00-1.02x), the 8-lane KxK convs in place of weight_prefetch (3x3 512 at 7x7
# 0.55-0.61x with split accumulators, 0.84-0.90x with their 768-byte tile on the stack as it is).
STREAM_WEIGHT_PIXELS = 196
# (256 until session 18; 160 takes MobileNetV2's 160->960 at 7x7 (x3): per-call minima in the dense MobileNetV2,
# interleaved, two runs of 11 rounds: 0.078-0.083 -> 0.069-0.072 ms, 1.09-1.16x, 65 -> 78-79% of 268 GFLOP/s; its
# 192->64 at 14x14 1.02-1.03x.)
STREAM_WEIGHT_CHANNELS = 160
STREAM_WEIGHT_LINES = 2
# On AVX-512, 1x1 convs on the GEMM with at most this many input channels (a short reduction) take
# SHORT_REDUCTION_VECTORS pixel vectors a tile (6 filters x 4 vectors of 16 lanes) instead of 2, when they
# have at least four vectors of filters (6-filter tiles would pad 16 filters to 18).
SHORT_REDUCTION_CHANNELS = 64
SHORT_REDUCTION_VECTORS = 4
# ... and from this many output pixels (56x56) SHORT_REDUCTION_WIDE_TILE (8 filters x 3 vectors) instead.
SHORT_REDUCTION_WIDE_PIXELS = 3136
SHORT_REDUCTION_WIDE_TILE = (8, 3)
# On AVX2, stride-1 KxK convs with at most this many input channels x taps (an RGB image's 3x3: 27) run on the GEMM.
FEW_TAPS_REDUCTION = 32
# On AVX-512, such a conv whose output reaches this many bytes (twice the 1 MB L2: it is written to L3)
# takes the GEMM tile of STREAMED_OUTPUT_TILE (filters, pixel vectors of 16 lanes) instead of 14 x 2:
# each filter's output is written as runs of 7 whole lines rather than of 2.
STREAMED_OUTPUT_BYTES = 2 * 1024 * 1024
STREAMED_OUTPUT_TILE = (3, 7)
# On AVX2, stride-1 1x1 convs with at most this many output pixels (7x7, 8x8) run on the direct
# kernel, with filter-block weights of POINTWISE_WEIGHT_PANEL bytes per reduction block (a quarter
# of L1: the 6 pixels' input lines, one per channel, need the rest).
SMALL_POINTWISE_PIXELS = 64
POINTWISE_WEIGHT_PANEL = 8192
# On AVX2, stride-1 1x1 convs with at most this many filters, in whole direct-kernel filter blocks
# (16 or 24), also take the direct kernel (MobileNetV2's projections: 384->64, 192->32, 144->24 ...).
FEW_POINTWISE_FILTERS = 64
# patdnn tune measures the GEMM in both loop orders (DenseConvSpec.filters_outer) for layers with
# at least this many bytes of weights: a Zen 3 L2, a quarter of the rule's threshold.
BOTH_ORDERS_WEIGHT_BYTES = FILTERS_OUTER_WEIGHT_BYTES // 4


def _is_dense_conv(conv: relax.Call, weight: relax.Expr) -> bool:
    return nchw_conv_shapes(conv, weight) is not None and int(conv.attrs.groups) == 1


class DenseConvRewriter:
    """Rewrite dense conv2d chains into packed-GEMM or direct-conv ``call_tir``s (the pass is
    :data:`DenseConvRewrite`; this undecorated class is the base of passes that take some of the
    same chains for other kernels, e.g. ``SparsePointwiseRewriter``).

    ``registers`` and ``lanes`` are the target's vector registers and fp32 lanes
    (:func:`tvm_patdnn.targets.vector_registers`, :func:`~tvm_patdnn.targets.vector_lanes`);
    ``vectors`` (pixel vectors per GEMM register tile), ``pack_panel`` (copy each input panel
    before the filters sweep it; strided convs always do), ``filters_outer`` (the GEMM's loop
    order where it packs panels; None: the rule's, :attr:`DenseConvSpec.default_filters_outer`),
    ``prefetch_output`` (the GEMM prefetches its epilogue's lines, :attr:`DenseConvSpec.prefetch_output`;
    None: the rule's, on 16 lanes only for epilogues that read a residual, always on fewer),
    ``narrow_tail`` (the GEMM's last pixel tile one vector wide when that covers it, :attr:`DenseConvSpec.tail`)
    and ``kernel`` (``"auto"``: the rule of :meth:`kernel_for`; ``"gemm"`` or ``"direct"``: that
    kernel wherever it applies) exist to measure what they are worth. ``choices``
    (:class:`~.kernel_choice.KernelChoices`, from ``patdnn tune``'s records) overrides the rules
    per layer with the kernel measured fastest, and collects the layers met, for the tuner.
    """

    KERNELS = ("auto", "gemm", "direct")

    def __init__(self, registers: int = 16, lanes: int = 8, vectors: int = 2, pack_panel: bool = True,
                 kernel: str = "auto", choices: KernelChoices | None = None, filters_outer: bool | None = None,
                 prefetch_output: bool | None = None, narrow_tail: bool = True):
        if kernel not in self.KERNELS:
            raise ValueError(f"kernel {kernel!r} is not one of {self.KERNELS}")
        self.registers, self.lanes, self.vectors, self.pack_panel = registers, lanes, vectors, pack_panel
        self.filters_outer, self.prefetch_output, self.narrow_tail = filters_outer, prefetch_output, narrow_tail
        self.kernel, self.choices = kernel, choices
        self.data, self.weight, self.bias = wildcard(), is_const(), is_const()
        self.residual = ~is_const()  # a constant there is a bias
        self._chain("relax.nn.conv2d")

    def _chain(self, op: str) -> None:
        """The patterns of ``op(data, constant weight)`` (+ bias)(+ residual add)(+ ReLU / clip);
        ``self.conv`` is the ``op`` call whatever ``op`` is (subclasses chain other ops)."""
        self.conv = is_op(op)(self.data, self.weight)
        self.biased = is_op("relax.add")(self.conv, self.bias) | is_op("relax.add")(self.bias, self.conv)
        pre = self.biased | self.conv
        self.added = is_op("relax.add")(pre, self.residual) | is_op("relax.add")(self.residual, pre)
        body = self.added | pre
        self.relu = is_op("relax.nn.relu")(body)
        self.clip = is_op("relax.clip")(body, wildcard(), wildcard())
        self.pattern = self.relu | self.clip | body

    def _activation(self, expr: relax.Call, matches) -> dict | None:
        """The kernel spec's activation fields (``activation``, ``clip_min``, ``clip_max``) of the
        chain's end; None for a clip with non-constant bounds."""
        if self.relu in matches:
            return dict(activation="relu", clip_min=0.0, clip_max=0.0)
        if self.clip in matches:
            bounds = float_value(expr.args[1]), float_value(expr.args[2])
            return None if None in bounds else dict(activation="clip", clip_min=bounds[0], clip_max=bounds[1])
        return dict(activation="none", clip_min=0.0, clip_max=0.0)

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        self._builder = relax.BlockBuilder(mod)
        self._kernels: dict[KernelSpec, relax.GlobalVar] = {}
        self._packed: dict[tuple, relax.Expr] = {}
        for gvar, func in list(mod.functions_items()):
            if not isinstance(func, relax.Function) or func.attrs and func.attrs.get("Primitive", 0):
                continue
            self._fusions = self._plan(func)
            self._tentative: dict[relax.Call, relax.Call] = {}
            self._builder.update_func(gvar, rewrite_call(self.pattern, self._rewrite, func))
            direct = {kernel_gvar: kernel for kernel, kernel_gvar in self._kernels.items()
                      if isinstance(kernel, DirectConvSpec)}
            if direct:  # NCHW16c between 16-lane direct kernels (blocked_layout)
                apply_blocked_layout(self._builder, gvar, direct, self._kernel, self._tentative)
        return relax.transform.DeadCodeElimination()(self._builder.get())

    def _plan(self, func: relax.Function) -> dict[relax.Expr, tuple]:
        """The chain each dense conv fuses: the largest match whose inner values nothing else uses
        (fusing a value that has other users would compute it twice), chosen from the outputs
        back. The matcher looks through a variable only to a value nothing else reads, so such a
        value is never an inner one, and an add whose first operand is a conv chain with other
        users (MobileNetV2's ``x + block(x)``, ``x`` the previous projection) binds its second
        operand as the conv side. ``rewrite_call`` offers every sub-chain and rounds until nothing
        changes, so it rewrites exactly these roots."""
        var2val = self._var2val = relax.analysis.get_var2val(func)
        single_use = single_use_values(func)
        fusable = tvm.runtime.convert({var: value for var, value in var2val.items() if value in single_use})
        bindings = [b for block in getattr(func.body, "blocks", []) for b in block.bindings]
        fusions: dict[relax.Expr, tuple] = {}
        taken: set[relax.Expr] = set()
        for binding in reversed(bindings):
            root = binding.value
            matches = self.pattern.extract_matched_expr(root, fusable) if root not in taken else None
            fusion = self._fusion(root, matches) if matches else None
            if fusion is None:
                continue
            fusions[root] = fusion
            taken.update(matches[p] for p in (self.conv, self.biased, self.added) if p in matches)
            if self.choices is not None:
                self.choices.saw(fusion[1])
        return fusions

    def _fusion(self, expr: relax.Call, matches) -> tuple | None:
        """(conv, spec, bias, residual) of a match the kernel can take, else None."""
        conv, weight = matches[self.conv], matches[self.weight]
        if not _is_dense_conv(conv, weight):
            return None
        out_shape = static_shape(conv)
        bias = None
        if self.bias in matches:
            bias = per_channel_bias(matches[self.bias], out_shape[1])
            if bias is None:
                return None  # not a per-channel bias: a smaller match takes the conv
        residual = None
        if self.added in matches:  # the add's other operand, as the variable (the match is its value)
            pre = matches[self.biased] if self.biased in matches else conv
            operands = matches[self.added].args
            first = self._var2val.get(operands[0])
            residual = operands[1] if first is not None and first.same_as(pre) else operands[0]
        if residual is not None and (static_shape(residual) != out_shape or residual.ty.dtype != "float32"):
            return None  # a broadcasting add
        activation = self._activation(expr, matches)
        if activation is None:
            return None
        n, c, h, w = static_shape(conv.args[0])
        spec = self.gemm_tile(DenseConvSpec(
            batch=n, in_channels=c, height=h, width=w, out_channels=out_shape[1], kernel=static_shape(weight)[2:],
            strides=tuple(int(s) for s in conv.attrs.strides), padding=tuple(int(p) for p in conv.attrs.padding),
            has_bias=bias is not None, residual=residual is not None, lanes=1, filter_tile=1, vectors=1, **activation,
        ))
        if self.kernel_for(spec) is None:
            return None
        return conv, spec, bias, residual

    def gemm_tile(self, layer: DenseConvSpec) -> DenseConvSpec:
        """The GEMM spec of ``layer`` (its layer fields; whatever tile it has): the register tile of
        :meth:`gemm_vectors`, with this pass's ``vectors``, ``pack_panel``, ``filters_outer``,
        ``prefetch_output`` and ``narrow_tail``."""
        vectors = self.vectors
        short = (self.lanes >= 16 and vectors == 2 and layer.kernel == (1, 1)
                 and layer.in_channels <= SHORT_REDUCTION_CHANNELS and layer.out_channels >= 4 * self.lanes)
        if short:
            vectors = SHORT_REDUCTION_VECTORS
        spec = DenseConvSpec.for_target(*self.gemm_vectors(), vectors, **layer.layer_fields())
        if short and spec.lanes == self.lanes and spec.pixels >= SHORT_REDUCTION_WIDE_PIXELS:
            filters, pixel_vectors = SHORT_REDUCTION_WIDE_TILE
            spec = dataclasses.replace(spec, filter_tile=filters, vectors=pixel_vectors)
        if self.lanes >= 16:  # the filter tiles balanced: 16 filters as 2 x 8, not 14 + 2 in a 2 x 14 tile
            tiles = ceil_div(spec.out_channels, spec.filter_tile)
            spec = dataclasses.replace(spec, filter_tile=ceil_div(spec.out_channels, tiles))
        filters, pixel_vectors = STREAMED_OUTPUT_TILE
        if (self.lanes >= 16 and vectors == 2 and spec.lanes == self.lanes and layer.kernel != (1, 1)
                and layer.taps <= FEW_TAPS_REDUCTION and spec.pixels >= pixel_vectors * self.lanes
                and 4 * spec.batch * spec.out_channels * spec.pixels >= STREAMED_OUTPUT_BYTES):
            spec = dataclasses.replace(spec, filter_tile=filters, vectors=pixel_vectors)
        if not self.pack_panel and spec.pointwise:
            spec = dataclasses.replace(spec, pack_panel=False, filters_outer=False)
        elif self.lanes >= 16 and spec.pointwise and spec.pixels >= WIDE_POINTWISE_PIXELS and not self.filters_outer:
            spec = dataclasses.replace(spec, pack_panel=False, filters_outer=False)  # reads the input in place
        elif self.filters_outer is not None:
            spec = dataclasses.replace(spec, filters_outer=self.filters_outer)
        prefetch = self.prefetch_output
        if prefetch is None:  # 16 lanes: only a residual's lines (module docstring)
            prefetch = self.lanes < 16 or spec.residual
        if not prefetch:
            spec = dataclasses.replace(spec, prefetch_output=False)
        if not self.narrow_tail:
            spec = dataclasses.replace(spec, narrow_tail=False)
        return spec

    def gemm_vectors(self) -> tuple[int, int]:
        """(registers, lanes) the GEMM's register tile is sized from: the target's (AVX-512: 14 filters x
        2 vectors of 16 lanes, see the module docstring)."""
        return self.registers, self.lanes

    def direct_vectors(self, spec: DenseConvSpec) -> tuple[int, int]:
        """(registers, lanes) the direct kernel's register tile is sized from: the target's, except for
        KxK convs on AVX-512, whose tile is 6 pixels x 4 vectors of 8 lanes (see the module docstring)."""
        return (self.registers, 8) if self.lanes >= 16 and spec.kernel != (1, 1) else (self.registers, self.lanes)

    def kernel_for(self, spec: DenseConvSpec) -> str | None:
        """``"gemm"`` or ``"direct"``: the kernel that runs this conv (the rule in the module
        docstring, unless ``kernel`` forces one), None for the legalized conv2d."""
        if spec.kernel == (1, 1):
            if self.kernel != "auto":
                return self.kernel
            if self.lanes >= 16 and spec.in_channels > DIRECT_POINTWISE_CHANNELS:
                return "direct"
            few_filters = spec.out_channels <= FEW_POINTWISE_FILTERS and self._direct_pads_no_filter(spec)
            small_image = spec.pixels <= SMALL_POINTWISE_PIXELS
            return "direct" if self.lanes == 8 and spec.pointwise and (small_image or few_filters) else "gemm"
        if self.kernel == "gemm":
            # fewer than four vectors of 8 filters (4 on NEON; 8 on AVX-512 too, as before its GEMM took
            # 16-lane tiles): the window copy would cost more than half the multiply-adds it feeds
            return "gemm" if spec.out_channels >= 4 * min(8, self.lanes) else None
        if (self.kernel == "auto" and self.lanes in (8, 16) and spec.strides == (1, 1)
                and spec.out_channels >= 4 * self.lanes
                and spec.in_channels * spec.kernel[0] * spec.kernel[1] <= FEW_TAPS_REDUCTION):
            return "gemm"
        return "direct" if spec.out_channels >= self.lanes or self.kernel == "direct" else None

    def _direct_pads_no_filter(self, spec: DenseConvSpec) -> bool:
        _pixels, vectors = direct_register_tile(*self.direct_vectors(spec), spec.out_channels, spec.pixels)
        return spec.out_channels % (vectors * self.lanes) == 0

    def default_kernel(self, spec: DenseConvSpec) -> KernelSpec:
        """The kernel spec the rules give a conv :meth:`kernel_for` takes."""
        if self.kernel_for(spec) == "direct":
            kernel = DirectConvSpec.for_target(spec, *self.direct_vectors(spec))
            if self.lanes >= 16 and spec.kernel != (1, 1) and spec.in_channels <= STEM_CHANNELS:
                kernel = dataclasses.replace(DirectConvSpec.for_target(spec, self.registers, self.lanes),
                                             vectors=min(STEM_VECTORS, ceil_div(spec.out_channels, self.lanes)))
            if self.lanes == 8 and spec.kernel == (1, 1) and spec.pixels <= SMALL_POINTWISE_PIXELS:
                kernel = dataclasses.replace(kernel, weight_panel=POINTWISE_WEIGHT_PANEL)
            if (self.lanes >= 16 and spec.kernel == (1, 1) and spec.pixels >= WIDE_POINTWISE_PIXELS
                    and spec.out_channels >= 4 * self.lanes):
                kernel = dataclasses.replace(kernel, pixel_tile=WIDE_POINTWISE_TILE, vectors=min(2, kernel.vectors))
            if (self.lanes >= 16 and spec.kernel == (1, 1) and WIDE_POINTWISE_TILE <= spec.pixels
                    and spec.pixels <= SMALL_WIDE_POINTWISE_PIXELS and spec.in_channels >= SMALL_WIDE_POINTWISE_CHANNELS
                    and spec.out_channels <= SMALL_WIDE_POINTWISE_FILTERS):
                kernel = dataclasses.replace(kernel, pixel_tile=WIDE_POINTWISE_TILE, vectors=min(2, kernel.vectors))
            if (self.lanes >= 16 and spec.kernel == (1, 1) and spec.pixels == NARROW_POINTWISE_PIXELS
                    and spec.in_channels <= NARROW_POINTWISE_CHANNELS and spec.out_channels <= NARROW_POINTWISE_FILTERS):
                kernel = dataclasses.replace(kernel, pixel_tile=NARROW_POINTWISE_TILE, vectors=min(2, kernel.vectors))
            if (self.lanes >= 16 and spec.kernel != (1, 1) and spec.pixels <= PREFETCH_WEIGHT_PIXELS
                    and spec.in_channels > STEM_CHANNELS):
                level = 2 if spec.pixels > L1_PREFETCH_WEIGHT_PIXELS else 3
                kernel = dataclasses.replace(kernel, weight_prefetch=0 if spec.pixels <= NO_PREFETCH_WEIGHT_PIXELS
                                             else level)
            if (kernel.lanes >= 16 and spec.kernel == (1, 1) and spec.pixels <= STREAM_WEIGHT_PIXELS
                    and spec.in_channels >= STREAM_WEIGHT_CHANNELS):
                kernel = dataclasses.replace(kernel, weight_stream=STREAM_WEIGHT_LINES)
            return kernel
        return self.gemm_tile(spec)

    def kernel_spec(self, spec: DenseConvSpec) -> KernelSpec:
        """The recorded choice for this layer if there is one, else :meth:`default_kernel`."""
        chosen = self.choices.spec(spec, self.registers) if self.choices is not None else None
        return chosen if isinstance(chosen, (DenseConvSpec, DirectConvSpec)) else self.default_kernel(spec)

    def candidates(self, spec: DenseConvSpec) -> list[KernelSpec]:
        """What ``patdnn tune`` measures for a conv :meth:`kernel_for` takes: the default first, then
        the GEMM with 1-3 pixel vectors, in both loop orders when the weights reach
        ``BOTH_ORDERS_WEIGHT_BYTES`` (and, for pointwise convs, without the panel copy) and the
        direct kernel with 4-12 pixel tiles, both loop orders and weight panels of a quarter and a
        half of L1 (when they split the reduction further), each on the target's vectors and
        on AVX-512 also on 8-lane ones. Only kernels that apply: the GEMM for KxK convs with at least
        four vectors of filters, the direct kernel with at least a vector of them."""
        found = [self.default_kernel(spec)]
        shape = spec.layer_fields()
        gemm = spec.kernel == (1, 1) or spec.out_channels >= 4 * self.lanes
        direct = spec.out_channels >= min(8, self.lanes)
        wide = self.lanes >= 16
        for registers, lanes in [(self.registers, self.lanes)] + [(16, 8)] * wide if gemm else []:
            tiles = [DenseConvSpec.for_target(registers, lanes, count, **shape) for count in (1, 2, 3)]
            if spec.weight_bytes >= BOTH_ORDERS_WEIGHT_BYTES:
                tiles += [dataclasses.replace(tile, filters_outer=not tile.filters_outer) for tile in tiles]
            found += tiles
            if spec.pointwise:
                found.append(dataclasses.replace(DenseConvSpec.for_target(registers, lanes, **shape), pack_panel=False,
                                                 filters_outer=False))
        for registers, lanes in [(self.registers, self.lanes)] + [(self.registers, 8)] * wide if direct else []:
            base = DirectConvSpec.for_target(spec, registers, lanes)
            found.append(dataclasses.replace(base, filters_inner=not base.filters_inner))
            for panel in (base.weight_panel // 4, base.weight_panel // 2):  # more, smaller reduction blocks
                smaller = dataclasses.replace(base, weight_panel=panel)
                if smaller.channel_block < base.channel_block:
                    found.append(smaller)
            filter_vectors = ceil_div(spec.out_channels, lanes)
            for pixels in (4, 6, 8, 12):
                if pixels <= spec.pixels:
                    count = min(filter_vectors, max(1, (registers - 1) // (pixels + 1) - (lanes < 8)))
                    found.append(dataclasses.replace(base, pixel_tile=pixels, vectors=count))
        return list(dict.fromkeys(found))

    def _rewrite(self, expr: relax.Expr, matches) -> relax.Expr:
        if expr not in self._fusions:
            return expr
        conv, spec, bias, residual = self._fusions[expr]
        kernel = self.kernel_spec(spec)
        if kernel == self.default_kernel(spec) and self._blocked_direct(spec):
            call = self._call(conv, DirectConvSpec.for_target(spec, self.registers, self.lanes), bias, residual)
            self._tentative[call] = self._call(conv, kernel, bias, residual)  # the GEMM, if it stays NCHW
            return call
        return self._call(conv, kernel, bias, residual)

    def _blocked_direct(self, spec: DenseConvSpec) -> bool:
        """Whether a 1x1 + residual the rules put on the GEMM runs the direct kernel instead when its output can be
        blocked (``BLOCKED_DIRECT_CHANNELS``; decided by :func:`~.blocked_layout.apply_blocked_layout`)."""
        return (self.lanes in BLOCKED_LAYOUT_LANES and self.kernel == "auto" and spec.pointwise and spec.residual
                and self.kernel_for(spec) == "gemm" and spec.in_channels > BLOCKED_DIRECT_CHANNELS
                and spec.out_channels % self.lanes == 0)

    def _call(self, conv: relax.Call, kernel: KernelSpec, bias, residual) -> relax.Call:
        """The ``call_tir`` of ``kernel`` on the conv's input, its packed weight and bias, and the residual."""
        pack, layout, pack_bias = pack_for_kernel(kernel)
        packed = self._packed_weight(conv.args[1], pack, layout)
        if bias is not None and pack_bias is not None:
            bias = pack_bias(bias)
        args = [conv.args[0], packed]
        args += [relax.const(bias)] if bias is not None else []
        args += [residual] if residual is not None else []
        return relax.call_tir(self._kernel(kernel), args, relax.TensorType(static_shape(conv), "float32"))

    def _kernel(self, kernel: KernelSpec) -> relax.GlobalVar:
        """The module's function of ``kernel``, added on first use."""
        if kernel not in self._kernels:
            func, name = kernel_function(kernel)
            self._kernels[kernel] = add_kernel(self._builder, func, name)
        return self._kernels[kernel]

    def _packed_weight(self, weight: relax.Expr, pack, layout: tuple) -> relax.Expr:
        """The weight packed once per kernel layout, shared by the convs that use it."""
        key = (weight, layout)
        if key not in self._packed:
            self._packed[key] = relax.const(pack(constant_array(weight)))
        return self._packed[key]


DenseConvRewrite = tvm.transform.module_pass(DenseConvRewriter, opt_level=0, name="DenseConvRewrite")
