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
  ``tvm_patdnn/ops/dense_conv.py`` (KxK only with >= 4 x 8 filters, 4 x 4 on NEON) or onto the direct kernel
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
  alone keep their outputs in cache, a model's residual adds read theirs from L3 or memory) and
  ``wide last tile`` (``DenseConvRewrite``'s kernels with a GEMM whose last pixel tile is a whole
  tile even where one vector covers the pixels left, ``narrow_tail``; also a whole-model variant);
- ``filters outer`` (``--variants`` only): the GEMM with its filter tiles outside on every layer.

With ``--cold`` each layer's sample is the median of single calls, each after the caches were
flushed (a write over twice the L3) and the input read again: the weights (and the output's lines)
come from memory, as in a whole model, whose ~100 MB of weights (ResNet-50) do not stay in the
32 MB L3 between inferences; a warm sample reads them from L2 or L3. Process CPU time, so 1 thread.

Each layer's GFLOP/s is also given as a share of the fp32 FMA peak measured at the start with the
widest ISA the host has (``machine.py``); speed-ups are medians of the per-round ratios (the load
of the shared box changes between rounds more than within one). ``--resnet50`` adds the whole
dense ResNet-50 (``models.dense_model("resnet50")``, BN folded) against ORT, the GEMM kernel alone and the old
rule. Every
variant's output is checked against ORT (relative 1e-3) before anything is timed.

    TVM_NUM_THREADS=1 .venv/bin/python -m benchmarks.dense [--rounds 5] [--resnet50] [--ablations] [--cold]
        [--in-graph [--model M]] [--peak GFLOP/s] [--layers 0 1 ...] [--variants gemm direct tuned ...] [--db DIR] [--target '{"kind":"llvm","mcpu":"znver3"}']
        [--json benchmarks/results/dense.1t.json]

``--in-graph`` compares the whole dense ResNet-50's convs inside their graphs, one by one in
execution order: the minimum over many inferences of ORT's node time (its own profiler, on the
``ORT_ENABLE_ALL`` graph: NCHWc between layers, residual adds fused) against our kernel call's
(the VM's instrument hook). A layer alone says less: ORT's one-conv model pays its NCHW <-> NCHWc
reorders at every layer instead of at the graph's ends, and each kernel reads its data from where
the previous layer left them. The minimum, because both are wall-clock times on a shared box.
``--model {resnet50,mobilenet_v2,vgg16_trunk,vgg16_cifar}`` does this for another dense model of
``models.dense_model`` (and no single layers unless ``--layers`` names some). Each row also gives
the layer's MFLOP (from the ONNX model: 2 x multiply-adds of the direct conv, so a Winograd layer
can read above 100%), our GFLOP/s and % of the peak (``--peak GFLOP/s`` rates against a given
peak instead of the measured one); a ``*`` marks a layer of issue #10's per-layer goal (dense 1x1 /
3x3, >= 64 input and output channels) under 70%. A MobileNetV2 inverted-residual call is one row
with the 2-3 ORT convs of its block (ORT's times summed). ORT runs all its inferences first, and
its profiler is ended before ours run (while it stayed open our kernels ran up to 2x slower).

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
from collections.abc import Callable
from functools import partial
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
from .runtimes import agree, ort_runner, ort_session, tvm_runner, vm_of

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
# --cold: bytes written between calls to flush the caches (twice Zen 3's 32 MB L3), and calls per sample.
FLUSH_BYTES = 64 * 1024 * 1024
COLD_CALLS = 5
VARIANTS = ["tvm_patdnn", "gemm", "direct", "old rule", "no panel copy", "1 pixel vector", "pixels outer",
            "no output prefetch", "wide last tile", "filters outer", "tuned"]
ABLATIONS = ["no panel copy", "1 pixel vector", "pixels outer", "no output prefetch", "wide last tile"]
MODEL_VARIANTS = ["1x1 on gemm", "1x1 on direct", "gemm+direct", "no output prefetch", "wide last tile", "gemm", "old rule",
                  "tuned"]


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
                   "wide last tile": {"narrow_tail": False},
                   "filters outer": {"kernel": "gemm", "filters_outer": True}}[variant]
        mod = DenseConvRewrite(vector_registers(target), vector_lanes(target), **options)(mod)
    return tvm.compile(mod, target, relax_pipeline=get_pipeline(target, dense_kernels=False))


