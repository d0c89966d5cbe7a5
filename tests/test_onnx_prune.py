"""One-shot ONNX pruning: real models in, exactly sparse and otherwise identical models out."""

from __future__ import annotations

import argparse
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from tvm_patdnn.errors import PatDNNError
from tvm_patdnn.kernel_patterns import kernel_masks, popcount
from tvm_patdnn.pruning import kept_kernel_count, prune_onnx, save_model_atomic
from tvm_patdnn.pruning.commands import add_prune_command
from tvm_patdnn.pruning.plots import plot_pattern_frequencies

def _tensor(name: str, shape, rng: np.random.Generator) -> TensorProto:
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def build_model() -> onnx.ModelProto:
    """Every case the pruner must tell apart, in one runnable graph (input 1x3x10x10).

    first 3-channel conv (+bias) -> relu -> 3x3 conv (+bias) -> relu -> 1x1 conv -> depthwise
    3x3 -> 3x3 conv whose weight is a Constant node -> two 3x3 convs sharing one initializer
    -> dilated 3x3 conv.
    """
    rng = np.random.default_rng(1234)
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="first", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="pointwise"),
        helper.make_node("Conv", ["c2", "w3"], ["c3"], name="depthwise", group=16, pads=[1, 1, 1, 1]),
        helper.make_node("Constant", [], ["w4"], name="w4_const", value=_tensor("w4_value", (16, 16, 3, 3), rng)),
        helper.make_node("Conv", ["c3", "w4"], ["c4"], name="from_constant", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c4", "w5"], ["c5"], name="shared_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c5"], ["r5"], name="relu5"),
        helper.make_node("Conv", ["r5", "w5"], ["c6"], name="shared_b", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c6", "w7", "b7"], ["y"], name="dilated", dilations=[2, 2], pads=[2, 2, 2, 2]),
    ]
    initializers = [
        _tensor("w0", (16, 3, 3, 3), rng), _tensor("b0", (16,), rng),
        _tensor("w1", (16, 16, 3, 3), rng), _tensor("b1", (16,), rng),
        _tensor("w2", (16, 16, 1, 1), rng),
        _tensor("w3", (16, 1, 3, 3), rng),
        _tensor("w5", (16, 16, 3, 3), rng),
        _tensor("w7", (8, 16, 3, 3), rng), _tensor("b7", (8,), rng),
    ]
    graph = helper.make_graph(
        nodes, "patdnn_test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 10, 10])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def weights_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node tensors by name."""
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return tensors


def without_weights(model: onnx.ModelProto, names) -> bytes:
    """The model's bytes with the data of the named tensors removed."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for tensor in list(model.graph.initializer) + [
        n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"
    ]:
        if tensor.name in names or tensor.name == "w4_value" and "w4" in names:
            tensor.ClearField("raw_data")
    return model.SerializeToString()


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x})[0]


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return build_model()


@pytest.fixture(scope="module")
def result(model):
    return prune_onnx(model, n_patterns=8, connectivity=3.6)


def test_layer_decisions(result):
    by_name = {rec.name: rec for rec in result.layers}
    assert [rec.name for rec in result.layers] == [
        "first", "conv1", "pointwise", "depthwise", "from_constant", "shared_a", "shared_b", "dilated"
    ]
    assert by_name["first"].reason == "first layer (3 input channels) kept dense"
    assert by_name["pointwise"].action == "pruned" and by_name["pointwise"].block == (4, 1)  # default pointwise=4
    assert by_name["pointwise"].kept_kernels == 64 and by_name["pointwise"].density == 0.25
    assert by_name["depthwise"].reason == "depthwise (group=16)"
    assert by_name["dilated"].reason == "dilated (dilations=(2, 2))"
    for name in ("conv1", "from_constant", "shared_a", "shared_b"):
        rec = by_name[name]
        assert rec.action == "pruned" and rec.reason is None
        assert rec.kept_kernels == kept_kernel_count(256, 3.6) == 71
        assert rec.total_kernels == 256
        assert rec.density == pytest.approx(71 * 4 / (256 * 9))
        assert set(rec.patterns) <= set(result.pattern_set)
    for name in ("first", "depthwise", "dilated"):
        assert by_name[name].action == "dense" and by_name[name].density == 1.0
    assert len(result.pattern_set) == 8
    assert sum(result.frequencies.values()) == 3 * 256  # w1, w4, w5 (shared, counted once)
    table = result.summary()
    assert "first layer (3 input channels) kept dense" in table and "5 of 8 conv layers pruned" in table


def test_pruned_weights_satisfy_constraints_and_rest_is_identical(model, result):
    before, after = weights_of(model), weights_of(result.model)
    pruned = {"w1", "w2", "w4", "w5"}
    for name in pruned - {"w2"}:
        masks = kernel_masks(after[name])
        assert np.count_nonzero(masks) == 71
        assert set(np.unique(masks[masks != 0]).tolist()) <= set(result.pattern_set)
        assert (popcount(masks[masks != 0]) == 4).all()
        kept = after[name] != 0
        assert np.array_equal(after[name][kept], before[name][kept])
        assert np.all(after[name][~kept] == 0.0)
    w2 = after["w2"][:, :, 0, 0]  # the 1x1 conv: 16 of 64 4x1 blocks, values copied
    assert (w2.reshape(4, 4, 16) != 0).any(axis=1).sum() == 16 and np.count_nonzero(w2) == 64
    assert np.array_equal(after["w2"][after["w2"] != 0], before["w2"][after["w2"] != 0])
    for name in set(before) - pruned:
        assert before[name].tobytes() == after[name].tobytes()
    assert without_weights(model, pruned) == without_weights(result.model, pruned)
    # The caller's model is not modified.
    snapshot = model.SerializeToString()
    prune_onnx(model)
    assert model.SerializeToString() == snapshot


def test_round_trip_keeps_sparsity_exactly(result, tmp_path):
    path = tmp_path / "pruned.onnx"
    save_model_atomic(result.model, path)
    assert sorted(os.listdir(tmp_path)) == ["pruned.onnx"]
    reloaded = onnx.load(str(path))
    original = weights_of(result.model)
    for name, array in weights_of(reloaded).items():
        assert array.tobytes() == original[name].tobytes()
        if name in {"w1", "w4", "w5"}:
            assert np.array_equal(kernel_masks(array), kernel_masks(original[name]))
    # Pruning the pruned model again changes nothing (the projection is idempotent).
    again = prune_onnx(path, n_patterns=8, connectivity=3.6)
    assert set(again.pattern_set) >= set(p for rec in result.layers for p in rec.patterns)
    for name, array in weights_of(again.model).items():
        assert array.tobytes() == original[name].tobytes()


def test_pruned_model_computes_the_dense_graph_with_the_pruned_weights(model, result):
    """Pruning changes weights and nothing else: the dense graph run with the pruned weights
    substituted by name gives exactly the pruned model's output (and not the dense output)."""
    x = np.random.default_rng(0).standard_normal((1, 3, 10, 10)).astype(np.float32)
    substituted = onnx.ModelProto.FromString(model.SerializeToString())
    after = weights_of(result.model)
    for tensor in substituted.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(after[tensor.name], tensor.name))
    for node in substituted.graph.node:
        if node.op_type == "Constant":
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(after[node.output[0]], node.output[0]))
    dense, pruned = run(model, x), run(result.model, x)
    assert dense.shape == pruned.shape == (1, 8, 10, 10)
    assert np.array_equal(run(substituted, x), pruned)
    assert np.isfinite(pruned).all() and not np.allclose(dense, pruned)


