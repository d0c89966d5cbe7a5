"""Weight analysis, FKW packing and the pattern-conv PrimFunc's schedule."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from model_factory import ConvSpec, build_cnn, pattern_weight, reference_outputs
from onnx import numpy_helper
from tvm import relax

import tvm_patdnn
from tvm_patdnn.analysis import analyze_conv_weight, cover_masks
from tvm_patdnn.fkw import pack_fkw
from tvm_patdnn.frontend import import_onnx
from tvm_patdnn.kernel_patterns import kernel_masks, popcount
from tvm_patdnn.ops import pattern_conv_phases
from tvm_patdnn.ops.pattern_conv import (PATTERN_CONV_ATTR, PatternConvSpec, cheapest_layout, choose_layout,
                                         is_pattern_conv, pattern_conv2d_primfunc, target_layout)
from tvm_patdnn.schedule_rules import PatternConvCPU
from tvm_patdnn.schedule_rules.pattern_conv_cpu import default_knobs
from tvm_patdnn.targets import accumulator_registers, resolve_target, vector_lanes
from tvm_patdnn.transform import PatternConvRewrite


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


def pattern_layouts(mod: tvm.IRModule) -> list:
    """The layout attribute of every pattern-conv PrimFunc of ``mod``."""
    return [func.attrs[PATTERN_CONV_ATTR] for _, func in mod.functions_items() if is_pattern_conv(func)]


def _run_op(spec: PatternConvSpec, fkw, x: np.ndarray, bias: np.ndarray, target) -> np.ndarray:
    scheduled = PatternConvCPU().apply(pattern_conv2d_primfunc(spec), target, False).mod["main"]
    lib = tvm.compile(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target)
    out = tvm.runtime.tensor(np.zeros((spec.batch, spec.out_channels, spec.out_height, spec.out_width), np.float32))
    args = [x, fkw.values, fkw.channels, fkw.offsets, np.argsort(fkw.order).astype(np.int32), bias]
    lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
    return out.numpy()


@pytest.mark.parametrize(
    "size, stride, pads, flat, accumulators, partials",
    [
        (2, 1, (1, 1, 1, 1), True, 8, None),  # VGG's 2x2 layers: flat, four tap partials
        (4, 1, (1, 1, 1, 1), True, 8, None),
        (4, 1, (1, 1, 1, 1), False, 8, None),  # row layout with partials
        (5, 1, (0, 1, 2, 1), True, 16, None),  # uneven padding, 32-register budget
        (7, 1, (1, 1, 1, 1), True, 8, 1),
        (9, 2, (1, 1, 1, 1), False, 8, 2),  # strided: row layout, phase-split input
        (12, 1, (1, 1, 1, 1), False, 1, None),  # no register tile at all
        (33, 1, (1, 1, 1, 1), None, 16, None),  # layout chosen by choose_layout
        (4, 1, (1, 1, 1, 1), "windows", 8, None),  # the 9 shifted 4x4 windows of each channel, 2 vectors
        (3, 1, (0, 1, 2, 1), "windows", 8, 1),  # uneven padding
    ],
)
def test_every_layout_matches_the_onnx_reference(size, stride, pads, flat, accumulators, partials):
    def layout(spec: PatternConvSpec) -> PatternConvSpec:
        if flat == "windows":  # one 8-lane vector of the output's pixels per tile
            spec = dataclasses.replace(spec, flat=False, windows=True, aligned=False, row_tile=1, column_tile=1,
                                       partials=2)
        else:
            spec = choose_layout(spec, accumulators, flat=flat)
        assert spec.row_tile * spec.column_tile * spec.partials <= accumulators
        if partials is not None:  # any layout is correct, whether it fits the registers or not
            spec = dataclasses.replace(spec, partials=partials)
        return spec

    _check_layout(size, (1, 6, size, size), stride, pads, layout)


def _check_layout(seed: int, shape: tuple, stride: int, pads: tuple, layout) -> None:
    """A 10-filter pattern conv of an input of ``shape``, laid out by ``layout(spec)``, against
    onnx.reference (built for plain x86-64)."""
    rng = np.random.default_rng(seed)
    model = build_cnn(rng, shape, [ConvSpec(10, stride=stride, pads=pads, connectivity=2.0)])
    weight, bias = (numpy_helper.to_array(t) for t in model.graph.initializer)
    fkw = pack_fkw(weight, analyze_conv_weight(weight))
    spec = layout(PatternConvSpec.from_fkw(fkw, shape, (stride, stride), pads, True, True))
    x = rng.standard_normal(shape).astype(np.float32)
    expected = reference_outputs(model, {"input": x})[0]
    got = _run_op(spec, fkw, x, bias, tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"}))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_layout_fills_vectors_and_registers_per_target():
    weight = pattern_weight(np.random.default_rng(2), 8, 8, n_patterns=4)
    fkw = pack_fkw(weight, analyze_conv_weight(weight))

    def layout(size, lanes=8, accumulators=8, stride=1):
        spec = PatternConvSpec.from_fkw(fkw, (1, 8, size, size), (stride, stride), (1, 1, 1, 1), False, False,
                                        lanes, accumulators)
        return "windows" if spec.windows else spec.flat, spec.row_tile, spec.column_tile, spec.partials

    assert layout(2) == (True, 1, 1, 4)  # 4 outputs in one flat vector, each tap its own chain
    assert layout(3) == (True, 1, 2, 4)  # windows would fill no more lanes (9 of 16)
    assert layout(4) == ("windows", 1, 2, 4)  # AVX2: 16 pixels = 2 full vectors per tap (flat: 3)
    assert layout(4, lanes=4, accumulators=16) == (False, 4, 1, 4)  # NEON: no windows
    assert choose_layout(PatternConvSpec.from_fkw(fkw, (1, 8, 4, 4), (1, 1), (1, 1, 1, 1), False, False), 8) \
        == dataclasses.replace(PatternConvSpec.from_fkw(fkw, (1, 8, 4, 4), (1, 1), (1, 1, 1, 1), False, False),
                               windows=False, flat=True, column_tile=3, partials=2)  # 4 rows x 6 padded columns
    assert layout(8) == (False, 8, 1, 1)  # whole rows fill the vectors: rows x columns tile
    assert layout(32) == (False, 2, 4, 1)
    assert layout(4, stride=2) == (False, 2, 1, 4)  # strided convs keep the row layout
    assert choose_layout(dataclasses.replace(PatternConvSpec.from_fkw(fkw, (1, 8, 32, 32), (1, 1), (1, 1, 1, 1), False,
                                                                      False, 16), vector_width=16), 16).row_tile == 8
    assert [accumulator_registers(resolve_target(name)) for name in ("arm_cpu", "adreno")] == [16, 1]
    avx2 = tvm.target.Target({"kind": "llvm", "mcpu": "znver3"})
    avx512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    assert (accumulator_registers(avx2), accumulator_registers(avx512)) == (8, 16)
    assert (vector_lanes(avx2), vector_lanes(avx512)) == (8, 16)


def test_avx512_cost_model_picks_the_vector_width_per_image_size():
    """16-lane targets choose among 512- and 256-bit row, flat and windows layouts by modelled
    cycles where no measured rule says otherwise: 4x4 outputs as one 16-lane window vector per tap,
    8x8 in 256-bit rows, 512-bit rows at 16x16."""
    weight = pattern_weight(np.random.default_rng(4), 64, 64, n_patterns=8, connectivity=3.6)
    fkw = pack_fkw(weight, analyze_conv_weight(weight))

    def layout(size, stride=1):
        spec = PatternConvSpec.from_fkw(fkw, (1, 64, size, size), (stride, stride), (1, 1, 1, 1), True, True, 16, 16)
        assert spec.row_tile * spec.column_tile * spec.partials <= 16
        assert spec == cheapest_layout(dataclasses.replace(spec, vector_width=16), 16, (16, 8))
        return spec.vector_width, "flat" if spec.flat else "windows" if spec.windows else "rows"

    assert [layout(size) for size in (4, 8)] == [(16, "windows"), (8, "rows")]  # 7x7: aligned 8-lane rows
    assert layout(16) == (16, "rows")  # 32x32: the model's 512-bit rows with the tall tile (below)


def test_avx512_rows_layouts_follow_the_zen5_measurements():
    """AVX-512 (measured on Zen 5), stride 1: rows of 112 columns and more at up to 64 input channels
    take AVX2's tall 4x2 tile with fused stages; lifted rows from 128 input channels at 56+ columns
    and 256 at 31-55, without a stored halo from 64 at 17-30 (rows of one 2-vector tile); aligned rows where the aligned pitch adds at most an eighth (14, 28, 56 columns,
    not 16 or 32); both with 7-row x 2-vector tiles (14x1 at 14 columns). Strided layers take aligned
    rows in the cost model's vector width (8 lanes to 7 columns; 16-lane tiles of rows that divide the
    output's, 7 x 2 at 28 rows), as do 7x7 layers; the rest keep the
    cost model's layout, 32x32 in the tall 4x2 tile."""
    rng = np.random.default_rng(4)

    def layout(channels, size, stride=1, **kwargs):
        weight = pattern_weight(rng, 8, channels, n_patterns=8, connectivity=3.6)
        spec = PatternConvSpec.from_fkw(pack_fkw(weight, analyze_conv_weight(weight)), (1, channels, size, size),
                                        (stride, stride), (1, 1, 1, 1), True, True, 16)
        spec = target_layout(spec, 16, **kwargs)
        kind = "fused" if spec.fused else "aligned" if spec.aligned else "lifted" if spec.lifted else "model"
        return kind, spec.vector_width, spec.row_tile, spec.column_tile

    def halo(channels, size):
        weight = pattern_weight(rng, 8, channels, n_patterns=8, connectivity=3.6)
        spec = PatternConvSpec.from_fkw(pack_fkw(weight, analyze_conv_weight(weight)), (1, channels, size, size),
                                        (1, 1), (1, 1, 1, 1), True, True, 16, 16)
        assert spec.lifted
        return spec.lifted_halo

    assert [layout(64, size) for size in (224, 112)] == [("fused", 16, 4, 2)] * 2
    assert layout(64, 112, fused=False) == ("model", 16, 4, 2)  # the tall tile without fused stages
    assert [layout(128, size) for size in (112, 56)] == [("lifted", 16, 7, 2)] * 2
    assert [layout(channels, 28) for channels in (32, 64, 256)] == [("aligned", 16, 7, 2)] + [("lifted", 16, 7, 2)] * 2
    assert [halo(64, 28), halo(256, 28), halo(128, 56), halo(128, 112)] == [False, False, True, True]  # one tile a row
    assert layout(64, 30)[0] == "lifted" and layout(64, 31)[0] == "aligned"  # a lane of padding for the halo reads
    assert [layout(64, size) for size in (56, 14)] == [("aligned", 16, 7, 2), ("aligned", 16, 14, 1)]
    assert layout(256, 28, lifted=False) == ("aligned", 16, 7, 2)
    assert [layout(64, size, stride=2)[:2] for size in (56, 28, 14)] == [("aligned", 16)] * 2 + [("aligned", 8)]
    assert [layout(128, size, stride=2) for size in (56, 28)] == [("aligned", 16, 7, 2), ("aligned", 16, 14, 1)]
    assert layout(64, 7)[:2] == ("aligned", 8)  # the cost model's 8-lane rows, aligned where that does not grow
    assert layout(64, 56, aligned=False)[0] == layout(64, 16)[0] == "model"
    assert layout(64, 32) == ("model", 16, 4, 2)  # the model's rows of two vectors, in the tall tile
    assert layout(64, 32, tall_tile=False)[2:] == (11, 1)


