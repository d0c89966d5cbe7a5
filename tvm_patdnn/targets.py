"""Targets by name (``x86``, later ``arm_cpu`` and ``adreno``) or as TVM target JSON."""

from __future__ import annotations

import json
import os

import tvm
from tvm.target import Target, codegen

from .errors import PatDNNError

__all__ = ["resolve_target", "vector_lanes", "TARGET_NAMES"]

TARGET_NAMES = ("x86", "arm_cpu", "adreno")
_NOT_YET = {
    "arm_cpu": "phone CPU targets (arm_cpu) are not supported yet: they land with the phone deployment work",
    "adreno": "the Adreno OpenCL target is not supported yet: it lands with the phone deployment work",
}


def _host_target() -> dict:
    """The machine we run on: LLVM tuned for the host CPU, one thread per core."""
    return {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": os.cpu_count() or 1}


def resolve_target(target: str | dict | Target) -> Target:
    """A :class:`tvm.target.Target` from a name, a JSON string, a dict or a Target."""
    if isinstance(target, Target):
        return target
    if isinstance(target, str):
        name = target.strip()
        if name in ("x86", "host", "llvm"):
            return Target(_host_target())
        if name in _NOT_YET:
            raise PatDNNError(_NOT_YET[name])
        if name.startswith("{"):
            try:
                target = json.loads(name)
            except json.JSONDecodeError as err:
                raise PatDNNError(f"target JSON is not valid JSON: {err}") from None
        else:
            raise PatDNNError(
                f"unknown target {name!r}: use one of {', '.join(TARGET_NAMES)} or a TVM target JSON "
                'such as \'{"kind":"llvm","mcpu":"znver3"}\''
            )
    if not isinstance(target, dict):
        raise PatDNNError(f"a target is a name, a JSON string or a dict, not {type(target).__name__}")
    try:
        resolved = Target(target)
    except (RuntimeError, ValueError, TypeError, KeyError) as err:
        raise PatDNNError(f"TVM does not accept target {json.dumps(target)}: {str(err).splitlines()[-1]}") from None
    if resolved.kind.name != "llvm":
        raise PatDNNError(f"target kind {resolved.kind.name!r} is not supported yet (only llvm CPU targets)")
    return resolved


def vector_lanes(target: Target) -> int:
    """fp32 lanes of the target's widest vector unit (AVX-512: 16, AVX2/AVX: 8, else 4)."""
    if target.kind.name != "llvm":
        return 4
    if codegen.llvm_cpu_has_features(["avx512f"], target):
        return 16
    if codegen.llvm_cpu_has_features(["avx2"], target) or codegen.llvm_cpu_has_features(["avx"], target):
        return 8
    return 4
