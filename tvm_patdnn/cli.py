"""The ``patdnn`` command: inspect, prune, compile, run, bench, tune (and the phone tools).

This module only builds the parser from the subcommands each package registers (``commands.py``,
``pruning/commands.py``, ``tuning/commands.py``, ``phone/commands.py``; their shared options are
in ``arguments.py``) and runs the chosen one. Every user error is a :class:`PatDNNError`, printed
as one ``error:`` line with exit status 2; nothing is written unless the command succeeds. A closed output pipe (``patdnn inspect --json |
head``) ends the command quietly, as it ends ``cat``.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
import threading
import warnings
from importlib import metadata

from . import termination
from .arguments import TARGET_HELP, HelpFormatter, add_target_option
from .commands import add_bench_command, add_compile_command, add_inspect_command, add_run_command
from .errors import PatDNNError
from .phone.commands import add_deploy_command, add_opencl_check_command, add_phone_emulator_command
from .pruning.commands import add_prune_command
from .tuning.commands import add_tune_command

__all__ = ["TARGET_HELP", "add_target_option", "build_parser", "main"]  # the first two: arguments.py

SIGPIPE_STATUS = 128 + 13  # what a shell reports for a command ended by SIGPIPE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patdnn", description="PatDNN pattern-sparse CNNs on TVM",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    add_inspect_command(sub)
    add_compile_command(sub)
    add_run_command(sub)
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


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """tvm_patdnn's own warnings as one ``warning:`` line, like its errors; others as Python shows them."""
    if f"{os.sep}tvm_patdnn{os.sep}" in filename:
        return f"warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = termination.handle_sigterm() if in_main_thread else None
    warnings.formatwarning = _format_warning
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return status
    except BrokenPipeError:
        _discard_stdout()
        return SIGPIPE_STATUS
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if termination.status() is not None:  # the SIGTERM, another exception after TVM's C++
            return termination.status()
        if isinstance(err, PatDNNError):
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise
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
