"""Winograd vs the direct dense kernel vs ONNX Runtime on the 3x3 stride-1 layers of ResNet-50 and VGG-16.

Per layer (Conv 3x3 pad 1 + bias + ReLU at batch 1 fp32, He-normal weights; ResNet-50's 64@56²,
128@28², 256@14², 512@7²; VGG-16's layers with 64-512 channels at 224x224 and at CIFAR 32x32;
two 32-channel layers that probe the pass's channel threshold), measured side by side in one
process in interleaved rounds (the box is shared), medians reported:

- ``F(2x2)``, ``F(4x4)``, ``F(6x6)``: the Winograd kernel of ``tvm_patdnn/ops/winograd_conv.py``
  with that output tile forced (``WinogradConvRewrite(tile=m)``), the rest of the default pipeline;
- ``dense``: what ``DenseConvRewrite`` picks for the layer (the direct kernels), i.e. the
  pipeline without Winograd;
- ``ORT``: onnxruntime, ``ORT_ENABLE_ALL``, as many intra-op threads as TVM has.

GFLOP/s are *effective*: the direct conv's FLOPs (2 x 9 x C x F x pixels) over the time, and as a
share of the fp32 FMA peak measured at the start (``machine.py``); Winograd can exceed 100%.
Speed-ups are medians of the per-round ratios. Every variant's output is checked against ORT
(relative 1e-3) before timing, and its error against a float64 conv of the same inputs is
recorded (``err``: max abs error / max |output|).

``--models vgg16_cifar resnet50`` also times those dense models whole (``models.dense_model``,
BN folded, random weights): the default pipeline (``winograd``) against the same pipeline after
``DenseConvRewrite`` took every dense conv (``no winograd``) and ORT.

    TVM_NUM_THREADS=1 .venv/bin/python -m benchmarks.winograd [--rounds 5] [--layers 0 3 ...]
        [--models vgg16_cifar resnet50] [--json benchmarks/results/winograd.1t.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import tvm
from onnx import numpy_helper
from tvm import relax

from tvm_patdnn.fileio import write_bytes_atomic
from tvm_patdnn.frontend import import_onnx
from tvm_patdnn.pipeline import get_pipeline
from tvm_patdnn.targets import resolve_target, vector_lanes, vector_registers
from tvm_patdnn.transform import DenseConvRewrite, WinogradConvRewrite

from .machine import machine_summary
from .models import dense_conv_model, dense_model
from .runtimes import agree, ort_runner, tvm_runner

# (group, in channels, out channels, input size): 3x3 stride-1 pad-1 convs.
LAYERS = [
    ("ResNet-50", 64, 64, 56), ("ResNet-50", 128, 128, 28), ("ResNet-50", 256, 256, 14), ("ResNet-50", 512, 512, 7),
    ("VGG-16 224", 64, 64, 224), ("VGG-16 224", 64, 128, 112), ("VGG-16 224", 128, 128, 112),
    ("VGG-16 224", 128, 256, 56), ("VGG-16 224", 256, 256, 56), ("VGG-16 224", 256, 512, 28),
    ("VGG-16 224", 512, 512, 28), ("VGG-16 224", 512, 512, 14),
    ("VGG-16 CIFAR", 64, 64, 32), ("VGG-16 CIFAR", 64, 128, 16), ("VGG-16 CIFAR", 128, 128, 16),
    ("VGG-16 CIFAR", 128, 256, 8), ("VGG-16 CIFAR", 256, 256, 8), ("VGG-16 CIFAR", 256, 512, 4),
    ("VGG-16 CIFAR", 512, 512, 4), ("VGG-16 CIFAR", 512, 512, 2),
    ("threshold probe", 32, 32, 56), ("threshold probe", 32, 32, 14),
]
TILES = {"F(2x2)": 2, "F(4x4)": 4, "F(6x6)": 6}
RTOL = 1e-3


def compile_variant(model: onnx.ModelProto, variant: str, target: tvm.target.Target):
    """The executable of ``variant`` (see the module docstring): the conv rewritten first, then
    the default pipeline (which finds nothing left to rewrite). ``winograd`` is the default
    pipeline as is, ``no winograd`` the pipeline after ``DenseConvRewrite`` took every dense conv."""
    mod = relax.transform.FoldConstant()(import_onnx(model).mod)
    registers, lanes = vector_registers(target), vector_lanes(target)
    if variant in ("dense", "no winograd"):
        mod = DenseConvRewrite(registers, lanes)(mod)
    elif variant in TILES:
        mod = WinogradConvRewrite(registers, lanes, tile=TILES[variant])(mod)
    return tvm.compile(mod, target, relax_pipeline=get_pipeline(target))


def float64_conv(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Conv (pad 1) + bias + ReLU of ``dense_conv_model``'s weights in float64."""
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    w, b = weights["w"], weights["b"]
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    h, wd = x.shape[2], x.shape[3]
    out = np.zeros((x.shape[0], w.shape[0], h, wd))
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("fc,nchw->nfhw", w[:, :, dy, dx], padded[:, :, dy:dy + h, dx:dx + wd], optimize=True)
    return np.maximum(out + b.reshape(1, -1, 1, 1), 0)


