"""The Winograd conv kernel: transform matrices, models against onnx.reference (every tile size
forced, edge tiles, paddings, epilogues, batch 2), the pass's per-layer rule, code generation for
AVX-512 and NEON, and the NEON build run on the emulated phone."""

from __future__ import annotations

import gc
import re

import numpy as np
import onnx
import pytest
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_factory import ConvSpec, build_cnn, reference_outputs
from test_dense_conv import _relax_conv_chain
from tvm import relax

import tvm_patdnn
from tvm_patdnn.frontend import import_onnx
from tvm_patdnn.ops.winograd_conv import (
    ERROR_BOUND,
    WINOGRAD_ATTR,
    WinogradConvSpec,
    winograd_conv_primfunc,
    winograd_matrices,
)
from tvm_patdnn.pipeline import get_pipeline
from tvm_patdnn.targets import resolve_target, vector_lanes, vector_registers
from tvm_patdnn.transform import WinogradConvRewrite
from tvm_patdnn.transform.winograd_conv_rewrite import choose_tile

NEON = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
# the host's fp32 lanes: DenseConvRewrite (and so the Winograd pass) takes convs with at least this many filters
LANES = vector_lanes(resolve_target("x86"))


def assert_within(actual: np.ndarray, expected: np.ndarray, tile: int, scale: float | None = None) -> None:
    """Error relative to the output's magnitude (``scale``: the conv's, when a clip shrinks the
    output) within the measured bound of F(tile x tile)."""
    assert actual.shape == expected.shape
    scale = float(np.abs(expected).max()) if scale is None else scale
    error = float(np.abs(actual - expected).max()) / max(scale, 1e-6)
    assert error <= ERROR_BOUND[tile], f"F({tile}x{tile}) relative error {error:.2e}"


def winograd_calls(executable) -> int:
    return sum(line.strip().startswith("call  winograd_conv") for line in executable.as_text().splitlines())


def compile_forced(mod: tvm.IRModule, tile: int, target="x86"):
    """The module with every dense 3x3 stride-1 conv forced onto F(tile x tile)."""
    target = resolve_target(target)
    mod = relax.transform.FoldConstant()(mod)
    mod = WinogradConvRewrite(vector_registers(target), vector_lanes(target), tile=tile)(mod)
    return tvm.compile(mod, target, relax_pipeline=get_pipeline(target))


def run(executable, x: np.ndarray) -> np.ndarray:
    return relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


@pytest.mark.parametrize("tile", [2, 4, 6])
def test_transforms_compute_the_correlation_exactly(tile):
    at, g, bt = winograd_matrices(tile)
    rng = np.random.default_rng(tile)
    for _ in range(5):
        d, w = rng.standard_normal(tile + 2), rng.standard_normal(3)
        expected = [d[i:i + 3] @ w for i in range(tile)]
        np.testing.assert_allclose(at @ ((g @ w) * (bt @ d)), expected, rtol=0, atol=1e-12)


def test_unknown_tile_size_is_refused():
    with pytest.raises(ValueError, match="Winograd output tile 3"):
        winograd_matrices(3)


@st.composite
def winograd_models(draw):
    """One or two 3x3 stride-1 convs: odd sizes (partial edge tiles, images smaller than a
    tile), asymmetric paddings 0-2, filters no register tile divides, batch 1 and 2, bias, ReLU,
    residual adds. Returns (model, tile, convs, seed)."""
    tile = draw(st.sampled_from([2, 4, 6]))
    residual = draw(st.booleans())
    channels = draw(st.integers(LANES, 40)) if residual else draw(st.integers(1, 20))
    height, width = draw(st.integers(1, 13)), draw(st.integers(1, 13))
    convs = []
    for index in range(2 if residual else 1):
        pads = (1, 1, 1, 1) if residual else tuple(draw(st.integers(0, 2)) for _ in range(4))
        if height + pads[0] + pads[2] < 3 or width + pads[1] + pads[3] < 3:
            pads = (1, 1, 1, 1)
            height, width = max(height, 1), max(width, 1)
        out_c = channels if residual else draw(st.integers(LANES, 45))  # DenseConvRewrite's floor
        convs.append(ConvSpec(out_c, pads=pads, bias=draw(st.booleans()), relu=draw(st.booleans()),
                              residual=residual and index == 1, kind="dense"))
    shape = (draw(st.sampled_from([1, 2])), channels, height, width)
    seed = draw(st.integers(0, 2**31))
    return build_cnn(np.random.default_rng(seed), shape, convs), tile, len(convs), seed


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(winograd_models())
def test_random_convs_match_reference_on_every_tile_size(case):
    model, tile, convs, seed = case
    executable = compile_forced(import_onnx(model).mod, tile)
    assert winograd_calls(executable) == convs
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    assert_within(run(executable, x), reference_outputs(model, {"input": x})[0], tile)


