"""Tuning on the emulated aarch64 phone through a real RPC tracker (RPCRunner): a tune whose
tuned, cross-compiled model then runs there against the ONNX reference, and a tune during which
the phone is switched off. Few trials on one small conv: qemu is slow."""

from __future__ import annotations

import io
import json
import re
import threading

import numpy as np
import onnx
import pytest
from model_factory import ConvSpec, build_cnn
from phone_helpers import missing_tools, wait_until

import tvm_patdnn
from tvm_patdnn.cli import main
from tvm_patdnn.targets import resolve_target
from tvm_patdnn.tuning import tuner
from tvm_patdnn.tuning.commands import format_results
from tvm_patdnn.tuning.database import RECORDS, load_records, target_key

if missing_tools() is not None:
    pytest.skip(missing_tools(), allow_module_level=True)

PHONE_KEY = KEY = "android-tune"  # the module's emulator (conftest)
TARGET = "arm_cpu-linux"  # glibc aarch64: what the Debian cross compiler links for the emulator
HANG_GUARD = 900  # seconds: only so that a hanging tune fails the test instead of blocking it


def test_rpc_tune_then_deploy_tuned_model(emulator, tmp_path) -> None:
    model = build_cnn(np.random.default_rng(11), (1, 4, 10, 10), [ConvSpec(8, connectivity=2.0)])
    database = tmp_path / "phone-db"
    results = tvm_patdnn.tune(model, TARGET, trials=2, database=database, rpc=emulator.rpc, progress=None,
                              threads=1)
    assert [r.kind for r in results] == ["pattern"]
    assert results[0].default_ms is not None and results[0].best_ms is not None
    assert results.failed == 0 and results.stopped is None
    target = resolve_target(TARGET)
    records = load_records(database, target).get_all_tuning_records()
    assert len(records) >= 2 and {int(r.target.attrs["num-cores"]) for r in records} == {1}
    assert target_key(target).startswith("llvm-aarch64")

    library = tmp_path / "tuned.so"
    compiled = tvm_patdnn.compile(model, TARGET, tuning_db=database, threads=1)
    assert compiled.schedules.applied == 1 and compiled.schedules.other_threads == {}
    compiled.export_library(library)
    result = tvm_patdnn.deploy(model, TARGET, tracker=emulator.tracker, key=KEY, library=library, number=1, repeat=1)
    assert result.ok, result.errors


def test_a_device_that_runs_fewer_threads_is_refused_before_tuning(emulator, tmp_path) -> None:
    """The device's runtime cannot be raised above the count it started with: one clear error."""
    model = build_cnn(np.random.default_rng(11), (1, 4, 10, 10), [ConvSpec(8, connectivity=2.0)])
    with pytest.raises(tvm_patdnn.PatDNNError, match="runs at most [0-9]+ thread.*, not 64: start its RPC server "
                                                     "with TVM_NUM_THREADS=64"):
        tvm_patdnn.tune(model, TARGET, trials=2, database=tmp_path / "db", rpc=emulator.rpc, progress=None,
                        threads=64)
    assert not (tmp_path / "db").exists()


class _Progress(io.StringIO):
    """tune's progress stream; ``batch`` is set once the first searched batch is reported."""

    def __init__(self) -> None:
        super().__init__()
        self.batch = threading.Event()

    def write(self, text: str) -> int:
        if text.lstrip().startswith("[") and "/" in text.split("]")[0]:
            self.batch.set()
        return super().write(text)


