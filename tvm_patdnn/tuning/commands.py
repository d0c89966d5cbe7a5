"""The ``patdnn tune`` subcommand."""

from __future__ import annotations

import argparse
import shlex
import sys

__all__ = ["add_tune_command", "format_results"]


def add_tune_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``tune`` (handler in ``func``)."""
    from ..cli import _add_model_options, add_target_option  # the cli module is loaded by the time parsers are built

    parser = subparsers.add_parser(
        "tune",
        help="auto-tune the model's kernels (meta_schedule + XGBoost), appending records to a database",
        description=(
            "Tune every kernel of the compiled model: first each dense conv layer's kernel (GEMM, "
            "direct or Winograd, and its register tile: every candidate measured once), then pattern "
            "convs in tvm_patdnn's design space (register tile, filter blocking and loop order, unroll, "
            "parallel granularity) and the remaining kernels in meta_schedule's space for the target, "
            "for --trials trials. Records are appended to DB as "
            "they are measured; re-running with the same DB resumes. Apply them with "
            "`patdnn compile --tuning-db DB` or tvm_patdnn.compile(..., tuning_db=DB)."
        ),
    )
    _add_model_options(parser)
    add_target_option(parser, "x86")
    parser.add_argument("--trials", type=int, default=64, help="search trials over all kernels")
    parser.add_argument("--db", required=True, metavar="DIR", help="tuning database directory (created if missing)")
    parser.add_argument("--rpc", metavar="HOST:PORT:KEY",
                        help="measure on the device registered as KEY with the RPC tracker at HOST:PORT")
    parser.add_argument("--trials-per-iter", type=int, default=16,
                        help="candidates measured per search round of a kernel")
    parser.add_argument("--devices", type=int, metavar="N",
                        help="with --rpc: measure on up to N devices of the key at once (default: every device "
                             "the tracker lists, re-read before each batch)")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="limit of one measurement; with --rpc also of the tracker's answer, the device "
                             "becoming free and its handshake, after which the tune ends")
    parser.add_argument("--no-dense-kernels", dest="dense_kernels", action="store_false",
                        help="do not measure the dense layers' candidate kernels (they keep the rules' choice)")
    parser.set_defaults(func=run_tune)


def format_results(results) -> str:
    """A table of the tuned kernels (default and best time, speedup, trials failed in this tune),
    then each failing kernel's last error and why the tune stopped early, if it did."""
    lines = [(f"{'kernel':<36} {'kind':<8} {'calls':>5} {'trials':>6} {'default ms':>11} {'tuned ms':>10} "
              f"{'speedup':>8} {'failed':>6}")]
    for r in results:
        default = f"{r.default_ms:.4g}" if r.default_ms is not None else "-"
        best = f"{r.best_ms:.4g}" if r.best_ms is not None else "-"
        speedup = f"{r.speedup:.2f}x" if r.speedup is not None else "-"
        failed = getattr(r, "failed", 0)
        lines.append(f"{r.name:<36} {r.kind:<8} {r.weight:>5} {r.trials:>6} {default:>11} {best:>10} {speedup:>8} "
                     f"{failed:>6}")
    failing = [r for r in results if getattr(r, "failed", 0)]
    if failing:
        lines.append(f"\n{sum(r.failed for r in failing)} trial(s) failed:")
        lines.extend(f"  {r.name}: {r.failed} failed, last error: {r.error}" for r in failing)
    devices = getattr(results, "devices", {})
    if devices:
        lines.append("\ndevices:")
        lines.extend(f"  {device}: {stats.trials} trial(s) measured, {stats.failed} failed"
                     for device, stats in sorted(devices.items()))
    stopped = getattr(results, "stopped", None)
    if stopped:
        lines.append(f"\ntuning stopped early: {stopped}")
    return "\n".join(lines)


def apply_command(args: argparse.Namespace) -> str:
    """The ``patdnn compile`` command that applies this tune's records: same model, target, shapes
    and pattern options (records only match kernels compiled the same way)."""
    words = ["patdnn", "compile", args.model, "--target", args.target]
    for name, dims in args.input_shape:
        words += ["--input-shape", f"{name}={','.join(map(str, dims))}"]
    if args.entries != 4 or args.max_patterns != 12:
        words += ["--entries", str(args.entries), "--max-patterns", str(args.max_patterns)]
    words += ["--tuning-db", str(args.db), "-o", "model.so"]
    return shlex.join(words)


def run_tune(args: argparse.Namespace) -> int:
    from ..tvm_noise import filter_tvm_noise
    from .tuner import tune

    with filter_tvm_noise():  # 'Unknown schedule rule "meta_schedule.pool_max"': see tvm_noise
        results = tune(
            args.model, args.target, trials=args.trials, database=args.db, rpc=args.rpc,
            input_shapes=dict(args.input_shape), entries=args.entries, max_patterns=args.max_patterns,
            trials_per_iter=args.trials_per_iter, timeout=args.timeout, devices=args.devices, progress=sys.stderr,
            dense_kernels=args.dense_kernels,
        )
    print(format_results(results))
    print(f"\nrecords in {args.db}; apply with: {apply_command(args)}")
    return 1 if results.stopped else 0  # stopped early: records kept, budget not spent
