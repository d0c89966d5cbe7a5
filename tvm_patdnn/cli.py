"""The ``patdnn`` command: inspect, prune, compile, run, bench, tune (and the phone tools).

Every user error is a :class:`PatDNNError`, printed as one ``error:`` line with exit status 2;
nothing is written unless the command succeeds. A closed output pipe (``patdnn inspect --json |
head``) ends the command quietly, as it ends ``cat``. Help texts show every option's default and
list the target presets (``targets.TARGET_NAMES``, read only when help is printed, so that
commands which need no TVM, like ``prune``, do not pay its import).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import threading
import warnings
from importlib import metadata

import numpy as np

from .bench import add_bench_command
from .errors import PatDNNError
from .phone.commands import add_opencl_check_command, add_phone_emulator_command
from .phone.deploy import add_deploy_command
from .pruning.commands import add_prune_command
from .tuning.commands import add_tune_command

__all__ = ["TARGET_HELP", "add_target_option", "main"]

# "{targets}" is replaced by the preset names when help is printed (HelpFormatter).
TARGET_HELP = "one of {targets} (x86: this machine's CPU), or a TVM target JSON such as '{\"kind\":\"llvm\",\"mcpu\":\"znver3\"}'"
SIGPIPE_STATUS = 128 + 13  # what a shell reports for a command ended by SIGPIPE


class HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to every option that takes a value and has a default, and fills in
    the target presets."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        has_value = action.nargs != 0 and action.default not in (None, [], argparse.SUPPRESS)
        if has_value and "%(default)" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text

    def _expand_help(self, action: argparse.Action) -> str:
        text = super()._expand_help(action)
        if "{targets}" in text:
            from .targets import TARGET_NAMES

            text = text.replace("{targets}", ", ".join(TARGET_NAMES))
        return text


def add_target_option(parser: argparse.ArgumentParser, default: str, help_text: str = TARGET_HELP) -> None:
    parser.add_argument("--target", default=default, help=help_text)


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
    parser.add_argument("--entries", type=int, default=4, help="max nonzeros of a pattern kernel")
    parser.add_argument("--max-patterns", type=int, default=12, help="max patterns per layer")


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
    print(f"\ncompiled for {compiled.target} -> {path} (signature: {path}.json)")
    return 0


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


def _run_run(args: argparse.Namespace) -> int:
    from .compiler import load
    from .fileio import write_bytes_atomic

    model = load(args.library)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patdnn", description="PatDNN pattern-sparse CNNs on TVM",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    inspect_parser = sub.add_parser("inspect", help="per-conv table: patterns, kept kernels, density, FLOPs, verdict")
    _add_model_options(inspect_parser)
    inspect_parser.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect_parser.add_argument("--plot", metavar="PNG", help="write a bar chart of pattern frequencies")
    inspect_parser.set_defaults(func=_run_inspect)

    compile_parser = sub.add_parser("compile", help="compile with the pattern pass and export a shared library")
    _add_model_options(compile_parser)
    add_target_option(compile_parser, "x86")
    compile_parser.add_argument("-o", "--output", required=True,
                                help="shared library to write (.so); its signature goes to OUTPUT.json")
    tuned = compile_parser.add_mutually_exclusive_group()
    tuned.add_argument("--tuning-db", metavar="DIR",
                       help="apply the records of `patdnn tune --db DIR` (default: the schedules shipped for the device)")
    tuned.add_argument("--no-tuned-schedules", action="store_true",
                       help="default schedule rules only, no tuning records (tuning_db=False)")
    compile_parser.set_defaults(func=_run_compile)

    run_parser = sub.add_parser(
        "run", help="run a compiled library on inputs from .npy files",
        description="Run a library written by `patdnn compile` (it needs its signature file LIBRARY.json) on "
                    "this CPU and print each output's shape and range, or write them with -o.")
    run_parser.add_argument("library", help="compiled library (.so)")
    run_parser.add_argument("--input", action="append", default=[], metavar="[NAME=]FILE.npy",
                            help="an input array saved with numpy.save; NAME= may be left out for a one-input "
                                 "model (repeatable)")
    run_parser.add_argument("-o", "--output", metavar="OUT.npz", help="write the outputs, by name, to an .npz file")
    run_parser.set_defaults(func=_run_run)

    add_bench_command(sub)
    add_prune_command(sub)
    add_tune_command(sub)
    add_deploy_command(sub)
    add_phone_emulator_command(sub)
    add_opencl_check_command(sub)
    for command in sub.choices.values():  # subcommands registered elsewhere get the same help format
        command.formatter_class = HelpFormatter
    return parser


def _version() -> str:
    """``patdnn X (apache-tvm Y)``, from the installed distributions: no TVM import."""
    versions = []
    for dist in ("tvm-patdnn", "apache-tvm"):
        try:
            versions.append(metadata.version(dist))
        except metadata.PackageNotFoundError:
            versions.append("unknown")
    return f"patdnn {versions[0]} (apache-tvm {versions[1]})"


def _terminated(signum: int, _frame) -> None:
    """SIGTERM ends a command like Ctrl-C does: by unwinding, so temporary directories (tune,
    deploy) and half-written temp files are removed on the way out."""
    raise SystemExit(128 + signum)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """tvm_patdnn's own warnings as one ``warning:`` line, like its errors; others as Python shows them."""
    if f"{os.sep}tvm_patdnn{os.sep}" in filename:
        return f"warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main_thread else None
    warnings.formatwarning = _format_warning
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return status
    except BrokenPipeError:
        _discard_stdout()
        return SIGPIPE_STATUS
    except PatDNNError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = _python_format_warning
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _discard_stdout() -> None:
    """After the reader went away: point stdout at /dev/null, so the interpreter's final flush of
    what is still buffered does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        pass  # stdout is no file (captured in tests): nothing to flush at exit


if __name__ == "__main__":
    sys.exit(main())
