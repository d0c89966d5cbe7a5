"""Command-line arguments shared by the ``patdnn`` subcommands, and their help format.

Every package registers its own subcommands (``commands.py``, ``phone/commands.py``,
``tuning/commands.py``, ``pruning/commands.py``); the options several of them take are defined
here once, below all of them, so that no command module imports the ``cli`` that imports it.
Help texts show every option's default and list the target presets (``targets.TARGET_NAMES``,
read only when help is printed, so that commands which need no TVM, like ``prune``, do not pay
its import).
"""

from __future__ import annotations

import argparse

from .analysis import PatternOptions

__all__ = ["TARGET_HELP", "HelpFormatter", "add_input_shape_option", "add_model_options", "add_target_option",
           "add_threads_option", "input_shape", "pattern_options", "thread_count"]

# "{targets}" is replaced by the preset names when help is printed (HelpFormatter).
TARGET_HELP = "one of {targets} (x86: this machine's CPU), or a TVM target JSON such as '{\"kind\":\"llvm\",\"mcpu\":\"znver3\"}'"


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


def input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``name=1,3,32,32`` -> ("name", (1, 3, 32, 32))."""
    name, sep, dims = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, tuple(int(d) for d in dims.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=D1,D2,... (e.g. input=1,3,32,32), got {text!r}") from None


def thread_count(text: str) -> int:
    """``--threads N``: a positive whole number."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number of threads, got {text!r}")
    return value


def add_threads_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--threads", type=thread_count, metavar="N", help=help_text)


def add_input_shape_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--input-shape", type=input_shape, action="append", default=[], metavar="NAME=DIMS",
                        help=help_text)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The ONNX model and how to read it: input shapes and the pattern options (``pattern_options``)."""
    parser.add_argument("model", help="ONNX model (pattern-pruned or not)")
    add_input_shape_option(parser, "static shape for an input with dynamic dimensions (repeatable)")
    defaults = PatternOptions()
    parser.add_argument("--entries", type=int, default=defaults.entries, help="max nonzeros of a pattern kernel")
    parser.add_argument("--max-patterns", type=int, default=defaults.max_patterns, help="max patterns per layer")


def pattern_options(args: argparse.Namespace) -> PatternOptions:
    """``--entries``/``--max-patterns`` as one checked value (PatDNNError when out of range)."""
    return PatternOptions(args.entries, args.max_patterns)
