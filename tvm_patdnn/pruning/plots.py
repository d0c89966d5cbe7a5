"""Bar chart of kernel-shape frequencies, the evidence behind PatDNN's pattern set.

PatDNN's claim is that a few shapes dominate the kernels of a trained CNN; plotting how
often each shape occurs (with the chosen set highlighted) shows whether that holds for a
given model. Each bar is labelled with the shape itself, drawn as a small 3x3 glyph.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import PatDNNError
from ..kernel_patterns import mask_array
from ..fileio import check_output_path, write_bytes_atomic

__all__ = ["plot_pattern_frequencies"]


def plot_pattern_frequencies(
    freqs: Mapping[int, int],
    path: str | os.PathLike,
    title: str = "Kernel shape frequencies",
    selected: Sequence[int] | None = None,
    kernel_size: int = 3,
) -> None:
    """Write a PNG bar chart of ``freqs`` (pattern mask -> kernel count) to ``path``.

    Bars are sorted by count; patterns in ``selected`` (the pattern set) are highlighted.
    The file is written atomically, so ``path`` is never half-written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage
    from matplotlib.patches import Patch

    if not freqs:
        raise PatDNNError("no pattern frequencies to plot")
    path = check_output_path(path)
    chosen = {int(p) for p in selected or ()}
    items = sorted(((int(m), int(c)) for m, c in freqs.items()), key=lambda mc: (-mc[1], mc[0]))
    # Selected patterns that never occurred still get a (zero) bar so the whole set is visible.
    items += [(p, 0) for p in sorted(chosen - {m for m, _ in items})]
    masks = [m for m, _ in items]
    counts = np.array([c for _, c in items], dtype=float)
    total = counts.sum()

    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(items) + 1.5), 4.2), dpi=120)
    colours = ["tab:orange" if m in chosen else "tab:blue" for m in masks]
    ax.bar(np.arange(len(items)), counts, color=colours, width=0.8)
    ax.set_xlim(-0.6, len(items) - 0.4)
    ax.set_xticks([])
    ax.set_ylabel("kernels")
    share = counts[[m in chosen for m in masks]].sum() / total if total and chosen else None
    ax.set_title(title if share is None else f"{title}\nselected set covers {share:.1%} of kernels")
    for x, mask in enumerate(masks):
        glyph = np.where(mask_array(mask, kernel_size), 0.1, 0.93)
        image = OffsetImage(glyph, zoom=4.0, cmap="gray", norm=matplotlib.colors.Normalize(0, 1))
        ax.add_artist(
            AnnotationBbox(
                image, (x, 0), xybox=(0, -16), xycoords=("data", "axes fraction"),
                boxcoords="offset points", pad=0.15,
                bboxprops={"edgecolor": "tab:orange" if mask in chosen else "0.7"},
            )
        )
    if chosen:
        ax.legend(
            handles=[Patch(color="tab:orange", label="selected"), Patch(color="tab:blue", label="other")],
            loc="upper right",
        )
    fig.subplots_adjust(bottom=0.18)

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
