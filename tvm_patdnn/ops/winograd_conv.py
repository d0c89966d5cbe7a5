"""Winograd convolution F(m x m, 3x3) for dense 3x3 stride-1 convs (and their bias / residual /
ReLU / clip epilogue), NCHW in and out.

Why: a 3x3 stride-1 conv computes each ``m x m`` output tile from an ``(m + 2)^2`` input tile;
in the Winograd domain that is ``(m + 2)^2`` multiply-adds per tile, filter and channel instead of
``9 m^2``: 2.25x fewer for F(2x2), 4x for F(4x4), 5.06x for F(6x6). The transforms are linear and
cheap next to the multiply-adds once a layer has tens of channels, so at the same multiply-add
speed the kernel beats any direct one on these layers (see ``benchmarks/winograd.py``).

The kernel (``alpha = m + 2``, ``U = G g G^T`` the transformed filters, ``V = B^T d B`` the
transformed input tiles, ``Y = A^T M A`` the output tile):

* ``U`` is computed at compile time in float64 and packed as ``[alpha^2][F / MR][C][MR]``: per
  transform position, the ``MR`` filters of a register tile are one contiguous run per channel;
* the input is first copied, zero-padded, into a *tile-row* layout ``[N][C][alpha][m][tiles + 1]``
  where element ``ty * (tw + 1) + q`` of row ``(dy, r)`` is input pixel ``(ty m + dy, q m + r)``:
  the tile grid gets one phantom column per row (``tw + 1`` tiles, cropped at the end), so that
  consecutive tiles -- the vector lanes -- read consecutive floats for every tap (plain vector
  loads instead of stride-``m`` gathers, and a block of tiles may span tile rows);
* per block of tiles (a parallel task), the input transform of every channel goes into a
  contiguous ``V[alpha^2][C][block]``; then one GEMM per transform position,
  ``M[pos] = U[pos] x V[pos]``, with the register tile of :mod:`.dense_conv` (``MR`` filters x
  ``NR`` vectors along the tiles, accumulators in registers); then the output transform,
  bias / residual / activation applied once, edge tiles and phantom tiles cropped by the store;
* the block holds as many tiles as keep ``V`` and ``M`` within ``BLOCK_BYTES`` (L2), at least
  one register tile's worth.

The output pixels of one vector of tiles are ``m`` floats apart, so the store is scalar (one
per output pixel and filter, against ``alpha^2 C / m^2`` multiply-adds: small once C is 32+).

Numerics (measured, ``tests/test_winograd_conv.py`` and ``benchmarks/winograd.py``): the
transforms scale values by up to ``|A|``, ``|B|`` (F(2x2): 1 and 1, F(4x4): 8 and 2.5, F(6x6):
32 and 5.25), so the rounding error grows with ``m``; see :data:`ERROR_BOUND`.

The function is written directly as (scheduled) TIR, like :mod:`.dense_conv`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..arith import ceil_div, round_up
from .activation import activate, check_activation
from .dense_conv import register_tile

__all__ = ["ERROR_BOUND", "WINOGRAD_ATTR", "WinogradConvSpec", "pack_winograd_weight", "winograd_conv_primfunc",
           "winograd_matrices"]

WINOGRAD_ATTR = "patdnn.winograd_conv"
# Interpolation points of each output tile size: they set the transform matrices and with them
# the rounding error. F(4x4) takes 1/2 and -2 instead of Lavin & Gray's +-2: its largest input-
# transform entry drops from 5 to 2.5 and the measured error to a third (64@56x56: 2.2e-6 vs
# 6.4e-6, 512@14x14: 5.8e-6 vs 1.6e-5). F(6x6) keeps 0, +-1, +-2, +-1/2 (the orders and swaps
# tried erred as much or more).
POINTS = {2: (0, 1, -1), 4: (0, 1, -1, 0.5, -2), 6: (0, 1, -1, 2, -2, 0.5, -0.5)}
# Bound of the error against a float64 conv, relative to the output's magnitude: the largest
# measured with standard-normal inputs and He-normal weights on the 3x3 layers of ResNet-50 and
# VGG-16, 32-512 channels (``benchmarks/winograd.py``: 1.2e-6, 6.9e-6, 2.5e-5), rounded up. The
# direct kernels measured up to 2.9e-6 on the same layers.
ERROR_BOUND = {2: 2e-6, 4: 1e-5, 6: 4e-5}
# V and M of one block of tiles stay within this (half of Zen 3's 512 KB L2).
BLOCK_BYTES = 262144


@cache
def winograd_matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A^T (m x alpha), G (alpha x 3), B^T (alpha x alpha)) of F(m, 3), in float64.

    A^T and G follow the Cook-Toom construction from :data:`POINTS` and the point at infinity;
    B^T is then the solution of the linear conditions that make ``A^T [(G g) * (B^T d)]`` the
    correlation of ``d`` with ``g`` for every ``g`` and ``d`` (its entries are multiples of 1/4).
    """
    if m not in POINTS:
        raise ValueError(f"Winograd output tile {m} is not one of {sorted(POINTS)}")
    points, r = np.array(POINTS[m], dtype=np.float64), 3
    alpha = m + r - 1
    at, g = np.zeros((m, alpha)), np.zeros((alpha, r))
    for j, a in enumerate(points):
        at[:, j] = a ** np.arange(m)
        g[j] = a ** np.arange(r) / np.prod([a - b for b in points if b != a])
    at[m - 1, alpha - 1] = g[alpha - 1, r - 1] = 1.0
    # sum_j AT[i, j] G[j, k] BT[j, l] = [l == i + k], one equation per (i, k, l).
    system = np.zeros((m, r, alpha, alpha, alpha))
    for l_ in range(alpha):
        system[:, :, l_, :, l_] = at[:, None, :] * g.T[None, :, :]
    rhs = np.array([[[float(l_ == i + k) for l_ in range(alpha)] for k in range(r)] for i in range(m)])
    solution = np.linalg.lstsq(system.reshape(-1, alpha * alpha), rhs.ravel(), rcond=None)[0]
    bt = np.round(solution.reshape(alpha, alpha) * 8) / 8
    return at, g, bt


