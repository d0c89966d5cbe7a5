"""Max pooling over NCHW as a streaming kernel (VGG's 2x2 stride 2, ResNet's 3x3 stride 2 pad 1), scheduled TIR.

A max pool does one ``max`` per window element and reuses little: it is bound by moving data (VGG-16
224's first pool reads 12.8 MB, from L3 where the conv before it left them, and writes 3.2 MB), so the
kernel is built to stream: per output row and vector of ``lanes`` outputs,

* each window row is read as ``ceil(kw / sw)`` contiguous runs of ``sw * lanes`` floats, straight from
  the NCHW input as whole vectors (no copy: the depthwise kernel's max variant first copies each
  channel into a padded, phase-de-interleaved plane, which is pure overhead here);
* the window's rows are reduced with a vertical ``max``, then the column phases of each run (lanes
  ``p, p + sw, ...``: tap ``dx = run * sw + p``) are picked out by shuffles (two-source permutes for
  16 lanes) and reduced with ``max``; the ``lanes`` outputs are one vector store;
* padding: a window that crosses the border reads the nearest row / column inside instead (edge
  clamping), which is the same max as ``-inf`` padding because every window keeps at least one
  element inside (padding smaller than the window); rows are clamped by index, the vectors at the
  row ends load an in-bounds run and shuffle the clamped lanes in (their offsets are static);
* the last vector of a row overlaps the one before instead of running a tail (the overlap writes
  identical values), so every load and store is a whole vector.

Used on 16-lane (AVX-512) targets, by :class:`~tvm_patdnn.transform.DepthwiseConvRewrite`.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..arith import ceil_div
from ..errors import PatDNNError
from .depthwise_conv import PARALLEL_FLOPS, SlidingWindow

__all__ = ["MAX_POOL_ATTR", "MaxPoolSpec", "max_pool_primfunc"]

# PrimFunc attribute carrying the kernel's description (benchmarks and tests look for it).
MAX_POOL_ATTR = "patdnn.max_pool"
# (Image, channel) planes per parallel task at least: a few rows' worth of work per task.
MIN_TASK_ELEMENTS = 16384


@dataclass(frozen=True)
class MaxPoolSpec(SlidingWindow):
    """A max pool over NCHW (dilation 1, floor output size, padding smaller than the window) and its
    output row vectors (``lanes`` wide: at most the output row, ``sw * lanes`` at most the input row)."""

    batch: int
    channels: int
    height: int
    width: int
    kernel: tuple[int, int] = (2, 2)
    strides: tuple[int, int] | None = None  # None: the kernel's (window == stride)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    lanes: int = 16

    def __post_init__(self):
        if self.strides is None:
            object.__setattr__(self, "strides", tuple(self.kernel))
        if min(self.batch, self.channels, self.height, self.width) < 1:
            raise PatDNNError(f"max pool: empty input {self.batch}x{self.channels}x{self.height}x{self.width}")
        fits = f"max pool: window {self.kernel} does not fit the {self.height}x{self.width} input"
        if min(self.kernel) < 1:
            raise PatDNNError(fits)
        if min(self.strides) < 1 or min(self.padding) < 0:
            raise PatDNNError(f"max pool: strides {self.strides} and padding {self.padding} must be positive")
        if self.out_height < 1 or self.out_width < 1:
            raise PatDNNError(fits)
        kh, kw = self.kernel
        top, left, bottom, right = self.padding
        if max(top, bottom) >= kh or max(left, right) >= kw:
            raise PatDNNError(f"max pool: padding {self.padding} must be smaller than the window {self.kernel}")
        if not 1 <= self.lanes <= self.out_width or self.strides[1] * self.lanes > self.width:
            raise PatDNNError(f"max pool: {self.lanes}-lane vectors do not fit output rows of {self.out_width} "
                              f"(input rows of {self.width})")

    @property
    def runs(self) -> int:
        """Contiguous runs of ``sw * lanes`` floats per window row and output vector."""
        return ceil_div(self.kernel[1], self.strides[1])

    @property
    def elements(self) -> int:
        """Window elements the pool reduces."""
        return self.batch * self.channels * self.out_height * self.out_width * self.kernel[0] * self.kernel[1]

    @property
    def channel_group(self) -> int:
        """Planes per parallel task: at least ``MIN_TASK_ELEMENTS`` per task, at most 1/8 of the planes."""
        planes = self.batch * self.channels
        per_plane = self.elements // planes
        return max(1, min(ceil_div(MIN_TASK_ELEMENTS, per_plane), planes // 8))

    def inside(self, x0: int) -> bool:
        """Whether every run of the output vector from column ``x0`` lies inside the input row."""
        first = x0 * self.strides[1] - self.padding[1]
        return first >= 0 and first + (self.runs - 1) * self.strides[1] + self.strides[1] * self.lanes <= self.width


def _row_vector(spec: MaxPoolSpec, data, n, c, oy, x0, static_x0: int | None) -> tirx.PrimExpr:
    """The max of the windows of outputs ``x0 .. x0 + lanes - 1`` of output row ``oy``; ``static_x0``:
    ``x0`` as a Python int for the vectors whose runs cross the row's ends (their lanes clamped)."""
    kh, kw = spec.kernel
    sh, sw = spec.strides
    lanes, width = spec.lanes, spec.strides[1] * spec.lanes
    top, left = spec.padding[0], spec.padding[1]
    rows = [T.max(T.min(oy * sh - top + dy, spec.height - 1), 0) if (top or spec.padding[2]) else oy * sh + dy
            for dy in range(kh)]
    result = None
    for run in range(spec.runs):
        first = x0 * sw - left + run * sw
        index = None
        if static_x0 is not None:  # an in-bounds run, the clamped lanes shuffled in
            wanted = static_x0 * sw - left + run * sw
            start = min(max(wanted, 0), spec.width - width)
            index = [min(max(wanted + i, 0), spec.width - 1) - start for i in range(width)]
            first = start
        wide = None
        for row in rows:
            loaded = data.vload([n, c, row, first], f"float32x{width}") if width > 1 else data[n, c, row, first]
            wide = loaded if wide is None else tirx.Max(wide, loaded)
        if index is not None and index != list(range(width)):
            wide = tirx.Shuffle([wide], [tirx.IntImm("int32", i) for i in index])
        for phase in range(min(sw, kw - run * sw)):
            if width == lanes:
                picked = wide
            else:
                picked = tirx.Shuffle([wide], [tirx.IntImm("int32", phase + sw * j) for j in range(lanes)])
            result = picked if result is None else tirx.Max(result, picked)
    return result


