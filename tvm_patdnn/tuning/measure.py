"""Building and timing candidates: the builder's and runners' functions, run in their workers.

* ``build_kernel`` replaces meta_schedule's default build, which imports
  ``tvm.s_tir.tensor_intrin`` (~50 s of CPU, in every fresh builder worker, so builds time out),
  and applies the same post-schedule rewrite of the pattern conv the compiler applies.
* ``LibraryExport`` writes a shared library, cross-linked for aarch64 targets (the default
  writes a .tar that needs a compiler on the device).
* ``PackedArguments`` gives every candidate its real integer arguments (the pattern conv's
  packed channels/offsets/inverse order: random indices crash or time the wrong work) and
  random floats for the rest, locally or through an RPC session.
* ``TrackerSession`` replaces RPCRunner's session request, which waits for the device forever
  once it is gone; this one gives up after a while with a :data:`DEVICE_UNAVAILABLE` error.
* ``check_tracker`` asks a tracker what it serves, and ``call_with_deadline`` bounds any
  blocking RPC step: TVM's own tracker and device handshakes wait forever on a peer that
  accepts a connection and never answers.

This module is imported by the builder/runner worker processes: keep its imports light.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tvm

from ..ops.pattern_conv import PATTERN_CONV_ATTR
from ..schedule_rules.kernel_runs import bound_kernel_runs
from ..tvm_compat import TrackerCode, recvjson, sendjson, tracker_handshake

__all__ = ["DEVICE_UNAVAILABLE", "LibraryExport", "PackedArguments", "TrackerSession", "build_kernel",
           "call_with_deadline", "check_tracker", "finish_schedule", "mean_ms", "short_error", "signature",
           "tracker_devices"]

# Starts the error of a measurement that never reached the device (no session): the tuner ends
# the tune on it instead of waiting again for every remaining candidate.
DEVICE_UNAVAILABLE = "device unavailable"


def finish_schedule(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """What the compiler does to a scheduled pattern conv after its schedule (kernel-run bounds)."""
    if func.attrs is not None and PATTERN_CONV_ATTR in func.attrs:
        return bound_kernel_runs(func)
    return func


def mean_ms(run_secs) -> float | None:
    """A runner result's mean time in ms; None when it has none (1e10 s marks a failed run)."""
    if not run_secs:
        return None
    seconds = [float(s) for s in run_secs]
    return None if max(seconds) >= 1e9 else float(np.mean(seconds)) * 1e3


