"""Phone targets, cross export and ``patdnn deploy`` on the emulated phone through a real tracker.

The tracker and ``phone-emulator`` are real processes on 127.0.0.1 (the shared fixtures in
conftest.py); libraries are linked by the real aarch64 cross compiler and run by TVM's
aarch64 runtime under qemu.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from model_factory import ConvSpec, build_cnn, reference_outputs
from phone_helpers import HOST, free_devices, free_port, missing_tools, wait_until

import tvm_patdnn
from tvm_patdnn import PatDNNError
from tvm_patdnn.cli import main
from tvm_patdnn.export import (
    DEBIAN_CROSS_CXX,
    NDK_ENV,
    check_library_machine,
    elf_machine,
)
from tvm_patdnn.targets import PRESETS, resolve_target

EM_AARCH64, EM_X86_64 = 183, 62
if missing_tools() is not None:
    pytest.skip(missing_tools(), allow_module_level=True)

PHONE_KEY = KEY = "android-deploy"  # the module's emulator (conftest)


def _pattern_cnn(seed: int) -> onnx.ModelProto:
    """Two pattern convs (one strided), a dense conv and a pool+gemm head."""
    convs = [ConvSpec(8), ConvSpec(8, stride=2), ConvSpec(8, kind="dense")]
    return build_cnn(np.random.default_rng(seed), (1, 4, 12, 12), convs, head=True)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "pattern_cnn.onnx"
    onnx.save(_pattern_cnn(0), path)
    return path


@pytest.fixture(scope="module")
def arm_cpu_model(model_file: Path) -> tvm_patdnn.CompiledModel:
    """The model compiled once for the phone: the export tests link it in their own ways."""
    return tvm_patdnn.compile(model_file, "arm_cpu")


@pytest.fixture(scope="module")
def host_library(model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model compiled for this machine (x86-64), the library a phone cannot load."""
    return tvm_patdnn.compile(model_file, "x86").export_library(tmp_path_factory.mktemp("host") / "host.so")


@pytest.mark.parametrize("name", ["arm_cpu", "galaxy-s10", "arm_cpu-linux", "adreno"])
def test_presets_resolve(name: str) -> None:
    target = resolve_target(name)
    cpu = target if target.kind.name == "llvm" else target.host
    assert cpu.kind.name == "llvm" and str(cpu.attrs["mtriple"]).startswith("aarch64")
    assert "arm_cpu" in cpu.keys
    # The same JSON given explicitly is accepted as well.
    assert resolve_target(json.dumps(PRESETS[name])).kind.name == target.kind.name


def test_galaxy_s10_is_cortex_a76_with_dotprod() -> None:
    target = resolve_target("galaxy-s10")
    assert target.attrs["mcpu"] == "cortex-a76"
    assert bool(target.attrs["feature.has_dotprod"]) and bool(target.attrs["feature.has_asimd"])
    assert str(target.attrs["mtriple"]) == "aarch64-linux-android"


def test_adreno_is_opencl_with_aarch64_host() -> None:
    target = resolve_target("adreno")
    assert target.kind.name == "opencl" and target.attrs["device"] == "adreno"
    assert str(target.host.attrs["mtriple"]) == "aarch64-linux-android"


def test_export_is_aarch64_elf_and_run_points_to_deploy(arm_cpu_model, tmp_path: Path) -> None:
    path = arm_cpu_model.export_library(tmp_path / "model.so")
    assert elf_machine(path) == EM_AARCH64
    with pytest.raises(PatDNNError, match="patdnn deploy"):
        arm_cpu_model.run(input=np.zeros((1, 4, 12, 12), np.float32))


