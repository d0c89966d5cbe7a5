"""One-shot PatDNN pruning of an ONNX model's 3x3 and 1x1 convolutions (and optionally Gemm).

This is the hard-pruning path of PatDNN without retraining: choose the pattern set from the
pretrained weights of all prunable 3x3 layers, project every prunable 3x3 weight onto "one
pattern per kernel and ``round(O*I/rate)`` kernels per layer", every 1x1 weight (and Gemm
weight when asked) onto "``round(blocks/rate)`` blocks of the chosen granularity", and write
the weights back into an otherwise untouched model. The result is the input the pattern compiler expects; accuracy
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
from ..tables import format_table
from .projection import (
    check_rate,
    parse_block,
    pattern_frequencies,
    pointwise_reason,
    project_pattern_and_connectivity,
    project_pointwise,
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
    """What happened to one Conv (or Gemm) node's weight."""

    name: str  # the node's name (its first output when unnamed)
    weight: str  # name of the weight tensor (initializer or Constant output)
    shape: tuple[int, ...]  # OIHW weight shape (Gemm: the B tensor's shape)
    action: str  # "pruned" or "dense"
    reason: str | None  # why the layer stayed dense; None when pruned
    patterns: tuple[int, ...]  # distinct patterns in the pruned weight, most used first
    kept_kernels: int  # kernels with a nonzero weight (1x1 conv and Gemm: nonzero weights)
    total_kernels: int
    density: float  # nonzero weights / all weights, after pruning
    block: tuple[int, int] | None = None  # pointwise/FC granularity (out x in channels) when pruned so
    op: str = "Conv"  # "Conv" or "Gemm"


@dataclass
class PruneResult:
    """The pruned model, one record per Conv node, and the pattern statistics behind it."""

    model: onnx.ModelProto
    layers: list[LayerRecord]
    pattern_set: list[int]
    frequencies: dict[int, int] = field(default_factory=dict)  # top shapes before pruning

    def summary(self) -> str:
        """A plain-text per-layer table with totals, for the CLI and logs.

        The "pruning" column says how a pruned layer is constrained: the number of patterns
        of a 3x3 layer, or the block granularity of a 1x1/FC layer (whose kept fraction is the
        density column, each of its kernels being one weight).
        """
        header = ("layer", "shape", "action", "pruning", "kernels kept", "density", "note")

        def pruning(rec: LayerRecord) -> str:
            if rec.action != "pruned":
                return "-"
            if rec.block is not None:
                return f"{rec.block[0]}x{rec.block[1]} blocks"
            return f"{len(rec.patterns)} patterns"

        rows = [
            (
                rec.name,
                "x".join(str(d) for d in rec.shape),
                rec.action,
                pruning(rec),
                f"{rec.kept_kernels}/{rec.total_kernels}",
                f"{rec.density:.3f}",
                rec.reason or "",
            )
            for rec in self.layers
        ]
        lines = format_table(header, rows, rule=True).splitlines()
        seen: set[str] = set()
        total = nonzero = 0
        for rec in self.layers:
            if rec.weight not in seen:  # shared weights count once
                seen.add(rec.weight)
                size = int(np.prod(rec.shape))
                total += size
                nonzero += round(rec.density * size)
        n_pruned = sum(rec.action == "pruned" for rec in self.layers)
        kinds = "conv and FC" if any(rec.op == "Gemm" for rec in self.layers) else "conv"
        lines.append("")
        lines.append(
            f"{n_pruned} of {len(self.layers)} {kinds} layers pruned; {kinds} weights kept: "
            f"{nonzero}/{total} ({nonzero / max(total, 1):.1%})"
        )
        if self.pattern_set:
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
    kind: str = "pattern"  # "pattern" (3x3 and other convs), "pointwise" (1x1) or "fc" (Gemm)
    transposed: bool = False  # a Gemm B stored (in, out): pruned as its transpose


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


def _weight_reason(tensor: onnx.TensorProto | None) -> str | None:
    if tensor is None:
        return "weight is not a constant tensor"
    if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
        return f"weight type {onnx.TensorProto.DataType.Name(tensor.data_type)} is not float"
    return None