@dataclass(frozen=True)
class WinogradConvSpec:
    """Static description of one 3x3 stride-1 dense conv run as F(m x m, 3x3), and its tiles."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    tile: int = 4  # m: output tile side
    has_bias: bool = False
    residual: bool = False
    activation: str = "none"  # ACTIVATIONS; "clip" uses clip_min/clip_max
    clip_min: float = 0.0
    clip_max: float = 6.0
    filter_tile: int = 6  # MR
    vectors: int = 2  # NR: vectors of tiles in the register tile
    lanes: int = 8
    block: int = 16  # tiles per parallel task, a multiple of vectors * lanes

    def __post_init__(self):
        winograd_matrices(self.tile)  # validates the tile size
        check_activation(self.activation)
        if self.out_height < 1 or self.out_width < 1:
            raise ValueError("the kernel is larger than the padded input")
        if self.block % (self.vectors * self.lanes) or self.block > self.tiles:
            raise ValueError(f"a block of {self.block} tiles is not a multiple of {self.vectors} x {self.lanes} "
                             f"lanes within the {self.tiles} tiles")

    @classmethod
    def for_target(cls, registers: int, lanes: int, tile: int, vectors: int = 2, **shape) -> WinogradConvSpec:
        """The spec with the register tile of :func:`~.dense_conv.register_tile` along the tiles
        and the largest block within :data:`BLOCK_BYTES` of a target with ``registers`` vectors
        of ``lanes``."""
        probe = cls(**shape, tile=tile, lanes=1, filter_tile=1, vectors=1, block=1)
        # NEON (4 lanes) loads the broadcast weights as pairs of scalars into vector registers:
        # 14 x 2 accumulators spilled one there, 13 x 2 do not.
        spare = 2 if lanes == 4 else 0
        filters, vectors, lanes = register_tile(registers - spare, lanes, probe.tiles, vectors)
        step = vectors * lanes
        alpha2 = (tile + 2) ** 2
        per_tile = alpha2 * (probe.in_channels + round_up(probe.out_channels, filters)) * 4
        block = step * max(1, min(BLOCK_BYTES // (per_tile * step), probe.tiles // step))
        return cls(**shape, tile=tile, filter_tile=filters, vectors=vectors, lanes=lanes, block=block)

    @property
    def alpha(self) -> int:
        return self.tile + 2

    @property
    def out_height(self) -> int:
        return self.height + self.padding[0] + self.padding[2] - 2

    @property
    def out_width(self) -> int:
        return self.width + self.padding[1] + self.padding[3] - 2

    @property
    def tile_rows(self) -> int:
        return ceil_div(self.out_height, self.tile)

    @property
    def row(self) -> int:
        """Tiles per tile row: the real ones plus one phantom (see the module docstring)."""
        return ceil_div(self.out_width, self.tile) + 1

    @property
    def tiles(self) -> int:
        return self.tile_rows * self.row

    @property
    def filter_tiles(self) -> int:
        return ceil_div(self.out_channels, self.filter_tile)

    @property
    def flops(self) -> int:
        """The direct conv's multiply-adds x 2 (the yardstick of effective GFLOP/s)."""
        return 2 * self.batch * self.out_channels * self.in_channels * 9 * self.out_height * self.out_width


