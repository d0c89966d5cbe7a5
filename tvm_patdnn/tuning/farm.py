"""Measuring on every device a tracker lists under one key at once (a phone farm).

Teams tune on racks of phones behind one TVM RPC tracker; the tracker already hands each
session request a free device of the key, so measuring ``n`` candidates at once on ``n``
devices is ``n`` meta_schedule RPCRunner workers asking at the same time. What this adds:

* the pool follows the farm: before every batch the tracker's list of devices under the key is
  read again (bounded by the timeout); a phone that joined gets work, one that left takes its
  worker with it, and the tune stops only when no device is left;
* per-device accounting: each worker's upload names the device it was handed in a small file
  beside the candidate's library (the workers are processes of this machine), so every try is
  counted against the device that measured it, the search's trials and the verification's runs
  apart (the tuner's two farms share one ``stats``);
* a candidate whose device vanished mid-measurement is measured again (on another device, if
  the tracker has one), in the search as in the verification: a device that dies is the farm's
  problem, not the candidate's.

Builds stay local and are shared by all devices. Devices of different phone models belong under
different keys and in different databases: one key is one device kind.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.runner.rpc_runner import default_upload_module

from ..rpc import DEVICE_UNAVAILABLE, TrackerSession, tracker_devices
from ..tvm_compat import set_pool_timeout
from .measure import PackedArguments
from .threads import RemoteThreads

__all__ = ["DeviceFarm", "DeviceStats", "RecordingUpload"]

MARKER = ".device"  # suffix of the file naming the device that measured a library
RETRIES = 2  # extra tries of a candidate whose device was lost


@dataclass(frozen=True)
class RecordingUpload:
    """RPCRunner ``f_upload_module``: the default upload, after writing which device the worker's
    session runs on next to the library (``rpc.request_session`` tags the session with it)."""

    def __call__(self, session, local_path: str, remote_path: str):
        with open(local_path + MARKER, "w") as marker:
            marker.write(getattr(session, "patdnn_device", "unknown device"))
        return default_upload_module(session, local_path, remote_path)


@dataclass
class DeviceStats:
    """What one device measured in this tune, and how many of those tries failed: search
    ``trials`` (each a line of the records, or a dense layer's candidate kernel) and the
    verification's ``verification_runs`` (``tuner._compare``: the default and the best candidates
    again, not records). A try lost with the device is one of its failures; the candidate was
    measured again elsewhere."""

    trials: int = 0
    failed: int = 0
    verification_runs: int = 0
    verification_failed: int = 0

    def count(self, failed: bool, verification: bool) -> None:
        if verification:
            self.verification_runs += 1
            self.verification_failed += int(failed)
        else:
            self.trials += 1
            self.failed += int(failed)


@dataclass
class DeviceFarm:
    """An RPCRunner with one worker per device of ``key`` (at most ``max_devices``), kept in step
    with the tracker. ``measure`` runs a batch on all of them and says who measured what."""

    config: ms.runner.RPCConfig
    evaluator: ms.runner.EvaluatorConfig
    arguments: PackedArguments
    wait: float
    max_devices: int | None = None
    threads: int | None = None  # the devices' TVM runtime threads in every session (None: their default)
    stats: dict[str, DeviceStats] = field(default_factory=dict)  # per device; may be shared with another farm
    verification: bool = False  # its tries are the verification's runs, not search trials
    devices: int = 0  # devices in use for the current batch
    _runner: ms.runner.RPCRunner | None = None

    def _listed(self) -> int:
        listed = len(tracker_devices(self.config.tracker_host, self.config.tracker_port, self.config.tracker_key,
                                     self.wait))
        return listed if self.max_devices is None else min(listed, self.max_devices)

    def refresh(self) -> int:
        """Size the worker pool to the devices the tracker lists now; 0 when none is left."""
        count = self._listed()
        if count and count != self.devices:
            if self._runner is not None:
                self._runner.pool.shutdown(wait=False)
            self._runner = ms.runner.RPCRunner(
                rpc_config=self.config, evaluator_config=self.evaluator,
                f_create_session=self._session(), f_upload_module=RecordingUpload(),
                f_alloc_argument=self.arguments.remote, max_workers=count)
            # RPCRunner waits for its workers without a limit: a device that vanishes without
            # closing the connection would block the tune forever. Bound each candidate by the
            # wait for a device plus one measurement (the worker is killed after it).
            set_pool_timeout(self._runner, 2 * self.wait + 10)
        self.devices = count
        return count

    def _session(self):
        session = TrackerSession(wait=self.wait)
        return session if self.threads is None else RemoteThreads(session, self.threads)

    def measure(self, inputs: list[ms.runner.RunnerInput]) -> list[ms.runner.RunnerResult]:
        """Run ``inputs`` on the farm's devices at once; a candidate whose device was lost is
        measured again (up to ``RETRIES`` times: the tracker may still hand out a device that just
        died). A candidate lost with the last device is a device-unavailable result, as when no
        device was left to start with. Results in input order; ``stats`` counts every try per device."""
        unavailable = ms.runner.RunnerResult(None, f"{DEVICE_UNAVAILABLE}: no device is left under "
                                                   f"{self.config.tracker_key!r}")
        if not self.refresh():
            return [unavailable for _ in inputs]
        results, devices = self._run(inputs)
        for retry in range(RETRIES + 1):
            lost = [i for i, (result, device) in enumerate(zip(results, devices))
                    if result.error_msg is not None and device is not None and _lost(result.error_msg)]
            if not lost or retry == RETRIES:
                break
            if not self.refresh():
                for i in lost:
                    self._count(devices[i], failed=True)
                    results[i], devices[i] = unavailable, None
                break
            again, again_devices = self._run([inputs[i] for i in lost])
            for i, result, device in zip(lost, again, again_devices):
                self._count(devices[i], failed=True)  # the lost try is accounted for, as a failure
                results[i], devices[i] = result, device
        for result, device in zip(results, devices):
            if device is not None:
                self._count(device, failed=result.error_msg is not None)
        return results

    def _run(self, inputs: list[ms.runner.RunnerInput]) -> tuple[list[ms.runner.RunnerResult], list[str | None]]:
        for runner_input in inputs:
            _remove(str(runner_input.artifact_path) + MARKER)
        results = [future.result() for future in self._runner.run(inputs)]
        return results, [_read(str(runner_input.artifact_path) + MARKER) for runner_input in inputs]

    def _count(self, device: str, failed: bool) -> None:
        self.stats.setdefault(device, DeviceStats()).count(failed, self.verification)

    def close(self) -> None:
        if self._runner is not None:
            self._runner.pool.shutdown(wait=False)
            self._runner = None


# TVM's RPC client when the server's end closes mid-call (src/runtime/rpc/rpc_endpoint.cc):
# between two messages the call returns RPCCode 1, kShutdown, which every call checks against
# kReturn ("Check failed: (code == RPCCode::kReturn) is false: code=1", or "code=kShutdown");
# inside a message, "Channel closes before we get needed bytes".
_SESSION_ENDED = re.compile(r"code=(1|kShutdown)\b|Channel closes")


def _lost(error: str) -> bool:
    """Whether a failed measurement lost its device rather than failed on it: the worker was
    killed waiting for it, or the connection broke or was closed by the device's end (a
    candidate's own crash on a phone also ends the session; it then fails once more and counts
    as failed)."""
    return DEVICE_UNAVAILABLE not in error and (_SESSION_ENDED.search(error) is not None or any(
        sign in error for sign in ("Timeout", "connection", "Connection", "socket", "Socket", "closed", "EOF",
                                   "RPCSessionTimeoutError", "Broken pipe", "reset by peer")))


def _read(path: str) -> str | None:
    try:
        with open(path) as marker:
            return marker.read().strip() or None
    except OSError:
        return None


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
