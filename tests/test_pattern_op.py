"""Weight analysis, FKW packing and the pattern-conv PrimFunc's schedule."""

from __future__ import annotations

import numpy as np
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from model_factory import pattern_weight

from tvm_patdnn.analysis import analyze_conv_weight, cover_masks
from tvm_patdnn.fkw import pack_fkw
from tvm_patdnn.kernel_patterns import kernel_masks, popcount
from tvm_patdnn.ops.pattern_conv import PatternConvSpec, pattern_conv2d_primfunc
from tvm_patdnn.schedule_rules import PatternConvCPU


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 12), st.integers(1, 9), st.integers(1, 12), st.sampled_from([1.0, 2.0, 5.0]))
def test_fkw_packing_is_lossless_and_compact(seed, out_c, in_c, n_patterns, connectivity):
    weight = pattern_weight(np.random.default_rng(seed), out_c, in_c, n_patterns, connectivity, subset_prob=0.3)
    analysis = analyze_conv_weight(weight)
    if analysis.kind == "dense":
        assert analysis.reason == "all kernels are zero"
        return
    assert len(analysis.patterns) <= n_patterns
    fkw = pack_fkw(weight, analysis)
    np.testing.assert_array_equal(fkw.to_dense(), weight)
    assert fkw.channels.shape[0] == analysis.kept_kernels  # only kept kernels are stored
    counts = np.diff(fkw.offsets).reshape(out_c, -1).sum(axis=1)
    assert list(counts) == sorted(counts, reverse=True)  # filters reordered by kernel count


def test_cover_masks_subsets_and_limits():
    # Masks that are strict subsets of a full pattern need no pattern of their own.
    full = 0b000111010
    assert cover_masks(np.array([full, 0b000011010, 0b000010010]), 4) == [full]
    rng = np.random.default_rng(0)
    weight = pattern_weight(rng, 16, 16, n_patterns=8)
    weight[:, :, 1, 1] = 0.0  # every kernel loses its centre: still 8 shapes (of 3 taps)
    analysis = analyze_conv_weight(weight)
    assert analysis.kind == "pattern" and len(analysis.patterns) <= 8
    masks = kernel_masks(weight)
    assigned = np.array(analysis.patterns)[analysis.assignment[masks != 0]]
    assert np.all(masks[masks != 0] & assigned == masks[masks != 0])
    dense = rng.standard_normal((4, 4, 3, 3))
    assert "9 nonzeros" in analyze_conv_weight(dense).reason
    assert "not 3x3" in analyze_conv_weight(rng.standard_normal((4, 4, 5, 5))).reason
    assert popcount(kernel_masks(dense)).max() == 9


def test_cpu_rule_bounds_kernel_loops_by_run_length():
    weight = pattern_weight(np.random.default_rng(1), 8, 8, n_patterns=4, connectivity=2.0)
    analysis = analyze_conv_weight(weight)
    spec = PatternConvSpec.from_fkw(pack_fkw(weight, analysis), (1, 8, 9, 9), (1, 1), (1, 1, 1, 1), True, True)
    func = pattern_conv2d_primfunc(spec)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})
    scheduled = PatternConvCPU().apply(func, target, False).mod["main"].script()
    assert "for rj in range(T.min(" in scheduled  # the guarded loop became a bounded loop
    assert "T.if_then_else" not in scheduled.split('T.sblock("acc_update")')[1].split("T.sblock")[0]
    assert PatternConvCPU().apply(func, tvm.target.Target({"kind": "c"}), False) is None
