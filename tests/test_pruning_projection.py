"""The pruning projections are exact Euclidean projections onto PatDNN's constraint sets.

Optimality is checked against brute force: for tiny layers every assignment of a pattern (or
removal) to every kernel is enumerated, and no feasible point may be closer than ours.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tvm_patdnn.errors import PatDNNError
from tvm_patdnn.kernel_patterns import candidate_patterns, kernel_masks, popcount, taps_mask
from tvm_patdnn.pruning import (
    assign_patterns,
    kept_kernel_count,
    pattern_frequencies,
    project_connectivity,
    project_pattern_and_connectivity,
    project_patterns,
    prunable_reason,
    select_pattern_set,
    top_shape,
)

CANDIDATES = candidate_patterns()
CENTRE = 1 << 4
SETTINGS = settings(deadline=None, max_examples=100)

# Values include exact zeros and repeated magnitudes so ties and empty kernels are exercised.
values = st.one_of(st.just(0.0), st.sampled_from([1.0, -1.0, 0.5]), st.floats(-4, 4, width=32))


@st.composite
def tiny_weights(draw, max_kernels: int = 4) -> np.ndarray:
    o = draw(st.integers(1, 2))
    i = draw(st.integers(1, max_kernels // o))
    return draw(arrays(np.float32, (o, i, 3, 3), elements=values))


pattern_sets = st.lists(st.sampled_from(CANDIDATES), min_size=1, max_size=3, unique=True)


def kernel_energy(weight: np.ndarray) -> np.ndarray:
    return np.square(weight.astype(np.float64)).reshape(weight.shape[0], weight.shape[1], 9)


def distance2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.square(a.astype(np.float64) - b.astype(np.float64)).sum())


def brute_force_distance2(weight: np.ndarray, patterns, max_kept: int | None) -> float:
    """Squared distance from ``weight`` to the constraint set, by enumerating every support.

    A point of the set puts each kernel on one pattern (or removes it, when connectivity
    limits the kept kernels to ``max_kept``); for a fixed support the closest point copies
    the weight there, so the distance is the energy outside the support.
    """
    energy = kernel_energy(weight).reshape(-1, 9)
    choices = [int(p) for p in patterns] + ([0] if max_kept is not None else [])
    best = np.inf
    for assignment in itertools.product(choices, repeat=energy.shape[0]):
        if max_kept is not None and sum(m != 0 for m in assignment) > max_kept:
            continue
        outside = sum(
            e[[not (m >> t) & 1 for t in range(9)]].sum() for e, m in zip(energy, assignment)
        )
        best = min(best, outside)
    return float(best)


def assert_on_patterns(result: np.ndarray, patterns) -> None:
    masks = kernel_masks(result)
    for m in masks.ravel():
        assert m == 0 or any((int(m) & ~int(p)) == 0 for p in patterns)


def assert_values_copied(result: np.ndarray, weight: np.ndarray) -> None:
    """Kept weights are the original values bit for bit; pruned ones are exactly zero."""
    kept = result != 0
    assert np.array_equal(result[kept], weight[kept])
    assert result.dtype == weight.dtype


# --- top shapes and the pattern set -------------------------------------------------------


@SETTINGS
@given(weight=tiny_weights(max_kernels=6), entries=st.integers(1, 9), centre=st.booleans())
def test_top_shape_keeps_largest_taps(weight, entries, centre):
    shapes = top_shape(weight, entries, force_centre=centre)
    assert shapes.shape == weight.shape[:2]
    magnitude = np.abs(weight).reshape(*weight.shape[:2], 9)
    for (o, i), mask in np.ndenumerate(shapes):
        if not magnitude[o, i].any():
            assert mask == 0
            continue
        assert popcount(mask) == entries
        if centre:
            assert mask & CENTRE
        kept = [t for t in range(9) if (mask >> t) & 1 and not (centre and t == 4)]
        dropped = [t for t in range(9) if not (mask >> t) & 1]
        if kept and dropped:
            assert magnitude[o, i, kept].min() >= magnitude[o, i, dropped].max()


def test_top_shape_ties_are_row_major():
    weight = np.ones((1, 1, 3, 3), np.float32)
    assert top_shape(weight)[0, 0] == taps_mask([(0, 0), (0, 1), (0, 2), (1, 1)])
    assert top_shape(weight, force_centre=False)[0, 0] == taps_mask([(0, 0), (0, 1), (0, 2), (1, 0)])


def _kernels_with_shapes(shapes_counts: dict[int, int], seed: int = 0) -> np.ndarray:
    """A (1, N, 3, 3) weight whose kernels have exactly the given top shapes."""
    rng = np.random.default_rng(seed)
    kernels = []
    for mask, count in shapes_counts.items():
        for _ in range(count):
            k = rng.uniform(0.0, 0.1, 9) * rng.choice([-1, 1], 9)
            on = [(mask >> t) & 1 for t in range(9)]
            k[np.array(on, bool)] = rng.uniform(1.0, 2.0, sum(on)) * rng.choice([-1, 1], sum(on))
            kernels.append(k.reshape(3, 3))
    return np.stack(kernels)[None].astype(np.float32)


def test_select_pattern_set_counts_all_layers_together():
    a, b, c, d = CANDIDATES[5], CANDIDATES[17], CANDIDATES[30], CANDIDATES[44]
    layer1 = _kernels_with_shapes({a: 5, b: 1, c: 3})
    layer2 = _kernels_with_shapes({b: 6, d: 2}, seed=1)
    assert pattern_frequencies([layer1, layer2]) == {b: 7, a: 5, c: 3, d: 2}
    assert select_pattern_set([layer1, layer2], n_patterns=3) == [b, a, c]
    # Per layer the order differs: the set is a property of the model, not of one layer.
    assert select_pattern_set([layer1], n_patterns=1) == [a]


def test_select_pattern_set_breaks_ties_by_mask_and_fills_up_to_size():
    a, b = CANDIDATES[40], CANDIDATES[3]
    weight = _kernels_with_shapes({a: 2, b: 2})
    chosen = select_pattern_set([weight], n_patterns=8)
    assert chosen[:2] == [b, a]  # equal counts: smaller mask first
    assert len(chosen) == len(set(chosen)) == 8
    assert chosen[2:] == [p for p in CANDIDATES if p not in (a, b)][:6]
    assert select_pattern_set([weight], n_patterns=8) == chosen


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_patterns": 0}, "n_patterns must be between 1 and 56"),
        ({"n_patterns": 57}, "n_patterns must be between 1 and 56"),
        ({"n_patterns": 9, "entries": 8}, "between 1 and 8"),
        ({"entries": 0}, "entries must be between 1 and 9"),
    ],
)
def test_select_pattern_set_rejects_bad_sizes(kwargs, message):
    weight = np.ones((2, 2, 3, 3), np.float32)
    with pytest.raises(PatDNNError, match=message):
        select_pattern_set([weight], **kwargs)


def test_bad_weights_are_rejected():
    with pytest.raises(PatDNNError, match="4-D OIHW"):
        project_patterns(np.ones((3, 3)), CANDIDATES[:2])
    with pytest.raises(PatDNNError, match="no weights"):
        select_pattern_set([])
    with pytest.raises(PatDNNError, match="share one kernel size"):
        pattern_frequencies([np.ones((1, 1, 3, 3)), np.ones((1, 1, 5, 5))])
    with pytest.raises(PatDNNError, match="pattern set is empty"):
        project_patterns(np.ones((1, 1, 3, 3)), [])
    with pytest.raises(PatDNNError, match="not a nonempty mask"):
        project_patterns(np.ones((1, 1, 3, 3)), [1 << 9])


# --- exact projections --------------------------------------------------------------------


@SETTINGS
@given(weight=tiny_weights(), patterns=pattern_sets)
def test_project_patterns_is_exact_projection(weight, patterns):
    result = project_patterns(weight, patterns)
    assert_on_patterns(result, patterns)
    assert_values_copied(result, weight)
    best = brute_force_distance2(weight, patterns, None)
    assert distance2(result, weight) <= best + 1e-9 * (1 + best)
    assert np.array_equal(project_patterns(result, patterns), result)  # idempotent
    # project_patterns is the weight restricted to the assigned patterns.
    assigned = assign_patterns(weight, patterns)
    assert set(assigned.ravel().tolist()) <= set(patterns)
    assert np.all((kernel_masks(result) & ~assigned) == 0)


@SETTINGS
@given(weight=tiny_weights(max_kernels=6), data=st.data())
def test_project_connectivity_is_exact_projection(weight, data):
    n = weight.shape[0] * weight.shape[1]
    rate = data.draw(st.floats(1.0, float(n)))
    kept = kept_kernel_count(n, rate)
    result = project_connectivity(weight, rate)
    assert np.count_nonzero(kernel_masks(result)) <= kept
    # Every kernel is either untouched or removed.
    for (o, i), _ in np.ndenumerate(result[:, :, 0, 0]):
        assert np.array_equal(result[o, i], weight[o, i]) or not result[o, i].any()
    energy = np.sort(kernel_energy(weight).sum(-1).ravel())
    best = energy[: n - kept].sum()  # removing the weakest kernels
    assert distance2(result, weight) <= best + 1e-9 * (1 + best)
    assert np.array_equal(project_connectivity(result, rate), result)


@SETTINGS
@given(weight=tiny_weights(), patterns=pattern_sets, data=st.data())
def test_project_pattern_and_connectivity_is_exact_projection(weight, patterns, data):
    n = weight.shape[0] * weight.shape[1]
    rate = data.draw(st.floats(1.0, float(n)))
    kept = kept_kernel_count(n, rate)
    result = project_pattern_and_connectivity(weight, patterns, rate)
    assert_on_patterns(result, patterns)
    assert_values_copied(result, weight)
    assert np.count_nonzero(kernel_masks(result)) <= kept
    best = brute_force_distance2(weight, patterns, kept)
    assert distance2(result, weight) <= best + 1e-9 * (1 + best)
    assert np.array_equal(project_pattern_and_connectivity(result, patterns, rate), result)


def test_connectivity_ranks_kernels_by_projected_norm():
    """Dense norms would keep the wrong kernel: its energy sits outside every pattern."""
    pattern = taps_mask([(0, 1), (1, 0), (1, 1), (1, 2)])  # a plus without the bottom tap
    strong_outside = np.zeros((3, 3), np.float32)
    strong_outside[2, 2] = 10.0  # corner: no pattern keeps it
    strong_outside[1, 1] = 0.1
    modest_inside = np.zeros((3, 3), np.float32)
    modest_inside[0, 1] = modest_inside[1, 1] = 1.0
    weight = np.stack([strong_outside, modest_inside])[None]
    result = project_pattern_and_connectivity(weight, [pattern], rate=2.0)
    assert not result[0, 0].any()
    assert np.array_equal(result[0, 1], modest_inside)
    assert project_connectivity(weight, 2.0)[0, 0].any()  # plain connectivity keeps the other


def test_zero_kernels_stay_zero():
    weight = np.zeros((2, 2, 3, 3), np.float32)
    weight[0, 0, 1, 1] = 1.0
    result = project_pattern_and_connectivity(weight, CANDIDATES[:8], None)
    assert np.array_equal(result, weight)
    assert (top_shape(weight)[[0, 1, 1], [1, 0, 1]] == 0).all()


def test_realistic_layer_density():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
    patterns = select_pattern_set([weight], 8)
    result = project_pattern_and_connectivity(weight, patterns, 3.6)
    masks = kernel_masks(result)
    assert np.count_nonzero(masks) == round(64 * 32 / 3.6) == 569
    assert set(np.unique(masks[masks != 0]).tolist()) <= set(patterns)
    assert (popcount(masks[masks != 0]) == 4).all()
    assert np.count_nonzero(result) == 569 * 4


# --- rates and prunability ------------------------------------------------------------------


def test_kept_kernel_count():
    assert kept_kernel_count(100, 3.6) == 28
    assert kept_kernel_count(9, 1.0) == 9
    assert kept_kernel_count(5, 2.0) == 3  # 2.5 rounds half up
    assert kept_kernel_count(2, np.float32(2.0)) == 1
    for rate in (0.5, float("nan"), float("inf"), None, "3"):
        with pytest.raises(PatDNNError, match="finite number >= 1"):
            kept_kernel_count(10, rate)
    with pytest.raises(PatDNNError, match="keeps no kernel"):
        kept_kernel_count(2, 5.0)
    with pytest.raises(PatDNNError, match="keeps no kernel"):
        project_connectivity(np.ones((1, 2, 3, 3), np.float32), 5.0)


@pytest.mark.parametrize(
    ("shape", "kwargs", "reason"),
    [
        ((64, 32, 3, 3), {}, None),
        ((64, 3, 3, 3), {}, "first layer (3 input channels) kept dense"),
        ((32, 1, 3, 3), {}, "first layer (1 input channel) kept dense"),
        ((64, 3, 3, 3), {"first_layer_dense": False}, None),
        ((64, 32, 1, 1), {}, "kernel 1x1 is not 3x3"),
        ((64, 32, 5, 5), {}, "kernel 5x5 is not 3x3"),
        ((32, 1, 3, 3), {"groups": 32}, "depthwise (group=32)"),
        ((32, 8, 3, 3), {"groups": 4}, "grouped (group=4)"),
        ((32, 32, 3, 3), {"dilations": (2, 2)}, "dilated (dilations=(2, 2))"),
        ((32, 32, 3), {}, "weight of rank 3 is not a 2-D convolution (OIHW)"),
    ],
)
def test_prunable_reason(shape, kwargs, reason):
    assert prunable_reason(shape, **kwargs) == reason
