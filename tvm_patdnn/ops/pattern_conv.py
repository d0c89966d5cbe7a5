"""The pattern convolution as a TE compute.

One reduction block computes every output pixel of every (reordered) filter as

    acc[n, f, y, x] = sum_{p, j, t} values[k, t] * xpad[n, channels[k], y*s + dy(p, t), x*s + dx(p, t)]
                      with k = offsets[f*P + p] + j and j < run length of (f, p)

The pattern index ``p`` and the tap index ``t`` have constant extents and the tap offsets
``dy(p, t)``, ``dx(p, t)`` are expressions of them alone, so once a schedule unrolls ``p`` and
``t`` every tap offset is a compile-time constant: code per pattern, with only the input
channel gathered at run time. The output width is computed rounded up to a multiple of the
vector width (and cropped in the epilogue) so the innermost loop vectorises with no tail.
The epilogue restores the user's filter order and fuses bias and ReLU.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import te, tirx

from ..fkw import FKWWeight

__all__ = ["PatternConvSpec", "pattern_conv2d", "pattern_conv2d_primfunc", "PATTERN_CONV_ATTR"]

# Vector accumulators a register tile may use: half of AVX2's/NEON's 16/32 registers, the
# rest hold the broadcast weights and the loaded input vectors.
ACCUMULATORS = 8

# PrimFunc attribute carrying the operator's static description; schedule rules key on it.
PATTERN_CONV_ATTR = "patdnn.pattern_conv"


@dataclass(frozen=True)
class PatternConvSpec:
    """Static shape information of one pattern convolution (everything but the weights)."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    patterns: tuple[tuple[tuple[int, int], ...], ...]
    n_kernels: int
    max_run: int
    strides: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    has_bias: bool
    relu: bool
    vector_width: int = 8

    @property
    def taps(self) -> int:
        return len(self.patterns[0])

    @property
    def out_height(self) -> int:
        return (self.height + self.padding[0] + self.padding[2] - 3) // self.strides[0] + 1

    @property
    def out_width(self) -> int:
        return (self.width + self.padding[1] + self.padding[3] - 3) // self.strides[1] + 1

    @property
    def padded_out_width(self) -> int:
        v = self.vector_width
        return (self.out_width + v - 1) // v * v

    @property
    def column_tile(self) -> int:
        """Output vectors per row held in registers at once (a divisor of the padded row)."""
        vectors = self.padded_out_width // self.vector_width
        return max(t for t in range(1, ACCUMULATORS + 1) if vectors % t == 0)

    @property
    def row_tile(self) -> int:
        """Output rows computed together, so each loaded weight serves rows x columns vectors."""
        return max(1, min(ACCUMULATORS // self.column_tile, self.out_height))

    @property
    def padded_out_height(self) -> int:
        r = self.row_tile
        return (self.out_height + r - 1) // r * r

    @classmethod
    def from_fkw(cls, fkw: FKWWeight, data_shape, strides, padding, has_bias, relu, vector_width=8):
        n, c, h, w = (int(d) for d in data_shape)
        return cls(
            batch=n,
            in_channels=c,
            height=h,
            width=w,
            out_channels=fkw.out_channels,
            patterns=fkw.patterns,
            n_kernels=int(fkw.channels.shape[0]),
            max_run=fkw.max_run,
            strides=tuple(int(s) for s in strides),
            padding=tuple(int(p) for p in padding),
            has_bias=bool(has_bias),
            relu=bool(relu),
            vector_width=int(vector_width),
        )


def _tap_table(patterns, p, t, component):
    """``component(tap)`` of tap ``t`` of pattern ``p`` as a select chain of constants."""
    expr = None
    for pi, taps in enumerate(patterns):
        row = None
        for ti, tap in enumerate(taps):
            value = tirx.const(component(tap), "int64")
            row = value if row is None else tirx.Select(t == ti, value, row)
        expr = row if expr is None else tirx.Select(p == pi, row, expr)
    return expr


def pattern_conv2d(spec: PatternConvSpec, data, values, channels, offsets, inverse_order, bias=None):
    """Build the TE stages (pad, acc, out) of a pattern convolution; returns the output tensor."""
    sh, sw = spec.strides
    top, left = spec.padding[0], spec.padding[1]
    oh, owp = spec.padded_out_height, spec.padded_out_width
    hp = (oh - 1) * sh + 3
    wq = owp + 2 // sw  # padded columns per phase
    n_patterns = len(spec.patterns)

    # Padded input with its columns split by phase (column = q * sw + phase), so that a
    # strided conv reads every tap as a contiguous vector: x * sw + dx == (x + dx // sw) * sw + dx % sw.
    def pad_value(n, c, h, phase, q):
        w = q * sw + phase
        inside = tirx.all(h >= top, h < top + spec.height, w >= left, w < left + spec.width)
        return tirx.if_then_else(inside, data[n, c, h - top, w - left], tirx.const(0.0, "float32"))

    xpad = te.compute((spec.batch, spec.in_channels, hp, sw, wq), pad_value, name="pad")
    rp = te.reduce_axis((0, n_patterns), name="rp")
    rj = te.reduce_axis((0, max(1, spec.max_run)), name="rj")
    rt = te.reduce_axis((0, spec.taps), name="rt")

    def acc_body(n, f, y, x):
        run = f * n_patterns + rp
        k = offsets[run] + rj
        dy = _tap_table(spec.patterns, rp, rt, lambda tap: tap[0])
        phase = _tap_table(spec.patterns, rp, rt, lambda tap: tap[1] % sw)
        shift = _tap_table(spec.patterns, rp, rt, lambda tap: tap[1] // sw)
        # The run-length guard is part of the body because te.create_prim_func drops a
        # reduction's `where`; if_then_else is lazy, so skipped slots load nothing.
        return te.sum(
            tirx.if_then_else(
                rj < offsets[run + 1] - offsets[run],
                values[k, rt] * xpad[n, channels[k], y * sh + dy, phase, x + shift],
                tirx.const(0.0, "float32"),
            ),
            axis=[rp, rj, rt],
        )

    acc = te.compute((spec.batch, spec.out_channels, oh, owp), acc_body, name="acc")

    def epilogue(n, f, y, x):
        value = acc[n, inverse_order[f], y, x]
        if bias is not None:
            value = value + bias[f]
        if spec.relu:
            value = tirx.max(value, tirx.const(0.0, "float32"))
        return value

    return te.compute((spec.batch, spec.out_channels, spec.out_height, spec.out_width), epilogue, name="out")


def pattern_conv2d_primfunc(spec: PatternConvSpec) -> tirx.PrimFunc:
    """The unscheduled PrimFunc of one pattern convolution, tagged for the schedule rules.

    Arguments, in order: data, values, channels, offsets, inverse_order, [bias], out.
    """
    data = te.placeholder((spec.batch, spec.in_channels, spec.height, spec.width), "float32", "data")
    values = te.placeholder((max(1, spec.n_kernels), spec.taps), "float32", "values")
    channels = te.placeholder((max(1, spec.n_kernels),), "int32", "channels")
    offsets = te.placeholder((spec.out_channels * len(spec.patterns) + 1,), "int32", "offsets")
    inverse_order = te.placeholder((spec.out_channels,), "int32", "inverse_order")
    bias = te.placeholder((spec.out_channels,), "float32", "bias") if spec.has_bias else None
    out = pattern_conv2d(spec, data, values, channels, offsets, inverse_order, bias)
    args = [data, values, channels, offsets, inverse_order] + ([bias] if bias is not None else []) + [out]
    func = te.create_prim_func(args, index_dtype_override="int64")
    func = func.without_attr("global_symbol")
    return func.with_attr(PATTERN_CONV_ATTR, _spec_attr(spec))


def _spec_attr(spec: PatternConvSpec) -> dict:
    """The spec as a plain dict of ints so it survives in PrimFunc attributes."""
    return {
        "strides": list(spec.strides),
        "n_patterns": len(spec.patterns),
        "taps": spec.taps,
        "vector_width": spec.vector_width,
        "column_tile": spec.column_tile,
        "row_tile": spec.row_tile,
        "relu": int(spec.relu),
    }