def test_phone_switched_off_mid_tune(start_phone, tmp_path) -> None:
    """The phone dies (emulator and its live qemu session, SIGKILL) while a candidate is on it
    (of the search, or of the verification when the search is over): the tune ends on its own,
    reports the lost try in that phase, and leaves a database that loads, resumes once the phone
    is back, and compiles a model that matches the ONNX reference."""
    phone = start_phone("android-off")
    # dilated: a dense conv TVM schedules (a tuning task); other dense convs run on our untuned kernels
    model = build_cnn(np.random.default_rng(5), (1, 4, 8, 8), [ConvSpec(8, kind="dilated")])
    database = tmp_path / "db"
    progress = _Progress()
    outcome: dict = {}
    trials = 6

    def run_tune() -> None:
        try:
            outcome["results"] = tvm_patdnn.tune(model, TARGET, trials=trials, trials_per_iter=2, database=database,
                                                 rpc=phone.rpc, timeout=10, progress=progress)
        except BaseException as err:  # noqa: BLE001 (re-raised in the test's thread)
            outcome["error"] = err

    tune_thread = threading.Thread(target=run_tune, daemon=True)
    tune_thread.start()
    # Deterministic kill point: the first searched batch is on disk (the progress line comes
    # after its records are committed) and the next candidate is uploaded to a live session.
    wait_until(lambda: progress.batch.is_set() or not tune_thread.is_alive(), HANG_GUARD, "the first batch")
    if "error" in outcome:
        raise outcome["error"]
    assert progress.batch.is_set(), f"the tune ended before its first batch\n{progress.getvalue()}"
    written = (database / RECORDS).read_text()
    before_kill = written[:written.rfind("\n") + 1].splitlines()  # complete lines only
    # Frozen holding a candidate: a measurement in flight, lost for certain by the kill (a kill
    # after a mere upload raced the run on a fast host and landed in the verification).
    wait_until(lambda: phone.hold() or not tune_thread.is_alive(), 300, "a candidate on the phone", period=0.02)
    assert tune_thread.is_alive(), f"the tune ended before the phone could be killed\n{progress.getvalue()}"
    # The search reports its last batch once every candidate of it is measured.
    verifying = re.search(rf"^\[\s*{trials}/{trials}\]", progress.getvalue(), re.MULTILINE) is not None
    live = phone.sessions()
    killed = phone.kill()
    assert live and {p.pid for p in live} <= {p.pid for p in killed}  # the live qemu session went too

    tune_thread.join(HANG_GUARD)
    assert not tune_thread.is_alive(), f"the tune hangs after the phone died\n{progress.getvalue()}"
    if "error" in outcome:
        raise outcome["error"]
    results = outcome["results"]
    text = progress.getvalue()
    print(text, format_results(results), sep="\n")  # shown when the test fails

    # Failures are reported: in the results, the progress output and the CLI's summary.
    (task,) = results
    assert results.stopped is not None and "device unavailable" in results.stopped
    dead = results.devices[f"127.0.0.1:{phone.port}"]
    summary = format_results(results)
    assert f"tuning stopped early: {results.stopped}" in text and "tuning stopped early" in summary
    assert f"{results.failed} trial(s) failed" in text
    if verifying:
        assert dead.verification_failed >= 1 and task.kept is None
        assert f"{dead.verification_failed} failed" in summary
    else:
        assert results.failed == task.failed >= 1 and dead.failed >= 1 and task.error
        assert "failed (" in text
        assert f"{results.failed} trial(s) failed" in summary and f"last error: {task.error}" in summary

    # The database: every line a complete record, all written before the kill still there.
    lines = (database / RECORDS).read_text().splitlines()
    assert lines[:len(before_kill)] == before_kill and len(before_kill) >= 3  # default + first batch
    assert all(isinstance(json.loads(line), list) for line in lines)
    target = resolve_target(TARGET)
    records = load_records(database, target).get_all_tuning_records()
    assert len(records) == len(lines)
    searched = sum(len(r.trace.decisions) > 0 for r in records)
    library = tmp_path / "tuned.so"
    tvm_patdnn.compile(model, TARGET, tuning_db=database).export_library(library)

    # The phone comes back: the model compiled with the records runs there and matches the
    # ONNX reference, and the same tune resumes (only the missing trials).
    back = start_phone("android-off")
    result = tvm_patdnn.deploy(model, TARGET, tracker=back.tracker, key=back.key, library=library,
                               number=1, repeat=1)
    assert result.ok, result.errors
    again = tvm_patdnn.tune(model, TARGET, trials=searched + 1, trials_per_iter=2, database=database,
                            rpc=back.rpc, timeout=10, progress=None)
    assert again.stopped is None and again.failed == 0
    assert again[0].trials == searched + 1


def test_session_request_gives_up_without_a_device(tracker_port: int) -> None:
    """TVM's tracker request waits forever for a key nobody serves; the tuner's gives up."""
    from tvm.s_tir.meta_schedule.runner import RPCConfig

    from tvm_patdnn.rpc import DEVICE_UNAVAILABLE, TrackerSession

    config = RPCConfig(tracker_host="127.0.0.1", tracker_port=tracker_port, tracker_key="nobody-serves-this",
                       session_timeout_sec=30)
    with pytest.raises(RuntimeError, match=f"^{DEVICE_UNAVAILABLE}: no device 'nobody-serves-this' .* within 1 s"):
        TrackerSession(wait=1)(config)


def test_cli_prints_failed_trials_and_exits_1_when_stopped(tmp_path, monkeypatch, capsys) -> None:
    """What `patdnn tune --rpc` prints when the device went away (the tune itself is faked:
    the real one is test_phone_switched_off_mid_tune)."""
    path = tmp_path / "model.onnx"
    onnx.save(build_cnn(np.random.default_rng(5), (1, 4, 8, 8), [ConvSpec(8, kind="dense")]), path)
    error = "RuntimeError: device unavailable: no device 'android' at the RPC tracker 127.0.0.1:9190 became free"
    seen = {}

    def fake_tune(model, target, **kwargs):
        seen.update(kwargs)
        task = tuner.TaskResult("fused_conv2d_add_relu", "generic", 1, 2, 1.5, 1.2, failed=3, error=error)
        return tuner.TuneResults([task], stopped=error)

    monkeypatch.setattr(tuner, "tune", fake_tune)
    status = main(["tune", str(path), "--target", TARGET, "--db", str(tmp_path / "db"),
                   "--rpc", "127.0.0.1:9190:android", "--timeout", "5"])
    out = capsys.readouterr()
    assert status == 1
    assert seen["rpc"] == "127.0.0.1:9190:android" and seen["timeout"] == 5.0
    assert "3 trial(s) failed" in out.out and f"fused_conv2d_add_relu: 3 failed, last error: {error}" in out.out
    assert f"tuning stopped early: {error}" in out.out
