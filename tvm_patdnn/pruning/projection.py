"""Euclidean projections onto PatDNN's sparsity constraints, in plain numpy.

PatDNN prunes a 3x3 convolution in two ways at once:

* *kernel pattern pruning*: every kernel keeps only the taps of one pattern from a small set
  (typically 8 patterns of 4 taps, the centre always kept);
* *connectivity pruning*: whole kernels (input-to-output channel connections) are removed,
  keeping ``round(O * I / rate)`` of them.

Both are used as hard pruning steps (one-shot pruning of a pretrained model) and as the
projection step of ADMM training, so each is implemented here as an *exact* Euclidean
projection: the result is the point of the constraint set closest to the input weight.
Patterns are the integer bit masks of :mod:`tvm_patdnn.kernel_patterns`.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from ..arith import ceil_div
from ..errors import PatDNNError
from ..kernel_patterns import candidate_patterns, mask_array

__all__ = [
    "top_shape",
    "pattern_frequencies",
    "select_pattern_set",
    "assign_patterns",
    "project_patterns",
    "pattern_taps",
    "check_rate",
    "kept_kernel_count",
    "project_connectivity",
    "project_pattern_and_connectivity",
    "prunable_reason",
    "parse_block",
    "block_grid",
    "kept_block_count",
    "pointwise_mask",
    "project_pointwise",
    "pointwise_reason",
]


def _check_weight(weight: np.ndarray) -> np.ndarray:
    weight = np.asarray(weight)
    if weight.ndim != 4:
        raise PatDNNError(f"expected a 4-D OIHW convolution weight, got shape {weight.shape}")
    if weight.shape[2] != weight.shape[3]:
        raise PatDNNError(f"expected a square KxK kernel, got {weight.shape[2]}x{weight.shape[3]}")
    if not np.issubdtype(weight.dtype, np.floating):
        raise PatDNNError(f"expected a floating-point weight, got dtype {weight.dtype}")
    return weight


def _energy(weight: np.ndarray) -> np.ndarray:
    """Squared taps as float64, shape ``(O, I, K*K)``: exact enough to rank kernels reproducibly."""
    o, i, kh, kw = weight.shape
    return np.square(weight.astype(np.float64)).reshape(o, i, kh * kw)


def top_shape(weight: np.ndarray, entries: int = 4, force_centre: bool = True) -> np.ndarray:
    """Shape of each kernel's ``entries`` largest-magnitude taps, as ``(O, I)`` int masks.

    This is the pattern a kernel "wants": PatDNN counts these shapes over a pretrained model to
    choose its pattern set. With ``force_centre`` the centre tap is always part of the shape
    (PatDNN's patterns all keep it) and the other ``entries - 1`` taps are the largest of the
    rest. Equal magnitudes go to the earlier tap in row-major order, so the result is
    deterministic. An all-zero kernel (already removed) has no shape: its mask is 0.
    """
    weight = _check_weight(weight)
    o, i, k, _ = weight.shape
    k2 = k * k
    if not 1 <= entries <= k2:
        raise PatDNNError(f"entries must be between 1 and {k2} for a {k}x{k} kernel, got {entries}")
    magnitude = np.abs(weight.astype(np.float64)).reshape(o * i, k2)
    centre = (k // 2) * k + k // 2
    if force_centre and k % 2 == 1:
        magnitude[:, centre] = np.inf  # always among the largest
    # Stable sort on -|w|: ties keep row-major order.
    order = np.argsort(-magnitude, axis=1, kind="stable")[:, :entries]
    masks = (np.int64(1) << order.astype(np.int64)).sum(axis=1)
    masks[~np.asarray(weight != 0).reshape(o * i, k2).any(axis=1)] = 0
    return masks.reshape(o, i)


def pattern_frequencies(
    weights: Iterable[np.ndarray], entries: int = 4, force_centre: bool = True
) -> dict[int, int]:
    """How many kernels of the given OIHW weights have each :func:`top_shape`.

    All-zero kernels are not counted. The dict is ordered by decreasing count, then by mask,
    which is the order :func:`select_pattern_set` picks from.
    """
    counts: Counter[int] = Counter()
    kernel_size = None
    for weight in weights:
        weight = _check_weight(weight)
        if kernel_size is not None and weight.shape[2] != kernel_size:
            raise PatDNNError(
                f"all weights must share one kernel size, got {kernel_size}x{kernel_size} "
                f"and {weight.shape[2]}x{weight.shape[3]}"
            )
        kernel_size = weight.shape[2]
        shapes = top_shape(weight, entries, force_centre)
        counts.update(int(m) for m in shapes[shapes != 0].ravel())
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def select_pattern_set(
    weights: Iterable[np.ndarray],
    n_patterns: int = 8,
    entries: int = 4,
    force_centre: bool = True,
) -> list[int]:
    """PatDNN's pattern set: the ``n_patterns`` most frequent kernel shapes over all weights.

    Counting over all given layers together gives one set per model, which is what the
    compiler specialises its kernels for. Ties in count go to the smaller mask. When the
    weights show fewer distinct shapes than requested, the set is filled with the remaining
    candidate patterns in mask order; they are only used where they fit a kernel as well as
    an observed shape, so the set always has the requested size.
    """
    weights = list(weights)
    if not weights:
        raise PatDNNError("no weights given to choose a pattern set from")
    kernel_size = _check_weight(weights[0]).shape[2]
    try:
        candidates = candidate_patterns(entries, kernel_size, force_centre)
    except ValueError as exc:
        raise PatDNNError(str(exc)) from exc
    if not 1 <= n_patterns <= len(candidates):
        raise PatDNNError(
            f"n_patterns must be between 1 and {len(candidates)} (the number of "
            f"{entries}-entry candidate patterns{' with the centre kept' if force_centre else ''}), "
            f"got {n_patterns}"
        )
    counts = pattern_frequencies(weights, entries, force_centre)
    ranked = sorted(candidates, key=lambda mask: (-counts.get(mask, 0), mask))
    return ranked[:n_patterns]


def _pattern_matrix(patterns: Sequence[int], kernel_size: int) -> np.ndarray:
    """Patterns as a ``(K*K, n)`` 0/1 float matrix, after checking they fit the kernel."""
    patterns = [int(p) for p in patterns]
    if not patterns:
        raise PatDNNError("the pattern set is empty")
    k2 = kernel_size * kernel_size
    for p in patterns:
        if not 0 < p < (1 << k2):
            raise PatDNNError(f"pattern {p} is not a nonempty mask of a {kernel_size}x{kernel_size} kernel")
    return np.stack([mask_array(p, kernel_size).ravel() for p in patterns], axis=1).astype(np.float64)


def assign_patterns(weight: np.ndarray, patterns: Sequence[int]) -> np.ndarray:
    """The pattern each kernel is projected onto, as ``(O, I)`` int masks.

    It is the pattern that keeps the largest squared norm of the kernel, since keeping the
    most norm is the same as moving the weight the least. Ties (including all-zero kernels)
    go to the earliest pattern in ``patterns``, so every entry is a pattern of the set; the
    masks can be used directly as masked-retraining masks.
    """
    weight = _check_weight(weight)
    matrix = _pattern_matrix(patterns, weight.shape[2])
    kept = _energy(weight) @ matrix  # (O, I, n): squared norm each pattern keeps
    choice = np.argmax(kept, axis=-1)  # first maximum on ties
    return np.asarray([int(p) for p in patterns], dtype=np.int64)[choice]


def pattern_taps(masks: np.ndarray, kernel_size: int) -> np.ndarray:
    """Kernel bit masks of any shape as boolean ``(..., K, K)`` tap arrays (the keep-masks of
    masked retraining); a layer uses only a few distinct patterns, so each is drawn once."""
    values, index = np.unique(np.asarray(masks, dtype=np.int64), return_inverse=True)
    drawn = np.array([mask_array(v, kernel_size) for v in values], dtype=bool).reshape(-1, kernel_size, kernel_size)
    return drawn[index.reshape(np.shape(masks))]


def _apply_masks(weight: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Zero the taps outside each kernel's mask; kept values are copied bit for bit."""
    return np.where(pattern_taps(masks, weight.shape[2]), weight, np.zeros((), dtype=weight.dtype))


def project_patterns(weight: np.ndarray, patterns: Sequence[int]) -> np.ndarray:
    """Project every kernel of an OIHW weight onto its best pattern of the set.

    The constraint "each kernel is supported on one of the patterns" is a union of coordinate
    subspaces, independently per kernel, so the closest point keeps each kernel's taps on the
    pattern with the largest kept norm (:func:`assign_patterns`) and zeroes the rest.
    All-zero kernels stay zero.
    """
    weight = _check_weight(weight)
    return _apply_masks(weight, assign_patterns(weight, patterns))


def check_rate(rate: object, what: str) -> float:
    """A pruning rate (dense size / kept size) as a float; raises unless it is a finite number >= 1."""
    if isinstance(rate, bool) or not (isinstance(rate, numbers.Real) and math.isfinite(rate)) or rate < 1:
        raise PatDNNError(f"{what} must be a finite number >= 1, got {rate!r}")
    return float(rate)


def _kept_count(n: int, rate: float, what: str, unit: str) -> int:
    """``round(n / rate)``, halves up; raises unless ``rate`` is a valid rate that keeps something."""
    check_rate(rate, what)
    kept = math.floor(n / rate + 0.5)
    if kept < 1:
        raise PatDNNError(f"{what} {rate} keeps no {unit} of a layer with {n} {unit}s (at most {n} is allowed)")
    return kept


def kept_kernel_count(n_kernels: int, rate: float) -> int:
    """Kernels kept by connectivity pruning at ``rate``: ``round(n_kernels / rate)``, halves up.

    Raises when the rate is not a finite number >= 1 or would keep no kernel at all, since a
    layer without any connection cuts the network.
    """
    return _kept_count(n_kernels, rate, "connectivity rate", "kernel")


def _keep_largest(weight: np.ndarray, norms: np.ndarray, rate: float) -> np.ndarray:
    """Zero all kernels but the ``kept_kernel_count`` ones with the largest ``norms``."""
    o, i = norms.shape
    kept = kept_kernel_count(o * i, rate)
    # Stable sort on -norm: equal norms keep the earlier kernel, deterministically.
    order = np.argsort(-norms.ravel(), kind="stable")
    keep = np.zeros(o * i, dtype=bool)
    keep[order[:kept]] = True
    return np.where(keep.reshape(o, i, 1, 1), weight, np.zeros((), dtype=weight.dtype))


def project_connectivity(weight: np.ndarray, rate: float) -> np.ndarray:
    """Keep the ``round(O*I / rate)`` kernels of largest L2 norm, zero the others.

    Removing a kernel costs exactly its squared norm, so keeping the largest ones is the
    Euclidean projection onto "at most that many nonzero kernels".
    """
    weight = _check_weight(weight)
    return _keep_largest(weight, _energy(weight).sum(axis=-1), rate)


def project_pattern_and_connectivity(
    weight: np.ndarray, patterns: Sequence[int], rate: float | None
) -> np.ndarray:
    """Hard-prune to both constraints: pattern projection, then keep the strongest kernels.

    For any choice of kept kernels the closest point puts each kept kernel on its best
    pattern, so the squared distance is ``||W||^2 - sum(kept projected norms^2)``. It is
    smallest when the kept kernels are those with the largest norm *after* pattern
    projection, which makes "project onto patterns, then connectivity-prune the result"
    the exact projection onto the intersection (pruning by the dense norms would not be).
    ``rate=None`` applies the pattern constraint only.
    """
    projected = project_patterns(weight, patterns)
    if rate is None:
        return projected
    return _keep_largest(projected, _energy(projected).sum(axis=-1), rate)


def prunable_reason(
    weight_shape: Sequence[int],
    groups: int = 1,
    dilations: Sequence[int] = (1, 1),
    first_layer_dense: bool = True,
) -> str | None:
    """Why a convolution is left dense by default, or ``None`` when it is pattern-prunable.

    Patterns are defined for plain 3x3 kernels only; depthwise/grouped and dilated layers
    have too few weights or a different access pattern for the pattern compiler. The first
    layer (at most 3 input channels, e.g. RGB) holds few weights but is very sensitive, so
    PatDNN keeps it dense.
    """
    return _plain_conv_reason(weight_shape, (3, 3), groups, dilations, first_layer_dense)


def _plain_conv_reason(weight_shape: Sequence[int], kernel: tuple[int, int], groups: int,
                       dilations: Sequence[int], first_layer_dense: bool) -> str | None:
    """Why a conv is not a plain (ungrouped, undilated) ``kernel`` conv past the first layer: the
    checks the 3x3 pattern and the 1x1 pointwise pruning share, or ``None``."""
    shape = tuple(int(d) for d in weight_shape)
    if len(shape) != 4:
        return f"weight of rank {len(shape)} is not a 2-D convolution (OIHW)"
    _, i_per_group, kh, kw = shape
    if (kh, kw) != kernel:
        return f"kernel {kh}x{kw} is not {kernel[0]}x{kernel[1]}"
    if groups != 1:
        kind = "depthwise" if i_per_group == 1 else "grouped"
        return f"{kind} (group={groups})"
    if any(int(d) != 1 for d in dilations):
        return f"dilated (dilations={tuple(int(d) for d in dilations)})"
    if first_layer_dense and i_per_group <= 3:
        plural = "s" if i_per_group != 1 else ""
        return f"first layer ({i_per_group} input channel{plural}) kept dense"
    return None


# ---------------------------------------------------------------------- pointwise (1x1) and FC layers
#
# A 1x1 convolution is a matrix product, and each of its "kernels" is a single weight, so
# PatDNN's connectivity pruning of it is sparsity of the (O, I) weight matrix. The sparse
# operator that runs it processes *blocks*: ``block=(bo, bi)`` groups ``bo`` consecutive output
# channels and ``bi`` consecutive input channels that are kept or removed together (``(4, 1)``:
# one input channel's weights for 4 output channels, a vector along output channels;
# ``(1, 1)``: unstructured). The constraint is "at most ``round(n_blocks / rate)`` blocks
# nonzero", where the last block of a row or column is partial when the channel count is not a
# multiple of the block: it still counts as one block, because the operator pads it to a full
# one and pays the same for it.


def parse_block(block: object) -> tuple[int, int]:
    """A block size as ``(output channels, input channels)``, from a pair or a text like ``"4x1"``."""
    text = block.strip().lower() if isinstance(block, str) else None
    try:
        parts = tuple(text.split("x")) if text is not None else tuple(block)  # type: ignore[arg-type]
        if len(parts) != 2:
            raise ValueError
        if text is None and not all(isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in parts):
            raise ValueError
        bo, bi = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise PatDNNError(f"a block is two positive integers (output x input channels) such as 4x1, got {block!r}") from None
    if bo < 1 or bi < 1:
        raise PatDNNError(f"a block is two positive integers (output x input channels) such as 4x1, got {block!r}")
    return bo, bi


def _pointwise_weight(weight: np.ndarray) -> np.ndarray:
    """Check a 1x1 OIHW conv weight or an (out, in) FC matrix; return it as the (O, I) matrix."""
    weight = np.asarray(weight)
    if not np.issubdtype(weight.dtype, np.floating):
        raise PatDNNError(f"expected a floating-point weight, got dtype {weight.dtype}")
    if weight.ndim == 4 and weight.shape[2:] == (1, 1):
        return weight.reshape(weight.shape[:2])
    if weight.ndim == 2:
        return weight
    raise PatDNNError(f"expected a 1x1 OIHW convolution weight or an (out, in) matrix, got shape {weight.shape}")


def block_grid(shape: Sequence[int], block: object) -> tuple[int, int]:
    """Blocks per column and per row of an ``(O, I, ...)`` weight: ``(ceil(O/bo), ceil(I/bi))``.

    Raises when the block is larger than the layer in either dimension: such a layer cannot hold
    a single full block, so the granularity is meaningless for it.
    """
    bo, bi = parse_block(block)
    o, i = int(shape[0]), int(shape[1])
    if bo > o or bi > i:
        raise PatDNNError(f"block {bo}x{bi} does not fit a layer with {o} output and {i} input channels")
    return ceil_div(o, bo), ceil_div(i, bi)


def kept_block_count(n_blocks: int, rate: float) -> int:
    """Blocks kept by pointwise pruning at ``rate``: ``round(n_blocks / rate)``, halves up."""
    return _kept_count(n_blocks, rate, "pointwise rate", "block")


def pointwise_mask(weight: np.ndarray, rate: float, block: object = (1, 1)) -> np.ndarray:
    """The keep-mask (same shape as ``weight``) of the ``round(n_blocks / rate)`` blocks of largest norm.

    Removing a block costs exactly its squared norm, so keeping the largest blocks is the
    Euclidean projection onto "at most that many nonzero blocks". Equal norms go to the earlier
    block (output-channel blocks first, then input-channel blocks), so the result is
    deterministic; a kept block may contain zeros (or be all zero when fewer blocks are nonzero).
    """
    matrix = _pointwise_weight(weight)
    grid = block_grid(matrix.shape, block)
    bo, bi = parse_block(block)
    o, i = matrix.shape
    energy = np.zeros((grid[0] * bo, grid[1] * bi))
    energy[:o, :i] = np.square(matrix.astype(np.float64))
    norms = energy.reshape(grid[0], bo, grid[1], bi).sum(axis=(1, 3))
    kept = kept_block_count(norms.size, rate)
    order = np.argsort(-norms.ravel(), kind="stable")
    keep = np.zeros(norms.size, dtype=bool)
    keep[order[:kept]] = True
    full = np.repeat(np.repeat(keep.reshape(grid), bo, axis=0), bi, axis=1)[:o, :i]
    return full.reshape(np.shape(weight))


def project_pointwise(weight: np.ndarray, rate: float, block: object = (1, 1)) -> np.ndarray:
    """Project a 1x1 conv or FC weight onto "at most ``round(n_blocks / rate)`` nonzero blocks"
    (:func:`pointwise_mask`); kept values are copied bit for bit."""
    weight = np.asarray(weight)
    return np.where(pointwise_mask(weight, rate, block), weight, np.zeros((), dtype=weight.dtype))


def pointwise_reason(weight_shape: Sequence[int], groups: int = 1, first_layer_dense: bool = True) -> str | None:
    """Why a convolution is not pointwise-prunable, or ``None`` for a plain 1x1 conv.

    Grouped/depthwise 1x1 convs have no channel matrix to sparsify; a first layer (at most 3
    input channels) is kept dense for the same reason as with 3x3 kernels.
    """
    return _plain_conv_reason(weight_shape, (1, 1), groups, (1, 1), first_layer_dense)
