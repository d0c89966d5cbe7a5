"""ONNX import with the checks a user needs: clear errors before TVM sees a bad model.

Weights are bound as Relax constants whose span carries the ONNX Conv node's name, so the
pattern pass can report layers under the names the user knows. ``Clip`` with constant bounds
(ReLU6: all over MobileNetV2) is imported as one ``relax.clip``, which the conv rewrites fuse;
TVM's converter emits it as two elementwise ``call_tir``s that nothing fuses into a conv.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import onnx
import tvm
from tvm import relax

from .errors import PatDNNError
from .fileio import load_onnx_model
from .tvm_compat import onnx_convert_map, swapped_onnx_converters

__all__ = ["ImportedModel", "import_onnx"]

_log = logging.getLogger("tvm_patdnn")


@dataclass
class ImportedModel:
    """A Relax module with its constants bound, and the graph's input/output signature."""

    mod: tvm.IRModule
    input_names: list[str]
    input_shapes: dict[str, tuple[int, ...]]
    input_dtypes: dict[str, str]
    output_names: list[str]


def _dynamic(dim) -> bool:
    return not dim.HasField("dim_value") or dim.dim_value <= 0


def _static_inputs(proto: onnx.ModelProto, overrides: dict[str, tuple[int, ...]]):
    initializers = {i.name for i in proto.graph.initializer}
    graph_inputs = [v.name for v in proto.graph.input if v.name not in initializers]
    unknown = set(overrides) - set(graph_inputs)
    if unknown:
        raise PatDNNError(
            f"input_shapes names unknown inputs: {', '.join(sorted(unknown))} (inputs: {', '.join(graph_inputs)})"
        )
    names, shapes, dtypes = [], {}, {}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        if value.name in overrides:
            shape = tuple(int(d) for d in overrides[value.name])
            if not shape or any(d <= 0 for d in shape):
                raise PatDNNError(f"input_shapes gives {value.name!r} the shape {shape}: every dimension must be a "
                                  "positive integer")
        else:
            dims = tensor_type.shape.dim if tensor_type.HasField("shape") else None
            if dims is not None and len(dims) > 1 and _dynamic(dims[0]) and not any(map(_dynamic, dims[1:])):
                # A dynamic batch (what torch.onnx.export's dynamic_axes usually makes): batch 1.
                shown = dims[0].dim_param or "?"
                rest = [int(d.dim_value) for d in dims[1:]]
                _log.warning("note: input %r has a dynamic batch dimension (%s): compiling for batch 1 "
                             "(--input-shape %s=N,%s or input_shapes= sets another)",
                             value.name, shown, value.name, ",".join(map(str, rest)))
                shape = (1, *rest)
            elif dims is None or any(map(_dynamic, dims)):
                shown = "?" if dims is None else "x".join(d.dim_param or (str(d.dim_value) if d.dim_value > 0 else "?") for d in dims)
                example = [d.dim_value if d.dim_value > 0 else 1 for d in dims] if dims else [1, 3, 224, 224]
                raise PatDNNError(
                    f"input {value.name!r} has a dynamic shape ({shown}); give static shapes with "
                    f"input_shapes={{'{value.name}': {tuple(example)}}} / "
                    f"--input-shape {value.name}={','.join(map(str, example))}"
                )
            else:
                shape = tuple(int(d.dim_value) for d in dims)
        names.append(value.name)
        shapes[value.name] = shape
        dtypes[value.name] = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
    return names, shapes, dtypes


def _drop_initializer_inputs(proto: onnx.ModelProto) -> None:
    """Older exporters (IR version < 4) list every initializer as a graph input too; they are
    weights, not inputs, and TVM's importer crashes on them."""
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [v for v in proto.graph.input if v.name not in initializers]
    if len(inputs) != len(proto.graph.input):
        del proto.graph.input[:]
        proto.graph.input.extend(inputs)


