"""The pattern-conv CPU schedule is one definition: the untuned default is a point of the
tuning space (the space's trace, given the default's knobs as decisions, is the default)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from model_factory import pattern_weight
from tvm import s_tir

from tvm_patdnn.analysis import analyze_conv_weight
from tvm_patdnn.fkw import pack_fkw
from tvm_patdnn.ops.pattern_conv import PATTERN_CONV_ATTR, PatternConvSpec, pattern_conv2d_primfunc
from tvm_patdnn.schedule_rules import PatternConvCPU
from tvm_patdnn.schedule_rules.pattern_conv_cpu import (NARROW_TILE, NARROW_TILE_AVX512, apply_default_schedule,
                                                        default_knobs)
from tvm_patdnn.tuning.space import pattern_conv_space

SAMPLERS = ("SamplePerfectTile", "SampleCategorical", "SampleComputeLocation")


def pattern_conv(filters: int, channels: int, size: int, stride: int = 1, batch: int = 1, lanes: int = 8,
                 accumulators: int = 8) -> tvm.tirx.PrimFunc:
    weight = pattern_weight(np.random.default_rng(size), filters, channels, n_patterns=4, connectivity=2.0)
    spec = PatternConvSpec.from_fkw(pack_fkw(weight, analyze_conv_weight(weight)), (batch, channels, size, size),
                                    (stride, stride), (1, 1, 1, 1), True, True, lanes, accumulators)
    return pattern_conv2d_primfunc(spec)


def cpu(cores: int) -> tvm.target.Target:
    return tvm.target.Target({"kind": "llvm", "mcpu": "znver3", "num-cores": cores})


LAYERS = {
    "2x2 flat, tap partials": dict(filters=16, channels=8, size=2),
    "3x3 flat": dict(filters=16, channels=8, size=3),
    "4x4 windows, 8 lanes": dict(filters=16, channels=8, size=4),
    "8x8 rows": dict(filters=12, channels=6, size=8),
    "32x32 lifted rows, rows and columns": dict(filters=8, channels=4, size=32),
    "56x56 lifted rows, tall tile": dict(filters=8, channels=4, size=56),
    "56 -> 28 strided lifted rows": dict(filters=8, channels=4, size=56, stride=2),
    "112x112 tall tile, column blocks outside the filters, fused (pad per column block)":
        dict(filters=8, channels=4, size=112),
    "fused, two images": dict(filters=8, channels=4, size=112, batch=2),
    "14x14 aligned rows": dict(filters=8, channels=4, size=14),
    "strided aligned rows": dict(filters=8, channels=4, size=9, stride=2),
    "filters not a multiple of the threads": dict(filters=7, channels=4, size=4),
    "batch of two": dict(filters=8, channels=4, size=6, batch=2),
    "16 lanes, 16 accumulators": dict(filters=8, channels=4, size=16, lanes=16, accumulators=16),
    "AVX-512 cost model, 8 lanes": dict(filters=8, channels=4, size=8, lanes=16, accumulators=16),
    "AVX-512 cost model, 8 lanes flat": dict(filters=8, channels=4, size=2, lanes=16, accumulators=16),
    "AVX-512 cost model, windows": dict(filters=8, channels=8, size=4, lanes=16, accumulators=16),
    "16 lanes fused, 7-row narrow tile": dict(filters=8, channels=64, size=112, lanes=16, accumulators=16),
    "16 lanes lifted, column blocks outside the filters": dict(filters=8, channels=256, size=56, lanes=16,
                                                              accumulators=16),
    "16 lanes strided aligned rows, vectorised pad": dict(filters=8, channels=16, size=56, stride=2, lanes=16,
                                                          accumulators=16),
}


@pytest.mark.parametrize("cores", [1, 2, 8])
@pytest.mark.parametrize("layer", LAYERS)
def test_default_is_the_space_with_the_default_knobs(layer, cores):
    func, target = pattern_conv(**LAYERS[layer]), cpu(cores)
    trace = PatternConvCPU().apply(func, target, True).trace
    samplers = [inst for inst in trace.insts if inst.kind.name in SAMPLERS]
    decisions = default_knobs(func, cores).decisions()
    assert len(samplers) == len(decisions)
    for inst, decision in zip(samplers, decisions):
        if inst.kind.name == "SamplePerfectTile":  # a decision the sampler itself could draw
            n, max_innermost_factor = (int(a) for a in inst.attrs)
            assert len(decision) == n and decision[-1] <= max_innermost_factor
        trace = trace.with_decision(inst, decision, remove_postproc=True)
    replayed = s_tir.Schedule(func)
    trace.apply_to_schedule(replayed, remove_postproc=True)

    default = s_tir.Schedule(func)
    apply_default_schedule(default, target)
    tvm.ir.assert_structural_equal(replayed.mod, default.mod)
    # The default never samples: it is a plain (replayable) trace, as dlight asks of untuned rules.
    assert not any(inst.kind.name in SAMPLERS for inst in default.trace.insts)


def test_tile_decisions_divide_the_padded_extents():
    """Perfect tiles: each default split multiplies out to the loop it splits."""
    func = pattern_conv(filters=24, channels=4, size=32)
    sch = s_tir.Schedule(func)
    _n, filters, rows, _q, columns = (int(sch.get(loop).extent) for loop in sch.get_loops(sch.get_sblock("acc"))[:5])
    knobs = default_knobs(func, 2)
    assert np.prod(knobs.rows) == rows and np.prod(knobs.filters) == filters
    assert np.prod(knobs.columns) * 8 == columns


def test_space_is_sampled_with_the_callers_random_state():
    func, target = pattern_conv(filters=16, channels=8, size=16), cpu(2)

    def decisions(seed: int) -> list:
        (space,) = pattern_conv_space(s_tir.Schedule(func, seed=seed), target)
        return [[int(v) for v in d] if isinstance(d, (list, tvm.ir.Array)) else int(d)
                for d in space.trace.decisions.values()]

    assert decisions(5) == decisions(5)
    assert len({str(decisions(seed)) for seed in range(1, 9)}) > 1


def test_default_trace_survives_a_database_round_trip(tmp_path):
    """The tuner stores the default as its seed record: as committed and as read back, the
    record's trace replays to the default's TIR and passes the postprocessor tuned schedules get."""
    from tvm.s_tir import meta_schedule as ms

    func, target = pattern_conv(filters=16, channels=8, size=4), cpu(2)
    default = s_tir.Schedule(func)
    apply_default_schedule(default, target)
    paths = str(tmp_path / "workloads.json"), str(tmp_path / "records.json")
    database = ms.database.JSONDatabase(*paths, allow_missing=True)
    workload = database.commit_workload(tvm.IRModule({"main": func}))
    database.commit_tuning_record(ms.database.TuningRecord(default.trace, workload, [1e-3], target, None))

    for stored in (database, ms.database.JSONDatabase(*paths)):  # as committed, and as read back
        (record,) = stored.get_all_tuning_records()
        replayed = s_tir.Schedule(func)
        record.trace.apply_to_schedule(replayed, remove_postproc=True)
        tvm.ir.assert_structural_equal(replayed.mod, default.mod)
        assert ms.postproc.RewriteParallelVectorizeUnroll().apply(replayed)


def test_fused_layers_of_few_channels_take_the_narrow_tile():
    """Fused wide rows read their pad per column block; at most 64 input channels take 8 x 1 tiles."""
    few, many = pattern_conv(filters=8, channels=64, size=112), pattern_conv(filters=8, channels=128, size=112)
    assert (default_knobs(few, 1).rows[1], default_knobs(few, 1).columns[2]) == NARROW_TILE
    assert (default_knobs(many, 1).rows[1], default_knobs(many, 1).columns[2]) == (4, 2)
    assert default_knobs(few, 1).pad == default_knobs(many, 1).pad == 1
    assert default_knobs(pattern_conv(filters=8, channels=64, size=56), 1).pad is None  # lifted: not fused


def test_avx512_strided_aligned_rows_vectorise_their_pad():
    """16-lane strided aligned rows build each column phase row of their pad in 16-lane vectors; 8-lane
    ones (AVX2, and AVX-512's 7-column layers) and stride 1 keep the scalar column loop."""

    def pad_columns(func, cores=1):
        sch = s_tir.Schedule(func)
        apply_default_schedule(sch, cpu(cores))
        layout = sch.mod["main"].attrs[PATTERN_CONV_ATTR]
        last = sch.get(sch.get_loops(sch.get_sblock("pad"))[-1])
        return "aligned" in layout, int(layout["vector_width"]), last.kind == tvm.tirx.ForKind.VECTORIZED

    assert pad_columns(pattern_conv(filters=8, channels=128, size=56, stride=2, lanes=16, accumulators=16)) == (
        True, 16, True)
    assert pad_columns(pattern_conv(filters=8, channels=128, size=56, stride=2, lanes=16, accumulators=16),
                       cores=2) == (True, 16, True)
    assert pad_columns(pattern_conv(filters=8, channels=512, size=14, stride=2, lanes=16, accumulators=16)) == (
        True, 8, False)
    assert pad_columns(pattern_conv(filters=8, channels=128, size=9, stride=2)) == (True, 8, False)
    assert pad_columns(pattern_conv(filters=8, channels=128, size=14, lanes=16, accumulators=16))[2] is False


def test_avx512_fused_narrow_tile_and_lifted_column_blocks():
    """16 lanes: fused layers of at most 64 channels take 7 x 1 tiles where 7 divides the rows (8 x 1
    otherwise, and on 8 lanes); lifted rows whose row block's input (every channel) exceeds
    LIFTED_BLOCK_BYTES run the column blocks outside the filters, smaller ones inside."""
    fused = default_knobs(pattern_conv(filters=8, channels=64, size=224, lanes=16, accumulators=16), 1)
    assert (fused.rows[1], fused.columns[2]) == NARROW_TILE_AVX512 and fused.pad == 1
    eight = default_knobs(pattern_conv(filters=8, channels=64, size=128, lanes=16, accumulators=16), 1)
    assert (eight.rows[1], eight.columns[2]) == NARROW_TILE  # 128 rows: 7 does not divide them
    avx2 = default_knobs(pattern_conv(filters=8, channels=64, size=224), 1)
    assert (avx2.rows[1], avx2.columns[2]) == NARROW_TILE
    big = default_knobs(pattern_conv(filters=8, channels=256, size=56, lanes=16, accumulators=16), 1)  # 884 KB
    small = default_knobs(pattern_conv(filters=8, channels=128, size=56, lanes=16, accumulators=16), 1)  # 442 KB
    assert big.columns == (2, 1, 2) and small.columns == (1, 2, 2)
    assert big.rows == small.rows == (8, 7)
