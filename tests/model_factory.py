"""Builders of small real ONNX CNNs with pattern-pruned (or dense) 3x3 weights, for tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tvm_patdnn.kernel_patterns import candidate_patterns, mask_array

OPSET = 17


def pattern_weight(rng, out_c, in_c, n_patterns=8, connectivity=1.0, subset_prob=0.0, taps=4):
    """A random OIHW 3x3 weight whose kept kernels use ``n_patterns`` shapes of ``taps`` taps.

    ``connectivity`` removes about 1 - 1/rate of the kernels; ``subset_prob`` zeroes one more
    tap in some kernels (a kernel that is a strict subset of its pattern).
    """
    library = candidate_patterns(taps)
    chosen = [library[i] for i in rng.choice(len(library), size=n_patterns, replace=False)]
    masks = np.stack([mask_array(chosen[i]) for i in rng.integers(0, n_patterns, out_c * in_c)])
    masks = masks.reshape(out_c, in_c, 3, 3).copy()
    if subset_prob > 0:
        for o, i in zip(*np.nonzero(rng.random((out_c, in_c)) < subset_prob)):
            taps = np.argwhere(masks[o, i])
            dy, dx = taps[rng.integers(len(taps))]
            masks[o, i, dy, dx] = False
    weight = rng.standard_normal((out_c, in_c, 3, 3)).astype(np.float32) * masks
    if connectivity > 1.0:
        weight[rng.random((out_c, in_c)) < 1.0 - 1.0 / connectivity] = 0.0
    return weight


@dataclass
class ConvSpec:
    out_channels: int
    stride: int | tuple[int, int] = 1  # one for both axes, or (rows, columns)
    pads: tuple[int, int, int, int] = (1, 1, 1, 1)  # top, left, bottom, right
    bias: bool = True
    relu: bool = True
    residual: bool = False  # add the block's input (needs same shape)
    kind: str = "pattern"  # "pattern", "dense", "1x1", "depthwise", "dilated"
    n_patterns: int = 8
    connectivity: float = 1.0  # pattern: kernels kept 1 in this; 1x1: (4, 1) weight blocks kept 1 in this
    taps: int = 4  # nonzeros of a pattern (compile with entries >= taps)
    # A constant added after the conv (before ReLU), other than the Conv's own bias:
    # "channel" (1, C, 1, 1), "scalar" (a 0-d tensor) or "full" (1, C, H, W: not per channel).
    add: str | None = None
    output: bool = False  # also a graph output (a model with several outputs)

    @property
    def strides(self) -> tuple[int, int]:
        return (self.stride, self.stride) if isinstance(self.stride, int) else tuple(self.stride)


def build_cnn(rng, input_shape, convs: list[ConvSpec], head: bool = False) -> onnx.ModelProto:
    """A chain of convs (+bias, +relu, +residual add), optionally a pool+flatten+gemm head."""
    nodes, inits, outputs = [], [], []
    current, (n, c, h, w) = "input", input_shape
    for index, spec in enumerate(convs):
        name = f"conv{index}"
        k, group, dil = 3, 1, 1
        if spec.kind == "1x1":
            k = 1
        if spec.kind == "depthwise":
            group = c
        if spec.kind == "dilated":
            dil = 2
        out_c = c if spec.kind == "depthwise" else spec.out_channels
        if spec.kind == "pattern":
            weight = pattern_weight(rng, out_c, c, spec.n_patterns, spec.connectivity, subset_prob=0.2, taps=spec.taps)
        else:
            weight = rng.standard_normal((out_c, c // group, k, k)).astype(np.float32)
            if spec.kind == "1x1" and spec.connectivity > 1:  # (4, 1) blocks kept with probability 1/connectivity
                kept = rng.random((-(-out_c // 4), c)) < 1 / spec.connectivity
                weight *= np.repeat(kept, 4, axis=0)[:out_c, :, None, None]
        weight *= np.float32(1.0 / np.sqrt(c * k * k / 2))
        inits.append(numpy_helper.from_array(weight, f"{name}.weight"))
        inputs = [current, f"{name}.weight"]
        if spec.bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(out_c).astype(np.float32) * 0.1, f"{name}.bias"))
            inputs.append(f"{name}.bias")
        pads = list(spec.pads) if k == 3 else [0, 0, 0, 0]
        top, left, bottom, right = pads
        nodes.append(
            helper.make_node(
                "Conv", inputs, [f"{name}.out"], name=name, kernel_shape=[k, k], strides=list(spec.strides),
                pads=[top, left, bottom, right], group=group, dilations=[dil, dil],
            )
        )
        out = f"{name}.out"
        keff = dil * (k - 1) + 1
        oh = (h + top + bottom - keff) // spec.strides[0] + 1
        ow = (w + left + right - keff) // spec.strides[1] + 1
        if spec.add is not None:
            shape = {"channel": (1, out_c, 1, 1), "scalar": (), "full": (1, out_c, oh, ow)}[spec.add]
            inits.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), f"{name}.add"))
            nodes.append(helper.make_node("Add", [out, f"{name}.add"], [f"{name}.added"], name=f"{name}_add"))
            out = f"{name}.added"
        if spec.residual and (out_c, oh, ow) == (c, h, w):
            nodes.append(helper.make_node("Add", [out, current], [f"{name}.res"], name=f"{name}_res"))
            out = f"{name}.res"
        if spec.relu:
            nodes.append(helper.make_node("Relu", [out], [f"{name}.relu"], name=f"{name}_relu"))
            out = f"{name}.relu"
        if spec.output and index < len(convs) - 1:
            outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [n, out_c, oh, ow]))
        current, c, h, w = out, out_c, oh, ow
    out_shape = [n, c, h, w]
    if head:
        nodes.append(helper.make_node("GlobalAveragePool", [current], ["pooled"]))
        nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"], axis=1))
        inits.append(numpy_helper.from_array(rng.standard_normal((10, c)).astype(np.float32), "fc.weight"))
        inits.append(numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "fc.bias"))
        nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], transB=1))
        current, out_shape = "logits", [n, 10]
    graph = helper.make_graph(
        nodes,
        "pattern_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(input_shape))],
        [*outputs, helper.make_tensor_value_info(current, TensorProto.FLOAT, out_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def reference_outputs(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of the ONNX reference evaluator (the ground truth for every compiled model)."""
    from tvm_patdnn.verify import onnx_reference

    return onnx_reference(model, inputs)
