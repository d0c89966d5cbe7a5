"""Bad input gets one clear PatDNNError (or `error:` + exit 2 from the CLI), and nothing written."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from model_factory import ConvSpec, build_cnn
from onnx import TensorProto, helper

import tvm_patdnn
from tvm_patdnn import PatDNNError
from tvm_patdnn.cli import main


@pytest.fixture
def model():
    return build_cnn(np.random.default_rng(0), (1, 3, 8, 8), [ConvSpec(8, kind="dense"), ConvSpec(8)])


def test_missing_file(tmp_path):
    with pytest.raises(PatDNNError, match="does not exist"):
        tvm_patdnn.compile(tmp_path / "absent.onnx")


def test_corrupt_file(tmp_path, model):
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(model.SerializeToString()[:200])
    with pytest.raises(PatDNNError, match="corrupt.onnx"):
        tvm_patdnn.compile(path)
    path.write_bytes(b"this is not a protobuf at all" * 10)
    with pytest.raises(PatDNNError):
        tvm_patdnn.inspect(path)


@pytest.mark.parametrize("opset", [3, 99])
def test_unsupported_opset(model, opset):
    model.opset_import[0].version = opset
    with pytest.raises(PatDNNError, match=f"opset {opset}"):
        tvm_patdnn.compile(model)


def test_unsupported_op():
    node = helper.make_node("TfIdfVectorizer", ["x"], ["y"], mode="TF", min_gram_length=1, max_gram_length=1,
                            max_skip_count=0, ngram_counts=[0], ngram_indexes=[0], pool_int64s=[1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.INT64, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])])
    with pytest.raises(PatDNNError, match="unsupported ONNX operator.*TfIdfVectorizer"):
        tvm_patdnn.compile(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_dynamic_input_shape(model, caplog):
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].ClearField("dim_value")
    dims[0].dim_param = "batch"
    with caplog.at_level("WARNING", logger="tvm_patdnn"):
        assert tvm_patdnn.inspect(model) and tvm_patdnn.compile(model).input_shapes["input"] == (1, 3, 8, 8)
    assert ("note: input 'input' has a dynamic batch dimension (batch): compiling for batch 1 "
            "(--input-shape input=N,3,8,8 or input_shapes= sets another)") in caplog.messages
    dims[2].ClearField("dim_value")
    dims[2].dim_param = "height"
    with pytest.raises(PatDNNError, match=r"dynamic shape \(batchx3xheightx8\)"):
        tvm_patdnn.compile(model)
    compiled = tvm_patdnn.compile(model, input_shapes={"input": (2, 3, 8, 8)})
    assert compiled.input_shapes["input"] == (2, 3, 8, 8)
    with pytest.raises(PatDNNError, match="unknown inputs"):
        tvm_patdnn.compile(model, input_shapes={"image": (1, 3, 8, 8)})


@pytest.mark.parametrize(
    "target, message",
    [("cuda-ish", "unknown target"), ("{not json", "not valid JSON"), ('{"kind":"nonsense"}', "TVM does not accept"),
     ({"kind": "c"}, "not supported")],
)
def test_bad_target(model, target, message):
    with pytest.raises(PatDNNError, match=message):
        tvm_patdnn.compile(model, target)


def test_target_json_accepted(model):
    compiled = tvm_patdnn.compile(model, '{"kind": "llvm", "mcpu": "x86-64", "num-cores": 1}')
    assert compiled.target.kind.name == "llvm"


def test_cli_errors_write_nothing(tmp_path, model, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    out = tmp_path / "model.so"
    assert main(["compile", str(bad), "-o", str(out)]) == 2
    assert "error:" in capsys.readouterr().err
    good = tmp_path / "good.onnx"
    onnx.save(model, good)
    assert main(["compile", str(good), "--target", "nope", "-o", str(out)]) == 2
    assert main(["compile", str(good), "-o", str(tmp_path / "missing_dir" / "m.so")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "good.onnx"]