AVX512 = {"kind": "llvm", "mcpu": "skylake-avx512"}
AVX2 = {"kind": "llvm", "mcpu": "znver3"}


@pytest.mark.parametrize(
    "height, width, batch, bias, relu, windows",
    [
        (4, 4, 1, True, True, True),  # VGG's 4x4 layers: 2 full vectors x 4 tap partial sums (flat: 3)
        (4, 4, 2, False, False, True),  # batch 2, no bias, no ReLU
        (3, 5, 1, True, False, True),  # 15 of 16 lanes (rows and flat: 15 of 24)
        (2, 8, 1, True, True, False),  # rows fill the vectors already
        (2, 2, 1, True, True, False),  # half a vector either way: flat
    ],
)
def test_avx2_windows_layout_matches_the_onnx_reference(height, width, batch, bias, relu, windows):
    """The AVX2 rule (8 lanes) takes windows where they fill more lanes; compiled for ``znver3``
    through ``tvm_patdnn.compile`` and, where the host has AVX2, checked against onnx.reference."""
    rng = np.random.default_rng(height * 16 + width)
    model = build_cnn(rng, (batch, 8, height, width), [ConvSpec(12, connectivity=2.0, bias=bias, relu=relu)])
    rewritten = PatternConvRewrite(vector_width=8, accumulators=8)(relax.transform.FoldConstant()(import_onnx(model).mod))
    assert [bool(int(layout["windows"])) for layout in pattern_layouts(rewritten)] == [windows]
    compiled = tvm_patdnn.compile(model, AVX2)
    assert [r.kind for r in compiled.report] == ["pattern"]
    if vector_lanes(resolve_target("x86")) < 8:
        pytest.skip("host CPU: no AVX2 to run the code on (it was built)")
    x = rng.standard_normal((batch, 8, height, width)).astype(np.float32)
    expected = reference_outputs(model, {"input": x})[0]
    np.testing.assert_allclose(compiled.run({"input": x})[0], expected, rtol=1e-4, atol=1e-4)


