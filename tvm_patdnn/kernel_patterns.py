"""Kernel patterns: which taps of a KxK convolution kernel hold weights.

A *pattern* is stored as an integer bit mask over the kernel's taps in row-major order
(bit ``dy * K + dx`` is set when tap ``(dy, dx)`` is kept). Integers are hashable, cheap to
count with numpy and unambiguous, so the pruning stage (which chooses patterns) and the
compiler (which detects and packs them) share this one encoding.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

__all__ = [
    "kernel_masks",
    "mask_taps",
    "taps_mask",
    "mask_array",
    "popcount",
    "candidate_patterns",
    "format_pattern",
]


def kernel_masks(weight: np.ndarray) -> np.ndarray:
    """Bit mask of the nonzero taps of every kernel of an OIHW weight, shape ``(O, I)``.

    A kernel that is entirely zero has mask 0 (it was removed by connectivity pruning).
    """
    weight = np.asarray(weight)
    if weight.ndim != 4:
        raise ValueError(f"expected an OIHW weight, got shape {weight.shape}")
    o, i, kh, kw = weight.shape
    bits = (np.asarray(weight != 0).reshape(o, i, kh * kw)).astype(np.int64)
    return (bits << np.arange(kh * kw, dtype=np.int64)).sum(axis=-1)


def mask_taps(mask: int, kernel_size: int = 3) -> tuple[tuple[int, int], ...]:
    """The kept taps ``(dy, dx)`` of a pattern, in row-major order."""
    return tuple(
        divmod(k, kernel_size) for k in range(kernel_size * kernel_size) if (int(mask) >> k) & 1
    )


def taps_mask(taps, kernel_size: int = 3) -> int:
    """The bit mask of a collection of ``(dy, dx)`` taps."""
    mask = 0
    for dy, dx in taps:
        if not (0 <= dy < kernel_size and 0 <= dx < kernel_size):
            raise ValueError(f"tap {(dy, dx)} is outside a {kernel_size}x{kernel_size} kernel")
        mask |= 1 << (dy * kernel_size + dx)
    return mask


def mask_array(mask: int, kernel_size: int = 3) -> np.ndarray:
    """A pattern as a ``(K, K)`` boolean array."""
    k2 = kernel_size * kernel_size
    return ((int(mask) >> np.arange(k2)) & 1).astype(bool).reshape(kernel_size, kernel_size)


def popcount(masks) -> np.ndarray:
    """Number of kept taps of each mask (vectorised over an integer array)."""
    masks = np.asarray(masks, dtype=np.int64)
    count = np.zeros(masks.shape, dtype=np.int64)
    for k in range(63):
        if not (masks >> k).any():
            break
        count += (masks >> k) & 1
    return count


def candidate_patterns(entries: int = 4, kernel_size: int = 3, force_centre: bool = True) -> list[int]:
    """Every pattern with exactly ``entries`` taps (the centre always kept when forced).

    For 3x3 kernels and 4 entries with the centre forced this is PatDNN's library of
    C(8, 3) = 56 candidate shapes.
    """
    k2 = kernel_size * kernel_size
    if not 1 <= entries <= k2:
        raise ValueError(f"entries must be between 1 and {k2}, got {entries}")
    centre = (kernel_size // 2) * kernel_size + kernel_size // 2
    if force_centre and kernel_size % 2 == 1:
        others = [k for k in range(k2) if k != centre]
        return sorted((1 << centre) | sum(1 << k for k in c) for c in combinations(others, entries - 1))
    return sorted(sum(1 << k for k in c) for c in combinations(range(k2), entries))


def format_pattern(mask: int, kernel_size: int = 3) -> str:
    """A pattern drawn on one line, rows separated by ``/``: ``'.x./xx./.x.'``."""
    arr = mask_array(mask, kernel_size)
    return "/".join("".join("x" if v else "." for v in row) for row in arr)
