"""The `patdnn` console script, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import tvm
from model_factory import ConvSpec, build_cnn, reference_outputs
from tvm import relax

PATDNN = Path(sys.executable).parent / "patdnn"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PATDNN), *args], capture_output=True, text=True, timeout=300)


def test_inspect_compile_and_load(tmp_path):
    model = build_cnn(np.random.default_rng(4), (1, 3, 12, 12), [ConvSpec(8, kind="dense"), ConvSpec(16, connectivity=3.6)], head=True)
    path = tmp_path / "pruned.onnx"
    onnx.save(model, path)

    shown = run("inspect", str(path), "--plot", str(tmp_path / "patterns.png"))
    assert shown.returncode == 0, shown.stderr
    assert "conv1" in shown.stdout and "pattern +bias+relu" in shown.stdout
    assert "dense: kernels have up to 9 nonzeros" in shown.stdout
    assert (tmp_path / "patterns.png").read_bytes()[:4] == b"\x89PNG"

    as_json = run("inspect", str(path), "--json")
    records = json.loads(as_json.stdout)
    assert [r["kind"] for r in records] == ["dense", "pattern"]

    built = run("compile", str(path), "--target", "x86", "-o", str(tmp_path / "model.so"))
    assert built.returncode == 0, built.stderr
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "model.so")), tvm.cpu())
    x = np.random.default_rng(0).standard_normal((1, 3, 12, 12)).astype(np.float32)
    expected = reference_outputs(model, {"input": x})[0]
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_error_exit_status(tmp_path):
    result = run("inspect", str(tmp_path / "nothing.onnx"))
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "Traceback" not in result.stderr
