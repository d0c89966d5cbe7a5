"""The emulated aarch64 phone, end to end with real processes on 127.0.0.1.

A real RPC tracker and ``phone-emulator`` run as separate process groups; a Relax model is
cross-compiled for aarch64, uploaded through ``request(key)``, run by the Relax VM under
qemu and checked against numpy.  Needs Debian qemu-user + g++-aarch64-linux-gnu and the
cached aarch64 runtime (``python -m tvm_patdnn.phone.runtime``, run by setup/CI).
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

import tvm
from tvm import relax, rpc
from tvm.support import cc
from tvm_patdnn.errors import PatDNNError
from tvm_patdnn.phone import runtime

if shutil.which(runtime.QEMU) is None or shutil.which(runtime.CROSS_CXX) is None:
    pytest.skip(
        "emulated phone needs qemu-aarch64 and aarch64-linux-gnu-g++ "
        "(apt-get install qemu-user g++-aarch64-linux-gnu)",
        allow_module_level=True,
    )

TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
EM_AARCH64 = 183
HOST = "127.0.0.1"
# The subcommand exactly as the project CLI wires it: parser -> add_phone_emulator_command.
EMULATOR_MAIN = """
import argparse, sys
from tvm_patdnn.phone.commands import add_phone_emulator_command
parser = argparse.ArgumentParser()
add_phone_emulator_command(parser.add_subparsers())
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def _accepts(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1).close()
        return True
    except OSError:
        return False


