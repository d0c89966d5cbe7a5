"""The pattern convolution as a TE compute.

One reduction block computes every output pixel of every (reordered) filter as

    acc[n, f, y, q, x] = sum_{p, j, t = t' * Q + q} values[k, t] * xpad[n, channels[k], y*s + dy(p, t), x*s + dx(p, t)]
                         with k = offsets[f*P + p] + j and j < run length of (f, p)

The pattern index ``p`` and the tap index ``t`` have constant extents and the tap offsets
``dy(p, t)``, ``dx(p, t)`` are expressions of them alone, so once a schedule unrolls ``p`` and
``t`` every tap offset is a compile-time constant: code per pattern, with only the input
channel gathered at run time. The epilogue restores the user's filter order, adds the ``Q``
partial sums and fuses bias and ReLU.

The layout (:class:`PatternConvSpec`'s tile fields) is chosen per target from its vector width
and register count, because the compute pads its output to it:

* output rows and columns are rounded up to the register tile (``row_tile x column_tile``
  vectors), so the innermost loop vectorises with no tail;
* ``partials`` (Q) splits each output vector's sum over the taps into Q independent
  accumulators when the tile alone has too few to hide the FMA latency (small images: a 2x2
  output is one vector, whose four taps per kernel would otherwise form one dependency chain);
* ``flat`` (small images, stride 1) computes over the row-major flattened padded image, where a
  tap is the constant shift ``dy * Wp + dx`` and one vector spans several output rows: a 2x2
  output fills half an 8-lane vector instead of a quarter, a 4x4 two thirds instead of half;
* ``windows`` (images of at most 16 output pixels, stride 1) copies, per input channel, the 9
  shifted output-sized windows of the padded image compactly: a tap is one of them, so a 4x4
  output is one full 16-lane vector (or two 8-lane ones) per tap (every lane useful, aligned loads);
* ``lifted`` rows (dimension-lifted transposition, Henretty et al., CC 2011) split each padded
  row (each column phase when strided) into ``lanes`` segments of M = output vectors columns and
  store it transposed, ``xd[.., i * lanes + j] = xpad[.., j * M + i]`` with each segment's halo:
  output column ``j * M + i`` is lane j of vector i, so every tap of every output vector is one
  whole, aligned input vector (a shift of ``dx * lanes`` floats) and a tile of C vectors reads
  C + 2 input vectors per row instead of 3C unaligned ones (on Zen 3 a 256-bit load that splits a
  cache line costs two). The pad gathers and the epilogue scatters the lanes. Without a stored halo
  (``lifted_halo=False``, AVX-512 rows of one register tile: 28 columns) a row keeps its M vectors
  only and halo vector M + i (lane j: column (j + 1) * M + i) is read as vector i one float on, a
  load that splits a cache line but halves the lines a kernel brings from L2 at M = 2;
* ``aligned`` rows (plain rows otherwise) give each padded row (each column phase when strided) a
  pitch of whole vectors: strided, the taps with dx = 0 and 1 of an output vector are then whole
  vectors; at stride 1 a row stores padded column p at p - 1 (:attr:`PatternConvSpec.input_lead`),
  so the centre tap is, and the left zero pad is the previous row's last element. Reads past a
  row's end land in the next row, in lanes no output keeps;
* ``fused`` rows (plain or aligned, no tap partial sums) let the schedule fuse the three passes:
  ``acc`` is indexed by the user's filter (a filter's runs found through FKW's permutation,
  ``offsets[inverse_order[f] * P + p]``, one lookup per run), so the output stage is elementwise
  per register tile and runs under it, from registers; and the gathered channel is clamped to
  the input's channels, so its region is bounded and the pad can be computed per row block.

AVX2 and NEON targets take :func:`choose_layout`'s rule (lane fill, then the largest tile; on
AVX2 windows is a candidate too, which 4x4 outputs take, and wide rows take a tall 4x2 tile);
AVX-512 targets (16 lanes) take :func:`cheapest_layout`, a cycle model over 16- and 8-lane
layouts and every register tile, because there the rule's 16-lane layouts lost to the AVX2 build
on most layer sizes (``benchmarks/pattern_avx512.py``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from tvm import te, tirx
from tvm.script.ir_builder import tirx as T

from ..arith import ceil_div, largest_divisor, output_size, round_up
from ..fkw import FKWWeight

__all__ = ["PatternConvSpec", "pattern_conv2d", "pattern_conv2d_primfunc", "PATTERN_CONV_ATTR", "WINDOW_PIXELS",
           "TALL_TILE", "WIDE_ROW_VECTORS", "LIFTED_WIDTHS", "LIFTED_TALL_VECTORS", "choose_layout", "cheapest_layout",
           "fkw_arguments", "is_lifted", "is_pattern_conv", "layout_cycles", "target_layout"]

# PrimFunc attribute carrying the operator's static description; schedule rules key on it.
PATTERN_CONV_ATTR = "patdnn.pattern_conv"


def is_lifted(layout) -> bool:
    """Whether a pattern conv's layout attribute (:data:`PATTERN_CONV_ATTR`) is lifted rows."""
    return "lifted" in layout


