"""The pattern conv's kernel loop after scheduling: bounded by its run length, prefetching ahead.

The pattern-conv compute iterates ``rj`` over the longest (filter, pattern) run of the layer
and guards every update with ``rj < run length`` (TE cannot give a reduction a data-dependent
extent). Runs vary a lot (the longest is often 2-3x the mean), and LLVM cannot drop the guarded
``acc + 0.0`` without fast-math, so the empty iterations cost real work. Once a schedule has
fixed the loop nest, the guard can become the loop bound: ``for rj in range(min(R, len))`` with
the update unguarded. This is exact because every store under the loop carries the guard.

The same loop also prefetches, per kernel, the first line of each input row its register tile
reads for the kernel :data:`PREFETCH_DISTANCE` ahead (its channel is gathered, which the
hardware prefetcher cannot follow), on layers whose input rows come from beyond L1 and whose
runs are long enough for that kernel to be mostly the same run's: stride-1 rows (lifted or not)
and flat layouts with at least :data:`PREFETCH_CHANNELS` input channels, output rows at least 14
wide and a padded input larger than :data:`PREFETCH_MIN_BYTES` (VGG-16 224's 56x56, 28x28 and
14x14 layers). Zen 3, 1 thread, interleaved: 1.06-1.15x at 256 channels 56x56 (plain rows;
lifted 0.97x, one run), 1.04-1.12x at 512 channels 14x14, 1.04-1.09x at 512 channels 28x28
(flat, and lifted 1.05-1.09x). ResNet-50's 14x14 layers at 256 channels (their 331 KB input
stays in L2) lost 0.96-0.98x (three runs) and its strided layers 0.92-0.96x (4x2 tiles read 9
rows x 2 column phases: 18 prefetches a kernel), so they do not prefetch. Every line of the tile
(15 prefetches a kernel) paid nothing either (their load slots cost what they saved), nor did
prefetch at 64 channels 224x224 (0.94-0.97x: runs of 2 kernels), at 128 channels (0.95x at
56x56, 0.98x at 28x28, both lifted) or with the tall tile at 112x112 (0.94-0.97x).
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, sym, tirx

from ..ops.pattern_conv import PATTERN_CONV_ATTR, is_lifted

__all__ = ["PREFETCH_CHANNELS", "PREFETCH_DISTANCE", "PREFETCH_MIN_BYTES", "bound_kernel_runs"]

_IF_THEN_ELSE = "prim.if_then_else"
PREFETCH_DISTANCE = 4  # kernels ahead (2, 4 and 8 measured the same at 56x56)
PREFETCH_CHANNELS = 256  # input channels from which the kernel loop prefetches
PREFETCH_MIN_BYTES = 512 * 1024  # padded input of one image, above which it prefetches (Zen 3's L2 per core)
_PREFETCH_MIN_WIDTH = 14  # output columns, at least


class _Unsupported(Exception):
    """The loop nest is not the shape this rewrite knows; leave the function as it is."""


def _substitute(expr, mapping: dict):
    """Replace block iterator variables by their bindings in a guard's bound expression."""
    if isinstance(expr, tirx.Var):
        for var, value in mapping.items():
            if var.same_as(expr):
                return value
        return expr
    if isinstance(expr, tirx.IntImm):
        return expr
    if isinstance(expr, tirx.Cast):
        return tirx.Cast(expr.ty, _substitute(expr.value, mapping))
    for kind in (tirx.Add, tirx.Sub, tirx.Mul):
        if isinstance(expr, kind):
            return kind(_substitute(expr.a, mapping), _substitute(expr.b, mapping))
    if isinstance(expr, tvm.ir.TensorLoad):
        return tirx.BufferLoad(expr.source, [_substitute(i, mapping) for i in expr.indices])
    raise _Unsupported(type(expr).__name__)


