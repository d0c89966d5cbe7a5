"""The ``patdnn prune`` subcommand: one-shot PatDNN pruning of an ONNX model."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import PatDNNError
from ..fileio import check_output_path
from .onnx_prune import prune_onnx, save_model_atomic
from .projection import parse_block

__all__ = ["add_prune_command"]


def _rate(text: str) -> float | None:
    """A ``--connectivity``/``--pointwise``/``--fc`` value: a rate, or ``none``/``off`` to disable."""
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rate >= 1 or 'none', got {text!r}") from None


def _block(text: str) -> tuple[int, int]:
    """``--pointwise-block`` value such as ``4x1`` (output x input channels)."""
    try:
        return parse_block(text)
    except PatDNNError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_prune_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``prune`` on the main CLI's subparsers; the handler is ``args.func``."""
    parser = subparsers.add_parser(
        "prune",
        help="pattern- and connectivity-prune the 3x3 (and 1x1) convolutions of an ONNX model",
        description=(
            "One-shot PatDNN pruning: choose the most frequent kernel shapes of the pretrained "
            "weights as the pattern set, project every prunable 3x3 kernel onto its best "
            "pattern and keep 1/RATE of each layer's kernels; keep 1/RATE of each 1x1 conv's "
            "weights in blocks of output channels (and of FC weights with --fc). Retrain "
            "afterwards to recover accuracy."
        ),
    )
    parser.add_argument("model", help="input ONNX model")
    parser.add_argument("-o", "--output", required=True, help="where to write the pruned ONNX model")
    parser.add_argument("--patterns", type=int, default=8, metavar="N",
                        help="size of the pattern set (PatDNN uses 8; the compiler handles up to 12; default %(default)s)")
    parser.add_argument("--connectivity", type=_rate, default=3.6, metavar="RATE",
                        help="keep round(kernels/RATE) kernels per layer; 'none' disables "
                             "(default %(default)s)")
    parser.add_argument("--pointwise", type=_rate, default=4.0, metavar="RATE",
                        help="keep round(blocks/RATE) weight blocks of every 1x1 conv; 'none' leaves 1x1 convs "
                             "dense (default %(default)s)")
    parser.add_argument("--pointwise-block", type=_block, default=(4, 1), metavar="OxI",
                        help="granularity of 1x1/FC pruning: output x input channels kept or removed together, "
                             "e.g. 4x1, 8x1, 1x4, 1x1 (unstructured) (default 4x1)")
    parser.add_argument("--fc", type=_rate, default=None, metavar="RATE",
                        help="also keep round(blocks/RATE) blocks of every Gemm weight but the last (default: FC dense)")
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
        pointwise=args.pointwise,
        pointwise_block=args.pointwise_block,
        fc=args.fc,
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
