"""PyTorch models in: a ``torch.nn.Module`` becomes the ONNX model the rest of the compiler reads.

Why through ONNX (TorchScript exporter, ``dynamo=False``) and not TVM's
``relax.frontend.torch.from_exported_program``: ONNX is the one import path the project checks
(clear errors in ``frontend.py``, ``onnx.reference`` as ground truth, ``patdnn prune`` and
``inspect`` on the same file), and its initializers and node scopes carry the module names the
report should show. The TorchScript exporter needs no ``onnxscript`` (torch 2.13's default
dynamo exporter does). In eval mode it folds BatchNorm into the preceding conv, which rescales
filters but never turns a pruned zero into a nonzero.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import onnx

from .errors import PatDNNError

__all__ = ["export_onnx", "is_torch_module", "module_path"]


def is_torch_module(model: object) -> bool:
    """Whether ``model`` is a ``torch.nn.Module`` (without importing torch for other models)."""
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def module_path(scope: str) -> str:
    """The module a TorchScript-exported node belongs to, from its scope name:
    ``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1``, ``/features/features.3/Conv`` ->
    ``features.3`` (a Sequential child's segment repeats its parent's path)."""
    path = ""
    for segment in scope.strip("/").split("/")[:-1]:
        path = segment if not path or segment.startswith(path + ".") else f"{path}.{segment}"
    return path


def export_onnx(
    module,
    example_inputs: Sequence,
    *,
    opset: int = 17,
    dynamic_batch: bool = False,
) -> onnx.ModelProto:
    """``module`` (run in eval mode, its mode restored after) traced on ``example_inputs`` as an
    ONNX model: inputs ``input`` (or ``input0``, ``input1``, ...), outputs ``output`` (or
    ``output0``, ...), every Conv node named after the torch module it came from."""
    import torch

    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise PatDNNError("example_inputs must be a non-empty tuple of tensors, e.g. (torch.zeros(1, 3, 32, 32),)")
    if not all(isinstance(x, torch.Tensor) for x in example_inputs):
        raise PatDNNError("example_inputs must hold torch tensors (one per forward() argument)")
    names = ["input"] if len(example_inputs) == 1 else [f"input{i}" for i in range(len(example_inputs))]
    was_training = module.training
    module.eval()
    buffer = io.BytesIO()
    called: list[tuple[str, tuple[int, ...]]] = []  # (module name, weight shape) of each conv call, in order
    hooks = [m.register_forward_pre_hook(lambda m, _args, name=name: called.append((name, tuple(m.weight.shape))))
             for name, m in module.named_modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            try:
                outputs = module(*example_inputs)
            finally:
                for hook in hooks:
                    hook.remove()
        count = len(outputs) if isinstance(outputs, (tuple, list)) else 1
        output_names = ["output"] if count == 1 else [f"output{i}" for i in range(count)]
        dynamic_axes = {name: {0: "batch"} for name in names + output_names} if dynamic_batch else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, tuple(example_inputs), buffer, dynamo=False, opset_version=opset,
                              input_names=names, output_names=output_names, dynamic_axes=dynamic_axes)
    except PatDNNError:
        raise
    except Exception as err:  # tracing/export errors of any kind name the torch problem
        message = str(err).strip().splitlines()
        raise PatDNNError(f"cannot export the PyTorch model to ONNX: {message[0] if message else type(err).__name__}") from err
    finally:
        module.train(was_training)
    proto = onnx.load_from_string(buffer.getvalue())
    _name_convs_after_modules(proto, called)
    return proto


def _name_convs_after_modules(proto: onnx.ModelProto, called: list[tuple[str, tuple[int, ...]]]) -> None:
    """Conv nodes take the name of the module they came from.

    The exporter traces the forward pass, so its Conv nodes come in the order the Conv2d modules
    were called; when the counts and weight shapes agree (BatchNorm folding renames a weight but
    keeps its shape) the k-th node is the k-th call. Otherwise each node's scope name says it,
    except for BN-folded convs, whose nodes lose their scope (they keep the exporter's name)."""
    shapes = {init.name: tuple(init.dims) for init in proto.graph.initializer}
    convs = [node for node in proto.graph.node if node.op_type == "Conv"]
    in_order = len(convs) == len(called) and all(
        len(node.input) > 1 and shapes.get(node.input[1]) == shape for node, (_, shape) in zip(convs, called))
    names = [name for name, _ in called] if in_order else [module_path(node.name) for node in convs]
    taken: dict[str, int] = {}
    for node, name in zip(convs, names):
        if not name:
            continue
        taken[name] = taken.get(name, 0) + 1
        node.name = name if taken[name] == 1 else f"{name}#{taken[name]}"  # a module called twice