def _block_reason(shape: tuple[int, ...], transposed: bool, block: tuple[int, int]) -> str | None:
    """Why a layer cannot hold one block of the granularity (it stays dense unless forced)."""
    o, i = (shape[1], shape[0]) if transposed else shape[:2]
    if block[0] > o or block[1] > i:
        return f"{o}x{i} channels are fewer than one {block[0]}x{block[1]} block"
    return None


def _find_convs(
    graph: onnx.GraphProto,
    first_layer_dense: bool,
    layers: Mapping[str, bool],
    pointwise: float | None = None,
    block: tuple[int, int] = (1, 1),
    fc: float | None = None,
) -> list[_Conv]:
    """Every top-level Conv (and Gemm when ``fc`` is set) with the reason it stays dense
    (None when it will be pruned).

    3x3 convs follow :func:`prunable_reason`; 1x1 convs are pruned when ``pointwise`` is set
    (:func:`pointwise_reason`); Gemm layers with a constant B are pruned when ``fc`` is set,
    except the last one (the classifier, which like the first conv holds few weights and
    decides the output), unless it is forced.
    """
    tensors = _constant_tensors(graph)
    convs = []
    unused = set(layers)
    gemms = [n for n in graph.node if n.op_type == "Gemm" and n.domain in ("", "ai.onnx") and len(n.input) >= 2]
    for index, node in enumerate(graph.node):
        is_conv = node.op_type == "Conv" and len(node.input) >= 2
        is_fc = fc is not None and node.op_type == "Gemm" and len(node.input) >= 2
        if not (is_conv or is_fc) or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name or node.output[0] or f"{node.op_type}_{index}"
        weight = node.input[1]
        tensor = tensors.get(weight)
        shape = tuple(int(d) for d in tensor.dims) if tensor is not None else ()
        override = None
        for key in (name, weight):
            if key in layers:
                override = layers[key]
                unused.discard(key)
        kind, transposed = "pattern", False
        reason = _weight_reason(tensor)
        if is_fc:
            kind, transposed = "fc", not int(_attribute(node, "transB", 0))
            if reason is None and len(shape) != 2:
                reason = f"B of rank {len(shape)} is not a matrix"
            if reason is None and node is gemms[-1] and override is not True:
                reason = "last FC layer (classifier) kept dense"
        elif len(shape) == 4 and shape[2:] == (1, 1):
            kind = "pointwise"
            if reason is None:
                reason = (
                    pointwise_reason(shape, int(_attribute(node, "group", 1)), first_layer_dense and override is not True)
                    if pointwise is not None else "1x1 pruning off (pointwise=None)"
                )
        elif reason is None:
            dilations = list(_attribute(node, "dilations", [1] * max(len(shape) - 2, 2)))
            reason = prunable_reason(shape, int(_attribute(node, "group", 1)), dilations,
                                     first_layer_dense and override is not True)
        if reason is None and kind != "pattern":
            reason = _block_reason(shape, transposed, block)
        if override is True and reason is not None:
            what = "pattern-pruned" if kind == "pattern" else "pruned"
            raise PatDNNError(f"layer {name} cannot be {what}: {reason}")
        if override is False and reason is None:
            reason = "skipped by request"
        convs.append(_Conv(name, weight, tensor, shape, reason, kind, transposed))
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
                is_conv_weight = node.op_type in ("Conv", "Gemm") and position == 1
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


def _record(conv: _Conv, array: np.ndarray, block: tuple[int, int]) -> LayerRecord:
    if array.ndim == 4:
        masks = kernel_masks(array)
    elif array.ndim == 2:  # a Gemm matrix: every weight is a kernel
        masks = (array != 0).astype(np.int64)
    else:
        masks = np.zeros((0, 0), dtype=np.int64)
    used = masks[masks != 0]
    values, counts = np.unique(used, return_counts=True)
    order = sorted(zip(values.tolist(), counts.tolist()), key=lambda vc: (-vc[1], vc[0]))
    return LayerRecord(
        name=conv.name,
        weight=conv.weight,
        shape=conv.shape,
        action="dense" if conv.reason else "pruned",
        reason=conv.reason,
        patterns=tuple(int(v) for v, _ in order) if conv.reason is None and conv.kind == "pattern" else (),
        kept_kernels=int(used.size),
        total_kernels=int(masks.size),
        density=float(np.count_nonzero(array)) / max(array.size, 1),
        block=block if conv.reason is None and conv.kind != "pattern" else None,
        op="Gemm" if conv.kind == "fc" else "Conv",
    )



