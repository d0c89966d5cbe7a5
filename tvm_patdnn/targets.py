"""Targets by name (``x86``, ``arm_cpu``, ``galaxy-s10``, ``arm_cpu-linux``, ``adreno``) or as TVM target JSON.

The phone presets exist because the right TVM target for a phone is easy to get subtly wrong:
an Android triple (so the library links against Bionic with the NDK), NEON and ARMv8.2
dot-product features, and for the GPU an OpenCL target whose host code is aarch64.
"""

from __future__ import annotations

import copy
import json
import os

import tvm
from tvm.target import Target, codegen

from .errors import PatDNNError

__all__ = [
    "resolve_target",
    "runtime_threads",
    "keep_cpu_pinning",
    "vector_lanes",
    "accumulator_registers",
    "vector_registers",
    "fma_chains",
    "gpu_threads",
    "host_arch",
    "is_aarch64",
    "is_host_runnable",
    "target_arch",
    "PRESETS",
    "TARGET_NAMES",
]

_ARM_FEATURES = ["+neon", "+v8.2a", "+dotprod"]
_ARM_CPU = {
    "kind": "llvm",
    "mtriple": "aarch64-linux-android",
    "mattr": _ARM_FEATURES,
    "keys": ["arm_cpu", "cpu"],
}

# Named phone targets; every value is plain TVM target JSON (what `--target` also accepts).
PRESETS: dict[str, dict] = {
    # Any ARMv8.2 Android phone CPU (Snapdragon 845 and later, Exynos 9810 and later).
    "arm_cpu": _ARM_CPU,
    # Samsung Galaxy S10 (Snapdragon 855): Kryo 485 gold cores are Cortex-A76 derivatives;
    # 4 threads = the 1+3 big cores, where TVM's runtime pins its workers by default.
    "galaxy-s10": {**_ARM_CPU, "mcpu": "cortex-a76", "num-cores": 4},
    # aarch64 GNU/Linux boards (and the emulated phone's own userland); plain ARMv8 NEON.
    "arm_cpu-linux": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "keys": ["arm_cpu", "cpu"]},
    # Adreno GPUs through OpenCL (buffers, not textures); the host code runs on the phone CPU.
    # Adreno 6xx runs waves of 64 fibres and allows 1024 work items per work group.
    "adreno": {
        "kind": "opencl",
        "device": "adreno",
        "max_num_threads": 1024,
        "thread_warp_size": 64,
        "host": _ARM_CPU,
    },
}
TARGET_NAMES = ("x86", *PRESETS)
_SUPPORTED_KINDS = ("llvm", "opencl")


def runtime_threads() -> int:
    """The threads TVM's runtime runs with in this process (and in the processes it starts):
    ``TVM_NUM_THREADS``, else TVM's default for this machine (half the logical CPUs on x86)."""
    return int(tvm.runtime.num_threads())


def keep_cpu_pinning() -> None:
    """Leave the placement of TVM's pool threads to the OS within the CPUs this process may use
    (``taskset``), unless ``TVM_BIND_THREADS`` is set; call it before the pool starts (the first
    kernel run).

    The pool binds its threads to cores 0..N-1 as it starts (``TVM_BIND_THREADS``, on by default).
    With 1 thread that binds the calling thread: under ``taskset -c 1`` a run moved to core 0
    (``sched_getaffinity`` {1} -> {0}), beside whatever ran there, and so did everything the process
    timed after it (a peers run measured tvm_patdnn 861 ms and ORT 1760 ms for 128 and 323 ms).
    With 2 threads on 2 cores it binds the worker to core 1, and every parallel loop then waits until
    the worker gets that core: with other processes on the box (Zen 3 VM, 1.4 cores busy elsewhere),
    VGG-16 CIFAR 8x took a median 24-43 ms bound against 7.9-10 ms unbound (1 thread: 2.5-7.6 ms),
    the bound worker queued for 60-90% of each sample. Unbound, the OS moves both threads where a
    CPU is free, as it does for ONNX Runtime's and OpenMP's threads, which bind nothing by default.
    """
    os.environ.setdefault("TVM_BIND_THREADS", "0")


