"""The pattern conv's layout on an AVX-512 host: vector lanes x accumulators, per layer, side by side.

Each 3x3 pattern layer (the twelve of VGG-16 CIFAR 8x, plus VGG-16 224 trunk and ResNet-50 3x3
shapes pruned at 8x = 8 patterns + 3.6x connectivity from Gaussian weights) is built once per
layout — the operator padded to ``lanes``-wide vectors with a register tile of ``accumulators``
vectors (``choose_layout``), scheduled by the default rule — for the host CPU (AVX-512) and for an
AVX2 build of the same code on the same host (``mcpu=znver3``), checked against numpy and timed
in interleaved rounds. "rule" is the layout :class:`~tvm_patdnn.transform.PatternConvRewrite`
picks for the host target (on AVX-512: the (pixel x tap) kernel for 2x2 images, else
``target_layout``'s AVX-512 rules: fused wide rows, lifted and aligned rows, measured on Zen 5, and
``cheapest_layout``'s cycle model over 16- and 8-lane layouts for the rest); "N lanes xA" is
``choose_layout``'s rule (lane fill, then the largest tile) for N-lane vectors and A accumulators
(the AVX-512 default before the cycle model: 16 lanes x16). ``--variants`` adds layouts by kind,
register tile, lanes and tap partial sums (``lifted:7x2``, ``aligned:7x1:8``, ``windows:1x1:p4``),
timed on the layers they build for. Ratios are the first layout's time / each layout's (above 1:
faster than the first: by default the AVX2 build). Both targets get the host's core count, so the
default knobs are the same. Times are process CPU time per call (1 thread: the calls run on this
thread), which a second process sharing the core disturbs far less than wall time.

    taskset -c 1 env TVM_NUM_THREADS=1 .venv/bin/python -m benchmarks.pattern_avx512 [--rounds 5] \\
        [--sets cifar vgg224 resnet50] [--layouts "avx2 8x8" rule] [--variants lifted:7x2 aligned:7x2]
    taskset -c 1 env TVM_NUM_THREADS=1 .venv/bin/python -m benchmarks.pattern_avx512 --whole \\
        [--models vgg16_cifar vgg16_trunk resnet50] [--rounds 9]

``--whole`` times whole pruned models (``tvm_patdnn.compile``; VGG-16 CIFAR unless ``--models``)
for the host and the AVX2 target instead, untuned (no tuning database) and, for VGG-16 CIFAR's
AVX2 build, also with the records shipped for it, and ONNX Runtime. On an AVX2 host it compares
the AVX2 rule with and without the windows layout for 4x4 outputs (untuned and with the shipped
records) and ONNX Runtime instead (VGG-16 CIFAR only).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
from pathlib import Path
from unittest import mock

import numpy as np
import tvm

from tvm_patdnn.analysis import analyze_conv_weight
from tvm_patdnn.fkw import FKWWeight, pack_fkw
from tvm_patdnn.ops.pattern_conv import PatternConvSpec, cheapest_layout, choose_layout, pattern_conv2d_primfunc
from tvm_patdnn.ops.pattern_conv_2x2 import pattern_conv_2x2_primfunc, tap_lanes_apply
from tvm_patdnn.pruning import project_pattern_and_connectivity, select_pattern_set
from tvm_patdnn.schedule_rules import PatternConvCPU
from tvm_patdnn.targets import accumulator_registers, resolve_target, vector_lanes

from .layers import save_results
from .machine import cpu_peak_gflops, tvm_threads, widest_isa
from .models import twins
from .optimisations import pattern_layers, reference_conv
from .runtimes import cpu_ms, rotated_rounds

# (filters, channels, size, stride) of the extra layer sets, 8x pruned from Gaussian weights.
EXTRA_SETS = {
    "vgg224": [(64, 64, 224, 1), (128, 128, 112, 1), (256, 256, 56, 1), (512, 512, 28, 1), (512, 512, 14, 1)],
    "resnet50": [(64, 64, 56, 1), (128, 128, 28, 1), (256, 256, 14, 1), (512, 512, 7, 1), (128, 128, 56, 2)],
}
AVX2 = {"kind": "llvm", "mcpu": "znver3"}
# label -> (AVX2 build?, lanes, accumulators); None: the target's own (the rule's choice)
LAYOUTS = {
    "avx2 8x8": (True, None, None),
    "rule": (False, None, None),
    "16 lanes x16": (False, 16, 16),
    "8 lanes x8": (False, 8, 8),
    "8 lanes x16": (False, 8, 16),
    "8 lanes x24": (False, 8, 24),
    "16 lanes x24": (False, 16, 24),
}


def layer_sets(names: list[str]) -> list[tuple[str, str, np.ndarray, np.ndarray, tuple, int]]:
    """(set, layer, weight, bias, input shape, stride) of every layer of the named sets."""
    layers = []
    if "cifar" in names:
        layers += [("cifar", name, w, b, shape, stride)
                   for name, w, b, shape, stride in pattern_layers(twins("vgg16_cifar").pruned)]
    for set_name in names:
        for filters, channels, size, stride in EXTRA_SETS.get(set_name, []):
            rng = np.random.default_rng(size)
            dense = (rng.standard_normal((filters, channels, 3, 3)) / np.sqrt(channels * 9)).astype(np.float32)
            weight = project_pattern_and_connectivity(dense, select_pattern_set([dense], 8), 3.6)
            bias = rng.standard_normal(filters).astype(np.float32) * 0.1
            layers.append((set_name, f"{filters}x{channels} {size}x{size} s{stride}", weight, bias,
                           (1, channels, size, size), stride))
    return layers


@dataclasses.dataclass(frozen=True)
class Variant:
    """A layout given on the command line, ``KIND:ROWSxCOLUMNS[:LANES][:pQ]``: KIND one of rows,
    aligned, lifted, haloless (lifted rows without a stored halo), fused (rows layouts), flat, windows;
    the register tile, vector lanes (16 unless given) and tap partial sums (1 unless given)."""

    kind: str
    rows: int
    columns: int
    lanes: int = 16
    partials: int = 1

    @classmethod
    def parse(cls, text: str) -> Variant:
        kind, tile, *rest = text.split(":")
        if kind not in ("rows", "aligned", "lifted", "haloless", "fused", "flat", "windows"):
            raise argparse.ArgumentTypeError(f"unknown layout kind {kind!r} in {text!r}")
        rows, columns = (int(v) for v in tile.split("x"))
        lanes = next((int(r) for r in rest if not r.startswith("p")), 16)
        partials = next((int(r[1:]) for r in rest if r.startswith("p")), 1)
        return cls(kind, rows, columns, lanes, partials)

    def layout(self, spec: PatternConvSpec) -> PatternConvSpec:
        base = dataclasses.replace(spec, vector_width=self.lanes, row_tile=1, column_tile=1, partials=1,
                                   flat=self.kind == "flat", windows=self.kind == "windows", lifted=False,
                                   aligned=False, fused=False, lifted_halo=True)
        return dataclasses.replace(base, row_tile=self.rows, column_tile=self.columns, partials=self.partials,
                                   lifted=self.kind in ("lifted", "haloless"), aligned=self.kind == "aligned",
                                   fused=self.kind == "fused", lifted_halo=self.kind != "haloless")


def build(fkw: FKWWeight, bias, shape, stride: int, target, lanes: int | None, accumulators: int | None,
          variant: Variant | None = None):
    """The layer compiled with the target's layout (``lanes`` and ``variant`` None), with
    ``choose_layout``'s register tile for ``lanes``-wide vectors and ``accumulators`` registers, or
    with ``variant``'s layout; default schedule."""
    spec = PatternConvSpec.from_fkw(fkw, shape, (stride, stride), (1, 1, 1, 1), True, True,
                                    vector_lanes(target), accumulator_registers(target))
    order = np.argsort(fkw.order).astype(np.int32)
    if lanes is None and variant is None and tap_lanes_apply(spec, vector_lanes(target)):  # as PatternConvRewrite
        func, order, layout = pattern_conv_2x2_primfunc(spec), fkw.order, "2x2 tap lanes"
    else:
        if variant is not None:
            spec = variant.layout(spec)
        elif lanes is not None:
            spec = choose_layout(dataclasses.replace(spec, vector_width=lanes), accumulators)
        func = PatternConvCPU().apply(pattern_conv2d_primfunc(spec), target, False).mod["main"]
        kind = (" flat" if spec.flat else " windows" if spec.windows else " lifted" if spec.lifted and spec.lifted_halo
                else " lifted, no halo" if spec.lifted else " aligned" if spec.aligned else "")
        layout = f"{spec.vector_width}l r{spec.row_tile} c{spec.column_tile} q{spec.partials}{kind}"
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    args = [fkw.values, fkw.channels, fkw.offsets, order, bias]
    return lib.mod, [tvm.runtime.tensor(a) for a in args], layout


