"""Bound each pattern's kernel loop by its real run length instead of the longest run.

The pattern-conv compute iterates ``rj`` over the longest (filter, pattern) run of the layer
and guards every update with ``rj < run length`` (TE cannot give a reduction a data-dependent
extent). Runs vary a lot (the longest is often 2-3x the mean), and LLVM cannot drop the guarded
``acc + 0.0`` without fast-math, so the empty iterations cost real work. Once a schedule has
fixed the loop nest, the guard can become the loop bound: ``for rj in range(min(R, len))`` with
the update unguarded. This is exact because every store under the loop carries the guard.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, tirx

__all__ = ["bound_kernel_runs"]

_IF_THEN_ELSE = "prim.if_then_else"


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


def _rewrite_loop(loop: tirx.For, loop_name: str):
    """The kernel loop with its extent bounded by the run length and the guard removed."""
    bound = None

    def visit(stmt):
        nonlocal bound
        if isinstance(stmt, tirx.For):
            return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, visit(stmt.body),
                            stmt.thread_binding, stmt.annotations)
        if isinstance(stmt, s_tir.SBlockRealize):
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
            return tirx.SeqStmt([visit(s) for s in stmt.seq])
        raise _Unsupported(type(stmt).__name__)

    body = visit(loop.body)
    if bound is None:
        raise _Unsupported("no update under the kernel loop")
    extent = tirx.Min(loop.extent, tirx.Cast(loop.extent.ty, bound))
    return tirx.For(loop.loop_var, loop.min, extent, loop.kind, body, loop.thread_binding, loop.annotations)


def bound_kernel_runs(func: tirx.PrimFunc, loop_name: str = "rj") -> tirx.PrimFunc:
    """Apply the rewrite to the (scheduled) kernel loop; an unknown shape is left unchanged."""

    def visit(stmt):
        if isinstance(stmt, tirx.For):
            if stmt.loop_var.name == loop_name:
                return _rewrite_loop(stmt, loop_name)
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
