"""The small-image pattern kernels (2x2, 4x4, 7x7 and 8x8 outputs) against onnx.reference: every pattern of the
layer, batch 2, bias and ReLU on and off, 1 to 3 threads, on AVX2 and AVX-512 builds."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from model_factory import ConvSpec, build_cnn, pattern_weight, reference_outputs
from tvm import relax

import tvm_patdnn
from tvm_patdnn.analysis import analyze_conv_weight
from tvm_patdnn.fkw import pack_fkw
from tvm_patdnn.frontend import import_onnx
from tvm_patdnn.ops.pattern_conv import PATTERN_CONV_ATTR, PatternConvSpec
from tvm_patdnn.errors import PatDNNError
from tvm_patdnn.ops.pattern_conv_2x2 import pattern_conv_2x2_primfunc
from tvm_patdnn.ops.pattern_conv_shifted_rows import pattern_conv_shifted_rows_primfunc
from tvm_patdnn.targets import resolve_target, vector_lanes
from tvm_patdnn.transform import PatternConvRewrite

AVX2 = {"kind": "llvm", "mcpu": "znver3"}
AVX512 = {"kind": "llvm", "mcpu": "skylake-avx512"}


def _check(target: dict, lanes: int, batch: int, channels: int, height: int, conv: ConvSpec, seed: int) -> None:
    """Compile a one-conv model for ``target``, and where the host has ``lanes`` lanes run it against
    onnx.reference."""
    rng = np.random.default_rng(seed)
    model = build_cnn(rng, (batch, channels, height, height), [conv])
    compiled = tvm_patdnn.compile(model, target)
    assert [r.kind for r in compiled.report] == ["pattern"]
    assert len(compiled.report[0].patterns) == conv.n_patterns  # every pattern of the layer is used
    if vector_lanes(resolve_target("x86")) < lanes:
        pytest.skip(f"host CPU: no {lanes}-lane vectors to run the code on (it was built)")
    x = rng.standard_normal((batch, channels, height, height)).astype(np.float32)
    expected = reference_outputs(model, {"input": x})[0]
    np.testing.assert_allclose(compiled.run({"input": x})[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "batch, bias, relu, patterns, cores",
    [
        (1, True, True, 8, 1),  # VGG's 2x2 layers: 8 patterns, one thread
        (2, False, False, 8, 2),  # batch 2, no bias, no ReLU, two threads
        (2, True, False, 3, 2),  # a pattern count that is not a power of two
        (1, False, True, 12, 1),
        (2, True, True, 8, 3),  # three threads: 40 filters do not split evenly
    ],
)
def test_avx2_2x2_kernel_matches_the_onnx_reference(batch, bias, relu, patterns, cores):
    """AVX2: each kernel's lanes are shuffled in registers from the channel's 4 values (``vpshufb``
    with its pattern's control bytes); each thread takes a contiguous run of filters holding its share
    of the kernels."""
    conv = ConvSpec(40, connectivity=1.5, bias=bias, relu=relu, n_patterns=patterns)
    _check({**AVX2, "num-cores": cores}, 8, batch, 48, 2, conv, seed=patterns * 2 + batch)


@pytest.mark.parametrize("batch, bias, relu", [(1, True, True), (2, False, False)])
def test_avx512_2x2_kernel_matches_the_onnx_reference(batch, bias, relu):
    conv = ConvSpec(24, connectivity=1.5, bias=bias, relu=relu)
    _check({**AVX512, "num-cores": 2}, 16, batch, 32, 2, conv, seed=batch)


@pytest.mark.parametrize(
    "batch, channels, bias, relu, patterns, cores",
    [
        (2, 97, True, True, 4, 2),  # runs of ~24 kernels: the 8-accumulator loop and its remainders; odd channels
        (1, 131, False, False, 3, 1),  # runs of ~44 kernels, no bias, no ReLU, one thread
        (2, 75, True, False, 12, 3),  # runs of ~6 kernels (the remainder alone), three threads
    ],
)
def test_avx512_2x2_kernel_with_long_runs_matches_the_onnx_reference(batch, channels, bias, relu, patterns, cores):
    """AVX-512: each (filter, pattern) run alternates its kernels between 8 accumulators, the last
    ``length % 8`` kernels into the first; every kept kernel's channel (connectivity 1)."""
    conv = ConvSpec(21, connectivity=1.0, bias=bias, relu=relu, n_patterns=patterns)
    _check({**AVX512, "num-cores": cores}, 16, batch, channels, 2, conv, seed=channels + batch)


@pytest.mark.parametrize(
    "batch, channels, connectivity, bias, relu, patterns, cores",
    [
        (1, 48, 1.5, True, True, 8, 1),  # VGG's 4x4 layers: 8 patterns, one thread
        (2, 48, 1.5, False, False, 8, 2),  # batch 2, no bias, no ReLU, two threads
        (2, 1, 1.0, True, False, 3, 2),  # one input channel
        (1, 20, 1.5, False, True, 12, 1),
        (2, 48, 1.5, True, True, 8, 3),  # three threads: 40 filters do not split evenly
        (1, 2, 2.0, True, False, 3, 3),  # filters left with no kernel, sorted last: the last thread's
    ],
)
def test_avx2_4x4_kernel_matches_the_onnx_reference(batch, channels, connectivity, bias, relu, patterns, cores):
    """AVX2: each tap's two output rows are shuffled in registers from the channel's two vectors; each
    thread takes a contiguous run of filters holding its share of the kernels."""
    conv = ConvSpec(40, connectivity=connectivity, bias=bias, relu=relu, n_patterns=patterns)
    _check({**AVX2, "num-cores": cores}, 8, batch, channels, 4, conv, seed=patterns * 3 + batch)


@pytest.mark.parametrize(
    "batch, channels, bias, relu, patterns, cores",
    [
        (1, 48, True, True, 8, 1),  # VGG's 4x4 layers: two accumulator sets over even and odd runs
        (2, 48, False, False, 8, 2),  # batch 2, no bias, no ReLU, two threads
        (1, 1, True, False, 3, 1),  # one input channel: runs of one kernel (the odd tail alone)
        (2, 20, False, True, 12, 3),  # three threads
    ],
)
def test_avx512_4x4_kernel_matches_the_onnx_reference(batch, channels, bias, relu, patterns, cores):
    """AVX-512: each tap's 16 pixels permuted in registers from the channel's one vector; each run
    alternates its kernels between two sets of tap accumulators."""
    conv = ConvSpec(40, connectivity=1.5 if channels > 1 else 1.0, bias=bias, relu=relu, n_patterns=patterns)
    _check({**AVX512, "num-cores": cores}, 16, batch, channels, 4, conv, seed=patterns * 5 + batch)


@pytest.mark.parametrize("batch, channels, bias, relu, patterns, cores",
                         [(1, 48, True, True, 8, 1), (2, 20, False, False, 12, 2), (1, 1, True, False, 3, 3)])
def test_avx512_8x8_kernel_matches_the_onnx_reference(batch, channels, bias, relu, patterns, cores):
    """AVX-512: each output vector (two rows) of each tap permuted in registers from the two channel
    vectors holding its input rows, zeros past the border."""
    conv = ConvSpec(24, connectivity=1.5 if channels > 1 else 1.0, bias=bias, relu=relu, n_patterns=patterns)
    _check({**AVX512, "num-cores": cores}, 16, batch, channels, 8, conv, seed=patterns * 7 + batch)


@pytest.mark.parametrize(
    "size, stride, batch, channels, bias, relu, patterns, cores",
    [
        (7, 1, 1, 48, True, True, 8, 1),  # ResNet-50's 7x7 layers: computed in 8x8 zero-padded copies
        (7, 1, 2, 21, False, False, 12, 2),  # batch 2, an odd channel count, no bias, no ReLU, two threads
        (7, 1, 1, 1, True, False, 3, 3),  # one input channel, three threads
        (14, 2, 1, 48, True, True, 8, 1),  # ResNet-50's 14 -> 7 stride 2: four phase planes a channel
        (14, 2, 2, 21, False, True, 12, 2),
        (14, 2, 2, 5, True, False, 3, 3),
    ],
)
def test_avx512_7x7_kernel_matches_the_onnx_reference(size, stride, batch, channels, bias, relu, patterns, cores):
    """AVX-512: 7x7 outputs computed as 8x8 ones (the channel, or each of a stride-2 input's phase planes,
    copied into an 8x8 square with a zero column and row), 7x7 of them stored, in whole vectors."""
    conv = ConvSpec(23, stride=stride, connectivity=1.5 if channels > 1 else 1.0, bias=bias, relu=relu,
                    n_patterns=patterns)
    _check({**AVX512, "num-cores": cores}, 16, batch, channels, size, conv, seed=patterns * 11 + batch + size)


def test_the_shifted_rows_kernel_refuses_other_layers():
    rng = np.random.default_rng(0)
    weight = pattern_weight(rng, 8, 8, 4, 1.5)
    fkw = pack_fkw(weight, analyze_conv_weight(weight))
    for shape, stride in [((1, 8, 9, 9), 1), ((1, 8, 12, 12), 2), ((1, 8, 7, 7), 2)]:
        spec = PatternConvSpec.from_fkw(fkw, shape, (stride, stride), (1, 1, 1, 1), False, False, 16, 16)
        with pytest.raises(PatDNNError, match="shifted-rows kernel takes"):
            pattern_conv_shifted_rows_primfunc(spec, 1, 16)
    spec = PatternConvSpec.from_fkw(fkw, (1, 8, 7, 7), (1, 1), (1, 1, 1, 1), False, False, 8, 16)
    with pytest.raises(PatDNNError, match="7x7 at 8 lanes|at 8 lanes"):
        pattern_conv_shifted_rows_primfunc(spec, 1, 8)


@pytest.mark.parametrize("size, lanes, kernel", [(2, 8, "tap_lanes"), (2, 16, "tap_lanes"), (4, 8, "shifted_rows"),
                                                 (4, 16, "shifted_rows"), (8, 16, "shifted_rows"), (8, 8, None),
                                                 (7, 16, "shifted_rows"), (7, 8, None), (4, 4, None), (7, 4, None),
                                                 (3, 8, None), (16, 16, None)])
def test_small_images_take_their_kernel_per_target(size, lanes, kernel):
    """2x2 images take the (pixel x tap) kernel and 4x4 the shifted-rows kernel on AVX2 and AVX-512,
    8x8 and 7x7 the shifted-rows kernel on AVX-512 only (NEON keeps the TE operator's layouts)."""
    assert _small_image_kernels(size, ConvSpec(16, connectivity=2.0), lanes) == [[kernel] if kernel else []]


@pytest.mark.parametrize("size, stride, lanes, kernel", [(14, 2, 16, "tap_windows"), (14, 2, 8, None),
                                                         (14, 2, 4, None), (12, 2, 16, None), (16, 2, 16, None),
                                                         (14, 1, 16, None)])
def test_strided_small_images_take_their_kernel_per_target(size, stride, lanes, kernel):
    """AVX-512 takes the tap-window kernel for 14x14 -> 7x7 at stride 2 (ResNet-50's last stage; the shifted-rows
    kernel's stride-2 path is covered in tests/test_pattern_tap_windows.py), no other strided layer; AVX2 and NEON
    keep the TE operator's layouts."""
    conv = ConvSpec(16, stride=stride, connectivity=2.0)
    assert _small_image_kernels(size, conv, lanes) == [[kernel] if kernel else []]


def _small_image_kernels(size: int, conv: ConvSpec, lanes: int) -> list[list[str]]:
    """Per pattern conv of a one-conv model on ``size`` x ``size`` images, the small-image kernels the
    rewrite gives it on a ``lanes``-lane target (none: the TE operator)."""
    model = build_cnn(np.random.default_rng(size), (1, 8, size, size), [conv])
    mod = relax.transform.FoldConstant()(import_onnx(model).mod)
    rewritten = PatternConvRewrite(vector_width=lanes, accumulators=16)(mod)
    layouts = [func.attrs[PATTERN_CONV_ATTR] for _, func in rewritten.functions_items()
               if func.attrs is not None and PATTERN_CONV_ATTR in func.attrs]
    return [[name for name in ("tap_lanes", "shifted_rows", "tap_windows") if int(layout.get(name, 0))]
            for layout in layouts]


@pytest.mark.parametrize("batch, bias, relu", [(1, True, True), (2, False, False)])
def test_the_16_lane_2x2_kernel_is_right_on_any_x86_host(batch, bias, relu):
    """The AVX-512 kernel's lanes (one vpermps per kernel, the vectorised epilogue) checked where the
    host has no AVX-512: compiled for AVX2, LLVM splits each 16-lane vector in two."""
    rng = np.random.default_rng(batch)
    weight = pattern_weight(rng, 24, 32, 8, 1.5)
    bias_values = rng.standard_normal(24).astype(np.float32) if bias else None
    fkw = pack_fkw(weight, analyze_conv_weight(weight))
    spec = PatternConvSpec.from_fkw(fkw, (batch, 32, 2, 2), (1, 1), (1, 1, 1, 1), bias, relu, 16, 16)
    func = pattern_conv_2x2_primfunc(spec, 16, threads=2)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), resolve_target(AVX2))
    x = rng.standard_normal((batch, 32, 2, 2)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((batch, 24, 2, 2), np.float32))
    weights = [fkw.values, fkw.channels, fkw.offsets, fkw.order] + ([bias_values] if bias else [])
    lib["main"](tvm.runtime.tensor(x), *(tvm.runtime.tensor(w) for w in weights), out)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    expected = sum(np.einsum("oc,nchw->nohw", weight[:, :, dy, dx], padded[:, :, dy:dy + 2, dx:dx + 2])
                   for dy in range(3) for dx in range(3))
    expected = expected + (bias_values[None, :, None, None] if bias else 0)
    np.testing.assert_allclose(out.numpy(), np.maximum(expected, 0) if relu else expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch, channels, bias, relu, patterns, cores",
                         [(1, 48, True, True, 8, 1), (2, 21, False, False, 12, 2), (1, 1, True, False, 3, 3)])