def max_pool_primfunc(spec: MaxPoolSpec) -> tirx.PrimFunc:
    """The scheduled PrimFunc of one max pool. Arguments: data (N, C, H, W), out (N, C, OH, OW)."""
    n_, c_, oh, ow, lanes = spec.batch, spec.channels, spec.out_height, spec.out_width, spec.lanes
    vectors = ceil_div(ow, lanes)
    starts = [min(v * lanes, ow - lanes) for v in range(vectors)]
    inside = [spec.inside(x0) for x0 in starts]
    # The vectors whose runs stay inside the row run in one loop; the others (at the row ends) one by one.
    middle = [v for v in range(vectors - 1) if inside[v]]
    lo, hi = (middle[0], middle[-1] + 1) if middle and middle == list(range(middle[0], middle[-1] + 1)) else (0, 0)
    group = spec.channel_group
    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name("main")
            data = T.arg("data", T.buffer((n_, c_, spec.height, spec.width), "float32"))
            out = T.arg("out", T.buffer((n_, c_, oh, ow), "float32"))
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            # A root block, as TVM's passes expect (RewriteDataflowReshape inspects one-argument call_tirs).
            loop = T.parallel if 2 * spec.elements >= PARALLEL_FLOPS else T.serial
            with T.sblock("root"), loop(0, ceil_div(n_ * c_, group)) as task:
                with T.serial(task * group, T.min(task * group + group, n_ * c_)) as nc:
                    n, c = nc // c_, nc % c_
                    with T.serial(0, oh) as oy:

                        def store(x0, static_x0) -> None:
                            value = _row_vector(spec, data, n, c, oy, x0, static_x0)
                            T.buffer_store(out, value, [n, c, oy, tirx.Ramp(x0, 1, lanes) if lanes > 1 else x0])

                        for v in range(lo):
                            store(starts[v], None if inside[v] else starts[v])
                        if hi > lo:
                            with T.serial(lo, hi) as v:
                                store(v * lanes, None)
                        for v in range(hi if hi > lo else lo, vectors):
                            store(starts[v], None if inside[v] else starts[v])
    func = builder.get().without_attr("global_symbol")  # the module names it when it is added
    return func.with_attr(MAX_POOL_ATTR, {"lanes": lanes, "kernel": list(spec.kernel), "strides": list(spec.strides),
                                          "padding": list(spec.padding), "channel_group": group})
