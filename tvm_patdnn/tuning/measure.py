"""Building and timing candidates: the builder's and runners' functions, run in their workers.

* ``build_kernel`` replaces meta_schedule's default build, which imports
  ``tvm.s_tir.tensor_intrin`` (~50 s of CPU, in every fresh builder worker, so builds time out),
  and applies the same post-schedule rewrite of the pattern conv the compiler applies.
* ``LibraryExport`` writes a shared library, cross-linked for aarch64 targets (the default
  writes a .tar that needs a compiler on the device).
* ``PackedArguments`` gives every candidate its real integer arguments (the pattern conv's
  packed channels/offsets/inverse order: random indices crash or time the wrong work) and
  random floats for the rest, locally or through an RPC session.

Sessions with devices (RPCRunner's ``f_create_session``) come from ``tvm_patdnn.rpc``.

This module is imported by the builder/runner worker processes: keep its imports light.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tvm

from ..ops.pattern_conv import is_pattern_conv
from ..schedule_rules.kernel_runs import bound_kernel_runs

__all__ = ["LibraryExport", "PackedArguments", "build_kernel", "finish_schedule", "mean_ms", "short_error",
           "signature"]


def finish_schedule(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """What the compiler does to a scheduled pattern conv after its schedule (kernel-run bounds)."""
    if is_pattern_conv(func):
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