def test_shared_weight_with_dense_user_stays_dense(model):
    edited = onnx.ModelProto.FromString(model.SerializeToString())
    edited.graph.node[-1].input[1] = "w5"  # the dilated conv now shares w5
    edited.graph.node[-1].input[2] = "b_shared"
    edited.graph.initializer.append(numpy_helper.from_array(np.zeros(16, np.float32), "b_shared"))
    edited.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 16
    by_name = {rec.name: rec for rec in prune_onnx(edited).layers}
    assert by_name["shared_a"].reason == "weight shared with dense layer dilated"
    assert by_name["shared_b"].action == "dense"


def test_storage_variants(model, tmp_path):
    """Typed (float_data) and external-data weights are pruned; a runtime weight stays dense."""
    edited = onnx.ModelProto.FromString(model.SerializeToString())
    w1 = next(t for t in edited.graph.initializer if t.name == "w1")
    values = numpy_helper.to_array(w1)
    w1.CopyFrom(helper.make_tensor("w1", TensorProto.FLOAT, values.shape, values.ravel().tolist()))
    assert not w1.raw_data and w1.float_data
    src = tmp_path / "external.onnx"
    onnx.save_model(edited, str(src), save_as_external_data=True, location="external.data", size_threshold=0)
    res = prune_onnx(src)
    expected = prune_onnx(model)
    for name, array in weights_of(expected.model).items():
        assert weights_of(res.model)[name].tobytes() == array.tobytes()
    save_model_atomic(res.model, tmp_path / "single.onnx")  # one self-contained file
    assert weights_of(onnx.load(str(tmp_path / "single.onnx"), load_external_data=False))["w1"].any()

    edited = onnx.ModelProto.FromString(model.SerializeToString())
    w5 = next(t for t in edited.graph.initializer if t.name == "w5")
    edited.graph.initializer.remove(w5)
    edited.graph.input.append(helper.make_tensor_value_info("w5", TensorProto.FLOAT, [16, 16, 3, 3]))
    by_name = {rec.name: rec for rec in prune_onnx(edited).layers}
    assert by_name["shared_a"].reason == "weight is not a constant tensor"


