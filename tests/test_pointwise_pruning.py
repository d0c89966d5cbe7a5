"""Connectivity pruning of pointwise (1x1) convs and FC layers: exact block projections,
``prune_onnx``/CLI with ``pointwise``/``fc``, and the compiled pruned model against the reference.

Exactness is checked by brute force: every choice of kept blocks is enumerated on tiny layers
and no feasible point may be closer than the projection.
"""

from __future__ import annotations

import argparse
import itertools
import math

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import numpy_helper

from model_factory import ConvSpec, build_cnn, reference_outputs
from tvm_patdnn.errors import PatDNNError
from tvm_patdnn.pruning import prune_onnx, save_model_atomic
from tvm_patdnn.pruning.commands import add_prune_command
from tvm_patdnn.pruning.projection import (
    block_grid,
    kept_block_count,
    parse_block,
    pointwise_mask,
    pointwise_reason,
    project_pointwise,
)

SETTINGS = settings(deadline=None, max_examples=120)
values = st.one_of(st.just(0.0), st.sampled_from([1.0, -1.0, 0.5]), st.floats(-4, 4, width=32))
BLOCKS = [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (3, 1)]


@st.composite
def small_case(draw):
    """A weight of up to 12 entries, a block that fits it, and a rate keeping >= 1 block."""
    block = draw(st.sampled_from(BLOCKS))
    o = draw(st.integers(block[0], max(block[0], 6)))
    i = draw(st.integers(block[1], max(block[1], 12 // o)))
    four_d = draw(st.booleans())
    weight = draw(arrays(np.float32, (o, i, 1, 1) if four_d else (o, i), elements=values))
    n_blocks = math.prod(block_grid(weight.shape, block))
    rate = draw(st.sampled_from([1.0, 1.5, 2.0, 3.0, 4.0, 8.0]).filter(lambda r: n_blocks / r >= 0.5))
    return weight, block, rate


def _block_index(o: int, i: int, block: tuple[int, int]) -> np.ndarray:
    """The block (row-major over the block grid) each weight belongs to, as an (O, I) array."""
    cols = -(-i // block[1])
    rows, columns = np.indices((o, i))
    return (rows // block[0]) * cols + columns // block[1]


def brute_force_distance2(weight: np.ndarray, block: tuple[int, int], kept: int) -> float:
    """Smallest squared distance to a point with at most ``kept`` nonzero blocks."""
    matrix = weight.reshape(weight.shape[0], weight.shape[1]).astype(np.float64)
    index = _block_index(*matrix.shape, block)
    n_blocks = int(index.max()) + 1
    best = math.inf
    for support in itertools.combinations(range(n_blocks), kept):
        removed = ~np.isin(index, support)
        best = min(best, float(np.square(matrix[removed]).sum()))
    return best


@SETTINGS
@given(small_case())
def test_project_pointwise_is_exact_projection(case):
    weight, block, rate = case
    result = project_pointwise(weight, rate, block)
    assert result.shape == weight.shape and result.dtype == weight.dtype
    kept = kept_block_count(math.prod(block_grid(weight.shape, block)), rate)
    mask = pointwise_mask(weight, rate, block).reshape(weight.shape[:2])
    index = _block_index(*weight.shape[:2], block)
    # The mask is a union of exactly `kept` whole blocks (partial edge blocks included).
    kept_blocks = np.unique(index[mask])
    assert len(kept_blocks) == kept and np.array_equal(mask, np.isin(index, kept_blocks))
    # Kept values are copied bit for bit, the rest are +0.0.
    assert np.array_equal(result[mask.reshape(weight.shape)], weight[mask.reshape(weight.shape)])
    assert not np.signbit(result[~mask.reshape(weight.shape)]).any() and (result[~mask.reshape(weight.shape)] == 0).all()
    ours = float(np.square(weight.astype(np.float64) - result.astype(np.float64)).sum())
    assert ours == pytest.approx(brute_force_distance2(weight, block, kept), rel=1e-12, abs=1e-12)
    # Idempotent: projecting a feasible point changes nothing.
    assert np.array_equal(project_pointwise(result, rate, block), result)


def test_partial_last_block_counts_as_one_block():
    """6 output channels in 4x1 blocks: rows of blocks hold 4 and 2 channels, both one block."""
    weight = np.zeros((6, 3, 1, 1), np.float32)
    weight[4:, 0] = 10.0  # the partial block of input 0: largest norm (2 x 100)
    weight[:4, 1] = 1.0  # a full block, norm 4
    weight[:4, 2] = 0.5
    assert block_grid(weight.shape, (4, 1)) == (2, 3)
    mask = pointwise_mask(weight, 3.0, (4, 1))  # 6 blocks / 3 = 2 kept
    assert mask[:, :, 0, 0].tolist() == [[False, True, False]] * 4 + [[True, False, False]] * 2
    assert np.count_nonzero(project_pointwise(weight, 3.0, (4, 1))) == 6  # 2 + 4 weights of 18: 1/3
    # Ties keep the earlier block: all-equal weights keep the first output-channel blocks.
    ties = np.ones((8, 2), np.float32)
    assert pointwise_mask(ties, 2.0, (4, 1)).tolist() == [[True, True]] * 4 + [[False, False]] * 4


def test_unstructured_is_top_k_magnitudes():
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((16, 24)).astype(np.float32)
    result = project_pointwise(weight, 4.0)
    kept = np.abs(weight).ravel() >= np.sort(np.abs(weight).ravel())[-96]
    assert np.count_nonzero(result) == 96 and np.array_equal(result != 0, kept.reshape(weight.shape))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda w: project_pointwise(w, 0.5), "pointwise rate must be a finite number >= 1, got 0.5"),
        (lambda w: project_pointwise(w, float("inf")), "finite number >= 1"),
        (lambda w: project_pointwise(w, True), "finite number >= 1"),
        (lambda w: project_pointwise(w, 100.0, (4, 1)), "pointwise rate 100.0 keeps no block of a layer with 16 blocks"),
        (lambda w: project_pointwise(w, 2.0, (16, 1)), "block 16x1 does not fit a layer with 8 output and 8 input"),
        (lambda w: project_pointwise(w, 2.0, (0, 1)), "two positive integers"),
        (lambda w: project_pointwise(w, 2.0, (4,)), "two positive integers"),
        (lambda w: project_pointwise(w, 2.0, (4.5, 1)), "two positive integers"),
        (lambda w: project_pointwise(w, 2.0, "4by1"), "two positive integers"),
        (lambda w: project_pointwise(w.reshape(8, 8, 1, 1).repeat(3, 2), 2.0), "1x1 OIHW convolution weight or an"),
        (lambda w: project_pointwise(w.astype(np.int32), 2.0), "floating-point"),
    ],
)
def test_bad_pointwise_inputs(call, message):
    weight = np.ones((8, 8), np.float32)
    with pytest.raises(PatDNNError, match=message):
        call(weight)


def test_parse_block_and_reason():
    assert parse_block("4x1") == parse_block(" 4X1 ") == parse_block((4, 1)) == (4, 1)
    assert parse_block([1, 4]) == (1, 4)
    assert pointwise_reason((16, 16, 1, 1)) is None
    assert pointwise_reason((16, 3, 1, 1)) == "first layer (3 input channels) kept dense"
    assert pointwise_reason((16, 3, 1, 1), first_layer_dense=False) is None
    assert pointwise_reason((16, 1, 1, 1), groups=16) == "depthwise (group=16)"
    assert pointwise_reason((16, 16, 3, 3)) == "kernel 3x3 is not 1x1"


# --- prune_onnx and the CLI on a bottleneck model -------------------------------------------------


def bottleneck_model(seed: int = 0, batch: int = 2) -> onnx.ModelProto:
    """3x3 stem, 1x1 reduce → 3x3 expand, a 1x1 with a residual add, a strided 3x3, a strided
    1x1 with 18 outputs (not a multiple of 4), and a Gemm head: every kind of layer pruning meets."""
    rng = np.random.default_rng(seed)
    return build_cnn(rng, (batch, 3, 11, 11), [
        ConvSpec(16, kind="dense"),
        ConvSpec(8, kind="1x1"),
        ConvSpec(16, kind="dense"),
        ConvSpec(16, kind="1x1", residual=True),
        ConvSpec(16, kind="dense", stride=2),
        ConvSpec(18, kind="1x1", stride=2),
    ], head=True)


def weights_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_prune_onnx_pointwise_layers():
    model = bottleneck_model()
    res = prune_onnx(model, n_patterns=8, connectivity=3.6, pointwise=4, pointwise_block=(4, 1))
    by_name = {rec.name: rec for rec in res.layers}
    assert by_name["conv0"].reason == "first layer (3 input channels) kept dense"
    for name in ("conv2", "conv4"):
        assert by_name[name].action == "pruned" and by_name[name].block is None and by_name[name].patterns
    weights = weights_of(res.model)
    for name, (o, i) in {"conv1": (8, 16), "conv3": (16, 16), "conv5": (18, 16)}.items():
        rec = by_name[name]
        assert rec.action == "pruned" and rec.block == (4, 1) and rec.patterns == ()
        blocks = -(-o // 4) * i
        kept = kept_block_count(blocks, 4)
        w = weights[f"{name}.weight"][:, :, 0, 0]
        padded = np.zeros((-(-o // 4) * 4, i), bool)
        padded[:o] = w != 0
        assert padded.reshape(-1, 4, i).any(axis=1).sum() == kept
        assert rec.kept_kernels == np.count_nonzero(w) and rec.total_kernels == o * i
        assert rec.density == pytest.approx(np.count_nonzero(w) / (o * i))
    # conv5 has 18 output channels: 5 block rows (the last of 2 channels) x 16 = 80 blocks, 20
    # kept; a partial block counts as a whole one, so the kept fraction of the 288 weights is
    # between 20 x 2 and 20 x 4 of them, not exactly 1/4.
    assert 40 <= by_name["conv5"].kept_kernels <= 80
    assert "fc" not in by_name  # Gemm layers are only considered with fc=RATE
    table = res.summary()
    assert "4x1 blocks" in table and "8 patterns" in table and "5 of 6 conv layers pruned" in table
    # Unstructured and 8x1: same kept fraction where channels divide, different supports.
    unstructured = prune_onnx(model, pointwise=4, pointwise_block=(1, 1))
    w = weights_of(unstructured.model)["conv3.weight"]
    assert np.count_nonzero(w) == 64
    eight = prune_onnx(model, pointwise=4, pointwise_block="8x1")
    assert {r.name: r.reason for r in eight.layers}["conv1"] is None
    w8 = weights_of(eight.model)["conv3.weight"][:, :, 0, 0]
    assert np.count_nonzero(w8) == 64
    for half in (w8[:8], w8[8:]):  # each 8x1 block is kept or removed as a whole
        assert ((half != 0).all(axis=0) | (half == 0).all(axis=0)).all()
    # pointwise=None leaves 1x1 convs dense with a reason.
    off = {r.name: r for r in prune_onnx(model, pointwise=None).layers}
    assert off["conv1"].action == "dense" and off["conv1"].reason == "1x1 pruning off (pointwise=None)"


def test_prune_onnx_fc_and_block_fitting():
    model = bottleneck_model()
    # The only Gemm is the classifier: kept dense unless forced.
    res = prune_onnx(model, fc=2.0)
    gemm = [rec for rec in res.layers if rec.op == "Gemm"]
    assert len(gemm) == 1 and gemm[0].reason == "last FC layer (classifier) kept dense"
    forced = prune_onnx(model, fc=2.0, pointwise_block=(1, 1), layers={gemm[0].name: True})
    rec = next(r for r in forced.layers if r.op == "Gemm")
    assert rec.action == "pruned" and rec.kept_kernels == 90 and rec.total_kernels == 180
    assert "conv and FC layers pruned" in forced.summary()
    # Gemm with B stored (in, out) (transB=0): blocks run along output channels of B.T.
    edited = onnx.ModelProto.FromString(model.SerializeToString())
    gemm_node = next(n for n in edited.graph.node if n.op_type == "Gemm")
    del gemm_node.attribute[:]
    b = next(t for t in edited.graph.initializer if t.name == "fc.weight")
    b.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(b).T), "fc.weight"))
    res = prune_onnx(edited, fc=2.0, pointwise_block=(4, 1), layers={gemm_node.name or "logits": True})
    bt = weights_of(res.model)["fc.weight"]  # (18, 10): in x out
    out_major = np.zeros((12, 18), bool)
    out_major[:10] = (bt != 0).T
    assert out_major.reshape(3, 4, 18).any(axis=1).sum() == kept_block_count(3 * 18, 2.0)
    assert reference_outputs(res.model, {"input": np.ones((2, 3, 11, 11), np.float32)})[0].shape == (2, 10)
    # A block bigger than a layer: the layer stays dense with a reason, forcing it is an error.
    big = {r.name: r for r in prune_onnx(model, pointwise_block=(16, 1)).layers}
    assert big["conv1"].reason == "8x16 channels are fewer than one 16x1 block" and big["conv3"].action == "pruned"
    with pytest.raises(PatDNNError, match="layer conv1 cannot be pruned: 8x16 channels are fewer than one 16x1 block"):
        prune_onnx(model, pointwise_block=(16, 1), layers={"conv1": True})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pointwise": 0.5}, "pointwise rate must be a finite number >= 1, got 0.5"),
        ({"fc": 0}, "fc rate must be a finite number >= 1"),
        ({"pointwise": 1000.0}, "layer conv1: pointwise rate 1000.0 keeps no block"),
        ({"pointwise_block": (4, 0)}, "two positive integers"),
        ({"pointwise": None, "layers": {"conv1": True}}, "layer conv1 cannot be pruned: 1x1 pruning off"),
    ],
)
def test_prune_onnx_bad_pointwise_options(kwargs, message):
    with pytest.raises(PatDNNError, match=message):
        prune_onnx(bottleneck_model(), **kwargs)


def test_compiled_pruned_bottleneck_matches_reference():
    """The pruned model (1x1 convs at 4x in 4x1 blocks, a residual, stride 2, 18 channels, batch 2)
    compiles and agrees with onnx.reference; the 3x3 layers run as pattern layers."""
    tvm_patdnn = pytest.importorskip("tvm_patdnn")
    res = prune_onnx(bottleneck_model(batch=2), n_patterns=8, connectivity=2.0, pointwise=4)
    x = np.random.default_rng(5).standard_normal((2, 3, 11, 11)).astype(np.float32)
    compiled = tvm_patdnn.compile(res.model, "x86", input_shapes={"input": (2, 3, 11, 11)})
    kinds = {r.name: r.kind for r in compiled.report}
    assert kinds["conv2"] == kinds["conv4"] == "pattern", compiled.format_report()
    (got,) = compiled.run({"input": x})
    (expected,) = reference_outputs(res.model, {"input": x})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="patdnn")
    add_prune_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_pointwise(tmp_path, capsys):
    src, out = tmp_path / "model.onnx", tmp_path / "pruned.onnx"
    save_model_atomic(bottleneck_model(), src)
    assert cli(["prune", str(src), "-o", str(out), "--pointwise", "2", "--pointwise-block", "1x4",
                "--fc", "2", "--force", "fc.weight"]) == 0
    text = capsys.readouterr().out
    assert "1x4 blocks" in text and "conv and FC layers pruned" in text
    weights = weights_of(onnx.load(str(out)))
    assert np.count_nonzero(weights["conv3.weight"]) == 128  # 16x16 in 1x4 blocks: 64 blocks, 32 kept
    fc = np.zeros((10, 20), bool)  # 10x18 in 1x4 blocks: 50 blocks (the last of a row 1x2), 25 kept
    fc[:, :18] = weights["fc.weight"] != 0
    assert fc.reshape(10, 5, 4).any(axis=2).sum() == 25
    assert cli(["prune", str(src), "-o", str(out), "--pointwise", "none"]) == 0
    assert np.count_nonzero(weights_of(onnx.load(str(out)))["conv3.weight"]) == 256
    for argv in (["--pointwise-block", "4"], ["--pointwise-block", "0x1"], ["--pointwise", "lots"]):
        with pytest.raises(SystemExit):
            cli(["prune", str(src), "-o", str(out), *argv])
    with pytest.raises(PatDNNError, match="pointwise rate must be a finite number >= 1"):
        cli(["prune", str(src), "-o", str(out), "--pointwise", "0.5"])
