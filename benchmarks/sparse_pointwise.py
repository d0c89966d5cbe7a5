"""Sparse 1x1 convs: the block-sparse pointwise kernel vs our dense 1x1 kernel vs ONNX Runtime, per layer.

Every distinct 1x1 conv of ResNet-50 (Conv + bias + ReLU, batch 1 fp32, He-normal weights from
``models.dense_conv_model``), pruned by the project's projection (``project_pointwise``: the largest
(4, 1) blocks kept, 1 in ``--rate``). Side by side in one process, interleaved rounds, medians:

- ``sparse``: ``tvm_patdnn.compile`` of the pruned layer (the kernel of ``ops/sparse_pointwise.py``);
- ``dense``: ``tvm_patdnn.compile`` of the unpruned layer (our dense 1x1 kernel, the baseline the
  issue's goal is stated against: >= 3x at 4x);
- ``ORT``: onnxruntime on the unpruned layer (``ORT_ENABLE_ALL``, as many threads; zeros do not
  speed it up).

Effective GFLOP/s count the dense layer's multiply-adds; "% peak" is the sparse kernel's *kept*
multiply-adds against the widest-ISA FMA peak measured first (``machine.py``). Every output is
checked against ORT on the same (pruned or dense) weights first.

    TVM_NUM_THREADS=1 .venv/bin/python -m benchmarks.sparse_pointwise [--rate 4] [--rounds 5]
        [--json benchmarks/results/sparse_pointwise.1t.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import onnx
import tvm
from onnx import numpy_helper

import tvm_patdnn
from tvm_patdnn.fileio import write_bytes_atomic
from tvm_patdnn.ops.sparse_pointwise import BLOCK, block_density
from tvm_patdnn.pruning.projection import project_pointwise

from .dense import RESNET50_CONVS
from .machine import machine_summary, tvm_threads
from .models import dense_conv_model
from .runtimes import agree, ort_runner, time_ms, vm_of

RTOL = 1e-3


def pruned(model: onnx.ModelProto, rate: float) -> onnx.ModelProto:
    """``model`` with its conv weight projected onto (BLOCK, 1) blocks, 1 in ``rate`` kept."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    weight = next(t for t in copy.graph.initializer if t.name == "w")
    weight.CopyFrom(numpy_helper.from_array(project_pointwise(numpy_helper.to_array(weight), rate, (BLOCK, 1)), "w"))
    return copy


def measure_layer(shape: tuple, rate: float, rounds: int, threads: int) -> dict:
    in_c, out_c, size, stride, _ = shape
    dense_model = dense_conv_model(in_c, out_c, size, stride, 1)
    sparse_model = pruned(dense_model, rate)
    x = np.random.default_rng(1).standard_normal((1, in_c, size, size)).astype(np.float32)
    tx = tvm.runtime.tensor(x)
    runners = {}
    for name, model in (("sparse", sparse_model), ("dense", dense_model)):
        compiled = tvm_patdnn.compile(model, "x86", tuning_db=False)
        kinds = [r.kind for r in compiled.report]
        if kinds != ["sparse" if name == "sparse" else "dense"]:
            raise RuntimeError(f"{name} layer compiled as {kinds}")
        vm = vm_of(compiled.executable)
        error = agree(vm["main"](tx).numpy(), ort_runner(model, x, threads).output())
        if error > RTOL:
            raise RuntimeError(f"{name} differs from ORT by {error:.1e}")
        runners[name] = (lambda vm=vm: time_ms(vm, tx, number=1))
    ort = ort_runner(dense_model, x, threads)
    runners["ORT"] = ort.time
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            times[name].append(run())
    out = (size - 1) // stride + 1
    weight = numpy_helper.to_array(next(t for t in sparse_model.graph.initializer if t.name == "w"))
    return {"layer": f"1x1 {in_c}->{out_c} {size}x{size}" + (f" s{stride}" if stride > 1 else ""),
            "dense_mflop": 2 * in_c * out_c * out * out / 1e6,
            "kept_blocks": block_density(weight, BLOCK), "ms": times}


def ratio(times: dict, num: str, den: str) -> float:
    """Median over rounds of ``num``'s time / ``den``'s in the same round."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def table(rows: list[dict], peak: float) -> str:
    lines = ["| layer | kept blocks | sparse ms | dense ms | ORT ms | sparse vs dense | sparse vs ORT | "
             "sparse effective GFLOP/s | kept GFLOP/s (% peak) |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ms = {k: statistics.median(v) for k, v in row["ms"].items()}
        kept = row["dense_mflop"] * row["kept_blocks"] / ms["sparse"]
        lines.append(f"| {row['layer']} | {row['kept_blocks']:.3f} | {ms['sparse']:.3f} | {ms['dense']:.3f} | "
                     f"{ms['ORT']:.3f} | {ratio(row['ms'], 'dense', 'sparse'):.2f}x | "
                     f"{ratio(row['ms'], 'ORT', 'sparse'):.2f}x | {row['dense_mflop'] / ms['sparse']:.0f} | "
                     f"{kept:.0f} ({100 * kept / peak:.0f}%) |")
    total = {k: sum(statistics.median(r["ms"][k]) for r in rows) for k in ("sparse", "dense", "ORT")}
    lines.append(f"| all layers (sum) | | {total['sparse']:.3f} | {total['dense']:.3f} | {total['ORT']:.3f} | "
                 f"{total['dense'] / total['sparse']:.2f}x | {total['ORT'] / total['sparse']:.2f}x | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=4.0, help="pointwise pruning rate (1 block in RATE kept)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the raw times and the machine here")
    args = parser.parse_args()
    threads = tvm_threads()
    machine = machine_summary([threads])
    peak = machine["fma_peak_gflops"][str(threads)]
    print(f"{machine['cpu']}, {machine['fma_isa']} FMA peak {peak:.0f} GFLOP/s on {threads} thread(s)", flush=True)
    rows = []
    for shape in (s for s in RESNET50_CONVS if s[4] == 1):
        rows.append(measure_layer(shape, args.rate, args.rounds, threads))
        print(table(rows[-1:], peak).splitlines()[2], flush=True)
    print(table(rows, peak))
    if args.json:
        write_bytes_atomic(args.json, json.dumps({"machine": machine, "threads": threads, "rate": args.rate,
                                                  "rows": rows}, indent=1).encode())


if __name__ == "__main__":
    main()