def test_weight_used_elsewhere_stays_dense(model):
    """Pruning a weight that another op (here inside an If branch) reads would change that op."""
    edited = onnx.ModelProto.FromString(model.SerializeToString())
    branch = helper.make_graph(
        [helper.make_node("Identity", ["w1"], ["w1_copy"])], "branch", [],
        [helper.make_tensor_value_info("w1_copy", TensorProto.FLOAT, [16, 16, 3, 3])],
    )
    edited.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    edited.graph.node.append(
        helper.make_node("If", ["cond"], ["w1_out"], then_branch=branch, else_branch=branch)
    )
    edited.graph.output.append(helper.make_tensor_value_info("w1_out", TensorProto.FLOAT, [16, 16, 3, 3]))
    onnx.checker.check_model(edited)
    by_name = {rec.name: rec for rec in prune_onnx(edited).layers}
    assert by_name["conv1"].reason == "weight also used by Identity in a subgraph"
    assert by_name["from_constant"].action == "pruned"


def test_overrides_and_options(model):
    res = prune_onnx(model, n_patterns=4, connectivity=None, layers={"first": True, "w5": False})
    by_name = {rec.name: rec for rec in res.layers}
    assert by_name["first"].action == "pruned" and by_name["first"].kept_kernels == 48
    assert by_name["shared_a"].reason == by_name["shared_b"].reason == "skipped by request"
    assert by_name["conv1"].kept_kernels == 256 and len(res.pattern_set) == 4
    res = prune_onnx(model, entries=3, force_centre=False, first_layer_dense=False)
    w0 = weights_of(res.model)["w0"]
    assert (popcount(kernel_masks(w0)[kernel_masks(w0) != 0]) == 3).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"connectivity": 1000.0}, "layer conv1: connectivity rate 1000.0 keeps no kernel"),
        ({"connectivity": 0.5}, "finite number >= 1"),
        ({"n_patterns": 0}, "n_patterns must be between 1 and 56"),
        ({"n_patterns": 57}, "n_patterns must be between 1 and 56"),
        ({"layers": {"nope": False}}, "no Conv layer or weight named nope"),
        ({"layers": {"depthwise": True}}, "layer depthwise cannot be pattern-pruned: depthwise"),
        ({"layers": {"pointwise": True}, "pointwise": None}, "layer pointwise cannot be pruned: 1x1 pruning off"),
    ],
)
def test_bad_options(model, kwargs, message):
    with pytest.raises(PatDNNError, match=message):
        prune_onnx(model, **kwargs)


def test_model_without_prunable_layer(model):
    with pytest.raises(PatDNNError, match="no prunable convolution.*pointwise: 1x1 pruning off"):
        prune_onnx(model, layers={n: False for n in ("conv1", "from_constant", "w5")}, pointwise=None)
    relu_only = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    ))
    with pytest.raises(PatDNNError, match="no Conv layer"):
        prune_onnx(relu_only)


def test_unreadable_files(model, tmp_path):
    good = tmp_path / "good.onnx"
    save_model_atomic(model, good)
    data = good.read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.onnx").write_bytes(b"\xff\x00not an onnx model" * 10)
    (tmp_path / "empty.onnx").write_bytes(b"")
    for name in ("truncated.onnx", "garbage.onnx", "empty.onnx"):
        with pytest.raises(PatDNNError, match="model"):
            prune_onnx(tmp_path / name)
    with pytest.raises(PatDNNError, match="does not exist"):
        prune_onnx(tmp_path / "missing.onnx")
    with pytest.raises(PatDNNError, match="does not exist or is not a file"):
        prune_onnx(tmp_path)


