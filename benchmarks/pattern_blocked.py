"""The channel-blocked pattern conv against the default operator, layer by layer, in one run.

Every stride-1 pattern layer of the chosen models (``benchmarks/models.py``: VGG-16 224 trunk,
ResNet-50's 3x3 layers, VGG-16 CIFAR) is built with the default TE operator and schedule and
with the channel-blocked kernel (:mod:`tvm_patdnn.ops.pattern_conv_blocked`: its default layout,
and any ``--layouts ROWSxCOLUMNS/BLOCK`` given), each checked against a numpy convolution, then
timed in interleaved rounds (process CPU time: run at 1 thread). The ratio is default / blocked
(above 1: the blocked kernel is faster); GFLOP/s count the nonzero work, against the FMA peak
measured in the same run (``benchmarks.machine``); "routed" says whether ``PatternConvRewrite``
gives the layer the blocked kernel (``blocked_applies``). ``--lanes 8 16`` builds the blocked kernel
for both vector widths (an AVX-512 host runs both):

    taskset -c 1 env TVM_NUM_THREADS=1 .venv/bin/python -m benchmarks.pattern_blocked \\
        --model vgg16_trunk resnet50 --unique --rounds 7 [--layouts 2x4/32 4x2/48] [--lanes 8 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

import numpy as np
import tvm

from tvm_patdnn.analysis import analyze_conv_weight
from tvm_patdnn.fkw import FKWWeight, pack_fkw
from tvm_patdnn.ops.pattern_conv import PatternConvSpec
from tvm_patdnn.ops.pattern_conv_blocked import (LANES, BlockedLayout, blocked_applies, blocked_layout,
                                                 blocked_weights, pattern_conv_blocked_primfunc)
from tvm_patdnn.targets import resolve_target, vector_lanes

from .layers import save_results
from .machine import add_peak_percent, cpu_peak_gflops, widest_isa
from .models import twins
from .optimisations import VARIANTS, build, pattern_layers, reference_conv
from .runtimes import cpu_ms, rotated_rounds


def build_blocked(fkw: FKWWeight, bias: np.ndarray, layout: BlockedLayout, target) -> tuple:
    """The blocked kernel of ``layout``, compiled, and its weight arguments."""
    func = pattern_conv_blocked_primfunc(layout).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target)
    values, taps, starts = blocked_weights(fkw, layout)
    return lib, [tvm.runtime.tensor(a) for a in (values, taps, starts, fkw.order, bias)]


def _parse_layout(text: str) -> tuple[int, int, int]:
    tile, block = text.split("/")
    rows, columns = tile.split("x")
    return int(rows), int(columns), int(block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["vgg16_trunk"],
                        choices=["vgg16_trunk", "resnet50", "vgg16_cifar"])
    parser.add_argument("--layers", nargs="+", help="only these layers (ONNX node names); default: all stride-1 ones")
    parser.add_argument("--unique", action="store_true", help="one layer per shape, the others counted with it")
    parser.add_argument("--layouts", nargs="*", default=[], type=_parse_layout,
                        help="more blocked layouts to time, ROWSxCOLUMNS/BLOCK (e.g. 2x4/32)")
    parser.add_argument("--lanes", nargs="+", type=int, choices=LANES,
                        help="the blocked kernel's vector lanes (default: the host's widest, 8 or 16)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/pattern_blocked.1t.json"))
    args = parser.parse_args()

    target = resolve_target("x86")
    peak_before = cpu_peak_gflops()
    rng = np.random.default_rng(0)
    rows = []
    for model in args.model:
        layers = [layer for layer in pattern_layers(twins(model).pruned) if layer[4] == 1]
        shapes = [(weight.shape, shape) for _name, weight, _bias, shape, _stride in layers]
        for (name, weight, bias, shape, _stride), key in zip(layers, shapes):
            if args.layers and name not in args.layers or args.unique and layers[shapes.index(key)][0] != name:
                continue
            count = shapes.count(key) if args.unique else 1
            x = rng.standard_normal(shape).astype(np.float32)
            expected = reference_conv(x, weight, bias)
            fkw = pack_fkw(weight, analyze_conv_weight(weight))
            builds = {"default": build(fkw, bias, shape, target, VARIANTS["default"])}
            for lanes in args.lanes or [vector_lanes(target)]:
                spec = PatternConvSpec.from_fkw(fkw, shape, (1, 1), (1, 1, 1, 1), True, True, lanes)
                for rows_, columns, block in [(None, None, None), *args.layouts]:
                    layout = blocked_layout(spec, rows_, columns, block)
                    lanes_label = "" if args.lanes is None else f"-{lanes}"
                    label = f"blocked{lanes_label} {layout.row_tile}x{layout.column_tile}/{layout.block}"
                    builds.setdefault(label, build_blocked(fkw, bias, layout, target))
            calls = {}
            for label, (lib, weights) in builds.items():
                out = tvm.runtime.tensor(np.zeros(expected.shape, np.float32))
                call_args = [tvm.runtime.tensor(x), *weights, out]
                lib["main"](*call_args)
                np.testing.assert_allclose(out.numpy(), expected, rtol=1e-3, atol=1e-3, err_msg=f"{name}, {label}")
                calls[label] = (lib["main"], call_args)
            samples = rotated_rounds({label: lambda call=call: cpu_ms(*call, min_ms=50) for label, call in calls.items()},
                                     args.rounds)
            median = {label: statistics.median(values) for label, values in samples.items()}
            best = min((label for label in median if label != "default"), key=median.get)
            flops = 2 * np.count_nonzero(weight) * expected.shape[2] * expected.shape[3]
            rows.append({"model": model, "layer": name + (f" (x{count})" if count > 1 else ""), "count": count,
                         "shape": f"{weight.shape[0]}x{weight.shape[1]} {shape[2]}x{shape[3]}", "ms": median,
                         "best": best,
                         "routed": blocked_applies(dataclasses.replace(spec, vector_width=vector_lanes(target))), "nonzero_gflops": flops / median[best] / 1e6,
                         "default_gflops": flops / median["default"] / 1e6})
            print(f"{model} {name}: " + ", ".join(f"{label} {ms:.3f}" for label, ms in median.items()), flush=True)

    peak = add_peak_percent(rows, peak_before)
    labels = sorted({label for r in rows for label in r["ms"] if label != "default"})
    print(f"\n| model | layer | weight, input | default ms | default % of peak | "
          + " | ".join(f"{label}: default / it" for label in labels) + " | best | best % of peak | routed |")
    print("|" + "---|" * (8 + len(labels)))
    for r in rows:
        ratios = " | ".join(f"{r['ms']['default'] / r['ms'][label]:.2f}x" if label in r["ms"] else "-"
                            for label in labels)
        print(f"| {r['model']} | {r['layer']} | {r['shape']} | {r['ms']['default']:.3f} | "
              f"{100 * r['default_gflops'] / peak:.0f}% | {ratios} | {r['best']} | {r['nonzero_peak_percent']:.0f}% | "
              f"{'yes' if r['routed'] else 'no'} |")
    print(f"\nFMA peak ({widest_isa()}, 1 thread): {peak:.1f} GFLOP/s.")
    save_results(args.json, target, args.rounds, rows, peak)


if __name__ == "__main__":
    main()