def is_pattern_conv(func: tirx.PrimFunc) -> bool:
    """Whether ``func`` is a pattern convolution (it carries :data:`PATTERN_CONV_ATTR`)."""
    return func.attrs is not None and PATTERN_CONV_ATTR in func.attrs


@dataclass(frozen=True)
class PatternConvSpec:
    """Static shape information of one pattern convolution (everything but the weights) and
    the layout its compute is padded to (see the module docstring)."""

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
    row_tile: int = 1
    column_tile: int = 1
    partials: int = 1
    flat: bool = False
    windows: bool = False
    lifted: bool = False
    aligned: bool = False
    fused: bool = False
    lifted_halo: bool = True

    def __post_init__(self):
        if (self.flat or self.windows) and self.strides != (1, 1):
            raise ValueError("the flat and windows layouts need stride 1")
        if self.flat + self.windows + self.lifted > 1:
            raise ValueError("a layout is one of rows, flat, windows and lifted rows")
        if self.taps % self.partials:
            raise ValueError(f"{self.partials} partial sums do not divide {self.taps} taps")
        if self.aligned and (self.flat or self.windows or self.lifted):
            raise ValueError("aligned input rows are a plain rows layout")
        if self.fused and (self.flat or self.windows or self.lifted or self.partials > 1):
            raise ValueError("fused stages need a rows layout (plain or aligned) without tap partial sums")
        if not self.lifted_halo and not (self.lifted and self.strides[1] == 1 and self.lifted_vectors >= 2
                                         and self.out_width <= (self.vector_width - 1) * self.lifted_vectors):
            raise ValueError("lifted rows without a stored halo need lifted rows of at least 2 vectors at stride 1 "
                             "whose last lane holds no output column")

    @property
    def taps(self) -> int:
        return len(self.patterns[0])

    @property
    def out_height(self) -> int:
        return output_size(self.height, self.padding[0], self.padding[2], 3, self.strides[0])

    @property
    def out_width(self) -> int:
        return output_size(self.width, self.padding[1], self.padding[3], 3, self.strides[1])

    @property
    def padded_width(self) -> int:
        """Columns of the padded input: the flat layout's row pitch."""
        return self.width + self.padding[1] + self.padding[3]

    @property
    def input_lead(self) -> int:
        """Aligned rows at stride 1 (with a left zero pad) store padded column p of a row at p - 1:
        the centre tap (dx = 1, in every pattern) of an output vector is then a whole vector, and
        column 0, a zero, is read from the previous row's last element (1; else 0)."""
        return int(self.aligned and self.strides[1] == 1 and self.padding[1] >= 1)

    @property
    def input_pitch(self) -> int:
        """Floats per padded input row (per column phase when strided) of aligned rows: a whole
        number of vectors, at least the accumulator's columns, holding every column a real output
        reads (and at stride 1 the zero the next row's first tap reads)."""
        sw, lead = self.strides[1], self.input_lead
        needed = max(self.out_width + 2 // sw - lead, self.padding[1] + self.width if lead else 0)
        return max(round_up(needed, self.vector_width), self.acc_columns)

    @property
    def rows_input_shape(self) -> tuple[int, int, int]:
        """(rows, column phases, columns) of the padded input of a rows layout (plain, aligned or lifted)."""
        sh, sw = self.strides
        rows = (self.acc_rows - 1) * sh + 3
        if self.lifted:  # without a stored halo: one more (zero) row, for the last row's one-float overreach
            return ((rows, sw, self.acc_columns + 2 // sw * self.vector_width) if self.lifted_halo
                    else (rows + 1, sw, self.acc_columns))
        if self.aligned:  # a leading zero row for the lead, a trailing one for the junk lanes' reads
            return rows + self.input_lead + 1, sw, self.input_pitch
        return rows, sw, self.acc_columns + 2 // sw

    @property
    def lifted_vectors(self) -> int:
        """M, the output columns of one lane of a lifted row (the row's output vectors)."""
        return self.acc_columns // self.vector_width

    @property
    def acc_rows(self) -> int:
        """Rows of the accumulator: output rows rounded up to the row tile (flat, windows: one)."""
        return 1 if self.flat or self.windows else round_up(self.out_height, self.row_tile)

    @property
    def acc_columns(self) -> int:
        """Columns of the accumulator, a whole number of column tiles."""
        length = (self.out_height * self.padded_width if self.flat else self.out_height * self.out_width
                  if self.windows else self.out_width)
        return round_up(length, self.vector_width * self.column_tile)

    @classmethod
    def from_fkw(cls, fkw: FKWWeight, data_shape, strides, padding, has_bias, relu, vector_width=8, accumulators=8):
        n, c, h, w = (int(d) for d in data_shape)
        shape = cls(
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
        return target_layout(shape, accumulators)


def choose_layout(spec: PatternConvSpec, accumulators: int, flat: bool | None = None,
                  windows: bool = False) -> PatternConvSpec:
    """``spec`` with the register tile for ``accumulators`` vector registers.

    Flat when that fills more vector lanes (and the stride is 1) unless ``flat`` says; with
    ``windows`` (and ``flat`` None) windows when that fills more lanes still (stride 1, at most
    16 output pixels); then as many output vectors per tile as divide the output (columns first:
    they share loaded weights and rows), then partial sums over the taps with the registers left.
    """
    def untiled(flat: bool, windows: bool = False) -> PatternConvSpec:
        return dataclasses.replace(spec, row_tile=1, column_tile=1, partials=1, flat=flat, windows=windows,
                                   lifted=False, aligned=False, fused=False, lifted_halo=True)

    def lane_fill(layout: PatternConvSpec) -> float:
        return layout.out_height * layout.out_width / (layout.acc_rows * layout.acc_columns)

    windows = (windows and flat is None and spec.strides == (1, 1)
               and spec.out_height * spec.out_width <= WINDOW_PIXELS)
    if flat is None:
        flat = spec.strides == (1, 1) and lane_fill(untiled(True)) > lane_fill(untiled(False))
    layout = untiled(flat)
    if windows and lane_fill(untiled(False, True)) > lane_fill(layout):
        layout = untiled(False, True)
    column_tile = largest_divisor(layout.acc_columns // spec.vector_width, accumulators)
    row_tile = max(1, min(accumulators // column_tile, layout.acc_rows))
    partials = largest_divisor(spec.taps, accumulators // (row_tile * column_tile))
    return dataclasses.replace(layout, row_tile=row_tile, column_tile=column_tile, partials=partials)


# Cycle model of one kernel of one register tile (cheapest_layout), in cycles of a core with two
# 256-bit FMA pipes and two 256-bit loads a cycle (Zen 4 runs a 512-bit op as two halves).
_FMA_LATENCY = 4  # cycles: a chain of dependent FMAs issues one per 4 cycles
_KERNEL_OVERHEAD = 1  # cycles per kernel: loop counter, channel address
_RUN_OVERHEAD = 20  # cycles per (filter, pattern) run and tile: run bounds, loop entry and exit
_FLAT_LOADS = 1.25  # flat layouts' input loads cost this much more (fitted; no row shares them)
WINDOW_PIXELS = 16  # the windows layout is a candidate for outputs of at most this many pixels
_TILE_RESERVE = 2  # a register tile leaves this many of the accumulators free
WIDE_ROW_VECTORS = 14  # AVX2 rows layouts at least this many vectors wide take the tall tile
TALL_TILE = (4, 2)  # (rows, columns) of output vectors of the AVX2 tile for wide rows
LIFTED_WIDTHS = range(28, 112)  # AVX2 layers with output rows this wide take lifted rows (any stride)
LIFTED_TALL_VECTORS = 7  # lifted rows of at least this many vectors take the TALL_TILE
WIDE_ROW_COLUMNS = 112  # AVX-512 rows at least this wide take the TALL_TILE and fused stages
NARROW_ROWS_CHANNELS = 64  # ... up to this many input channels
AVX512_LIFTED_CHANNELS = 128  # AVX-512 rows of 56+ columns take lifted rows from this many input channels
AVX512_LIFTED_TILE_CHANNELS = 64  # ... and rows of one 2-vector tile (17-30 columns), without a halo, from this many


def _input_vectors(spec: PatternConvSpec, taps) -> int:
    """Distinct input vectors one kernel of pattern ``taps`` loads for a register tile: taps
    with the same column shift share rows of the tile (the rows layout), and flat shifts that
    land on the same vector are one load."""
    sh, sw = spec.strides
    lanes, columns = spec.vector_width, range(spec.column_tile)
    if spec.flat:
        return len({c * lanes + dy * spec.padded_width + dx for c in columns for dy, dx in taps})
    if spec.windows:
        return len({(c, dy, dx) for c in columns for dy, dx in taps})
    return len({(r * sh + dy, dx % sw, c * lanes + dx // sw)
                for r in range(spec.row_tile) for c in columns for dy, dx in taps})


def layout_cycles(spec: PatternConvSpec) -> float:
    """Modelled cycles of the accumulation of ``spec``'s layout (all filters, one image).

    Per kernel and register tile, the largest of: FMA issue (taps x tile vectors, two 256-bit
    FMAs a cycle), loads (distinct input vectors, one broadcast weight per tap and the channel
    index; two 256-bit loads a cycle) and the latency of each accumulator chain (taps / partial
    sums dependent FMAs); plus a fixed cost per kernel and per (filter, pattern) run. Padding is
    paid for: the tiles cover the padded rows and columns, junk lanes included.
    """
    halves = spec.vector_width / 8
    vectors = spec.row_tile * spec.column_tile
    loads = sum(_input_vectors(spec, taps) for taps in spec.patterns) / len(spec.patterns)
    if spec.flat:
        loads *= _FLAT_LOADS
    kernel = max(spec.taps * vectors * halves / 2, (loads * halves + spec.taps + 1) / 2,
                 _FMA_LATENCY * spec.taps / spec.partials) + _KERNEL_OVERHEAD
    tiles = spec.batch * spec.acc_rows // spec.row_tile * spec.acc_columns // (spec.vector_width * spec.column_tile)
    return tiles * (spec.n_kernels * kernel + spec.out_channels * len(spec.patterns) * _RUN_OVERHEAD)


def _partials(spec: PatternConvSpec, vectors: int, accumulators: int) -> int:
    """Tap partial sums for a tile of ``vectors``: the fewest whose chains' latency no longer
    exceeds the tile's FMA issue (more only add accumulators and epilogue adds: 8x8 rows measured
    1.03x faster with one than with two), within the accumulators."""
    issue = vectors * spec.vector_width / 8 / 2  # cycles per tap
    enough = [q for q in range(1, spec.taps + 1) if spec.taps % q == 0 and _FMA_LATENCY / q <= issue]
    return min(enough[0] if enough else spec.taps, largest_divisor(spec.taps, accumulators // vectors))


def cheapest_layout(spec: PatternConvSpec, accumulators: int, vector_widths: tuple[int, ...],
                    flat: bool | None = None) -> PatternConvSpec:
    """The layout of least :func:`layout_cycles` over the vector widths, row, flat and windows
    layouts (flat and windows: stride 1 only, windows up to 16 output pixels; ``flat=False``: rows
    only, ``True``: flat only) and every register tile of at most ``accumulators`` - 2 vectors
    (16-vector tiles measured 3-16% slower than smaller ones), with the tap partial sums
    :func:`_partials` gives it; ties go to wider vectors.

    On Zen 4 (``benchmarks/pattern_avx512.py``, 1 thread, against the AVX2 build of the same
    code) it picks 512-bit rows for outputs at least 14 wide (1.2-1.6x; the lane-fill rule's 16-lane
    flat layouts at 28x28 and 56x56 were 0.7-0.75x), 512-bit windows for 4x4 outputs (1.45-1.5x)
    and 256-bit rows for 8x8 and 7x7 (1.0-1.1x; the lane-fill rule's 16-lane flat ones were
    0.55-0.8x).
    """
    rows, flat_kind, windows_kind = (False, False), (True, False), (False, True)  # (flat, windows)
    if flat is False or spec.strides != (1, 1):
        kinds = [rows]
    elif flat:
        kinds = [flat_kind]
    else:
        kinds = [rows, flat_kind] + [windows_kind] * (spec.out_height * spec.out_width <= WINDOW_PIXELS)
    tile_limit = max(1, accumulators - _TILE_RESERVE)
    candidates = []
    for width in vector_widths:
        for is_flat, windows in kinds:
            base = dataclasses.replace(spec, vector_width=width, row_tile=1, column_tile=1, partials=1, flat=is_flat,
                                       windows=windows, lifted=False, aligned=False, fused=False, lifted_halo=True)
            for row_tile in range(1, (1 if is_flat or windows else min(tile_limit, base.out_height)) + 1):
                for column_tile in range(1, min(base.acc_columns // width, tile_limit // row_tile) + 1):
                    partials = _partials(base, row_tile * column_tile, accumulators)
                    candidates.append(dataclasses.replace(base, row_tile=row_tile, column_tile=column_tile,
                                                          partials=partials))
    return min(candidates, key=lambda layout: (layout_cycles(layout), -layout.vector_width))


def target_layout(spec: PatternConvSpec, accumulators: int, flat: bool | None = None,
                  tall_tile: bool = True, lifted: bool = True, aligned: bool = True,
                  fused: bool = True) -> PatternConvSpec:
    """The layout a target with ``spec.vector_width`` lanes gets: on AVX-512 (16 lanes) the
    cheapest 512- or 256-bit layout (AVX-512VL), elsewhere :func:`choose_layout`'s, with windows
    among its candidates on AVX2 (8 lanes).

    On AVX2 that takes windows for 4x4 outputs only (two full vectors per tap instead of flat's
    three, two thirds full; 2 vectors x 4 tap partial sums): 1.22-1.47x per VGG-16 CIFAR 4x4 layer
    on Zen 3 over flat (two runs of ``benchmarks/optimisations.py``, 1 thread). Where windows fills
    no more lanes than flat (2x2: half a vector either way) it lost, 0.8x: the 9 windows of a
    channel take 72 floats instead of the padded image's 16. NEON (4 lanes) keeps the rule without
    windows: it would take them at 2x2 and 4x4, but no phone is attached to time it.

    AVX2 layers with output rows of :data:`LIFTED_WIDTHS` columns take lifted rows: 28-55 columns
    (VGG-16 224's and ResNet-50's 28x28, CIFAR's 32x32, ResNet-50's 56 -> 28 stride 2) with the
    rule's tile, Zen 3, 1 thread, interleaved: 1.20-1.47x at 28x28 (over flat), 1.10-1.27x at 32x32,
    1.16-1.19x on the strided layer; 56-111 columns with the :data:`TALL_TILE` (rows padded to 4,
    56 columns to 64 lanes, column blocks outside the filters): 1.08-1.25x at 56x56 (64-256
    channels), where lifted 1x7 lost (0.54-0.96x). 112 columns and more keep plain rows (lifted
    0.54-0.81x at 112x112 in five runs, the kernel itself 1.7x slower; 0.93-1.12x at 224x224),
    probably because the lifted halo of 2 vectors per tile row outgrows the L1 the column blocks
    are reused from (64 channels x 6 rows x 4 vectors = 49 KB, against 27 KB for plain rows).
    14x14 and 7x7 lose 0.86-0.91x (a halo as large as the row).

    Wide rows on AVX2 (VGG-16 224's 224- and 112-pixel layers) take the :data:`TALL_TILE` instead
    of the rule's 1x7: its 4 output rows share input rows between taps (6 input rows per 4 output
    rows instead of 3 per 1) and its narrow column block (C x 6 rows x 18 floats: 27 KB at 64
    channels) stays in cache while the filters sweep it (the schedule runs column blocks outside
    the filters for it). Zen 3, 1 thread, interleaved: 1.11-1.15x at 224x224, 1.11-1.27x at
    112x112, with column blocks outside 1.17-1.23x; at 56x56 it measured 0.96-1.08x, so plain
    56-pixel rows keep 1x7 (lifted ones take it, above). ``tall_tile=False`` keeps the rule's tile
    and ``lifted=False`` plain rows (``benchmarks/optimisations.py``).

    Other AVX2 rows layouts take aligned rows where their padded input takes no more floats than
    plain rows': ResNet-50's 14x14 and 7x7 rows (pitch 16, 8 floats instead of 18, 10) and its
    stride-2 layers to 14 and 7 columns (phase pitch 16, 8 instead of 17, 9). Zen 3, 1 thread,
    interleaved, three runs: 256x256 28 -> 14 s2 1.19-1.23x, 512x512 14 -> 7 s2 1.30-1.36x, 256x256
    14x14 1.06-1.22x, 7x7 1.02-1.03x; 1.24x, 1.27x, 1.09x in a 31-round run whose identical-code
    control read 0.99-1.03x (two runs on a busier box, where builds of identical code
    differed 0.85-1.09x: 1.03-1.37x, 0.90-0.93x, 1.01-1.07x, 1.02-1.17x); VGG-16 224's 512x512 14x14
    0.97-1.08x. Where the pitch would grow they tie or lose: VGG-16 224's
    112/224 rows 0.99-1.02x, CIFAR's 16x16 0.99x and 8x8 0.92-0.93x (pitch 24 and 16 instead of
    18 and 10). A first version, 7 lead columns and every pitch rounded up (24 floats at 14x14),
    lost 0.61-0.92x on ResNet-50's layers. ``aligned=False`` keeps plain rows.

    Wide rows on AVX2 (the tall tile's layers) are ``fused``: the schedule builds each row
    block's padded rows just before its filters read them (in L2, instead of a padded copy of the
    whole image: 13 MB at 64 x 224 x 224) and adds bias and ReLU to the register tile as it
    stores the output (no accumulator written and read back). Zen 3, 1 thread, interleaved
    (15 rounds): 1.13x at 224x224 (rounds 1.08-1.18x), 0.99x and 1.02x at 112x112, where pad and
    output stage took 0.6 ms of 7-16. ``fused=False`` keeps the three passes.
    """
    if spec.vector_width == 16:
        return _avx512_layout(spec, accumulators, flat, tall_tile, lifted, aligned, fused)
    layout = choose_layout(spec, accumulators, flat, windows=spec.vector_width == 8)
    if tall_tile and spec.vector_width == 8 and _is_wide(layout) and accumulators >= TALL_TILE[0] * TALL_TILE[1]:
        layout = dataclasses.replace(layout, row_tile=TALL_TILE[0], column_tile=TALL_TILE[1], partials=1)
    if lifted and spec.vector_width == 8 and spec.out_width in LIFTED_WIDTHS:
        layout = dataclasses.replace(choose_layout(spec, accumulators, flat=False), lifted=True)
        if (tall_tile and spec.out_width >= LIFTED_TALL_VECTORS * spec.vector_width
                and accumulators >= TALL_TILE[0] * TALL_TILE[1]):
            layout = dataclasses.replace(layout, row_tile=TALL_TILE[0], column_tile=TALL_TILE[1], partials=1)
    if aligned and spec.vector_width == 8 and not (layout.flat or layout.windows or layout.lifted):
        candidate = dataclasses.replace(layout, aligned=True)
        if math.prod(candidate.rows_input_shape) <= math.prod(layout.rows_input_shape):
            layout = candidate
    if fused and spec.vector_width == 8 and _is_wide(layout) and not layout.lifted:
        layout = dataclasses.replace(layout, fused=True)
    return layout


def _avx512_layout(spec: PatternConvSpec, accumulators: int, flat: bool | None, tall_tile: bool, lifted: bool,
                   aligned: bool, fused: bool) -> PatternConvSpec:
    """AVX-512, stride 1: layers of at most :data:`NARROW_ROWS_CHANNELS` input channels with rows of at
    least :data:`WIDE_ROW_COLUMNS` columns take AVX2's wide-row layout at 16 lanes (the
    :data:`TALL_TILE`, fused stages); layers of at least :data:`AVX512_LIFTED_CHANNELS` input channels
    with rows of at least 28 columns (56 from 128 channels) lifted rows; other rows whose aligned
    pitch adds at most an eighth to the plain one (14, 28 and 56 columns, not CIFAR's 32, 16 or 8)
    aligned rows; both with a tile of up to 7 rows (dividing the output's) x 2 vectors; strided layers
    aligned rows with :func:`choose_layout`'s tile in the vector width the cost model picks for them, as do
    stride-1 layers it gives 8-lane rows where aligned rows do not grow the input (7x7, as on AVX2);
    the rest :func:`cheapest_layout`'s layout (fitted on Zen 4, whose 512-bit ops run as two halves),
    with the :data:`TALL_TILE` where its 512-bit rows are two vectors wide.

    Zen 5 (full-rate 512-bit FMAs; a 512-bit load that splits a cache line runs at half rate), 1 thread,
    per layer against the cost model's layout, interleaved (session 14, one to three runs a layer):
    VGG-16 224's 224x224 64x64 2.52x, 112x112 128x64 2.25x (fused, the tall tile, which the schedule
    narrows to 8x1 at 64 channels; without fused stages 1.83x, 1.70x); its 128x128 112x112 lifted 7x2
    1.23x over fused (fused 1.36x over the cost model); 56x56 lifted 7x2 1.07-1.17x over aligned 4x4
    (which was 1.21-2.06x); 512-channel 28x28 lifted 7x2 1.15x (8x2, rows padded to 32: 0.85x);
    ResNet-50's 64x64 56x56 aligned 7x2 1.04x (lifted 0.88-0.91x), 128x128 28x28 aligned 7x2 1.11x
    (lifted 1.00x); 14x14 aligned 14x1 0.99-1.14x; stride 2 aligned rows 1.46x (56 -> 28; lifted rows
    1.39x), 1.34x (28 -> 14), 1.41x (14 -> 7 in 8 lanes; in 16 lanes 0.81x); 7x7 aligned 8-lane rows
    1.07x. Not taken: aligned rows at CIFAR's 16x16 0.83-0.89x, 8x8 0.94-0.95x, 4x4 0.35x; lifted rows
    at its 32x32 (64 channels) 0.89x. Rows of
    two 16-lane vectors left to the cost model (CIFAR's 32x32) take the tall 4x2 tile instead of its
    11x1: 1.11x (two runs; 8x1 1.06-1.07x, 6x2 1.01x, 8x2 0.95x). Lifted against aligned rows at 28-112
    columns is unresolved: later runs on a slower, contended host had aligned 7x2 ahead by 1.06-1.48x
    (lifted rows read twice the bytes at 28 columns) or behind (docs/performance.md, "The pattern conv
    on a Zen 5 host").

    Lifted rows of one register tile (28 columns: M = 2 vectors, the 7 x 2 tile) store no halo
    (``lifted_halo=False``): each row is 2 cache lines instead of 4, and the halo taps are loads one
    float on that split a line. Zen 5, 1 thread, core 1, interleaved (session 16): VGG-16 224's 512x512
    28x28 1.27-1.28x (3.35 -> 2.63 ms, 51 -> 65% of 268 GFLOP/s; its input is no longer the bound:
    channels mapped mod 128 ran only 1.06x faster, against 1.19x with the halo), 512x256 28x28
    1.05-1.06x; the whole trunk 1.068-1.070x per round. Wider lifted rows keep the halo: without it 56
    columns (M = 4 in column tiles of 2) lost 0.69-0.86x, 0.83-0.91x with the column tiles unrolled,
    and 112 columns 0.73x; 56 columns as two lifted groups of 28 (each one tile, no halo) 1.00x at 256
    channels and 0.87x at 128. With fewer channels such rows (17-30 columns: the halo reads need the last
    lane free) take it too, from :data:`AVX512_LIFTED_TILE_CHANNELS`, where they took aligned rows:
    ResNet-50's 128x128 28x28 1.10-1.14x over aligned 7x2 (lifted with the halo 1.00-1.05x), 64x64 28x28
    1.13x (whole ResNet-50 0.999-1.008x per round, 9 rounds: its three such layers take ~0.25 ms each).

    Strided 16-lane aligned rows take a tile of rows that divides the output's where :func:`choose_layout`'s
    would pad them: ResNet-50's 128x128 56 -> 28 stride 2 7 x 2 instead of 8 x 2 (28 rows padded to 32),
    alone 1.12-1.14x (three interleaved runs; 0.526 -> 0.469 ms), in the model 0.566 -> 0.475 ms (per-call
    minima of 30 inferences; session 16).
    """
    model = cheapest_layout(spec, accumulators, (16, 8), flat)
    rows = choose_layout(spec, accumulators, flat=False)
    if aligned and (spec.strides != (1, 1) or model.vector_width == 8 and not (model.flat or model.windows)):
        # in the model's vector width: at 7 output columns 8 lanes (stride 1 where it does not grow the input)
        narrow = choose_layout(dataclasses.replace(spec, vector_width=model.vector_width), accumulators, flat=False)
        candidate = dataclasses.replace(narrow, aligned=True)
        if candidate.vector_width == 16 and candidate.acc_rows > spec.out_height:  # rows the tile divides, unpadded
            rows = largest_divisor(spec.out_height, max(1, accumulators - _TILE_RESERVE) // candidate.column_tile)
            candidate = dataclasses.replace(candidate, row_tile=rows, partials=1)
        if spec.strides != (1, 1) or math.prod(candidate.rows_input_shape) <= math.prod(narrow.rows_input_shape):
            return candidate
    if spec.strides != (1, 1):
        return model
    if (tall_tile and spec.out_width >= WIDE_ROW_COLUMNS and spec.in_channels <= NARROW_ROWS_CHANNELS
            and accumulators >= TALL_TILE[0] * TALL_TILE[1]):
        return dataclasses.replace(rows, row_tile=TALL_TILE[0], column_tile=TALL_TILE[1], partials=1, fused=fused)
    column_tile = min(2, ceil_div(spec.out_width, spec.vector_width))
    row_tile = largest_divisor(spec.out_height, max(1, accumulators - _TILE_RESERVE) // column_tile)
    tile = dataclasses.replace(rows, row_tile=row_tile, column_tile=column_tile, partials=1)
    many = spec.in_channels >= AVX512_LIFTED_CHANNELS * (1 if spec.out_width >= 56 else 2)
    # a row of one register tile of 2 vectors whose last lane is padding (17-30 columns): lifted, no stored halo
    if (lifted and column_tile == 2 and spec.out_width <= 2 * (spec.vector_width - 1)
            and spec.in_channels >= AVX512_LIFTED_TILE_CHANNELS):
        return dataclasses.replace(tile, lifted=True, lifted_halo=False)
    if lifted and spec.out_width >= 28 and many:
        return dataclasses.replace(tile, lifted=True)
    if aligned and 8 * dataclasses.replace(tile, aligned=True).input_pitch <= 9 * (spec.out_width + 2):
        return dataclasses.replace(tile, aligned=True)
    if (tall_tile and model.vector_width == 16 and not (model.flat or model.windows)
            and model.acc_columns == TALL_TILE[1] * model.vector_width):  # rows of two vectors: 4 of them
        return dataclasses.replace(model, row_tile=TALL_TILE[0], column_tile=TALL_TILE[1], partials=1)
    return model


def _is_wide(spec: PatternConvSpec) -> bool:
    """A rows layout whose output rows span at least :data:`WIDE_ROW_VECTORS` vectors."""
    return not (spec.flat or spec.windows) and spec.out_width >= WIDE_ROW_VECTORS * spec.vector_width


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


def _padded_input(spec: PatternConvSpec, data):
    """The zero-padded input, laid out so that every tap of an output vector is a contiguous
    vector: (n, c, 1, 1, flat index) when flat, (n, c, dy * 3 + dx, 1, output pixel) when
    windows, else (n, c, row, phase, q) with the columns
    split by stride phase (column = q * sw + phase), since x*sw + dx == (x + dx//sw)*sw + dx%sw."""
    sh, sw = spec.strides
    top, left = spec.padding[0], spec.padding[1]
    zero = tirx.const(0.0, "float32")

    def at(n, c, h, w):
        inside = tirx.all(h >= top, h < top + spec.height, w >= left, w < left + spec.width)
        return tirx.if_then_else(inside, data[n, c, h - top, w - left], zero)

    if spec.flat:
        pitch = spec.padded_width
        length = spec.acc_columns + 2 * pitch + 2
        return te.compute((spec.batch, spec.in_channels, 1, 1, length),
                          lambda n, c, _h, _p, i: at(n, c, i // pitch, i % pitch), name="pad")
    if spec.windows:
        width, pixels = spec.out_width, spec.out_height * spec.out_width

        def window(n, c, shift, _p, i):
            value = at(n, c, i // width + shift // 3, i % width + shift % 3)
            return tirx.if_then_else(i < pixels, value, zero)

        return te.compute((spec.batch, spec.in_channels, 9, 1, spec.acc_columns), window, name="pad")
    shape = (spec.batch, spec.in_channels, *spec.rows_input_shape)
    if spec.lifted:
        lanes, m = spec.vector_width, spec.lifted_vectors
        return te.compute(shape, lambda n, c, h, phase, i: at(n, c, h, (i % lanes * m + i // lanes) * sw + phase),
                          name="pad")
    lead = spec.input_lead
    return te.compute(shape, lambda n, c, h, phase, q: at(n, c, h - lead, (q + lead) * sw + phase), name="pad")


def pattern_conv2d(spec: PatternConvSpec, data, values, channels, offsets, inverse_order, bias=None):
    """Build the TE stages (pad, acc, out) of a pattern convolution; returns the output tensor."""
    sh, sw = spec.strides
    n_patterns, partials = len(spec.patterns), spec.partials
    xpad = _padded_input(spec, data)
    rp = te.reduce_axis((0, n_patterns), name="rp")
    rj = te.reduce_axis((0, max(1, spec.max_run)), name="rj")
    rt = te.reduce_axis((0, spec.taps // partials), name="rt")

    def acc_body(n, f, y, q, x):
        # fused: f is the user's filter, its runs found through FKW's permutation
        run = (inverse_order[f] if spec.fused else f) * n_patterns + rp
        k = offsets[run] + rj
        t = rt * partials + q
        if spec.flat:
            shift = _tap_table(spec.patterns, rp, t, lambda tap: tap[0] * spec.padded_width + tap[1])
            tap_input = xpad[n, channels[k], 0, 0, x + shift]
        elif spec.windows:
            shift = _tap_table(spec.patterns, rp, t, lambda tap: tap[0] * 3 + tap[1])
            tap_input = xpad[n, channels[k], shift, 0, x]
        else:
            dy = _tap_table(spec.patterns, rp, t, lambda tap: tap[0])
            phase = _tap_table(spec.patterns, rp, t, lambda tap: tap[1] % sw)
            lanes = spec.vector_width if spec.lifted else 1
            shift = _tap_table(spec.patterns, rp, t, lambda tap: tap[1] // sw * lanes)
            lead = spec.input_lead  # aligned rows: a column of -1 or past the pitch is the previous or next row's
            # fused: a bounded channel, so a schedule can compute the pad per block of the rows it reads
            channel = tirx.min(tirx.max(channels[k], 0), spec.in_channels - 1) if spec.fused else channels[k]
            if spec.lifted and not spec.lifted_halo:  # halo vector M + i: vector i one float on
                m = spec.lifted_vectors
                dx = _tap_table(spec.patterns, rp, t, lambda tap: tap[1])
                back = tirx.Select(x // lanes + dx < m, tirx.const(0, "int64"), tirx.const(m * lanes - 1, "int64"))
                shift = shift - back
            tap_input = xpad[n, channel, y * sh + dy + lead, phase, x + shift - lead]
        # The run-length guard is part of the body because te.create_prim_func drops a
        # reduction's `where`; if_then_else is lazy, so skipped slots load nothing.
        return te.sum(
            tirx.if_then_else(rj < offsets[run + 1] - offsets[run], values[k, t] * tap_input, tirx.const(0.0, "float32")),
            axis=[rp, rj, rt],
        )

    acc = te.compute((spec.batch, spec.out_channels, spec.acc_rows, partials, spec.acc_columns), acc_body, name="acc")

    def epilogue(n, f, y, x):
        row, column = ((0, y * spec.padded_width + x) if spec.flat else (0, y * spec.out_width + x) if spec.windows
                       else (y, x % spec.lifted_vectors * spec.vector_width + x // spec.lifted_vectors) if spec.lifted
                       else (y, x))
        stored = f if spec.fused else inverse_order[f]
        value = acc[n, stored, row, 0, column]
        for q in range(1, partials):
            value = value + acc[n, stored, row, q, column]
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


def fkw_arguments(spec: PatternConvSpec, kernels: int, in_shape: tuple, out_shape: tuple, order: str = "order"):
    """Declare the arguments of a hand-built pattern-conv PrimFunc inside its ``T.prim_func()`` frame, those of
    :func:`pattern_conv2d_primfunc` with ``kernels`` rows of FKW weights: data, values, channels, offsets, the
    filter permutation named ``order`` (FKW's ``order``, or ``inverse_order`` for kernels that take the TE
    operator's), [bias], out; the function is marked scheduled and its buffers unaliased.
    Returns (data, values, channels, offsets, order, bias or None, out)."""
    f_, p_ = spec.out_channels, len(spec.patterns)
    data = T.arg("data", T.buffer(in_shape, "float32"))
    values = T.arg("values", T.buffer((kernels, spec.taps), "float32"))
    channels = T.arg("channels", T.buffer((kernels,), "int32"))
    offsets = T.arg("offsets", T.buffer((f_ * p_ + 1,), "int32"))
    permutation = T.arg(order, T.buffer((f_,), "int32"))
    bias = T.arg("bias", T.buffer((f_,), "float32")) if spec.has_bias else None
    out = T.arg("out", T.buffer(out_shape, "float32"))
    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
    return data, values, channels, offsets, permutation, bias, out


def _spec_attr(spec: PatternConvSpec) -> dict:
    """The layout as a plain dict of ints so it survives in PrimFunc attributes ("lifted", "aligned"
    and "fused" only when set, "lifted_halo" only when 0: the functions of other layouts stay those the
    shipped tuning records were made for)."""
    return {
        "strides": list(spec.strides),
        "n_patterns": len(spec.patterns),
        "taps": spec.taps,
        "vector_width": spec.vector_width,
        "column_tile": spec.column_tile,
        "row_tile": spec.row_tile,
        "partials": spec.partials,
        "flat": int(spec.flat),
        "windows": int(spec.windows),
        "relu": int(spec.relu),
    } | ({"lifted": 1} if spec.lifted else {}) | ({"aligned": 1, "input_lead": spec.input_lead} if spec.aligned else {}) \
        | ({"fused": 1} if spec.fused else {}) \
        | ({"lifted_halo": 0} if spec.lifted and not spec.lifted_halo else {})