def _without_windows(spec: PatternConvSpec, accumulators: int, flat: bool | None = None) -> PatternConvSpec:
    """``target_layout`` as it was before session 6 on 8-lane targets: no windows (4x4 outputs flat)."""
    if spec.vector_width == 16:
        return cheapest_layout(spec, accumulators, (16, 8), flat)
    return choose_layout(spec, accumulators, flat)


def whole_model(rounds: int, host, avx2, name: str = "vgg16_cifar") -> None:
    """A pruned model of ``benchmarks/models.py`` whole (VGG-16 CIFAR 8x by default), per build: median
    process CPU ms per inference, interleaved rounds.

    On an AVX-512 host: the host build against the AVX2 build (and, for VGG-16 CIFAR, the AVX2 build
    with the records shipped for it). On an AVX2 host (VGG-16 CIFAR only): the AVX2 rule with
    and without the windows layout for 4x4 outputs (the layout before session 6), each untuned and
    with the shipped records (which cover the flat 4x4 workloads, not the windows ones), and ONNX
    Runtime (1 intra-op thread; sparsity does not change its work) as the yardstick."""
    import onnxruntime as ort

    import tvm_patdnn

    model = twins(name).pruned
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    before = mock.patch("tvm_patdnn.ops.pattern_conv.target_layout", _without_windows)
    if vector_lanes(host) == 16:
        builds = {"AVX-512 (host), untuned": (host, False, None), "AVX2 (znver3), untuned": (avx2, False, None)}
        if name == "vgg16_cifar":
            builds["AVX2 (znver3), shipped records"] = (avx2, None, None)
    elif name != "vgg16_cifar":
        raise SystemExit("on an AVX2 host --whole compares VGG-16 CIFAR builds only")
    else:
        builds = {"AVX2 no windows (before), untuned": (avx2, False, before),
                  "AVX2 rule (windows at 4x4), untuned": (avx2, False, None),
                  "AVX2 no windows (before), shipped records": (avx2, None, before),
                  "AVX2 rule (windows at 4x4), shipped records": (avx2, None, None)}
    calls, outputs = {}, []
    for label, (target, tuning_db, patch) in builds.items():
        with patch or contextlib.nullcontext():
            compiled = tvm_patdnn.compile(model, target, tuning_db=tuning_db)
        if tuning_db is None:
            print(f"{label}: {compiled.schedules}", flush=True)
        vm = compiled.vm
        calls[label] = (vm["main"], [tvm.runtime.tensor(x)])
        outputs.append(compiled.run({"input": x})[0])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    calls["ONNX Runtime"] = (lambda feed: session.run(None, feed), [{"input": x}])
    outputs.append(session.run(None, {"input": x})[0])
    for got in outputs[1:]:
        np.testing.assert_allclose(got, outputs[0], rtol=1e-3, atol=1e-4)
    order = list(calls)
    samples = rotated_rounds({label: lambda call=call: cpu_ms(*call, min_ms=100) for label, call in calls.items()},
                             rounds)
    base, ort_ms = statistics.median(samples[order[0]]), statistics.median(samples["ONNX Runtime"])
    for label, values in samples.items():
        ms = statistics.median(values)
        per_round = [o / v for o, v in zip(samples["ONNX Runtime"], values)]
        print(f"| {name} 8x, whole | {label} | {ms:.3f} ms | {order[0]} / this: {base / ms:.2f}x | "
              f"ORT / this: {ort_ms / ms:.2f}x (rounds {min(per_round):.2f}-{max(per_round):.2f}x) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sets", nargs="+", default=["cifar", "vgg224", "resnet50"])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS))
    parser.add_argument("--variants", nargs="+", default=[], type=Variant.parse, metavar="KIND:RxC[:LANES][:pQ]",
                        help="more layouts, timed on the layers they build for (e.g. lifted:7x2 aligned:7x1:8 "
                             "windows:1x1:p4); a layout that does not apply to a layer is left out there")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/pattern_avx512.1t.json"))
    parser.add_argument("--whole", action="store_true", help="time whole models instead (--models)")
    parser.add_argument("--models", nargs="+", default=["vgg16_cifar"],
                        choices=["vgg16_cifar", "vgg16_trunk", "resnet50"], help="with --whole (AVX-512 hosts: any)")
    args = parser.parse_args()

    host = resolve_target("x86")  # as many cores as the runtime's threads (TVM_NUM_THREADS)
    avx2 = resolve_target({**AVX2, "num-cores": int(host.attrs["num-cores"])})  # the same count
    if args.whole:
        for name in args.models:
            whole_model(args.rounds, host, avx2, name)
        return
    threads = tvm_threads()
    peak = cpu_peak_gflops()
    rng = np.random.default_rng(0)
    rows = []
    for set_name, name, weight, bias, shape, stride in layer_sets(args.sets):
        x = rng.standard_normal(shape).astype(np.float32)
        expected = reference_conv(x, weight, bias, stride)
        out = tvm.runtime.tensor(np.zeros(expected.shape, np.float32))
        fkw = pack_fkw(weight, analyze_conv_weight(weight))
        timers, layouts = {}, {}
        for label in args.layouts:
            is_avx2, lanes, accumulators = LAYOUTS[label]
            fn, weights, layouts[label] = build(fkw, bias, shape, stride, avx2 if is_avx2 else host, lanes, accumulators)
            call_args = [tvm.runtime.tensor(x), *weights, out]
            fn["main"](*call_args)
            np.testing.assert_allclose(out.numpy(), expected, rtol=1e-3, atol=1e-3, err_msg=f"{name}, {label}")
            timers[label] = (fn["main"], call_args)
        for variant in args.variants:
            label = f"{variant.kind}:{variant.rows}x{variant.columns}:{variant.lanes}:p{variant.partials}"
            try:
                fn, weights, layouts[label] = build(fkw, bias, shape, stride, host, None, None, variant)
            except (ValueError, tvm.error.InternalError) as err:  # the layout does not apply to this layer
                print(f"{set_name} {name}: {label} left out ({type(err).__name__}: {str(err)[:120]})", flush=True)
                continue
            call_args = [tvm.runtime.tensor(x), *weights, out]
            fn["main"](*call_args)
            np.testing.assert_allclose(out.numpy(), expected, rtol=1e-3, atol=1e-3, err_msg=f"{name}, {label}")
            timers[label] = (fn["main"], call_args)
        samples = rotated_rounds({label: lambda call=call: cpu_ms(*call) for label, call in timers.items()}, args.rounds)
        median = {label: statistics.median(values) for label, values in samples.items()}
        flops = 2 * np.count_nonzero(weight) * expected.shape[2] * expected.shape[3]
        rows.append({"set": set_name, "layer": name, "shape": f"{weight.shape[0]}x{weight.shape[1]} {shape[2]}x{shape[3]}",
                     "threads": threads, "ms": median, "layouts": layouts, "nonzero_mflop": flops / 1e6,
                     "nonzero_gflops": flops / median[args.layouts[0]] / 1e6})
        print(f"{set_name} {name}: " + ", ".join(f"{label} {ms:.3f} ({layouts[label]})" for label, ms in median.items()),
              flush=True)

    peak = max(peak, cpu_peak_gflops())
    for row in rows:
        row["nonzero_peak_percent"] = 100 * row["nonzero_gflops"] / peak
    labels = list(args.layouts) + list(dict.fromkeys(label for r in rows for label in r["ms"] if label not in LAYOUTS))
    base = labels[0]
    print("\n| set | layer | " + " | ".join(f"{label} ms" for label in labels) + " | "
          + " | ".join(f"{label} GFLOP/s (% peak)" for label in labels) + f" | {base} / layout |")
    print("|" + "---|" * (3 + 2 * len(labels)))
    groups = {}
    for r in rows:
        groups.setdefault(r["set"], []).append(r)
    summary = []
    for set_name, group in groups.items():
        summary.append({"set": set_name, "layer": "**all**", "nonzero_mflop": sum(r["nonzero_mflop"] for r in group),
                        "ms": {lab: sum(r["ms"][lab] for r in group) for lab in labels
                               if all(lab in r["ms"] for r in group)}})

    def cell(r: dict, lab: str, text) -> str:
        return text(r["ms"][lab]) if lab in r["ms"] else "-"

    for r in rows + summary:
        def rate(ms: float, r: dict = r) -> str:
            return f"{r['nonzero_mflop'] / ms:.1f} ({100 * r['nonzero_mflop'] / ms / peak:.0f}%)"

        gflops = " | ".join(cell(r, lab, rate) for lab in labels)
        ratios = " ".join(cell(r, lab, lambda ms: f"{r['ms'][base] / ms:.2f}") for lab in labels[1:])
        print(f"| {r['set']} | {r['layer']} | " + " | ".join(cell(r, lab, lambda ms: f"{ms:.3f}") for lab in labels)
              + f" | {gflops} | {ratios} |")
    print(f"\nFMA peak ({widest_isa()}, 1 thread, CPU time): {peak:.1f} GFLOP/s; last column: {base} time / each "
          f"other layout's time ({', '.join(labels[1:])}).")
    save_results(args.json, host, args.rounds, rows + summary, peak)


if __name__ == "__main__":
    main()
