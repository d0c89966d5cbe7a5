"""One-shot PatDNN pruning of an ONNX model's 3x3 convolutions.

This is the hard-pruning path of PatDNN without retraining: choose the pattern set from the
pretrained weights of all prunable layers, project every prunable weight onto "one pattern
per kernel and ``round(O*I/rate)`` kernels per layer", and write the weights back into an
otherwise untouched model. The result is the input the pattern compiler expects; accuracy
is recovered separately by ADMM/masked retraining.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import PatDNNError
from ..fileio import load_onnx_model, save_model_atomic, write_bytes_atomic
from ..kernel_patterns import format_pattern, kernel_masks
from .projection import (
    pattern_frequencies,
    project_pattern_and_connectivity,
    prunable_reason,
    select_pattern_set,
)

__all__ = [
    "LayerRecord",
    "PruneResult",
    "prune_onnx",
    "load_onnx_model",
    "save_model_atomic",
    "write_bytes_atomic",
]


@dataclass(frozen=True)
class LayerRecord:
    """What happened to one Conv node's weight."""

    name: str  # the Conv node's name (its first output when unnamed)
    weight: str  # name of the weight tensor (initializer or Constant output)
    shape: tuple[int, ...]  # OIHW weight shape
    action: str  # "pruned" or "dense"
    reason: str | None  # why the layer stayed dense; None when pruned
    patterns: tuple[int, ...]  # distinct patterns in the pruned weight, most used first
    kept_kernels: int  # kernels with a nonzero weight
    total_kernels: int
    density: float  # nonzero weights / all weights, after pruning


@dataclass
class PruneResult:
    """The pruned model, one record per Conv node, and the pattern statistics behind it."""

    model: onnx.ModelProto
    layers: list[LayerRecord]
    pattern_set: list[int]
    frequencies: dict[int, int] = field(default_factory=dict)  # top shapes before pruning

    def summary(self) -> str:
        """A plain-text per-layer table with totals, for the CLI and logs."""
        header = ("layer", "shape", "action", "patterns", "kernels kept", "density", "note")
        rows = [
            (
                rec.name,
                "x".join(str(d) for d in rec.shape),
                rec.action,
                str(len(rec.patterns)) if rec.action == "pruned" else "-",
                f"{rec.kept_kernels}/{rec.total_kernels}",
                f"{rec.density:.3f}",
                rec.reason or "",
            )
            for rec in self.layers
        ]
        widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        seen: set[str] = set()
        total = nonzero = 0
        for rec in self.layers:
            if rec.weight not in seen:  # shared weights count once
                seen.add(rec.weight)
                size = int(np.prod(rec.shape))
                total += size
                nonzero += round(rec.density * size)
        n_pruned = sum(rec.action == "pruned" for rec in self.layers)
        lines.append("")
        lines.append(
            f"{n_pruned} of {len(self.layers)} conv layers pruned; conv weights kept: "
            f"{nonzero}/{total} ({nonzero / max(total, 1):.1%})"
        )
        lines.append("pattern set: " + "  ".join(format_pattern(p) for p in self.pattern_set))
        return "\n".join(lines)