def cold_ms(run: Callable[[], object], touch: Callable[[], object], flush: np.ndarray) -> float:
    """Median process CPU ms of ``COLD_CALLS`` single calls of ``run``, each after ``flush`` was
    written over (every cache level emptied of the call's data) and ``touch`` read its input again."""
    samples = []
    for _ in range(COLD_CALLS):
        flush += 1.0
        touch()
        start = time.process_time()
        run()
        samples.append((time.process_time() - start) * 1e3)
    return statistics.median(samples)


def measure(model: onnx.ModelProto, variants: list[str], target, threads: int, rounds: int,
            may_fail: tuple[str, ...] = (), database: Path | None = None, cold: bool = False) -> dict[str, list[float]]:
    """ms of every variant and ORT in each of ``rounds`` interleaved rounds, after checking outputs;
    a variant in ``may_fail`` that does not compile is reported and left out. ``cold``: each sample
    is :func:`cold_ms` (1 thread only)."""
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    ort = ort_runner(model, x, threads)
    runners = {"ORT": ort}
    expected = ort.output()
    flush = np.zeros(FLUSH_BYTES // 4, dtype=np.float32) if cold else None
    timers = {"ORT": partial(cold_ms, ort.output, x.sum, flush) if cold else ort.time}
    for variant in variants:
        try:
            executable = compile_variant(model, variant, target, database)
        except tvm_patdnn.PatDNNError as err:
            if variant not in may_fail:
                raise
            print(f"{variant} left out: {err}", flush=True)
            continue
        runners[variant] = tvm_runner(executable, x)
        error = agree(runners[variant].output(), expected)
        if error > RTOL:
            raise RuntimeError(f"{variant} differs from ORT by {error:.1e}")
        if cold:
            main, tx = vm_of(executable)["main"], tvm.runtime.tensor(x)
            timers[variant] = partial(cold_ms, partial(main, tx), tx.numpy, flush)
        else:
            timers[variant] = runners[variant].time
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name in runners:
            times[name].append(timers[name]())
    return times


# Our kernels that compute a conv (ORT's Conv / FusedConv nodes pair with them in execution order; an
# inverted-residual call pairs with the 2-3 ORT convs of its block).
CONV_KERNELS = ("dense_conv", "direct_conv", "winograd_conv", "pattern_conv", "depthwise_conv", "inverted_residual")
# --model: the dense models whose convs --in-graph profiles (``models.dense_model``).
IN_GRAPH_MODELS = ("resnet50", "mobilenet_v2", "vgg16_trunk", "vgg16_cifar")
# Issue #10's per-layer goal: dense (groups 1) 1x1 and 3x3 convs with >= GOAL_CHANNELS input and output
# channels at >= GOAL_SHARE of the FMA peak.
GOAL_CHANNELS, GOAL_SHARE = 64, 0.70


def onnx_convs(model: onnx.ModelProto) -> list[dict]:
    """Every Conv of ``model`` in graph order: channels, kernel, groups, stride, output shape (NCHW)
    and MFLOP (2 x multiply-adds), from its weight initializer and ONNX shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
              for v in [*inferred.graph.value_info, *inferred.graph.output]}
    weights = {w.name: tuple(w.dims) for w in model.graph.initializer}
    convs = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        out_c, group_c, kh, kw = weights[node.input[1]]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        out = shapes[node.output[0]]
        convs.append({"in_c": group_c * attrs.get("group", 1), "out_c": out_c, "kernel": (kh, kw),
                      "groups": attrs.get("group", 1), "stride": tuple(attrs.get("strides", (1, 1)))[0], "out": out,
                      "mflop": 2 * out[0] * out_c * out[2] * out[3] * group_c * kh * kw / 1e6})
    return convs


def _same_conv(ort_args: dict, conv: dict) -> bool:
    """Whether ORT's conv node (its profiler event's shapes: NCHWc nodes report channels padded to
    the block) computes ONNX conv ``conv``."""
    out = next(iter(ort_args["output_type_shape"][0].values()))
    x, weight = [next(iter(t.values())) for t in ort_args["input_type_shape"][:2]]
    return (tuple(out[2:]) == tuple(conv["out"][2:]) and conv["out_c"] <= out[1] < conv["out_c"] + 16
            and conv["in_c"] <= x[1] < conv["in_c"] + 16 and tuple(weight[2:]) == conv["kernel"]
            and out[2] <= -(-x[2] // conv["stride"]) <= out[2] + conv["kernel"][0])


def _conv_label(conv: dict) -> str:
    kind = "dw " if conv["groups"] > 1 and conv["groups"] == conv["in_c"] else ""
    stride = f" s{conv['stride']}" if conv["stride"] != 1 else ""
    return (f"{kind}{conv['kernel'][0]}x{conv['kernel'][1]} {conv['in_c']}->{conv['out_c']} "
            f"{conv['out'][2]}x{conv['out'][3]}{stride}")


def in_goal(conv: dict) -> bool:
    """Whether issue #10's per-layer goal covers ``conv`` (dense 1x1 / 3x3, >= 64 channels each side)."""
    return (conv["groups"] == 1 and conv["kernel"] in ((1, 1), (3, 3))
            and min(conv["in_c"], conv["out_c"]) >= GOAL_CHANNELS)


