"""Deploy a model to a device behind a TVM RPC tracker: upload, run, check, time.

The check against ``onnx.reference`` runs on every deployment because a library that loads
and runs on a phone can still compute garbage (wrong target features, a miscompiled
schedule); the latency comes from TVM's ``time_evaluator`` on the device itself.
"""

from __future__ import annotations

import functools
import gc
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..errors import PatDNNError
from ..fileio import load_onnx_model
from ..rpc import call_with_deadline, check_tracker, parse_address, request_session
from ..verify import DEFAULT_RTOL, onnx_reference, relative_error

__all__ = ["DeployResult", "deploy"]

EMULATOR_NOTE = (
    "note: this device is the emulated phone (qemu-user on this machine): its timings are "
    "20-50x slower than a phone's and are not phone timings"
)


@dataclass
class DeployResult:
    """What a deployment measured; ``ok`` when every output matches the ONNX reference."""

    outputs: list[np.ndarray]
    reference: list[np.ndarray]
    errors: list[float]  # per output: max |actual - expected| / max |expected|
    rtol: float
    latency_ms: list[float]  # one mean per repeat, from time_evaluator on the device
    target: str
    key: str
    emulated: bool
    threads: int  # the TVM runtime threads the device ran the model with

    @property
    def ok(self) -> bool:
        return all(e <= self.rtol for e in self.errors)

    def summary(self) -> str:
        from ..tuning.threads import describe

        verdict = "match" if self.ok else "DIFFER from"
        errors = ", ".join(f"{e:.2e}" for e in self.errors)
        lines = [
            f"outputs {verdict} the ONNX reference (relative error {errors}; tolerance {self.rtol:g})",
            f"remote latency on {self.key!r} ({describe(self.threads)}): {np.mean(self.latency_ms):.3f} ms mean, "
            f"{np.min(self.latency_ms):.3f} ms best of {len(self.latency_ms)} repeats",
        ]
        if self.emulated:
            lines.append(EMULATOR_NOTE)
        return "\n".join(lines)


