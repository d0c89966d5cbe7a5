"""An inverted residual block (MobileNetV2's): the expansion 1x1 conv, the depthwise conv that reads
it and, optionally, the projection 1x1 conv (+ residual) after it, as one kernel whose expanded
(and depthwise) tensors never go to memory.

MobileNetV2's blocks widen C channels to E = 6C with a 1x1 conv (+ bias, ReLU6), run a depthwise
3x3 over the E channels, then project them back with a 1x1 conv. Unfused, the expansion writes
E x H x W floats and the depthwise conv reads them back: 4.8 MB each way for 16->96 at 112x112,
more than any cache of these CPUs holds. Here the depthwise conv consumes the expansion row by row:

* per (image, group of expanded channels, band of output rows) task, padded rows of the expansion
  are computed into a ring of rows per channel (it stays in L1/L2), ``rows x stride`` new rows per
  block of ``rows`` output rows, so each expanded element is computed once (a band recomputes the
  ``KH - stride`` rows above it) and read from cache by the ``KH x KW`` taps;
* a padded input row is first copied for all C input channels into a panel laid out as the
  depthwise plane's row (:func:`~.depthwise_conv.copy_padded_row`: stride ``s`` split into ``s``
  phases, padding columns zero), so the expansion, a 1x1 conv, computes the ring row in that order
  with the GEMM kernel's register tile (``MR`` filters x ``NR`` vectors of ``lanes`` positions,
  weights packed ``[E / MR][C][MR]``) and the depthwise taps are contiguous vectors even at
  stride 2; the padding positions are zeroed after the row (the expansion gives them its
  activated bias), and rows of the padding are zero;
* the depthwise conv of the block follows, ``rows`` row vectors a tile, bias and ReLU / clip
  applied to the accumulators; without a projection they are stored to NCHW; with one, into a
  block buffer ``[E][rows x OW]`` that the projection then reads as its panel (GEMM tile again,
  over the block's ``rows x OW`` output pixels, which are contiguous in NCHW), adding its bias and
  the residual before the one store. The projection sums over every expanded channel, so its tasks
  take all of them (one group) and are bands of output rows;
* a block without expansion (MobileNetV2's first: depthwise, then projection) fills the ring with
  copies of the input rows instead.

The function is written directly as (scheduled) TIR, so no schedule rule or tuning touches it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..arith import ceil_div, round_up
from .activation import activate
from .dense_conv import DenseConvSpec, _store_output, register_tile, tile_vectors
from .depthwise_conv import DepthwiseConvSpec, copy_padded_row, padding_columns

__all__ = ["INVERTED_RESIDUAL_ATTR", "InvertedResidualSpec", "inverted_residual_primfunc"]

# PrimFunc attribute carrying the kernel's description (benchmarks and tests look for it).
INVERTED_RESIDUAL_ATTR = "patdnn.inverted_residual"
# Without a projection, a group's expansion weights (``group_tiles * MR * C`` floats) stay within this
# many bytes (in L1 while the group's rows are computed) and its ring within RING_BYTES (in L2).
GROUP_WEIGHT_BYTES = 16384
RING_BYTES = 262144


@dataclass(frozen=True)
class InvertedResidualSpec:
    """The expansion (a 1x1 stride-1 unpadded ``DenseConvSpec`` without residual, its tile fields the
    register tile; None: the depthwise conv reads the input), the depthwise conv of its output
    (``DepthwiseConvSpec``: ``lanes`` and ``vectors`` its row vectors, ``rows`` the output rows of a
    block), optionally the projection of the depthwise output (a 1x1 ``DenseConvSpec``, residual
    allowed), the expansion filter tiles of a task and the bands of output rows of the tasks."""

    expansion: DenseConvSpec | None
    depthwise: DepthwiseConvSpec
    projection: DenseConvSpec | None = None
    group_tiles: int = 1
    bands: int = 1

    def __post_init__(self):
        ex, dw, pr = self.expansion, self.depthwise, self.projection
        if dw.reduction != "conv" or dw.kernel[0] < dw.strides[0]:
            raise ValueError("the depthwise conv must be a conv whose rows overlap or touch (kernel >= stride)")
        if ex is None and pr is None:
            raise ValueError("a block without expansion needs a projection (else it is the depthwise kernel's)")
        if ex is not None:
            if not ex.pointwise or ex.residual:
                raise ValueError("the expansion must be a 1x1 stride-1 unpadded conv without residual")
            if (ex.batch, ex.out_channels, ex.height, ex.width) != (dw.batch, dw.channels, dw.height, dw.width):
                raise ValueError("the depthwise conv must read the expansion's output")
            first, last = _expanded_positions(dw, ex.pixel_tile)
            if ex.pixel_tile > last - first:
                raise ValueError(f"a {ex.pixel_tile}-position tile exceeds the {last - first} positions of a ring row")
        if pr is not None:
            if not pr.pointwise or (pr.batch, pr.in_channels, pr.height, pr.width) != (
                    dw.batch, dw.channels, dw.out_height, dw.out_width):
                raise ValueError("the projection must be a 1x1 stride-1 unpadded conv of the depthwise output")
            if pr.pixel_tile > self.block_pixels:
                raise ValueError(f"a {pr.pixel_tile}-pixel tile exceeds the {self.block_pixels} pixels of a block")
            if self.groups != 1:
                raise ValueError("with a projection, a task takes every expanded channel (one group)")

    @classmethod
    def for_target(cls, registers: int, lanes: int, expansion: dict | None, depthwise: dict,
                   projection: dict | None = None, threads: int = 1) -> InvertedResidualSpec:
        """The spec for a target with ``registers`` vectors of ``lanes`` and ``threads`` cores:
        ``expansion``, ``depthwise`` and ``projection`` are the convs' fields (DenseConvSpec's without
        the tile, DepthwiseConvSpec's without lanes, rows and vectors). Both 1x1 convs take the GEMM's
        tile over the positions they compute; the depthwise conv row vectors and blocks of 2 output
        rows at stride 1, 1 at stride 2 (measured on Zen 3, 1 thread: within noise of 4 rows, the
        ring smaller), with a projection at least the rows of two vectors of pixels (a 14-pixel
        block made the projection a 13 x 1 tile: 32->192->64 s2 at 28x28 0.81 -> 1.01x the separate
        kernels). Without a projection, a group takes as many filter tiles as fit
        ``GROUP_WEIGHT_BYTES`` of weights and ``RING_BYTES`` of ring, at most half of them (two tasks
        for two cores), one band; with one, one group and a band per core."""
        dw = DepthwiseConvSpec.for_target(registers, lanes, **depthwise)
        rows = 2 if dw.strides[0] == 1 else 1
        if projection is not None:  # the projection's panel: at least two vectors of pixels
            rows = max(rows, ceil_div(2 * lanes, dw.out_width))
        dw = dataclasses.replace(dw, rows=min(dw.out_height, rows))
        first, last = _expanded_positions(dw, 2 * lanes)
        filters, vectors, tile_lanes = register_tile(registers, lanes, last - first)
        ex = DenseConvSpec(**expansion, filter_tile=filters, vectors=vectors, lanes=tile_lanes) if expansion else None
        if projection is not None:
            pr = DenseConvSpec(**projection, **dict(zip(("filter_tile", "vectors", "lanes"),
                                                         register_tile(registers, lanes, dw.rows * dw.out_width))))
            bands = max(1, min(threads, dw.out_height // dw.rows))
            return cls(ex, dw, pr, ex.filter_tiles if ex else 1, bands)
        probe = cls(ex, dw)
        ring = probe.ring_rows * probe.row_width * filters * 4
        per_tile = filters * ex.in_channels * 4
        group = max(1, min(GROUP_WEIGHT_BYTES // per_tile, RING_BYTES // ring, ceil_div(ex.filter_tiles, 2)))
        return cls(ex, dw, None, group)

    @property
    def row_width(self) -> int:
        """Positions of a ring row (and of the input panel's rows): the depthwise plane's padded row."""
        return self.depthwise.strides[1] * self.depthwise.phase_width

    @property
    def ring_rows(self) -> int:
        """Expanded rows kept per channel: what a block of ``rows`` depthwise output rows reads."""
        dw = self.depthwise
        return dw.kernel[0] + dw.strides[0] * (dw.rows - 1)

    @property
    def block_pixels(self) -> int:
        """Output pixels of a block of depthwise rows (the projection's panel width)."""
        return self.depthwise.rows * self.depthwise.out_width

    @property
    def groups(self) -> int:
        return ceil_div(self.expansion.filter_tiles, self.group_tiles) if self.expansion else 1

    @property
    def group_channels(self) -> int:
        return self.group_tiles * self.expansion.filter_tile if self.expansion else self.depthwise.channels

    @property
    def band_rows(self) -> int:
        """Output rows of a band (the last band may have fewer), whole blocks."""
        return round_up(ceil_div(self.depthwise.out_height, self.bands), self.depthwise.rows)

    @property
    def band_count(self) -> int:
        return ceil_div(self.depthwise.out_height, self.band_rows)

    @property
    def flops(self) -> int:
        return sum(conv.flops for conv in (self.expansion, self.depthwise, self.projection) if conv is not None)


def _expanded_positions(dw: DepthwiseConvSpec, tile: int) -> tuple[int, int]:
    """The first and one past the last position of a ring row the expansion computes: those that hold
    an input column, widened within the row to ``tile`` positions when there are fewer (the padding's
    results are zeroed after the row). At 14x14 the 14 input columns of a 16-position row made a
    13 filters x 1 vector tile; the GEMM with that tile ran 64->384, 32->192 and 96->576 1.8-2.3x
    slower than with 6 x 2 (Zen 3, 1 thread, interleaved)."""
    pads = set(padding_columns(dw))
    row = dw.strides[1] * dw.phase_width
    inside = [k for k in range(row) if k not in pads]
    first, last = inside[0], inside[-1] + 1
    if last - first < tile <= row:
        first = min(first, row - tile)
        last = first + tile
    return first, last


def _gemm_tile(conv: DenseConvSpec, acc, weight, ft, channels: int, start: Callable, panel_at: Callable,
               finish: Callable) -> None:
    """One ``MR x NR * lanes`` register tile of a 1x1 conv: accumulators from ``start(i)``, plus
    ``weight[ft, c, i] * panel_at(c, j)`` over the ``channels``, then ``finish(acc)``."""
    mr, nr, lanes, tp = conv.filter_tile, conv.vectors, conv.lanes, conv.pixel_tile
    tile_vectors(mr, tp, lanes, lambda i, j: T.buffer_store(acc, start(i), [i * tp + j]))
    with T.serial(0, channels) as c:
        with T.unroll(0, mr) as i:
            with T.unroll(0, nr) as jo:
                with T.vectorized(0, lanes) as ji:
                    at = i * tp + jo * lanes + ji
                    T.buffer_store(acc, acc[at] + weight[ft, c, i] * panel_at(c, jo * lanes + ji), [at])
    finish(acc)


def _expand_row(spec: InvertedResidualSpec, acc, data, weight, bias, panel, ring, n, g, y) -> None:
    """Padded row ``y`` of the group's expanded channels into its ring slot: zeros for a padding row,
    else the input row copied into ``panel``, then every filter tile x position tile of the row."""
    ex, dw = spec.expansion, spec.depthwise
    row, rows = spec.row_width, spec.ring_rows
    slot = tirx.floormod(y, rows)
    iy = y - dw.padding[0]
    zero = tirx.const(0.0, "float32")
    with T.If(tirx.all(iy >= 0, iy < dw.height)):
        with T.Then():
            if ex is None:  # the block's input itself (its padding zeroed once, by the task)
                with T.serial(0, dw.channels) as e:
                    copy_padded_row(dw, data, ring, n, e, iy,
                                    lambda p, q, e=e: (e * rows + slot) * row + p * dw.phase_width + q)
            else:
                mr, lanes, tp, c_ = ex.filter_tile, ex.lanes, ex.pixel_tile, ex.in_channels
                tiles = T.min(spec.group_tiles, ex.filter_tiles - g * spec.group_tiles)
                first, last = _expanded_positions(dw, tp)
                with T.serial(0, c_) as c:
                    copy_padded_row(dw, data, panel, n, c, iy, lambda p, q, c=c: c * row + p * dw.phase_width + q)
                with T.serial(0, tiles) as fl:
                    ft = g * spec.group_tiles + fl
                    with T.serial(0, ceil_div(last - first, tp)) as pt:
                        base = first + T.min(pt * tp, last - first - tp)
                        _gemm_tile(ex, acc, weight, ft, c_, lambda i: bias[ft * mr + i] if bias is not None else zero,
                                   lambda c, j: panel[c * row + base + j],
                                   lambda acc: tile_vectors(mr, tp, lanes, lambda i, j: T.buffer_store(
                                       ring, activate(acc[i * tp + j], ex),
                                       [((fl * mr + i) * rows + slot) * row + base + j])))
                    # The padding columns hold the activated bias now: the depthwise conv pads with zeros.
                    with T.serial(0, mr) as i:
                        for position in padding_columns(dw):
                            T.buffer_store(ring, zero, [((fl * mr + i) * rows + slot) * row + position])
        with T.Else():
            with T.serial(0, spec.group_channels) as e:
                with T.vectorized(0, row) as k:
                    T.buffer_store(ring, zero, [(e * rows + slot) * row + k])


def _depthwise_rows(spec: InvertedResidualSpec, acc, weight, bias, ring, store: Callable, g, oy) -> None:
    """Output rows ``oy`` to ``oy + rows - 1`` of the group's channels from the ring, a tile of
    ``rows`` row vectors at a time (input vectors shared by neighbouring rows are loaded once);
    ``store(e, r, x, value)`` writes channel ``e`` of the group, row ``oy + r``, columns from ``x``."""
    dw = spec.depthwise
    kh, kw = dw.kernel
    sy, sx = dw.strides
    q_, ring_rows, row, rows = dw.phase_width, spec.ring_rows, spec.row_width, dw.rows
    width, ow = dw.vectors * dw.lanes, dw.out_width
    first = g * spec.group_channels
    with T.serial(0, T.min(spec.group_channels, dw.channels - first)) as e:
        f = first + e
        with T.serial(0, ceil_div(ow, width)) as ct:
            x0 = T.min(ct * width, ow - width)
            tile_vectors(rows, width, dw.lanes, lambda r, j: T.buffer_store(
                acc, bias[f] if bias is not None else tirx.const(0.0, "float32"), [r * width + j]))
            with T.unroll(0, kh) as dy:
                with T.unroll(0, kw) as dx:
                    with T.unroll(0, rows) as r:
                        slot = tirx.floormod((oy + r) * sy + dy, ring_rows)
                        with T.unroll(0, dw.vectors) as jo:
                            with T.vectorized(0, dw.lanes) as ji:
                                j = jo * dw.lanes + ji
                                x = ring[(e * ring_rows + slot) * row + (dx % sx) * q_ + x0 + j + dx // sx]
                                T.buffer_store(acc, acc[r * width + j] + weight[f, 0, dy, dx] * x, [r * width + j])
            tile_vectors(rows, width, dw.lanes, lambda r, j: store(e, r, x0 + j, activate(acc[r * width + j], dw)))


def _project(spec: InvertedResidualSpec, acc, weight, bias, flat_res, flat_out, block, n, oy) -> None:
    """The projection of a block of depthwise rows (``block[e, pixel]``), plus bias and residual,
    activated, stored once to the output pixels from row ``oy`` (the GEMM kernel's epilogue)."""
    pr = spec.projection
    tp, pixels = pr.pixel_tile, spec.block_pixels
    zero = tirx.const(0.0, "float32")
    with T.serial(0, pr.filter_tiles) as ft:
        with T.serial(0, ceil_div(pixels, tp)) as pt:
            base = T.min(pt * tp, pixels - tp)
            _gemm_tile(pr, acc, weight, ft, pr.in_channels, lambda i: zero, lambda c, j: block[c * pixels + base + j],
                       lambda acc: _store_output(pr, acc, bias, flat_res, flat_out, n, ft,
                                                 oy * spec.depthwise.out_width + base))


def inverted_residual_primfunc(spec: InvertedResidualSpec) -> tirx.PrimFunc:
    """The scheduled PrimFunc of one expansion + depthwise (+ projection) block.

    Arguments, in order: data (N, C, H, W), packed expansion weight (E / MR, C, MR), [expansion
    bias padded to whole filter tiles (E / MR * MR,)], depthwise weight (E, 1, KH, KW), [depthwise
    bias (E,)], and with a projection: its packed weight (F / MR', E, MR'), [its padded bias],
    [residual (N, F, OH, OW)]; out (N, E or F, OH, OW).
    """
    ex, dw, pr = spec.expansion, spec.depthwise, spec.projection
    n_, e_ = dw.batch, dw.channels
    c_ = ex.in_channels if ex else e_
    kh, sy, rows, oh = dw.kernel[0], dw.strides[0], dw.rows, dw.out_height
    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name("main")
            data = T.arg("data", T.buffer((n_, c_, dw.height, dw.width), "float32"))
            weight = T.arg("weight", T.buffer((ex.filter_tiles, c_, ex.filter_tile), "float32")) if ex else None
            padded = ex.filter_tiles * ex.filter_tile if ex else 0
            bias = T.arg("bias", T.buffer((padded,), "float32")) if ex and ex.has_bias else None
            dw_weight = T.arg("dw_weight", T.buffer((e_, 1, *dw.kernel), "float32"))
            dw_bias = T.arg("dw_bias", T.buffer((e_,), "float32")) if dw.has_bias else None
            if pr is not None:
                pr_weight = T.arg("pr_weight", T.buffer((pr.filter_tiles, e_, pr.filter_tile), "float32"))
                pr_bias = (T.arg("pr_bias", T.buffer((pr.filter_tiles * pr.filter_tile,), "float32"))
                           if pr.has_bias else None)
                shape = (n_, pr.out_channels, oh, dw.out_width)
                residual = T.arg("residual", T.buffer(shape, "float32")) if pr.residual else None
                out = T.arg("out", T.buffer(shape, "float32"))
                T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
                flat = (n_, pr.out_channels, oh * dw.out_width)
                flat_res = T.decl_buffer(flat, "float32", data=residual.data) if residual is not None else None
                flat_out = T.decl_buffer(flat, "float32", data=out.data)
            else:
                out = T.arg("out", T.buffer((n_, e_, oh, dw.out_width), "float32"))
                T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            groups, bands, per = spec.groups, spec.band_count, spec.band_rows
            with T.sblock("root"), T.parallel(0, n_ * groups * bands) as task:
                n, g, b = task // (groups * bands), task // bands % groups, task % bands
                panel = T.decl_buffer((c_ * spec.row_width,), "float32") if ex else None
                ring = T.decl_buffer((spec.group_channels * spec.ring_rows * spec.row_width,), "float32")
                # The padding columns of the panel (or, without expansion, of the ring, which the input
                # rows are copied into) are never written by the row copies: zero them once.
                copied = panel if ex else ring
                with T.serial(0, copied.shape[0]) as k:
                    T.buffer_store(copied, tirx.const(0.0, "float32"), [k])
                # One register tile for the three stages: TIR's storage rewrite merges separate ones into
                # one buffer. In "local" scope TVM 0.27 allocates it as heap workspace once per task, and
                # LLVM still keeps each stage's accumulation in registers; "global" (a stack alloca)
                # measured no faster: dense MobileNetV2 whole, Zen 3, 1 thread, local / global 1.00x and
                # 0.98x (15 and 21 interleaved rounds, session 12).
                tiles = [conv.filter_tile * conv.pixel_tile for conv in (ex, pr) if conv is not None]
                tiles.append(dw.rows * dw.vectors * dw.lanes)
                acc = T.decl_buffer((max(tiles),), "float32", scope="local")
                expand = (acc, data, weight, bias, panel, ring, n, g)
                block = T.decl_buffer((spec.group_channels * spec.block_pixels,), "float32") if pr else None

                def run_block(oy, first_row, count) -> None:
                    """Expand padded rows ``first_row`` to ``+ count - 1``, then output rows from ``oy``."""
                    with T.serial(0, count) as k:
                        _expand_row(spec, *expand, first_row + k)
                    if pr is None:
                        def store(e, r, x, value):
                            T.buffer_store(out, value, [n, g * spec.group_channels + e, oy + r, x])
                    else:
                        def store(e, r, x, value):
                            T.buffer_store(block, value, [e * spec.block_pixels + r * dw.out_width + x])
                    _depthwise_rows(spec, acc, dw_weight, dw_bias, ring, store, g, oy)
                    if pr is not None:
                        _project(spec, acc, pr_weight, pr_bias, flat_res, flat_out, block, n, oy)

                start = b * per
                band = T.min(per, oh - start)
                if kh > sy:
                    with T.serial(0, kh - sy) as k:
                        _expand_row(spec, *expand, start * sy + k)
                # Whole blocks, each after the ``rows * sy`` expanded rows it adds; the band's last
                # rows as a block overlapping the one before, its whole window expanded again.
                with T.serial(0, band // rows) as k:
                    oy = start + k * rows
                    run_block(oy, oy * sy + kh - sy, rows * sy)
                if (oh - (bands - 1) * per) % rows:  # only the last band can end in a partial block
                    with T.If(band % rows != 0):
                        with T.Then():
                            oy = start + band - rows
                            run_block(oy, oy * sy, spec.ring_rows)
    func = builder.get().without_attr("global_symbol")  # the module names it when it is added
    tile = {"filter_tile": ex.filter_tile, "vectors": ex.vectors, "lanes": ex.lanes} if ex else {}
    return func.with_attr(INVERTED_RESIDUAL_ATTR, {**tile, "expansion": ex is not None,
                                                    "group_tiles": spec.group_tiles, "bands": spec.bands,
                                                    "projection": pr is not None, "kernel": list(dw.kernel)})
