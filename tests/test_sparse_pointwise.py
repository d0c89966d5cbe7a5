"""The block-sparse 1x1 conv kernel: its weight format, models against onnx.reference, which layers the
pass takes (and reports as "sparse"), and its code for AVX-512 and NEON."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_factory import ConvSpec, build_cnn
from test_compiler import check_against_reference

import tvm_patdnn
from tvm_patdnn.ops.sparse_pointwise import (BLOCK, MAX_DENSITY, SparsePointwiseSpec, block_density,
                                             block_sparse_weight, sparse_pointwise_primfunc)
from tvm_patdnn.targets import resolve_target


def kernel_calls(compiled: tvm_patdnn.CompiledModel, kernel: str) -> int:
    return sum(line.strip().startswith(f"call  {kernel}") for line in compiled.executable.as_text().splitlines())


def unpack(packed, out_channels: int, in_channels: int, block: int) -> np.ndarray:
    """The dense [F, C] weight a BlockSparseWeight stands for, read through its starts."""
    weight = np.zeros((packed.starts.shape[0] * block, in_channels), dtype=np.float32)
    for fb in range(packed.starts.shape[0]):
        for e in range(packed.starts[fb, 0], packed.starts[fb, -1]):
            weight[fb * block:(fb + 1) * block, packed.channels[e]] = packed.values[e]
    return weight[:out_channels]


@pytest.mark.parametrize("out_c,in_c,channel_block", [(13, 7, 3), (8, 64, 64), (1, 5, 2), (30, 100, 16)])
def test_block_sparse_weight_holds_exactly_the_kept_blocks(out_c: int, in_c: int, channel_block: int) -> None:
    rng = np.random.default_rng(out_c)
    weight = rng.standard_normal((out_c, in_c, 1, 1)).astype(np.float32)
    kept = rng.random((-(-out_c // BLOCK), in_c)) < 0.3
    weight *= np.repeat(kept, BLOCK, axis=0)[:out_c, :, None, None]
    weight[0, 0] = 0.0  # a zero inside a kept block stays a stored zero, not a dropped block
    packed = block_sparse_weight(weight, BLOCK, channel_block)
    np.testing.assert_array_equal(unpack(packed, out_c, in_c, BLOCK), weight[:, :, 0, 0])
    rows = np.zeros((-(-out_c // BLOCK) * BLOCK, in_c), dtype=np.float32)
    rows[:out_c] = weight[:, :, 0, 0]
    assert packed.kept_blocks == rows.reshape(-1, BLOCK, in_c).any(axis=1).sum()
    # each (filter block, channel block) run holds that channel block's channels, in order
    for fb in range(packed.starts.shape[0]):
        for kb in range(packed.starts.shape[1] - 1):
            run = packed.channels[packed.starts[fb, kb]:packed.starts[fb, kb + 1]]
            assert np.all(np.diff(run) > 0) and np.all(run // channel_block == kb)
    assert block_density(weight, BLOCK) == pytest.approx(packed.kept_blocks / kept.size)


@st.composite
def sparse_models(draw):
    """Chains of block-sparse 1x1 convs between dense layers: odd pixel counts, channels that are not a
    multiple of the block, strides 1-2, bias/ReLU/residual, batch 1 and 2."""
    seed = draw(st.integers(0, 2**31))
    channels, height, width = draw(st.integers(1, 24)), draw(st.integers(1, 11)), draw(st.integers(1, 11))
    shape = (draw(st.sampled_from([1, 2])), channels, height, width)
    convs, sparse = [], 0
    for _ in range(draw(st.integers(1, 3))):
        residual = draw(st.booleans())
        out_c = channels if residual else draw(st.integers(1, 40))
        stride = 1 if residual else draw(st.sampled_from([1, 2]))
        convs.append(ConvSpec(out_channels=out_c, stride=stride, bias=draw(st.booleans()), relu=draw(st.booleans()),
                              residual=residual, kind="1x1", connectivity=4.0))
        height, width = (height - 1) // stride + 1, (width - 1) // stride + 1
        channels = out_c
    model = build_cnn(np.random.default_rng(seed), shape, convs)
    return model, seed


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sparse_models())
def test_random_sparse_pointwise_chains_match_reference(case):
    model, seed = case
    compiled = check_against_reference(model, seed)
    sparse = [r for r in compiled.report if r.kind == "sparse"]
    assert kernel_calls(compiled, "sparse_pointwise_conv") == len(sparse)
    assert all(record.reason is None for record in sparse)
    # the rule is the kept share of (BLOCK, 1) blocks; the report's density counts weights, which a
    # partial last block can put above MAX_DENSITY (5 filters, 1 channel, 4 weights kept: 0.8 vs 0.5)
    pointwise = [onnx.numpy_helper.to_array(w) for w in model.graph.initializer if len(w.dims) == 4 and w.dims[2:] == [1, 1]]
    assert len(sparse) == sum(block_density(w, BLOCK) <= MAX_DENSITY for w in pointwise)


def test_sparse_and_dense_layers_alternate_and_report_says_which():
    convs = [
        ConvSpec(64, kind="dense"),
        ConvSpec(40, kind="1x1", connectivity=4.0),  # sparse, bias + ReLU fused
        ConvSpec(40, connectivity=3.6),  # pattern
        ConvSpec(40, kind="1x1", connectivity=4.0, residual=True),  # sparse + residual
        ConvSpec(24, kind="1x1"),  # dense 1x1
        ConvSpec(600, kind="1x1", connectivity=4.0, stride=2, relu=False),  # strided
        ConvSpec(30, kind="1x1", connectivity=4.0),  # 600 input channels: several channel blocks
    ]
    model = build_cnn(np.random.default_rng(7), (2, 3, 19, 17), convs, head=True)
    compiled = check_against_reference(model, 7)
    assert [r.kind for r in compiled.report] == ["dense", "sparse", "pattern", "sparse", "dense", "sparse", "sparse"]
    assert kernel_calls(compiled, "sparse_pointwise_conv") == 4
    assert "sparse 1x1 (4x1 blocks)" in compiled.format_report() and "4 sparse 1x1" in compiled.format_report()


@pytest.mark.parametrize("batch,size,stride,residual", [
    (1, 7, 1, True),  # 49 pixels: 3 whole 16-pixel tiles and the last pixel on its own kernel
    (2, 13, 2, False),  # 13x13 strided to 7x7: the last pixel's panel gathered, batch 2
    (1, 14, 1, False),  # 196 pixels: 4 left over, an overlapping last tile
    (2, 17, 1, True),  # 289 pixels: 18 tiles and the last pixel
])
def test_odd_pixel_counts_match_reference(batch: int, size: int, stride: int, residual: bool) -> None:
    convs = [ConvSpec(37, kind="1x1", connectivity=4.0, stride=stride),  # channels not a multiple of the block
             ConvSpec(37, kind="1x1", connectivity=4.0, residual=residual, relu=False)]
    model = build_cnn(np.random.default_rng(size), (batch, 600, size, size), convs)
    compiled = check_against_reference(model, size)
    assert [r.kind for r in compiled.report] == ["sparse", "sparse"]


@pytest.mark.parametrize("target,instruction,vectors", [
    ({"kind": "llvm", "mcpu": "skylake-avx512"}, "zmm", 2),  # 2 FMA units x latency 4: 8 chains
    ({"kind": "llvm", "mcpu": "znver4"}, "zmm", 1),  # 512-bit FMAs on 256-bit units: 4 chains
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, "fmla", 2),
])
def test_wide_targets_get_their_register_tile(target, instruction: str, vectors: int) -> None:
    resolved = resolve_target(target)
    from tvm_patdnn.targets import fma_chains, vector_lanes, vector_registers

    spec = SparsePointwiseSpec.for_target(vector_registers(resolved), vector_lanes(resolved), BLOCK, 100,
                                          fma_chains(resolved), batch=1, in_channels=64, height=28, width=28,
                                          out_channels=64, has_bias=True, activation="relu")
    # 4 rows x the fewest pixel vectors that give the target's FMA units enough independent chains
    assert (spec.conv.filter_tile, spec.conv.vectors) == (BLOCK, vectors)
    lib = tvm.tirx.build(tvm.IRModule({"main": sparse_pointwise_primfunc(spec).with_attr("global_symbol", "main")}),
                         target=resolved)
    assert instruction in lib.inspect_source("asm")


@pytest.mark.parametrize("size,stride,prefetches", [
    (28, 1, True),  # stride 1, many tiles: the next tile's line in each channel
    (28, 2, False),  # strided windows: tried, no gain
    (4, 1, False),  # one tile: no next one
])
def test_stride_one_layers_prefetch_the_next_tiles_input(size: int, stride: int, prefetches: bool) -> None:
    spec = SparsePointwiseSpec.for_target(16, 8, BLOCK, 100, batch=1, in_channels=64, height=size, width=size,
                                          out_channels=64, strides=(stride, stride))
    lib = tvm.tirx.build(tvm.IRModule({"main": sparse_pointwise_primfunc(spec).with_attr("global_symbol", "main")}),
                         target=resolve_target({"kind": "llvm", "mcpu": "znver3"}))
    assert ("prefetcht0" in lib.inspect_source("asm")) == prefetches
