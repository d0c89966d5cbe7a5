"""FKW packing: PatDNN's compact weight format for pattern-sparse convolutions.

Filters are reordered by their number of kept kernels (so filters that do the same amount
of work sit next to each other: a GPU work group's filters finish together, and CPU threads that
take every T-th filter get equal shares), and inside each filter the
kernels are grouped by pattern. Only kept kernels are stored, each as its pattern's taps, so
the operator loops over "kernels of pattern p of filter f" with the tap offsets known at
compile time: there is no per-weight index to decode at run time, only one input-channel
index per kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .analysis import ConvWeightAnalysis
from .kernel_patterns import mask_taps

__all__ = ["FKWWeight", "pack_fkw"]


@dataclass(frozen=True)
class FKWWeight:
    """A pattern-sparse OIHW weight in FKW form.

    ``offsets[f * P + p] : offsets[f * P + p + 1]`` are the stored kernels of pattern ``p`` of
    reordered filter ``f``; ``channels`` is each stored kernel's input channel and ``values``
    its ``taps`` weights in the pattern's tap order. ``order[f]`` is the original filter of
    reordered filter ``f``.
    """

    patterns: tuple[tuple[tuple[int, int], ...], ...]  # taps (dy, dx) of each pattern
    order: np.ndarray  # (O,) int32
    offsets: np.ndarray  # (O * P + 1,) int32
    channels: np.ndarray  # (kernels,) int32
    values: np.ndarray  # (kernels, taps) float32
    in_channels: int

    @property
    def out_channels(self) -> int:
        return int(self.order.shape[0])

    @property
    def max_run(self) -> int:
        """The longest run of same-pattern kernels of one filter (the inner loop's bound)."""
        return int(np.diff(self.offsets).max(initial=0))

    def to_dense(self) -> np.ndarray:
        """The OIHW weight this packing stores (used to check packing is lossless)."""
        n_patterns = len(self.patterns)
        dense = np.zeros((self.out_channels, self.in_channels, 3, 3), dtype=self.values.dtype)
        for f, original in enumerate(self.order):
            for p, taps in enumerate(self.patterns):
                for j in range(self.offsets[f * n_patterns + p], self.offsets[f * n_patterns + p + 1]):
                    for t, (dy, dx) in enumerate(taps):
                        dense[original, self.channels[j], dy, dx] = self.values[j, t]
        return dense


def pack_fkw(weight: np.ndarray, analysis: ConvWeightAnalysis) -> FKWWeight:
    """Pack a weight that :func:`analyze_conv_weight` found pattern-sparse."""
    if analysis.kind != "pattern" or analysis.assignment is None:
        raise ValueError("only pattern-sparse weights can be packed")
    weight = np.asarray(weight, dtype=np.float32)
    out_channels, in_channels = weight.shape[:2]
    assignment = analysis.assignment
    n_patterns = len(analysis.patterns)
    taps = [mask_taps(p, 3) for p in analysis.patterns]

    kept_per_filter = (assignment >= 0).sum(axis=1)
    order = np.argsort(-kept_per_filter, kind="stable").astype(np.int32)

    # One run per (reordered filter, pattern): the kept input channels, ascending for locality.
    runs = [
        np.flatnonzero(assignment[f] == p) for f in order for p in range(n_patterns)
    ]
    offsets = np.zeros(len(runs) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([len(r) for r in runs])
    channels = np.concatenate(runs).astype(np.int32) if runs else np.zeros(0, np.int32)
    filters = np.repeat(np.repeat(order, n_patterns), [len(r) for r in runs])
    pattern_of = np.repeat(np.tile(np.arange(n_patterns), out_channels), [len(r) for r in runs])
    values = np.zeros((len(channels), analysis.taps), dtype=np.float32)
    for p, pattern_taps in enumerate(taps):
        rows = np.flatnonzero(pattern_of == p)
        for t, (dy, dx) in enumerate(pattern_taps):
            values[rows, t] = weight[filters[rows], channels[rows], dy, dx]
    return FKWWeight(
        patterns=tuple(taps),
        order=order,
        offsets=offsets,
        channels=channels,
        values=values,
        in_channels=in_channels,
    )