def pack_winograd_weight(weight: np.ndarray, tile: int, filter_tile: int) -> np.ndarray:
    """OIHW 3x3 weight as ``U = G g G^T`` packed ``[alpha^2][ceil(O / MR)][I][MR]``, the filters
    past O zero; transformed in float64, rounded once."""
    _, g, _ = winograd_matrices(tile)
    out_c, in_c = weight.shape[:2]
    alpha, tiles = tile + 2, ceil_div(out_c, filter_tile)
    u = np.einsum("ak,fckl,bl->abfc", g, weight.astype(np.float64), g).reshape(alpha * alpha, out_c, in_c)
    padded = np.zeros((alpha * alpha, tiles * filter_tile, in_c))
    padded[:, :out_c] = u
    packed = padded.reshape(alpha * alpha, tiles, filter_tile, in_c).transpose(0, 1, 3, 2)
    return np.ascontiguousarray(packed, dtype=np.float32)


def _combine(coefficients: np.ndarray, terms: list) -> tirx.PrimExpr:
    """``sum_k coefficients[k] * terms[k]`` over the nonzero coefficients, +-1 as adds."""
    total = None
    for c, term in zip(coefficients, terms):
        if c == 0:
            continue
        if abs(c) == 1:
            part = term
        else:
            part = tirx.const(float(abs(c)), "float32") * term
        if total is None:
            total = part if c > 0 else -part
        else:
            total = total + part if c > 0 else total - part
    return total if total is not None else tirx.const(0.0, "float32")


