"""How models come in: ONNX (path or proto), Relax IRModule or ``torch.nn.Module`` -> ``load_model``.

Every entry point (``compile``, ``inspect``, ``tune``, ``deploy``, the OpenCL check) reads a
model through :func:`load_model`, so that all of them accept the same kinds of model with the
same clear errors before TVM sees a bad one, and inputs are checked (:func:`check_inputs`) and
made up (:func:`seeded_inputs`) the same way. Weights are bound as Relax constants whose span carries the ONNX Conv node's name, so the
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
from typing import TYPE_CHECKING, Protocol

import numpy as np
import onnx
import tvm
from tvm import relax

from .errors import PatDNNError
from .fileio import load_onnx_model
from .torch_frontend import export_onnx, is_torch_module
from .tvm_compat import onnx_convert_map, swapped_onnx_converters

if TYPE_CHECKING:
    import torch

__all__ = ["ImportedModel", "InputSignature", "check_inputs", "import_onnx", "load_model", "seeded_inputs"]

_log = logging.getLogger("tvm_patdnn")


@dataclass
class ImportedModel:
    """A Relax module with its constants bound, and the graph's input/output signature."""

    mod: tvm.IRModule
    input_names: list[str]
    input_shapes: dict[str, tuple[int, ...]]
    input_dtypes: dict[str, str]
    output_names: list[str]


class InputSignature(Protocol):
    """What running a model needs to know about its inputs: an ``ImportedModel`` or a
    ``CompiledModel``."""

    input_names: list[str]
    input_shapes: dict[str, tuple[int, ...]]
    input_dtypes: dict[str, str]


def load_model(
    model: str | os.PathLike | onnx.ModelProto | tvm.IRModule | torch.nn.Module,
    *,
    params: dict[str, np.ndarray] | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    example_inputs: tuple | None = None,
) -> ImportedModel:
    """``model`` as a Relax module with its weights bound, and its input/output signature.

    ``model`` is an ONNX file path, an ``onnx.ModelProto`` (``input_shapes`` fixes dynamic
    dimensions), a Relax IRModule (whose ``main`` takes the inputs first and then the weights
    named in ``params``) or a ``torch.nn.Module`` with ``example_inputs`` (a tuple of tensors;
    exported through ONNX, see ``torch_frontend``; convs are named after their modules)."""
    if example_inputs is not None and not is_torch_module(model):
        raise PatDNNError("example_inputs are only for torch.nn.Module models")
    if is_torch_module(model):
        if example_inputs is None:
            raise PatDNNError("a torch.nn.Module needs example_inputs, e.g. compile(module, example_inputs=(x,))")
        model = export_onnx(model, example_inputs)
    if isinstance(model, tvm.IRModule):
        return _from_relax(model, params or {})
    if params:
        raise PatDNNError("params are only for Relax IRModules: ONNX models carry their weights")
    if not isinstance(model, (str, os.PathLike, onnx.ModelProto)):
        raise PatDNNError(f"a model is an ONNX path or ModelProto, a Relax IRModule or a torch.nn.Module "
                          f"(with example_inputs), not {type(model).__name__}")
    return import_onnx(model, input_shapes)


def check_inputs(model: InputSignature, given: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The inputs as contiguous arrays in ``model.input_names`` order; PatDNNError if they do not fit."""
    missing = [n for n in model.input_names if n not in given]
    unknown = [n for n in given if n not in model.input_names]
    if missing or unknown:
        raise PatDNNError(f"inputs must be exactly {model.input_names}; missing {missing}, unknown {unknown}")
    arrays = []
    for name in model.input_names:
        value = given[name]
        if hasattr(value, "numpy") and not isinstance(value, np.ndarray):  # tvm.runtime.Tensor, torch.Tensor
            value = value.numpy()
        if not isinstance(value, (np.ndarray, np.generic, list, tuple, int, float)):
            raise PatDNNError(f"input {name!r} must be a numpy array, not {type(value).__name__}")
        try:
            # np.require keeps a 0-d (scalar) input 0-d; np.ascontiguousarray would make it 1-d
            value = np.require(np.asarray(value, dtype=model.input_dtypes[name]), requirements="C")
        except (TypeError, ValueError) as err:
            raise PatDNNError(f"input {name!r} cannot be read as a {model.input_dtypes[name]} array: {err}") from None
        if value.shape != model.input_shapes[name]:
            raise PatDNNError(f"input {name!r} has shape {value.shape}, the model expects {model.input_shapes[name]}")
        arrays.append(value)
    return arrays


def seeded_inputs(model: InputSignature, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal inputs of the model's shapes and dtypes, the same for the same ``seed``:
    what ``deploy``, ``bench`` and the OpenCL check run when given no inputs, so their numbers
    and comparisons can be reproduced."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(model.input_shapes[name]).astype(model.input_dtypes[name])
            for name in model.input_names}


def _from_relax(mod: tvm.IRModule, params: dict[str, np.ndarray]) -> ImportedModel:
    if "main" not in mod or not isinstance(mod["main"], relax.Function):
        raise PatDNNError("a Relax IRModule needs a Relax function named 'main'")
    func = mod["main"]
    names = [p.name for p in func.params]
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise PatDNNError(f"params name no parameter of main: {', '.join(unknown)}")
    if params:
        mod = relax.transform.BindParams("main", {k: np.asarray(v) for k, v in params.items()})(mod)
    inputs = [p for p in mod["main"].params]
    shapes, dtypes = {}, {}
    for var in inputs:
        shape = getattr(var.ty, "shape", None)
        try:
            shapes[var.name] = tuple(int(d) for d in shape.values)
        except (AttributeError, TypeError, ValueError):
            raise PatDNNError(f"input {var.name!r} of main has no static shape") from None
        dtypes[var.name] = str(var.ty.dtype)
    return ImportedModel(
        mod=mod,
        input_names=[v.name for v in inputs],
        input_shapes=shapes,
        input_dtypes=dtypes,
        output_names=["output"],
    )


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
