"""Per-convolution report: what the compiler did with each conv2d and why."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .kernel_patterns import format_pattern
from .ops.sparse_pointwise import BLOCK
from .tables import format_table

__all__ = ["ConvRecord", "format_report", "format_pattern_usage"]


@dataclass(frozen=True)
class ConvRecord:
    """One conv2d of the model as the pattern pass saw it.

    ``kind`` is "pattern" when the layer runs on the pattern-conv operator, "sparse" for a 1x1
    conv on the block-sparse pointwise kernel (``kept_kernels`` then counts nonzero weights), and
    "dense" when it stays on a dense path, with ``reason`` saying why.
    """

    name: str
    kind: str
    reason: str | None
    data_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]
    n_patterns: int
    kept_kernels: int
    total_kernels: int
    density: float
    dense_flops: int
    nonzero_flops: int
    fused: tuple[str, ...] = ()
    patterns: tuple[int, ...] = ()  # the layer's pattern set (kernel_patterns bit masks)
    pattern_counts: tuple[int, ...] = ()  # kept kernels using each pattern

    def to_dict(self) -> dict:
        """The record for JSON: each pattern drawn as its 3x3 kernel's rows (``["x.x", ".x.",
        "..x"]``, x = kept weight), readable where a bit mask is not."""
        record = asdict(self)
        record["patterns"] = [format_pattern(p).split("/") for p in self.patterns]
        return record


def format_pattern_usage(records: list[ConvRecord]) -> str:
    """One line per pattern layer: its patterns (drawn as rows/of/taps) by kernel count."""
    lines = []
    for r in records:
        if r.kind != "pattern":
            continue
        usage = sorted(zip(r.pattern_counts, r.patterns), reverse=True)
        lines.append(f"{r.name}: " + "  ".join(f"{format_pattern(p)} x{c}" for c, p in usage))
    return "\n".join(lines)


def format_report(records: list[ConvRecord]) -> str:
    """A fixed-width table of the records, one line per conv2d, for terminals."""
    header = ("layer", "weight", "out", "stride", "patterns", "kept kernels", "density", "MFLOPs dense/nz", "verdict")
    rows = []
    for r in records:
        if r.kind == "pattern":
            verdict = "pattern" + (" +" + "+".join(r.fused) if r.fused else "")
        elif r.kind == "sparse":
            verdict = f"sparse 1x1 ({BLOCK}x1 blocks)"
        else:
            verdict = f"dense: {r.reason}"
        rows.append(
            (
                r.name,
                "x".join(map(str, r.weight_shape)),
                "x".join(map(str, r.output_shape)),
                "x".join(map(str, r.stride)),
                str(r.n_patterns) if r.kind == "pattern" else "-",
                f"{r.kept_kernels}/{r.total_kernels}",
                f"{r.density:.3f}",
                f"{r.dense_flops / 1e6:.1f}/{r.nonzero_flops / 1e6:.1f}",
                verdict,
            )
        )
    lines = [format_table(header, rows)]
    pattern_flops = sum(r.nonzero_flops for r in records)
    dense_flops = sum(r.dense_flops for r in records)
    n_pattern = sum(r.kind == "pattern" for r in records)
    n_sparse = sum(r.kind == "sparse" for r in records)
    lines.append(
        f"{len(records)} conv2d layers, {n_pattern} pattern-sparse"
        + (f", {n_sparse} sparse 1x1" if n_sparse else "") + "; "
        f"{dense_flops / 1e6:.1f} MFLOPs dense, {pattern_flops / 1e6:.1f} MFLOPs nonzero"
        + (f" ({dense_flops / pattern_flops:.2f}x fewer)" if pattern_flops else "")
    )
    return "\n".join(lines)
