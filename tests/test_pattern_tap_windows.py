"""The AVX-512 tap-window pattern conv for 7x7 outputs (ops/pattern_conv_tap_windows.py) against onnx.reference."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from model_factory import ConvSpec, build_cnn, pattern_weight, reference_outputs
from tvm import relax

import tvm_patdnn
from tvm_patdnn.analysis import analyze_conv_weight
from tvm_patdnn.errors import PatDNNError
from tvm_patdnn.fkw import pack_fkw
from tvm_patdnn.frontend import import_onnx
from tvm_patdnn.ops import pattern_conv_tap_windows
from tvm_patdnn.ops.pattern_conv import PATTERN_CONV_ATTR, PatternConvSpec
from tvm_patdnn.ops.pattern_conv_tap_windows import pattern_conv_tap_windows_primfunc, tap_windows_weights
from tvm_patdnn.targets import resolve_target, vector_lanes
from tvm_patdnn.transform import PatternConvRewrite

AVX512 = {"kind": "llvm", "mcpu": "skylake-avx512"}
_NAMES = ("tap_lanes", "shifted_rows", "tap_windows", "phase_planes", "wide_rows")


def _kernels(model, lanes: int) -> list[list[str]]:
    """Per pattern conv of ``model``, the hand-built kernels the rewrite gives it on a ``lanes``-lane target."""
    mod = relax.transform.FoldConstant()(import_onnx(model).mod)
    rewritten = PatternConvRewrite(vector_width=lanes, accumulators=16 if lanes == 16 else 32 // lanes * 4)(mod)
    layouts = [func.attrs[PATTERN_CONV_ATTR] for _, func in rewritten.functions_items()
               if func.attrs is not None and PATTERN_CONV_ATTR in func.attrs]
    return [[name for name in _NAMES if int(layout.get(name, 0))] for layout in layouts]


def _check(batch: int, channels: int, size: int, conv: ConvSpec, cores: int, seed: int) -> None:
    """Compile a one-conv model for AVX-512 (it must take the tap-window kernel) and, where the host has 16
    lanes, run it against onnx.reference."""
    rng = np.random.default_rng(seed)
    model = build_cnn(rng, (batch, channels, size, size), [conv])
    assert _kernels(model, 16) == [["tap_windows"]]
    compiled = tvm_patdnn.compile(model, {**AVX512, "num-cores": cores})
    assert [r.kind for r in compiled.report] == ["pattern"]
    if vector_lanes(resolve_target("x86")) < 16:
        pytest.skip("host CPU: no 16-lane vectors to run the code on (it was built)")
    x = rng.standard_normal((batch, channels, size, size)).astype(np.float32)
    expected = reference_outputs(model, {"input": x})[0]
    np.testing.assert_allclose(compiled.run({"input": x})[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "batch, channels, filters, bias, relu, patterns, cores",
    [
        (1, 48, 24, True, True, 8, 1),  # ResNet-50's 14 -> 7: three 16-channel blocks
        (2, 21, 13, False, False, 12, 2),  # batch 2, odd channel and filter counts (a 5-channel last block), 2 threads
        (2, 37, 9, True, False, 3, 3),  # three threads for 9 filters, a ragged last block
        (1, 1, 16, False, True, 4, 1),  # one input channel: one block of one channel
        (1, 16, 5, True, True, 8, 2),  # exactly one block, two threads
    ],
)
def test_tap_window_kernel_matches_the_onnx_reference(batch, channels, filters, bias, relu, patterns, cores):
    """Every tap 4 aligned vectors of one of the channel's 9 windows (8x8 squares), kernels per (filter,
    channel block) whatever their patterns, partial sums between blocks, 7x7 of the 8x8 outputs stored."""
    conv = ConvSpec(filters, stride=2, connectivity=1.5 if channels > 1 else 1.0, bias=bias, relu=relu,
                    n_patterns=patterns)
    _check(batch, channels, 14, conv, cores, seed=channels * 3 + batch + patterns)


@pytest.mark.parametrize("size, stride, batch, channels, cores", [(7, 1, 2, 19, 1), (13, 2, 1, 20, 2), (7, 1, 1, 3, 3)])
def test_tap_window_kernel_on_other_sizes(monkeypatch, size, stride, batch, channels, cores):
    """7x7 outputs the rewrite does not route (``TAP_WINDOW_SIZES``) computed by the kernel all the same: a 7x7
    input at stride 1 (the zero square row and column read as padding) and a 13x13 one at stride 2."""
    monkeypatch.setattr(pattern_conv_tap_windows, "TAP_WINDOW_SIZES", "any")
    conv = ConvSpec(11, stride=stride, connectivity=1.5, n_patterns=8)
    _check(batch, channels, size, conv, cores, seed=size * channels)


def test_tap_window_kernel_without_prefetch(monkeypatch):
    monkeypatch.setattr(pattern_conv_tap_windows, "TAP_WINDOW_PREFETCH", 0)
    _check(1, 20, 14, ConvSpec(8, stride=2, connectivity=1.5), 1, seed=5)


@pytest.mark.parametrize("size, stride, lanes, kernel", [
    (14, 2, 16, "tap_windows"), (14, 2, 8, None), (14, 2, 4, None), (7, 1, 16, "shifted_rows"), (7, 1, 8, None),
    (13, 2, 16, None), (28, 2, 16, "phase_planes"), (16, 2, 16, None)])
def test_layers_take_the_tap_window_kernel_on_avx512_only(size, stride, lanes, kernel):
    """AVX-512 routes ResNet-50's 14 -> 7 stride-2 layers to this kernel (7x7 stride-1 layers keep the shifted-rows
    kernel: 0.63-0.69x on this one); AVX2 and NEON keep the TE operator."""
    model = build_cnn(np.random.default_rng(size), (1, 8, size, size), [ConvSpec(16, stride=stride, connectivity=2.0)])
    assert _kernels(model, lanes) == [[kernel] if kernel else []]


def _spec(shape, stride, padding=(1, 1, 1, 1), taps=4, out=24, seed=0):
    rng = np.random.default_rng(seed)
    weight = pattern_weight(rng, out, shape[1], 6, 1.5, taps=taps)
    fkw = pack_fkw(weight, analyze_conv_weight(weight, entries=taps))
    return fkw, PatternConvSpec.from_fkw(fkw, shape, (stride, stride), padding, False, False, 16, 16)


def test_the_tap_window_kernel_refuses_other_layers(monkeypatch):
    for shape, stride, padding, taps in [((1, 8, 14, 14), 1, (1, 1, 1, 1), 4), ((1, 8, 16, 16), 2, (1, 1, 1, 1), 4),
                                          ((1, 8, 16, 16), 2, (0, 0, 0, 0), 4), ((1, 8, 14, 14), 2, (1, 1, 1, 1), 3)]:
        _, spec = _spec(shape, stride, padding, taps)
        with pytest.raises(PatDNNError, match="tap-window kernel takes"):
            pattern_conv_tap_windows_primfunc(spec, 1, sizes="any")
    _, spec = _spec((1, 8, 14, 14), 2)
    with pytest.raises(PatDNNError, match="tap-window kernel takes"):
        pattern_conv_tap_windows_primfunc(spec, 1, lanes=8)
    monkeypatch.setattr(pattern_conv_tap_windows, "TAP_WINDOW_BLOCK", 200)
    _, spec = _spec((1, 150, 14, 14), 2)
    with pytest.raises(PatDNNError, match="16-bit"):
        pattern_conv_tap_windows_primfunc(spec, 1)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_tap_window_weights_split_the_kernels_between_threads(threads):
    """Kernels stored (channel block, filter)-major with 16-bit tap offsets into their block; with more threads the
    stored filters are rearranged so that each thread's range of them holds about its share of the kernels."""
    fkw, spec = _spec((1, 40, 14, 14), 2, out=30, seed=threads)
    values, offsets, runs, order = tap_windows_weights(fkw, spec, threads)
    f_, blocks = 30, 3
    assert sorted(order) == sorted(fkw.order) and runs[-1] == spec.n_kernels == len(values)
    assert offsets.dtype == np.int32 and offsets.shape == (spec.n_kernels, 2)
    fields = offsets.view("<u2").reshape(-1, 4).astype(int)
    assert fields.max() < 16 * 576 and (fields % 64 == 0).all()
    per_filter = np.diff(runs).reshape(blocks, f_).sum(axis=0)
    kept = np.diff(fkw.offsets).reshape(f_, -1).sum(axis=1)
    assert sorted(per_filter) == sorted(kept)
    if threads == 1:
        assert (order == fkw.order).all() and (per_filter == kept).all()
    shares = [per_filter[t * f_ // threads:(t + 1) * f_ // threads].sum() for t in range(threads)]
    assert max(shares) - min(shares) <= kept.max()
    assert isinstance(pattern_conv_tap_windows_primfunc(spec, threads), tvm.tirx.PrimFunc)


@pytest.mark.parametrize("batch, channels, cores", [(1, 48, 1), (2, 21, 2)])
def test_the_shifted_rows_stride_2_path_still_matches_the_onnx_reference(monkeypatch, batch, channels, cores):
    """With the tap-window kernel off, 14 -> 7 at stride 2 takes the shifted-rows kernel on 4 phase planes (its
    path before this kernel) and still matches."""
    monkeypatch.setattr(pattern_conv_tap_windows, "TAP_WINDOW_SIZES", frozenset())
    rng = np.random.default_rng(channels)
    model = build_cnn(rng, (batch, channels, 14, 14), [ConvSpec(23, stride=2, connectivity=1.5, n_patterns=8)])
    assert _kernels(model, 16) == [["shifted_rows"]]
    compiled = tvm_patdnn.compile(model, {**AVX512, "num-cores": cores})
    if vector_lanes(resolve_target("x86")) < 16:
        pytest.skip("host CPU: no 16-lane vectors to run the code on (it was built)")
    x = rng.standard_normal((batch, channels, 14, 14)).astype(np.float32)
    np.testing.assert_allclose(compiled.run({"input": x})[0], reference_outputs(model, {"input": x})[0],
                               rtol=1e-4, atol=1e-4)
