"""What the `patdnn` command prints: help with every preset and default, --version, readable JSON,
a quiet end when the reader of its output goes away, and a tune that says how to apply it."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import pytest
from model_factory import ConvSpec, build_cnn

from tvm_patdnn.cli import build_parser, main
from tvm_patdnn.targets import TARGET_NAMES
from tvm_patdnn.tuning.commands import apply_command

PATDNN = Path(sys.executable).parent / "patdnn"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = build_cnn(np.random.default_rng(4), (1, 3, 12, 12), [ConvSpec(8, kind="dense"), ConvSpec(16, connectivity=3.6)])
    path = tmp_path_factory.mktemp("model") / "pruned.onnx"
    onnx.save(model, path)
    return path


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_help_shows_every_default_and_target_preset(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_status:
        main([command, "--help"])
    assert exit_status.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # help wraps lines
    for action in _subcommands()[command]._actions:
        if action.option_strings and action.nargs != 0 and action.default not in (None, [], argparse.SUPPRESS):
            assert f"default: {action.default}" in text or f"default {action.default}" in text, action.dest
        if "--target" in action.option_strings and command != "opencl-check":
            assert all(name in text for name in TARGET_NAMES), text


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == (
        f"patdnn {metadata.version('tvm-patdnn')} (apache-tvm {metadata.version('apache-tvm')})")


def test_json_draws_patterns_as_3x3_masks(model_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(model_file), "--json"]) == 0
    pattern_layer = json.loads(capsys.readouterr().out)[1]
    assert pattern_layer["kind"] == "pattern" and pattern_layer["patterns"]
    for mask in pattern_layer["patterns"]:
        assert len(mask) == 3 and all(len(row) == 3 and set(row) <= {"x", "."} for row in mask)
        assert 1 <= "".join(mask).count("x") <= 4
    assert len(pattern_layer["pattern_counts"]) == len(pattern_layer["patterns"])


def test_closed_output_pipe_ends_quietly(model_file: Path) -> None:
    # `patdnn inspect --json | head -0`: the reader is gone before anything is written
    process = subprocess.Popen([str(PATDNN), "inspect", str(model_file), "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=300) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_tune_prints_the_complete_compile_command() -> None:
    args = argparse.Namespace(model="pruned.onnx", target='{"kind":"llvm","mcpu":"znver3"}',
                              input_shape=[("input", (1, 1, 28, 28))], entries=4, max_patterns=12, db="tuning db")
    assert apply_command(args) == ("patdnn compile pruned.onnx --target '{\"kind\":\"llvm\",\"mcpu\":\"znver3\"}' "
                                   "--input-shape input=1,1,28,28 --tuning-db 'tuning db' -o model.so")
    args.entries = 3
    assert "--entries 3 --max-patterns 12" in apply_command(args)


def test_opencl_check_is_a_subcommand_and_a_module(model_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["opencl-check", str(model_file), "--target", "x86"]) == 2
    assert "needs an OpenCL target" in capsys.readouterr().err
    shown = subprocess.run([sys.executable, "-m", "tvm_patdnn.phone.opencl_check", "--help"], capture_output=True,
                           text=True, timeout=300)
    assert shown.returncode == 0 and "usage: patdnn opencl-check" in shown.stdout


def test_setup_script_is_valid_bash_and_announces_its_steps() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "setup.sh")], check=True)
    script = (ROOT / "setup.sh").read_text()
    assert script.count("\nstep ") + script.count("  step ") >= 5
    assert not [line for line in script.splitlines() if "pip install" in line and " -q" in line]
