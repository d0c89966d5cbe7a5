"""Integer arithmetic of tile and work-group sizes, shared by the operators, their rewrites and
the schedule rules. At the bottom of the package (it imports nothing of it), so any layer can use
it without pulling in another: operators do not import schedule rules to size a work group."""

from __future__ import annotations

__all__ = ["ceil_div", "largest_divisor", "output_size", "round_up", "work_group_size"]


def ceil_div(value, divisor):
    """``ceil(value / divisor)`` for ints, and for TIR expressions as the same floor division."""
    return -(-value // divisor)


def output_size(size: int, pad_before: int, pad_after: int, kernel: int, stride: int) -> int:
    """Outputs along one axis of a window slid over ``size`` padded inputs (floor mode, dilation 1)."""
    return (size + pad_before + pad_after - kernel) // stride + 1


def round_up(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple``."""
    return ceil_div(value, multiple) * multiple


def largest_divisor(n: int, limit: int) -> int:
    """The largest tile size up to ``limit`` that divides ``n`` (no tail, no predicate)."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def work_group_size(items: int, wave: int, max_threads: int) -> int:
    """GPU work items per group: whole waves, enough of them to keep the SIMD busy, never much
    more than ``items``."""
    size = wave
    while size * 2 <= min(max_threads, 256) and size * 2 * 4 <= items:
        size *= 2
    return size
