"""The ``patdnn tune`` subcommand."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import TYPE_CHECKING

from ..analysis import PatternOptions
from ..arguments import add_model_options, add_target_option, add_threads_option, pattern_options
from ..tables import format_table

if TYPE_CHECKING:
    from tvm.target import Target

    from .tuner import TuneResults

__all__ = ["add_tune_command", "format_results"]


def add_tune_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``tune`` (handler in ``func``)."""
    parser = subparsers.add_parser(
        "tune",
        help="auto-tune the model's kernels (meta_schedule + XGBoost), appending records to a database",
        description=(
            "Tune every kernel of the compiled model: first each dense conv layer's kernel (GEMM, "
            "direct or Winograd, and its register tile: every candidate measured once, the fastest "
            "verified against the rules' choice), then pattern "
            "convs in tvm_patdnn's design space (register tile, filter blocking and loop order, unroll, "
            "parallel granularity) and the remaining kernels in meta_schedule's space for the target, "
            "for --trials trials. Records are appended to DB as "
            "they are measured; re-running with the same DB resumes. Each kernel's fastest candidates are then "
            "re-measured against its default, back to back, and kept only if one wins by a margin: the summary's "
            "speedup is that verified one ('search said': the search's own, unverified). Apply them with "
            "`patdnn compile --tuning-db DB` or tvm_patdnn.compile(..., tuning_db=DB)."
        ),
    )
    add_model_options(parser)
    add_target_option(parser, "x86")
    parser.add_argument("--trials", type=int, default=64, help="search trials over all kernels")
    add_threads_option(parser, "measure with N TVM runtime threads and generate the design space for N cores; "
                               "records say N and `compile` applies them to models compiled for N threads "
                               "(default: what TVM's runtime runs on the measuring device: TVM_NUM_THREADS, else "
                               "half the logical CPUs on x86; over --rpc the device's own count)")
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


def format_results(results: TuneResults) -> str:
    """A table of the tuned kernels (default and tuned time, the verified speedup and verdict, what
    the search alone claimed, trials failed in this tune), then each failing kernel's last error
    and why the tune stopped early, if it did."""

    def verdict(r) -> str:
        if r.kept is not None:
            return "kept" if r.kept else f"default ({r.candidate_speedup:.2f}x)"
        if r.best_ms is not None and r.best_ms == r.default_ms:
            return "default (none faster)"  # the search found nothing faster: nothing to verify
        return "unverified"

    rows = [[r.name, r.kind, str(r.weight), str(r.trials),
             f"{r.default_ms:.4g}" if r.default_ms is not None else "-",
             f"{r.best_ms:.4g}" if r.best_ms is not None else "-",
             f"{r.speedup:.2f}x" if r.speedup is not None else "-",
             verdict(r),
             f"{r.search_speedup:.2f}x" if r.search_speedup is not None else "-",
             str(r.failed)] for r in results]
    lines = [format_table(["kernel", "kind", "calls", "trials", "default ms", "tuned ms", "speedup", "verdict",
                           "search said", "failed"], rows, align="<<>>>>><>>")]
    failing = [r for r in results if r.failed]
    if failing:
        lines.append(f"\n{sum(r.failed for r in failing)} trial(s) failed:")
        lines.extend(f"  {r.name}: {r.failed} failed, last error: {r.error}" for r in failing)
    if results.devices:
        lines.append("\ndevices:")
        lines.extend(f"  {device}: {stats.trials} trial(s) measured, {stats.failed} failed; "
                     f"{stats.verification_runs} verification run(s), {stats.verification_failed} failed"
                     for device, stats in sorted(results.devices.items()))
    if results.stopped:
        lines.append(f"\ntuning stopped early: {results.stopped}")
    return "\n".join(lines)


def apply_command(args: argparse.Namespace, tuned: Target | None = None) -> str:
    """The ``patdnn compile`` command that applies this tune's records: same model, target, shapes
    and pattern options (records only match kernels compiled the same way), and ``--threads`` when
    the target alone would compile for another thread count than the tune measured with
    (``tuned``: the tune's target)."""
    from ..targets import resolve_target
    from .threads import thread_count

    words = ["patdnn", "compile", args.model, "--target", args.target]
    threads = thread_count(tuned) if tuned is not None else None
    if threads is not None and threads != thread_count(resolve_target(args.target)):
        words += ["--threads", str(threads)]
    for name, dims in args.input_shape:
        words += ["--input-shape", f"{name}={','.join(map(str, dims))}"]
    patterns = pattern_options(args)
    if patterns != PatternOptions():
        words += ["--entries", str(patterns.entries), "--max-patterns", str(patterns.max_patterns)]
    words += ["--tuning-db", str(args.db), "-o", "model.so"]
    return shlex.join(words)


def run_tune(args: argparse.Namespace) -> int:
    from ..tvm_noise import filter_tvm_noise
    from .tuner import tune

    patterns = pattern_options(args)
    with filter_tvm_noise():  # 'Unknown schedule rule "meta_schedule.pool_max"': see tvm_noise
        results = tune(
            args.model, args.target, trials=args.trials, database=args.db, rpc=args.rpc,
            input_shapes=dict(args.input_shape), entries=patterns.entries, max_patterns=patterns.max_patterns,
            trials_per_iter=args.trials_per_iter, timeout=args.timeout, devices=args.devices, progress=sys.stderr,
            dense_kernels=args.dense_kernels, threads=args.threads,
        )
    print(format_results(results))
    print(f"\nrecords in {args.db}; apply with: {apply_command(args, results.target)}")
    return 1 if results.stopped else 0  # stopped early: records kept, budget not spent
