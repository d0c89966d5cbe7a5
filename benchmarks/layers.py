"""Pattern conv vs TVM's dense conv on single layers, measured side by side in one run.

Layers are PatDNN's two reference shapes (64ch 56x56 and 256ch 14x14, 3x3, stride 1) with
weights pruned by the project's own pruning core from Gaussian weights: 8 magnitude-chosen
patterns only (2.25x fewer weights) and 8 patterns + 3.6x connectivity (8x). Each is compared
with the same layer unpruned on TVM's dense path, both with TVM's default pipeline (conv2d
left unscheduled) and with our default dense schedule rule. Modules are timed in interleaved
rounds (this box is shared and noisy) and the table reports medians and ratios.

    TVM_NUM_THREADS=1 .venv/bin/python -m benchmarks.layers [--rounds 5] [--json out.json]

The thread count is TVM's (``TVM_NUM_THREADS``, read when the runtime starts): calling
``runtime.config_threadpool`` later does not change it. "% of peak" is against the widest FMA
unit of the host (``machine.py``), measured on as many threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import tvm

import tvm_patdnn
from tvm_patdnn.fileio import write_bytes_atomic
from tvm_patdnn.frontend import import_onnx
from tvm_patdnn.pruning import project_pattern_and_connectivity, select_pattern_set
from tvm_patdnn.targets import resolve_target

from .machine import add_peak_percent, cpu_name, fma_peak_gflops, tvm_threads, widest_isa
from .models import conv3x3_model
from .runtimes import time_ms, vm_of

LAYERS = [("64ch 56x56", 64, 56), ("256ch 14x14", 256, 14)]
PRUNINGS = [("2.25x (8 patterns)", None), ("8x (8 patterns + 3.6x conn.)", 3.6)]


def save_results(path: Path, target, rounds: int, rows: list[dict], peak_gflops: float | None = None) -> None:
    """Write the rows with when/where they were measured (atomically) and say where; with the
    FMA peak the rows' percentages are taken against, when they have some."""
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": cpu_name(),
            "target": str(target), "rounds": rounds, "threads": tvm_threads()}
    if peak_gflops is not None:
        meta.update(fma_isa=widest_isa(), fma_peak_gflops=peak_gflops)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, json.dumps({"meta": meta, "rows": rows}, indent=2).encode())
    print(f"\n{meta['date']}, {meta['target']}; results in {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/layers.json"))
    args = parser.parse_args()

    target = resolve_target("x86")
    peak_before = fma_peak_gflops(tvm_threads())  # the widest FMA this host has, on TVM's threads
    rows = []
    for layer_name, channels, size in LAYERS:
        rng = np.random.default_rng(0)
        dense_weight = (rng.standard_normal((channels, channels, 3, 3)) / np.sqrt(channels * 9)).astype(np.float32)
        patterns = select_pattern_set([dense_weight], n_patterns=8)
        dense_model = conv3x3_model(dense_weight, size)
        x = tvm.runtime.tensor(rng.standard_normal((1, channels, size, size)).astype(np.float32))
        modules = {
            "tvm dense, default pipeline": vm_of(tvm.compile(import_onnx(dense_model).mod, target)),
            "tvm dense, patdnn dense rule": vm_of(tvm_patdnn.compile(dense_model, target).executable),
        }
        pattern_keys = []
        for pruning_name, rate in PRUNINGS:
            weight = project_pattern_and_connectivity(dense_weight, patterns, rate)
            compiled = tvm_patdnn.compile(conv3x3_model(weight, size), target)
            assert compiled.report[0].kind == "pattern", compiled.report[0]
            key = f"pattern {pruning_name}"
            modules[key] = vm_of(compiled.executable)
            pattern_keys.append((key, compiled.report[0]))
        reference = modules["tvm dense, default pipeline"]["main"](x).numpy()
        check = modules["tvm dense, patdnn dense rule"]["main"](x).numpy()
        assert np.allclose(check, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max()), "dense outputs differ"

        threads = tvm_threads()
        samples = {name: [] for name in modules}
        for _ in range(args.rounds):
            for name, vm in modules.items():
                samples[name].append(time_ms(vm, x, number=3))
        median = {name: statistics.median(values) for name, values in samples.items()}
        for key, record in pattern_keys:
            rows.append(
                {
                    "layer": layer_name,
                    "pruning": key.removeprefix("pattern "),
                    "threads": threads,
                    "pattern_ms": median[key],
                    "dense_default_ms": median["tvm dense, default pipeline"],
                    "dense_rule_ms": median["tvm dense, patdnn dense rule"],
                    "speedup_vs_default": median["tvm dense, default pipeline"] / median[key],
                    "speedup_vs_dense_rule": median["tvm dense, patdnn dense rule"] / median[key],
                    "nonzero_gflops": record.nonzero_flops / median[key] / 1e6,
                    "dense_gflops_rule": record.dense_flops / median["tvm dense, patdnn dense rule"] / 1e6,
                }
            )

    peak = add_peak_percent(rows, peak_before)
    header = ("| layer | pruning | threads | pattern ms | TVM dense default ms | TVM dense + our rule ms | speedup vs default "
              f"| speedup vs dense rule | pattern nonzero GFLOP/s | % of {widest_isa()} FMA peak | dense GFLOP/s |")
    print(header)
    print("|" + "---|" * 11)
    for r in rows:
        print(
            f"| {r['layer']} | {r['pruning']} | {r['threads']} | {r['pattern_ms']:.2f} | {r['dense_default_ms']:.1f} | "
            f"{r['dense_rule_ms']:.2f} | {r['speedup_vs_default']:.1f}x | {r['speedup_vs_dense_rule']:.2f}x | "
            f"{r['nonzero_gflops']:.1f} | {r['nonzero_peak_percent']:.0f}% | {r['dense_gflops_rule']:.1f} |"
        )
    print(f"\nFMA peak ({widest_isa()}, {tvm_threads()} thread(s)): {peak:.1f} GFLOP/s")
    save_results(args.json, target, args.rounds, rows, peak)


if __name__ == "__main__":
    main()
