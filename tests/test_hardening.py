"""Regression tests for the hardening audit: every reproduction ends in a clear error (one
``error:`` line, exit status 2) or correct behaviour, and nothing is written or clobbered.

The RPC deadlines and the concurrent database writers have their own files
(``test_rpc_deadlines.py``, ``test_tuning_database.py``).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
from model_factory import ConvSpec, build_cnn, reference_outputs
from onnx import numpy_helper
from phone_helpers import wait_until

import tvm_patdnn
from tvm_patdnn import PatDNNError
from tvm_patdnn.cli import main
from tvm_patdnn.phone.commands import _is_loopback

PATDNN = Path(sys.executable).parent / "patdnn"


@pytest.fixture
def run(capsys):
    """The ``patdnn`` command in this process (a fresh process per call would pay TVM's import)."""

    def call(*args) -> subprocess.CompletedProcess:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return call


def assert_clear_error(shown: subprocess.CompletedProcess, message: str) -> None:
    assert shown.returncode == 2, shown.stderr
    assert f"error: {message}" in shown.stderr, shown.stderr
    assert "Traceback" not in shown.stderr


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return build_cnn(np.random.default_rng(5), (1, 4, 8, 8), [ConvSpec(8, kind="dense"), ConvSpec(8, connectivity=2.0)])


@pytest.fixture(scope="module")
def model_file(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hardening") / "m.onnx"
    onnx.save(model, path)
    return path


# 1. Output paths never replace device files, FIFOs or directories, and keep sane modes.

def test_outputs_refuse_a_fifo_and_a_device_node_and_leave_them_alone(run, model_file, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    targets = [fifo]
    if os.geteuid() == 0:  # a character device like /dev/null (only root may make one)
        device = tmp_path / "null"
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        targets.append(device)
    for path in targets:
        before = os.stat(path)
        assert_clear_error(run("compile", model_file, "-o", path), f"cannot write {path}: it is not a regular file")
        assert_clear_error(run("prune", model_file, "-o", path), f"cannot write {path}: it is not a regular file")
        assert_clear_error(run("prune", model_file, "-o", tmp_path / "p.onnx", "--plot", path),
                           f"cannot write {path}: it is not a regular file")
        after = os.stat(path)
        assert (after.st_ino, after.st_mode, after.st_rdev) == (before.st_ino, before.st_mode, before.st_rdev)
    assert not (tmp_path / "p.onnx").exists()
    assert_clear_error(run("compile", model_file, "-o", tmp_path), f"cannot write {tmp_path}: it is a directory")


def test_an_output_symlink_keeps_pointing_at_its_file_and_new_files_follow_the_umask(run, model_file, tmp_path):
    real = tmp_path / "real.so"
    real.write_bytes(b"old")
    os.chmod(real, 0o640)
    link = tmp_path / "link.so"
    link.symlink_to(real)
    assert run("compile", model_file, "-o", link).returncode == 0
    assert link.is_symlink() and real.stat().st_size > 3 and stat.S_IMODE(real.stat().st_mode) == 0o640
    umask = os.umask(0o022)
    os.umask(umask)
    assert run("compile", model_file, "-o", tmp_path / "new.so").returncode == 0
    assert stat.S_IMODE((tmp_path / "new.so").stat().st_mode) == 0o666 & ~umask


# 4. Initializers also listed as graph inputs (IR version < 4 exporters).

def test_initializers_listed_as_graph_inputs_import_and_run(model):
    older = onnx.ModelProto()
    older.CopyFrom(model)
    for init in older.graph.initializer:
        older.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    compiled = tvm_patdnn.compile(older, "x86")
    assert compiled.input_names == ["input"]
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(compiled.run(input=x)[0], reference_outputs(model, {"input": x})[0], rtol=1e-4, atol=1e-4)


# 5 and 6. Tracebacks and unchecked options.

@pytest.mark.parametrize(("args", "message"), [
    (["inspect", "{m}", "--input-shape", "input=1,4,0,8"], "input_shapes gives 'input' the shape (1, 4, 0, 8)"),
    (["inspect", "{m}", "--input-shape", "input=-1,4,8,8"], "every dimension must be a positive integer"),
    (["inspect", "{m}", "--entries", "0"], "entries (the nonzeros a pattern kernel may keep) must be 1..9, got 0"),
    (["inspect", "{m}", "--entries", "-2"], "must be 1..9, got -2"),
    (["compile", "{m}", "-o", "{t}/m.so", "--entries", "10"], "must be 1..9, got 10"),
    (["inspect", "{m}", "--max-patterns", "0"], "max_patterns (patterns per layer) must be a positive integer"),
    (["tune", "{m}", "--db", "{t}/db", "--timeout", "0"], "timeout must be a positive number of seconds, got 0.0"),
    (["tune", "{m}", "--db", "{t}/db", "--trials-per-iter", "0"], "trials_per_iter must be a positive integer"),
    (["deploy", "{m}", "--tracker", "127.0.0.1:9", "--repeat", "0"], "repeat must be a positive integer, got 0"),
    (["deploy", "{m}", "--tracker", "127.0.0.1:9", "--rtol", "-1"], "rtol must be a non-negative number"),
    (["deploy", "{m}", "--tracker", "127.0.0.1:99999"], "tracker address must be HOST:PORT with a port in 1..65535"),
    (["compile", "{m}", "-o", "{t}/m.so", "--target", '{{"kind":"llvm","mcpu":"pentium-x"}}'],
     "LLVM knows no CPU 'pentium-x'"),
])
def test_bad_options_are_one_error_line(run, args, message, model_file, tmp_path):
    shown = run(*[a.format(m=model_file, t=tmp_path) for a in args])
    assert_clear_error(shown, "")
    assert message in shown.stderr
    assert "is not a recognized processor" not in shown.stderr  # no flood of LLVM lines
    assert not (tmp_path / "m.so").exists() and not (tmp_path / "db").exists()


def test_run_takes_arrays_and_tvm_tensors_and_names_anything_else(model):
    compiled = tvm_patdnn.compile(model, "x86")
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(compiled.run(input=tvm.runtime.tensor(x))[0], compiled.run(input=x)[0])
    with pytest.raises(PatDNNError, match="input 'input' must be a numpy array, not str"):
        compiled.run(input="not an image")
    with pytest.raises(PatDNNError, match="input 'input' cannot be read as a float32 array"):
        compiled.run(input=[["a", "b"]])


# 7. A failed --plot writes nothing.

def test_a_plot_that_cannot_be_written_leaves_no_pruned_model(run, model_file, tmp_path):
    output = tmp_path / "pruned.onnx"
    shown = run("prune", model_file, "-o", output, "--plot", tmp_path)  # a directory
    assert_clear_error(shown, f"cannot write {tmp_path}")
    assert not output.exists()
    shown = run("prune", model_file, "-o", output, "--plot", tmp_path / "absent" / "p.png")
    assert_clear_error(shown, f"cannot write {tmp_path / 'absent' / 'p.png'}: directory {tmp_path / 'absent'} does not exist")
    assert not output.exists()


# 8. SIGTERM cleans up like Ctrl-C.

def test_sigterm_removes_the_tune_scratch_directory(model_file, tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.Popen([str(PATDNN), "tune", str(model_file), "--db", str(tmp_path / "db"), "--trials", "500"],
                            env={**os.environ, "TMPDIR": str(scratch)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: any(scratch.glob("patdnn-tune-*")) or proc.poll() is not None, 240, "the tune's scratch")
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not any(scratch.glob("patdnn-tune-*"))


# 9. Non-finite weights.

def test_a_nan_weight_is_refused_by_compile_and_prune(run, model, tmp_path):
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    weight = numpy_helper.to_array(broken.graph.initializer[0]).copy()
    weight.flat[0] = np.nan
    broken.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight, broken.graph.initializer[0].name))
    name = broken.graph.initializer[0].name
    with pytest.raises(PatDNNError, match=f"weight '{name}' has 1 non-finite value"):
        tvm_patdnn.compile(broken, "x86")
    path = tmp_path / "nan.onnx"
    onnx.save(broken, path)
    assert_clear_error(run("prune", path, "-o", tmp_path / "p.onnx"), f"{path}: weight '{name}' has 1 non-finite value")
    assert not (tmp_path / "p.onnx").exists()


# 10. Non-loopback emulator binds are announced.

@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                                ("localhost", True), ("0.0.0.0", False), ("192.168.1.5", False),
                                                ("::", False), ("phone-farm.example", False)])
def test_only_loopback_binds_are_quiet(host, loopback):
    assert _is_loopback(host) is loopback
