"""Depthwise convolution (groups == channels, one filter per channel) with its bias and ReLU /
clip (ReLU6) epilogue, as scheduled TIR.

A depthwise 3x3 does 9 multiply-adds per output and reuses nothing across channels, so it is
bound by moving data, not by FMAs: the kernel is built to read each input element from memory
once and to keep every load a full contiguous vector. Per (image, channel) task:

* the channel is copied once into a padded plane in a per-task buffer (small channels are
  grouped several to a task) (a 112x112 channel
  is 51 KB: it stays in L2 while its rows are reused), stride ``s`` de-interleaved into ``s``
  phase planes per row (phase ``p`` holds padded columns ``p, p + s, ...``), so the window tap
  ``dx`` of ``lanes`` consecutive output columns is one contiguous vector even at stride 2;
* vectors run along the output row (NCHW keeps a channel's pixels contiguous; vectors along
  channels would need a blocked layout, i.e. a layout transform around every layer);
* a register tile of ``rows`` output rows x ``vectors`` row vectors: input vectors shared by
  neighbouring output rows are loaded once (LLVM merges the identical loads of the unrolled
  tile), the ``KH x KW`` weights of the channel are broadcast once per tile;
* the last row block and the last vector of a row overlap the ones before instead of running a
  tail (the overlap writes identical values), so every load and store is a full vector; a row
  narrower than a vector gets one narrower vector;
* bias and ReLU / clip are applied to the accumulators before the one store.

Max pooling is the same window walk with ``max`` for the multiply-add and ``-inf`` padding
(``reduction="max"``: no weight argument), so it reuses the kernel as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..arith import ceil_div, output_size
from .activation import activate, check_activation

__all__ = ["DepthwiseConvSpec", "DEPTHWISE_CONV_ATTR", "SlidingWindow", "copy_padded_row", "depthwise_conv_primfunc",
           "padding_columns"]

# PrimFunc attribute carrying the kernel's description (benchmarks and tests look for it).
DEPTHWISE_CONV_ATTR = "patdnn.depthwise_conv"
# Work (multiply-adds or max steps, x2) below which a layer runs on one thread: a parallel region
# costs ~2 µs of fork/join at 2 threads, more than halving a few µs of work saves. VGG-16 CIFAR's
# 2x2 pools, min µs at 1 / 2 threads (Zen 3, 2026-12-07): 64ch 32x32 (131K) parallel 6.9 / 4.7,
# serial 6.6 / 6.3; 128ch 16x16 (66K) parallel 5.1 / 3.5, serial 3.4 / 3.4; 256ch 8x8 parallel
# 1.8 / 2.8, serial 1.7 / 1.7; 512ch 4x4 and 2x2 parallel 1.0-1.5 / 2.5, serial 0.8-1.2 at both.
PARALLEL_FLOPS = 1 << 17
# At most this many accumulator vectors in a flat tile (a whole channel at once).
FLAT_VECTORS = 16
# On 16-lane targets each task (conv and max pool) takes at least this many planes (min_group).
MIN_GROUP = 8


class SlidingWindow:
    """``out_height`` / ``out_width`` of a spec of a window slid over NCHW rows (floor mode, dilation 1)
    with ``height``, ``width``, ``kernel``, ``strides`` and ``padding`` (top, left, bottom, right): the
    depthwise conv's and the max pool's."""

    @property
    def out_height(self) -> int:
        return output_size(self.height, self.padding[0], self.padding[2], self.kernel[0], self.strides[0])

    @property
    def out_width(self) -> int:
        return output_size(self.width, self.padding[1], self.padding[3], self.kernel[1], self.strides[1])


@dataclass(frozen=True)
class DepthwiseConvSpec(SlidingWindow):
    """Static description of one depthwise conv (dilation 1) and its register tile."""

    batch: int
    channels: int
    height: int
    width: int
    kernel: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (1, 1, 1, 1)  # top, left, bottom, right
    has_bias: bool = False
    activation: str = "none"  # ACTIVATIONS; "clip" uses clip_min/clip_max
    clip_min: float = 0.0
    clip_max: float = 6.0
    lanes: int = 8
    rows: int = 4  # output rows per register tile
    vectors: int = 1  # row vectors per register tile
    reduction: str = "conv"  # "conv": sum of weight x input; "max": max pooling (no weight)
    flat: bool = False  # vectors along the flattened padded plane (see _flat_channel; equal strides)
    min_group: int = 1  # planes per task at least this many (up to 1/8 of the planes): see channel_group

    def __post_init__(self):
        check_activation(self.activation)
        if self.reduction not in ("conv", "max"):
            raise ValueError(f"reduction {self.reduction!r} is not 'conv' or 'max'")
        if self.out_height < 1 or self.out_width < 1:
            raise ValueError("the kernel is larger than the padded input")
        if self.flat and (self.strides[0] != self.strides[1] or self.flat_vectors > FLAT_VECTORS):
            raise ValueError(f"a flat tile takes equal strides and at most {FLAT_VECTORS} vectors")
        if (self.lanes > self.out_width and not self.flat) or self.rows > self.out_height:
            raise ValueError(f"a {self.rows}-row tile of {self.lanes} lanes exceeds the "
                             f"{self.out_height}x{self.out_width} output")

    @classmethod
    def for_target(cls, registers: int, lanes: int, **shape) -> DepthwiseConvSpec:
        """The spec with the register tile of a target with ``registers`` vectors of ``lanes``:
        one row vector (narrower if the output row is) and 4 output rows (AVX2: 4 accumulators,
        9 broadcast weights and the loads fill its 16 registers), 8 with 32 registers, at most
        the rows there are; on 16-lane targets a task takes at least ``MIN_GROUP`` planes."""
        probe = cls(**shape, lanes=1, rows=1, vectors=1)
        rows = min(probe.out_height, 8 if registers > 16 else 4)
        min_group = MIN_GROUP if lanes >= 16 else 1
        return cls(**shape, lanes=min(lanes, probe.out_width), rows=rows, vectors=1, min_group=min_group)

    @property
    def padded_height(self) -> int:
        """Rows of the padded plane the outputs read."""
        return (self.out_height - 1) * self.strides[0] + self.kernel[0]

    @property
    def phase_width(self) -> int:
        """Columns of each phase plane: the last output column's last tap, ``(kw - 1) // s`` past it."""
        return self.out_width + (self.kernel[1] - 1) // self.strides[1]

    @property
    def channel_group(self) -> int:
        """(Image, channel) planes per parallel task: enough for a task to do at least ~16K
        multiply-adds (its plane buffer is allocated once per task: on 7x7 channels the
        allocation cost as much as the conv), and at least ``min_group`` (a task fills its plane buffer
        with the padding once, so one plane a task re-pads the whole plane per channel: on Zen 5 16-lane
        tiles, 8 planes a task ran 1.16-1.28x faster on 112x112 and 56x56 layers), at most 1/8 of the
        planes so threads stay balanced."""
        per_plane = self.out_height * self.out_width * self.kernel[0] * self.kernel[1]
        planes = self.batch * self.channels
        return max(1, min(max(ceil_div(16384, per_plane), self.min_group), planes // 8))

    @property
    def flat_vectors(self) -> int:
        """Vectors of ``lanes`` over the flattened outputs of a flat tile: ``out_height`` rows of
        ``phase_width`` (the padded row pitch; the last ``kw - 1`` columns of each are discarded)."""
        return ceil_div(self.out_height * self.phase_width, self.lanes)

    @property
    def phase_rows(self) -> int:
        """Rows of each phase plane of a strided flat tile (padded rows ``r * s + py`` of phase ``py``)."""
        return ceil_div(self.padded_height, self.strides[0])

    def flat_offset(self, dy: int, dx: int) -> int:
        """Where the tap ``dy, dx`` of flattened output 0 is in a flat tile's plane buffer: at stride 1
        the padded plane itself (``dy * phase_width + dx``); at stride ``s`` the plane is split into
        ``s x s`` phase planes (row ``y``, column ``x`` in phase ``(y % s, x % s)`` at ``(y // s, x // s)``),
        so the tap of output ``(oy, ox)`` is phase ``(dy % s, dx % s)``'s element ``(oy + dy // s,
        ox + dx // s)``: a constant offset from flattened output ``oy * phase_width + ox`` again."""
        s, q_ = self.strides[0], self.phase_width
        if s == 1:
            return dy * q_ + dx
        return ((dy % s) * s + dx % s) * self.phase_rows * q_ + (dy // s) * q_ + dx // s

    @property
    def plane_size(self) -> int:
        """Floats of the per-task plane buffer: the padded plane, and for a flat tile what its last
        vector's last tap reads past it (values only discarded lanes see)."""
        size = self.padded_height * self.strides[1] * self.phase_width
        if self.flat:
            s = self.strides[0]
            size = max(size, s * s * self.phase_rows * self.phase_width,
                       self.flat_vectors * self.lanes + max(self.flat_offset(dy, dx) for dy in range(self.kernel[0])
                                                            for dx in range(self.kernel[1])))
        return size

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.channels * self.out_height * self.out_width * self.kernel[0] * self.kernel[1]


def _padding_value(spec: DepthwiseConvSpec) -> tirx.PrimExpr:
    """What the padding holds: 0 for a conv, -inf for max pooling."""
    return tirx.const(0.0 if spec.reduction == "conv" else float("-inf"), "float32")


def _vector_loop(start: int, stop: int):
    """A vectorized loop, or a serial one when it has one element (TVM has no 1-lane vectors)."""
    return T.vectorized(start, stop) if stop - start > 1 else T.serial(start, stop)


def _pad_plane(spec: DepthwiseConvSpec, plane) -> None:
    """Fill the whole plane buffer with the padding value: its padding is never written again,
    so every channel a task copies in afterwards only writes the input's own elements."""
    if spec.flat:
        with _vector_loop(0, spec.plane_size) as k:
            T.buffer_store(plane, _padding_value(spec), [k])
        return
    row = spec.strides[1] * spec.phase_width
    with T.serial(0, spec.padded_height) as y:
        with _vector_loop(0, row) as k:
            T.buffer_store(plane, _padding_value(spec), [y * row + k])


def _copy_padded_plane(spec: DepthwiseConvSpec, data, plane, n, c) -> None:
    """``plane[y, p, q]`` = padded input row ``y``, column ``q * s + p`` of channel ``c``, in a
    plane padded by :func:`_pad_plane`: :func:`copy_padded_row` for each of the input's rows (the
    bounds are static, so only those are visited)."""
    sx, q_, top = spec.strides[1], spec.phase_width, spec.padding[0]
    first_row, last_row = min(top, spec.padded_height), min(top + spec.height, spec.padded_height)
    if last_row <= first_row:
        return
    if spec.flat and sx > 1:  # phase planes (DepthwiseConvSpec.flat_offset)
        rows = spec.phase_rows
        with T.serial(first_row, last_row) as y:
            copy_padded_row(spec, data, plane, n, c, y - top, lambda p, q: (((y % sx) * sx + p) * rows + y // sx) * q_ + q)
        return
    with T.serial(first_row, last_row) as y:
        copy_padded_row(spec, data, plane, n, c, y - top, lambda p, q: (y * sx + p) * q_ + q)


def padding_columns(spec: DepthwiseConvSpec) -> list[int]:
    """Positions ``p * phase_width + q`` of a phase-split padded row that are padding (column
    ``q * s + p - left`` outside the input)."""
    sx, q_, left = spec.strides[1], spec.phase_width, spec.padding[1]
    return [p * q_ + q for p in range(sx) for q in range(q_) if not 0 <= q * sx + p - left < spec.width]


def copy_padded_row(spec: DepthwiseConvSpec, data, dest, n, c, iy, at) -> None:
    """``dest[at(p, q)]`` = column ``q * s + p - left`` of input row ``iy`` of channel ``c``, for the
    columns inside the input (the padding is left as it is); ``at`` must be contiguous in ``q``.

    The bounds are static, so the columns split where the padding ends: the few inside elements
    among the edge columns are stored one by one; the middle run is a vector copy at stride 1,
    and at stride ``s`` one ``s x lanes`` vector load split into the ``s`` phases by shuffles (an
    interleaved scalar loop ran at ~1.5 cycles per element, three quarters of a stride-2 layer's
    time; per-element bounds tests and re-zeroed padding made the copy of a 7x7 channel 8x its conv).
    """
    sx, q_, left = spec.strides[1], spec.phase_width, spec.padding[1]
    # The middle run: q where every phase's column q * s + p - left is inside the row.
    q_lo = min(q_, max(0, ceil_div(left, sx)))
    q_hi = max(q_lo, min(q_, (spec.width + left - sx) // sx + 1))
    edges = [(q, p) for q in [*range(q_lo), *range(q_hi, q_)] for p in range(sx) if 0 <= q * sx + p - left < spec.width]
    for q, p in edges:
        T.buffer_store(dest, data[n, c, iy, q * sx + p - left], [at(p, q)])
    if q_hi <= q_lo:
        return
    if sx == 1:
        with _vector_loop(q_lo, q_hi) as q:
            T.buffer_store(dest, data[n, c, iy, q - left], [at(0, q)])
        return
    lanes = spec.lanes
    chunks = (q_hi - q_lo) // lanes if lanes > 1 else 0
    if chunks:
        with T.serial(0, chunks) as chunk:
            q0 = q_lo + chunk * lanes
            run = data.vload([n, c, iy, q0 * sx - left], f"float32x{sx * lanes}")
            for p in range(sx):
                phase = tirx.Shuffle([run], [tirx.IntImm("int32", p + sx * j) for j in range(lanes)])
                T.buffer_store(dest, phase, [tirx.Ramp(at(p, q0), 1, lanes)])
    if q_lo + chunks * lanes < q_hi:
        with T.serial(q_lo + chunks * lanes, q_hi) as q:
            with T.unroll(0, sx) as p:
                T.buffer_store(dest, data[n, c, iy, q * sx + p - left], [at(p, q)])


def _reduce(acc, x, weight, c, dy, dx):
    """One tap into an accumulator: weight x input for a conv, the max for a pool (``weight`` None)."""
    return acc + weight[c, 0, dy, dx] * x if weight is not None else T.max(acc, x)


def _tile(spec: DepthwiseConvSpec, plane, weight, bias, out, n, c, y0, x0) -> None:
    """``rows x vectors`` output vectors from ``(y0, x0)``, accumulated in registers, stored once."""
    kh, kw = spec.kernel
    sy, sx = spec.strides
    q_, lanes, rows, vectors = spec.phase_width, spec.lanes, spec.rows, spec.vectors
    width = vectors * lanes
    acc = T.decl_buffer((rows * width,), "float32", scope="local")
    with T.unroll(0, rows) as r:
        with T.vectorized(0, width) as j:
            T.buffer_store(acc, bias[c] if bias is not None else _padding_value(spec), [r * width + j])
    with T.unroll(0, kh) as dy:
        with T.unroll(0, kw) as dx:
            with T.unroll(0, rows) as r:
                with T.vectorized(0, width) as j:
                    y = (y0 + r) * sy + dy
                    x = plane[(y * sx + dx % sx) * q_ + x0 + j + dx // sx]
                    T.buffer_store(acc, _reduce(acc[r * width + j], x, weight, c, dy, dx), [r * width + j])
    with T.unroll(0, rows) as r:
        with T.vectorized(0, width) as j:
            T.buffer_store(out, activate(acc[r * width + j], spec), [n, c, y0 + r, x0 + j])


def _flat_channel(spec: DepthwiseConvSpec, plane, weight, bias, out, n, c) -> None:
    """A whole channel of a conv whose output rows are narrower than a vector (7x7 on 16 lanes): the
    outputs are computed along the flattened padded plane, ``phase_width`` per row (the tap ``dy, dx``
    of flattened output ``o`` is plane element ``o + dy * phase_width + dx``; at stride ``s`` the plane
    is split into ``s x s`` phase planes, :meth:`~DepthwiseConvSpec.flat_offset`), in
    :attr:`~DepthwiseConvSpec.flat_vectors` full vectors accumulated in registers, then each row's
    ``out_width`` valid outputs are copied out (a 7x7 channel: 4 vectors of 16 lanes for 63 positions,
    against 7 rows of 7-lane vectors, which LLVM splits into 4 + 2 + 1)."""
    kh, kw = spec.kernel
    q_, lanes, count = spec.phase_width, spec.lanes, spec.flat_vectors
    acc = T.decl_buffer((count * lanes,), "float32", scope="global")
    with T.unroll(0, count) as v:
        with T.vectorized(0, lanes) as j:
            T.buffer_store(acc, bias[c] if bias is not None else _padding_value(spec), [v * lanes + j])
    with T.unroll(0, kh) as dy:
        with T.unroll(0, kw) as dx:
            with T.unroll(0, count) as v:
                with T.vectorized(0, lanes) as j:
                    x = plane[v * lanes + j + spec.flat_offset(dy, dx)]
                    slot = v * lanes + j
                    T.buffer_store(acc, _reduce(acc[slot], x, weight, c, dy, dx), [slot])
    with T.unroll(0, count) as v:
        with T.vectorized(0, lanes) as j:
            T.buffer_store(acc, activate(acc[v * lanes + j], spec), [v * lanes + j])
    with T.unroll(0, spec.out_height) as y:
        with _vector_loop(0, spec.out_width) as x:
            T.buffer_store(out, acc[y * q_ + x], [n, c, y, x])


def depthwise_conv_primfunc(spec: DepthwiseConvSpec) -> tirx.PrimFunc:
    """The scheduled PrimFunc of one depthwise conv.

    Arguments, in order: data (N, C, H, W), weight (C, 1, KH, KW) (not for max pooling), [bias (C,)],
    out (N, C, OH, OW).
    """
    n_, c_, oh, ow = spec.batch, spec.channels, spec.out_height, spec.out_width
    width = spec.vectors * spec.lanes
    row_tiles, col_tiles = ceil_div(oh, spec.rows), ceil_div(ow, width)
    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name("main")
            data = T.arg("data", T.buffer((n_, c_, spec.height, spec.width), "float32"))
            weight = T.arg("weight", T.buffer((c_, 1, *spec.kernel), "float32")) if spec.reduction == "conv" else None
            bias = T.arg("bias", T.buffer((c_,), "float32")) if spec.has_bias else None
            out = T.arg("out", T.buffer((n_, c_, oh, ow), "float32"))
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            group = spec.channel_group
            # A root block, as TVM's passes expect of a PrimFunc: RewriteDataflowReshape inspects every
            # one-argument call_tir (max pooling has no weight) and fails on a body without one.
            # Small layers run on one thread (PARALLEL_FLOPS).
            loop = T.parallel if spec.flops >= PARALLEL_FLOPS else T.serial
            with T.sblock("root"), loop(0, ceil_div(n_ * c_, group)) as task:
                plane = T.decl_buffer((spec.plane_size,), "float32")
                _pad_plane(spec, plane)
                with T.serial(task * group, T.min(task * group + group, n_ * c_)) as nc:
                    n, c = nc // c_, nc % c_
                    _copy_padded_plane(spec, data, plane, n, c)
                    if spec.flat:
                        _flat_channel(spec, plane, weight, bias, out, n, c)
                    else:
                        with T.serial(0, row_tiles) as rt:
                            with T.serial(0, col_tiles) as ct:
                                _tile(spec, plane, weight, bias, out, n, c,
                                      T.min(rt * spec.rows, oh - spec.rows), T.min(ct * width, ow - width))
    func = builder.get().without_attr("global_symbol")  # the module names it when it is added
    return func.with_attr(DEPTHWISE_CONV_ATTR, {"lanes": spec.lanes, "rows": spec.rows, "vectors": spec.vectors,
                                                "kernel": list(spec.kernel), "reduction": spec.reduction,
                                                "flat": spec.flat, "channel_group": spec.channel_group})