def test_2x2_layers_take_the_tap_lane_kernel_on_avx512_and_avx2():
    model = build_cnn(np.random.default_rng(5), (1, 8, 2, 2), [ConvSpec(16, connectivity=2.0)])
    mod = relax.transform.FoldConstant()(import_onnx(model).mod)
    for lanes, tap_lanes in ((16, True), (8, True), (4, False)):
        rewritten = PatternConvRewrite(vector_width=lanes, accumulators=16)(mod)
        assert [bool(layout.get("tap_lanes", 0)) for layout in pattern_layouts(rewritten)] == [tap_lanes]


@pytest.mark.parametrize("batch, bias, relu, patterns", [(1, True, True, 8), (2, False, False, 3), (1, True, False, 12)])
def test_avx2_2x2_kernel_matches_the_onnx_reference(batch, bias, relu, patterns):
    """The AVX2 (pixel x tap) kernel of 2x2 outputs, its inputs arranged per (channel, pattern)."""
    rng = np.random.default_rng(patterns)
    model = build_cnn(rng, (batch, 24, 2, 2), [ConvSpec(40, connectivity=2.0, bias=bias, relu=relu, n_patterns=patterns)])
    compiled = tvm_patdnn.compile(model, AVX2)
    assert "call  pattern_conv2d" in compiled.executable.as_text()
    if vector_lanes(resolve_target("x86")) < 8:
        pytest.skip("host CPU: no AVX2 to run the code on (it was built)")
    x = rng.standard_normal((batch, 24, 2, 2)).astype(np.float32)
    expected = reference_outputs(model, {"input": x})[0]
    np.testing.assert_allclose(compiled.run({"input": x})[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "size, stride, batch, bias, relu, channels",
    [
        (2, 1, 1, True, True, 8),  # the (pixel x tap) kernel
        (2, 1, 2, False, False, 8),  # the same, batch 2, no bias, no ReLU
        (3, 1, 1, True, True, 8),  # windows (9 pixels)
        (4, 1, 2, True, True, 8),  # windows, one full 512-bit vector, batch 2
        (6, 1, 1, True, True, 8),  # flat or rows, 256-bit
        (8, 1, 1, True, True, 8),  # 256-bit rows
        (16, 1, 1, True, True, 8),  # 512-bit rows
        (32, 1, 1, True, True, 8),  # 512-bit rows of two vectors: the tall 4x2 tile
        (14, 1, 1, True, True, 8),  # 512-bit aligned rows, pitch 16
        (58, 1, 2, True, False, 8),  # aligned rows, 4 vectors, rows padded to the 7x2 tile
        (30, 1, 1, True, True, 256),  # lifted rows (256 input channels), one tile a row: no stored halo
        (28, 1, 2, True, False, 64),  # the same from 64 channels, batch 2 (ResNet-50's 28x28 layers have 128)
        (60, 1, 1, True, False, 128),  # lifted rows (128 input channels)
        (56, 1, 1, True, True, 256),  # lifted rows, row blocks of 884 KB: column blocks outside the filters
        (112, 1, 1, True, True, 8),  # wide rows: the tall tile, fused stages (7 x 1 tiles)
        (128, 1, 1, True, True, 8),  # the same, 8 x 1 tiles (7 does not divide 128 rows)
        (7, 1, 1, True, True, 8),  # the shifted-rows kernel in an 8x8 padded copy (was 8-lane aligned rows)
        (9, 2, 1, True, True, 8),  # strided: aligned column phases
        (14, 2, 2, True, True, 8),  # strided to 7 columns: the tap-window kernel (session 18; was shifted rows on 4 phase planes)
        (28, 2, 1, False, True, 8),
        (56, 2, 2, True, True, 8),  # strided to 28 rows: aligned column phases, a 7 x 2 tile (8 x 2 padded to 32)
    ],
)
def test_avx512_layouts_match_the_onnx_reference(monkeypatch, size, stride, batch, bias, relu, channels):
    """Every AVX-512 kernel class (the 2x2 (pixel x tap) kernel, the cost model's windows, 256-bit
    rows and 512-bit rows, and the measured rules' fused wide rows and aligned rows, strided ones
    included, lifted rows of many channels) builds, and where the host has AVX-512 it matches onnx.reference.
    The 56 -> 28 and 28 -> 14 stride-2 layers are kept on the TE operator's strided aligned rows here (the
    rewrite routes them to the phase-plane kernel, tests/test_pattern_phases.py)."""
    monkeypatch.setattr(pattern_conv_phases, "PHASE_PLANE_SIZES", {})
    rng = np.random.default_rng(size)
    conv = ConvSpec(16, stride=stride, connectivity=2.0, bias=bias, relu=relu)
    model = build_cnn(rng, (batch, channels, size, size), [conv])
    compiled = tvm_patdnn.compile(model, AVX512)
    assert [r.kind for r in compiled.report] == ["pattern"]
    if vector_lanes(resolve_target("x86")) != 16:
        pytest.skip("host CPU: no AVX-512 to run the code on (it was built)")
    x = rng.standard_normal((batch, channels, size, size)).astype(np.float32)
    expected = reference_outputs(model, {"input": x})[0]
    np.testing.assert_allclose(compiled.run({"input": x})[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "channels, height, width, stride, tile, columns_outside, prefetches",
    [
        (4, 6, 112, 1, (4, 2), True, False),  # VGG's 112/224 rows: the tall tile, rows padded 6 -> 8
        (256, 6, 112, 1, (4, 2), True, True),  # fused wide rows prefetch from the row block's pad
        (4, 5, 56, 1, (4, 2), True, False),  # 56-pixel rows: lifted, tall tile, 64 lanes, rows 5 -> 8
        (512, 14, 14, 1, (4, 2), False, True),  # VGG's 14x14 at 512 channels (590 KB > L2): prefetching
        (256, 14, 14, 1, (4, 2), False, False),  # ResNet's 14x14 at 256 channels (295 KB): no prefetch
        (256, 8, 8, 1, (8, 1), False, False),  # CIFAR's 8x8 (shipped records): no prefetch
        (256, 28, 28, 1, (2, 4), False, True),  # VGG's 28x28: lifted rows (flat before), prefetched
        (256, 14, 30, 1, (2, 4), False, True),  # lifted, output rows 30 wide in 32 lanes
        (16, 6, 56, 2, (2, 4), False, False),  # ResNet's 56 -> 28 stride 2: lifted column phases
        (512, 2, 2, 1, (1, 1), False, False),  # CIFAR's 2x2 (flat): no prefetch
        (256, 9, 30, 2, (4, 2), False, False),  # strided: no prefetch (18 lines a kernel)
    ],
)
def test_avx2_large_image_kernels_match_the_onnx_reference(channels, height, width, stride, tile, columns_outside,
                                                          prefetches):
    """AVX2 wide rows take the tall register tile with column blocks outside the filters, and the
    kernel loop of many-channel layers prefetches the input rows of the kernel ahead; rows of at
    28 to 111 output columns are lifted; all match onnx.reference."""
    rng = np.random.default_rng(channels + width)
    shape = (1, channels, height, width)
    model = build_cnn(rng, shape, [ConvSpec(8, stride=stride, connectivity=2.0)])
    weight, bias = (numpy_helper.to_array(t) for t in model.graph.initializer)
    fkw = pack_fkw(weight, analyze_conv_weight(weight))
    spec = PatternConvSpec.from_fkw(fkw, shape, (stride, stride), (1, 1, 1, 1), True, True, 8, 8)
    assert (spec.row_tile, spec.column_tile) == tile
    assert spec.lifted == (28 <= spec.out_width < 112)
    assert spec.fused == (spec.out_width >= 112)  # pad per row block, output stage in the register tile
    func = pattern_conv2d_primfunc(spec)
    knobs = default_knobs(func, 1)
    assert (knobs.columns[0] > 1) == columns_outside  # column blocks outside the filters
    scheduled = PatternConvCPU().apply(func, tvm.target.Target(AVX2), False).mod["main"].script()
    assert ("T.prefetch(" in scheduled) == prefetches
    if vector_lanes(resolve_target("x86")) < 8:
        pytest.skip("host CPU: no AVX2 to run the code on (it was built)")
    x = rng.standard_normal(shape).astype(np.float32)
    expected = reference_outputs(model, {"input": x})[0]
    got = _run_op(spec, fkw, x, bias, tvm.target.Target(AVX2))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "height, width, stride, batch, pads, tile",
    [
        (2, 2, 1, 1, (1, 1, 1, 1), (1, 1)),  # one column per lane segment, 2 of 8 lanes useful
        (5, 9, 1, 2, (1, 1, 1, 1), (2, 1)),  # batch 2, M = 2: 16 lanes for 9 columns
        (7, 30, 1, 1, (0, 1, 2, 1), (1, 2)),  # uneven padding, M = 4: 32 lanes for 30 columns
        (3, 33, 1, 1, (1, 1, 1, 1), (3, 3)),  # odd width, M = 6: 48 lanes for 33 columns (5 empty segments' tails)
        (28, 28, 1, 2, (1, 1, 1, 1), (2, 4)),  # VGG's 28x28, batch 2
        (224, 224, 1, 1, (1, 1, 1, 1), (4, 2)),  # VGG's 224x224 with the tall tile
        (9, 9, 2, 2, (1, 1, 1, 1), (1, 1)),  # strided: each column phase lifted, a 1-vector halo
        (12, 56, 2, 1, (1, 1, 1, 1), (4, 2)),  # ResNet's 56 -> 28 stride 2
        (5, 31, 2, 1, (0, 1, 2, 1), (2, 3)),  # odd width, uneven padding, strided
    ],
)
def test_lifted_rows_match_the_onnx_reference(height, width, stride, batch, pads, tile):
    """Lifted rows (output column j*M + i in lane j of vector i; each lane's M columns plus their
    halo stored as whole vectors, per column phase when strided) for any width, stride, padding
    and batch, forced on sizes the rule would not lift; every input load is a whole aligned vector."""
    _check_layout(height * 1000 + width, (batch, 6, height, width), stride, pads, lambda spec: dataclasses.replace(
        spec, flat=False, windows=False, lifted=True, aligned=False, fused=False, row_tile=tile[0], column_tile=tile[1],
        partials=1))


@pytest.mark.parametrize(
    "height, width, batch, pads, tile, lanes",
    [
        (7, 30, 1, (0, 1, 2, 1), (1, 2), 16),  # uneven padding, M = 2: 32 lanes for 30 columns, one tile a row
        (28, 28, 2, (1, 1, 1, 1), (7, 2), 16),  # VGG's 28x28 (as the AVX-512 rule lays it out), batch 2
        (6, 56, 1, (1, 1, 1, 1), (2, 2), 16),  # M = 4 in column tiles of 2: the second tile's halo is shifted
        (5, 9, 2, (1, 1, 1, 1), (2, 1), 8),  # 8 lanes, M = 2, batch 2
        (3, 33, 1, (1, 0, 1, 2), (3, 3), 8),  # M = 6, no left pad, odd width
    ],
)
def test_lifted_rows_without_a_stored_halo_match_the_onnx_reference(height, width, batch, pads, tile, lanes):
    """Lifted rows without their halo vectors (``lifted_halo=False``): halo vector M + i, lane j's column
    (j + 1) * M + i, is read as vector i one float further on (the last row's overreach lands in an extra
    zero row); any width, padding, batch and lane count, against onnx.reference."""
    _check_layout(height * 1000 + width + 7, (batch, 6, height, width), 1, pads, lambda spec: dataclasses.replace(
        spec, vector_width=lanes, flat=False, windows=False, lifted=True, lifted_halo=False, aligned=False,
        fused=False, row_tile=tile[0], column_tile=tile[1], partials=1))


def test_lifted_rows_without_a_halo_prefetch_the_kernel_ahead():
    """VGG-16 224's 512-channel 28x28 layer on AVX-512 (lifted, no stored halo: rows of 32 floats) keeps the
    kernel loop's prefetch (rows of the accumulator's columns plus one zero row, no halo vectors)."""
    weight = pattern_weight(np.random.default_rng(6), 8, 512, n_patterns=8, connectivity=3.6)
    spec = PatternConvSpec.from_fkw(pack_fkw(weight, analyze_conv_weight(weight)), (1, 512, 28, 28), (1, 1),
                                    (1, 1, 1, 1), True, True, 16, 16)
    assert spec.lifted and not spec.lifted_halo and spec.rows_input_shape == (31, 1, 32)
    scheduled = PatternConvCPU().apply(pattern_conv2d_primfunc(spec), tvm.target.Target(AVX512), False).mod["main"]
    assert "T.prefetch(" in scheduled.script()


def test_lifted_rows_without_a_halo_need_two_vectors_at_stride_1():
    weight = pattern_weight(np.random.default_rng(3), 8, 8, n_patterns=4)
    spec = PatternConvSpec.from_fkw(pack_fkw(weight, analyze_conv_weight(weight)), (1, 8, 14, 14), (1, 1),
                                    (1, 1, 1, 1), True, True, 16, 16)
    lifted = dataclasses.replace(spec, flat=False, windows=False, aligned=False, fused=False, partials=1, lifted=True,
                                 row_tile=2, column_tile=1)
    with pytest.raises(ValueError, match="without a stored halo"):  # M = 1: the halo would be two vectors on
        dataclasses.replace(lifted, lifted_halo=False)
    with pytest.raises(ValueError, match="without a stored halo"):
        dataclasses.replace(lifted, lifted_halo=False, strides=(2, 2))
    with pytest.raises(ValueError, match="without a stored halo"):
        dataclasses.replace(lifted, lifted=False, aligned=True, lifted_halo=False)


@pytest.mark.parametrize(
    "height, width, stride, batch, pads, tile",
    [
        (5, 9, 1, 2, (1, 1, 1, 1), (2, 1)),  # batch 2, odd width, pitch 16
        (7, 30, 1, 1, (0, 1, 2, 1), (1, 2)),  # uneven padding, 32 lanes for 30 columns
        (6, 13, 1, 1, (1, 0, 1, 2), (2, 1)),  # no left pad: no lead column
        (14, 14, 1, 1, (1, 1, 1, 1), (4, 2)),  # the tall tile
        (9, 9, 2, 2, (1, 1, 1, 1), (1, 1)),  # strided: phase pitch 5 -> 8
        (28, 28, 2, 1, (1, 1, 1, 1), (2, 2)),  # ResNet's 28 -> 14 stride 2
        (5, 31, 2, 1, (0, 1, 2, 1), (2, 3)),  # odd width, uneven padding, strided
    ],
)
def test_aligned_rows_match_the_onnx_reference(height, width, stride, batch, pads, tile):
    """Aligned rows (plain rows whose padded rows and column phases start on whole vectors; at
    stride 1 column p stored at p - 1, the left zero pad read from the previous row) for any width,
    stride, padding and batch."""
    _check_layout(height * 1000 + width, (batch, 6, height, width), stride, pads, lambda spec: dataclasses.replace(
        spec, flat=False, windows=False, lifted=False, aligned=True, row_tile=tile[0], column_tile=tile[1],
        partials=1))


@pytest.mark.parametrize(
    "height, width, stride, batch, pads, tile, aligned",
    [
        (5, 9, 1, 2, (1, 1, 1, 1), (2, 1), False),  # batch 2, rows 5 -> 6 and columns 9 -> 16 cropped
        (7, 30, 1, 1, (0, 1, 2, 1), (1, 2), True),  # uneven padding, aligned rows
        (6, 13, 1, 1, (1, 0, 1, 2), (1, 1), False),  # no left pad
        (14, 14, 1, 1, (1, 1, 1, 1), (4, 2), True),  # the tall tile, rows 14 -> 16
        (9, 9, 2, 2, (1, 1, 1, 1), (1, 1), False),  # strided
        (6, 112, 1, 1, (1, 1, 1, 1), (4, 2), False),  # VGG's 112/224 rows
    ],
)
def test_fused_rows_match_the_onnx_reference(height, width, stride, batch, pads, tile, aligned):
    """Fused stages (the accumulation in the user's filter order, the output stage in the
    register tile, the pad computed per row block) for any width, stride, padding, batch and crop."""
    _check_layout(height * 1000 + width + 7, (batch, 6, height, width), stride, pads, lambda spec: dataclasses.replace(
        spec, flat=False, windows=False, lifted=False, aligned=aligned, fused=True, row_tile=tile[0],
        column_tile=tile[1], partials=1))


def test_only_avx2_rows_of_28_to_111_columns_are_lifted():
    weight = pattern_weight(np.random.default_rng(6), 8, 8, n_patterns=4)
    fkw = pack_fkw(weight, analyze_conv_weight(weight))

    def lifted(size, lanes=8, accumulators=8, stride=1):
        return PatternConvSpec.from_fkw(fkw, (1, 8, size, size), (stride, stride), (1, 1, 1, 1), False, False,
                                        lanes, accumulators).lifted

    assert [lifted(size) for size in (14, 28, 32, 56, 111, 112, 224)] == [False, True, True, True, True, False, False]
    assert lifted(56, stride=2) and not lifted(28, stride=2)  # by output width: 28 and 14 columns
    assert not lifted(32, lanes=4, accumulators=16) and not lifted(32, lanes=16, accumulators=16)  # NEON, AVX-512


def test_avx2_rows_are_aligned_where_that_takes_no_more_memory():
    """ResNet-50's 14x14 and 7x7 rows and its stride-2 layers to 14 and 7 columns take aligned rows
    (pitch 16 or 8 floats instead of 18, 17 or 9); CIFAR's 16x16 and 8x8 and VGG's 112/224 rows,
    whose pitch would grow, keep plain rows, as does NEON."""
    weight = pattern_weight(np.random.default_rng(6), 8, 8, n_patterns=4)
    fkw = pack_fkw(weight, analyze_conv_weight(weight))

    def aligned(size, lanes=8, accumulators=8, stride=1):
        spec = PatternConvSpec.from_fkw(fkw, (1, 8, size, size), (stride, stride), (1, 1, 1, 1), False, False,
                                        lanes, accumulators)
        return spec.aligned and spec.rows_input_shape[2] % lanes == 0

    assert [aligned(size) for size in (7, 8, 14, 16, 112, 224)] == [True, False, True, False, False, False]
    assert aligned(28, stride=2) and aligned(14, stride=2) and not aligned(56, stride=2)  # 56 -> 28: lifted
    assert not aligned(14, lanes=4, accumulators=16)  # NEON (AVX-512 has its own rule)


@pytest.mark.parametrize(
    "channels, size, batch, bias, relu, n_patterns",
    [
        (8, 112, 1, True, True, 8),  # VGG-16 224's 112-pixel rows: 7 column blocks, 16 row blocks
        (3, 112, 2, False, False, 4),  # batch 2, no bias, no ReLU
        (64, 224, 1, True, False, 12),  # VGG-16 224's 64-channel 224x224 layer (the block's 64 channels)
        (128, 112, 1, True, True, 8),  # 128 channels (VGG-16 224's 128x128 112x112: the block in L2)
        (64, 32, 1, True, True, 8),  # VGG-16 CIFAR's 32x32 rows: 8-row tiles, 2 column blocks
        (128, 16, 2, False, True, 4),  # its 16x16 rows: one column block, batch 2
        (8, 56, 1, True, False, 12),  # ResNet-50's 56 columns: the last column block overlaps the third
        (5, 56, 2, True, True, 3),  # side taps from border vectors (<= 64 channels), batch 2, odd channels
        (65, 16, 1, False, True, 8),  # the most channels above: border floats broadcast
    ],
)
def test_avx512_wide_rows_kernel_matches_the_onnx_reference(monkeypatch, channels, size, batch, bias, relu,
                                                             n_patterns):
    """AVX-512 layers of at most 128 channels with rows of at least 112 columns (7-row tiles) or of 16, 32
    or 56 columns (8-row tiles) take the hand-scheduled wide-rows kernel (centre vectors aligned, borders
    shuffled in: no split loads); AVX2 and NEON keep the TE operator, as do other rows or more channels; it
    matches onnx.reference (border column and row blocks, an overlapping last column block, every pattern,
    batch)."""
    monkeypatch.setattr(pattern_conv_phases, "PHASE_PLANE_SIZES", {})  # 56x56 <= 64 channels: the phase-plane kernel
    from tvm_patdnn.errors import PatDNNError
    from tvm_patdnn.ops.pattern_conv_wide import pattern_conv_wide_primfunc, wide_rows_apply, wide_rows_tile

    rng = np.random.default_rng(size + channels)
    conv = ConvSpec(16, n_patterns=n_patterns, connectivity=2.0, bias=bias, relu=relu)
    model = build_cnn(rng, (batch, channels, size, size), [conv])
    mod = relax.transform.FoldConstant()(import_onnx(model).mod)
    for lanes, accumulators, wide in ((16, 32, True), (8, 16, False), (4, 32, False)):
        layouts = pattern_layouts(PatternConvRewrite(vector_width=lanes, accumulators=accumulators)(mod))
        assert [bool(layout.get("wide_rows", 0)) for layout in layouts] == [wide]
    weight = pattern_weight(np.random.default_rng(1), 8, 64, n_patterns=4)
    fkw = pack_fkw(weight, analyze_conv_weight(weight))
    spec = PatternConvSpec.from_fkw(fkw, (1, 64, 112, 112), (1, 1), (1, 1, 1, 1), True, True, 16, 32)
    assert wide_rows_apply(spec) and wide_rows_tile(spec) == 7
    assert not wide_rows_apply(dataclasses.replace(spec, in_channels=256))
    assert not wide_rows_apply(dataclasses.replace(spec, height=128, width=128))  # 128 rows: 7 does not divide

    def tile(height, width):
        return wide_rows_tile(dataclasses.replace(spec, height=height, width=width))

    assert [tile(size, size) for size in (224, 56, 32, 16, 28, 14, 8, 64)] == [7, 8, 8, 8, 0, 0, 0, 0]
    assert tile(24, 32) == 8 and tile(30, 32) == 0 and tile(14, 112) == 7 and tile(16, 120) == 0
    with pytest.raises(PatDNNError, match="wide-rows kernel"):
        pattern_conv_wide_primfunc(dataclasses.replace(spec, height=28, width=28))
    compiled = tvm_patdnn.compile(model, AVX512)
    if vector_lanes(resolve_target("x86")) != 16:
        pytest.skip("host CPU: no AVX-512 to run the code on (it was built)")
    x = rng.standard_normal((batch, channels, size, size)).astype(np.float32)
    expected = reference_outputs(model, {"input": x})[0]
    np.testing.assert_allclose(compiled.run({"input": x})[0], expected, rtol=1e-4, atol=1e-4)


_WIDE_TWO_THREADS = """
import sys, numpy as np, onnx, tvm_patdnn
compiled = tvm_patdnn.compile(onnx.load(sys.argv[1]), {"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})
np.save(sys.argv[3], compiled.run({"input": np.load(sys.argv[2])})[0])
"""


@pytest.mark.parametrize(
    "channels, filters, size, batch, bias, relu",
    [
        (1, 13, 112, 2, True, True),  # 9 (channel, pad row) slots for 13 filters: some filters prefetch none
        (5, 7, 224, 1, False, True),  # 45 slots for 7 filters, 14 column blocks, no bias
        (21, 16, 112, 2, True, False),  # odd channels, batch 2, no ReLU
    ],
)
def test_avx512_wide_rows_sweep_prefetch_with_two_threads(tmp_path, channels, filters, size, batch, bias, relu):
    """Rows of more than SWEEP_PREFETCH column blocks: each filter of a block's sweep prefetches its share of
    the (channel, pad row) slots of the block SWEEP_PREFETCH ahead (narrower rows none); the two threads of a
    fresh process (TVM_NUM_THREADS=2) split the row blocks, and the output matches onnx.reference."""
    import os
    import subprocess
    import sys

    from tvm_patdnn.ops import pattern_conv_wide

    rng = np.random.default_rng(channels * 31 + size)
    model = build_cnn(rng, (batch, channels, size, size), [ConvSpec(filters, connectivity=1.5, bias=bias, relu=relu)])
    weight = pattern_weight(np.random.default_rng(2), 8, channels, n_patterns=4)
    fkw = pack_fkw(weight, analyze_conv_weight(weight))

    def prefetches(width):
        spec = PatternConvSpec.from_fkw(fkw, (1, channels, 56, width), (1, 1), (1, 1, 1, 1), True, True, 16, 32)
        return pattern_conv_wide_primfunc_script(spec).count("T.prefetch(")

    mod = relax.transform.FoldConstant()(import_onnx(model).mod)
    layouts = pattern_layouts(PatternConvRewrite(vector_width=16, accumulators=32)(mod))
    assert [int(layout.get("wide_rows", 0)) for layout in layouts] == [1]
    assert pattern_conv_wide.SWEEP_PREFETCH == 2
    assert prefetches(size) == 1 and prefetches(32) == 0  # 2 column blocks: nothing ahead
    if vector_lanes(resolve_target("x86")) != 16:
        pytest.skip("host CPU: no AVX-512 to run the code on")
    x = rng.standard_normal((batch, channels, size, size)).astype(np.float32)
    import onnx

    onnx.save(model, tmp_path / "model.onnx")
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "TVM_NUM_THREADS": "2", "TVM_BIND_THREADS": "0"}
    subprocess.run([sys.executable, "-c", _WIDE_TWO_THREADS, str(tmp_path / "model.onnx"), str(tmp_path / "x.npy"),
                    str(tmp_path / "out.npy")], env=env, check=True)
    expected = reference_outputs(model, {"input": x})[0]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-4, atol=1e-4)


def pattern_conv_wide_primfunc_script(spec: PatternConvSpec) -> str:
    from tvm_patdnn.ops.pattern_conv_wide import pattern_conv_wide_primfunc

    return pattern_conv_wide_primfunc(spec).script()
