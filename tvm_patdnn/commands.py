"""The top-level ``patdnn`` subcommands: ``inspect``, ``compile``, ``run``, ``bench``.

Each ``add_*_command`` registers one subcommand on the main parser's subparsers with its
handler in ``func``; the handlers import the compiler when they run, so that building the
parser (and ``patdnn prune``) never imports TVM.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

import numpy as np

from .arguments import (
    TARGET_HELP, add_input_shape_option, add_model_options, add_target_option, add_threads_option, pattern_options,
)
from .errors import PatDNNError

__all__ = ["add_bench_command", "add_compile_command", "add_inspect_command", "add_run_command"]


def add_inspect_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("inspect", help="per-conv table: patterns, kept kernels, density, FLOPs, verdict")
    add_model_options(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--plot", metavar="PNG", help="write a bar chart of pattern frequencies")
    parser.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    from .compiler import inspect
    from .report import format_pattern_usage, format_report

    patterns = pattern_options(args)
    records = inspect(args.model, input_shapes=dict(args.input_shape), entries=patterns.entries,
                      max_patterns=patterns.max_patterns)
    if args.plot:
        from .pruning.plots import plot_pattern_frequencies

        frequencies: dict[int, int] = {}
        for record in records:
            for pattern, count in zip(record.patterns, record.pattern_counts):
                frequencies[pattern] = frequencies.get(pattern, 0) + count
        if not frequencies:
            raise PatDNNError("no pattern-sparse layer: nothing to plot")
        plot_pattern_frequencies(frequencies, args.plot, title=f"kernel patterns of {args.model}")
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=2))
    else:
        print(format_report(records))
        usage = format_pattern_usage(records)
        if usage:
            print("\npatterns per layer (rows of the 3x3 kernel, x = kept):")
            print(usage)
        if args.plot:
            print(f"\npattern frequencies plotted to {args.plot}")
    return 0


def add_compile_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("compile", help="compile with the pattern pass and export a shared library")
    add_model_options(parser)
    add_target_option(parser, "x86")
    parser.add_argument("-o", "--output", required=True,
                        help="shared library to write (.so); its signature goes to OUTPUT.json")
    tuned = parser.add_mutually_exclusive_group()
    tuned.add_argument("--tuning-db", metavar="DIR",
                       help="apply the records of `patdnn tune --db DIR` (default: the schedules shipped for the device)")
    tuned.add_argument("--no-tuned-schedules", action="store_true",
                       help="default schedule rules only, no tuning records (tuning_db=False)")
    add_threads_option(parser, "compile for N TVM runtime threads (the target's num-cores) and apply the records "
                               "tuned for N threads; run the library with TVM_NUM_THREADS=N (default: the target's "
                               "num-cores; x86: TVM's runtime thread count here)")
    parser.set_defaults(func=run_compile)


def run_compile(args: argparse.Namespace) -> int:
    from .compiler import compile as compile_model
    from .report import format_report

    patterns = pattern_options(args)
    compiled = compile_model(
        args.model, args.target, input_shapes=dict(args.input_shape), entries=patterns.entries,
        max_patterns=patterns.max_patterns, tuning_db=False if args.no_tuned_schedules else args.tuning_db,
        threads=args.threads,
    )
    print(compiled.schedules, file=sys.stderr)
    path = compiled.export_library(args.output)
    print(format_report(compiled.report))
    print(f"\ncompiled for {compiled.target} -> {path} (signature: {path}.json)")
    return 0


def add_run_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run", help="run a compiled library on inputs from .npy files",
        description="Run a library written by `patdnn compile` (it needs its signature file LIBRARY.json) on "
                    "this CPU and print each output's shape and range, or write them with -o.")
    parser.add_argument("library", help="compiled library (.so)")
    parser.add_argument("--input", action="append", default=[], metavar="[NAME=]FILE.npy",
                        help="an input array saved with numpy.save; NAME= may be left out for a one-input "
                             "model (repeatable)")
    parser.add_argument("-o", "--output", metavar="OUT.npz", help="write the outputs, by name, to an .npz file")
    parser.set_defaults(func=run_run)


def _read_inputs(specs: list[str], names: list[str], describe: str) -> dict[str, np.ndarray]:
    """``--input`` values (``NAME=FILE.npy``, or ``FILE.npy`` for a one-input model) as arrays."""
    if not specs:
        raise PatDNNError(f"the model takes {describe}: give each with --input NAME=FILE.npy (numpy.save)")
    given: dict[str, np.ndarray] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or os.path.isfile(spec):
            if len(names) != 1 or len(specs) != 1:
                raise PatDNNError(f"--input {spec}: name the input (NAME=FILE.npy); the model takes {describe}")
            name, path = names[0], spec
        try:
            given[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise PatDNNError(f"cannot read --input {spec} as a .npy array: {err}") from None
    return given


def _summary(name: str, value: np.ndarray) -> str:
    """One line per output: shape, dtype, range; small outputs (logits) in full, with argmax."""
    line = f"{name}: {'x'.join(map(str, value.shape))} {value.dtype}"
    if value.size:
        line += f"  min {value.min():.4g} max {value.max():.4g} mean {value.mean():.4g}"
    if 0 < value.size <= 16:
        line += f"\n  {np.array2string(value.ravel(), precision=4, separator=', ')}  argmax {int(value.argmax())}"
    return line


def _note_thread_mismatch(model) -> None:
    """Say on stderr when the runtime's thread count is not the one the model was compiled for
    (not for a phone's code: that never runs on this runtime, and running it is refused)."""
    from .targets import is_host_runnable
    from .tuning.threads import runtime_mismatch

    note = runtime_mismatch(model.target) if is_host_runnable(model.target) else None
    if note is not None:
        print(note, file=sys.stderr)


def run_run(args: argparse.Namespace) -> int:
    from .compiler import load
    from .fileio import write_bytes_atomic
    from .targets import keep_cpu_pinning

    keep_cpu_pinning()

    model = load(args.library)
    _note_thread_mismatch(model)
    describe = "inputs " + ", ".join(f"{n!r} ({'x'.join(map(str, model.input_shapes[n]))} {model.input_dtypes[n]})"
                                     for n in model.input_names)
    outputs = model.run(_read_inputs(args.input, model.input_names, describe))
    named = dict(zip(model.output_names, outputs))
    if args.output:
        buffer = io.BytesIO()
        np.savez(buffer, **named)
        write_bytes_atomic(args.output, buffer.getvalue())
    for name, value in named.items():
        print(_summary(name, value))
    if args.output:
        print(f"outputs written to {args.output}")
    return 0


def add_bench_command(subparsers: argparse._SubParsersAction) -> None:
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
    add_input_shape_option(parser, "ONNX model only: static shape for an input with dynamic dimensions (repeatable)")
    add_target_option(parser, "x86", "ONNX model only: " + TARGET_HELP)
    parser.add_argument("--tuning-db", metavar="DIR", help="ONNX model only: apply the records of `patdnn tune --db DIR`")
    parser.add_argument("--runs", type=int, default=100, help="timed runs")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs first")
    parser.add_argument("--ort", action="store_true", help="also time ONNX Runtime (ONNX model only)")
    parser.add_argument("--profile", action="store_true",
                        help="also print where the time goes: each compiled kernel's ms per inference and share")
    parser.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from .bench import bench_onnxruntime, bench_tvm, format_latencies, format_profile, profile_kernels
    from .compiler import compile as compile_model
    from .compiler import load
    from .frontend import seeded_inputs
    from .targets import keep_cpu_pinning
    from .verify import relative_error

    keep_cpu_pinning()
    if args.runs < 1 or args.warmup < 0:
        raise PatDNNError(f"--runs must be at least 1 and --warmup at least 0, got {args.runs} and {args.warmup}")
    is_onnx = Path(args.model).suffix == ".onnx"
    if not is_onnx and (args.ort or args.input_shape or args.tuning_db):
        raise PatDNNError("--ort, --input-shape and --tuning-db need an ONNX model; a library is timed as compiled")
    if is_onnx:
        model = compile_model(args.model, args.target, input_shapes=dict(args.input_shape), tuning_db=args.tuning_db)
    else:
        model = load(args.model)
    inputs = seeded_inputs(model)
    shapes = ", ".join(f"{n} {'x'.join(map(str, model.input_shapes[n]))} {model.input_dtypes[n]}" for n in model.input_names)
    print(f"{args.model}: {model.target}; inputs {shapes}")
    _note_thread_mismatch(model)
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
