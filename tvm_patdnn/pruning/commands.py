"""The ``patdnn prune`` subcommand: one-shot PatDNN pruning of an ONNX model."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import PatDNNError
from ..fileio import check_output_path
from .onnx_prune import prune_onnx, save_model_atomic

__all__ = ["add_prune_command"]


def _rate(text: str) -> float | None:
    """``--connectivity`` value: a rate, or ``none``/``off`` to disable connectivity pruning."""
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rate >= 1 or 'none', got {text!r}") from None


def add_prune_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``prune`` on the main CLI's subparsers; the handler is ``args.func``."""
    parser = subparsers.add_parser(
        "prune",
        help="pattern- and connectivity-prune the 3x3 convolutions of an ONNX model",
        description=(
            "One-shot PatDNN pruning: choose the most frequent kernel shapes of the pretrained "
            "weights as the pattern set, project every prunable 3x3 kernel onto its best "
            "pattern and keep 1/RATE of each layer's kernels. Retrain afterwards to recover "
            "accuracy."
        ),
    )
    parser.add_argument("model", help="input ONNX model")
    parser.add_argument("-o", "--output", required=True, help="where to write the pruned ONNX model")
    parser.add_argument("--patterns", type=int, default=8, metavar="N",
                        help="size of the pattern set (PatDNN uses 8; the compiler handles up to 12; default %(default)s)")
    parser.add_argument("--connectivity", type=_rate, default=3.6, metavar="RATE",
                        help="keep round(kernels/RATE) kernels per layer; 'none' disables "
                             "(default %(default)s)")
    parser.add_argument("--entries", type=int, default=4, metavar="K",
                        help="weights kept per 3x3 kernel (default %(default)s)")
    parser.add_argument("--no-centre", dest="force_centre", action="store_false",
                        help="do not force the centre tap into every pattern")
    first = parser.add_mutually_exclusive_group()
    first.add_argument("--keep-first-dense", dest="first_layer_dense", action="store_true", default=True,
                       help="leave layers with <= 3 input channels dense (default)")
    first.add_argument("--prune-first", dest="first_layer_dense", action="store_false",
                       help="prune layers with <= 3 input channels too")
    parser.add_argument("--skip", nargs="+", action="extend", default=[], metavar="NAME",
                        help="Conv node or weight names to leave dense")
    parser.add_argument("--force", nargs="+", action="extend", default=[], metavar="NAME",
                        help="Conv node or weight names to prune even if the default rule keeps them dense")
    parser.add_argument("--plot", metavar="PNG", help="also write a bar chart of kernel-shape frequencies")
    parser.set_defaults(func=run_prune)


def run_prune(args: argparse.Namespace) -> int:
    """Prune, write the model (and plot), print the per-layer summary; exit code 0."""
    both = sorted(set(args.skip) & set(args.force))
    if both:
        raise PatDNNError(f"layer(s) both skipped and forced: {', '.join(both)}")
    for path in [args.output] + ([args.plot] if args.plot else []):  # fail before the (slow) pruning
        check_output_path(path)
    layers = {name: False for name in args.skip} | {name: True for name in args.force}
    result = prune_onnx(
        args.model,
        n_patterns=args.patterns,
        connectivity=args.connectivity,
        entries=args.entries,
        layers=layers,
        first_layer_dense=args.first_layer_dense,
        force_centre=args.force_centre,
    )
    # The plot first: if it cannot be written, neither is the model (nothing is written unless the
    # command succeeds); if the model then cannot be written, a plot that is new goes again.
    new_plot = bool(args.plot) and not Path(args.plot).exists()
    if args.plot:
        from .plots import plot_pattern_frequencies

        plot_pattern_frequencies(
            result.frequencies, args.plot, title=f"Kernel shapes of {Path(args.model).name}",
            selected=result.pattern_set,
        )
    try:
        save_model_atomic(result.model, args.output)
    except BaseException:
        if new_plot:
            Path(args.plot).unlink(missing_ok=True)
        raise
    print(result.summary())
    print(f"wrote {args.output}")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0
