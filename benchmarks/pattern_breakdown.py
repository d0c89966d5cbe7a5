"""Where a pattern conv's time goes: the default build of a layer, timed with its kernel runs
changed and nothing else.

The TE operator's time is three parts that cannot be timed apart in one compiled function: the
work per layer that does not depend on the kernels (the pad, the register tile's init and output
stage, the memory traffic of input and output), the cost of each (filter, pattern) run (loop
entry and exit, a mispredicted exit when run lengths vary), and the kernel loop. The same
compiled function is called with other ``offsets`` (the FKW run boundaries), so the code and the
memory it touches stay the same and only the run lengths change:

* **empty runs**: every run empty; what remains is the fixed part (and the run checks);
* **runs of 1** and **runs of 2**: every (filter, pattern) run the same length. The second kernel
  of a run adds only the kernel loop's work, so runs of 2 - runs of 1 gives the kernel loop's own
  rate (its FMA work per second, as a % of the FMA peak), and the first kernel's extra time over
  the second, (runs of 1 - empty runs) - (runs of 2 - runs of 1), what entering and leaving the
  runs costs (the loop's setup and exit, the register tile's stores between runs).

The three parts do not add up exactly to the default: a loop of real run lengths (mean 2-9
kernels) reaches a steadier state than runs of 2, and its exits are mispredicted more often.

Outputs of all but the default are wrong (only the default is checked against numpy). Times are
process CPU time in rotated rounds, 1 thread; run pinned (``taskset -c 1``):

    taskset -c 1 env TVM_NUM_THREADS=1 .venv/bin/python -m benchmarks.pattern_breakdown \
        --model vgg16_trunk --layers /2/Conv /5/Conv /7/Conv --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import tvm

from tvm_patdnn.analysis import analyze_conv_weight
from tvm_patdnn.fkw import pack_fkw
from tvm_patdnn.ops.pattern_conv import PatternConvSpec, target_layout
from tvm_patdnn.targets import accumulator_registers, resolve_target, vector_lanes

from .layers import save_results
from .machine import cpu_peak_gflops, widest_isa
from .models import twins
from .optimisations import VARIANTS, build, pattern_layers, reference_conv
from .runtimes import cpu_ms, rotated_rounds


def uniform_offsets(n_runs: int, length: int) -> np.ndarray:
    """FKW run boundaries with every run ``length`` kernels long (kernels 0 .. n_runs * length - 1)."""
    return (np.arange(n_runs + 1) * length).astype(np.int32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg16_trunk", choices=["vgg16_cifar", "vgg16_trunk", "resnet50"])
    parser.add_argument("--layers", nargs="+", help="only these layers (e.g. /2/Conv); default: all")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/pattern_breakdown.1t.json"))
    args = parser.parse_args()

    target = resolve_target("x86")
    peak_before = cpu_peak_gflops()
    rng = np.random.default_rng(0)
    rows = []
    for name, weight, bias, shape, stride in pattern_layers(twins(args.model).pruned):
        if args.layers and name not in args.layers:
            continue
        x = rng.standard_normal(shape).astype(np.float32)
        expected = reference_conv(x, weight, bias, stride)
        fkw = pack_fkw(weight, analyze_conv_weight(weight))
        fn, weights = build(fkw, bias, shape, target, VARIANTS["default"], stride)
        out = tvm.runtime.tensor(np.zeros(expected.shape, np.float32))
        call = [tvm.runtime.tensor(x), *weights, out]
        fn["main"](*call)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-3, atol=1e-3, err_msg=name)
        n_runs = len(fkw.offsets) - 1
        if 2 * n_runs > len(fkw.channels):
            print(f"{name}: fewer than 2 kernels per (filter, pattern) run, skipped")
            continue
        runs = {"default": weights[2], "empty runs": tvm.runtime.tensor(np.zeros(n_runs + 1, np.int32)),
                "runs of 1": tvm.runtime.tensor(uniform_offsets(n_runs, 1)),
                "runs of 2": tvm.runtime.tensor(uniform_offsets(n_runs, 2))}
        timers = {label: (lambda offsets=offsets: cpu_ms(fn["main"], [*call[:3], offsets, *call[4:]], min_ms=50))
                  for label, offsets in runs.items()}
        ms = {label: statistics.median(values) for label, values in rotated_rounds(timers, args.rounds).items()}
        # one kernel of every run over the whole (padded) output: taps x output vectors FMAs of 2 x lanes flops
        spec = target_layout(PatternConvSpec.from_fkw(fkw, shape, (stride, stride), (1, 1, 1, 1), True, True,
                                                      vector_lanes(target)), accumulator_registers(target))
        kernel_flops = n_runs * spec.taps * spec.acc_rows * spec.acc_columns * 2
        per_kernel_ms = ms["runs of 2"] - ms["runs of 1"]
        mean_run = len(fkw.channels) / n_runs
        rows.append({"layer": name, "shape": f"{weight.shape[0]}x{weight.shape[1]} {shape[2]}x{shape[3]}"
                     + (f" s{stride}" if stride > 1 else ""), "ms": ms, "mean_run": mean_run,
                     "kernel_loop_gflops": kernel_flops / per_kernel_ms / 1e6,
                     "run_entry_ms": (ms["runs of 1"] - ms["empty runs"]) - per_kernel_ms,
                     "nonzero_gflops": 2 * np.count_nonzero(weight) * expected.shape[2] * expected.shape[3]
                     / ms["default"] / 1e6})
        print(f"{name}: " + ", ".join(f"{label} {value:.3f}" for label, value in ms.items()), flush=True)

    peak = max(peak_before, cpu_peak_gflops())
    print("\n| layer | weight, input | default ms | % of peak | empty runs ms (share) | run entry and exit ms (share) "
          "| mean run | kernel loop % of peak |")
    print("|" + "---|" * 8)
    for r in rows:
        default = r["ms"]["default"]
        r.update(nonzero_peak_percent=100 * r["nonzero_gflops"] / peak,
                 kernel_loop_peak_percent=100 * r["kernel_loop_gflops"] / peak)
        print(f"| {r['layer']} | {r['shape']} | {default:.2f} | {r['nonzero_peak_percent']:.0f}% | "
              f"{r['ms']['empty runs']:.2f} ({r['ms']['empty runs'] / default:.0%}) | "
              f"{r['run_entry_ms']:.2f} ({r['run_entry_ms'] / default:.0%}) | {r['mean_run']:.1f} | "
              f"{r['kernel_loop_peak_percent']:.0f}% |")
    print(f"\nFMA peak ({widest_isa()}, 1 thread): {peak:.1f} GFLOP/s. Kernel loop: the FMA work of one more kernel "
          "per run (padded lanes included) over the time it adds (runs of 2 - runs of 1).")
    save_results(args.json, target, args.rounds, rows, peak)


if __name__ == "__main__":
    main()