def _grouped_reasons(convs: list[_Conv], shown: int = 3) -> str:
    """Why each conv stays dense, one entry per reason: a MobileNet has 50 convs and 3 reasons."""
    groups: dict[str, list[_Conv]] = {}
    for conv in convs:  # "depthwise (group=32)" and "depthwise (group=96)" are one reason
        groups.setdefault(conv.reason.split(" (")[0], []).append(conv)
    entries = []
    for kind, group in groups.items():
        reasons = {conv.reason for conv in group}
        more = f" (+{len(group) - shown} more)" if len(group) > shown else ""
        names = ", ".join(conv.name for conv in group[:shown])
        entries.append(f"{names}{more}: {reasons.pop() if len(reasons) == 1 else kind}")
    return "; ".join(entries)


def prune_onnx(
    model: str | os.PathLike | onnx.ModelProto,
    n_patterns: int = 8,
    connectivity: float | None = 3.6,
    pointwise: float | None = 4.0,
    pointwise_block: object = (4, 1),
    fc: float | None = None,
    entries: int = 4,
    layers: Mapping[str, bool] | None = None,
    first_layer_dense: bool = True,
    force_centre: bool = True,
) -> PruneResult:
    """Pattern- and connectivity-prune every prunable 3x3 Conv of an ONNX model, and keep
    1/``pointwise`` of every 1x1 Conv's weights (1/``fc`` of every Gemm's but the last).

    1x1 and Gemm weights keep whole blocks of ``pointwise_block`` (output x input channels,
    ``(4, 1)``: 4 consecutive output channels of one input channel; ``(1, 1)``: unstructured),
    the ``round(blocks/rate)`` of largest norm; a layer smaller than one block stays dense.
    ``layers`` maps node names or weight names to ``False`` (keep dense) or ``True`` (prune
    even though the default rule keeps it dense, e.g. the first layer or the classifier);
    forcing a layer that cannot be pruned is an error. ``connectivity=None`` disables
    connectivity pruning, ``pointwise=None`` 1x1 pruning. Only the pruned weight tensors
    change; the input model is not modified and nothing is written (see :func:`save_model_atomic`).
    """
    block = parse_block(pointwise_block)
    for what, rate in (("pointwise", pointwise), ("fc", fc)):
        if rate is not None:
            check_rate(rate, f"{what} rate")
    proto = load_onnx_model(model)
    convs = _find_convs(proto.graph, first_layer_dense, dict(layers or {}), pointwise, block, fc)
    if not convs:
        raise PatDNNError("the model has no Conv layer to prune")
    prunable: dict[str, tuple[_Conv, np.ndarray]] = {}
    for conv in convs:
        if conv.reason is None and conv.weight not in prunable:
            array = numpy_helper.to_array(conv.tensor)
            prunable[conv.weight] = (conv, array.T if conv.transposed else array)
    if not prunable:
        raise PatDNNError(f"the model has no prunable convolution ({_grouped_reasons(convs)})")

    pattern_weights = [array for conv, array in prunable.values() if conv.kind == "pattern"]
    frequencies = pattern_frequencies(pattern_weights, entries, force_centre) if pattern_weights else {}
    pattern_set = select_pattern_set(pattern_weights, n_patterns, entries, force_centre) if pattern_weights else []
    pruned: dict[str, np.ndarray] = {}
    for weight, (conv, array) in prunable.items():
        try:
            if conv.kind == "pattern":
                pruned[weight] = project_pattern_and_connectivity(array, pattern_set, connectivity)
            else:
                rate = pointwise if conv.kind == "pointwise" else fc
                projected = project_pointwise(array, rate, block)
                pruned[weight] = projected.T if conv.transposed else projected
        except PatDNNError as exc:
            raise PatDNNError(f"layer {conv.name}: {exc}") from exc
    for conv in convs:
        if conv.weight in pruned and conv.reason is None:
            _store(conv.tensor, pruned.pop(conv.weight))  # once per shared weight
    records = [
        _record(c, numpy_helper.to_array(c.tensor) if c.tensor is not None else np.zeros((0,)), block)
        for c in convs
    ]
    return PruneResult(proto, records, pattern_set, frequencies)