def _nchw(out: tuple) -> tuple:
    return (out[0], out[1] * out[4], out[2], out[3]) if len(out) == 5 else tuple(out)


def in_graph_profile(model: onnx.ModelProto, executable, runs: int) -> list[dict]:
    """Per conv call of ``executable`` (``model`` compiled) in execution order: the ORT conv nodes it
    computes (one, or an inverted-residual block's 2-3), their MFLOP, and the minimum over ``runs``
    inferences of ORT's node times (summed) and of our kernel call's, ms (module docstring,
    ``--in-graph``); then one row each for the rest of either graph (pools, FC, reorders), unpaired."""
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    with tempfile.TemporaryDirectory() as scratch:
        session = ort_session(model, 1, profile_prefix=str(Path(scratch) / "ort"))
        feed = {session.get_inputs()[0].name: x}
        vm, tx = vm_of(executable), tvm.runtime.tensor(x)
        calls: list[tuple[str, tuple, float]] = []
        started: list[float] = []

        def clock(_func, name, before_run, _ret, *args) -> int:
            if before_run:
                started.append(time.perf_counter())
            elif not str(name).startswith("vm.builtin."):
                calls.append((str(name), tuple(args[-1].shape), time.perf_counter() - started.pop()))
            else:
                started.pop()
            return 0

        # ORT's inferences first, its profiler ended before ours: after a profiled ORT run our
        # kernels ran up to 2x slower while the profiling session stayed open (VGG-16 224's layers,
        # Zen 5, session 18; 1 core).
        warmup = 2
        for _ in range(warmup + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
        for _ in range(warmup):
            vm["main"](tx)
        vm.set_instrument(clock)
        try:
            for _ in range(runs):
                vm["main"](tx)
        finally:
            vm.set_instrument(lambda *_: 0)
    nodes: dict[str, list] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            node = nodes.setdefault(event["name"].removesuffix("_kernel_time"), [event["args"], []])
            node[1].append(event["dur"] / 1e3)
    theirs = [(name, args["op_name"], args, min(times[warmup:])) for name, (args, times) in nodes.items()]
    per_run = len(calls) // runs
    ours = [(name, out, min(calls[i + r * per_run][2] for r in range(runs)) * 1e3)
            for i, (name, out, _) in enumerate(calls[:per_run])]
    # ORT's conv nodes with the ONNX convs they compute (the first unused one of the same geometry).
    unused, their_convs = onnx_convs(model), []
    for node, op, args, ms in theirs:
        if op in ("Conv", "FusedConv"):
            match = next((conv for conv in unused if _same_conv(args, conv)), None)
            if match is None:
                raise RuntimeError(f"ORT's conv {node} matches no conv of the ONNX model")
            unused.remove(match)
            their_convs.append((node, match, ms))
    our_convs = [row for row in ours if row[0].startswith(CONV_KERNELS)]
    rows, next_conv = [], 0
    for kernel, out, our_ms in our_convs:
        # The ORT convs this call computes: up to the next one with the call's output shape.
        group = []
        while next_conv < len(their_convs):
            group.append(their_convs[next_conv])
            next_conv += 1
            if group[-1][1]["out"] == _nchw(out):
                break
        if not group or group[-1][1]["out"] != _nchw(out) or (len(group) > 1 and not kernel.startswith("inverted_residual")):
            raise RuntimeError(f"ORT runs {len(their_convs)} convs, tvm_patdnn {len(our_convs)}: "
                               f"{kernel} {_nchw_label(out)} pairs with none")
        convs = [conv for _, conv, _ in group]
        rows.append({"layer": f"{kernel} {_nchw_label(out)}", "convs": " + ".join(map(_conv_label, convs)),
                     "ort_node": group[-1][0], "ORT": sum(ms for *_, ms in group), "tvm_patdnn": our_ms,
                     "mflop": sum(conv["mflop"] for conv in convs), "goal": all(map(in_goal, convs))})
    if next_conv != len(their_convs):
        raise RuntimeError(f"ORT runs {len(their_convs)} convs, tvm_patdnn {len(our_convs)}: they do not pair")
    rows += [{"layer": f"ORT {op} (unpaired)", "ort_node": node, "ORT": ms, "tvm_patdnn": 0.0}
             for node, op, _, ms in theirs if op not in ("Conv", "FusedConv")]
    rows += [{"layer": f"{kernel} (unpaired)", "ort_node": "", "ORT": 0.0, "tvm_patdnn": ms}
             for kernel, _, ms in ours if not kernel.startswith(CONV_KERNELS)]
    return rows


def _nchw_label(out: tuple) -> str:
    """An output shape as NxCxHxW; a blocked one (N, C / 16, H, W, 16) as its NCHW shape and "(16c)"."""
    if len(out) == 5:
        return f"{out[0]}x{out[1] * out[4]}x{out[2]}x{out[3]} (16c)"
    return "x".join(map(str, out))


def in_graph_table(rows: list[dict], peak: float | None = None) -> str:
    """The paired convs with each side's ms, ORT / ours, the conv(s) and, given the FMA ``peak``
    (GFLOP/s), our GFLOP/s and % of it (a * marks a layer of issue #10's per-layer goal under 70%);
    the unpaired rest; the totals."""
    lines = ["| layer (our kernel, output) | conv(s) | ORT node | ORT ms | ours ms | ORT / ours | MFLOP | ours GFLOP/s (% peak) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = f"{row['ORT'] / row['tvm_patdnn']:.2f}x" if row["ORT"] and row["tvm_patdnn"] else ""
        rate = ""
        if peak and row.get("mflop") and row["tvm_patdnn"]:
            gflops = row["mflop"] / row["tvm_patdnn"]
            missed = " *" if row["goal"] and gflops < GOAL_SHARE * peak else ""
            rate = f"{gflops:.1f} ({100 * gflops / peak:.0f}%){missed}"
        mflop = f"{row['mflop']:.1f}" if row.get("mflop") else ""
        lines.append(f"| {row['layer']} | {row.get('convs', '')} | {row['ort_node']} | {row['ORT']:.3f} | "
                     f"{row['tvm_patdnn']:.3f} | {ratio} | {mflop} | {rate} |")
    ort_total, our_total = sum(r["ORT"] for r in rows), sum(r["tvm_patdnn"] for r in rows)
    lines.append(f"| all (sum of minima) | | | {ort_total:.2f} | {our_total:.2f} | {ort_total / our_total:.2f}x | | |")
    return "\n".join(lines)


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
    parser.add_argument("--in-graph", action="store_true",
                        help="the whole dense model's convs side by side with ORT's, inside both graphs (1 thread)")
    parser.add_argument("--model", choices=IN_GRAPH_MODELS,
                        help="--in-graph on this dense model (default resnet50); given, no single layers unless --layers")
    parser.add_argument("--cold", action="store_true",
                        help="time each layer's single calls after a cache flush (1 thread): its weights come from memory")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS[1:], default=VARIANTS[1:4],
                        help="what runs beside tvm_patdnn and ORT (the table needs gemm and old rule for its ratios)")
    parser.add_argument("--model-variants", nargs="*", choices=MODEL_VARIANTS, default=MODEL_VARIANTS,
                        help="what runs beside tvm_patdnn and ORT on the whole ResNet-50")
    parser.add_argument("--target", default="x86",
                        help='x86 (the host CPU) or target JSON, e.g. \'{"kind":"llvm","mcpu":"znver3"}\' for AVX2')
    parser.add_argument("--db", type=Path, help="the tuning database of the tuned variant (default: a fresh one)")
    parser.add_argument("--peak", type=float,
                        help="the FMA peak (GFLOP/s) the %% columns are of (default: machine.py's measurement)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not {"gemm", "old rule"} <= set(args.variants):
        parser.error("--variants must include gemm and 'old rule': the layer table's ratios are against them")
    if args.model and not args.in_graph:
        parser.error("--model goes with --in-graph")
    if args.model and args.layers is None:
        args.layers = []
    threads = tvm_threads()
    if (args.cold or args.in_graph) and threads != 1:
        parser.error("--cold and --in-graph time 1 thread: run them with TVM_NUM_THREADS=1")
    target = resolve_target(args.target)
    with tempfile.TemporaryDirectory() as scratch:
        machine = machine_summary([threads], Path(scratch))
    database = args.db or Path(tempfile.mkdtemp(prefix="dense-db-"))
    peak = machine["fma_peak_gflops"][str(threads)]
    print(f"{machine['cpu']}, {threads} thread(s), {machine['fma_isa']} FMA peak {peak:.1f} GFLOP/s"
          + (f" (rated against --peak {args.peak:.1f})" if args.peak else ""), flush=True)
    peak = args.peak or peak

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
                     database=database, cold=args.cold)
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

    in_graph = []
    if args.in_graph:
        name = args.model or "resnet50"
        model = dense_model(name)
        in_graph = in_graph_profile(model, compile_variant(model, "tvm_patdnn", target), max(10, 4 * args.rounds))
        print(f"\n{name} dense, convs inside the graphs (minimum over inferences; * = a dense 1x1 / 3x3 of >= "
              f"{GOAL_CHANNELS} channels under {100 * GOAL_SHARE:.0f}% of the peak):\n" + in_graph_table(in_graph, peak))

    if args.json:
        result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine, "threads": threads,
                  "target": str(target), "rounds": args.rounds, "cold": args.cold, "layers": rows, "models": models, "table": table,
                  "in_graph": in_graph, "in_graph_model": (args.model or "resnet50") if args.in_graph else None,
                  "peak": peak}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(args.json, json.dumps(result, indent=2, allow_nan=True).encode())
        print(f"results in {args.json}")


if __name__ == "__main__":
    main()