def _bound(value: relax.Expr | None, params, default: float) -> float | None:
    """A Clip bound as a float: ``default`` when absent, None when it is not a constant scalar
    (non-finite weights never get here: the loader refuses them)."""
    from tvm.relax.frontend.onnx.onnx_frontend import get_constant

    if value is None:
        return default
    value = get_constant(value, params)
    if not isinstance(value, tvm.ir.GenericConst) or value.value.numpy().size != 1:
        return None
    return float(value.value.numpy().reshape(()))


def _relax_clip(x: relax.Expr, low: float, high: float) -> relax.Expr:
    return relax.op.clip(x, low, high)


@contextlib.contextmanager
def _clip_as_relax_op() -> Iterator[None]:
    """While importing, convert float ``Clip`` nodes with constant bounds (opset 6 attributes or
    opset 11+ constant inputs) to ``relax.clip``; anything else goes to TVM's converter.
    ``from_onnx`` has no custom converter parameter in apache-tvm 0.27, so its converter table is
    swapped for the duration of the import."""
    from tvm.relax.frontend.onnx import onnx_frontend

    class ConstantClip(onnx_frontend.Clip):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            if inputs[0].ty.dtype != "float32":
                return super()._impl_v1(bb, inputs, attr, params)
            return _relax_clip(inputs[0], float(attr.get("min", -math.inf)), float(attr.get("max", math.inf)))

        @classmethod
        def _impl_v13(cls, bb, inputs, attr, params):
            padded = list(inputs) + [None] * (3 - len(inputs))
            low, high = _bound(padded[1], params, -math.inf), _bound(padded[2], params, math.inf)
            if inputs[0].ty.dtype != "float32" or low is None or high is None:
                return super()._impl_v13(bb, inputs, attr, params)
            return _relax_clip(inputs[0], low, high)

    with swapped_onnx_converters(lambda: {"Clip": ConstantClip}):
        yield


def _check_ops(proto: onnx.ModelProto) -> None:
    supported = set(onnx_convert_map()) | {"Constant", "If"}
    unsupported = sorted({n.op_type for n in proto.graph.node if n.op_type not in supported or n.domain not in ("", "ai.onnx")})
    if unsupported:
        raise PatDNNError(f"unsupported ONNX operator(s): {', '.join(unsupported)}")


def import_onnx(
    model: str | os.PathLike | onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None
) -> ImportedModel:
    """Load, check and import an ONNX model into Relax with its weights as named constants."""
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.onnx import from_onnx

    proto = load_onnx_model(model)
    _drop_initializer_inputs(proto)
    names, shapes, dtypes = _static_inputs(proto, dict(input_shapes or {}))
    _check_ops(proto)
    try:
        with warnings.catch_warnings(), _clip_as_relax_op():
            warnings.simplefilter("ignore")
            mod = from_onnx(proto, shape_dict=shapes, keep_params_in_input=True, sanitize_input_names=False)
    except Exception as err:  # the importer raises anything from ValueError to TVMError
        raise PatDNNError(f"TVM cannot import the ONNX model: {str(err).strip().splitlines()[-1]}") from None
    mod, params = detach_params(mod)
    # Keyed as the importer names the weight's variable (it drops an "onnx::" prefix).
    conv_names = {n.input[1].removeprefix("onnx::"): n.name or n.output[0]
                  for n in proto.graph.node if n.op_type == "Conv" and len(n.input) > 1}
    func = mod["main"]
    weights = list(params.get("main", []))
    param_vars = list(func.params)[len(func.params) - len(weights):]
    bound = {}
    for var, tensor in zip(param_vars, weights):
        span = tvm.ir.Span(tvm.ir.SourceName(conv_names.get(var.name, var.name)), 0, 0, 0, 0)
        bound[var.name] = tvm.ir.GenericConst(tensor, var.ty, span)
    if bound:
        mod = relax.transform.BindParams("main", bound)(mod)
    return ImportedModel(
        mod=mod,
        input_names=names,
        input_shapes=shapes,
        input_dtypes=dtypes,
        output_names=[o.name for o in proto.graph.output],
    )
