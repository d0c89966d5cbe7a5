"""The small-image pattern kernels against the TE operator, per layer and on the whole model.

VGG-16 CIFAR 8x's pattern layers with 2x2 and 4x4 outputs are built twice for the AVX2 target
(``mcpu=znver3``, the host's cores; ``--host``: the host CPU, AVX-512 where it has it): with the
hand-built kernel :class:`PatternConvRewrite` routes
them to (2x2: :mod:`tvm_patdnn.ops.pattern_conv_2x2`, 4x4: :mod:`tvm_patdnn.ops.pattern_conv_shifted_rows`)
and with the TE operator and the default schedule rule (2x2: flat, 4x4: windows). Each build is
checked against numpy, then timed in interleaved rounds: at 1 thread in process CPU time, at more
in wall time; "% peak" is the nonzero GFLOP/s against the FMA peak measured in the same run. TVM's
thread count is fixed when its runtime starts (one process per count):

    taskset -c 1 env TVM_NUM_THREADS=1 .venv/bin/python -m benchmarks.small_images [--rounds 9]
    env TVM_NUM_THREADS=2 .venv/bin/python -m benchmarks.small_images --rounds 9

``--whole`` times the whole pruned VGG-16 CIFAR instead (``tvm_patdnn.compile``, untuned): the
default build, the build with these layers on the TE operator, and ONNX Runtime (as many intra-op
threads as TVM has):

    taskset -c 1 env TVM_NUM_THREADS=1 .venv/bin/python -m benchmarks.small_images --whole --rounds 15
    taskset -c 1 env TVM_NUM_THREADS=1 .venv/bin/python -m benchmarks.small_images --host [--whole]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from unittest import mock

import numpy as np
import tvm

from tvm_patdnn.analysis import analyze_conv_weight
from tvm_patdnn.fkw import pack_fkw
from tvm_patdnn.ops.pattern_conv import PatternConvSpec, pattern_conv2d_primfunc
from tvm_patdnn.ops.pattern_conv_2x2 import arranged_rows, pattern_conv_2x2_primfunc, tap_lanes_apply
from tvm_patdnn.ops.pattern_conv_shifted_rows import pattern_conv_shifted_rows_primfunc, shifted_rows_apply
from tvm_patdnn.schedule_rules import PatternConvCPU
from tvm_patdnn.targets import accumulator_registers, resolve_target, vector_lanes

from .layers import save_results
from .machine import cpu_peak_gflops, fma_peak_gflops, tvm_threads
from .models import twins
from .optimisations import pattern_layers, reference_conv
from .runtimes import cpu_ms, rotated_rounds

AVX2 = {"kind": "llvm", "mcpu": "znver3"}
SIZES = (2, 4, 8)  # output sizes of the layers measured (8x8: the AVX-512 build takes a kernel there)


def build(weight: np.ndarray, bias: np.ndarray, shape: tuple, target, kernel: bool):
    """The layer compiled with its small-image kernel (``kernel``) or with the TE operator; returns
    the function and its arguments after the input."""
    fkw = pack_fkw(weight, analyze_conv_weight(weight))
    lanes, threads = vector_lanes(target), int(target.attrs.get("num-cores") or 1)
    spec = PatternConvSpec.from_fkw(fkw, shape, (1, 1), (1, 1, 1, 1), True, True, lanes, accumulator_registers(target))
    channels, order = fkw.channels, fkw.order
    if kernel and tap_lanes_apply(spec, lanes):
        func = pattern_conv_2x2_primfunc(spec, lanes, threads)
        channels = arranged_rows(fkw.channels, fkw.offsets, len(spec.patterns)) if lanes == 8 else channels
    elif kernel and shifted_rows_apply(spec, lanes):
        func = pattern_conv_shifted_rows_primfunc(spec, threads, lanes)
    else:
        func = PatternConvCPU().apply(pattern_conv2d_primfunc(spec), target, False).mod["main"]
        order = np.argsort(fkw.order).astype(np.int32)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    return lib["main"], [tvm.runtime.tensor(a) for a in (fkw.values, channels, fkw.offsets, order, bias)]


def timer(threads: int):
    """ms of one call: process CPU time at 1 thread (the calls run on this thread), else wall time."""
    if threads == 1:
        return cpu_ms

    def wall_ms(fn, call_args, min_ms: float = 40.0) -> float:
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) * 1e3 < min_ms or calls < 3:
            fn(*call_args)
            calls += 1
        return elapsed * 1e3 / calls

    return wall_ms


def interleaved(calls: dict, rounds: int, threads: int) -> dict[str, float]:
    """Median ms of each call over ``rounds`` rounds, the order rotated every round."""
    measure = timer(threads)
    samples = rotated_rounds({label: lambda call=call: measure(*call) for label, call in calls.items()}, rounds)
    return {label: statistics.median(values) for label, values in samples.items()}


def per_layer(rounds: int, target, threads: int) -> tuple[list[dict], float]:
    """Kernel vs TE operator on each layer a small-image kernel takes on ``target`` (2x2 and 4x4; 8x8 on
    AVX-512): rows, FMA peak; prints a markdown table."""
    peak = cpu_peak_gflops() if threads == 1 else fma_peak_gflops(threads)
    rng = np.random.default_rng(0)
    rows = []
    print(f"FMA peak {peak:.1f} GFLOP/s ({threads} thread(s))\n")
    print("| layer | TE operator ms | kernel ms | TE / kernel | kernel GFLOP/s | % peak |\n|---|---|---|---|---|---|")
    for name, weight, bias, shape, _stride in pattern_layers(twins("vgg16_cifar").pruned):
        spec = PatternConvSpec.from_fkw(pack_fkw(weight, analyze_conv_weight(weight)), shape, (1, 1), (1, 1, 1, 1),
                                        True, True, vector_lanes(target))
        if shape[2] not in SIZES or not (tap_lanes_apply(spec, spec.vector_width)
                                         or shifted_rows_apply(spec, spec.vector_width)):
            continue  # no hand-built kernel for this layer on this target (AVX2 at 8x8)
        x = rng.standard_normal(shape).astype(np.float32)
        expected = reference_conv(x, weight, bias)
        calls = {}
        for label, kernel in (("TE operator", False), ("kernel", True)):
            fn, weights = build(weight, bias, shape, target, kernel)
            out = tvm.runtime.tensor(np.zeros(expected.shape, np.float32))
            call_args = [tvm.runtime.tensor(x), *weights, out]
            fn(*call_args)
            np.testing.assert_allclose(out.numpy(), expected, rtol=1e-3, atol=1e-3, err_msg=f"{name}, {label}")
            calls[label] = (fn, call_args)
        ms = interleaved(calls, rounds, threads)
        taps = np.count_nonzero(weight)  # nonzero weights: each one a multiply-add per output pixel
        gflops = 2 * taps * shape[2] * shape[3] / ms["kernel"] / 1e6
        row = {"layer": f"{name} {weight.shape[0]}x{weight.shape[1]} {shape[2]}x{shape[3]}", "te_ms": ms["TE operator"],
               "kernel_ms": ms["kernel"], "speedup": ms["TE operator"] / ms["kernel"], "gflops": gflops,
               "peak_percent": 100 * gflops / peak}
        rows.append(row)
        print(f"| {row['layer']} | {row['te_ms']:.4f} | {row['kernel_ms']:.4f} | {row['speedup']:.2f}x | "
              f"{gflops:.1f} | {row['peak_percent']:.0f}% |", flush=True)
    te, kernel = sum(r["te_ms"] for r in rows), sum(r["kernel_ms"] for r in rows)
    print(f"| all {len(rows)} | {te:.4f} | {kernel:.4f} | {te / kernel:.2f}x | | |")
    return rows, peak


def whole_model(rounds: int, target, threads: int) -> None:
    """VGG-16 CIFAR 8x whole: default build, small-image layers on the TE operator, ONNX Runtime."""
    import onnxruntime as ort

    import tvm_patdnn

    model = twins("vgg16_cifar").pruned
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    off = [mock.patch(f"tvm_patdnn.transform.pattern_conv_rewrite.{name}", return_value=False)
           for name in ("tap_lanes_apply", "shifted_rows_apply")]
    calls, outputs = {}, []
    for label, patches in (("default (small-image kernels)", []), ("TE operator at 2x2 and 4x4", off)):
        for patch in patches:
            patch.start()
        try:
            compiled = tvm_patdnn.compile(model, target, tuning_db=False)
        finally:
            for patch in patches:
                patch.stop()
        calls[label] = (compiled.vm["main"], [tvm.runtime.tensor(x)])
        outputs.append(compiled.run({"input": x})[0])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    calls["ONNX Runtime"] = (lambda feed: session.run(None, feed), [{"input": x}])
    outputs.append(session.run(None, {"input": x})[0])
    for got in outputs[1:]:
        np.testing.assert_allclose(got, outputs[0], rtol=1e-3, atol=1e-4)
    ms = interleaved(calls, rounds, threads)
    base = ms["TE operator at 2x2 and 4x4"]
    print("| VGG-16 CIFAR 8x, whole | ms | TE at 2x2/4x4 / this | ORT / this |\n|---|---|---|---|")
    for label, value in ms.items():
        print(f"| {label} | {value:.3f} | {base / value:.2f}x | {ms['ONNX Runtime'] / value:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--whole", action="store_true", help="time the whole VGG-16 CIFAR model instead")
    parser.add_argument("--json", type=Path, help="write the per-layer rows here")
    parser.add_argument("--host", action="store_true",
                        help="build for the host CPU (AVX-512 kernels on an AVX-512 host) instead of AVX2")
    args = parser.parse_args()
    threads = tvm_threads()
    target = resolve_target({**(AVX2 if not args.host else {"kind": "llvm", "mcpu": resolve_target("x86").mcpu}),
                             "num-cores": threads})
    if args.whole:
        whole_model(args.rounds, target, threads)
        return
    rows, peak = per_layer(args.rounds, target, threads)
    if args.json:
        save_results(args.json, target, args.rounds, rows, peak)


if __name__ == "__main__":
    main()