def _attribute(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _store(tensor: onnx.TensorProto, array: np.ndarray) -> None:
    """Replace a tensor's values in place (same dtype), keeping its name, doc string and metadata."""
    new = numpy_helper.from_array(array)
    for name in ("float_data", "double_data", "int32_data", "int64_data", "uint64_data", "string_data"):
        tensor.ClearField(name)
    tensor.raw_data = new.raw_data


@dataclass
class _Conv:
    name: str
    weight: str
    tensor: onnx.TensorProto | None
    shape: tuple[int, ...]
    reason: str | None


def _constant_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers and ``Constant``-node tensors by name: the weights pruning may rewrite."""
    tensors = {}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    tensors[node.output[0]] = attr.t
    for tensor in graph.initializer:
        tensors[tensor.name] = tensor
    return tensors


def _find_convs(
    graph: onnx.GraphProto, first_layer_dense: bool, layers: Mapping[str, bool]
) -> list[_Conv]:
    """Every top-level Conv with the reason it stays dense (None when it will be pruned)."""
    tensors = _constant_tensors(graph)
    convs = []
    unused = set(layers)
    for index, node in enumerate(graph.node):
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        name = node.name or node.output[0] or f"Conv_{index}"
        weight = node.input[1]
        tensor = tensors.get(weight)
        shape = tuple(int(d) for d in tensor.dims) if tensor is not None else ()
        override = None
        for key in (name, weight):
            if key in layers:
                override = layers[key]
                unused.discard(key)
        groups = int(_attribute(node, "group", 1))
        dilations = list(_attribute(node, "dilations", [1] * max(len(shape) - 2, 2)))
        if tensor is None:
            reason = "weight is not a constant tensor"
        elif tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
            reason = f"weight type {onnx.TensorProto.DataType.Name(tensor.data_type)} is not float"
        else:
            reason = prunable_reason(shape, groups, dilations, first_layer_dense and override is not True)
        if override is True and reason is not None:
            raise PatDNNError(f"layer {name} cannot be pattern-pruned: {reason}")
        if override is False and reason is None:
            reason = "skipped by request"
        convs.append(_Conv(name, weight, tensor, shape, reason))
    if unused:
        known = ", ".join(c.name for c in convs) or "none"
        raise PatDNNError(f"no Conv layer or weight named {', '.join(sorted(unused))} (conv layers: {known})")
    _keep_shared_weights_consistent(graph, convs)
    return convs


def _nested_nodes(graph: onnx.GraphProto):
    """Nodes of the subgraphs (If/Loop/Scan bodies) of a graph's nodes, recursively."""
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from sub.node
                yield from _nested_nodes(sub)


def _keep_shared_weights_consistent(graph: onnx.GraphProto, convs: list[_Conv]) -> None:
    """A weight is pruned only if every consumer is a prunable top-level Conv, so all uses agree."""
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            if name:
                is_conv_weight = node.op_type == "Conv" and position == 1
                consumers.setdefault(name, []).append("" if is_conv_weight else node.op_type)
    for node in _nested_nodes(graph):
        for name in node.input:
            consumers.setdefault(name, []).append(f"{node.op_type} in a subgraph")
    outputs = {o.name for o in graph.output}
    by_weight: dict[str, list[_Conv]] = {}
    for conv in convs:
        by_weight.setdefault(conv.weight, []).append(conv)
    for weight, users in by_weight.items():
        dense = [c for c in users if c.reason is not None]
        others = sorted({op for op in consumers.get(weight, []) if op})
        for conv in users:
            if conv.reason is not None:
                continue
            if dense:
                conv.reason = f"weight shared with dense layer {dense[0].name}"
            elif others:
                conv.reason = f"weight also used by {', '.join(others)}"
            elif weight in outputs:
                conv.reason = "weight is also a graph output"


def _record(conv: _Conv, array: np.ndarray) -> LayerRecord:
    masks = kernel_masks(array) if array.ndim == 4 else np.zeros((0, 0), dtype=np.int64)
    used = masks[masks != 0]
    values, counts = np.unique(used, return_counts=True)
    order = sorted(zip(values.tolist(), counts.tolist()), key=lambda vc: (-vc[1], vc[0]))
    return LayerRecord(
        name=conv.name,
        weight=conv.weight,
        shape=conv.shape,
        action="dense" if conv.reason else "pruned",
        reason=conv.reason,
        patterns=tuple(int(v) for v, _ in order) if conv.reason is None else (),
        kept_kernels=int(used.size),
        total_kernels=int(masks.size),
        density=float(np.count_nonzero(array)) / max(array.size, 1),
    )


def prune_onnx(
    model: str | os.PathLike | onnx.ModelProto,
    n_patterns: int = 8,
    connectivity: float | None = 3.6,
    entries: int = 4,
    layers: Mapping[str, bool] | None = None,
    first_layer_dense: bool = True,
    force_centre: bool = True,
) -> PruneResult:
    """Pattern- and connectivity-prune every prunable 3x3 Conv of an ONNX model.

    ``layers`` maps Conv node names or weight names to ``False`` (keep dense) or ``True``
    (prune even though the default rule keeps it dense, e.g. the first layer); forcing a
    layer that patterns cannot express is an error. ``connectivity=None`` disables
    connectivity pruning. Only the pruned weight tensors change; the input model is not
    modified and nothing is written (see :func:`save_model_atomic`).
    """
    proto = load_onnx_model(model)
    convs = _find_convs(proto.graph, first_layer_dense, dict(layers or {}))
    if not convs:
        raise PatDNNError("the model has no Conv layer to prune")
    prunable: dict[str, np.ndarray] = {}
    for conv in convs:
        if conv.reason is None and conv.weight not in prunable:
            prunable[conv.weight] = numpy_helper.to_array(conv.tensor)
    if not prunable:
        reasons = "; ".join(f"{c.name}: {c.reason}" for c in convs)
        raise PatDNNError(f"the model has no prunable 3x3 convolution ({reasons})")

    frequencies = pattern_frequencies(prunable.values(), entries, force_centre)
    pattern_set = select_pattern_set(prunable.values(), n_patterns, entries, force_centre)
    pruned: dict[str, np.ndarray] = {}
    for weight, array in prunable.items():
        layer = next(c.name for c in convs if c.weight == weight)
        try:
            pruned[weight] = project_pattern_and_connectivity(array, pattern_set, connectivity)
        except PatDNNError as exc:
            raise PatDNNError(f"layer {layer}: {exc}") from exc
    for conv in convs:
        if conv.weight in pruned and conv.reason is None:
            _store(conv.tensor, pruned.pop(conv.weight))  # once per shared weight
    records = [
        _record(c, numpy_helper.to_array(c.tensor) if c.tensor is not None else np.zeros((0,)))
        for c in convs
    ]
    return PruneResult(proto, records, pattern_set, frequencies)
