"""What each pattern-conv optimisation is worth, layer by layer, measured side by side in one run.

The twelve pattern layers of the shipped benchmark model (VGG-16 CIFAR pruned to 8 magnitude-
chosen patterns + 3.6x connectivity, ``benchmarks/models.py``) are built with the default
operator and schedule for this machine, and again with one optimisation taken away at a time:

* code per pattern: pattern and tap loops unrolled so every tap offset is a constant
  (without: the offsets are looked up per tap at run time);
* bounded kernel runs: each (filter, pattern) kernel loop runs to its own length
  (without: to the layer's longest run, guarded);
* register tile: rows x columns of output vectors accumulate in registers, and the input vectors
  their taps share are loaded once (without: one output vector at a time);
* tap partial sums: small tiles split each vector's sum over the taps into independent chains;
* flat small-image layouts: 4x4 and 2x2 outputs computed over the flattened padded image (and,
  on AVX-512 and for 4x4 outputs on AVX2, over per-channel shifted windows);
* vectorised output stage: the epilogue vectorised along output rows (without: left to LLVM,
  which on AVX-512 targets vectorises it into gathers and scatters);
* filter-kernel reorder: filters sorted by kernel count (without: the model's filter order);
* threads over filters: when an image has few row blocks, threads share its filters too
  (without: row blocks only, so a small image with a single row block runs on one thread);
  "threads always over filters" adds the filters for every layer instead;
* large images (AVX2, and AVX-512 where ``target_layout``'s Zen 5 rules take them; ``--model
  vgg16_trunk`` has the layers they apply to): the tall 4x2 register tile on rows of 112 pixels and more (without: the rule's 1x7), column blocks outside
  the filters with it (without: inside), and the kernel loop's prefetch of the kernel ahead's
  input rows on layers of 256+ channels (without: none);
* lifted rows (AVX2, output rows of 28-111 columns, the tall tile from 56; AVX-512 from 128-256
  input channels, 7x2 tiles): each padded row stored transposed in lane segments so every tap is one aligned vector (without: plain rows, or flat
  where the rule takes it);
* aligned rows (AVX2 rows layouts whose padded input does not grow: ResNet-50's 14x14, 7x7 and
  stride-2 layers to 14 and 7 columns; on AVX-512 also 28 and 56 columns): row and phase pitches of whole vectors, so the centre tap
  (stride 1) or the taps with dx = 0 and 1 (stride 2) are aligned vectors (without: plain rows);
* fused stages (wide rows: VGG-16 224's 224- and 112-pixel layers; on AVX-512 those of at most 64
  input channels): the pad computed per
  column block (all channels, stored compactly, read by every filter from L1) and the output stage
  in the register tile (without: three passes, a padded copy of the whole input and an accumulator
  written and read back); "pad per column block" builds it per row block instead, "pad per block"
  pads the whole image first, "output stage in the tile" runs the output stage as its own pass;
  the narrow tile: fused layers of at most 64 input channels take an 8x1 register tile (without:
  the layout's 4x2);
* tile in registers across runs (every layout): the register tile's buffer on the stack, which LLVM
  keeps in registers from its init to its store (without: in heap workspace, as TVM places a
  "local" buffer, so every (filter, pattern) run ended by storing the whole tile).

Layout alternatives (``--variants "windows 8 lanes 2x2" ...``, not run by default) replace the
default's layout on the layers they apply to (stride 1, at most 16 output pixels: VGG's 4x4 and
2x2 layers; ``--layers conv10 conv11 ...`` times only those) by the windows layout at the given
lanes, column tile and tap partial sums; their ratio is time of the alternative / time of the
default, so below 1 the alternative is faster:

    taskset -c 1 env TVM_NUM_THREADS=1 .venv/bin/python -m benchmarks.optimisations \
        --layers conv10 conv11 conv12 conv14 conv15 conv16 --variants "windows 8 lanes 2x2" \
        "windows 8 lanes 2x4" "windows 8 lanes 1x4" --rounds 9 --json benchmarks/results/optimisations.windows.zen3.1t.json

Every variant is checked against a numpy convolution first. The ratio is time without / time
with (above 1: the optimisation pays); at one thread times are process CPU time, at more wall
time. On AVX-512 hosts this measures the TE operator with the cost model's layouts; the 2x2 layers'
default there is the (pixel x tap) kernel, which ``pattern_avx512.py`` measures. TVM's thread
count is fixed when its runtime starts:

    TVM_NUM_THREADS=1 .venv/bin/python -m benchmarks.optimisations [--rounds 5]
    TVM_NUM_THREADS=2 .venv/bin/python -m benchmarks.optimisations --json benchmarks/results/optimisations.2t.json

``--model vgg16_trunk`` measures the twelve pattern layers of the VGG-16 224 conv trunk instead
(``benchmarks/models.py``, pruned the same way), ``--model resnet50`` ResNet-50's sixteen 3x3
layers (stride-2 ones included; ``--unique`` times one layer per shape and counts it for the
others). TVM binds its one worker thread to core 0 even under ``taskset -c 1`` unless
``TVM_BIND_THREADS=0``:

    TVM_BIND_THREADS=0 TVM_NUM_THREADS=1 taskset -c 1 .venv/bin/python -m benchmarks.optimisations \
        --model vgg16_trunk --variants "tall tile" "column blocks outside" prefetch --rounds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import tvm
from onnx import numpy_helper, shape_inference

from tvm_patdnn.analysis import analyze_conv_weight
from tvm_patdnn.fkw import FKWWeight, pack_fkw
from tvm_patdnn.ops.pattern_conv import WINDOW_PIXELS, PatternConvSpec, pattern_conv2d_primfunc, target_layout
from tvm_patdnn.schedule_rules.kernel_runs import bound_kernel_runs
from tvm_patdnn.schedule_rules.pattern_conv_cpu import ACCUMULATOR_SCOPE, default_knobs, schedule_pattern_conv_cpu
from tvm_patdnn.targets import accumulator_registers, resolve_target, vector_lanes

from .layers import save_results
from .machine import add_peak_percent, cpu_peak_gflops, fma_peak_gflops, tvm_threads, widest_isa
from .models import twins
from .runtimes import cpu_ms, rotated_rounds


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to build a layer: the default, or the default minus one optimisation."""

    code_per_pattern: bool = True
    bounded_runs: bool = True
    register_tile: bool = True
    partials: bool = True
    flat: bool = True
    vector_output: bool = True
    reorder_filters: bool = True
    parallel_filters: bool | None = None  # None: the rule's choice
    tall_tile: bool = True
    columns_outside: bool | None = None  # None: the rule's choice
    prefetch: bool = True
    lifted: bool = True
    aligned: bool = True
    fused: bool = True
    pad: int | None = None  # fused layouts: the pad's location (Knobs.pad); None: the rule's
    output_in_tile: bool = True
    narrow_tile: bool = True
    tile_in_registers: bool = True
    # A layout to compare rather than an optimisation to take away: (lanes, column tile, tap partial
    # sums) of the windows layout, forced on layers it applies to (stride 1, at most 16 output pixels).
    windows: tuple[int, int, int] | None = None