def deploy(
    model: str | os.PathLike | onnx.ModelProto,
    target: str | dict = "arm_cpu",
    *,
    tracker: str | tuple[str, int] = ("127.0.0.1", 9190),
    key: str = "android",
    library: str | os.PathLike | None = None,
    inputs: dict[str, np.ndarray] | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    entries: int = 4,
    max_patterns: int = 12,
    tuning_db: str | os.PathLike | None = None,
    threads: int | None = None,
    rtol: float = DEFAULT_RTOL,
    number: int = 5,
    repeat: int = 3,
    session_timeout: float = 600,
    timeout: float = 60,
) -> DeployResult:
    """Compile ``model`` for ``target`` (or take the compiled ``library``), run it on a device
    of ``key`` behind ``tracker``, compare with ``onnx.reference`` and time it there.

    ``tuning_db`` is a ``tvm_patdnn.tune`` database for the device (e.g. measured on it with
    ``patdnn tune --rpc``); None uses the schedules shipped for the target, if any.
    ``threads``: the device's TVM runtime runs the model with that many threads, and the model is
    compiled for them (records tuned with ``tune(threads=N)`` apply to ``threads=N`` only); None
    leaves the device's own count and compiles for the target's ``num-cores``.
    ``inputs`` default to seeded standard-normal arrays of the model's input shapes. A device
    that does not become free within ``timeout`` seconds (gone, or busy) is an error, as is a
    tracker or device handshake that takes longer, or a session longer than ``session_timeout``.
    """
    for name, value in (("timeout", timeout), ("session_timeout", session_timeout)):
        if not value > 0:
            raise PatDNNError(f"{name} must be a positive number of seconds, got {value!r}")
    for name, value in (("number", number), ("repeat", repeat)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PatDNNError(f"{name} must be a positive integer, got {value!r}")
    if not rtol >= 0:
        raise PatDNNError(f"rtol must be a non-negative number, got {rtol!r}")
    if library is not None and tuning_db is not None:
        raise PatDNNError("a tuning database applies when compiling: give it to `patdnn compile` for the library, "
                          "or deploy the ONNX model without --so")
    from ..compiler import compile as compile_model
    from ..export import check_library_machine
    from ..frontend import check_inputs, load_model, seeded_inputs
    from ..targets import resolve_target
    from ..tuning.threads import check_threads

    threads = check_threads(threads)
    proto = load_onnx_model(model)
    resolved = resolve_target(target)
    host, port = parse_address(tracker) if isinstance(tracker, str) else tracker
    try:  # before compiling: fail fast on a wrong address or key
        check_tracker(host, port, key, timeout)
    except RuntimeError as err:
        raise PatDNNError(str(err)) from None
    with tempfile.TemporaryDirectory(prefix="patdnn-deploy-") as workdir:
        if library is None:
            compiled = compile_model(proto, resolved, input_shapes=input_shapes, entries=entries,
                                     max_patterns=max_patterns, tuning_db=tuning_db, threads=threads)
            signature = compiled
            path = compiled.export_library(Path(workdir) / "patdnn_model.so")
        else:
            path = Path(library)
            if not path.is_file():
                raise PatDNNError(f"compiled library {path} does not exist or is not a file")
            name = target if isinstance(target, str) else "TARGET"
            check_library_machine(path, resolved, remedy=(
                f"it was compiled for another target. Compile it for this one (`patdnn compile MODEL --target {name} "
                "-o LIB`), or deploy with the --target it was compiled for"))
            signature = load_model(proto, input_shapes=input_shapes)
        arrays = check_inputs(signature, seeded_inputs(signature) if inputs is None else inputs)
        reference = onnx_reference(proto, dict(zip(signature.input_names, arrays)))
        outputs, latency, emulated, running = _run_remote(path, resolved, host, port, key, arrays, threads, number,
                                                          repeat, session_timeout, timeout)
    if len(outputs) != len(reference):
        raise PatDNNError(f"the library returned {len(outputs)} outputs, the ONNX model has {len(reference)}: "
                          "is the library compiled from this model?")
    errors = [relative_error(a, e) for a, e in zip(outputs, reference)]
    return DeployResult(outputs, reference, errors, rtol, latency, str(resolved), key, emulated, running)


def _run_remote(path: Path, target, host: str, port: int, key: str, arrays: list[np.ndarray], threads: int | None,
                number: int, repeat: int, session_timeout: float,
                timeout: float) -> tuple[list[np.ndarray], list[float], bool, int]:
    """Upload, run once, time. Errors are raised only after the session's frame is gone, so
    that no traceback keeps a remote object alive: the device returns to the tracker at once
    instead of at ``session_timeout``."""
    try:  # not TVM's tracker.request, which waits forever for a device that has gone away
        remote = request_session(host, port, key, wait=timeout, session_timeout=session_timeout)
    except RuntimeError as err:
        raise PatDNNError(f"the tracker gave no session on {key!r}: {err}") from None
    problem = None
    try:  # a device that stops answering mid-session would block TVM's calls forever
        session_run = functools.partial(_session_run, remote, path, target, key, arrays, threads, number, repeat)
        outcome = call_with_deadline(session_run, session_timeout, f"the device {key!r}")
    except PatDNNError as err:
        problem = str(err)
    except TimeoutError as err:
        problem = f"{err} (--session-timeout): upload, run and timing did not finish"
    except (RuntimeError, OSError) as err:  # TVM's errors (tvm.error.*) are RuntimeErrors
        problem = f"running the model on {key!r} failed: {str(err).strip().splitlines()[-1]}"
    del remote, session_run
    gc.collect()
    if problem is not None:
        raise PatDNNError(problem)
    return outcome


def _session_run(remote, path: Path, target, key: str, arrays: list[np.ndarray], threads: int | None, number: int,
                 repeat: int) -> tuple[list[np.ndarray], list[float], bool, int]:
    import tvm
    from tvm import relax

    from ..tuning.threads import set_remote_threads
    from .emulator import WORKDIR_PREFIX

    workdir = Path(remote.get_function("tvm.rpc.server.workpath")("x")).parent
    emulated = workdir.name.startswith(WORKDIR_PREFIX)
    dev = remote.cl(0) if target.kind.name == "opencl" else remote.cpu(0)
    if not dev.exist:
        raise PatDNNError(f"the device {key!r} has no {target.kind.name} runtime"
                          + (" (the emulated phone has none: verify Adreno kernels with PoCL instead)" if emulated else ""))
    running = set_remote_threads(remote, threads)
    remote.upload(str(path), "patdnn_model.so")
    vm = relax.VirtualMachine(remote.load_module("patdnn_model.so"), dev)
    args = [tvm.runtime.tensor(a, dev) for a in arrays]
    result = vm["main"](*args)
    results = list(result) if isinstance(result, (tvm.ir.Array, list, tuple)) else [result]
    outputs = [r.numpy() for r in results]
    latency = [float(t) * 1e3 for t in vm.time_evaluator("main", dev, number=number, repeat=repeat)(*args).results]
    return outputs, latency, emulated, running