def _stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
    """Signal the process group and wait; SIGKILL the group if it does not go."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def _free_devices(tracker_port: int, key: str) -> int:
    queue = rpc.connect_tracker(HOST, tracker_port).summary()["queue_info"]
    return queue.get(key, {}).get("free", 0)


@pytest.fixture(scope="module", autouse=True)
def _runtime_cached() -> None:
    if not runtime.runtime_is_cached():
        pytest.fail(
            f"aarch64 TVM runtime not cached in {runtime.cache_dir()}: setup/CI must run "
            "`python -m tvm_patdnn.phone.runtime` first (tests never download)"
        )


@pytest.fixture(scope="module")
def tracker_port() -> Iterator[int]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", HOST, "--port", str(port),
         "--port-end", str(port + 1), "--silent"],
        start_new_session=True, stdout=subprocess.DEVNULL,
    )
    try:
        _wait_until(lambda: _accepts(port) or proc.poll() is not None, 60, "the tracker")
        assert proc.poll() is None, "rpc_tracker exited at start"
        yield port
    finally:
        _stop_group(proc)


def _start_emulator(tracker_port: int, key: str, log: Path) -> subprocess.Popen:
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", EMULATOR_MAIN, "phone-emulator", "--tracker",
             f"{HOST}:{tracker_port}", "--key", key, "--host", HOST, "--port", str(_free_port())],
            start_new_session=True, stdout=subprocess.PIPE, stderr=err, text=True,
        )
    line = proc.stdout.readline()
    if "listening on" not in line:
        _stop_group(proc)
        pytest.fail(f"phone-emulator did not start: {line!r}\n{log.read_text()}")
    _wait_until(lambda: _free_devices(tracker_port, key) >= 1, 30, f"key {key} at the tracker")
    return proc


@pytest.fixture(scope="module")
def emulator(tracker_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    key = "android"
    proc = _start_emulator(tracker_port, key, tmp_path_factory.mktemp("phone") / "emulator.log")
    try:
        yield key
    finally:
        assert _stop_group(proc) == 0


@pytest.fixture(scope="module")
def phone_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """conv2d(3->8, 3x3, pad 1) + bias + relu, cross-compiled for aarch64; with numpy reference."""
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((1, 3, 16, 16), dtype=np.float32)
    w_np = rng.standard_normal((8, 3, 3, 3), dtype=np.float32)
    b_np = rng.standard_normal((1, 8, 1, 1), dtype=np.float32)

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_np.shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w_np), padding=1))
            y = bb.emit(relax.op.add(y, relax.const(b_np)))
            out = bb.emit_output(relax.op.nn.relu(y))
        bb.emit_func_output(out)
    executable = tvm.compile(bb.get(), target=tvm.target.Target(TARGET))
    path = tmp_path_factory.mktemp("model") / "conv_relu.so"
    executable.export_library(str(path), fcompile=cc.cross_compiler(runtime.CROSS_CXX))

    windows = np.lib.stride_tricks.sliding_window_view(
        np.pad(x_np, ((0, 0), (0, 0), (1, 1), (1, 1))), (3, 3), axis=(2, 3))
    reference = np.maximum(np.einsum("nchwij,ocij->nohw", windows, w_np) + b_np, 0)
    return path, x_np, reference


def _run_on_phone(remote: rpc.RPCSession, model: Path, x_np: np.ndarray) -> tuple[np.ndarray, float]:
    """Upload, run with the Relax VM and time; every remote object dies with this frame."""
    remote.upload(str(model))
    dev = remote.cpu()
    vm = relax.VirtualMachine(remote.load_module(model.name), dev)
    x = tvm.runtime.tensor(x_np, dev)
    out = vm["main"](x).numpy()
    mean = vm.time_evaluator("main", dev, number=3, repeat=1)(x).mean
    return out, mean


def test_exported_model_is_aarch64(phone_model) -> None:
    path, _, _ = phone_model
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    assert int.from_bytes(header[18:20], "little") == EM_AARCH64


def test_popen_session_runs_relax_model(phone_model) -> None:
    from tvm_patdnn.phone.emulator import popen_session

    path, x_np, reference = phone_model
    out, mean = _run_on_phone(popen_session(), path, x_np)
    gc.collect()
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4)
    assert mean > 0


def test_tracker_request_runs_relax_model(tracker_port: int, emulator: str, phone_model) -> None:
    path, x_np, reference = phone_model
    remote = rpc.connect_tracker(HOST, tracker_port).request(emulator, session_timeout=60)
    out, mean = _run_on_phone(remote, path, x_np)
    del remote
    gc.collect()
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4)
    assert mean > 0
    # The session ended, so the device is offered again.
    _wait_until(lambda: _free_devices(tracker_port, emulator) == 1, 20, "the device to return")


def test_meta_schedule_rpc_runner(tracker_port: int, emulator: str, tmp_path: Path) -> None:
    from tvm import te
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RPCConfig, RPCRunner, RunnerInput

    a = te.placeholder((32, 32), name="A")
    b = te.placeholder((32, 32), name="B")
    k = te.reduce_axis((0, 32), "k")
    c = te.compute((32, 32), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    func = te.create_prim_func([a, b, c])
    artifact = tmp_path / "matmul.so"
    tvm.tirx.build(func, target=tvm.target.Target(TARGET)).export_library(
        str(artifact), fcompile=cc.cross_compiler(runtime.CROSS_CXX))
    runner = RPCRunner(
        RPCConfig(tracker_host=HOST, tracker_port=tracker_port, tracker_key=emulator,
                  session_timeout_sec=60),
        EvaluatorConfig(number=2, repeat=1, min_repeat_ms=0),
        max_workers=1,
    )
    (future,) = runner.run([RunnerInput(str(artifact), "cpu", ArgInfo.from_prim_func(func))])
    result = future.result()
    assert result.error_msg is None, result.error_msg
    assert len(result.run_secs) == 1 and float(result.run_secs[0]) > 0


def test_session_timeout_then_device_is_back(tracker_port: int, emulator: str) -> None:
    remote = rpc.connect_tracker(HOST, tracker_port).request(emulator, session_timeout=2)
    workpath = remote.get_function("tvm.rpc.server.workpath")
    time.sleep(3.5)
    with pytest.raises(Exception, match="RPCSessionTimeoutError"):
        workpath("x")
    del workpath, remote
    gc.collect()
    remote = rpc.connect_tracker(HOST, tracker_port).request(emulator, session_timeout=30)
    assert remote.get_function("tvm.rpc.server.workpath")("x").endswith("/x")
    del remote
    gc.collect()


def test_sigterm_kills_live_session(tracker_port: int, tmp_path: Path) -> None:
    key = "android-sigterm"
    proc = _start_emulator(tracker_port, key, tmp_path / "emulator.log")
    try:
        remote = rpc.connect_tracker(HOST, tracker_port).request(key)
        dev = remote.cpu()
        servers = psutil.Process(proc.pid).children(recursive=True)
        assert any("qemu" in p.name() for p in servers), [p.name() for p in servers]
        started = time.monotonic()
        assert _stop_group(proc) == 0
        assert time.monotonic() - started < 10
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in servers)
        del dev, remote
        gc.collect()
        _wait_until(lambda: _free_devices(tracker_port, key) == 0, 10, "the tracker to drop it")
    finally:
        _stop_group(proc, signal.SIGKILL)


def test_missing_tools_name_debian_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime.shutil, "which", lambda name: None)
    with pytest.raises(PatDNNError, match="qemu-user") as err:
        runtime.check_tools()
    assert "g++-aarch64-linux-gnu" in str(err.value)


def test_package_imports_without_qemu(tmp_path: Path) -> None:
    env = dict(os.environ, PATH=str(tmp_path))
    code = "import tvm_patdnn.phone.commands, tvm_patdnn.phone.emulator, tvm_patdnn.phone.runtime"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