VARIANTS = {
    "default": Variant(),
    "code per pattern": Variant(code_per_pattern=False),
    "bounded kernel runs": Variant(bounded_runs=False),
    "register tile": Variant(register_tile=False),
    "tap partial sums": Variant(partials=False),
    "flat small images": Variant(flat=False),
    "vectorised output": Variant(vector_output=False),
    "filter reorder": Variant(reorder_filters=False),
    "threads over filters": Variant(parallel_filters=False),
    "threads always over filters": Variant(parallel_filters=True),
    "tall tile": Variant(tall_tile=False),
    "column blocks outside": Variant(columns_outside=False),
    "prefetch": Variant(prefetch=False),
    "lifted rows": Variant(lifted=False),
    "aligned rows": Variant(aligned=False),
    "fused stages": Variant(fused=False),
    "pad per column block": Variant(pad=0),  # per row block instead
    "pad per block": Variant(pad=-1),  # the whole padded image first
    "output stage in the tile": Variant(output_in_tile=False),
    "narrow tile": Variant(narrow_tile=False),
    "tile in registers across runs": Variant(tile_in_registers=False),
    # Alternatives, not removals (ratio below 1: the alternative is faster than the default):
    "windows 8 lanes 2x2": Variant(windows=(8, 2, 2)),  # 2 vectors x 2 tap partial sums
    "windows 8 lanes 2x4": Variant(windows=(8, 2, 4)),
    "windows 8 lanes 1x4": Variant(windows=(8, 1, 4)),
}
ALTERNATIVES = [label for label, variant in VARIANTS.items() if variant.windows]