def test_ndk_compiler_from_environment(arm_cpu_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Any standalone aarch64 compiler driver works as TVM_NDK_CC; the Debian one stands in for the NDK's.
    monkeypatch.setenv(NDK_ENV, shutil.which(DEBIAN_CROSS_CXX))
    path = arm_cpu_model.export_library(tmp_path / "ndk.so")
    assert elf_machine(path) == EM_AARCH64
    monkeypatch.setenv(NDK_ENV, str(tmp_path / "no-such-clang++"))
    with pytest.raises(PatDNNError, match="TVM_NDK_CC"):
        arm_cpu_model.export_library(tmp_path / "bad.so")
    assert not (tmp_path / "bad.so").exists()


def test_missing_cross_compiler_is_named(arm_cpu_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(NDK_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PatDNNError, match="g\\+\\+-aarch64-linux-gnu"):
        arm_cpu_model.export_library(tmp_path / "model.so")


def test_wrong_elf_machine_is_rejected(host_library: Path) -> None:
    assert elf_machine(host_library) == EM_X86_64
    with pytest.raises(PatDNNError, match="x86-64 ELF but target .* needs AArch64"):
        check_library_machine(host_library, resolve_target("arm_cpu"))


@pytest.mark.timeout(300)  # a hang fails the test; no wall-clock assert (the box is shared)
def test_deploy_cli_matches_reference(emulator, model_file: Path, capsys: pytest.CaptureFixture) -> None:
    status = main(["deploy", str(model_file), "--target", "arm_cpu", "--tracker", emulator.tracker, "--key", KEY,
                   "--number", "2", "--repeat", "2"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "outputs match the ONNX reference" in out
    assert "remote latency on 'android-deploy'" in out and " ms mean" in out
    assert "not phone timings" in out


def test_deploy_runs_the_threads_it_is_given(emulator, model_file: Path, capsys: pytest.CaptureFixture) -> None:
    # the device's runtime is set to the count and the library compiled for it (records of that count apply)
    status = main(["deploy", str(model_file), "--target", "arm_cpu-linux", "--tracker", emulator.tracker, "--key", KEY,
                   "--threads", "1", "--number", "1", "--repeat", "1"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "remote latency on 'android-deploy' (1 thread)" in out
    # more threads than the device's runtime started with cannot be set from here: named, device freed
    with pytest.raises(PatDNNError, match="runs at most .* thread.*, not 64: start its RPC server with TVM_NUM_THREADS=64"):
        tvm_patdnn.deploy(model_file, "arm_cpu-linux", tracker=emulator.tracker, key=KEY, threads=64)
    with pytest.raises(PatDNNError, match="threads must be a positive integer"):
        tvm_patdnn.deploy(model_file, "arm_cpu-linux", tracker=emulator.tracker, key=KEY, threads=0)
    wait_until(lambda: free_devices(emulator.tracker_port, KEY) == 1, 15, "the device to return to the tracker")


def test_deploy_given_library_that_differs_exits_1(emulator, model_file: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    other = tvm_patdnn.compile(_pattern_cnn(1), "arm_cpu-linux").export_library(tmp_path / "other.so")
    status = main(["deploy", str(model_file), "--target", "arm_cpu-linux", "--tracker", emulator.tracker, "--key", KEY,
                   "--so", str(other), "--number", "1", "--repeat", "1"])
    assert status == 1
    assert "DIFFER from the ONNX reference" in capsys.readouterr().out


def test_deploy_of_a_library_for_another_cpu_says_so(emulator, model_file: Path, host_library: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    status = main(["deploy", str(model_file), "--target", "arm_cpu-linux", "--tracker", emulator.tracker, "--key", KEY,
                   "--so", str(host_library)])
    err = capsys.readouterr().err
    assert status == 2 and "wrong linker" not in err
    assert "is an x86-64 ELF but target" in err and "needs AArch64: it was compiled for another target" in err
    assert "patdnn compile MODEL --target arm_cpu-linux" in err


def test_deploy_takes_a_tuning_database(emulator, model_file: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    # the database reaches compile: a missing one is named (an empty one would just apply nothing)
    status = main(["deploy", str(model_file), "--target", "arm_cpu-linux", "--tracker", emulator.tracker, "--key", KEY,
                   "--tuning-db", str(tmp_path / "phone_db")])
    assert status == 2 and f"tuning database {tmp_path / 'phone_db'} does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["deploy", str(model_file), "--tracker", emulator.tracker, "--so", "m.so", "--tuning-db", "db"])
    with pytest.raises(PatDNNError, match="tuning database applies when compiling"):
        tvm_patdnn.deploy(model_file, tracker=emulator.tracker, library=tmp_path / "m.so", tuning_db=tmp_path)


def test_deploy_api_with_inputs_frees_the_device(emulator, model_file: Path) -> None:
    x = np.random.default_rng(5).standard_normal((1, 4, 12, 12)).astype(np.float32)
    result = tvm_patdnn.deploy(model_file, "galaxy-s10", tracker=emulator.tracker, key=KEY, inputs={"input": x},
                               number=1, repeat=1)
    assert result.ok and result.emulated and len(result.latency_ms) == 1
    np.testing.assert_allclose(result.outputs[0], reference_outputs(onnx.load(model_file), {"input": x})[0],
                               rtol=1e-4, atol=1e-4)
    # Every remote object was dropped: the device is offered again without waiting for a timeout.
    wait_until(lambda: free_devices(emulator.tracker_port, KEY) == 1, 15, "the device to return to the tracker")


def test_deploy_errors_name_the_problem(emulator, model_file: Path, tmp_path: Path) -> None:
    with pytest.raises(PatDNNError, match=f"no device registered under key 'nokey'.*{KEY}"):
        tvm_patdnn.deploy(model_file, "arm_cpu", tracker=emulator.tracker, key="nokey")
    with pytest.raises(PatDNNError, match="no TVM RPC tracker answers"):
        tvm_patdnn.deploy(model_file, "arm_cpu", tracker=f"{HOST}:{free_port()}", key=KEY)
    with pytest.raises(PatDNNError, match="does not exist"):
        tvm_patdnn.deploy(model_file, "arm_cpu", tracker=emulator.tracker, key=KEY, library=tmp_path / "missing.so")
    assert main(["deploy", str(model_file), "--tracker", "nonsense", "--key", KEY]) == 2
    assert os.listdir(tmp_path) == []


def test_adreno_deploy_to_emulator_says_it_has_no_opencl(emulator, model_file: Path) -> None:
    with pytest.raises(PatDNNError, match="has no opencl runtime.*PoCL"):
        tvm_patdnn.deploy(model_file, "adreno", tracker=emulator.tracker, key=KEY)
    wait_until(lambda: free_devices(emulator.tracker_port, KEY) == 1, 15, "the device to return to the tracker")


def test_deploy_gives_up_on_a_device_that_never_becomes_free(emulator, model_file: Path, tmp_path: Path) -> None:
    # Another client holds the only device: TVM's own tracker.request would wait forever.
    from tvm import rpc

    library = tvm_patdnn.compile(model_file, "arm_cpu-linux").export_library(tmp_path / "model.so")
    held = rpc.connect_tracker(HOST, emulator.tracker_port).request(KEY, session_timeout=60)
    try:
        with pytest.raises(PatDNNError, match="no device 'android-deploy' .* became free within 2 s"):
            tvm_patdnn.deploy(model_file, "arm_cpu-linux", tracker=emulator.tracker, key=KEY, timeout=2,
                              library=library)
    finally:
        del held
        gc.collect()
    wait_until(lambda: free_devices(emulator.tracker_port, KEY) == 1, 30, "the device to return to the tracker")
