"""An exported library comes back with tvm_patdnn.load, `patdnn run` and `patdnn bench`, quietly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
from model_factory import ConvSpec, build_cnn, reference_outputs
from tvm import relax

import tvm_patdnn
from tvm_patdnn import PatDNNError
from tvm_patdnn.bench import kernel_runs, profile_kernels
from tvm_patdnn.cli import main
from tvm_patdnn.export import DEBIAN_CROSS_CXX, NDK_ENV
from tvm_patdnn.signature import signature_path
from tvm_patdnn.tvm_noise import filter_tvm_noise

SHAPE = (1, 3, 12, 12)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = build_cnn(np.random.default_rng(4), SHAPE, [ConvSpec(16, kind="dense"), ConvSpec(16, connectivity=3.6)], head=True)
    path = tmp_path_factory.mktemp("model") / "pruned.onnx"
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def compiled(model_file: Path) -> tvm_patdnn.CompiledModel:
    return tvm_patdnn.compile(model_file, "x86")


@pytest.fixture(scope="module")
def library(compiled: tvm_patdnn.CompiledModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compiled.export_library(tmp_path_factory.mktemp("lib") / "model.so")


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)


def test_load_gives_back_the_compiled_interface(compiled, library: Path, model_file: Path, x: np.ndarray) -> None:
    loaded = tvm_patdnn.load(library)
    assert (loaded.input_names, loaded.input_shapes, loaded.input_dtypes, loaded.output_names) == (
        compiled.input_names, compiled.input_shapes, compiled.input_dtypes, compiled.output_names)
    assert str(loaded.target) == str(compiled.target)
    expected = reference_outputs(onnx.load(model_file), {"input": x})[0]
    np.testing.assert_allclose(loaded.run(input=x)[0], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # the library itself stays a plain TVM library
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), loaded.run(input=x)[0])


def test_a_loaded_model_exports_a_copy_with_its_signature(library: Path, tmp_path: Path, x: np.ndarray) -> None:
    copy = tvm_patdnn.load(library).export_library(tmp_path / "again.so")
    assert copy.read_bytes() == library.read_bytes()
    np.testing.assert_array_equal(tvm_patdnn.load(copy).run(input=x)[0], tvm_patdnn.load(library).run(input=x)[0])


def test_signature_is_readable_json_and_checked_against_the_library(library: Path, tmp_path: Path) -> None:
    signature = json.loads(signature_path(library).read_text())
    assert signature["inputs"] == [{"name": "input", "shape": list(SHAPE), "dtype": "float32"}]
    assert signature["outputs"] == ["logits"] and signature["target"]["kind"] == "llvm"

    lib = tmp_path / "model.so"
    shutil.copyfile(library, lib)
    with pytest.raises(PatDNNError, match="has no signature file .*model.so.json"):
        tvm_patdnn.load(lib)
    shutil.copyfile(signature_path(library), signature_path(lib))
    with open(lib, "ab") as handle:  # a library replaced without its signature
        handle.write(b"\0")
    with pytest.raises(PatDNNError, match="does not belong to"):
        tvm_patdnn.load(lib)
    signature_path(lib).write_text("{not json")
    with pytest.raises(PatDNNError, match="malformed"):
        tvm_patdnn.load(lib)
    with pytest.raises(PatDNNError, match="does not exist"):
        tvm_patdnn.load(tmp_path / "missing.so")


@pytest.mark.skipif(shutil.which(DEBIAN_CROSS_CXX) is None, reason=f"needs {DEBIAN_CROSS_CXX}")
def test_android_target_without_ndk_warns_and_its_library_points_to_deploy(model_file: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(NDK_ENV, raising=False)
    compiled = tvm_patdnn.compile(model_file, "arm_cpu")
    with pytest.warns(UserWarning, match="glibc library.*--target arm_cpu-linux"):
        path = compiled.export_library(tmp_path / "phone.so")
    with pytest.raises(PatDNNError, match="this machine cannot load: run it on its device with `patdnn deploy"):
        tvm_patdnn.load(path)


def test_run_cli_reads_npy_and_writes_npz(library: Path, model_file: Path, tmp_path: Path, x: np.ndarray,
                                          capsys: pytest.CaptureFixture) -> None:
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out.npz"
    assert main(["run", str(library), "--input", str(tmp_path / "x.npy"), "-o", str(out)]) == 0
    expected = reference_outputs(onnx.load(model_file), {"input": x})[0]
    np.testing.assert_allclose(np.load(out)["logits"], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    shown = capsys.readouterr().out
    assert "logits: 1x10 float32" in shown and f"argmax {int(expected.argmax())}" in shown

    assert main(["run", str(library), "--input", f"input={tmp_path / 'x.npy'}"]) == 0
    assert "logits: 1x10 float32" in capsys.readouterr().out


def test_run_cli_bad_inputs_are_one_error_line(library: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    np.save(tmp_path / "wrong.npy", np.zeros((1, 3, 8, 8), np.float32))
    (tmp_path / "junk.npy").write_text("not numpy")
    cases = {
        (): "inputs 'input' (1x3x12x12 float32): give each with --input NAME=FILE.npy",
        ("--input", f"input={tmp_path / 'wrong.npy'}"): "has shape (1, 3, 8, 8), the model expects (1, 3, 12, 12)",
        ("--input", f"other={tmp_path / 'wrong.npy'}"): "missing ['input'], unknown ['other']",
        ("--input", str(tmp_path / "junk.npy")): "cannot read --input",
    }
    for args, message in cases.items():
        assert main(["run", str(library), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and "Traceback" not in err


def test_bench_reports_percentiles_and_threads(library: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", str(library), "--runs", "5", "--warmup", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("runtime")))
    assert lines[header].split() == ["runtime", "threads", "runs", "p50", "ms", "p90", "ms", "p99", "ms", "mean",
                                     "ms", "min", "ms"]
    row = lines[header + 1].split()
    assert row[0] == "tvm_patdnn" and int(row[1]) == tvm.runtime.num_threads() and row[2] == "5"
    p50, p90, p99 = map(float, row[3:6])
    assert 0 < p50 <= p90 <= p99


def test_bench_and_run_note_a_thread_count_the_library_was_not_compiled_for(model_file: Path, library: Path,
                                                                          tmp_path: Path, x: np.ndarray,
                                                                          capsys: pytest.CaptureFixture) -> None:
    # x86 compiles for the runtime's own count: no note
    assert main(["bench", str(library), "--runs", "1", "--warmup", "0"]) == 0
    assert "note: the model is compiled for" not in capsys.readouterr().err
    other = tvm.runtime.num_threads() + 1
    lib = tvm_patdnn.compile(model_file, "x86", threads=other).export_library(tmp_path / "other.so")
    np.save(tmp_path / "x.npy", x)
    assert main(["bench", str(lib), "--runs", "1", "--warmup", "0"]) == 0
    assert main(["run", str(lib), "--input", f"input={tmp_path / 'x.npy'}"]) == 0
    err = capsys.readouterr().err
    note = (f"note: the model is compiled for {other} threads, TVM's runtime here runs {other - 1} thread")
    assert err.count(note) == 2 and f"set TVM_NUM_THREADS={other} before starting" in err


def test_bench_of_a_phone_target_is_refused_without_a_thread_note(model_file: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    phone = json.dumps({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"],
                        "num-cores": tvm.runtime.num_threads() + 1})
    assert main(["bench", str(model_file), "--target", phone, "--runs", "1", "--warmup", "0"]) == 2
    err = capsys.readouterr().err
    assert "which this machine cannot run: run it on the device with `patdnn deploy`" in err
    assert "note: the model is compiled for" not in err


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs to pin to one of them")
def test_run_pinned_to_a_cpu_stays_there(library: Path, tmp_path: Path, x: np.ndarray) -> None:
    # TVM's thread pool binds the calling thread to core 0 as it starts; `patdnn run` under taskset keeps its CPU
    np.save(tmp_path / "x.npy", x)
    cpu = max(os.sched_getaffinity(0))
    code = (f"import os; os.sched_setaffinity(0, {{{cpu}}}); from tvm_patdnn.cli import main; "
            f"assert main(['run', {str(library)!r}, '--input', {str(tmp_path / 'x.npy')!r}]) == 0; "
            "print('affinity', sorted(os.sched_getaffinity(0)))")
    env = {k: v for k, v in os.environ.items() if k != "TVM_BIND_THREADS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"affinity [{cpu}]" in done.stdout


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs for a 2-thread pool")
def test_run_leaves_its_pool_threads_unbound(library: Path, tmp_path: Path, x: np.ndarray) -> None:
    # TVM binds a 2-thread pool's worker to core 1, where it waits whenever another process runs there
    np.save(tmp_path / "x.npy", x)
    code = ("import glob, os; os.sched_setaffinity(0, range(os.cpu_count())); from tvm_patdnn.cli import main; "
            f"assert main(['run', {str(library)!r}, '--input', {str(tmp_path / 'x.npy')!r}]) == 0; "
            "print('threads', sorted({open(s).read().split('Cpus_allowed_list:')[1].split()[0] "
            "for s in glob.glob('/proc/self/task/*/status')}))")
    env = {**{k: v for k, v in os.environ.items() if k != "TVM_BIND_THREADS"}, "TVM_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    everywhere = f"0-{os.cpu_count() - 1}"
    assert f"threads ['{everywhere}']" in done.stdout


def test_bench_profile_names_every_kernel_of_the_model(library: Path, x: np.ndarray,
                                                      capsys: pytest.CaptureFixture) -> None:
    model = tvm_patdnn.load(library)
    kernels = profile_kernels(model, {"input": x}, runs=3, warmup=1)
    by_name = {k.kernel: k for k in kernels}
    # the model's two convs (the dense one, 16 filters: the direct kernel's floor is the target's lanes,
    # 8 on AVX2, 16 on AVX-512; the pattern one) and its head, once each
    pattern = [k for k in kernels if k.kernel.startswith("pattern_conv2d")]
    assert len(pattern) == 1 and pattern[0].calls == 1 and pattern[0].shapes.endswith("1x16x12x12")
    assert "direct_conv" in by_name  # the dense 16-filter 3x3 conv
    assert all(k.ms >= 0 for k in kernels) and [k.ms for k in kernels] == sorted((k.ms for k in kernels), reverse=True)
    with pytest.raises(PatDNNError, match="at least 1 run"):
        profile_kernels(model, {"input": x}, runs=0)
    runs = kernel_runs(model, {"input": x}, runs=4, warmup=0)  # every inference's time of every kernel
    assert {k.kernel for k in runs} == set(by_name) and all(len(k.ms) == 4 and min(k.ms) > 0 for k in runs)
    assert main(["bench", str(library), "--runs", "3", "--warmup", "1", "--profile"]) == 0
    out = capsys.readouterr().out.splitlines()
    header = out.index(next(line for line in out if line.startswith("kernel")))
    assert out[header].split()[:4] == ["kernel", "calls", "ms", "share"]
    assert any(line.startswith("pattern_conv2d") for line in out[header:]) and out[-1].startswith("total")


def test_bench_onnx_against_onnxruntime(model_file: Path, library: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("onnxruntime")
    assert main(["bench", str(model_file), "--ort", "--runs", "5", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "outputs agree with ONNX Runtime" in out
    assert any(line.startswith("onnxruntime") for line in out.splitlines()) and "as fast as onnxruntime" in out
    assert main(["bench", str(library), "--ort"]) == 2
    assert "need an ONNX model" in capsys.readouterr().err


def test_run_then_export_and_load_print_no_scope_lines(compiled, tmp_path: Path, x: np.ndarray,
                                                       capfd: pytest.CaptureFixture) -> None:
    compiled.run(input=x)
    capfd.readouterr()
    path = compiled.export_library(tmp_path / "model.so")
    tvm_patdnn.load(path).run(input=x)
    assert "Scope" not in capfd.readouterr().err
    # TVM itself still prints them (so the filter is not vacuous): one line per constant
    compiled.executable.export_library(str(tmp_path / "plain.so"))
    assert "Warning: Scope Saving:" in capfd.readouterr().err


def test_noise_filter_passes_everything_else(capfd: pytest.CaptureFixture) -> None:
    with filter_tvm_noise():
        os.write(2, b"[02:11:35] /project/src/runtime/vm/executable.cc:276: Warning: Scope Saving:\n")
        os.write(2, b"[02:11:35] /project/src/runtime/vm/executable.cc:276: Warning: Scope Saving:global.texture\n")
        os.write(2, b"a real error\n")
    err = capfd.readouterr().err
    assert err == ("[02:11:35] /project/src/runtime/vm/executable.cc:276: Warning: Scope Saving:global.texture\n"
                   "a real error\n")


def test_noise_filter_steps_aside_without_a_stderr() -> None:
    code = "from tvm_patdnn.tvm_noise import filter_tvm_noise\nwith filter_tvm_noise():\n    print('ran')"
    shown = subprocess.run(["bash", "-c", f'"{sys.executable}" -c "{code}" 2>&-'], capture_output=True, text=True,
                           timeout=60)
    assert (shown.returncode, shown.stdout) == (0, "ran\n")


def test_tuning_pools_prints_no_unknown_schedule_rule(capfd: pytest.CaptureFixture) -> None:
    import tvm.s_tir.meta_schedule as ms

    from tvm_patdnn.targets import resolve_target
    from tvm_patdnn.tvm_compat import only_tensor_intrinsics  # TuneContext's 50 s import otherwise

    bb = relax.BlockBuilder()
    data = relax.Var("x", relax.TensorType((1, 8, 16, 16), "float32"))
    with bb.function("main", [data]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.max_pool2d(data, (2, 2), (2, 2))))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    pool = next(f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc))
    target = resolve_target("x86")

    def design_space() -> None:
        with only_tensor_intrinsics("x86"):
            context = ms.TuneContext(mod=tvm.IRModule({"main": pool}), target=target,
                                     space_generator="post-order-apply", task_name="pool")
        context.generate_design_space()

    design_space()
    assert 'Unknown schedule rule "meta_schedule.pool_max"' in capfd.readouterr().err  # TVM's own behaviour
    with filter_tvm_noise():
        design_space()
    assert capfd.readouterr().err == ""
