"""Auto-tuning: tuned models against the ONNX reference, resume after a kill, bad input.

Tunes use a few trials on small models (each a few seconds to ~30 s on a loaded 2-core box);
no timing is asserted.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
from model_factory import ConvSpec, build_cnn, reference_outputs
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

import tvm_patdnn
from tvm_patdnn import PatDNNError
from tvm_patdnn.analysis import PatternOptions
from tvm_patdnn.cli import main
from tvm_patdnn.frontend import load_model
from tvm_patdnn.pipeline import fusion_passes
from tvm_patdnn.targets import host_arch, resolve_target
from tvm_patdnn.tuning.database import (
    RECORDS,
    VERIFIED,
    WORKLOADS,
    apply_tuning_records,
    load_device_records,
    load_records,
    open_for_tuning,
)
from tvm_patdnn.tuning.measure import PackedArguments, build_kernel, signature
from tvm_patdnn.tuning.space import pattern_conv_space
from tvm_patdnn.tuning.tasks import extract_tasks, normalize
from tvm_patdnn.tuning.threads import for_threads

PATDNN = Path(sys.executable).parent / "patdnn"


def small_model() -> onnx.ModelProto:
    """A dense conv, a pattern conv and a strided pattern conv: three kernels to tune. The dense conv
    is dilated: it stays on TVM's conv2d (a generic task), where other dense convs run on our kernels,
    which are written as scheduled TIR and not tuned."""
    convs = [ConvSpec(8, kind="dilated"), ConvSpec(16, connectivity=2.0), ConvSpec(8, stride=2)]
    return build_cnn(np.random.default_rng(7), (1, 4, 12, 12), convs)


def assert_matches_reference(model: onnx.ModelProto, compiled: tvm_patdnn.CompiledModel) -> None:
    x = np.random.default_rng(1).standard_normal(compiled.input_shapes["input"]).astype(np.float32)
    actual, expected = compiled.run(input=x)[0], reference_outputs(model, {"input": x})[0]
    scale = max(float(np.abs(expected).max()), 1e-6)
    assert float(np.abs(actual - expected).max()) / scale <= 1e-4


def scheduled_by_records(model: onnx.ModelProto, database: Path) -> set[str]:
    """The kernels the database's records schedule when compiling ``model``."""
    target = resolve_target("x86")
    with target:
        fused = tvm.transform.Sequential(fusion_passes(target))(load_model(model).mod)
        tuned = apply_tuning_records(load_records(database, target))(fused)
    return {gv.name_hint for gv, f in tuned.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs.get("tirx.is_scheduled", False)}


def record_lines(database: Path) -> int:
    return len((database / RECORDS).read_text().splitlines())


