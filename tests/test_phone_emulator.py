"""The emulated aarch64 phone, end to end with real processes on 127.0.0.1.

A real RPC tracker and ``phone-emulator`` run as separate process groups (fixtures in
conftest.py, helpers in phone_helpers.py); a Relax model is
cross-compiled for aarch64, uploaded through ``request(key)``, run by the Relax VM under
qemu and checked against numpy.  Needs Debian qemu-user + g++-aarch64-linux-gnu and the
cached aarch64 runtime (``python -m tvm_patdnn.phone.runtime``, run by setup/CI).
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import tvm
from phone_helpers import (
    HOST,
    alive,
    free_devices,
    listening_addresses,
    missing_tools,
    wait_until,
)
from tvm import relax, rpc
from tvm.support import cc

from tvm_patdnn.errors import PatDNNError
from tvm_patdnn.phone import runtime

if missing_tools() is not None:
    pytest.skip(missing_tools(), allow_module_level=True)

TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
EM_AARCH64 = 183
PHONE_KEY = "android"  # the module's emulator (conftest)
pytestmark = pytest.mark.usefixtures("phone_runtime")


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


def test_tracker_request_runs_relax_model(tracker_port: int, emulator, phone_model) -> None:
    path, x_np, reference = phone_model
    remote = rpc.connect_tracker(HOST, tracker_port).request(emulator.key, session_timeout=60)
    out, mean = _run_on_phone(remote, path, x_np)
    del remote
    gc.collect()
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4)
    assert mean > 0
    # The session ended, so the device is offered again.
    wait_until(lambda: free_devices(tracker_port, emulator.key) == 1, 20, "the device to return")


def test_meta_schedule_rpc_runner(tracker_port: int, emulator, tmp_path: Path) -> None:
    from tvm import te
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.runner import (
        EvaluatorConfig,
        RPCConfig,
        RPCRunner,
        RunnerInput,
    )

    a = te.placeholder((32, 32), name="A")
    b = te.placeholder((32, 32), name="B")
    k = te.reduce_axis((0, 32), "k")
    c = te.compute((32, 32), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    func = te.create_prim_func([a, b, c])
    artifact = tmp_path / "matmul.so"
    tvm.tirx.build(func, target=tvm.target.Target(TARGET)).export_library(
        str(artifact), fcompile=cc.cross_compiler(runtime.CROSS_CXX))
    runner = RPCRunner(
        RPCConfig(tracker_host=HOST, tracker_port=tracker_port, tracker_key=emulator.key,
                  session_timeout_sec=60),
        EvaluatorConfig(number=2, repeat=1, min_repeat_ms=0),
        max_workers=1,
    )
    (future,) = runner.run([RunnerInput(str(artifact), "cpu", ArgInfo.from_prim_func(func))])
    result = future.result()
    assert result.error_msg is None, result.error_msg
    assert len(result.run_secs) == 1 and float(result.run_secs[0]) > 0


def test_session_timeout_then_device_is_back(tracker_port: int, emulator) -> None:
    remote = rpc.connect_tracker(HOST, tracker_port).request(emulator.key, session_timeout=2)
    workpath = remote.get_function("tvm.rpc.server.workpath")
    time.sleep(3.5)
    with pytest.raises(Exception, match="RPCSessionTimeoutError"):
        workpath("x")
    del workpath, remote
    gc.collect()
    remote = rpc.connect_tracker(HOST, tracker_port).request(emulator.key, session_timeout=30)
    assert remote.get_function("tvm.rpc.server.workpath")("x").endswith("/x")
    del remote
    gc.collect()


def test_sigterm_kills_live_session(tracker_port: int, start_phone) -> None:
    phone = start_phone("android-sigterm")
    remote = rpc.connect_tracker(HOST, tracker_port).request(phone.key)
    dev = remote.cpu()
    servers = phone.sessions()
    assert servers, [p.name() for p in phone.processes()]
    assert phone.stop() == 0  # within stop_group's bounded wait
    assert not any(alive(p) for p in servers)
    del dev, remote
    gc.collect()
    wait_until(lambda: free_devices(tracker_port, phone.key) == 0, 10, "the tracker to drop it")


def test_sigkill_of_the_emulator_takes_its_session_down(tracker_port: int, start_phone) -> None:
    """A crashed emulator (SIGKILL: no handler runs) leaves no qemu session serving on."""
    phone = start_phone("android-sigkill")
    remote = rpc.connect_tracker(HOST, tracker_port).request(phone.key)
    servers = phone.sessions()
    assert servers, [p.name() for p in phone.processes()]
    os.killpg(phone.proc.pid, signal.SIGKILL)  # the emulator's group only: each session has a group of its own
    phone.proc.wait()
    wait_until(lambda: not any(alive(p) for p in servers), 10, "the session to die with the emulator")
    with pytest.raises((RuntimeError, OSError)):  # its socket is closed (TVM errors are RuntimeErrors)
        remote.get_function("tvm.rpc.server.workpath")("x")
    del remote
    gc.collect()
    wait_until(lambda: free_devices(tracker_port, phone.key) == 0, 10, "the tracker to drop it")


def test_kill_switches_the_phone_off(tracker_port: int, start_phone) -> None:
    phone = start_phone("android-kill")
    remote = rpc.connect_tracker(HOST, tracker_port).request(phone.key)
    assert phone.sessions()
    killed = phone.kill()
    assert len(killed) >= 2 and not any(alive(p) for p in killed)  # the emulator and its qemu session
    del remote
    gc.collect()
    wait_until(lambda: free_devices(tracker_port, phone.key) == 0, 10, "the tracker to drop it")


def test_tracker_and_emulator_listen_on_localhost_only(tracker_port: int, start_phone) -> None:
    """Nothing here is reachable from the network unless told otherwise: the emulator started
    without --host listens on 127.0.0.1 only and registers that address; so does the tracker
    the tests (and the README's command) start."""
    phone = start_phone("android-bind", host=None)
    assert listening_addresses(phone.proc.pid) == {"127.0.0.1"}
    servers = rpc.connect_tracker(HOST, tracker_port).summary()["server_info"]
    (mine,) = [s for s in servers if s["key"] == f"server:{phone.key}"]
    assert mine["addr"] == ["127.0.0.1", phone.port]
    (tracker,) = [c for c in psutil.net_connections(kind="inet")
                  if c.status == psutil.CONN_LISTEN and c.laddr.port == tracker_port]
    assert tracker.laddr.ip == "127.0.0.1"


def test_missing_tools_name_debian_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime.shutil, "which", lambda name: None)
    with pytest.raises(PatDNNError, match="qemu-user") as err:
        runtime.check_tools()
    assert "g++-aarch64-linux-gnu" in str(err.value)


def test_package_imports_without_qemu(tmp_path: Path) -> None:
    env = dict(os.environ, PATH=str(tmp_path))
    code = "import tvm_patdnn.phone.commands, tvm_patdnn.phone.emulator, tvm_patdnn.phone.runtime"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
