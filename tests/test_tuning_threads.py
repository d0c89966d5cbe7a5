"""Thread counts: a tune measures with its count and says it in every record; compile applies the
records of the count it compiles for, and says so when a kernel has records only for another.

Real tunes of a one-conv model (two trials, ~30-40 s each on a loaded 2-core box); no timing is
asserted. Two threads on a box pinned to one core still run (time-shared): only what is recorded
and applied is checked here.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import onnx
import pytest
from model_factory import ConvSpec, build_cnn, reference_outputs

import tvm_patdnn
from tvm_patdnn import PatDNNError
from tvm_patdnn.cli import main
from tvm_patdnn.tuning import tuner
from tvm_patdnn.tuning.database import RECORDS
from tvm_patdnn.tuning.measure import PackedArguments


def one_conv() -> onnx.ModelProto:
    return build_cnn(np.random.default_rng(11), (1, 4, 10, 10), [ConvSpec(8, connectivity=2.0)])


def recorded_threads(database) -> list[int | None]:
    """The num-cores of every record's target, in file order."""
    return [json.loads(line)[1][2].get("num-cores") for line in (database / RECORDS).read_text().splitlines()]


def assert_exact(model: onnx.ModelProto, compiled: tvm_patdnn.CompiledModel) -> None:
    x = np.random.default_rng(1).standard_normal(compiled.input_shapes["input"]).astype(np.float32)
    actual, expected = compiled.run(input=x)[0], reference_outputs(model, {"input": x})[0]
    assert float(np.abs(actual - expected).max()) <= 1e-4 * max(float(np.abs(expected).max()), 1e-6)


def test_a_two_thread_tune_is_applied_at_two_threads_and_not_silently_ignored_at_one(tmp_path, capsys):
    model, database = one_conv(), tmp_path / "db"
    progress = io.StringIO()
    results = tvm_patdnn.tune(model, "x86", trials=2, trials_per_iter=2, database=database, threads=2,
                              progress=progress)
    assert results.failed == 0 and results.stopped is None
    assert "at 2 threads" in progress.getvalue()
    assert set(recorded_threads(database)) == {2}

    two = tvm_patdnn.compile(model, "x86", tuning_db=database, threads=2)
    assert two.target.attrs["num-cores"] == 2
    assert two.schedules.applied == two.schedules.kernels == 1 and two.schedules.other_threads == {}
    assert str(two.schedules) == f"tuning records: 1/1 kernels from {database}"
    assert_exact(model, two)

    one = tvm_patdnn.compile(model, "x86", tuning_db=database, threads=1)
    assert one.target.attrs["num-cores"] == 1
    assert one.schedules.applied == 0 and one.schedules.unused_threads == {2: 1}
    assert str(one.schedules) == (f"tuning records: 0/1 kernels from {database} (not applied: 1 kernel(s) tuned "
                                  "only for 2 threads, compiling for 1 thread; `patdnn tune --threads 1` measures "
                                  "its own)")
    assert_exact(model, one)

    # A 1-thread tune into the same directory does not count the 2-thread trials as its own: it
    # measures the default and its budget, and then compiling for 1 thread takes its records.
    lines = len(recorded_threads(database))
    again = tvm_patdnn.tune(model, "x86", trials=2, trials_per_iter=2, database=database, threads=1, progress=None)
    assert again[0].trials == 2
    assert recorded_threads(database)[lines:] == [1] * 3  # its default seed and its two trials
    one = tvm_patdnn.compile(model, "x86", tuning_db=database, threads=1)
    assert one.schedules.applied == 1 and one.schedules.unused_threads == one.schedules.other_threads == {}

    # The CLI's compile takes the count too; each count finds its own records in the one directory.
    path = tmp_path / "one_conv.onnx"
    onnx.save(model, path)
    capsys.readouterr()
    for threads in (2, 1):
        assert main(["compile", str(path), "--tuning-db", str(database), "--threads", str(threads),
                     "-o", str(tmp_path / f"model{threads}.so")]) == 0
        assert f"tuning records: 1/1 kernels from {database}" in capsys.readouterr().err


