"""The ``patdnn tune`` subcommand."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_tune_command", "format_results"]


def add_tune_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``tune`` (handler in ``func``)."""
    from ..cli import (
        _add_model_options,  # the cli module is loaded by the time parsers are built
    )

    parser = subparsers.add_parser(
        "tune",
        help="auto-tune the model's kernels (meta_schedule + XGBoost), appending records to a database",
        description=(
            "Tune every kernel of the compiled model: pattern convs in tvm_patdnn's design space "
            "(register tile, filter blocking and loop order, unroll, parallel granularity), the "
            "dense layers in meta_schedule's space for the target. Records are appended to DB as "
            "they are measured; re-running with the same DB resumes. Apply them with "
            "`patdnn compile --tuning-db DB` or tvm_patdnn.compile(..., tuning_db=DB)."
        ),
    )
    _add_model_options(parser)
    parser.add_argument("--target", default="x86",
                        help="x86 (host CPU), a phone preset or a TVM target JSON (default %(default)s)")
    parser.add_argument("--trials", type=int, default=64, help="search trials over all kernels (default %(default)s)")
    parser.add_argument("--db", required=True, metavar="DIR", help="tuning database directory (created if missing)")
    parser.add_argument("--rpc", metavar="HOST:PORT:KEY",
                        help="measure on the device registered as KEY with the RPC tracker at HOST:PORT")
    parser.add_argument("--trials-per-iter", type=int, default=16,
                        help="candidates measured per search round of a kernel (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="limit of one measurement; with --rpc also of the tracker's answer, the device "
                             "becoming free and its handshake, after which the tune ends (default %(default)s)")
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
    stopped = getattr(results, "stopped", None)
    if stopped:
        lines.append(f"\ntuning stopped early: {stopped}")
    return "\n".join(lines)


def run_tune(args: argparse.Namespace) -> int:
    from .tuner import tune

    results = tune(
        args.model, args.target, trials=args.trials, database=args.db, rpc=args.rpc,
        input_shapes=dict(args.input_shape), entries=args.entries, max_patterns=args.max_patterns,
        trials_per_iter=args.trials_per_iter, timeout=args.timeout, progress=sys.stderr,
    )
    print(format_results(results))
    print(f"\nrecords in {args.db}; apply with: patdnn compile {args.model} --tuning-db {args.db} -o model.so")
    return 1 if results.stopped else 0  # stopped early: records kept, budget not spent
