"""``patdnn bench``: a compiled model's latency on this machine, optionally next to ONNX Runtime.

Percentiles over many single runs, not one mean, because a shared or busy machine makes the
distribution's tail long: p50 is the typical latency, p90/p99 what the slow runs cost. Both
runtimes are timed the same way: warm-up runs, then one call per sample of each runtime's own
entry point with its inputs prepared outside the loop (the VM's ``main`` on TVM tensors,
``InferenceSession.run`` on numpy arrays), timed with ``time.perf_counter_ns``. Not
``CompiledModel.run``: its numpy-to-TVM copies cost ~0.2 ms a call here, which would swamp a small
model.
TVM's thread count is fixed when its runtime starts (``TVM_NUM_THREADS``;
``runtime.config_threadpool`` does not change it in 0.27), so it is read and reported, not set,
and ONNX Runtime (``ORT_ENABLE_ALL``) is given the same number of intra-op threads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import PatDNNError
from .tables import format_table

__all__ = ["KernelRuns", "KernelTime", "Latency", "bench_onnxruntime", "bench_tvm", "format_latencies",
           "format_profile", "kernel_runs", "profile_kernels", "time_calls"]


@dataclass(frozen=True)
class Latency:
    """Per-run times of one runtime, in milliseconds."""

    runtime: str
    threads: int
    times_ms: tuple[float, ...]

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.times_ms, q))


def time_calls(call: Callable[[], object], runs: int, warmup: int) -> tuple[float, ...]:
    """``warmup`` untimed calls, then the time of each of ``runs`` calls in ms."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        call()
        times.append((time.perf_counter_ns() - start) / 1e6)
    return tuple(times)


def bench_tvm(model, inputs: dict[str, np.ndarray], runs: int, warmup: int) -> tuple[Latency, list[np.ndarray]]:
    """Time ``model.vm["main"]`` (``model`` a ``CompiledModel``) on inputs already in TVM tensors;
    also returns the model's outputs for checking."""
    import tvm

    from .frontend import check_inputs

    outputs = model.run(inputs)
    main = model.vm["main"]
    args = [tvm.runtime.tensor(a) for a in check_inputs(model, inputs)]
    times = time_calls(lambda: main(*args), runs, warmup)
    return Latency("tvm_patdnn", tvm.runtime.num_threads(), times), outputs


def bench_onnxruntime(onnx_path: str | Path, inputs: dict[str, np.ndarray], threads: int, runs: int,
                      warmup: int) -> tuple[Latency, list[np.ndarray]]:
    """Time ONNX Runtime's CPU provider with all graph optimisations and ``threads`` intra-op threads."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise PatDNNError("--ort needs onnxruntime: pip install -e '.[bench]'") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    outputs = [np.asarray(o) for o in session.run(None, inputs)]
    times = time_calls(lambda: session.run(None, inputs), runs, warmup)
    return Latency("onnxruntime", threads, times), outputs


def format_latencies(latencies: list[Latency]) -> str:
    """One line per runtime: threads, p50/p90/p99, mean, min; with two, the p50 ratio."""
    rows = [[lat.runtime, str(lat.threads), str(len(lat.times_ms)),
             *(f"{ms:.4f}" for ms in (lat.percentile(50), lat.percentile(90), lat.percentile(99),
                                      np.mean(lat.times_ms), min(lat.times_ms)))] for lat in latencies]
    lines = [format_table(["runtime", "threads", "runs", "p50 ms", "p90 ms", "p99 ms", "mean ms", "min ms"], rows,
                          align="<>>>>>>>")]
    if len(latencies) == 2:
        ours, theirs = latencies
        lines.append(f"p50: {ours.runtime} is {theirs.percentile(50) / ours.percentile(50):.2f}x as fast as {theirs.runtime}")
    return "\n".join(lines)


@dataclass(frozen=True)
class KernelTime:
    """Where one compiled kernel's share of an inference goes: a PrimFunc (``dense_conv``,
    ``pattern_conv2d_<layer>``, ``fused_matmul_add``...) or a VM builtin, summed over its calls."""

    kernel: str
    calls: int  # per inference
    ms: float  # per inference, mean over the profiled runs
    shapes: str  # argument shapes of its first call, outputs last


@dataclass(frozen=True)
class KernelRuns:
    """One kernel's time in each profiled inference (:func:`kernel_runs`), summed over its calls."""

    kernel: str
    calls: int  # per inference
    ms: tuple[float, ...]  # one per inference
    shapes: str  # argument shapes of its first call, outputs last


