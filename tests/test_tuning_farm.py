"""Tuning on a farm: every emulated phone registered under one key measures at once, a phone that
dies mid-tune is dropped without stopping the tune, one that joins gets work. Real processes on
127.0.0.1: a tracker and ``patdnn phone-emulator`` phones (qemu is slow: few, small trials)."""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest
from model_factory import ConvSpec, build_cnn
from phone_helpers import missing_tools, wait_until
from test_tuning_rpc import HANG_GUARD, TARGET, _Progress

import tvm_patdnn
from tvm_patdnn import PatDNNError
from tvm_patdnn.tuning.commands import format_results
from tvm_patdnn.tuning.database import RECORDS
from tvm_patdnn.tuning.farm import _lost
from tvm_patdnn.tuning.tuner import VERIFY_ROUNDS

if missing_tools() is not None:
    pytest.skip(missing_tools(), allow_module_level=True)


def small_model():
    return build_cnn(np.random.default_rng(21), (1, 4, 8, 8), [ConvSpec(8, connectivity=2.0)])


def searched_records(database) -> int:
    lines = [json.loads(line) for line in (database / RECORDS).read_text().splitlines()]
    return sum(bool(line[1][0][1]) for line in lines)


def tune_in_background(model, database, rpc: str, trials: int, progress: _Progress,
                       per_iter: int = 4) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["results"] = tvm_patdnn.tune(model, TARGET, trials=trials, trials_per_iter=per_iter, database=database,
                                                 rpc=rpc, timeout=60, progress=progress)
        except BaseException as err:  # noqa: BLE001 (re-raised in the test's thread)
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def finished(thread: threading.Thread, outcome: dict, progress: _Progress):
    thread.join(HANG_GUARD)
    assert not thread.is_alive(), f"the tune hangs\n{progress.getvalue()}"
    if "error" in outcome:
        raise outcome["error"]
    print(progress.getvalue(), format_results(outcome["results"]), sep="\n")  # shown when a test fails
    return outcome["results"]


def test_two_phones_both_measure_and_every_trial_is_counted_once(start_phone, tmp_path):
    phones = [start_phone("farm-both"), start_phone("farm-both")]
    database = tmp_path / "db"
    results = tvm_patdnn.tune(small_model(), TARGET, trials=4, trials_per_iter=4, database=database,
                              rpc=phones[0].rpc, timeout=60, progress=None)
    assert results.stopped is None and results.failed == 0
    assert set(results.devices) == {f"127.0.0.1:{phone.port}" for phone in phones}
    assert all(stats.trials >= 1 and stats.failed == 0 for stats in results.devices.values())
    lines = (database / RECORDS).read_text().splitlines()
    assert sum(stats.trials for stats in results.devices.values()) == len(lines)  # seeds + searched, each once
    assert searched_records(database) == 4
    # The verification's runs (the default and each candidate, every round) are counted apart.
    runs = sum(stats.verification_runs for stats in results.devices.values())
    assert runs >= 2 * VERIFY_ROUNDS if results[0].kept is not None else runs == 0
    assert all(stats.verification_failed == 0 for stats in results.devices.values())
    assert "devices:" in format_results(results) and "trial(s) measured" in format_results(results)


def test_a_phone_that_dies_holding_a_candidate_is_dropped_and_the_other_finishes(start_phone, tmp_path):
    """The second phone is frozen holding a candidate (of the search, or of the verification when
    the search is over), then killed: the lost try counts as its failure in that phase, the
    candidate is measured on the other phone, and the tune finishes."""
    phones = [start_phone("farm-die"), start_phone("farm-die")]
    database = tmp_path / "db"
    progress = _Progress()
    trials = 8
    thread, outcome = tune_in_background(small_model(), database, phones[0].rpc, trials, progress)
    wait_until(lambda: progress.batch.is_set() or not thread.is_alive(), HANG_GUARD, "the first batch")
    wait_until(lambda: phones[1].hold() or not thread.is_alive(), 300, "a candidate on the second phone",
               period=0.02)
    assert thread.is_alive(), f"the tune ended before a phone could be killed\n{progress.getvalue()}"
    # The search reports its last batch once every candidate of it is measured: not yet while the
    # frozen phone holds one of them.
    verifying = re.search(rf"^\[\s*{trials}/{trials}\]", progress.getvalue(), re.MULTILINE) is not None
    phones[1].kill()
    results = finished(thread, outcome, progress)

    assert results.stopped is None  # one device left is enough
    assert searched_records(database) == trials  # a lost search candidate was measured again, elsewhere
    dead = results.devices[f"127.0.0.1:{phones[1].port}"]
    survivor = results.devices[f"127.0.0.1:{phones[0].port}"]
    assert survivor.trials > survivor.failed
    # Every record (seed and searched, failed ones included) was measured by a device the results
    # name; a try lost with the dead phone is counted as its failure on top.
    lines = (database / RECORDS).read_text().splitlines()
    assert sum(stats.trials for stats in results.devices.values()) >= len(lines)
    if verifying:
        assert dead.verification_failed >= 1
        assert survivor.verification_runs > survivor.verification_failed
        assert results[0].kept is not None, "the verification did not finish on the other phone"
    else:
        assert dead.failed >= 1


def test_the_rpc_errors_of_a_session_whose_device_end_closed_mean_a_lost_device():
    """TVM's RPC client when the device's end of the session closes mid-call (the phone died):
    these, and only errors of that kind, send the candidate to another device."""
    for error in ("tvm.error.InternalError: Check failed: (code == RPCCode::kReturn) is false: code=1",
                  "Check failed: (code == RPCCode::kReturn) is false: code=kShutdown",
                  "InternalError: Channel closes before we get needed bytes",
                  "ConnectionResetError: [Errno 104] Connection reset by peer"):
        assert _lost(error), error
    for error in ("device unavailable: no device 'k' of the RPC tracker 127.0.0.1:9190 became free within 60 s",
                  "InternalError: Check failed: (ret == 0) is false: Assert fail: data.ndim == 4",
                  "RuntimeError: out of memory"):
        assert not _lost(error), error


def test_a_phone_that_joins_mid_tune_gets_work(start_phone, tmp_path):
    first = start_phone("farm-join")
    progress = _Progress()
    thread, outcome = tune_in_background(small_model(), tmp_path / "db", first.rpc, 8, progress, per_iter=2)
    wait_until(lambda: progress.batch.is_set() or not thread.is_alive(), HANG_GUARD, "the first batch")
    assert thread.is_alive(), f"the tune ended before a phone could join\n{progress.getvalue()}"
    second = start_phone("farm-join")
    results = finished(thread, outcome, progress)
    assert results.stopped is None
    assert results.devices[f"127.0.0.1:{second.port}"].trials >= 1
    assert "[2 devices]" in progress.getvalue()


def test_devices_needs_rpc_and_a_positive_count(tmp_path):
    with pytest.raises(PatDNNError, match="devices .* must be a positive integer and needs rpc="):
        tvm_patdnn.tune(small_model(), "x86", devices=2, database=tmp_path / "db")
    with pytest.raises(PatDNNError, match="got 0"):
        tvm_patdnn.tune(small_model(), TARGET, rpc="127.0.0.1:9190:k", devices=0, database=tmp_path / "db")
