"""Weight analysis: is a convolution pattern-sparse, and with which patterns?

The compiler only rewrites a conv2d when every kept kernel's nonzeros fit one shape of a
small pattern set, because that is what lets it generate one code path per pattern instead of
decoding an index per weight. This module decides that from the constant weight alone, so the
answer does not depend on how the model was pruned (our pruner, another tool, or by hand).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import PatDNNError
from .kernel_patterns import candidate_patterns, kernel_masks, popcount

__all__ = ["ConvWeightAnalysis", "PatternOptions", "analyze_conv_weight", "cover_masks"]


@dataclass(frozen=True)
class PatternOptions:
    """What makes a 3x3 conv pattern-sparse: every kept kernel has at most ``entries`` nonzeros
    and the layer's kernels fit at most ``max_patterns`` shapes. One value threaded from the user
    (``compile``, ``tune``, ``--entries``/``--max-patterns``) to the pattern pass; checked here
    because out of range every layer would silently stay dense."""

    entries: int = 4
    max_patterns: int = 12

    def __post_init__(self) -> None:
        entries, max_patterns = self.entries, self.max_patterns
        if isinstance(entries, bool) or not isinstance(entries, int) or not 1 <= entries <= 9:
            raise PatDNNError(f"entries (the nonzeros a pattern kernel may keep) must be 1..9, got {entries!r}")
        if isinstance(max_patterns, bool) or not isinstance(max_patterns, int) or max_patterns < 1:
            raise PatDNNError(f"max_patterns (patterns per layer) must be a positive integer, got {max_patterns!r}")


@dataclass(frozen=True)
class ConvWeightAnalysis:
    """What the pattern pass needs to know about one OIHW weight.

    ``patterns`` holds the layer's pattern set (bit masks with ``taps`` taps each) and
    ``assignment`` the pattern index of every kernel (-1 for removed kernels), so packing never
    has to search again.
    """

    kind: str  # "pattern" or "dense"
    reason: str | None
    kernel_size: tuple[int, int]
    total_kernels: int
    kept_kernels: int
    nonzeros: int
    patterns: tuple[int, ...] = ()
    taps: int = 0
    assignment: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def density(self) -> float:
        """Fraction of the dense weight's entries that are nonzero."""
        kh, kw = self.kernel_size
        return self.nonzeros / max(1, self.total_kernels * kh * kw)


def cover_masks(masks: np.ndarray, taps: int, kernel_size: int = 3) -> list[int]:
    """A small set of ``taps``-tap patterns such that every mask is a subset of one of them.

    Masks that already have ``taps`` taps must be patterns themselves; smaller masks are
    covered greedily by the candidate shape that covers most of the still-uncovered ones
    (minimum set cover is NP-hard, and greedy is exact in the common case where the small
    masks are subsets of the full ones).
    """
    distinct = sorted({int(m) for m in np.unique(masks) if m != 0})
    full = [m for m in distinct if bin(m).count("1") == taps]
    chosen = list(full)
    uncovered = [m for m in distinct if not any(m & p == m for p in chosen)]
    if uncovered:
        candidates = candidate_patterns(taps, kernel_size, force_centre=False)
        while uncovered:
            best = max(candidates, key=lambda p: (sum(m & p == m for m in uncovered), -p))
            chosen.append(best)
            uncovered = [m for m in uncovered if m & best != m]
    return chosen


def analyze_conv_weight(weight: np.ndarray, entries: int = 4, max_patterns: int = 12) -> ConvWeightAnalysis:
    """Decide whether an OIHW conv weight is pattern-sparse.

    A layer is pattern-sparse when it is 3x3, every kept kernel has at most ``entries``
    nonzeros, and all kept kernels fit at most ``max_patterns`` shapes. A kernel with fewer
    nonzeros than its pattern is a subset of it and needs no shape of its own.
    """
    weight = np.asarray(weight)
    o, i, kh, kw = weight.shape
    masks = kernel_masks(weight)
    counts = popcount(masks)
    common = dict(
        kernel_size=(kh, kw),
        total_kernels=o * i,
        kept_kernels=int((masks != 0).sum()),
        nonzeros=int(counts.sum()),
    )

    def dense(reason: str) -> ConvWeightAnalysis:
        return ConvWeightAnalysis(kind="dense", reason=reason, **common)

    if (kh, kw) != (3, 3):
        return dense(f"kernel {kh}x{kw} is not 3x3")
    if common["kept_kernels"] == 0:
        return dense("all kernels are zero")
    most = int(counts.max())
    if most > entries:
        return dense(f"kernels have up to {most} nonzeros, more than the {entries} of a pattern")
    # Patterns as small as the largest kernel do the least work, but when pruning left no
    # kernel with all of its taps, the full-size patterns the pruner chose may be the
    # smaller set: take whichever cover needs fewer patterns.
    covers = [(most, cover_masks(masks, most, kh))]
    if most < entries:
        covers.append((entries, cover_masks(masks, entries, kh)))
    most, patterns = min(covers, key=lambda cover: len(cover[1]))
    if len(patterns) > max_patterns:
        return dense(f"kernels need {len(patterns)} patterns, more than max_patterns={max_patterns}")
    assignment = np.full(masks.shape, -1, dtype=np.int64)
    for index in reversed(range(len(patterns))):
        fits = (masks != 0) & ((masks & patterns[index]) == masks)
        assignment[fits] = index
    return ConvWeightAnalysis(
        kind="pattern",
        reason=None,
        patterns=tuple(patterns),
        taps=most,
        assignment=assignment,
        **common,
    )