def test_design_space_samples_compute_the_default_result():
    """Random points of the pattern-conv space (tiles, filter splits, unroll) are exact."""
    model = build_cnn(np.random.default_rng(3), (1, 6, 10, 13), [ConvSpec(12, connectivity=2.0)])
    target = resolve_target("x86")
    (task,) = [t for t in extract_tasks(load_model(model).mod, target, PatternOptions()) if t.kind == "pattern"]
    arguments = PackedArguments.write(str(Path(os.environ.get("TMPDIR", "/tmp")) / f"args-{os.getpid()}.npz"),
                                      {signature(task.args_info): task.int_args})
    try:
        args = arguments.local(tvm.cpu(), task.args_info, 1)[0]
    finally:
        os.unlink(arguments.path)
    reference = None
    for seed in range(1, 7):
        (space,) = pattern_conv_space(s_tir.Schedule(task.mod, seed=seed), target)
        args[-1] = tvm.runtime.empty(args[-1].shape, "float32")
        build_kernel(space.mod, target)["main"](*args)
        result = args[-1].numpy()
        if reference is None:
            unscheduled = tvm.tirx.build(task.mod, target=target)
            expected = tvm.runtime.empty(args[-1].shape, "float32")
            unscheduled["main"](*args[:-1], expected)
            reference = expected.numpy()
        np.testing.assert_allclose(result, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


def searched_only(database: Path, into: Path) -> Path:
    """A copy of ``database`` without the default-schedule seeds (their traces decide nothing)."""
    into.mkdir()
    (into / WORKLOADS).write_bytes((database / WORKLOADS).read_bytes())
    # A record line is [workload, [[instructions, decisions], run_secs, target, args]].
    lines = (database / RECORDS).read_text().splitlines()
    kept = [line for line in lines if json.loads(line)[1][0][1]]
    (into / RECORDS).write_text("".join(f"{line}\n" for line in kept))
    return into


def test_tune_applies_and_reruns(tmp_path):
    model = small_model()
    database = tmp_path / "db"
    results = tvm_patdnn.tune(model, "x86", trials=6, database=database, trials_per_iter=2, progress=None)
    assert {r.kind for r in results} == {"pattern", "generic"}
    assert all(r.default_ms is not None and r.best_ms is not None for r in results)
    assert sum(r.trials for r in results) >= 3
    # One default-schedule seed per kernel, and every searched trial, are in the database.
    lines = [json.loads(line) for line in (database / RECORDS).read_text().splitlines()]
    seeds = [line for line in lines if not line[1][0][1]]
    assert len(seeds) == len(results) and len(lines) - len(seeds) == sum(r.trials for r in results)

    # Every kernel is scheduled by its records, and the tuned model is exact.
    assert scheduled_by_records(model, database) == {r.name for r in results}
    assert_matches_reference(model, tvm_patdnn.compile(model, "x86", tuning_db=database))
    # So are the searched schedules alone (without the seeds they would lose to).
    searched = searched_only(database, tmp_path / "searched")
    assert scheduled_by_records(model, searched)
    assert_matches_reference(model, tvm_patdnn.compile(model, "x86", tuning_db=searched))

    # The same budget again finds it spent and measures nothing.
    lines = record_lines(database)
    again = tvm_patdnn.tune(model, "x86", trials=sum(r.trials for r in results), database=database, progress=None)
    assert record_lines(database) == lines
    assert [r.trials for r in again] == [r.trials for r in results]


def test_killed_tune_leaves_a_usable_database_and_resumes(tmp_path):
    """At 2 threads: what was measured before the kill says so, and the resumed tune at the same
    count counts it as done."""
    model = small_model()
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    database = tmp_path / "db"
    proc = subprocess.Popen(
        [str(PATDNN), "tune", str(path), "--trials", "500", "--trials-per-iter", "2", "--threads", "2",
         "--db", str(database)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    deadline = time.monotonic() + 240
    try:
        # Wait for the three default seeds plus a few searched records, then kill without warning.
        while time.monotonic() < deadline and proc.poll() is None:
            if (database / RECORDS).is_file() and record_lines(database) >= 5:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with open(database / RECORDS, "a") as handle:
        handle.write('[0, [[["GetSBlock"')  # what a kill in the middle of a write leaves

    kept = record_lines(database) - 1
    assert kept >= 5
    threads = {json.loads(line)[1][2]["num-cores"] for line in (database / RECORDS).read_text().splitlines()[:-1]}
    assert threads == {2}
    compiled = tvm_patdnn.compile(model, "x86", tuning_db=database, threads=2)
    assert compiled.schedules.applied == 3 and compiled.schedules.other_threads == {}
    assert_matches_reference(model, compiled)
    done = kept - 3  # three default seeds, the rest searched
    results = tvm_patdnn.tune(model, "x86", trials=done + 2, database=database, trials_per_iter=2, threads=2,
                              progress=None)
    text = (database / RECORDS).read_text()
    assert text.endswith("\n") and "GetSBlock\"\n" not in text  # the torn line is gone, nothing else
    assert kept < record_lines(database) <= kept + 2  # resumed: only the remaining trials
    assert done < sum(r.trials for r in results) <= done + 2
    assert_matches_reference(model, tvm_patdnn.compile(model, "x86", tuning_db=database, threads=2))


def test_tune_gives_up_after_batches_that_all_fail(tmp_path, monkeypatch):
    """A device that answers but fails every trial: the tune stops after MAX_FAILED_BATCHES
    batches, says why, and counts the failed trials with their error."""
    from tvm.s_tir import meta_schedule as ms

    from tvm_patdnn.tuning import tuner

    def failing(bench, candidates):
        return [ms.runner.RunnerResult(None, "RPCRunner: An exception occurred\nTraceback ...\nOSError: broken")
                for _ in candidates]

    monkeypatch.setattr(tuner._Bench, "measure", failing)
    # 6x6: a TE pattern conv, a tuning task on every x86 target (AVX-512 runs 8x8 images on a hand-built kernel)
    model = build_cnn(np.random.default_rng(3), (1, 4, 6, 6), [ConvSpec(8)])
    progress = io.StringIO()
    results = tvm_patdnn.tune(model, "x86", trials=20, trials_per_iter=2, database=tmp_path / "db", progress=progress)
    (task,) = results
    assert results.stopped == f"{tuner.MAX_FAILED_BATCHES} batches in a row failed every trial, last error: OSError: broken"
    assert task.failed == results.failed == 1 + 2 * tuner.MAX_FAILED_BATCHES  # the default, then the batches
    assert task.error == "OSError: broken" and task.best_ms is None
    text = progress.getvalue()
    assert "default schedule of" in text and "2 failed (OSError: broken)" in text
    assert f"tuning stopped early: {results.stopped}" in text


@pytest.mark.parametrize("rpc", ["localhost", "host:port:key", "host:9190", ":9190:android", "h:99999:k", "h:1:"])
def test_bad_rpc_string(rpc, tmp_path):
    with pytest.raises(PatDNNError, match="TRACKER_HOST:PORT:DEVICE_KEY"):
        tvm_patdnn.tune(small_model(), rpc=rpc, database=tmp_path / "db")
    assert not (tmp_path / "db").exists()


def test_unreachable_tracker(tmp_path):
    with pytest.raises(PatDNNError, match="no TVM RPC tracker answers at 127.0.0.1:1"):
        tvm_patdnn.tune(small_model(), rpc="127.0.0.1:1:android", database=tmp_path / "db", progress=None)


def test_a_target_this_machine_cannot_run_is_tuned_over_rpc(tmp_path):
    other = "arm_cpu-linux" if host_arch() == "x86_64" else '{"kind":"llvm","mtriple":"x86_64-linux-gnu"}'
    with pytest.raises(PatDNNError, match="this machine is .*: tune on the device with rpc="):
        tvm_patdnn.tune(small_model(), other, database=tmp_path / "db")
    assert not (tmp_path / "db").exists()


def test_unknown_target(tmp_path):
    with pytest.raises(PatDNNError, match="unknown target"):
        tvm_patdnn.tune(small_model(), "pentium", database=tmp_path / "db")


def test_unreadable_database(tmp_path):
    model = small_model()
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(PatDNNError):
        tvm_patdnn.tune(model, database=not_a_dir, progress=None)
    with pytest.raises(PatDNNError, match="not a directory"):
        tvm_patdnn.compile(model, tuning_db=not_a_dir)
    with pytest.raises(PatDNNError, match="does not exist"):
        tvm_patdnn.compile(model, tuning_db=tmp_path / "absent")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / WORKLOADS).write_text("this is not json\n")
    (garbage / RECORDS).write_text("[0, 1]\n")
    with pytest.raises(PatDNNError, match="garbage"):
        tvm_patdnn.compile(model, tuning_db=garbage)
    with pytest.raises(PatDNNError, match="garbage"):
        tvm_patdnn.tune(model, database=garbage, progress=None)


def test_cli_reports_bad_input(tmp_path, capsys):
    path = tmp_path / "model.onnx"
    onnx.save(small_model(), path)
    assert main(["tune", str(path), "--db", str(tmp_path / "db"), "--rpc", "nonsense"]) == 2
    assert "error: --rpc expects" in capsys.readouterr().err
    assert main(["tune", str(path), "--db", str(tmp_path / "db"), "--target", "pentium"]) == 2
    assert "error: unknown target" in capsys.readouterr().err


def one_pattern_conv() -> onnx.ModelProto:
    """A pattern conv that is a tuning task on every target: 12x12, a size no hand-built kernel takes
    (2x2, 4x4, 8x8 and, on AVX-512, rows of 16, 32, 56 or >= 112 columns are scheduled TIR)."""
    return build_cnn(np.random.default_rng(5), (1, 16, 12, 12), [ConvSpec(16, connectivity=2.0)])


def unscheduled(task, decides: bool) -> s_tir.Trace:
    """The workload left unscheduled (scalar loops: far slower than any real schedule); with
    ``decides``, its trace samples one value that changes nothing, so it counts as a search record."""
    sch = s_tir.Schedule(task.mod)
    if decides:
        sch.sample_categorical([0], [1.0])
    return sch.trace


def applied_trace(model: onnx.ModelProto, database: Path) -> str:
    """The trace ``compile`` applies to the model's one kernel."""
    target = for_threads(resolve_target("x86"), 1)
    (task,) = extract_tasks(load_model(model).mod, target, PatternOptions())
    ((_threads, records), *_others) = load_device_records(database, target).ranked(1)
    with target:
        sch = records.query_schedule(normalize(task.mod["main"]), target, "main")
    return str(sch.trace.as_json())


def test_verification_keeps_the_default_over_a_candidate_that_only_measured_faster(tmp_path):
    """A search record whose time is a fluke (the unscheduled kernel, recorded 100x faster than the
    default): the compile would apply it; the verification re-measures it against the default,
    keeps the default and appends the verdict, which the compile then applies."""
    model, database = one_pattern_conv(), tmp_path / "db"
    first = tvm_patdnn.tune(model, "x86", trials=0, threads=1, database=database, progress=None)
    assert first[0].kept is None  # nothing searched: nothing to verify
    target = for_threads(resolve_target("x86"), 1)
    (task,) = extract_tasks(load_model(model).mod, target, PatternOptions())
    db = open_for_tuning(database, target)
    (seed,) = db.get_all_tuning_records()
    fluke = unscheduled(task, decides=True)
    db.commit_tuning_record(ms.database.TuningRecord(fluke, seed.workload, [float(seed.run_secs[0]) / 100],
                                                     target, seed.args_info))
    assert applied_trace(model, database) == str(fluke.as_json())

    progress = io.StringIO()
    (result,) = tvm_patdnn.tune(model, "x86", trials=1, threads=1, database=database, progress=progress)
    assert "verified pattern_conv2d_conv0" in progress.getvalue() and "default kept" in progress.getvalue()
    assert result.kept is False and result.speedup == 1.0 and result.best_ms == result.default_ms
    assert result.candidate_speedup < 1 < 50 < result.search_speedup
    assert applied_trace(model, database) == str(seed.trace.as_json())
    assert_matches_reference(model, tvm_patdnn.compile(model, "x86", tuning_db=database, threads=1))
    # Verified once: the same budget again measures nothing more.
    lines = (database / VERIFIED).read_text()
    tvm_patdnn.tune(model, "x86", trials=1, threads=1, database=database, progress=None)
    assert (database / VERIFIED).read_text() == lines


def test_verification_keeps_a_candidate_that_wins(tmp_path):
    """The other way round: a default as slow as the unscheduled kernel, a searched schedule from
    the design space: the candidate wins the verification by far and the compile applies it."""
    model, database = one_pattern_conv(), tmp_path / "db"
    target = for_threads(resolve_target("x86"), 1)
    (task,) = extract_tasks(load_model(model).mod, target, PatternOptions())
    db = open_for_tuning(database, target)
    workload = db.commit_workload(task.mod)
    args_info = ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])
    (space,) = pattern_conv_space(s_tir.Schedule(task.mod, seed=1), target)
    slow = unscheduled(task, decides=False)
    for trace, seconds in ((slow, 1e-3), (space.trace, 0.9e-3)):
        db.commit_tuning_record(ms.database.TuningRecord(trace, workload, [seconds], target, args_info))

    (result,) = tvm_patdnn.tune(model, "x86", trials=1, threads=1, database=database, progress=None)
    assert result.kept is True and result.speedup == result.candidate_speedup > 2
    assert result.best_ms < result.default_ms
    assert applied_trace(model, database) == str(space.trace.as_json())
    assert_matches_reference(model, tvm_patdnn.compile(model, "x86", tuning_db=database, threads=1))
