"""The AVX-512 stride-2 pattern conv on phase planes (ops/pattern_conv_phases.py) against onnx.reference."""

from __future__ import annotations

import numpy as np
import pytest
from model_factory import ConvSpec, build_cnn, pattern_weight, reference_outputs
from tvm import relax

import tvm_patdnn
from tvm_patdnn.analysis import analyze_conv_weight
from tvm_patdnn.errors import PatDNNError
from tvm_patdnn.fkw import pack_fkw
from tvm_patdnn.frontend import import_onnx
from tvm_patdnn.ops import pattern_conv_phases
from tvm_patdnn.ops.pattern_conv import PATTERN_CONV_ATTR, PatternConvSpec
from tvm_patdnn.ops.pattern_conv_phases import pattern_conv_phases_primfunc, phase_planes_tile
from tvm_patdnn.targets import resolve_target, vector_lanes
from tvm_patdnn.transform import PatternConvRewrite

AVX512 = {"kind": "llvm", "mcpu": "skylake-avx512"}


def _check(batch: int, channels: int, height: int, width: int, conv: ConvSpec, cores: int, seed: int) -> None:
    """Compile a one-conv model for AVX-512 (it must take the phase-plane kernel) and, where the host has
    16 lanes, run it against onnx.reference."""
    rng = np.random.default_rng(seed)
    model = build_cnn(rng, (batch, channels, height, width), [conv])
    compiled = tvm_patdnn.compile(model, {**AVX512, "num-cores": cores})
    assert [r.kind for r in compiled.report] == ["pattern"]
    assert _kernels(model, 16) == [["phase_planes"]]
    if vector_lanes(resolve_target("x86")) < 16:
        pytest.skip("host CPU: no 16-lane vectors to run the code on (it was built)")
    x = rng.standard_normal((batch, channels, height, width)).astype(np.float32)
    expected = reference_outputs(model, {"input": x})[0]
    np.testing.assert_allclose(compiled.run({"input": x})[0], expected, rtol=1e-4, atol=1e-4)