def _tile_rows_copy(spec: WinogradConvSpec, data, rows) -> None:
    """``rows[n, c, dy, r, ty * row + q]`` = the zero-padded input at ``(ty m + dy, q m + r)``."""
    m, alpha, row = spec.tile, spec.alpha, spec.row
    top, left = spec.padding[0], spec.padding[1]
    c_, zero = spec.in_channels, tirx.const(0.0, "float32")
    with T.parallel(0, spec.batch * c_) as nc:
        n, c = nc // c_, nc % c_
        with T.serial(0, spec.tile_rows) as ty:
            with T.serial(0, alpha) as dy:
                y = ty * m + dy - top
                for r in range(m):
                    # Tiles q0 <= q < q1 read inside the row; the others read the padding.
                    q0 = min(row, ceil_div(max(0, left - r), m))
                    q1 = max(q0, min(row, ceil_div(spec.width + left - r, m)))
                    with T.If(tirx.all(y >= 0, y < spec.height)):
                        with T.Then():
                            for first, last in ((0, q0), (q1, row)):
                                if last > first:
                                    with T.serial(0, last - first) as q:
                                        T.buffer_store(rows, zero, [n, c, dy, r, ty * row + first + q])
                            with T.serial(0, q1 - q0) as q:
                                value = data[n, c, y, (q0 + q) * m + r - left]
                                T.buffer_store(rows, value, [n, c, dy, r, ty * row + q0 + q])
                        with T.Else():
                            with T.vectorized(0, row) as q:
                                T.buffer_store(rows, zero, [n, c, dy, r, ty * row + q])
        with T.serial(0, alpha * m) as dr:  # the element past the last tile, read by the last phantom tile
            T.buffer_store(rows, zero, [n, c, dr // m, dr % m, spec.tiles])


def _input_transform(spec: WinogradConvSpec, rows, v, n, base) -> None:
    """``V[pos][c][t] = (B^T d B)[pos]`` of the block's tiles, one vector of tiles at a time:
    first along each input row (``d B``), then along the columns."""
    m, alpha, lanes = spec.tile, spec.alpha, spec.lanes
    _, _, bt = winograd_matrices(m)
    across = T.decl_buffer((alpha * alpha * lanes,), "float32", scope="local")
    with T.serial(0, spec.in_channels) as c:
        with T.serial(0, spec.block // lanes) as jv:
            for dy in range(alpha):
                with T.vectorized(0, lanes) as j:
                    t = base + jv * lanes + j
                    taps = [rows[n, c, dy, k % m, t + k // m] for k in range(alpha)]
                    for nu in range(alpha):
                        T.buffer_store(across, _combine(bt[nu], taps), [(dy * alpha + nu) * lanes + j])
            for nu in range(alpha):
                with T.vectorized(0, lanes) as j:
                    column = [across[(dy * alpha + nu) * lanes + j] for dy in range(alpha)]
                    for i in range(alpha):
                        T.buffer_store(v, _combine(bt[i], column), [i * alpha + nu, c, jv * lanes + j])


def _batched_gemm(spec: WinogradConvSpec, weight, v, mm) -> None:
    """``M[pos] = U[pos] x V[pos]`` for every transform position, one register tile of ``MR``
    filters x ``NR`` tile vectors at a time."""
    mr, lanes, step = spec.filter_tile, spec.lanes, spec.vectors * spec.lanes
    # "local": TVM 0.27 allocates these small buffers (and the transforms') as heap workspace once per
    # block, and LLVM still keeps the register tile in registers through the channel loop (the same
    # GEMM loop as with "global", a stack alloca). "global" for all four measured as a tie (Zen 3,
    # 1 thread, session 12): local / global 0.90-1.06x per layer (two runs, 11 rounds), the dense
    # ResNet-50 whole 1.00x (15 rounds).
    acc = T.decl_buffer((mr * step,), "float32", scope="local")
    with T.serial(0, spec.alpha * spec.alpha) as pos:
        with T.serial(0, spec.filter_tiles) as ft:
            with T.serial(0, spec.block // step) as sub:
                with T.unroll(0, mr) as i:
                    with T.vectorized(0, step) as j:
                        T.buffer_store(acc, tirx.const(0.0, "float32"), [i * step + j])
                with T.serial(0, spec.in_channels) as c:
                    with T.unroll(0, mr) as i:
                        with T.unroll(0, spec.vectors) as jo:
                            with T.vectorized(0, lanes) as ji:
                                slot = i * step + jo * lanes + ji
                                x = v[pos, c, sub * step + jo * lanes + ji]
                                T.buffer_store(acc, acc[slot] + weight[pos, ft, c, i] * x, [slot])
                with T.unroll(0, mr) as i:
                    with T.vectorized(0, step) as j:
                        T.buffer_store(mm, acc[i * step + j], [pos, ft * mr + i, sub * step + j])


def _output_transform(spec: WinogradConvSpec, mm, bias, residual, out, n, base) -> None:
    """``Y = A^T M A`` of every real filter and tile of the block, plus bias, then per output
    pixel inside the image: plus residual, activation, store (phantom and edge pixels dropped)."""
    m, alpha, lanes = spec.tile, spec.alpha, spec.lanes
    at, _, _ = winograd_matrices(m)
    down = T.decl_buffer((m * alpha * lanes,), "float32", scope="local")
    tile = T.decl_buffer((m * m * lanes,), "float32", scope="local")
    with T.serial(0, spec.out_channels) as f:
        with T.serial(0, spec.block // lanes) as jv:
            for nu in range(alpha):
                with T.vectorized(0, lanes) as j:
                    column = [mm[x * alpha + nu, f, jv * lanes + j] for x in range(alpha)]
                    for i in range(m):
                        T.buffer_store(down, _combine(at[i], column), [(i * alpha + nu) * lanes + j])
            for i in range(m):
                with T.vectorized(0, lanes) as j:
                    across = [down[(i * alpha + nu) * lanes + j] for nu in range(alpha)]
                    for k in range(m):
                        value = _combine(at[k], across)
                        if bias is not None:
                            value = value + bias[f]
                        T.buffer_store(tile, value, [(i * m + k) * lanes + j])
            for j in range(lanes):  # unrolled: the tile buffer stays in registers
                t = base + jv * lanes + j
                ty, tx = T.bind(t // spec.row), T.bind(t % spec.row)
                for i in range(m):
                    for k in range(m):
                        y, x = ty * m + i, tx * m + k
                        with T.If(tirx.all(y < spec.out_height, x < spec.out_width)):
                            with T.Then():
                                value = tile[(i * m + k) * lanes + j]
                                if residual is not None:
                                    value = value + residual[n, f, y, x]
                                T.buffer_store(out, activate(value, spec), [n, f, y, x])


def winograd_conv_primfunc(spec: WinogradConvSpec) -> tirx.PrimFunc:
    """The scheduled PrimFunc of one 3x3 stride-1 conv as F(m x m, 3x3).

    Arguments, in order: data (N, C, H, W), packed weight (:func:`pack_winograd_weight`),
    [bias (F,)], [residual (N, F, OH, OW)], out.
    """
    n_, c_, f_ = spec.batch, spec.in_channels, spec.out_channels
    alpha2, mr, tb = spec.alpha * spec.alpha, spec.filter_tile, spec.block
    blocks = ceil_div(spec.tiles, tb)
    out_shape = (n_, f_, spec.out_height, spec.out_width)
    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name("main")
            data = T.arg("data", T.buffer((n_, c_, spec.height, spec.width), "float32"))
            weight = T.arg("weight", T.buffer((alpha2, spec.filter_tiles, c_, mr), "float32"))
            bias = T.arg("bias", T.buffer((f_,), "float32")) if spec.has_bias else None
            residual = T.arg("residual", T.buffer(out_shape, "float32")) if spec.residual else None
            out = T.arg("out", T.buffer(out_shape, "float32"))
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            rows = T.decl_buffer((n_, c_, spec.alpha, spec.tile, spec.tiles + 1), "float32")
            _tile_rows_copy(spec, data, rows)
            with T.parallel(0, n_ * blocks) as task:
                n = task // blocks
                base = T.min(task % blocks * tb, spec.tiles - tb)  # the last block overlaps the one before
                v = T.decl_buffer((alpha2, c_, tb), "float32")
                mm = T.decl_buffer((alpha2, spec.filter_tiles * mr, tb), "float32")
                _input_transform(spec, rows, v, n, base)
                _batched_gemm(spec, weight, v, mm)
                _output_transform(spec, mm, bias, residual, out, n, base)
    func = builder.get().without_attr("global_symbol")  # the module names it when it is added
    return func.with_attr(WINOGRAD_ATTR, {"tile": spec.tile, "filter_tile": mr, "vectors": spec.vectors,
                                          "lanes": spec.lanes, "block": tb})