@pytest.mark.parametrize("tile, low, high", [(2, 0.0, 6.0), (4, -0.5, 0.25)])  # ReLU6 and any clip
def test_clip_fuses_into_the_kernel(tile, low, high):
    rng = np.random.default_rng(tile)
    shape = (2, 7, 11, 9)
    weight = rng.standard_normal((37, 7, 3, 3)).astype(np.float32) * 0.2
    bias = rng.standard_normal(37).astype(np.float32)
    executable = compile_forced(_relax_conv_chain(shape, weight, bias, False, lambda v: relax.op.clip(v, low, high)),
                                tile)
    assert winograd_calls(executable) == 1
    assert "clip" not in executable.as_text()  # nothing left over after the kernel
    x = rng.standard_normal(shape).astype(np.float32)
    conv = sum(np.einsum("fc,nchw->nfhw", weight[:, :, a, b].astype(np.float64), x[:, :, a:a + 9, b:b + 7])
               for a in range(3) for b in range(3))
    biased = conv + bias.reshape(1, -1, 1, 1)
    assert_within(run(executable, x), np.clip(biased, low, high), tile, scale=float(np.abs(biased).max()))


def rule_model() -> onnx.ModelProto:
    """3x3 stride-1 convs the rule takes (F(4x4) on 26x25, F(2x2) on 24x23) and convs it leaves to
    the dense kernels: too few channels for F(2x2), strided, 1x1, depthwise, too small."""
    convs = [
        ConvSpec(64, kind="dense"),  # 64 -> 64, output 26x25: F(4x4)
        ConvSpec(64, kind="dense", pads=(0, 0, 0, 0)),  # output 24x23: F(2x2)
        ConvSpec(40, kind="dense"),  # 40 filters at 24x23: direct
        ConvSpec(64, kind="dense", stride=2),  # strided
        ConvSpec(64, kind="1x1"),
        ConvSpec(64, kind="depthwise"),
        ConvSpec(64, kind="dense"),  # 12x12
    ]
    return build_cnn(np.random.default_rng(5), (1, 64, 26, 25), convs)


def test_rule_follows_the_measured_thresholds():
    assert choose_tile(64, 64, 56, 56) == 4
    assert choose_tile(32, 32, 56, 56) == 4
    assert choose_tile(31, 64, 56, 56) is None
    assert choose_tile(256, 256, 14, 14) == 2
    assert choose_tile(32, 32, 14, 14) is None
    assert choose_tile(512, 512, 7, 7) is None


def test_rule_takes_wide_3x3_stride_1_layers_and_leaves_the_rest():
    model = rule_model()
    mod = WinogradConvRewrite()(relax.transform.FoldConstant()(import_onnx(model).mod))
    tiles = [int(func.attrs[WINOGRAD_ATTR]["tile"]) for _, func in mod.functions_items()
             if func.attrs is not None and WINOGRAD_ATTR in func.attrs]
    assert sorted(tiles) == [2, 4]
    convs = [b.value for block in mod["main"].body.blocks for b in block.bindings
             if isinstance(b.value, relax.Call) and b.value.op.name == "relax.nn.conv2d"]
    assert len(convs) == 5  # left for DenseConvRewrite and the depthwise path

    compiled = tvm_patdnn.compile(model, "x86")
    assert winograd_calls(compiled.executable) == 2
    x = np.random.default_rng(0).standard_normal((1, 64, 26, 25)).astype(np.float32)
    assert_within(compiled.run({"input": x})[0], reference_outputs(model, {"input": x})[0], 4)