def _guard(store) -> tuple:
    """(condition, unguarded value) of ``acc = acc + if_then_else(cond, v, 0)``."""
    if not isinstance(store, tirx.BufferStore) or not isinstance(store.value, tirx.Add):
        raise _Unsupported("update is not an accumulation")
    call = store.value.b
    if getattr(getattr(call, "op", None), "name", None) != _IF_THEN_ELSE:
        raise _Unsupported("update is not guarded")
    cond, then, _ = call.args
    return cond, tirx.BufferStore(store.buffer, tirx.Add(store.value.a, then), store.indices)


def _load_of(expr, buffer_name: str):
    """The first load of the buffer named ``buffer_name`` in ``expr``, or None."""
    if isinstance(expr, tvm.ir.TensorLoad) and expr.source.name == buffer_name:
        return expr
    children = (list(expr.indices) if isinstance(expr, tvm.ir.TensorLoad) else list(expr.args)
                if isinstance(expr, tvm.ir.Call) else [expr.value] if isinstance(expr, tirx.Cast)
                else [expr.a, expr.b] if hasattr(expr, "a") and hasattr(expr, "b") else [])
    for child in children:
        found = _load_of(child, buffer_name)
        if found is not None:
            return found
    return None


def _prefetch_next_kernel(realize, inner_loops: list, layout) -> list:
    """Prefetches of the first line of every input row the register tile at the origin of the
    ``inner_loops`` reads, for the kernel :data:`PREFETCH_DISTANCE` ahead (clamped to the last);
    none for layers with too few channels or too narrow rows. In the flat layout a tile's input
    rows are the flat image at the tile's start plus 0, 1 and 2 row pitches."""
    block = realize.block
    pad = _load_of(block.body.value, "pad")
    channel = _load_of(pad.indices[1], "channels") if pad is not None else None
    if channel is None:
        raise _Unsupported("no gathered input load")
    sh, sw = (int(stride) for stride in layout["strides"])
    _n, channels, rows, phases, columns = (int(extent) for extent in pad.source.shape)
    flat = bool(int(layout["flat"]))
    # flat: columns = accumulator columns + 2 row pitches + 2, a pitch = output width + 2
    pitch = (columns - int(block.iter_vars[4].dom.extent) - 2) // 2 if flat else 0
    # lifted: 2 halo vectors, not columns (none stored with lifted_halo 0)
    halo = int(layout["lifted_halo"]) if "lifted_halo" in layout else 1
    lanes = int(layout["vector_width"]) * halo if is_lifted(layout) else 1
    width = pitch - 2 if flat else columns - 2 // sw * lanes
    if (channels < PREFETCH_CHANNELS or width < _PREFETCH_MIN_WIDTH or sw > 1
            or channels * rows * phases * columns * 4 <= PREFETCH_MIN_BYTES):
        return []
    bindings, origin = sym.Analyzer(), sym.Analyzer()
    for iter_var, value in zip(block.iter_vars, realize.iter_values):
        bindings.bind(iter_var.var, value)
    for var in inner_loops:
        origin.bind(var, tirx.const(0, var.ty))

    def at_origin(expr):
        return origin.simplify(bindings.simplify(expr))

    kernel = at_origin(channel.indices[0])
    ahead = tirx.Min(kernel + tirx.const(PREFETCH_DISTANCE, kernel.ty),
                     tirx.const(int(channel.source.shape[0]) - 1, kernel.ty))
    channel_ahead = tirx.Cast(pad.indices[1].ty, tirx.BufferLoad(channel.source, [ahead]))
    n, _f, y, _q, x = (at_origin(value) for value in list(realize.iter_values)[:5])
    index = y.ty

    def at(row, phase, column):
        return tirx.Evaluate(tirx.call_intrin("void", "tirx.prefetch", tirx.address_of(tirx.BufferLoad(
            pad.source, [n, channel_ahead, row, tirx.const(phase, index), column])), 0, 3, 1))

    if flat:
        return [at(y, 0, x + tirx.const(r * pitch, index)) for r in range(3)]
    rows = (int(layout["row_tile"]) - 1) * sh + 3
    # aligned rows: row r stored at r + lead; a row's own first line (column 0 on) is the one to fetch
    lead = int(layout["input_lead"]) if "input_lead" in layout else 0
    return [at(y * sh + tirx.const(r + lead, index), phase, x) for r in range(rows) for phase in range(sw)]


