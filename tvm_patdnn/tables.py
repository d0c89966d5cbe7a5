"""Fixed-width text tables for terminals: the one formatter behind every table the CLI prints
(conv report, pruning summary, tuning results, latencies, kernel profile), so they align alike.
Imports nothing of the package."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_table"]


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "", rule: bool = False) -> str:
    """``header`` and ``rows`` (cells already formatted) as columns two spaces apart, each as wide
    as its widest cell. ``align`` has one ``<`` (left) or ``>`` (right) per column, left when
    missing; ``rule`` puts a line of dashes under the header. Trailing spaces are stripped."""
    widths = [max([len(header[c]), *(len(row[c]) for row in rows)]) for c in range(len(header))]
    sides = align.ljust(len(header), "<")

    def line(cells: Sequence[str]) -> str:
        return "  ".join(f"{cell:{side}{width}}" for cell, side, width in zip(cells, sides, widths)).rstrip()

    lines = [line(header)]
    if rule:
        lines.append("  ".join("-" * w for w in widths))
    lines += [line(row) for row in rows]
    return "\n".join(lines)