def short_error(message: str | None) -> str:
    """The line of a runner's error that says what happened (its last one, after any traceback)."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    text = lines[-1] if lines else "no run time measured"
    return text if len(text) <= 300 else text[:297] + "..."


def build_kernel(mod: tvm.IRModule, target: tvm.target.Target, _params=None) -> tvm.runtime.Module:
    """meta_schedule ``f_build``: one scheduled workload to a runtime module."""
    return tvm.tirx.build(tvm.IRModule({"main": finish_schedule(mod["main"])}), target=target)


@dataclass(frozen=True)
class LibraryExport:
    """meta_schedule ``f_export``: the module as a .so (``fcompile`` links it for the device),
    in a fresh folder under ``directory`` (the tune's scratch folder, removed at its end)."""

    fcompile: Callable | None = None
    directory: str | None = None

    def __call__(self, module: tvm.runtime.Module) -> str:
        path = os.path.join(tempfile.mkdtemp(prefix="kernel-", dir=self.directory), "kernel.so")
        if self.fcompile is None:
            module.export_library(path)
        else:
            module.export_library(path, fcompile=self.fcompile)
        return path


def signature(args_info: list) -> str:
    """A key for a function's parameters (all a runner knows about the function it times)."""
    return ";".join(f"{dtype}{list(shape)}" for _kind, dtype, shape in args_info)


def _key(sig: str, position: int) -> str:
    return f"{hashlib.sha1(sig.encode()).hexdigest()[:20]}_{position}"


@dataclass(frozen=True)
class PackedArguments:
    """Runner ``f_alloc_argument``: real integer constants by function signature, random floats.

    Runners see only a candidate's parameter shapes, so the constants are keyed by the
    signature; functions with equal signatures get the same arrays, which are valid for each of
    them (same channel count, kernel count and filters). The arrays live in an .npz file so the
    workers receive a path, not megabytes of pickled arrays per call.
    """

    path: str

    @staticmethod
    def write(path: str, constants: dict[str, dict[int, np.ndarray]]) -> PackedArguments:
        arrays = {_key(sig, pos): arr for sig, by_pos in constants.items() for pos, arr in by_pos.items()}
        np.savez(path, **arrays)
        return PackedArguments(path)

    def arrays(self, args_info: list) -> list[np.ndarray]:
        sig = signature(args_info)
        rng = np.random.default_rng(0)
        with np.load(self.path) as stored:
            result = []
            for position, (_kind, dtype, shape) in enumerate(args_info):
                key = _key(sig, position)
                if key in stored:
                    result.append(stored[key])
                elif np.dtype(dtype).kind in "iu":
                    result.append(np.zeros(shape, dtype))  # an index no function can overrun
                else:
                    result.append(rng.standard_normal(shape).astype(dtype))
        return result

    def local(self, device, args_info: list, alloc_repeat: int) -> list[list]:
        return [[tvm.runtime.tensor(a, device) for a in self.arrays(args_info)] for _ in range(alloc_repeat)]

    def remote(self, _session, device, args_info: list, alloc_repeat: int) -> list[list]:
        return self.local(device, args_info, alloc_repeat)


def call_with_deadline(call: Callable, seconds: float, what: str):
    """``call()``, or TimeoutError naming ``what`` once ``seconds`` have passed without an answer.

    TVM's RPC handshakes and remote calls block in C++ without a time limit, so the call runs in
    a daemon thread; one that never returns is abandoned (it ends with the process)."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as err:  # noqa: BLE001 - handed back to the caller's thread
            outcome["error"] = err

    worker = threading.Thread(target=run, name=f"patdnn: {what}", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError(f"{what} did not answer within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _tracker_call(host: str, port: int, request: list, timeout: float):
    """One request to an RPC tracker over a fresh connection, every step within ``timeout``."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        tracker_handshake(sock, f"{host}:{port}")
        sendjson(sock, request)
        return recvjson(sock)


def _tracker_summary(host: str, port: int, timeout: float) -> dict:
    try:
        reply = _tracker_call(host, port, [TrackerCode.SUMMARY], timeout)
    except TimeoutError:
        raise RuntimeError(f"no TVM RPC tracker answers at {host}:{port} within {timeout:g} s") from None
    except (OSError, RuntimeError, struct.error, ValueError) as err:
        raise RuntimeError(f"no TVM RPC tracker answers at {host}:{port}: {err}") from None
    if not isinstance(reply, list) or reply[0] != TrackerCode.SUCCESS or not isinstance(reply[1], dict):
        raise RuntimeError(f"{host}:{port} does not answer like a TVM RPC tracker: {reply!r}")
    return reply[1]


def tracker_devices(host: str, port: int, key: str, timeout: float) -> list[str]:
    """``host:port`` of every device (RPC server) registered under ``key``, free or busy."""
    servers = _tracker_summary(host, port, timeout).get("server_info", [])
    return sorted(f"{s['addr'][0]}:{s['addr'][1]}" for s in servers
                  if str(s.get("key", "")).split(":")[-1] == key and len(s.get("addr") or ()) == 2)


def check_tracker(host: str, port: int, key: str, timeout: float) -> None:
    """RuntimeError in plain words unless a tracker answers at ``host:port`` within ``timeout``
    and has a device under ``key`` (registered, or already asked for by another client)."""
    summary = _tracker_summary(host, port, timeout)
    keys = {str(server.get("key", "")).split(":")[-1] for server in summary.get("server_info", [])}
    keys = (keys | set(summary.get("queue_info", {}))) - {""}
    if key not in keys:
        raise RuntimeError(
            f"no device registered under key {key!r} at tracker {host}:{port} "
            f"(registered keys: {', '.join(sorted(keys)) or 'none'}); start one with "
            f"`patdnn phone-emulator --tracker {host}:{port} --key {key}` or the TVM RPC app"
        )


@dataclass(frozen=True)
class TrackerSession:
    """RPCRunner ``f_create_session``: a session on the tracker's device, waiting at most ``wait`` s.

    TVM's ``TrackerSession.request`` blocks until the tracker hands out a device under the key,
    which with the device gone (killed, unplugged) is never. This sends the same REQUEST but
    gives up after ``wait`` seconds; closing the connection withdraws the request (the tracker
    skips requests whose connection is closed). The device's own handshake is bounded by
    ``wait`` too. Every way of not getting a session raises a RuntimeError starting with
    :data:`DEVICE_UNAVAILABLE`.
    """

    wait: float

    def __call__(self, config):
        from tvm import rpc

        host, port, key = config.tracker_host, int(config.tracker_port), config.tracker_key
        where = f"{key!r} of the RPC tracker {host}:{port}"
        try:
            with socket.create_connection((host, port), timeout=self.wait) as sock:
                tracker_handshake(sock, f"{host}:{port}")
                sendjson(sock, [TrackerCode.REQUEST, key, "", config.session_priority])
                reply = recvjson(sock)
        except TimeoutError:
            raise RuntimeError(f"{DEVICE_UNAVAILABLE}: no device {where} became free within "
                               f"{self.wait:g} s (it stopped, or another client holds it)") from None
        except (OSError, RuntimeError, struct.error, ValueError) as err:
            raise RuntimeError(f"{DEVICE_UNAVAILABLE}: cannot request {where}: {err}") from None
        if not isinstance(reply, list) or reply[0] != TrackerCode.SUCCESS:
            raise RuntimeError(f"{DEVICE_UNAVAILABLE}: the tracker refused the request for {where}: {reply}")
        url, server_port, matchkey = reply[1]
        try:
            session = call_with_deadline(lambda: rpc.connect(url, server_port, matchkey, config.session_timeout_sec),
                                         self.wait, f"the device's RPC server {url}:{server_port}")
            session.patdnn_device = f"{url}:{server_port}"  # which device measured (tuning.farm)
            return session
        except Exception as err:  # noqa: BLE001 (any TVM/socket error: the tracker listed a server that is gone)
            last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise RuntimeError(f"{DEVICE_UNAVAILABLE}: the device {where} (server {url}:{server_port}) "
                               f"does not answer: {last}") from None