def _kernels(model, lanes: int) -> list[list[str]]:
    """Per pattern conv of ``model``, the hand-built kernels the rewrite gives it on a ``lanes``-lane target."""
    mod = relax.transform.FoldConstant()(import_onnx(model).mod)
    rewritten = PatternConvRewrite(vector_width=lanes, accumulators=16 if lanes == 16 else 32 // lanes * 4)(mod)
    layouts = [func.attrs[PATTERN_CONV_ATTR] for _, func in rewritten.functions_items()
               if func.attrs is not None and PATTERN_CONV_ATTR in func.attrs]
    return [[name for name in ("tap_lanes", "shifted_rows", "tap_windows", "phase_planes", "wide_rows")
             if int(layout.get(name, 0))]
            for layout in layouts]


@pytest.mark.parametrize(
    "size, batch, channels, filters, bias, relu, patterns, cores",
    [
        (56, 1, 16, 24, True, True, 8, 1),  # ResNet-50's 56 -> 28: 2-vector rows, 4 rows a tile
        (56, 2, 7, 13, False, False, 12, 2),  # batch 2, odd channel and filter counts, no bias, no ReLU, 2 threads
        (28, 1, 24, 23, True, True, 8, 1),  # ResNet-50's 28 -> 14: 1-vector rows, 7 rows a tile
        (28, 2, 5, 9, True, False, 3, 3),  # three threads for 9 filters
        (28, 2, 1, 16, False, True, 4, 1),  # one input channel
    ],
)
def test_phase_plane_kernel_matches_the_onnx_reference(size, batch, channels, filters, bias, relu, patterns, cores):
    """Every tap a stride-1 read of one of the input's 4 phase planes (the shifted ones one valignd), whole
    output rows a register tile, stored as whole vectors of consecutive floats; one thread builds the planes per
    row block, more threads all of them first."""
    conv = ConvSpec(filters, stride=2, connectivity=1.5 if channels > 1 else 1.0, bias=bias, relu=relu,
                    n_patterns=patterns)
    _check(batch, channels, size, size, conv, cores, seed=size + batch * 3 + patterns)


@pytest.mark.parametrize(
    "height, width, batch, channels",
    [
        (27, 27, 1, 9),  # odd input: the last plane row and column hold the bottom and right zeros
        (30, 30, 2, 6),  # 15 output columns: the shifted taps read column 15, the last lane of one vector
        (31, 31, 1, 5),  # 16 output columns: two vectors a row
        (20, 34, 2, 3),  # not square: 10 x 17 outputs (2 vectors a row, 2 rows a tile)
        (16, 16, 1, 8),  # the narrowest input rows (one whole vector)
        (61, 61, 1, 4),  # 31 output columns, the most two vectors take
    ],
)
def test_phase_plane_kernel_on_other_sizes(monkeypatch, height, width, batch, channels):
    """Sizes the rewrite does not route (``PHASE_PLANE_SIZES``) computed by the kernel all the same."""
    monkeypatch.setattr(pattern_conv_phases, "PHASE_PLANE_SIZES", "any")
    conv = ConvSpec(11, stride=2, connectivity=1.5, n_patterns=8)
    _check(batch, channels, height, width, conv, 1, seed=height * width)


@pytest.mark.parametrize("size, stride, channels, lanes, kernel", [
    (56, 2, 8, 16, "phase_planes"), (28, 2, 8, 16, "phase_planes"), (14, 2, 8, 16, "tap_windows"),
    (30, 2, 8, 16, None), (56, 2, 8, 8, None), (28, 2, 8, 8, None), (28, 2, 8, 4, None),
    (14, 1, 256, 16, "phase_planes"), (14, 1, 128, 16, None), (14, 1, 256, 8, None), (14, 1, 256, 4, None),
    (28, 1, 128, 16, "phase_planes"), (28, 1, 512, 16, "phase_planes"), (28, 1, 64, 16, None), (28, 1, 8, 16, None),
    (28, 1, 128, 8, None), (28, 1, 512, 4, None),
    (56, 1, 64, 16, "phase_planes"), (56, 1, 128, 16, "phase_planes"), (56, 1, 256, 16, "phase_planes"),
    (56, 1, 64, 8, None), (56, 1, 256, 8, None), (56, 1, 128, 4, None), (112, 1, 8, 16, "wide_rows"),
    (32, 1, 64, 16, "phase_planes"), (32, 1, 128, 16, "wide_rows"), (32, 1, 64, 8, None),
    (112, 1, 128, 16, "phase_planes"), (112, 1, 64, 16, "wide_rows"), (112, 1, 128, 8, None)])
def test_layers_take_the_phase_plane_kernel_on_avx512_only(size, stride, channels, lanes, kernel):
    """AVX-512 routes ResNet-50's 56 -> 28 and 28 -> 14 stride-2 sizes to this kernel (14 -> 7 takes the
    tap-window kernel), and at stride 1 14x14 layers of >= 256 channels, 28x28 ones of >= 128 and every 56x56 one
    (VGG-16 224's 128 and 256 channels too); other sizes and channel counts keep the TE operator or the wide-rows
    kernel, AVX2 and NEON the TE operator."""
    model = build_cnn(np.random.default_rng(size), (1, channels, size, size),
                      [ConvSpec(16, stride=stride, connectivity=2.0)])
    assert _kernels(model, lanes) == [[kernel] if kernel else []]


@pytest.mark.parametrize(
    "height, width, batch, channels, cores, routed",
    [
        (14, 14, 1, 256, 1, True),  # ResNet-50's 14x14 layers: 1-vector rows (14 columns, 2 zero lanes), 7-row tiles
        (14, 14, 2, 5, 2, False),  # rows narrower than a vector: the input's last row loads the 16 floats ending it
        (28, 28, 1, 128, 1, True),  # ResNet-50's 128-channel 28x28 layers: 2-vector lifted rows, 7-row tiles
        (28, 28, 2, 131, 1, True),  # VGG-16 224's 28x28 layers have 256-512 channels: batch 2, odd channels
        (28, 28, 2, 7, 3, False),
        (9, 9, 2, 3, 1, False),  # 9 columns, 9 rows (3-row tiles)
        (17, 20, 1, 4, 1, False),  # not square: 17 x 20 (2 vectors a row, 17 rows: 1-row tiles)
        (31, 31, 1, 2, 2, False),  # 31 columns, the most two vectors take (the shifted taps read column 31: zeros)
        (56, 56, 1, 64, 1, True),  # ResNet-50's 64-channel 56x56 layers: 4-vector lifted rows, 2-row tiles
        (56, 56, 2, 67, 1, True),  # VGG-16 224's 56x56 layers have 128-256 channels: batch 2, odd channels
        (32, 32, 2, 63, 1, True),  # VGG-16 CIFAR's 32x32 (64 channels): 2 lifted vectors (not 3), 4-row tiles
        (10, 48, 1, 3, 2, False),  # 48 columns: 3 lifted vectors, lane 15 of the last one column 47
        (6, 224, 1, 2, 1, False),  # 224 columns: 14 lifted vectors, 1-row tiles
        (112, 112, 1, 129, 1, True),  # VGG-16 224's 128x128 112x112: 7 lifted vectors, 2-row tiles
        (12, 63, 2, 3, 2, False),  # 63 columns, the most four vectors take
    ],
)
def test_stride_1_phase_plane_kernel_matches_the_onnx_reference(monkeypatch, height, width, batch, channels, cores,
                                                                routed):
    """At stride 1 the kernel takes one plane (the input, rows of whole vectors, a zero row above and below and
    zero lanes right of the last column): a tap is row offset dy; rows of one vector read a side tap as one
    valignd with zeros, rows of more are lifted (lane j of vector i: column V j + i), a side tap the neighbouring
    vector or at the ends the other end's vector one lane on."""
    if not routed:
        monkeypatch.setattr(pattern_conv_phases, "PHASE_PLANE_SIZES", "any")
    conv = ConvSpec(11, connectivity=1.5 if channels > 1 else 1.0, n_patterns=8, bias=batch == 1, relu=cores != 2)
    _check(batch, channels, height, width, conv, cores, seed=height * width + channels)


@pytest.mark.parametrize("height, width, channels", [(17, 20, 4), (12, 63, 3)])
def test_stride_1_rows_unlifted_still_match_the_onnx_reference(monkeypatch, height, width, channels):
    """With PHASE_LIFTED off, rows of several vectors read every side tap as a valignd of two adjacent vectors."""
    monkeypatch.setattr(pattern_conv_phases, "PHASE_PLANE_SIZES", "any")
    monkeypatch.setattr(pattern_conv_phases, "PHASE_LIFTED", False)
    _check(2, channels, height, width, ConvSpec(9, connectivity=1.5, n_patterns=8), 1, seed=height + width)


def test_the_phase_plane_tile():
    spec = _spec((1, 8, 56, 56))
    assert phase_planes_tile(spec) == (4, 2)  # 28 output columns (+ the shifted taps' 29th): 2 vectors
    assert phase_planes_tile(_spec((1, 8, 28, 28))) == (7, 1)
    assert phase_planes_tile(_spec((1, 8, 34, 34))) == (1, 2)  # 17 output rows: a prime
    # stride 1: lifted rows of >= 2 vectors take up to 14 accumulators, one-vector rows 8
    assert [phase_planes_tile(_spec((1, 8, size, size), stride=1)) for size in (56, 28, 14)] == [(2, 4), (7, 2), (7, 1)]
    assert phase_planes_tile(_spec((1, 8, 12, 63), stride=1)) == (3, 4)
    assert phase_planes_tile(_spec((1, 8, 32, 32), stride=1)) == (4, 2)  # 32 columns: 2 lifted vectors, not 3


def _spec(shape, stride=2, padding=(1, 1, 1, 1), lanes=16, taps=4):
    rng = np.random.default_rng(0)
    weight = pattern_weight(rng, 8, shape[1], 4, 1.5, taps=taps)
    fkw = pack_fkw(weight, analyze_conv_weight(weight))
    return PatternConvSpec.from_fkw(fkw, shape, (stride, stride), padding, False, False, lanes, 16)


@pytest.mark.parametrize("shape, stride, padding, lanes", [
    ((1, 8, 28, 28), 3, (1, 1, 1, 1), 16),  # stride 3
    ((1, 8, 28, 28), 2, (0, 0, 0, 0), 16),  # no padding
    ((1, 8, 28, 28), 1, (0, 0, 0, 0), 16),
    ((1, 8, 28, 28), 2, (1, 1, 1, 1), 8),  # AVX2 (8 lanes)
    ((1, 8, 14, 14), 2, (1, 1, 1, 1), 16),  # rows narrower than a vector
    ((1, 8, 128, 128), 2, (1, 1, 1, 1), 16),  # 64 output columns: more than 4 vectors with the shifted column
    ((1, 8, 64, 64), 1, (1, 1, 1, 1), 16),  # the same at stride 1 unlifted (below)
    ((1, 8, 4, 240), 1, (1, 1, 1, 1), 16),  # lifted stride-1 rows: more than 14 vectors
])
def test_the_phase_plane_kernel_refuses_other_layers(monkeypatch, shape, stride, padding, lanes):
    monkeypatch.setattr(pattern_conv_phases, "PHASE_PLANE_SIZES", "any")
    monkeypatch.setattr(pattern_conv_phases, "PHASE_LIFTED", shape[3] != 64)
    with pytest.raises(PatDNNError, match="phase-plane kernel takes"):
        pattern_conv_phases_primfunc(_spec(shape, stride, padding, lanes), 1, lanes)


def test_the_phase_plane_kernel_refuses_unrouted_sizes():
    with pytest.raises(PatDNNError, match="phase-plane kernel takes"):
        pattern_conv_phases_primfunc(_spec((1, 8, 30, 30)))


def test_stride_2_kernels_prefetch_later_weights():
    """At stride 2 each kernel prefetches the weights and channel index of the kernel PHASE_WEIGHT_PREFETCH (64)
    ahead besides its plane lines; stride-1 kernels only their plane lines. The results are checked by the
    onnx.reference tests above (batch 2, odd channels, 1-3 threads)."""
    def prefetches(spec):
        lines = pattern_conv_phases_primfunc(spec).script().splitlines()
        return [line.strip() for line in lines if "T.prefetch" in line]

    spec = _spec((1, 8, 56, 56))
    stride2, stride1 = prefetches(spec), prefetches(_spec((1, 8, 56, 56), stride=1))
    weights = [line for line in stride2 if "+ 64" in line]  # one values and one channels line per pattern's loop
    assert sorted(line.split("[")[0] for line in weights) == sorted(
        ["T.prefetch(T.address_of(channels", "T.prefetch(T.address_of(values"] * len(spec.patterns))
    assert stride1 and not [line for line in stride1 if "+ 64" in line or "values" in line]
