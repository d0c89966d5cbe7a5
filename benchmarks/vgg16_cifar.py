"""The benchmark model whose tuning records ship in ``tvm_patdnn/schedules/``, and the command that tunes it.

VGG-16 for CIFAR (32x32 input, 13 conv3x3 + BN folded into bias + ReLU, five max-pools, a
512->10 classifier) with He-normal weights from a fixed seed, pruned one-shot by the project's
pruning core (8 magnitude-chosen patterns, 3.6x connectivity; the first conv stays dense).
Everything is deterministic, so ``build_model()`` gives the same weights (and therefore the same
pattern-conv kernels, which carry their patterns in the code) on every machine.

    .venv/bin/python benchmarks/vgg16_cifar.py --trials 320     # tunes into tvm_patdnn/schedules/<target key>/
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import tvm_patdnn
from tvm_patdnn.pruning.onnx_prune import prune_onnx
from tvm_patdnn.targets import resolve_target
from tvm_patdnn.tuning.commands import format_results
from tvm_patdnn.tuning.database import SCHEDULES_DIR, target_key

STAGES = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def build_model(seed: int = 0) -> onnx.ModelProto:
    """The pruned VGG-16 (CIFAR) as ONNX, batch 1, input named ``input``."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current, channels = "input", 3
    for index, stage in enumerate(STAGES):
        if stage == "M":
            nodes.append(helper.make_node("MaxPool", [current], [f"pool{index}"], kernel_shape=[2, 2], strides=[2, 2]))
            current = f"pool{index}"
            continue
        weight = (rng.standard_normal((stage, channels, 3, 3)) * np.sqrt(2.0 / (channels * 9))).astype(np.float32)
        bias = (rng.standard_normal(stage) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(weight, f"conv{index}.weight"), numpy_helper.from_array(bias, f"conv{index}.bias")]
        nodes.append(helper.make_node("Conv", [current, f"conv{index}.weight", f"conv{index}.bias"], [f"conv{index}"],
                                      name=f"conv{index}", kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"conv{index}"], [f"relu{index}"]))
        current, channels = f"relu{index}", stage
    nodes.append(helper.make_node("Flatten", [current], ["flat"], axis=1))
    inits += [numpy_helper.from_array((rng.standard_normal((10, 512)) * 0.05).astype(np.float32), "fc.weight"),
              numpy_helper.from_array(np.zeros(10, np.float32), "fc.bias")]
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], transB=1))
    graph = helper.make_graph(nodes, "vgg16_cifar",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    dense = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return prune_onnx(dense, n_patterns=8, connectivity=3.6).model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="x86")
    parser.add_argument("--trials", type=int, default=320)
    parser.add_argument("--rpc", help="TRACKER_HOST:PORT:DEVICE_KEY of the device to tune on")
    args = parser.parse_args()
    target = resolve_target(args.target)
    database = SCHEDULES_DIR / target_key(target)
    results = tvm_patdnn.tune(build_model(), target, trials=args.trials, database=database, rpc=args.rpc,
                              progress=sys.stderr)
    print(format_results(results))
    print(f"\nrecords in {database}")


if __name__ == "__main__":
    main()