def unsorted(fkw: FKWWeight) -> FKWWeight:
    """The same packing with the filters in the model's order (no filter-kernel reorder)."""
    n_patterns = len(fkw.patterns)
    position = np.argsort(fkw.order)  # reordered index of each original filter
    runs = [(fkw.offsets[position[f] * n_patterns + p], fkw.offsets[position[f] * n_patterns + p + 1])
            for f in range(fkw.out_channels) for p in range(n_patterns)]
    kernels = np.concatenate([np.arange(a, b) for a, b in runs]).astype(np.int64)
    offsets = np.zeros(len(runs) + 1, np.int32)
    offsets[1:] = np.cumsum([b - a for a, b in runs])
    return dataclasses.replace(fkw, order=np.arange(fkw.out_channels, dtype=np.int32), offsets=offsets,
                               channels=fkw.channels[kernels], values=fkw.values[kernels])


def build(fkw: FKWWeight, bias: np.ndarray, data_shape, target, variant: Variant,
          stride: int = 1) -> tuple[Callable, list]:
    """The layer's compiled function and its weight arguments, built the way ``variant`` says."""
    if not variant.reorder_filters:
        fkw = unsorted(fkw)
    accumulators = accumulator_registers(target) if variant.register_tile else 1
    spec = PatternConvSpec.from_fkw(fkw, data_shape, (stride, stride), (1, 1, 1, 1), True, True, vector_lanes(target))
    spec = target_layout(dataclasses.replace(spec, vector_width=vector_lanes(target)), accumulators,
                         flat=None if variant.flat else False, tall_tile=variant.tall_tile,
                         lifted=variant.lifted, aligned=variant.aligned, fused=variant.fused)
    if not variant.partials:
        spec = dataclasses.replace(spec, partials=1)
    if variant.windows and spec.strides == (1, 1) and spec.out_height * spec.out_width <= WINDOW_PIXELS:
        lanes, column_tile, partials = variant.windows
        spec = dataclasses.replace(spec, vector_width=lanes, flat=False, windows=True, aligned=False, row_tile=1,
                                   column_tile=1, partials=partials)
        spec = dataclasses.replace(spec, column_tile=min(column_tile, spec.acc_columns // lanes))
    sch = tvm.s_tir.Schedule(pattern_conv2d_primfunc(spec))
    knobs = default_knobs(sch.mod["main"], int(target.attrs.get("num-cores", 8)), variant.parallel_filters,
                          variant.columns_outside, variant.narrow_tile)
    if knobs.pad is not None and variant.pad is not None:
        knobs = dataclasses.replace(knobs, pad=variant.pad)
    schedule_pattern_conv_cpu(sch, knobs, code_per_pattern=variant.code_per_pattern,  # as PatternConvCPU does
                              vector_output=variant.vector_output, output_in_tile=variant.output_in_tile,
                              accumulator_scope=ACCUMULATOR_SCOPE if variant.tile_in_registers else "local")
    func = bound_kernel_runs(sch.mod["main"], prefetch=variant.prefetch) if variant.bounded_runs else sch.mod["main"]
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    args = [fkw.values, fkw.channels, fkw.offsets, np.argsort(fkw.order).astype(np.int32), bias]
    return lib.mod, [tvm.runtime.tensor(a) for a in args]


def reference_conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int = 1) -> np.ndarray:
    """conv3x3 (pad 1, ``stride``) + bias + ReLU in numpy, the judge of every variant."""
    _, _, h, w = x.shape
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = sum(np.einsum("oc,nchw->nohw", weight[:, :, dy, dx],
                        padded[:, :, dy:dy + h:stride, dx:dx + w:stride]) for dy in range(3) for dx in range(3))
    return np.maximum(out + bias[None, :, None, None], 0.0)


def pattern_layers(model: onnx.ModelProto) -> list[tuple[str, np.ndarray, np.ndarray, tuple, int]]:
    """(name, weight, bias, input shape, stride) of every pattern-sparse conv of ``model`` (all pad 1)."""
    inferred = shape_inference.infer_shapes(model)
    shapes = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
              for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        weight, bias = inits[node.input[1]], inits[node.input[2]]
        if analyze_conv_weight(weight).kind == "pattern":
            strides = [list(a.ints) for a in node.attribute if a.name == "strides"] or [[1, 1]]
            layers.append((node.name, weight, bias, shapes[node.input[0]], int(strides[0][0])))
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/optimisations.1t.json"))
    parser.add_argument("--target", default="x86", help="e.g. '{\"kind\":\"llvm\",\"mcpu\":\"znver3\",\"num-cores\":2}'")
    parser.add_argument("--variants", nargs="+", default=[v for v in list(VARIANTS)[1:] if v not in ALTERNATIVES],
                        help="the optimisations to take away, or alternative layouts: " + ", ".join(ALTERNATIVES))
    parser.add_argument("--layers", nargs="+", help="only these layers (e.g. conv10 conv14); default: all")
    parser.add_argument("--model", default="vgg16_cifar", choices=["vgg16_cifar", "vgg16_trunk", "resnet50"],
                        help="whose pattern layers (benchmarks/models.py)")
    parser.add_argument("--unique", action="store_true",
                        help="time one layer of each shape (weight, input, stride), the others counted with it")
    args = parser.parse_args()

    target = resolve_target(args.target)
    threads = tvm_threads()
    peak_before = cpu_peak_gflops() if threads == 1 else fma_peak_gflops(threads)  # the widest FMA, TVM's threads
    rng = np.random.default_rng(0)
    rows = []
    layers = pattern_layers(twins(args.model).pruned)
    shape_of = {name: (weight.shape, shape, stride) for name, weight, _bias, shape, stride in layers}
    for name, weight, bias, shape, stride in layers:
        if args.layers and name not in args.layers:
            continue
        same = [other for other, key in shape_of.items() if key == shape_of[name]]
        if args.unique and same[0] != name:
            continue
        x = rng.standard_normal(shape).astype(np.float32)
        expected = reference_conv(x, weight, bias, stride)
        out = tvm.runtime.tensor(np.zeros(expected.shape, np.float32))
        fkw = pack_fkw(weight, analyze_conv_weight(weight))
        timers = {}
        for label in ["default", *args.variants]:
            variant = VARIANTS[label]
            fn, weights = build(fkw, bias, shape, target, variant, stride)
            call_args = [tvm.runtime.tensor(x), *weights, out]
            fn["main"](*call_args)
            np.testing.assert_allclose(out.numpy(), expected, rtol=1e-3, atol=1e-3, err_msg=f"{name}, {label}")
            if threads == 1:  # process CPU time: robust to a second process on the core
                timers[label] = lambda fn=fn, call_args=call_args: cpu_ms(fn["main"], call_args, min_ms=50)
            else:
                evaluator = fn.time_evaluator("main", tvm.cpu(), number=5, repeat=1, min_repeat_ms=50)
                timers[label] = lambda evaluator=evaluator, call_args=call_args: evaluator(*call_args).mean * 1e3
        samples = rotated_rounds(timers, args.rounds)
        median = {label: statistics.median(values) for label, values in samples.items()}
        nonzero_flops = 2 * np.count_nonzero(weight) * expected.shape[2] * expected.shape[3]
        count = len(same) if args.unique else 1
        rows.append({"layer": name + (f" (x{count})" if count > 1 else ""),
                     "shape": f"{weight.shape[0]}x{weight.shape[1]} {shape[2]}x{shape[3]}"
                              + (f" s{stride}" if stride > 1 else ""),
                     "threads": threads, "ms": median, "nonzero_gflops": nonzero_flops / median["default"] / 1e6,
                     "count": count})
        print(f"{name}: " + ", ".join(f"{label} {ms:.3f}" for label, ms in median.items()), flush=True)

    peak = add_peak_percent(rows, max(peak_before, cpu_peak_gflops()) if threads == 1 else peak_before)
    labels = list(args.variants)
    print(f"\n| layer | weight, input | threads | default ms | nonzero GFLOP/s | % of {widest_isa()} FMA peak | "
          + " | ".join(labels) + " |")
    print("|" + "---|" * (6 + len(labels)))
    total = {label: sum(r["count"] * r["ms"][label] for r in rows) for label in ["default", *labels]}
    all_flops = sum(r["count"] * r["nonzero_gflops"] * r["ms"]["default"] for r in rows)  # GFLOP/s x ms: the work
    everything = {"layer": "all pattern layers", "shape": "", "threads": threads, "ms": total,
                  "nonzero_gflops": all_flops / total["default"],
                  "nonzero_peak_percent": 100 * all_flops / total["default"] / peak}
    for r in rows + [everything]:
        ratios = " | ".join(f"{r['ms'][label] / r['ms']['default']:.2f}x" for label in labels)
        print(f"| {r['layer']} | {r['shape']} | {r['threads']} | {r['ms']['default']:.3f} | {r['nonzero_gflops']:.1f} "
              f"| {r['nonzero_peak_percent']:.0f}% | {ratios} |")
    print("\nEach ratio: time without that optimisation (or with that alternative layout) / time with everything "
          "(above 1: the optimisation pays; below 1: the alternative is faster). "
          f"FMA peak ({widest_isa()}, {threads} thread(s)): {peak:.1f} GFLOP/s.")
    save_results(args.json, target, args.rounds, rows, peak)


if __name__ == "__main__":
    main()
