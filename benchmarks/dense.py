"""Dense layers: tvm_patdnn's dense conv kernel vs ONNX Runtime vs the old dense schedule rule.

Per layer (every distinct dense conv of ResNet-50: the 1x1s, the 3x3s and the 7x7 stem, each as
Conv + bias + ReLU at batch 1 fp32, random weights), measured side by side in one process, in
interleaved rounds (the box is shared), medians reported:

- ``tvm_patdnn``: the default pipeline (``compile(model, "x86", tuning_db=False)``), i.e. the
  kernel ``DenseConvRewrite`` chooses per layer;
- ``gemm+direct`` (whole model only): ``DenseConvRewrite``'s choice alone, without the other
  kernels of the default pipeline (Winograd, depthwise, fully connected);
- ``1x1 on gemm`` / ``1x1 on direct`` (whole model only): the default pipeline with every 1x1 conv
  on that kernel (what ``kernel_for``'s 1x1 choice is worth in the whole model);
- ``gemm`` / ``direct``: every dense conv forced onto the packed-GEMM kernel of
  ``tvm_patdnn/ops/dense_conv.py`` (KxK only with >= 4 x lanes filters) or onto the direct kernel
  of ``tvm_patdnn/ops/direct_conv.py`` (``DenseConvRewrite(kernel=...)``);
- ``tuned``: the default pipeline with each dense layer on the kernel ``tvm_patdnn.tune`` measured
  fastest among its candidates (``tune(model, trials=0, database=--db)``: the dense kernel choices
  only; one database for the whole run, so a layer measured once is not measured again);
- ``ORT``: onnxruntime, ``ORT_ENABLE_ALL``, as many intra-op threads as TVM has;
- ``old rule``: the legalized conv2d with the ``DenseConv2dCPU`` schedule (``dense_kernels=False``);
- with ``--ablations``, the GEMM kernel with one optimisation taken away at a time: ``no panel
  copy`` (1x1 stride 1 only: the micro-kernel reads the NCHW input in place), ``1 pixel
  vector`` (register tile of 1 pixel vector x more filters instead of 2 vectors), ``pixels
  outer`` (the usual loop order also where the weights reach 2 MB, see ``filters_outer`` in
  ``tvm_patdnn/ops/dense_conv.py``) and ``no output prefetch`` (``DenseConvRewrite``'s kernels with a
  GEMM that does not prefetch the residual and output lines its epilogue reads and writes,
  ``prefetch_output``; also a whole-model variant, to compare with ``gemm+direct``: the layers
  alone keep their outputs in cache, a model's residual adds read theirs from L3 or memory);
- ``filters outer`` (``--variants`` only): the GEMM with its filter tiles outside on every layer.

Each layer's GFLOP/s is also given as a share of the fp32 FMA peak measured at the start with the
widest ISA the host has (``machine.py``); speed-ups are medians of the per-round ratios (the load
of the shared box changes between rounds more than within one). ``--resnet50`` adds the whole
dense ResNet-50 (``models.dense_model("resnet50")``, BN folded) against ORT, the GEMM kernel alone and the old
rule. Every
variant's output is checked against ORT (relative 1e-3) before anything is timed.

    TVM_NUM_THREADS=1 .venv/bin/python -m benchmarks.dense [--rounds 5] [--resnet50] [--ablations]
        [--layers 0 1 ...] [--variants gemm direct tuned ...] [--db DIR] [--target '{"kind":"llvm","mcpu":"znver3"}']
        [--json benchmarks/results/dense.1t.json]

``--target`` builds every tvm_patdnn variant for another CPU than the host's (e.g. the AVX2 build of the
same kernels on an AVX-512 host); ORT is ORT either way.

The thread count is TVM's ``TVM_NUM_THREADS``, read when the runtime starts (one process per
thread count).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import tvm
from tvm import relax

import tvm_patdnn
from tvm_patdnn.fileio import write_bytes_atomic
from tvm_patdnn.frontend import import_onnx
from tvm_patdnn.ops.dense_conv import DenseConvSpec
from tvm_patdnn.pipeline import get_pipeline
from tvm_patdnn.targets import resolve_target, vector_lanes, vector_registers
from tvm_patdnn.transform import DenseConvRewrite
from tvm_patdnn.transform.dense_conv_rewrite import DenseConvRewriter

from .machine import machine_summary, tvm_threads
from .models import dense_conv_model, dense_model
from .runtimes import agree, ort_runner, tvm_runner

# (in channels, out channels, input size, stride, kernel): the distinct dense convs of ResNet-50
# v1.5 (stride on the 3x3), 1x1 first, then the 3x3s and the 7x7 stem (padding kernel // 2).
RESNET50_CONVS = [
    (64, 64, 56, 1, 1), (64, 256, 56, 1, 1), (256, 64, 56, 1, 1), (256, 128, 56, 1, 1), (256, 512, 56, 2, 1),
    (128, 512, 28, 1, 1), (512, 128, 28, 1, 1), (512, 256, 28, 1, 1), (512, 1024, 28, 2, 1),
    (256, 1024, 14, 1, 1), (1024, 256, 14, 1, 1), (1024, 512, 14, 1, 1), (1024, 2048, 14, 2, 1),
    (512, 2048, 7, 1, 1), (2048, 512, 7, 1, 1),
    (3, 64, 224, 2, 7), (64, 64, 56, 1, 3), (128, 128, 56, 2, 3), (128, 128, 28, 1, 3), (256, 256, 28, 2, 3),
    (256, 256, 14, 1, 3), (512, 512, 14, 2, 3), (512, 512, 7, 1, 3),
]
RTOL = 1e-3
VARIANTS = ["tvm_patdnn", "gemm", "direct", "old rule", "no panel copy", "1 pixel vector", "pixels outer",
            "no output prefetch", "filters outer", "tuned"]
ABLATIONS = ["no panel copy", "1 pixel vector", "pixels outer", "no output prefetch"]
MODEL_VARIANTS = ["1x1 on gemm", "1x1 on direct", "gemm+direct", "no output prefetch", "gemm", "old rule", "tuned"]


class PointwiseOnly(DenseConvRewriter):
    """``DenseConvRewrite`` on the 1x1 convs only: run before the default pipeline, it puts them on
    the kernel it is told to and leaves every other conv to the pipeline."""

    def kernel_for(self, spec: DenseConvSpec) -> str | None:
        return super().kernel_for(spec) if spec.kernel == (1, 1) else None


def compile_variant(model: onnx.ModelProto, variant: str, target: tvm.target.Target, database: Path | None = None):
    """The compiled model of one variant (see the module docstring)."""
    if variant == "tvm_patdnn":
        return tvm_patdnn.compile(model, target, tuning_db=False).executable
    if variant == "tuned":
        tvm_patdnn.tune(model, target, trials=0, database=database, progress=sys.stdout)
        return tvm_patdnn.compile(model, target, tuning_db=database).executable
    mod = relax.transform.FoldConstant()(import_onnx(model).mod)
    if variant.startswith("1x1 on "):
        rewrite = tvm.transform.module_pass(PointwiseOnly, opt_level=0, name="PointwiseOnly")
        mod = rewrite(vector_registers(target), vector_lanes(target), kernel=variant.split()[-1])(mod)
        return tvm.compile(mod, target, relax_pipeline=get_pipeline(target))
    if variant != "old rule":
        options = {"gemm": {"kernel": "gemm"}, "direct": {"kernel": "direct"}, "gemm+direct": {},
                   "no panel copy": {"kernel": "gemm", "pack_panel": False},
                   "1 pixel vector": {"kernel": "gemm", "vectors": 1},
                   "pixels outer": {"kernel": "gemm", "filters_outer": False},
                   "no output prefetch": {"prefetch_output": False},
                   "filters outer": {"kernel": "gemm", "filters_outer": True}}[variant]
        mod = DenseConvRewrite(vector_registers(target), vector_lanes(target), **options)(mod)
    return tvm.compile(mod, target, relax_pipeline=get_pipeline(target, dense_kernels=False))


def measure(model: onnx.ModelProto, variants: list[str], target, threads: int, rounds: int,
            may_fail: tuple[str, ...] = (), database: Path | None = None) -> dict[str, list[float]]:
    """ms of every variant and ORT in each of ``rounds`` interleaved rounds, after checking outputs;
    a variant in ``may_fail`` that does not compile is reported and left out."""
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    ort = ort_runner(model, x, threads)
    runners = {"ORT": ort}
    expected = ort.output()
    for variant in variants:
        try:
            runners[variant] = tvm_runner(compile_variant(model, variant, target, database), x)
        except tvm_patdnn.PatDNNError as err:
            if variant not in may_fail:
                raise
            print(f"{variant} left out: {err}", flush=True)
            continue
        error = agree(runners[variant].output(), expected)
        if error > RTOL:
            raise RuntimeError(f"{variant} differs from ORT by {error:.1e}")
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            times[name].append(runner.time())
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}


def speedup(times: dict[str, list[float]], over: str, ours: str = "tvm_patdnn") -> float:
    """Median over rounds of ``over``'s time / ``ours``'s in the same round."""
    return statistics.median(a / b for a, b in zip(times[over], times[ours]))


def layer_table(rows: list[dict], peak: float, variants: list[str]) -> str:
    """Per layer: ms of every variant, GFLOP/s (% of peak) of the chosen kernel, the GEMM, the direct
    kernel and ORT, and the chosen kernel's speed-ups."""
    rated = ["tvm_patdnn", "gemm", "direct", "ORT"]
    head = "| layer | MFLOP | chosen | " + " | ".join(f"{v} ms" for v in ["ORT", *variants]) + " | " + \
        " | ".join(f"{v} GFLOP/s (% peak)" for v in rated) + " | vs ORT | vs GEMM | vs old rule |" + \
        (" tuned vs ORT | tuned vs default |" if "tuned" in variants else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        ms = medians(row["ms"])
        rates = [row["mflop"] / ms[v] for v in rated]  # MFLOP/ms = GFLOP/s
        lines.append(
            f"| {row['layer']} | {row['mflop']:.0f} | {row['chosen']} | "
            + " | ".join(f"{ms[v]:.3f}" for v in ["ORT", *variants]) + " | "
            + " | ".join(f"{r:.1f} ({100 * r / peak:.0f}%)" for r in rates)
            + f" | {speedup(row['ms'], 'ORT'):.2f}x | {speedup(row['ms'], 'gemm'):.2f}x"
            + f" | {speedup(row['ms'], 'old rule'):.2f}x |"
            + (f" {speedup(row['ms'], 'ORT', 'tuned'):.2f}x | {speedup(row['ms'], 'tvm_patdnn', 'tuned'):.2f}x |"
               if "tuned" in variants else "")
        )
    total = {v: sum(medians(r["ms"])[v] for r in rows) for v in ["ORT", *variants]}
    lines.append("| all layers (sum) | " + f"{sum(r['mflop'] for r in rows):.0f} | | "
                 + " | ".join(f"{total[v]:.3f}" for v in ["ORT", *variants]) + " | " + " | " * (len(rated) - 1)
                 + f" | {total['ORT'] / total['tvm_patdnn']:.2f}x | {total['gemm'] / total['tvm_patdnn']:.2f}x"
                 + f" | {total['old rule'] / total['tvm_patdnn']:.2f}x |"
                 + (f" {total['ORT'] / total['tuned']:.2f}x | {total['tvm_patdnn'] / total['tuned']:.2f}x |"
                    if "tuned" in variants else ""))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--resnet50", action="store_true", help="also the whole dense ResNet-50")
    parser.add_argument("--layers", type=int, nargs="*", help="indices into RESNET50_CONVS (default: all)")
    parser.add_argument("--ablations", action="store_true", help="also the GEMM kernel's ablations")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS[1:], default=VARIANTS[1:4],
                        help="what runs beside tvm_patdnn and ORT (the table needs gemm and old rule for its ratios)")
    parser.add_argument("--model-variants", nargs="*", choices=MODEL_VARIANTS, default=MODEL_VARIANTS,
                        help="what runs beside tvm_patdnn and ORT on the whole ResNet-50")
    parser.add_argument("--target", default="x86",
                        help='x86 (the host CPU) or target JSON, e.g. \'{"kind":"llvm","mcpu":"znver3"}\' for AVX2')
    parser.add_argument("--db", type=Path, help="the tuning database of the tuned variant (default: a fresh one)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not {"gemm", "old rule"} <= set(args.variants):
        parser.error("--variants must include gemm and 'old rule': the layer table's ratios are against them")
    threads = tvm_threads()
    target = resolve_target(args.target)
    with tempfile.TemporaryDirectory() as scratch:
        machine = machine_summary([threads], Path(scratch))
    database = args.db or Path(tempfile.mkdtemp(prefix="dense-db-"))
    peak = machine["fma_peak_gflops"][str(threads)]
    print(f"{machine['cpu']}, {threads} thread(s), {machine['fma_isa']} FMA peak {peak:.1f} GFLOP/s", flush=True)

    variants = ["tvm_patdnn", *args.variants]
    variants += ABLATIONS if args.ablations else []
    chooser = DenseConvRewrite(vector_registers(target), vector_lanes(target))
    rows = []
    for index in args.layers if args.layers is not None else range(len(RESNET50_CONVS)):
        in_c, out_c, size, stride, kernel = RESNET50_CONVS[index]
        out = (size + 2 * (kernel // 2) - kernel) // stride + 1
        pointwise = kernel == 1 and stride == 1
        layer_variants = [v for v in variants if pointwise or v != "no panel copy"]
        ms = measure(dense_conv_model(in_c, out_c, size, stride, kernel), layer_variants, target, threads, args.rounds,
                     database=database)
        name = f"{kernel}x{kernel} {in_c}->{out_c} {size}x{size}" + (f" s{stride}" if stride != 1 else "")
        spec = DenseConvSpec(batch=1, in_channels=in_c, height=size, width=size, out_channels=out_c,
                             kernel=(kernel, kernel), strides=(stride, stride), padding=(kernel // 2,) * 4)
        rows.append({"layer": name, "mflop": 2 * in_c * kernel * kernel * out_c * out * out / 1e6, "ms": ms,
                     "chosen": chooser.kernel_for(spec)})
        print(f"{name}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in medians(ms).items()), flush=True)
    for row in rows:
        for variant in {*variants, *VARIANTS[:4]}:
            row["ms"].setdefault(variant, [float("nan")])
    table = layer_table(rows, peak, variants) if rows else ""
    print("\n" + table)

    models = {}
    if args.resnet50:
        times = measure(dense_model("resnet50"), ["tvm_patdnn", *args.model_variants], target, threads,
                        args.rounds, may_fail=("tvm_patdnn",), database=database)
        models["resnet50"] = times
        print(f"\nResNet-50 dense, {threads} thread(s): " + ", ".join(f"{k} {v:.1f} ms" for k, v in medians(times).items()))
        for ours in [v for v in ("tvm_patdnn", "gemm+direct", "tuned") if v in times]:
            print(f"{ours}: " + ", ".join(f"vs {other} {speedup(times, other, ours):.2f}x"
                                         for other in times if other != ours))

    if args.json:
        result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine, "threads": threads,
                  "target": str(target), "rounds": args.rounds, "layers": rows, "models": models, "table": table}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(args.json, json.dumps(result, indent=2, allow_nan=True).encode())
        print(f"results in {args.json}")


if __name__ == "__main__":
    main()