def kernel_runs(model, inputs: dict[str, np.ndarray], runs: int = 10, warmup: int = 2) -> list[KernelRuns]:
    """Each compiled kernel's (and VM builtin's) ms in every one of ``runs`` inferences of ``model``
    (a ``CompiledModel``), in the order of their first call: the distribution, not only the mean,
    because at 2 threads one kernel's samples spread over several times its fastest.

    Relax's VM in TVM 0.27 has no profiler; its instrument hook is called before and after every
    packed call, so the time between the two is the kernel's (the hook's own cost, a Python call,
    is ~1 µs a kernel: negligible against conv kernels, visible on tiny elementwise ones).
    """
    import tvm

    from .frontend import check_inputs

    if runs < 1 or warmup < 0:
        raise PatDNNError(f"profiling needs at least 1 run and 0 warm-up runs, got {runs} and {warmup}")
    main = model.vm["main"]
    args = [tvm.runtime.tensor(a) for a in check_inputs(model, inputs)]
    totals: dict[str, list] = {}  # kernel -> [calls, seconds per run, shapes]
    started: list[float] = []
    run = 0

    def instrument(_func, name, before_run, _ret, *call_args) -> int:
        if before_run:
            started.append(time.perf_counter())
            return 0
        elapsed = time.perf_counter() - started.pop()
        entry = totals.setdefault(str(name), [0, [0.0] * runs, None])
        entry[0] += 1
        entry[1][run] += elapsed
        if entry[2] is None:
            entry[2] = " ".join("x".join(map(str, a.shape)) for a in call_args if hasattr(a, "shape"))
        return 0

    for _ in range(warmup):
        main(*args)
    model.vm.set_instrument(instrument)
    try:
        for run in range(runs):  # the instrument adds to this run's times
            main(*args)
    finally:
        model.vm.set_instrument(lambda *_: 0)
    return [KernelRuns(name, calls // runs, tuple(s * 1e3 for s in seconds), shapes or "")
            for name, (calls, seconds, shapes) in totals.items()]


def profile_kernels(model, inputs: dict[str, np.ndarray], runs: int = 10, warmup: int = 2) -> list[KernelTime]:
    """Per-kernel mean times of ``model`` (a ``CompiledModel``) over ``runs`` inferences, largest
    first (:func:`kernel_runs`)."""
    kernels = [KernelTime(k.kernel, k.calls, float(np.mean(k.ms)), k.shapes)
               for k in kernel_runs(model, inputs, runs, warmup)]
    return sorted(kernels, key=lambda k: -k.ms)


def format_profile(kernels: list[KernelTime], top: int = 25) -> str:
    """The ``top`` kernels with their share of the summed kernel time; the VM's builtins as one line."""
    builtin = [k for k in kernels if k.kernel.startswith("vm.builtin.")]
    compiled = [k for k in kernels if not k.kernel.startswith("vm.builtin.")]
    total = sum(k.ms for k in kernels) or 1.0

    def row(name: str, group: list[KernelTime], shapes: str = "") -> list[str]:
        ms = sum(k.ms for k in group)
        return [name, str(sum(k.calls for k in group)), f"{ms:.3f}", f"{ms / total:.1%}", shapes]

    rows = [row(k.kernel[:40], [k], k.shapes) for k in compiled[:top]]
    if compiled[top:]:
        rows.append(row(f"{len(compiled) - top} more kernels", compiled[top:]))
    if builtin:
        rows.append(row("VM builtins (allocation, reshape, checks)", builtin))
    rows.append([*row("total", kernels)[:3], "", ""])
    return format_table(["kernel", "calls", "ms", "share", "shapes (output last)"], rows, align="<>>>")