def test_avx512_4x4_kernel_with_two_accumulator_sets_matches_the_onnx_reference(
        monkeypatch, batch, channels, bias, relu, patterns, cores):
    """The AVX-512 4x4 build runs one set of tap accumulators (session 18); the two-set code (each run alternating
    its kernels between two sets, the odd tail into the first) stays right."""
    from tvm_patdnn.ops import pattern_conv_shifted_rows as shifted_rows

    monkeypatch.setitem(shifted_rows._SETS, (16, 4), 2)
    conv = ConvSpec(40, connectivity=1.5 if channels > 1 else 1.0, bias=bias, relu=relu, n_patterns=patterns)
    _check({**AVX512, "num-cores": cores}, 16, batch, channels, 4, conv, seed=patterns * 5 + batch + 1)


@pytest.mark.parametrize("batch, channels, bias, relu, patterns, cores",
                         [(2, 37, True, True, 12, 2), (2, 5, False, False, 9, 1), (1, 64, True, False, 8, 3)])
def test_avx512_4x4_lane_shifts_match_the_onnx_reference(batch, channels, bias, relu, patterns, cores):
    """AVX-512 4x4 taps as lane shifts of the channel's vector with zeros and a column mask (session 18): every
    tap of up to 12 patterns, odd channel counts, batch 2, 1-3 threads."""
    conv = ConvSpec(33, connectivity=1.5 if channels > 1 else 1.0, bias=bias, relu=relu, n_patterns=patterns)
    _check({**AVX512, "num-cores": cores}, 16, batch, channels, 4, conv, seed=patterns * 3 + batch + channels)