def test_block_of_tiles_stays_in_l2_and_fills_the_register_tile():
    small = WinogradConvSpec.for_target(16, 8, 4, batch=1, in_channels=64, height=56, width=56, out_channels=64)
    assert (small.filter_tile, small.vectors, small.lanes) == (6, 2, 8)
    assert small.block % 16 == 0 and small.tiles == 14 * 15  # a phantom tile per tile row
    wide = WinogradConvSpec.for_target(32, 16, 4, batch=1, in_channels=512, height=14, width=14, out_channels=512,
                                       padding=(1, 1, 1, 1))
    assert (wide.tiles, wide.filter_tile, wide.vectors, wide.lanes, wide.block) == (20, 29, 1, 16, 16)  # one vector
    tiny = WinogradConvSpec.for_target(16, 8, 6, batch=1, in_channels=8, height=3, width=3, out_channels=32,
                                       padding=(1, 1, 1, 1))
    assert (tiny.tiles, tiny.lanes, tiny.block) == (2, 2, 2)  # one tile and its phantom: 2 narrow lanes


@pytest.mark.parametrize("target, fma, vector, register_tile", [
    ({"kind": "llvm", "mcpu": "skylake-avx512"}, "vfmadd231ps", "zmm", (14, 2)),
    (NEON, "fmla", "v", (13, 2)),
])
def test_avx512_and_neon_code_keeps_the_register_tile(target, fma, vector, register_tile):
    """Code generation only (this host may not run it): a loop of MR x NR FMAs of the target's
    width with no stack access, the GEMM's."""
    tvm_target = resolve_target(target)
    spec = WinogradConvSpec.for_target(vector_registers(tvm_target), vector_lanes(tvm_target), 4, batch=1,
                                       in_channels=64, height=28, width=28, out_channels=64, padding=(1, 1, 1, 1),
                                       has_bias=True, activation="relu")
    assert (spec.filter_tile, spec.vectors) == register_tile
    executable = tvm.compile(tvm.IRModule({"main": winograd_conv_primfunc(spec).with_attr("global_symbol", "main")}),
                             tvm_target)
    asm = executable.mod.imports[0].inspect_source("asm") if executable.mod.imports else \
        executable.mod.inspect_source("asm")
    lines = asm.splitlines()
    labels = {line[:-1]: i for i, line in enumerate(lines) if re.match(r"^\.LBB\S+:$", line)}
    loops = []  # (FMAs, stack accesses) of every backward-branching loop with FMAs
    for i, line in enumerate(lines):
        branch = re.match(r"\s+(?:j\w+|b\.\w+|b|cbn?z\s+\w+,)\s+(\.LBB\S+)", line)
        if branch and labels.get(branch.group(1), i) < i:
            body = lines[labels[branch.group(1)]:i]
            fmas = sum(bool(re.search(rf"{fma}\s.*{vector}\d", b)) for b in body)
            if fmas:
                loops.append((fmas, sum("rsp)" in b or "[sp" in b for b in body)))
    assert (spec.filter_tile * spec.vectors, 0) in loops  # the GEMM's reduction loop over channels


def test_neon_build_runs_on_the_emulated_phone(tmp_path, phone_runtime):
    """F(4x4) and F(2x2) cross-compiled for aarch64 NEON, run under qemu, against onnx.reference."""
    from tvm.support import cc

    from tvm_patdnn.phone import runtime
    from tvm_patdnn.phone.emulator import popen_session

    convs = [ConvSpec(36, kind="dense", pads=(0, 1, 2, 1)), ConvSpec(36, kind="dense", residual=True)]
    model = build_cnn(np.random.default_rng(3), (2, 5, 13, 11), convs)
    for tile in (2, 4):
        executable = compile_forced(import_onnx(model).mod, tile, NEON)
        assert winograd_calls(executable) == 2
        path = tmp_path / f"winograd{tile}.so"
        executable.export_library(str(path), fcompile=cc.cross_compiler(runtime.CROSS_CXX))
        x = np.random.default_rng(tile).standard_normal((2, 5, 13, 11)).astype(np.float32)
        remote = popen_session()
        remote.upload(str(path))
        out = relax.VirtualMachine(remote.load_module(path.name), remote.cpu())["main"](
            tvm.runtime.tensor(x, remote.cpu())).numpy()
        del remote
        gc.collect()
        assert_within(out, reference_outputs(model, {"input": x})[0], tile)