def test_atomic_save_leaves_nothing_on_failure(result, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()  # os.replace cannot replace a directory by a file
    with pytest.raises(PatDNNError, match="cannot write"):
        save_model_atomic(result.model, target)
    assert os.listdir(tmp_path) == ["taken"] and os.listdir(target) == []
    with pytest.raises(PatDNNError, match="does not exist"):
        save_model_atomic(result.model, tmp_path / "no" / "such.onnx")


# --- the CLI subcommand -----------------------------------------------------------------------


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="patdnn")
    add_prune_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_prune(model, tmp_path, capsys):
    src, out, png = tmp_path / "model.onnx", tmp_path / "out" / "pruned.onnx", tmp_path / "freq.png"
    save_model_atomic(model, src)
    out.parent.mkdir()
    code = cli([
        "prune", str(src), "-o", str(out), "--patterns", "6", "--connectivity", "2",
        "--skip", "shared_a", "--plot", str(png),
    ])
    assert code == 0
    text = capsys.readouterr().out
    assert "conv1" in text and "skipped by request" in text and f"wrote {out}" in text
    pruned = weights_of(onnx.load(str(out)))
    assert np.count_nonzero(kernel_masks(pruned["w1"])) == 128
    assert np.count_nonzero(pruned["w5"]) == pruned["w5"].size  # skipped (shared weight)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert cli(["prune", str(src), "-o", str(out), "--connectivity", "none", "--prune-first"]) == 0
    pruned = weights_of(onnx.load(str(out)))
    assert np.count_nonzero(kernel_masks(pruned["w1"])) == 256
    assert np.count_nonzero(kernel_masks(pruned["w0"])) == 48


def test_cli_failure_writes_nothing(model, tmp_path):
    src = tmp_path / "model.onnx"
    save_model_atomic(model, src)
    for argv, message in [
        (["--connectivity", "1000"], "keeps no kernel"),
        (["--skip", "missing"], "no Conv layer or weight named missing"),
        (["--skip", "conv1", "--force", "conv1"], "both skipped and forced"),
        (["--plot", str(tmp_path / "nodir" / "f.png")], "does not exist"),
    ]:
        with pytest.raises(PatDNNError, match=message):
            cli(["prune", str(src), "-o", str(tmp_path / "out.onnx"), *argv])
        assert os.listdir(tmp_path) == ["model.onnx"]
    with pytest.raises(SystemExit):
        cli(["prune", str(src), "-o", str(tmp_path / "out.onnx"), "--connectivity", "lots"])


def test_plot_pattern_frequencies(result, tmp_path):
    path = tmp_path / "f.png"
    plot_pattern_frequencies(result.frequencies, path, selected=result.pattern_set)
    assert path.read_bytes()[:4] == b"\x89PNG" and os.listdir(tmp_path) == ["f.png"]
    with pytest.raises(PatDNNError, match="no pattern frequencies"):
        plot_pattern_frequencies({}, tmp_path / "g.png")


# --- a model exported by torch ----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torch_exported_model(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1, bias=False), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 4, 1),
    ).eval()
    x = torch.randn(1, 3, 12, 12)
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"])
    res = prune_onnx(path, n_patterns=8, connectivity=3.6)
    assert [rec.action for rec in res.layers] == ["dense", "pruned", "pruned", "pruned"]
    assert res.layers[3].block == (4, 1) and np.count_nonzero(weights_of(res.model)[res.layers[3].weight]) == 16
    # Load the pruned weights back into torch: the ONNX model computes the same function.
    pruned = weights_of(res.model)
    with torch.no_grad():
        for rec, module in zip(res.layers, [net[0], net[2], net[4], net[6]]):
            module.weight.copy_(torch.from_numpy(pruned[rec.weight].copy()))
        expected = net(x).numpy()
    np.testing.assert_allclose(run(res.model, x.numpy()), expected, rtol=1e-4, atol=1e-5)
    assert np.count_nonzero(kernel_masks(pruned[res.layers[1].weight])) == round(128 / 3.6)


# --- hand-off to the compiler -------------------------------------------------------------------


@pytest.mark.parametrize("n_patterns", [8, 12])
def test_compiler_sees_pattern_layers(model, n_patterns):
    analysis = pytest.importorskip("tvm_patdnn.analysis")
    res = prune_onnx(model, n_patterns=n_patterns)
    weights = weights_of(res.model)
    for rec in res.layers:
        if rec.action == "pruned" and rec.block is None:
            info = analysis.analyze_conv_weight(weights[rec.weight], entries=4, max_patterns=12)
            assert info.kind == "pattern", (rec.name, info)