def test_avx512_7x7_threads_keep_the_tile_in_registers():
    """Code generation only: the 2-thread 16-lane 7x7 build does not prefetch weights inside its kernel loop (in
    the parallel body its tile is not a stack buffer, and with the prefetch LLVM stored all 16 accumulators every
    kernel: 2x the 1-thread work), so no innermost FMA loop stores a zmm; the 1-thread build keeps the prefetch."""
    rng = np.random.default_rng(2)
    weight = pattern_weight(rng, 16, 16, 4, 1.5)
    fkw = pack_fkw(weight, analyze_conv_weight(weight))
    spec = PatternConvSpec.from_fkw(fkw, (1, 16, 7, 7), (1, 1), (1, 1, 1, 1), False, False, 16, 16)
    weight_prefetches = [line for line in pattern_conv_shifted_rows_primfunc(spec, 1, 16).script().splitlines()
                         if "T.prefetch" in line and line.endswith(", 0, 3, 1)")]
    assert weight_prefetches
    func = pattern_conv_shifted_rows_primfunc(spec, 2, 16).with_attr("global_symbol", "main")
    assert "0, 3, 1)" not in func.script()
    executable = tvm.compile(tvm.IRModule({"main": func}), {"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})
    asm = (executable.mod.imports[0] if executable.mod.imports else executable.mod).inspect_source("asm").splitlines()
    labels = {line[:-1]: i for i, line in enumerate(asm) if re.match(r"^\.LBB\S+:$", line)}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(asm)
             if (m := re.match(r"\s+j\w+\s+(\.LBB\S+)", line)) and labels.get(m.group(1), i) < i]
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    bodies = [asm[a:b] for a, b in inner if any("vfmadd" in line for line in asm[a:b])]
    assert bodies and not any(re.search(r"vmov\w+\s+%zmm\d+, .*\(", line) for body in bodies for line in body)


def test_avx512_7x7_layers_prefetch_their_next_output_channels():
    """The 16-lane 7x7 kernel prefetches (for writing) the output channel of a filter 2 ahead, every line of its 49
    floats; the 8-lane 4x4 build does not (AVX2 unchanged). Its results are checked by the 7x7 tests above."""
    rng = np.random.default_rng(1)
    weight = pattern_weight(rng, 8, 8, 4, 1.5)
    fkw = pack_fkw(weight, analyze_conv_weight(weight))
    spec = PatternConvSpec.from_fkw(fkw, (1, 8, 7, 7), (1, 1), (1, 1, 1, 1), False, False, 16, 16)
    text = pattern_conv_shifted_rows_primfunc(spec, 1, 16).script()
    writes = [line for line in text.splitlines() if "T.prefetch" in line and line.endswith(", 1, 3, 1)")]
    assert len(writes) == 4 and all("+ 2, 7)]) * 49" in line for line in writes)
    spec4 = PatternConvSpec.from_fkw(fkw, (1, 8, 4, 4), (1, 1), (1, 1, 1, 1), False, False, 8, 16)
    assert "prefetch" not in pattern_conv_shifted_rows_primfunc(spec4, 1, 8).script()