def measure(model: onnx.ModelProto, variants: list[str], build: Callable, threads: int, rounds: int,
            exact: Callable | None = None) -> tuple[dict, dict]:
    """(ms of every variant (``build(model, variant)``) and ORT in each interleaved round, error of
    each against ``exact(model, x)`` (float64) when given)."""
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    ort = ort_runner(model, x, threads)
    runners = {"ORT": ort}
    expected = ort.output()
    reference = exact(model, x) if exact is not None else None
    errors = {"ORT": agree(expected, reference)} if reference is not None else {}
    for variant in variants:
        runners[variant] = tvm_runner(build(model, variant), x)
        output = runners[variant].output()
        if agree(output, expected) > RTOL:
            raise RuntimeError(f"{variant} differs from ORT by {agree(output, expected):.1e}")
        if reference is not None:
            errors[variant] = agree(output, reference)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            times[name].append(runner.time())
    return times, errors


def ratio(times: dict[str, list[float]], slower: str, faster: str) -> float:
    """Median over rounds of ``slower``'s time / ``faster``'s in the same round."""
    return statistics.median(a / b for a, b in zip(times[slower], times[faster]))


def layer_table(rows: list[dict], peak: float) -> str:
    variants = ["ORT", "dense", *TILES]
    head = ("| layer | MFLOP | " + " | ".join(f"{v} ms" for v in variants)
            + " | best | best GFLOP/s (% peak) | best vs dense | best vs ORT | err F(2x2) / F(4x4) / F(6x6) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        ms = {v: statistics.median(row["ms"][v]) for v in variants}
        best = min(["dense", *TILES], key=ms.get)
        gflops = row["mflop"] / ms[best]
        errors = " / ".join(f"{row['error'][t]:.1e}" for t in TILES)
        lines.append(
            f"| {row['layer']} | {row['mflop']:.0f} | " + " | ".join(f"{ms[v]:.3f}" for v in variants)
            + f" | {best} | {gflops:.1f} ({100 * gflops / peak:.0f}%) | {ratio(row['ms'], 'dense', best):.2f}x"
            + f" | {ratio(row['ms'], 'ORT', best):.2f}x | {errors} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, nargs="*", help="indices into LAYERS (default: all)")
    parser.add_argument("--models", nargs="*", default=[], choices=["vgg16_cifar", "resnet50", "vgg16"],
                        help="also these dense models whole (models.py's builders): with and without Winograd")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    threads = int(os.environ.get("TVM_NUM_THREADS", "1"))
    target = resolve_target("x86")
    with tempfile.TemporaryDirectory() as scratch:
        machine = machine_summary([threads], Path(scratch))
    peak = machine["fma_peak_gflops"][str(threads)]
    print(f"{machine['cpu']}, {threads} thread(s), {machine['fma_isa']} FMA peak {peak:.1f} GFLOP/s", flush=True)

    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine, "threads": threads,
              "target": str(target), "rounds": args.rounds, "layers": [], "table": "", "models": {}}

    def save() -> None:
        """Write what is measured so far (a long run keeps its layers if a model fails)."""
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(args.json, json.dumps(result, indent=2, allow_nan=True).encode())

    def build(model: onnx.ModelProto, variant: str):
        return compile_variant(model, variant, target)

    for index in args.layers if args.layers is not None else range(len(LAYERS)):
        group, in_c, out_c, size = LAYERS[index]
        times, errors = measure(dense_conv_model(in_c, out_c, size, 1, 3), ["dense", *TILES], build, threads, args.rounds,
                                float64_conv)
        name = f"{group} {in_c}->{out_c} {size}x{size}"
        result["layers"].append({"layer": name, "mflop": 2 * 9 * in_c * out_c * size * size / 1e6, "ms": times,
                                 "error": errors})
        print(f"{name}: " + ", ".join(f"{k} {statistics.median(v):.3f} ms" for k, v in times.items())
              + "; err " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()), flush=True)
    if result["layers"]:
        result["table"] = layer_table(result["layers"], peak)
        print("\n" + result["table"])
        save()
    for name in args.models:
        times, _ = measure(dense_model(name), ["winograd", "no winograd"], build, threads, args.rounds)
        result["models"][name] = times
        print(f"{name} dense, {threads} thread(s): "
              + ", ".join(f"{k} {statistics.median(v):.2f} ms" for k, v in times.items())
              + f"; winograd vs no winograd {ratio(times, 'no winograd', 'winograd'):.2f}x,"
              + f" vs ORT {ratio(times, 'ORT', 'winograd'):.2f}x", flush=True)
        save()
    if args.json:
        print(f"results in {args.json}")

if __name__ == "__main__":
    main()