@pytest.mark.parametrize("threads", [1, 2])
def test_the_measuring_process_runs_the_tunes_thread_count(threads, tmp_path):
    """Whatever TVM_NUM_THREADS this process has: the runner's worker sets its own."""
    runner = tuner._runner(None, PackedArguments(str(tmp_path / "unused.npz")), 60, None, threads, tuner.SEARCH_REPEATS,
                           True, {})
    assert runner.pool.submit(lambda: __import__("tvm").runtime.num_threads()).result() == threads


def test_the_default_is_what_tvms_runtime_runs_here(tmp_path, monkeypatch):
    """No threads given: the count TVM's runtime runs in this process (TVM_NUM_THREADS, or TVM's
    default for the machine), so records say what was measured; the x86 target's num-cores (the
    machine's CPUs) is replaced by it."""
    import tvm

    seen = []
    monkeypatch.setattr(tuner, "_search_remaining", lambda states, bench, *rest: seen.append(bench.target) or None)
    tvm_patdnn.tune(one_conv(), "x86", trials=0, database=tmp_path / "db", progress=None)
    assert [int(t.attrs["num-cores"]) for t in seen] == [tvm.runtime.num_threads()]
    assert set(recorded_threads(tmp_path / "db")) == {tvm.runtime.num_threads()}


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_a_thread_count_is_a_positive_integer(threads, tmp_path):
    with pytest.raises(PatDNNError, match="threads must be a positive integer"):
        tvm_patdnn.tune(one_conv(), "x86", database=tmp_path / "db", threads=threads, progress=None)
    with pytest.raises(PatDNNError, match="threads must be a positive integer"):
        tvm_patdnn.compile(one_conv(), "x86", threads=threads)
    assert not (tmp_path / "db").exists()


def test_more_threads_than_this_machine_has_cannot_be_measured_here(tmp_path):
    with pytest.raises(PatDNNError, match=f"this machine has {os.cpu_count()} CPUs.*rpc="):
        tvm_patdnn.tune(one_conv(), "x86", database=tmp_path / "db", threads=os.cpu_count() + 1, progress=None)


def test_a_gpu_target_has_no_thread_count():
    with pytest.raises(PatDNNError, match="threads applies to CPU .*opencl target"):
        tvm_patdnn.compile(one_conv(), "adreno", threads=2)


@pytest.mark.parametrize("text", ["0", "-2", "two", "1.5"])
def test_cli_rejects_a_bad_thread_count(text, tmp_path, capsys):
    path = tmp_path / "model.onnx"
    onnx.save(one_conv(), path)
    with pytest.raises(SystemExit) as exit_status:
        main(["tune", str(path), "--db", str(tmp_path / "db"), "--threads", text])
    assert exit_status.value.code == 2
    assert f"--threads: expected a positive whole number of threads, got '{text}'" in capsys.readouterr().err
    assert not (tmp_path / "db").exists()


def test_the_printed_compile_command_compiles_for_the_tuned_thread_count():
    import argparse
    import shlex

    from tvm_patdnn.targets import resolve_target
    from tvm_patdnn.tuning.commands import apply_command
    from tvm_patdnn.tuning.threads import for_threads

    args = argparse.Namespace(model="m.onnx", target="x86", input_shape=[], entries=4, max_patterns=12, db="db")
    host = resolve_target("x86")
    assert "--threads" not in shlex.split(apply_command(args, host))  # x86 already says the tuned count
    other = 1 if host.attrs["num-cores"] != 1 else 2
    words = shlex.split(apply_command(args, for_threads(host, other)))
    assert words[4] == "x86" and words[words.index("--threads") + 1] == str(other)
    args.target = "arm_cpu-linux"  # no num-cores of its own: the tuned count is said
    words = shlex.split(apply_command(args, for_threads(resolve_target("arm_cpu-linux"), 3)))
    assert words[4] == "arm_cpu-linux" and words[words.index("--threads") + 1] == "3"
