"""The ``patdnn`` command: inspect, prune, compile (and the phone tools).

Every user error is a :class:`PatDNNError`, printed as one ``error:`` line with exit status 2;
nothing is written unless the command succeeds.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from .errors import PatDNNError
from .phone.commands import add_phone_emulator_command
from .phone.deploy import add_deploy_command
from .pruning.commands import add_prune_command
from .tuning.commands import add_tune_command

__all__ = ["main"]


def _input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``name=1,3,32,32`` -> ("name", (1, 3, 32, 32))."""
    name, sep, dims = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, tuple(int(d) for d in dims.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=D1,D2,... (e.g. input=1,3,32,32), got {text!r}") from None


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="ONNX model (pattern-pruned or not)")
    parser.add_argument("--input-shape", type=_input_shape, action="append", default=[], metavar="NAME=DIMS",
                        help="static shape for an input with dynamic dimensions (repeatable)")
    parser.add_argument("--entries", type=int, default=4, help="max nonzeros of a pattern kernel (default %(default)s)")
    parser.add_argument("--max-patterns", type=int, default=12, help="max patterns per layer (default %(default)s)")


def _run_inspect(args: argparse.Namespace) -> int:
    from .compiler import inspect
    from .report import format_pattern_usage, format_report

    records = inspect(args.model, input_shapes=dict(args.input_shape), entries=args.entries, max_patterns=args.max_patterns)
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


def _run_compile(args: argparse.Namespace) -> int:
    from .compiler import compile as compile_model
    from .report import format_report

    compiled = compile_model(
        args.model, args.target, input_shapes=dict(args.input_shape), entries=args.entries, max_patterns=args.max_patterns,
        tuning_db=False if args.no_tuned_schedules else args.tuning_db,
    )
    print(compiled.schedules, file=sys.stderr)
    path = compiled.export_library(args.output)
    print(format_report(compiled.report))
    print(f"\ncompiled for {compiled.target} -> {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patdnn", description="PatDNN pattern-sparse CNNs on TVM")
    sub = parser.add_subparsers(dest="command", required=True)

    inspect_parser = sub.add_parser("inspect", help="per-conv table: patterns, kept kernels, density, FLOPs, verdict")
    _add_model_options(inspect_parser)
    inspect_parser.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect_parser.add_argument("--plot", metavar="PNG", help="write a bar chart of pattern frequencies")
    inspect_parser.set_defaults(func=_run_inspect)

    compile_parser = sub.add_parser("compile", help="compile with the pattern pass and export a shared library")
    _add_model_options(compile_parser)
    compile_parser.add_argument("--target", default="x86",
                                help="x86 (host CPU), arm_cpu, adreno, or a TVM target JSON (default %(default)s)")
    compile_parser.add_argument("-o", "--output", required=True, help="shared library to write (.so)")
    tuned = compile_parser.add_mutually_exclusive_group()
    tuned.add_argument("--tuning-db", metavar="DIR",
                       help="apply the records of `patdnn tune --db DIR` (default: the schedules shipped for the device)")
    tuned.add_argument("--no-tuned-schedules", action="store_true",
                       help="default schedule rules only, no tuning records (tuning_db=False)")
    compile_parser.set_defaults(func=_run_compile)

    add_prune_command(sub)
    add_phone_emulator_command(sub)
    add_deploy_command(sub)
    add_tune_command(sub)
    return parser


def _terminated(signum: int, _frame) -> None:
    """SIGTERM ends a command like Ctrl-C does: by unwinding, so temporary directories (tune,
    deploy) and half-written temp files are removed on the way out."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main_thread else None
    try:
        return int(args.func(args) or 0)
    except PatDNNError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