def _host_target() -> dict:
    """The machine we run on as TVM's runtime runs it: LLVM tuned for the host CPU, as many cores
    as runtime threads, so that ``tune`` (which measures at that count by default) and
    ``compile`` agree on which records apply."""
    return {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": runtime_threads()}


def resolve_target(target: str | dict | Target) -> Target:
    """A :class:`tvm.target.Target` from a name, a JSON string, a dict or a Target."""
    if isinstance(target, Target):
        return _checked(target, str(target))
    if isinstance(target, str):
        name = target.strip()
        if name in ("x86", "host", "llvm"):
            return Target(_host_target())
        if name in PRESETS:
            target = copy.deepcopy(PRESETS[name])
        elif name.startswith("{"):
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
    return _checked(resolved, json.dumps(target))


def _checked(target: Target, text: str) -> Target:
    if target.kind.name not in _SUPPORTED_KINDS:
        raise PatDNNError(
            f"target kind {target.kind.name!r} of {text} is not supported yet "
            f"(supported kinds: {', '.join(_SUPPORTED_KINDS)})"
        )
    if target.kind.name == "opencl" and (target.host is None or target.host.kind.name != "llvm"):
        raise PatDNNError(f"OpenCL target {text} needs an llvm host, e.g. \"host\": {json.dumps(_ARM_CPU)}")
    _check_cpu(_cpu(target), text)
    return target


def _check_cpu(cpu: Target, text: str) -> None:
    """LLVM takes an unknown ``mcpu`` with a flood of "is not a recognized processor" lines and
    builds generic code; say so before anything is built."""
    mcpu = str(cpu.attrs.get("mcpu") or "")
    triple = str(cpu.attrs.get("mtriple") or "") or codegen.llvm_get_system_triple()
    if mcpu and not codegen.llvm_is_valid_cpu(mcpu, triple):
        raise PatDNNError(f"LLVM knows no CPU {mcpu!r} for {triple} (target {text}); `llc -mtriple={triple} "
                          "-mcpu=help` lists them, e.g. znver3, skylake-avx512, cortex-a76")


def _cpu(target: Target) -> Target:
    """The CPU that runs the target's code: the target itself, or an OpenCL target's host."""
    return target if target.kind.name == "llvm" else target.host


def host_arch() -> str:
    """This machine's CPU architecture as LLVM names it (``x86_64``, ``aarch64``)."""
    return codegen.llvm_get_system_triple().split("-")[0]


def target_arch(target: Target) -> str:
    """The CPU architecture the target's (host) code is for: its triple's first part, this
    machine's when the target names no triple."""
    return (str(_cpu(target).attrs.get("mtriple", "")) or codegen.llvm_get_system_triple()).split("-")[0]


def is_aarch64(target: Target) -> bool:
    """Whether the target's (host) code is aarch64, so exporting it needs a cross compiler."""
    return str(_cpu(target).attrs.get("mtriple", "")).startswith(("aarch64", "arm64"))


def is_host_runnable(target: Target) -> bool:
    """Whether this machine can run it (``CompiledModel.run``, ``load``, a local tune): an LLVM
    target for this machine's architecture (the PyPI runtime has no OpenCL device)."""
    return target.kind.name == "llvm" and target_arch(target) == host_arch()


def vector_registers(target: Target) -> int:
    """Architectural vector registers of a CPU target: 32 on AVX-512 and aarch64 (NEON), 16 on
    AVX2/AVX/SSE. Register tiles are sized from it."""
    wide = is_aarch64(target) or codegen.llvm_cpu_has_features(["avx512f"], target)
    return 32 if wide else 16


def accumulator_registers(target: Target) -> int:
    """Output vectors a pattern-conv register tile may accumulate: half the vector register file,
    the rest holding broadcast weights and loaded inputs; 1 on GPUs, where a work item computes
    one output vector."""
    if target.kind.name != "llvm":
        return 1
    return vector_registers(target) // 2


def vector_lanes(target: Target) -> int:
    """fp32 lanes of the target's widest vector unit (AVX-512: 16, AVX2/AVX: 8; NEON, OpenCL float4: 4)."""
    if target.kind.name != "llvm":
        return 4
    if codegen.llvm_cpu_has_features(["avx512f"], target):
        return 16
    if codegen.llvm_cpu_has_features(["avx2"], target) or codegen.llvm_cpu_has_features(["avx"], target):
        return 8
    return 4


def fma_chains(target: Target) -> int:
    """Independent multiply-add chains that keep a CPU target's FMA units busy: the FMA latency (4
    cycles on the x86 and Arm cores we target) times the vector FMAs issued per cycle — 2, but 1 for
    512-bit vectors on Zen 4, which runs them on its two 256-bit units. A register tile with fewer
    accumulators stalls on latency; one with more only grows its panel and its wasted last tile
    (sparse pointwise kernel on Zen 4, 4 zmm accumulators vs 8: 1.2-1.5x faster)."""
    if target.kind.name != "llvm":
        return 1
    if vector_lanes(target) == 16 and str(target.attrs.get("mcpu") or "") == "znver4":
        return 4
    return 8


def gpu_threads(target: Target) -> tuple[int, int]:
    """(wave, largest work group) of a GPU target; a generic OpenCL target reports a wave of 1,
    taken as a 32-wide SIMD."""
    wave = int(target.attrs.get("thread_warp_size", 1))
    return (wave if wave > 1 else 32), int(target.attrs.get("max_num_threads", 256))
