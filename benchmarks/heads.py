"""FC (Gemm) and pooling layers of the benchmark models: tvm_patdnn vs ONNX Runtime, 1 thread.

The classifier heads and pools of ResNet-50 (FC 2048->1000, max pool 3x3 s2 at 112x112, global
average pool of 2048x7x7), MobileNetV2 (FC 1280->1000, ReduceMean of 1280x7x7), VGG-16 ImageNet
(FC 25088->4096->4096, 2x2 max pools) and VGG-16 CIFAR (FC 512->10), each as a one-layer ONNX
model (random weights from a fixed seed), batch 1 (and 2 for one FC). Each layer: tvm_patdnn
(``compile(model, "x86", tuning_db=False)``: the fully connected kernel, the window kernel's max
pooling, dlight's reduction for the averages) and ORT (``ORT_ENABLE_ALL``), outputs checked to
agree (relative 1e-4), timed in interleaved rounds, medians; the ratio is the median of per-round
ratios. Batch-1 FC layers stream their weights once, so GB/s of weights is the number to watch.

    TVM_NUM_THREADS=1 .venv/bin/python -m benchmarks.heads [--rounds 5] [--json benchmarks/results/heads.1t.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .machine import cpu_name, tvm_threads
from .runtimes import agree, ort_runner, time_ms, vm_of

# (name, rows, in features, out features, ReLU)
FCS = [("ResNet-50 FC", 1, 2048, 1000, False), ("ResNet-50 FC batch 2", 2, 2048, 1000, False),
       ("MobileNetV2 FC", 1, 1280, 1000, False), ("VGG-16 FC1", 1, 25088, 4096, True),
       ("VGG-16 FC2", 1, 4096, 4096, True), ("VGG-16 CIFAR FC", 1, 512, 10, False)]
# (name, ONNX op, channels, size, attributes)
POOLS = [("ResNet-50 max pool 3x3 s2", "MaxPool", 64, 112, {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1] * 4}),
         ("ResNet-50 global average pool", "GlobalAveragePool", 2048, 7, {}),
         ("MobileNetV2 ReduceMean", "ReduceMean", 1280, 7, {"axes": [2, 3], "keepdims": 0}),
         ("VGG-16 max pool 2x2 (224)", "MaxPool", 64, 224, {"kernel_shape": [2, 2], "strides": [2, 2]}),
         ("VGG-16 max pool 2x2 (14)", "MaxPool", 512, 14, {"kernel_shape": [2, 2], "strides": [2, 2]})]
RTOL = 1e-4


def fc_model(rows: int, k: int, n: int, relu: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1)]
    if relu:
        nodes.append(helper.make_node("Relu", ["g"], ["y"]))
    graph = helper.make_graph(nodes, "fc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
                              [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, [rows, n])],
                              [numpy_helper.from_array(weight, "w"),
                               numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def pool_model(op: str, channels: int, size: int, attrs: dict) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"], **attrs)], "pool",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])], [])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    output = next(v for v in model.graph.value_info if v.name == "y")
    model.graph.output.append(output)
    del model.graph.value_info[:]
    return model


def measure(model: onnx.ModelProto, rounds: int) -> dict[str, list[float]]:
    import tvm

    import tvm_patdnn

    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    compiled = tvm_patdnn.compile(model, "x86", tuning_db=False)
    ort = ort_runner(model, x, 1)
    error = agree(compiled.run({"x": x})[0], ort.output())
    if error > RTOL:
        raise RuntimeError(f"tvm_patdnn differs from ORT by {error:.1e}")
    vm, tx = vm_of(compiled.executable), tvm.runtime.tensor(x)
    times: dict[str, list[float]] = {"ORT": [], "tvm_patdnn": []}
    for _ in range(rounds):
        times["ORT"].append(ort.time())
        times["tvm_patdnn"].append(time_ms(vm, tx, number=1))
    return times


def main() -> None:
    from tvm_patdnn.fileio import write_bytes_atomic

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    threads = tvm_threads()
    print(f"{cpu_name()}, {threads} thread(s)")
    rows = []
    cases = [(name, fc_model(m, k, n, relu), 4 * k * n) for name, m, k, n, relu in FCS]
    cases += [(name, pool_model(op, c, size, attrs), 4 * c * size * size) for name, op, c, size, attrs in POOLS]
    lines = ["| layer | ORT ms | tvm_patdnn ms | tvm_patdnn GB/s read | vs ORT |", "|---|---|---|---|---|"]
    for name, model, nbytes in cases:
        times = measure(model, args.rounds)
        ms = {k: statistics.median(v) for k, v in times.items()}
        speedup = statistics.median(a / b for a, b in zip(times["ORT"], times["tvm_patdnn"]))
        rows.append({"layer": name, "bytes": nbytes, "ms": times})
        lines.append(f"| {name} | {ms['ORT']:.3f} | {ms['tvm_patdnn']:.3f} | {nbytes / ms['tvm_patdnn'] / 1e6:.1f} | "
                     f"{speedup:.2f}x |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print("\n" + table)
    if args.json:
        result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(), "threads": threads,
                  "rounds": args.rounds, "layers": rows, "table": table}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(args.json, json.dumps(result, indent=2).encode())
        print(f"results in {args.json}")


if __name__ == "__main__":
    main()
