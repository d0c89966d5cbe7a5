"""benchmarks/dense.py --in-graph on any model: our conv calls paired with ORT's conv nodes (one each,
or an inverted-residual block's 2-3), their MFLOP and the per-layer goal's marks, on a tiny model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.dense import GOAL_CHANNELS, compile_variant, in_goal, in_graph_profile, in_graph_table, onnx_convs
from tvm_patdnn.targets import resolve_target

ROOT = Path(__file__).resolve().parents[1]


def _two_convs():
    """3x3 8 -> 64 at 8x8 + ReLU, then 1x1 64 -> 64 stride 2 + ReLU (batch 1)."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((64, 8, 3, 3)) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((64, 64, 1, 1)) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4), helper.make_node("Relu", ["c1"], ["r1"]),
         helper.make_node("Conv", ["r1", "w2"], ["c2"], strides=[2, 2]), helper.make_node("Relu", ["c2"], ["y"])],
        "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 4, 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_onnx_convs_geometry():
    convs = onnx_convs(_two_convs())
    assert [(c["in_c"], c["out_c"], c["kernel"], c["groups"], c["stride"], c["out"]) for c in convs] == [
        (8, 64, (3, 3), 1, 1, (1, 64, 8, 8)), (64, 64, (1, 1), 1, 2, (1, 64, 4, 4))]
    assert convs[0]["mflop"] == pytest.approx(2 * 64 * 64 * 8 * 9 / 1e6)
    assert [in_goal(c) for c in convs] == [False, True]  # 8 input channels < GOAL_CHANNELS
    assert not in_goal({**convs[1], "groups": 64})  # depthwise: not in the goal
    assert GOAL_CHANNELS == 64


def test_in_graph_pairs_every_conv():
    model = _two_convs()
    rows = in_graph_profile(model, compile_variant(model, "tvm_patdnn", resolve_target("x86")), runs=2)
    paired = [row for row in rows if "convs" in row]
    assert [row["convs"] for row in paired] == ["3x3 8->64 8x8", "1x1 64->64 4x4 s2"]
    assert all(row["ORT"] > 0 and row["tvm_patdnn"] > 0 for row in paired)
    assert [row["goal"] for row in paired] == [False, True]
    table = in_graph_table(rows, peak=1e-3)  # every layer far over 70% of a tiny peak: none marked
    assert "3x3 8->64 8x8" in table and " *" not in table
    assert " *" in in_graph_table(rows, peak=1e9)  # the goal layer under 70% of a huge peak is marked
    assert "all (sum of minima)" in table


def test_model_needs_in_graph():
    run = subprocess.run([sys.executable, "-m", "benchmarks.dense", "--model", "vgg16_cifar"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 2 and "--model goes with --in-graph" in run.stderr
