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

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import PatDNNError

__all__ = ["KernelTime", "Latency", "add_bench_command", "bench_onnxruntime", "bench_tvm", "format_latencies",
           "format_profile", "profile_kernels", "time_calls"]


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

    from .compiler import check_inputs

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
    header = f"{'runtime':<12} {'threads':>7} {'runs':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'mean ms':>9} {'min ms':>9}"
    lines = [header]
    for lat in latencies:
        lines.append(f"{lat.runtime:<12} {lat.threads:>7} {len(lat.times_ms):>5} {lat.percentile(50):>9.4f} "
                     f"{lat.percentile(90):>9.4f} {lat.percentile(99):>9.4f} {np.mean(lat.times_ms):>9.4f} "
                     f"{min(lat.times_ms):>9.4f}")
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


def profile_kernels(model, inputs: dict[str, np.ndarray], runs: int = 10, warmup: int = 2) -> list[KernelTime]:
    """Per-kernel times of ``model`` (a ``CompiledModel``), largest first.

    Relax's VM in TVM 0.27 has no profiler; its instrument hook is called before and after every
    packed call, so the time between the two is the kernel's (the hook's own cost, a Python call,
    is ~1 µs a kernel: negligible against conv kernels, visible on tiny elementwise ones).
    """
    import tvm

    from .compiler import check_inputs

    if runs < 1 or warmup < 0:
        raise PatDNNError(f"profiling needs at least 1 run and 0 warm-up runs, got {runs} and {warmup}")
    main = model.vm["main"]
    args = [tvm.runtime.tensor(a) for a in check_inputs(model, inputs)]
    totals: dict[str, list] = {}  # kernel -> [calls, seconds, shapes]
    started: list[float] = []

    def instrument(_func, name, before_run, _ret, *call_args) -> int:
        if before_run:
            started.append(time.perf_counter())
            return 0
        elapsed = time.perf_counter() - started.pop()
        entry = totals.setdefault(str(name), [0, 0.0, None])
        entry[0] += 1
        entry[1] += elapsed
        if entry[2] is None:
            entry[2] = " ".join("x".join(map(str, a.shape)) for a in call_args if hasattr(a, "shape"))
        return 0

    for _ in range(warmup):
        main(*args)
    model.vm.set_instrument(instrument)
    try:
        for _ in range(runs):
            main(*args)
    finally:
        model.vm.set_instrument(lambda *_: 0)
    kernels = [KernelTime(name, calls // runs, seconds * 1e3 / runs, shapes or "")
               for name, (calls, seconds, shapes) in totals.items()]
    return sorted(kernels, key=lambda k: -k.ms)


def format_profile(kernels: list[KernelTime], top: int = 25) -> str:
    """The ``top`` kernels with their share of the summed kernel time; the VM's builtins as one line."""
    builtin = [k for k in kernels if k.kernel.startswith("vm.builtin.")]
    compiled = [k for k in kernels if not k.kernel.startswith("vm.builtin.")]
    total = sum(k.ms for k in kernels) or 1.0
    lines = [f"{'kernel':<40} {'calls':>5} {'ms':>9} {'share':>6}  shapes (output last)"]
    for k in compiled[:top]:
        lines.append(f"{k.kernel[:40]:<40} {k.calls:>5} {k.ms:>9.3f} {k.ms / total:>6.1%}  {k.shapes}")
    if compiled[top:]:
        lines.append(f"{f'{len(compiled) - top} more kernels':<40} {sum(k.calls for k in compiled[top:]):>5} "
                     f"{sum(k.ms for k in compiled[top:]):>9.3f} {sum(k.ms for k in compiled[top:]) / total:>6.1%}")
    if builtin:
        lines.append(f"{'VM builtins (allocation, reshape, checks)':<40} {sum(k.calls for k in builtin):>5} "
                     f"{sum(k.ms for k in builtin):>9.3f} {sum(k.ms for k in builtin) / total:>6.1%}")
    lines.append(f"{'total':<40} {sum(k.calls for k in kernels):>5} {total:>9.3f}")
    return "\n".join(lines)


def add_bench_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``patdnn bench`` (handler in ``func``)."""
    from .cli import TARGET_HELP, _input_shape, add_target_option

    parser = subparsers.add_parser(
        "bench",
        help="latency percentiles of a compiled library or ONNX model on this CPU (optionally vs ONNX Runtime)",
        description=(
            "Time MODEL (a library written by `patdnn compile`, or an ONNX model, compiled first) on this "
            "machine: warm-up runs, then p50/p90/p99 over --runs single runs, with random inputs of the model's "
            "shapes. TVM's thread count is fixed when its runtime starts: set TVM_NUM_THREADS to change it. "
            "--ort times ONNX Runtime (ORT_ENABLE_ALL, as many threads) on the same inputs, after checking that "
            "both compute the same outputs."
        ),
    )
    parser.add_argument("model", help="compiled library (.so with its .so.json) or ONNX model (.onnx)")
    parser.add_argument("--input-shape", type=_input_shape, action="append", default=[], metavar="NAME=DIMS",
                        help="ONNX model only: static shape for an input with dynamic dimensions (repeatable)")
    add_target_option(parser, "x86", "ONNX model only: " + TARGET_HELP)
    parser.add_argument("--tuning-db", metavar="DIR", help="ONNX model only: apply the records of `patdnn tune --db DIR`")
    parser.add_argument("--runs", type=int, default=100, help="timed runs")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs first")
    parser.add_argument("--ort", action="store_true", help="also time ONNX Runtime (ONNX model only)")
    parser.add_argument("--profile", action="store_true",
                        help="also print where the time goes: each compiled kernel's ms per inference and share")
    parser.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from .compiler import compile as compile_model
    from .compiler import load
    from .phone.deploy import relative_error

    if args.runs < 1 or args.warmup < 0:
        raise PatDNNError(f"--runs must be at least 1 and --warmup at least 0, got {args.runs} and {args.warmup}")
    is_onnx = Path(args.model).suffix == ".onnx"
    if not is_onnx and (args.ort or args.input_shape or args.tuning_db):
        raise PatDNNError("--ort, --input-shape and --tuning-db need an ONNX model; a library is timed as compiled")
    if is_onnx:
        model = compile_model(args.model, args.target, input_shapes=dict(args.input_shape), tuning_db=args.tuning_db)
    else:
        model = load(args.model)
    rng = np.random.default_rng(0)
    inputs = {n: rng.standard_normal(model.input_shapes[n]).astype(model.input_dtypes[n]) for n in model.input_names}
    shapes = ", ".join(f"{n} {'x'.join(map(str, model.input_shapes[n]))} {model.input_dtypes[n]}" for n in model.input_names)
    print(f"{args.model}: {model.target}; inputs {shapes}")
    ours, outputs = bench_tvm(model, inputs, args.runs, args.warmup)
    latencies = [ours]
    if args.ort:
        theirs, reference = bench_onnxruntime(args.model, inputs, ours.threads, args.runs, args.warmup)
        errors = [relative_error(a, e) for a, e in zip(outputs, reference)]
        if len(outputs) != len(reference) or max(errors) > 1e-3:
            raise PatDNNError(f"tvm_patdnn and ONNX Runtime outputs differ (relative errors {errors}): not timing them side by side")
        print(f"outputs agree with ONNX Runtime (max relative error {max(errors):.1e})")
        latencies.append(theirs)
    print(format_latencies(latencies))
    if args.profile:
        print(format_profile(profile_kernels(model, inputs, runs=max(1, min(args.runs, 20)), warmup=1)))
    return 0