def _rewrite_loop(loop: tirx.For, loop_name: str, layout=None):
    """The kernel loop with its extent bounded by the run length and the guard removed; with a
    ``layout``, prefetching the kernel ahead's input rows."""
    bound = None
    prefetches = None

    def visit(stmt, inner_loops=()):
        nonlocal bound, prefetches
        if isinstance(stmt, tirx.For):
            return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind,
                            visit(stmt.body, (*inner_loops, stmt.loop_var)), stmt.thread_binding, stmt.annotations)
        if isinstance(stmt, s_tir.SBlockRealize):
            if layout is not None and prefetches is None:
                prefetches = _prefetch_next_kernel(stmt, list(inner_loops), layout)
            block = stmt.block
            cond, body = _guard(block.body)
            mapping = {iv.var: value for iv, value in zip(block.iter_vars, stmt.iter_values)}
            if not isinstance(cond, tirx.LT) or not _substitute(cond.a, mapping).same_as(loop.loop_var):
                raise _Unsupported("guard is not on the kernel loop")
            this_bound = _substitute(cond.b, mapping)
            if bound is not None and not tvm_ffi.structural_equal(bound, this_bound):
                raise _Unsupported("updates disagree on the bound")
            bound = this_bound
            new_block = s_tir.SBlock(block.iter_vars, block.reads, block.writes, block.name_hint, body,
                                     block.init, block.alloc_buffers, block.match_buffers, block.annotations)
            return s_tir.SBlockRealize(stmt.iter_values, stmt.predicate, new_block)
        if isinstance(stmt, tirx.SeqStmt):
            return tirx.SeqStmt([visit(s, inner_loops) for s in stmt.seq])
        raise _Unsupported(type(stmt).__name__)

    body = visit(loop.body)
    if bound is None:
        raise _Unsupported("no update under the kernel loop")
    if prefetches:
        body = tirx.SeqStmt([*prefetches, body])
    extent = tirx.Min(loop.extent, tirx.Cast(loop.extent.ty, bound))
    return tirx.For(loop.loop_var, loop.min, extent, loop.kind, body, loop.thread_binding, loop.annotations)


def bound_kernel_runs(func: tirx.PrimFunc, loop_name: str = "rj", prefetch: bool = True) -> tirx.PrimFunc:
    """Apply the rewrite to the (scheduled) kernel loop, prefetching where the module docstring
    says (and ``prefetch``); an unknown shape is left unchanged."""
    layout = func.attrs[PATTERN_CONV_ATTR] if func.attrs is not None and PATTERN_CONV_ATTR in func.attrs else None
    if not prefetch or layout is None or int(layout["windows"]):
        layout = None

    def visit(stmt):
        if isinstance(stmt, tirx.For):
            if stmt.loop_var.name == loop_name:
                return _rewrite_loop(stmt, loop_name, layout)
            return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, visit(stmt.body),
                            stmt.thread_binding, stmt.annotations)
        if isinstance(stmt, tirx.SeqStmt):
            return tirx.SeqStmt([visit(s) for s in stmt.seq])
        if isinstance(stmt, s_tir.SBlockRealize):
            b = stmt.block
            block = s_tir.SBlock(b.iter_vars, b.reads, b.writes, b.name_hint, visit(b.body), b.init,
                                 b.alloc_buffers, b.match_buffers, b.annotations)
            return s_tir.SBlockRealize(stmt.iter_values, stmt.predicate, block)
        return stmt

    try:
        return func.with_body(visit(func.body))
    except _Unsupported:
        return func
