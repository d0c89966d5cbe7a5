"""Max pooling whose window equals its stride and has no padding (VGG's 2x2 stride 2), as scheduled TIR.

Such a pool reads every input element exactly once and does one ``max`` per element: it is bound by
moving data (VGG-16 224's first pool reads 12.8 MB, from L3 where the conv before it left them, and
writes 3.2 MB), so the kernel is built to stream: per output row and vector of ``lanes`` outputs,

* the ``kh`` input rows of the window are each one contiguous run of ``sw * lanes`` floats, read as
  whole vectors straight from the NCHW input (no copy: the depthwise kernel's max variant first
  copies each channel into a padded, phase-de-interleaved plane, which for these pools is pure
  overhead);
* the rows are reduced with a vertical ``max``, then the ``sw`` column phases of the result (lanes
  ``p, p + sw, ...``) are picked out by shuffles (for 2x2: one two-source permute per phase) and
  reduced with ``max``, and the ``lanes`` outputs are one vector store;
* the last vector of a row overlaps the one before instead of running a tail (the overlap writes
  identical values), so every load and store is a whole vector; the output row must be at least a
  vector wide (narrower ones stay on the depthwise kernel).

Used on 16-lane (AVX-512) targets, by :class:`~tvm_patdnn.transform.DepthwiseConvRewrite`.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..arith import ceil_div
from ..errors import PatDNNError
from .depthwise_conv import PARALLEL_FLOPS

__all__ = ["MAX_POOL_ATTR", "MaxPoolSpec", "max_pool_primfunc"]

# PrimFunc attribute carrying the kernel's description (benchmarks and tests look for it).
MAX_POOL_ATTR = "patdnn.max_pool"
# (Image, channel) planes per parallel task at least: a few rows' worth of work per task.
MIN_TASK_ELEMENTS = 16384


@dataclass(frozen=True)
class MaxPoolSpec:
    """A max pool over NCHW whose window equals its stride (``kernel == strides``), no padding, and
    the output row vectors (``lanes`` wide, at most the output row)."""

    batch: int
    channels: int
    height: int
    width: int
    kernel: tuple[int, int] = (2, 2)
    lanes: int = 16

    def __post_init__(self):
        if min(self.batch, self.channels, self.height, self.width) < 1:
            raise PatDNNError(f"max pool: empty input {self.batch}x{self.channels}x{self.height}x{self.width}")
        if min(self.kernel) < 1 or self.kernel[0] > self.height or self.kernel[1] > self.width:
            raise PatDNNError(f"max pool: window {self.kernel} does not fit the {self.height}x{self.width} input")
        if not 1 <= self.lanes <= self.out_width:
            raise PatDNNError(f"max pool: {self.lanes}-lane vectors do not fit output rows of {self.out_width}")

    @staticmethod
    def applies(kernel, strides, padding, out_width: int, lanes: int) -> bool:
        """Whether a pool of these attributes runs here: window equal to the stride, no padding, output
        rows at least ``lanes`` wide."""
        return (tuple(kernel) == tuple(strides) and not any(padding) and out_width >= lanes
                and all(k >= 1 for k in kernel))

    @property
    def out_height(self) -> int:
        return self.height // self.kernel[0]

    @property
    def out_width(self) -> int:
        return self.width // self.kernel[1]

    @property
    def elements(self) -> int:
        """Input elements the pool reads."""
        return self.batch * self.channels * self.out_height * self.out_width * self.kernel[0] * self.kernel[1]

    @property
    def channel_group(self) -> int:
        """Planes per parallel task: at least ``MIN_TASK_ELEMENTS`` read per task, at most 1/8 of the planes."""
        planes = self.batch * self.channels
        per_plane = self.elements // planes
        return max(1, min(ceil_div(MIN_TASK_ELEMENTS, per_plane), planes // 8))


def _row_vector(spec: MaxPoolSpec, data, n, c, oy, x0) -> tirx.PrimExpr:
    """The max of the ``kh x kw`` windows of outputs ``x0 .. x0 + lanes - 1`` of output row ``oy``."""
    kh, kw = spec.kernel
    lanes = spec.lanes
    wide = None
    for dy in range(kh):
        row = data.vload([n, c, oy * kh + dy, x0 * kw], f"float32x{kw * lanes}") if kw * lanes > 1 \
            else data[n, c, oy * kh + dy, x0 * kw]
        wide = row if wide is None else tirx.Max(wide, row)
    if kw == 1:
        return wide
    result = None
    for p in range(kw):
        phase = tirx.Shuffle([wide], [tirx.IntImm("int32", p + kw * j) for j in range(lanes)]) if lanes > 1 \
            else tirx.Shuffle([wide], [tirx.IntImm("int32", p)])
        result = phase if result is None else tirx.Max(result, phase)
    return result


def max_pool_primfunc(spec: MaxPoolSpec) -> tirx.PrimFunc:
    """The scheduled PrimFunc of one max pool. Arguments: data (N, C, H, W), out (N, C, OH, OW)."""
    n_, c_, oh, ow, lanes = spec.batch, spec.channels, spec.out_height, spec.out_width, spec.lanes
    vectors = ceil_div(ow, lanes)
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
                        with T.serial(0, vectors) as v:
                            x0 = T.min(v * lanes, ow - lanes)
                            value = _row_vector(spec, data, n, c, oy, x0)
                            index = tirx.Ramp(x0, 1, lanes) if lanes > 1 else x0
                            T.buffer_store(out, value, [n, c, oy, index])
    func = builder.get().without_attr("global_symbol")  # the module names it when it is added
    return func.with_attr(MAX_POOL_ATTR, {"lanes": lanes, "kernel": list(spec.kernel), "channel_group": group})
